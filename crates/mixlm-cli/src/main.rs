//! `mixlm`: the command line of the mixlm pretraining framework. This file parses
//! the command, dispatches it to its module under `cmd/` (one per subcommand: its
//! flags and what it does) and turns errors into one line; [`backend`] is where every
//! command's backend is chosen.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use mixlm_train::BackendKind;

mod cmd;
mod memory;
mod threads;

#[derive(Parser)]
#[command(name = "mixlm", version, about = "LLM pretraining with data mixing")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model (the embedded demo config when --config is not given).
    Train(cmd::train::Args),
    /// Serve the meeting point of a multi-node run (`mixlm train --nodes M
    /// --orchestrator HOST:PORT`) until stopped.
    Orchestrator(cmd::orchestrator::Args),
    /// Check a run folder (config, metrics, checkpoints' checksums, whether it can be
    /// resumed), one checkpoint folder, or a prepared dataset (manifest against shards,
    /// token ids, tokenizer hash); prints what it found, exits 1 if anything is wrong.
    Doctor(cmd::doctor::Args),
    /// Check a backend on this machine's device before a long job: the attention
    /// kernels (forward and backward) against Burn's attention, at the presets' shapes
    /// with timings; a few training steps against the CPU; the data-parallel path
    /// against the plain one. Exits non-zero when a check fails.
    CheckBackend(cmd::check_backend::Args),
    /// Per-domain perplexity of a checkpoint on the validation and test splits (token-
    /// weighted and sequence-mean) and the average per group; writes eval.json and
    /// eval.md next to the checkpoint (or into --out).
    Eval(cmd::eval::Args),
    /// Write one run's report.md with figures (loss, per-domain validation loss and
    /// proportions over tokens, the final per-domain table); `train` writes it too.
    Report(cmd::report::Args),
    /// A run's metrics.jsonl as CSV (`export csv RUN`) or TensorBoard event files
    /// (`export tensorboard RUN`).
    Export(cmd::export::Args),
    /// Train and evaluate every method of a comparison file, one run after the other
    /// (finished runs are skipped, an interrupted one continues from its last
    /// checkpoint), and write <out_dir>/compare/report.md.
    Compare(cmd::compare::Args),
    /// SampleMix step 1 and 2: score every training document of a prepared corpus.
    Score(cmd::score::Args),
    /// SampleMix step 3: combine quality and diversity, turn a token budget into
    /// per-document counts (the plan `[mixing] method = "samplemix"` trains from).
    Samplemix(cmd::samplemix::Args),
    /// Parameter count and FLOPs per token of model presets.
    ModelInfo(cmd::model_info::Args),
    /// Tokenize SlimPajama-style jsonl / jsonl.zst / parquet into per-domain token shards.
    Prepare(cmd::prepare::Args),
    /// Print the embedded default config (a starting point for your own).
    DefaultConfig,
    /// Mixing methods that train several runs: `grid` (best of a sweep of static
    /// mixtures), `law` (fit a data mixing law to the sweep, take its minimiser),
    /// `doremi` (reference + proxy run), `doge` (proxy run), `skill_it` (one run per
    /// domain -> skills graph). Writes <out_dir>/<name>-search/learned_mixture.toml for
    /// `mixlm train --mixing FILE`.
    MixSearch(cmd::mix_search::Args),
}

/// A closed stdout (`mixlm model-info | head -1`) ends the process quietly, as it
/// ends Unix tools. Rust ignores SIGPIPE, so `println!` panics on the broken pipe
/// instead; restoring SIGPIPE would also kill a multi-node run whose peer closed its
/// socket, which must become an error instead. So the panic is caught here, on any
/// thread: exit 0 without a message; every other panic goes to the default hook.
fn exit_quietly_on_a_closed_stdout() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or_default();
        if message.starts_with("failed printing to stdout")
            && (message.contains("Broken pipe") || message.contains("os error 32"))
        {
            std::process::exit(0);
        }
        default(info)
    }));
}

fn main() -> ExitCode {
    memory::keep_freed_memory();
    threads::matmul_on_rayon_only();
    exit_quietly_on_a_closed_stdout();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, each cause once: most of our errors already quote their
/// source in their message, which `{:#}` would print a second time.
fn error_chain(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

/// A pipeline of runs (`compare`, `mix-search`) stopped by Ctrl-C or SIGTERM says
/// how to continue it.
pub fn rerun_advice(e: anyhow::Error) -> anyhow::Error {
    match e.downcast_ref::<mixlm_experiments::continuation::Interrupted>() {
        Some(stopped) => anyhow::anyhow!(
            "{stopped}; run the same command again to continue it (finished runs are kept)"
        ),
        None => e,
    }
}

/// The backend a command runs on, by name (a `--backend` flag or `run.backend`):
/// refused in one line when unknown or not compiled into this binary.
pub fn backend(name: &str) -> Result<BackendKind> {
    let kind: BackendKind = name.parse()?;
    kind.check_compiled()?;
    Ok(kind)
}

/// A flag Ctrl-C and SIGTERM set, so training stops after the current step with a
/// checkpoint; a second signal exits at once.
pub fn stop_on_signal() -> Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            eprintln!("\nsecond interrupt: exiting without a checkpoint");
            std::process::exit(130);
        }
        eprintln!("\ninterrupt: finishing the current step, then writing a checkpoint (again to exit now)");
    })
    .context("cannot install the Ctrl-C / SIGTERM handler")?;
    Ok(stop)
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Train(args) => cmd::train::run(args),
        Command::Orchestrator(args) => cmd::orchestrator::run(args),
        Command::Doctor(args) => cmd::doctor::run(args),
        Command::CheckBackend(args) => cmd::check_backend::run(args),
        Command::Eval(args) => cmd::eval::run(args),
        Command::Report(args) => cmd::report::run(args),
        Command::Export(args) => cmd::export::run(args),
        Command::Compare(args) => cmd::compare::run(args),
        Command::Score(args) => cmd::score::run(args),
        Command::Samplemix(args) => cmd::samplemix::run(args),
        Command::ModelInfo(args) => cmd::model_info::run(args),
        Command::Prepare(args) => cmd::prepare::run(args),
        Command::DefaultConfig => cmd::default_config::run(),
        Command::MixSearch(args) => cmd::mix_search::run(args),
    }
}
