//! `mixlm export csv|tensorboard RUN`: a run's `metrics.jsonl` as CSV tables (for
//! spreadsheets and pandas) or as TensorBoard event files written afresh.

use std::path::PathBuf;

use anyhow::Result;

#[derive(clap::Subcommand)]
pub enum Format {
    /// train.csv (one row per step) and eval.csv (one row per evaluation); per-domain
    /// fields as `field/domain` columns.
    Csv {
        /// The run folder (runs/<name>).
        run: PathBuf,
        /// Where the two files go (default: the run folder).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// The run's event files (<run>/tensorboard/), rewritten from metrics.jsonl: for
    /// runs trained with `[run] tensorboard = false` or before the files existed.
    Tensorboard {
        /// The run folder (runs/<name>).
        run: PathBuf,
    },
}

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub format: Format,
}

pub fn run(args: Args) -> Result<()> {
    match args.format {
        Format::Csv { run, out } => {
            let out = out.unwrap_or_else(|| run.clone());
            for path in mixlm_train::run_report::export_csv(&run, &out)? {
                println!("written: {}", path.display());
            }
        }
        Format::Tensorboard { run } => {
            let dir = mixlm_train::run_report::export_tensorboard(&run)?;
            println!(
                "written: {} (tensorboard --logdir {})",
                dir.display(),
                dir.display()
            );
        }
    }
    Ok(())
}
