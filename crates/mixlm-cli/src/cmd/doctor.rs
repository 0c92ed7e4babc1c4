//! `mixlm doctor`: what is wrong with a run folder, a checkpoint or a prepared
//! dataset; exits 1 when anything is.

use std::path::PathBuf;

use anyhow::Result;

#[derive(clap::Args)]
pub struct Args {
    /// runs/<name>, runs/<name>/checkpoints/step-N, or a `mixlm prepare` output.
    pub path: PathBuf,
    /// A tokenizer.json to check a dataset's shards against (default: the one its
    /// manifest names).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
}

pub fn run(args: Args) -> Result<()> {
    let Args { path, tokenizer } = args;
    let findings = mixlm_inspect::doctor::doctor(&path, tokenizer.as_deref());
    for f in &findings {
        println!("{f}");
    }
    let failed = mixlm_inspect::doctor::failures(&findings);
    if failed > 0 {
        anyhow::bail!("{failed} problem(s) found in {}", path.display());
    }
    println!("no problems found in {}", path.display());
    Ok(())
}
