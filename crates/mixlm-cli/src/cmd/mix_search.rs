//! `mixlm mix-search`: the mixing methods that train several runs (grid, law,
//! DoReMi, DoGE, Skill-It) and the mixture they learn.

use std::path::PathBuf;

use anyhow::Result;
use mixlm_train::config::toml_string;
use mixlm_train::{RunConfig, TrainOptions};

use crate::{rerun_advice, stop_on_signal};

#[derive(clap::Args)]
pub struct Args {
    /// TOML run config each point trains with (its [mixing] is replaced).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override a config value: --set section.key=value (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub overrides: Vec<String>,
    /// grid, law, doremi, doge or skill_it.
    #[arg(long, default_value = "grid")]
    pub method: mixlm_experiments::search::SearchMethod,
    /// Number of static mixtures to train (grid, law).
    #[arg(long, default_value_t = 9)]
    pub points: usize,
    /// Dirichlet concentration of the sweep for more than two domains.
    #[arg(long, default_value_t = 1.0)]
    pub alpha: f64,
    /// Steps of the auxiliary runs (DoReMi's reference and proxy, DoGE's proxy,
    /// Skill-It's single-domain runs); default: run.steps.
    #[arg(long)]
    pub pilot_steps: Option<u64>,
    /// cpu, wgpu or cuda (overrides run.backend).
    #[arg(long)]
    pub backend: Option<String>,
    /// No progress bars.
    #[arg(long)]
    pub quiet: bool,
}

pub fn run(args: Args) -> Result<()> {
    let Args {
        config,
        mut overrides,
        method,
        points,
        alpha,
        pilot_steps,
        backend,
        quiet,
    } = args;
    if let Some(b) = backend {
        overrides.push(format!("run.backend={}", toml_string(&b)));
    }
    let config = match &config {
        Some(path) => RunConfig::load(path, &overrides)?,
        None => RunConfig::embedded(&overrides)?,
    };
    let kind = crate::backend(&config.run.backend)?;
    let options = mixlm_experiments::search::SearchOptions {
        method,
        points,
        alpha,
        pilot_steps,
    };
    let train = TrainOptions {
        quiet,
        stop: Some(stop_on_signal()?),
        ..Default::default()
    };
    let outcome = mixlm_experiments::search::mix_search(&config, &options, |c| {
        mixlm_experiments::continuation::train_or_continue(kind, c, &train)
    })
    .map_err(rerun_advice)?;
    println!("\n{:<40} mean final validation loss", "run");
    for p in &outcome.points {
        println!("{:<40} {:.4}", p.run.display(), p.mean_val_loss);
    }
    if let Some(chosen) = &outcome.chosen {
        println!("chosen mixture ({}): {chosen:?}", outcome.method);
    }
    if let Some(graph) = &outcome.graph {
        println!("Skill-It graph (row: trained on, column: evaluated):");
        for (row, cols) in graph {
            let cells: Vec<String> = cols.values().map(|v| format!("{v:+.3}")).collect();
            println!("  {row:<20} {}", cells.join(" "));
        }
    }
    if let Some(l) = outcome.predicted_mean_val_loss {
        println!("predicted mean validation loss: {l:.4}");
    }
    println!(
        "written: {}; train on it with --mixing {}",
        outcome.dir.join("search.json").display(),
        outcome.dir.join("learned_mixture.toml").display()
    );
    Ok(())
}
