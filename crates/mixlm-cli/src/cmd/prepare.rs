//! `mixlm prepare`: SlimPajama-style jsonl / jsonl.zst / parquet into per-domain
//! token shards.

use std::path::PathBuf;

use anyhow::Result;

#[derive(clap::Args)]
pub struct Args {
    /// Run config whose `[data.prepare]` section describes the job (flags override it).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Input folders, files or globs (repeatable).
    #[arg(long = "input", value_name = "DIR_OR_GLOB")]
    pub inputs: Vec<String>,
    /// HF tokenizer.json.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Output folder (gets manifest.json and <split>/<domain>.bin/.idx).
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Override a value of the [data.prepare] section: --set key=value (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Rebuild even if the tokenizer or inputs changed since the last prepare.
    #[arg(long)]
    pub force: bool,
}

pub fn run(args: Args) -> Result<()> {
    let Args {
        config,
        inputs,
        tokenizer,
        output,
        overrides,
        force,
    } = args;
    let mut prepare = match &config {
        Some(path) => mixlm_train::config::load_prepare_section(path, &overrides)?,
        None => mixlm_train::config::prepare_from_overrides(&overrides)?,
    };
    if !inputs.is_empty() {
        prepare.inputs = inputs;
    }
    if let Some(t) = tokenizer {
        prepare.tokenizer = t;
    }
    if let Some(o) = output {
        prepare.output = o;
    }
    prepare.force |= force;
    for (flag, missing) in [
        ("--input", prepare.inputs.is_empty()),
        ("--tokenizer", prepare.tokenizer.as_os_str().is_empty()),
        ("--output", prepare.output.as_os_str().is_empty()),
    ] {
        if missing {
            anyhow::bail!("mixlm prepare needs {flag} (or data.prepare in --config)");
        }
    }
    let summary = mixlm_data::prepare(&prepare)?;
    if summary.up_to_date {
        println!(
            "{} is up to date (same inputs, tokenizer and options); nothing to do",
            summary.output.display()
        );
    } else {
        print!("{}", summary.table());
    }
    Ok(())
}
