//! `mixlm compare`: every method of a comparison file trained and evaluated on the
//! same data, one run after the other, and the report.

use std::path::PathBuf;

use anyhow::Result;
use mixlm_train::TrainOptions;

use crate::{rerun_advice, stop_on_signal};

#[derive(clap::Args)]
pub struct Args {
    /// The comparison TOML (base config, seeds, [[method]] list).
    pub file: PathBuf,
    /// Rewrite report.md from results.json without training.
    #[arg(long)]
    pub report_only: bool,
    /// cpu, wgpu or cuda (default: the base config's run.backend).
    #[arg(long)]
    pub backend: Option<String>,
    /// No progress bars.
    #[arg(long)]
    pub quiet: bool,
}

pub fn run(args: Args) -> Result<()> {
    let Args {
        file,
        report_only,
        backend,
        quiet,
    } = args;
    use mixlm_experiments::compare::{compare, report_only as rewrite, CompareConfig};
    let config = CompareConfig::load(&file)?;
    let report = config.out_dir.join("compare/report.md");
    if report_only {
        rewrite(&config)?;
    } else {
        let kind = match &backend {
            Some(b) => crate::backend(b)?,
            None => crate::backend(
                &config
                    .run_config(&config.methods[0], config.seeds[0])?
                    .run
                    .backend,
            )?,
        };
        let train = TrainOptions {
            quiet,
            stop: Some(stop_on_signal()?),
            ..Default::default()
        };
        compare(&config, kind, &train).map_err(rerun_advice)?;
    }
    println!("{}", std::fs::read_to_string(&report)?);
    println!("written: {}", report.display());
    Ok(())
}
