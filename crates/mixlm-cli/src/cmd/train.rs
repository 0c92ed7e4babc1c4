//! `mixlm train`: one training run, new or resumed, and its perplexity table.

use std::path::PathBuf;

use anyhow::Result;
use mixlm_train::config::toml_string;
use mixlm_train::{train_on, RunConfig, Start, TrainOptions};

use crate::stop_on_signal;

#[derive(clap::Args)]
pub struct Args {
    /// TOML run config.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override a config value: --set section.key=value (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub overrides: Vec<String>,
    /// cpu, wgpu or cuda (overrides run.backend).
    #[arg(long)]
    pub backend: Option<String>,
    /// Replace the [mixing] section with this file's (e.g. a run's
    /// learned_mixture.toml, written by DoReMi's proxy run).
    #[arg(long, value_name = "FILE")]
    pub mixing: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Continue the run in this folder (runs/<name>) from its newest valid
    /// checkpoint, with the config saved there; --set may change only keys that
    /// keep it the same run (run.steps, eval.*, checkpoint.*, ...).
    #[arg(long, value_name = "RUN_DIR", conflicts_with_all = ["config", "mixing"])]
    pub resume: Option<PathBuf>,
    /// Start over even if the run folder already holds a run (its metrics and
    /// checkpoints are replaced).
    #[arg(long, conflicts_with = "resume")]
    pub overwrite: bool,
    /// Train data-parallel on N devices of the backend (overrides
    /// distributed.devices; with --backend cpu, N ndarray replicas).
    #[arg(long, value_name = "N")]
    pub devices: Option<usize>,
    /// Machines in the run (overrides distributed.nodes); each runs this command
    /// with its own --node-rank.
    #[arg(long, value_name = "M")]
    pub nodes: Option<usize>,
    /// This machine's index in 0..M (overrides distributed.node_rank).
    #[arg(long, value_name = "R")]
    pub node_rank: Option<usize>,
    /// HOST:PORT of the `mixlm orchestrator` the nodes meet through.
    #[arg(long, value_name = "HOST:PORT")]
    pub orchestrator: Option<String>,
    /// HOST:PORT at which the other nodes reach this one (its data service port).
    #[arg(long, value_name = "HOST:PORT")]
    pub node_address: Option<String>,
}

pub fn run(args: Args) -> Result<()> {
    let Args {
        config,
        mut overrides,
        backend,
        mixing,
        quiet,
        resume,
        overwrite,
        devices,
        nodes,
        node_rank,
        orchestrator,
        node_address,
    } = args;
    // Flags are overrides of their config keys (values in TOML syntax).
    let quoted = |s: String| toml_string(&s);
    for (key, value) in [
        ("run.backend", backend.map(quoted)),
        ("distributed.devices", devices.map(|n| n.to_string())),
        ("distributed.nodes", nodes.map(|n| n.to_string())),
        ("distributed.node_rank", node_rank.map(|r| r.to_string())),
        ("distributed.orchestrator", orchestrator.map(quoted)),
        ("distributed.node_address", node_address.map(quoted)),
    ] {
        if let Some(value) = value {
            overrides.push(format!("{key}={value}"));
        }
    }
    // A resume looks for its checkpoint holding the run folder, so that no
    // other writer changes it meanwhile (node 0 only: the others write nothing).
    let mut lock = None;
    let (mut config, resume_from) = match (&resume, &config) {
        (Some(run_dir), _) => {
            let node_rank = overrides
                .iter()
                .rev()
                .find_map(|s| s.strip_prefix("distributed.node_rank="));
            if run_dir.is_dir() && node_rank.is_none_or(|r| r.trim() == "0") {
                lock = Some(mixlm_data::FolderLock::acquire(run_dir, "mixlm train")?);
            }
            let (config, checkpoint) = mixlm_train::resume::resume_config(run_dir, &overrides)?;
            if config.distributed.node_rank > 0 {
                lock = None;
            }
            (config, Some(checkpoint))
        }
        (None, Some(path)) => (RunConfig::load(path, &overrides)?, None),
        (None, None) => (RunConfig::embedded(&overrides)?, None),
    };
    if let Some(file) = mixing {
        config = config.with_mixing_file(&file)?;
    }
    let kind = crate::backend(&config.run.backend)?;
    // The checks that need the data, before the header says the run starts.
    config.open_checked_source()?;
    let model = config.model.resolve().map_err(anyhow::Error::msg)?;
    eprintln!(
        "mixlm train: run `{}` on {} | model {} ({:.2}M params) | mixing {}{} | {} steps x {} seqs x {} tokens",
        config.run.name,
        kind.name(),
        config.model.preset,
        model.num_params() as f64 / 1e6,
        config.mixing.method_name(),
        config.mixing.note().map_or(String::new(), |n| format!(" ({n})")),
        config.run.steps,
        config.sequences_per_step(),
        config.run.seq_len,
    );
    let d = &config.distributed;
    let peers = d.world_size();
    if peers > 1 {
        let layout = match d.nodes {
            1 => format!("{peers} peers"),
            n => format!(
                "{peers} peers ({n} nodes x {} devices; this is node {})",
                d.devices, d.node_rank
            ),
        };
        let gradients = match d.nccl() {
            true => "through NCCL during the backward pass",
            false => "through burn-collective after the backward pass",
        };
        eprintln!(
            "data-parallel: {layout} x micro-batch {} x {} accumulation step(s) = \
             global batch of {} sequences ({} tokens per step); gradients averaged \
             {gradients}",
            config.run.batch_size,
            config.run.grad_accum,
            config.sequences_per_step(),
            config.tokens_per_step()
        );
    }
    let options = TrainOptions {
        quiet,
        start: match resume_from {
            Some(checkpoint) => Start::ResumeFrom(checkpoint),
            None if overwrite => Start::Overwrite,
            None => Start::New,
        },
        stop: Some(stop_on_signal()?),
    };
    let outcome = train_on(kind, &config, &options)?;
    drop(lock);
    if outcome.interrupted {
        eprintln!(
            "\nstopped after step {} with a checkpoint; continue with: mixlm train --resume {}",
            outcome.steps,
            outcome.run_dir.display()
        );
        return Ok(());
    }
    if config.distributed.node_rank > 0 {
        println!(
            "node {} done ({} steps); node 0 writes the results to {}",
            config.distributed.node_rank,
            outcome.steps,
            outcome.run_dir.display()
        );
        return Ok(());
    }
    println!(
        "\nPer-domain validation perplexity ({} steps, {:.0} tokens/s, final train loss {:.4}):",
        outcome.steps, outcome.tokens_per_second, outcome.final_train_loss
    );
    print!("{}", mixlm_eval::format_table(&outcome.rows));
    println!("results: {}", outcome.run_dir.display());
    match mixlm_train::run_report::write_report(&outcome.run_dir) {
        Ok(report) => println!("report: {} (mixlm report rewrites it)", report.display()),
        Err(e) => eprintln!("warning: the run report was not written: {e:#}"),
    }
    Ok(())
}
