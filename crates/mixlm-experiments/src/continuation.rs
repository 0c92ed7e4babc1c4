//! Continuing the runs of a pipeline (`mixlm compare`, `mixlm mix-search`) that was
//! interrupted: each run continues from its own newest checkpoint when the pipeline
//! is run again, or is read back from its `metrics.jsonl` when it had finished.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use mixlm_data::DomainId;
use mixlm_eval::DomainRow;
use mixlm_mixing::{MixingConfig, Proportions};
use mixlm_train::checkpoint::{checkpoint_dirs, checkpoint_step, find_resumable};
use mixlm_train::metrics::RunLog;
use mixlm_train::resume::check_continues;
use mixlm_train::{BackendKind, RunConfig, Start, TrainOptions, TrainOutcome};

/// A run of a pipeline (`mixlm compare`, `mixlm mix-search`) that a stop request
/// (Ctrl-C, SIGTERM) ended before its last step, after writing a checkpoint: running
/// the same command again continues it.
#[derive(Debug)]
pub struct Interrupted {
    pub run_dir: PathBuf,
    /// Steps completed; the checkpoint is at this step (0: the stop came between
    /// runs, and this one did not start).
    pub step: u64,
}

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.step {
            0 => write!(f, "stopped before training {}", self.run_dir.display()),
            step => write!(
                f,
                "{} stopped after step {step} with a checkpoint",
                self.run_dir.display()
            ),
        }
    }
}

impl std::error::Error for Interrupted {}

/// Trains one run of a pipeline that is rerun after an interruption (`mixlm compare`,
/// `mixlm mix-search`), so that a preempted comparison loses at most the steps since
/// the run's last checkpoint. A run folder whose newest valid checkpoint was written
/// with this config continues from it, or, when that checkpoint is the final one, is
/// read back from its `metrics.jsonl` without training; any other folder content is
/// replaced by a fresh start (said on stderr). Unlike `mixlm train --resume`, a
/// changed `run.steps` starts over: continuing would stretch the saved run's cosine
/// schedule, which is not the run the config describes. `options` gives `quiet` and
/// `stop` (its `start` is decided here); a stop ends with an [`Interrupted`] error.
pub fn train_or_continue(
    kind: BackendKind,
    config: &RunConfig,
    options: &TrainOptions,
) -> Result<TrainOutcome> {
    let run_dir = PathBuf::from(&config.run.out_dir).join(&config.run.name);
    if options.stop_requested() {
        return Err(Interrupted { run_dir, step: 0 }.into());
    }
    let _lock = mixlm_train::trainer::lock_run(config)?;
    let mut train = TrainOptions {
        quiet: options.quiet,
        stop: options.stop.clone(),
        start: Start::Overwrite,
    };
    match continuation(&run_dir, config) {
        Ok(Some(checkpoint)) if checkpoint_step(&checkpoint) == Some(config.run.steps) => {
            match trained_outcome(&run_dir, config)? {
                Some(outcome) => {
                    eprintln!(
                        "{}: already trained to step {}, read back without training",
                        run_dir.display(),
                        config.run.steps
                    );
                    return Ok(outcome);
                }
                None => eprintln!(
                    "{}: its final checkpoint has no final evaluation in metrics.jsonl; \
                     training it again from the start",
                    run_dir.display()
                ),
            }
        }
        Ok(Some(checkpoint)) => train.start = Start::ResumeFrom(checkpoint),
        Ok(None) => {}
        Err(why) => eprintln!("{}: {why:#}; training it from the start", run_dir.display()),
    }
    let outcome = mixlm_train::train_on(kind, config, &train)?;
    if outcome.interrupted {
        return Err(Interrupted {
            run_dir: outcome.run_dir,
            step: outcome.steps,
        }
        .into());
    }
    Ok(outcome)
}

/// The verified checkpoint `config`'s run continues from; `Ok(None)`: nothing was
/// trained there yet; `Err`: what there is cannot be continued (the reason).
fn continuation(run_dir: &Path, config: &RunConfig) -> Result<Option<PathBuf>> {
    if checkpoint_dirs(&run_dir.join("checkpoints"))?.is_empty() {
        return Ok(None);
    }
    let (checkpoint, notes) = find_resumable(run_dir)?;
    for note in notes {
        eprintln!("warning: {note}");
    }
    let saved = RunConfig::load_saved(&checkpoint.join("run.toml"), &[])?;
    check_continues(&saved, config)?;
    if saved.run.steps != config.run.steps {
        bail!(
            "its checkpoint was written by a run of run.steps = {}, this one has {}",
            saved.run.steps,
            config.run.steps
        );
    }
    Ok(Some(checkpoint))
}

/// The outcome of a run trained to its end, as its `metrics.jsonl` and
/// `learned_mixture.toml` recorded it; `None` if the log lacks the final step or
/// evaluation.
fn trained_outcome(run_dir: &Path, config: &RunConfig) -> Result<Option<TrainOutcome>> {
    let steps = config.run.steps;
    let log = RunLog::read(&run_dir.join("metrics.jsonl"))?;
    let Some(last) = log.last_step.filter(|l| l.step == steps) else {
        return Ok(None);
    };
    let eval_at = |step: u64| log.evals.iter().rev().find(|(s, _)| *s == step);
    let Some((_, last_eval)) = eval_at(steps) else {
        return Ok(None);
    };
    let initial = eval_at(0).map(|(_, losses)| losses);
    let source = config.open_source()?;
    let names = source.domain_names();
    let ppl = |losses: &BTreeMap<String, Option<f64>>, name: &String| {
        losses.get(name).copied().flatten().map(f64::exp)
    };
    let rows = names
        .iter()
        .enumerate()
        .map(|(d, name)| DomainRow {
            domain: name.clone(),
            initial_ppl: initial.and_then(|l| ppl(l, name)),
            ppl: ppl(last_eval, name).unwrap_or(f64::NAN),
            floor_ppl: source
                .floor_loss(DomainId(d), config.run.seq_len)
                .map(f64::exp),
        })
        .collect();
    let learned_file = run_dir.join("learned_mixture.toml");
    let learned = match learned_file.exists() {
        false => None,
        true => match config.clone().with_mixing_file(&learned_file)?.mixing {
            MixingConfig::Manual(m) => Some(
                Proportions::from_weights(names.iter().map(|n| m.weights[n]).collect())
                    .with_context(|| format!("{}", learned_file.display()))?,
            ),
            _ => bail!("{} is not a learned mixture", learned_file.display()),
        },
    };
    Ok(Some(TrainOutcome {
        run_dir: run_dir.to_path_buf(),
        rows,
        final_train_loss: last.loss,
        tokens_per_second: last.tokens_per_second(),
        steps,
        learned,
        resumed_from: Some(steps),
        interrupted: false,
        // A finished run read back from its files: no optimizer in memory.
        optimizer_bytes: 0,
    }))
}
