//! `mixlm samplemix`: SampleMix step 3, the per-document counts of a token budget.

use std::path::PathBuf;

use anyhow::Result;

#[derive(clap::Args)]
pub struct Args {
    /// The prepared corpus.
    #[arg(long)]
    pub data: PathBuf,
    /// The plan folder (default: <data>/samplemix).
    #[arg(long)]
    pub plan: Option<PathBuf>,
    /// Training tokens the plan should hold (below or above the corpus size).
    #[arg(long)]
    pub budget: u64,
    /// Weight of diversity against quality (the paper's best: 0.8).
    #[arg(long, default_value_t = mixlm_mixing::samplemix::DEFAULT_ALPHA)]
    pub alpha: f64,
    /// Seed of the rounding of fractional counts.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn run(args: Args) -> Result<()> {
    let Args {
        data,
        plan,
        budget,
        alpha,
        seed,
    } = args;
    use mixlm_experiments::samplemix::{default_plan, make_plan, summary_table, PlanOptions};
    let plan = plan.unwrap_or_else(|| default_plan(&data));
    let summary = make_plan(&PlanOptions {
        data,
        scores: plan.clone(),
        plan: plan.clone(),
        budget,
        alpha,
        seed,
    })?;
    println!("{}", summary_table(&summary));
    println!(
        "written: {} (train with [mixing] method = \"samplemix\", plan = \"{}\")",
        plan.join("counts").display(),
        plan.display()
    );
    Ok(())
}
