//! `mixlm report RUN`: one run's `report.md` with its figures (also written at the end
//! of `mixlm train`).

use std::path::PathBuf;

use anyhow::Result;

#[derive(clap::Args)]
pub struct Args {
    /// The run folder (runs/<name>).
    pub run: PathBuf,
}

pub fn run(args: Args) -> Result<()> {
    let path = mixlm_train::run_report::write_report(&args.run)?;
    println!("written: {}", path.display());
    Ok(())
}
