//! `mixlm`: the command line of the mixlm pretraining framework.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use mixlm_model::{ModelConfig, Precision, PRESETS};
use mixlm_train::config::toml_string;
use mixlm_train::{train_on, BackendKind, RunConfig, Start, TrainOptions};

#[derive(Parser)]
#[command(name = "mixlm", version, about = "LLM pretraining with data mixing")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model (the embedded demo config when --config is not given).
    Train {
        /// TOML run config.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Override a config value: --set section.key=value (repeatable).
        #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
        overrides: Vec<String>,
        /// cpu, wgpu or cuda (overrides run.backend).
        #[arg(long)]
        backend: Option<String>,
        /// Replace the [mixing] section with this file's (e.g. a run's
        /// learned_mixture.toml, written by DoReMi's proxy run).
        #[arg(long, value_name = "FILE")]
        mixing: Option<PathBuf>,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
        /// Continue the run in this folder (runs/<name>) from its newest valid
        /// checkpoint, with the config saved there; --set may change only keys that
        /// keep it the same run (run.steps, eval.*, checkpoint.*, ...).
        #[arg(long, value_name = "RUN_DIR", conflicts_with_all = ["config", "mixing"])]
        resume: Option<PathBuf>,
        /// Start over even if the run folder already holds a run (its metrics and
        /// checkpoints are replaced).
        #[arg(long, conflicts_with = "resume")]
        overwrite: bool,
        /// Train data-parallel on N devices of the backend (overrides
        /// distributed.devices; with --backend cpu, N ndarray replicas).
        #[arg(long, value_name = "N")]
        devices: Option<usize>,
        /// Machines in the run (overrides distributed.nodes); each runs this command
        /// with its own --node-rank.
        #[arg(long, value_name = "M")]
        nodes: Option<usize>,
        /// This machine's index in 0..M (overrides distributed.node_rank).
        #[arg(long, value_name = "R")]
        node_rank: Option<usize>,
        /// HOST:PORT of the `mixlm orchestrator` the nodes meet through.
        #[arg(long, value_name = "HOST:PORT")]
        orchestrator: Option<String>,
        /// HOST:PORT at which the other nodes reach this one (its data service port).
        #[arg(long, value_name = "HOST:PORT")]
        node_address: Option<String>,
    },
    /// Serve the meeting point of a multi-node run (`mixlm train --nodes M
    /// --orchestrator HOST:PORT`) until stopped.
    Orchestrator {
        /// Port to listen on.
        #[arg(long, default_value_t = 29500)]
        port: u16,
    },
    /// Check a run folder (config, metrics, checkpoints' checksums, whether it can be
    /// resumed), one checkpoint folder, or a prepared dataset (manifest against shards,
    /// token ids, tokenizer hash); prints what it found, exits 1 if anything is wrong.
    Doctor {
        /// runs/<name>, runs/<name>/checkpoints/step-N, or a `mixlm prepare` output.
        path: PathBuf,
        /// A tokenizer.json to check a dataset's shards against (default: the one its
        /// manifest names).
        #[arg(long)]
        tokenizer: Option<PathBuf>,
    },
    /// Check a backend on this machine's device before a long job: the attention
    /// kernels (forward and backward) against Burn's attention, at the presets' shapes
    /// with timings; a few training steps against the CPU; the data-parallel path
    /// against the plain one. Exits non-zero when a check fails.
    CheckBackend {
        /// cpu, wgpu or cuda.
        #[arg(long, default_value = "cuda")]
        backend: String,
        /// Compute precision training would use: f32 or bf16.
        #[arg(long, default_value = "f32")]
        precision: String,
        /// Skip the presets' attention shapes (sequence 2048) and their timings.
        #[arg(long)]
        quick: bool,
        /// Training steps compared with the CPU.
        #[arg(long, default_value_t = 8)]
        steps: u64,
    },
    /// Per-domain perplexity of a checkpoint on the validation and test splits (token-
    /// weighted and sequence-mean) and the average per group; writes eval.json and
    /// eval.md next to the checkpoint (or into --out).
    Eval {
        /// A checkpoint folder, a run folder (its latest checkpoint), or a folder with
        /// Hugging Face config.json + model.safetensors.
        #[arg(long)]
        checkpoint: PathBuf,
        /// Run config naming the data (default: the run.toml saved with the
        /// checkpoint, else the embedded demo config).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Override a config value: --set section.key=value (repeatable).
        #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
        overrides: Vec<String>,
        /// A folder of prepared shards to evaluate on (instead of the config's data).
        #[arg(long)]
        data: Option<PathBuf>,
        /// Splits to evaluate, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "validation,test")]
        splits: Vec<String>,
        /// Inputs per window (default: the config's run.seq_len).
        #[arg(long)]
        seq_len: Option<usize>,
        /// Tokens between window starts; smaller than --seq-len gives sliding-window
        /// perplexity (default: --seq-len, disjoint windows).
        #[arg(long)]
        stride: Option<usize>,
        /// Compute precision: f32, or bf16 on a GPU that has it (the weights stay
        /// as stored; f32 whatever the run trained in, unless given).
        #[arg(long, default_value = "f32")]
        precision: String,
        /// Windows per forward pass (default: the config's eval.batch_size).
        #[arg(long)]
        batch_size: Option<usize>,
        /// Only the first N tokens of each domain's split (default: all of a prepared
        /// split; eval.sequences windows of a synthetic one).
        #[arg(long)]
        max_tokens: Option<u64>,
        /// Where eval.json and eval.md go (default: the checkpoint folder).
        #[arg(long)]
        out: Option<PathBuf>,
        /// A downstream task file (jsonl: context/choices/gold, PIQA, HellaSwag, ARC,
        /// OpenBookQA, WinoGrande or LAMBADA layouts); repeatable.
        #[arg(long = "task", value_name = "FILE")]
        tasks: Vec<PathBuf>,
        /// A held-out set: jsonl / jsonl.zst / parquet file, folder or glob, scored per
        /// domain (records without the domain key count as one domain named after the
        /// file); tokenized once into <out>/heldout/<name>/. Repeatable.
        #[arg(long = "heldout", value_name = "PATH")]
        heldout: Vec<String>,
        /// tokenizer.json for task texts and held-out sets (default: the prepared data's).
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// Score data or texts tokenized with another tokenizer than the model was
        /// trained on (refused otherwise: the same ids are other words).
        #[arg(long)]
        allow_tokenizer_mismatch: bool,
        /// cpu, wgpu or cuda (overrides run.backend).
        #[arg(long)]
        backend: Option<String>,
    },
    /// Train and evaluate every method of a comparison file, one run after the other
    /// (finished runs are skipped, an interrupted one continues from its last
    /// checkpoint), and write <out_dir>/compare/report.md.
    Compare {
        /// The comparison TOML (base config, seeds, [[method]] list).
        file: PathBuf,
        /// Rewrite report.md from results.json without training.
        #[arg(long)]
        report_only: bool,
        /// cpu, wgpu or cuda (default: the base config's run.backend).
        #[arg(long)]
        backend: Option<String>,
        /// No progress bars.
        #[arg(long)]
        quiet: bool,
    },
    /// SampleMix step 1 and 2: score every training document of a prepared corpus.
    Score {
        #[command(subcommand)]
        what: ScoreCommand,
    },
    /// SampleMix step 3: combine quality and diversity, turn a token budget into
    /// per-document counts (the plan `[mixing] method = "samplemix"` trains from).
    Samplemix {
        /// The prepared corpus.
        #[arg(long)]
        data: PathBuf,
        /// The plan folder (default: <data>/samplemix).
        #[arg(long)]
        plan: Option<PathBuf>,
        /// Training tokens the plan should hold (below or above the corpus size).
        #[arg(long)]
        budget: u64,
        /// Weight of diversity against quality (the paper's best: 0.8).
        #[arg(long, default_value_t = mixlm_mixing::samplemix::DEFAULT_ALPHA)]
        alpha: f64,
        /// Seed of the rounding of fractional counts.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Parameter count and FLOPs per token of model presets.
    ModelInfo {
        /// Presets to describe (all when none is given).
        presets: Vec<String>,
        /// Context length for the attention FLOPs and the memory estimate.
        #[arg(long, default_value_t = 2048)]
        seq_len: usize,
        /// Sequences per micro-batch for the memory estimate.
        #[arg(long, default_value_t = 8)]
        batch_size: usize,
    },
    /// Tokenize SlimPajama-style jsonl / jsonl.zst / parquet into per-domain token shards.
    Prepare {
        /// Run config whose `[data.prepare]` section describes the job (flags override it).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Input folders, files or globs (repeatable).
        #[arg(long = "input", value_name = "DIR_OR_GLOB")]
        inputs: Vec<String>,
        /// HF tokenizer.json.
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// Output folder (gets manifest.json and <split>/<domain>.bin/.idx).
        #[arg(long)]
        output: Option<PathBuf>,
        /// Override a value of the [data.prepare] section: --set key=value (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// Rebuild even if the tokenizer or inputs changed since the last prepare.
        #[arg(long)]
        force: bool,
    },
    /// Print the embedded default config (a starting point for your own).
    DefaultConfig,
    /// Mixing methods that train several runs: `grid` (best of a sweep of static
    /// mixtures), `law` (fit a data mixing law to the sweep, take its minimiser),
    /// `doremi` (reference + proxy run), `doge` (proxy run), `skill_it` (one run per
    /// domain -> skills graph). Writes <out_dir>/<name>-search/learned_mixture.toml for
    /// `mixlm train --mixing FILE`.
    MixSearch {
        /// TOML run config each point trains with (its [mixing] is replaced).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Override a config value: --set section.key=value (repeatable).
        #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
        overrides: Vec<String>,
        /// grid, law, doremi, doge or skill_it.
        #[arg(long, default_value = "grid")]
        method: mixlm_train::search::SearchMethod,
        /// Number of static mixtures to train (grid, law).
        #[arg(long, default_value_t = 9)]
        points: usize,
        /// Dirichlet concentration of the sweep for more than two domains.
        #[arg(long, default_value_t = 1.0)]
        alpha: f64,
        /// Steps of the auxiliary runs (DoReMi's reference and proxy, DoGE's proxy,
        /// Skill-It's single-domain runs); default: run.steps.
        #[arg(long)]
        pilot_steps: Option<u64>,
        /// cpu, wgpu or cuda (overrides run.backend).
        #[arg(long)]
        backend: Option<String>,
        /// No progress bars.
        #[arg(long)]
        quiet: bool,
    },
}

/// Options shared by the scoring commands.
#[derive(clap::Args)]
struct ScoreArgs {
    /// The prepared corpus (the folder `mixlm prepare` wrote).
    #[arg(long)]
    data: PathBuf,
    /// The plan folder (default: <data>/samplemix).
    #[arg(long)]
    plan: Option<PathBuf>,
    /// A mixlm checkpoint (or run folder) for model-based scoring.
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Tokens of each document a model or embedding looks at (its first ones).
    #[arg(long, default_value_t = 2048)]
    max_doc_tokens: usize,
    /// Sequences per forward pass.
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// cpu, wgpu or cuda.
    #[arg(long, default_value = "cpu")]
    backend: String,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

#[derive(Subcommand)]
enum ScoreCommand {
    /// Quality on 0..10 per document: Gopher/C4 text rules (`heuristic`, model-free),
    /// a reference model's NLL percentile (`model`, needs --checkpoint), or scores the
    /// records carry (`field`: captured by [data.prepare] quality_keys).
    Quality {
        #[command(flatten)]
        args: ScoreArgs,
        #[arg(long, default_value = "heuristic")]
        scorer: String,
    },
    /// Diversity on 0..1 per document from k-means clusters of embeddings: hashed
    /// n-gram TF-IDF (`tfidf`, model-free) or mean-pooled hidden states (`model`).
    Diversity {
        #[command(flatten)]
        args: ScoreArgs,
        #[arg(long, default_value = "tfidf")]
        embed: String,
        /// TF-IDF dimensions.
        #[arg(long, default_value_t = 1024)]
        dim: usize,
        /// Clusters.
        #[arg(long, default_value_t = 64)]
        k: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Documents k-means is fitted on (a seeded sample); the rest are assigned to
        /// its centroids in chunks, so memory stays flat on large corpora.
        #[arg(long, default_value_t = 200_000)]
        fit_documents: usize,
    },
}

impl ScoreArgs {
    fn options(&self) -> Result<mixlm_train::samplemix::ScoreOptions> {
        Ok(mixlm_train::samplemix::ScoreOptions {
            plan: self
                .plan
                .clone()
                .unwrap_or_else(|| mixlm_train::samplemix::default_plan(&self.data)),
            data: self.data.clone(),
            max_doc_tokens: self.max_doc_tokens,
            batch_size: self.batch_size,
            backend: self.backend.parse()?,
            quiet: self.quiet,
        })
    }

    fn checkpoint(&self, what: &str) -> Result<PathBuf> {
        let path = self.checkpoint.as_ref().ok_or_else(|| {
            anyhow::anyhow!("{what} needs --checkpoint (a mixlm checkpoint or run folder)")
        })?;
        mixlm_train::evaluate::resolve_checkpoint(path)
    }
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
fn rerun_advice(e: anyhow::Error) -> anyhow::Error {
    match e.downcast_ref::<mixlm_train::resume::Interrupted>() {
        Some(stopped) => anyhow::anyhow!(
            "{stopped}; run the same command again to continue it (finished runs are kept)"
        ),
        None => e,
    }
}

/// A flag Ctrl-C and SIGTERM set, so training stops after the current step with a
/// checkpoint; a second signal exits at once.
fn stop_on_signal() -> Result<Arc<AtomicBool>> {
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
        Command::Train {
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
        } => {
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
                    let (config, checkpoint) =
                        mixlm_train::resume::resume_config(run_dir, &overrides)?;
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
            let kind: BackendKind = config.run.backend.parse()?;
            kind.check_compiled()?;
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
            Ok(())
        }
        Command::Orchestrator { port } => {
            eprintln!("mixlm orchestrator: listening on port {port} (Ctrl-C to stop)");
            mixlm_train::distributed::run_orchestrator(port)
        }
        Command::CheckBackend {
            backend,
            precision,
            quick,
            steps,
        } => {
            let precision = match precision.as_str() {
                "f32" => Precision::F32,
                "bf16" => Precision::Bf16,
                other => anyhow::bail!("--precision {other}: use f32 or bf16"),
            };
            let mut options =
                mixlm_train::check::CheckOptions::new(backend.parse::<BackendKind>()?, precision);
            options.preset_shapes &= !quick;
            options.steps = steps;
            let findings = mixlm_train::check::check_backend(&options, |f| println!("{f}"))?;
            let failed = mixlm_train::doctor::failures(&findings);
            if failed > 0 {
                anyhow::bail!("{failed} check(s) failed on the {backend} backend");
            }
            match BackendKind::Cpu.compiled() {
                true => println!("the {backend} backend computes what the CPU reference does"),
                false => println!(
                    "the {backend} backend passed the checks this build can make (without the \
                     CPU reference: see the warning above)"
                ),
            }
            Ok(())
        }
        Command::Doctor { path, tokenizer } => {
            let findings = mixlm_train::doctor::doctor(&path, tokenizer.as_deref());
            for f in &findings {
                println!("{f}");
            }
            let failed = mixlm_train::doctor::failures(&findings);
            if failed > 0 {
                anyhow::bail!("{failed} problem(s) found in {}", path.display());
            }
            println!("no problems found in {}", path.display());
            Ok(())
        }
        Command::MixSearch {
            config,
            mut overrides,
            method,
            points,
            alpha,
            pilot_steps,
            backend,
            quiet,
        } => {
            if let Some(b) = backend {
                overrides.push(format!("run.backend={}", toml_string(&b)));
            }
            let config = match &config {
                Some(path) => RunConfig::load(path, &overrides)?,
                None => RunConfig::embedded(&overrides)?,
            };
            let kind: BackendKind = config.run.backend.parse()?;
            kind.check_compiled()?;
            let options = mixlm_train::search::SearchOptions {
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
            let outcome = mixlm_train::search::mix_search(&config, &options, |c| {
                mixlm_train::resume::train_or_continue(kind, c, &train)
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
        Command::Eval {
            checkpoint,
            config,
            mut overrides,
            data,
            splits,
            seq_len,
            stride,
            batch_size,
            max_tokens,
            out,
            tasks,
            heldout,
            tokenizer,
            allow_tokenizer_mismatch,
            backend,
            precision,
        } => {
            use mixlm_train::evaluate::{
                checkpoint_run_config, default_max_tokens, evaluate_on, resolve_checkpoint,
                EvalOptions,
            };
            if let Some(b) = backend {
                overrides.push(format!("run.backend={}", toml_string(&b)));
            }
            // Before the --set overrides, which win.
            overrides.insert(0, format!("run.precision={}", toml_string(&precision)));
            if let Some(dir) = data {
                overrides.push("data.source=\"shards\"".into());
                overrides.push(format!(
                    "data.path={}",
                    toml_string(&dir.display().to_string())
                ));
            }
            let checkpoint = resolve_checkpoint(&checkpoint)?;
            let config = match &config {
                Some(path) => RunConfig::load(path, &overrides)?,
                None => match checkpoint_run_config(&checkpoint, &overrides)? {
                    Some(c) => c,
                    None => RunConfig::embedded(&overrides)?,
                },
            };
            let kind: BackendKind = config.run.backend.parse()?;
            let splits = splits
                .iter()
                .map(|s| s.parse::<mixlm_data::Split>().map_err(anyhow::Error::msg))
                .collect::<Result<Vec<_>>>()?;
            let seq_len = seq_len.unwrap_or(config.run.seq_len);
            let stride = stride.unwrap_or(seq_len);
            if stride == 0 || stride > seq_len {
                anyhow::bail!("--stride must be in 1..={seq_len} (--seq-len)");
            }
            let max_tokens = max_tokens.or_else(|| default_max_tokens(&config, seq_len));
            let options = EvalOptions {
                out: out.unwrap_or_else(|| checkpoint.clone()),
                checkpoint,
                splits,
                tasks,
                heldout,
                tokenizer,
                allow_tokenizer_mismatch,
                perplexity: mixlm_eval::perplexity::PerplexityOptions {
                    seq_len,
                    stride,
                    batch_size: batch_size.unwrap_or(config.eval.batch_size),
                    max_tokens,
                },
            };
            let report = evaluate_on(kind, &config, &options)?;
            println!(
                "{}{}{}",
                report.table(false),
                report.heldout_table(false),
                report.tasks_table(false)
            );
            println!(
                "written: {} and eval.md",
                options.out.join("eval.json").display()
            );
            Ok(())
        }
        Command::Score { what } => {
            use mixlm_train::samplemix::{
                score_diversity, score_quality, DiversityOptions, Embedder, QualityScorer,
            };
            match what {
                ScoreCommand::Quality { args, scorer } => {
                    let scorer = match scorer.as_str() {
                        "field" => QualityScorer::Field,
                        "heuristic" => QualityScorer::Heuristic,
                        "model" => QualityScorer::Model {
                            checkpoint: args.checkpoint("--scorer model")?,
                        },
                        other => anyhow::bail!("--scorer {other}: use heuristic, model or field"),
                    };
                    let options = args.options()?;
                    let means = score_quality(&options, &scorer)?;
                    println!("mean quality (0..10) per domain:");
                    for (d, m) in &means {
                        println!("  {d:<24} {m:.2}");
                    }
                    println!("written: {}", options.plan.join("quality").display());
                }
                ScoreCommand::Diversity {
                    args,
                    embed,
                    dim,
                    k,
                    seed,
                    fit_documents,
                } => {
                    let embedder = match embed.as_str() {
                        "tfidf" => Embedder::TfIdf { dim },
                        "model" => Embedder::Model {
                            checkpoint: args.checkpoint("--embed model")?,
                        },
                        other => anyhow::bail!("--embed {other}: use tfidf or model"),
                    };
                    let options = args.options()?;
                    let diversity = DiversityOptions {
                        embedder,
                        k,
                        seed,
                        fit_documents,
                    };
                    let report = score_diversity(&options, &diversity)?;
                    println!(
                        "{} clusters fitted on {} documents in {} iterations; sizes {:?}\n",
                        report.k, report.fit_documents, report.iterations, report.sizes
                    );
                    println!("{}", mixlm_train::samplemix::overlap_markdown(&report));
                    println!("written: {}", options.plan.join("diversity").display());
                }
            }
            Ok(())
        }
        Command::Samplemix {
            data,
            plan,
            budget,
            alpha,
            seed,
        } => {
            use mixlm_train::samplemix::{default_plan, make_plan, summary_table, PlanOptions};
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
        Command::Compare {
            file,
            report_only,
            backend,
            quiet,
        } => {
            use mixlm_train::compare::{compare, report_only as rewrite, CompareConfig};
            let config = CompareConfig::load(&file)?;
            let report = config.out_dir.join("compare/report.md");
            if report_only {
                rewrite(&config)?;
            } else {
                let kind: BackendKind = match backend {
                    Some(b) => b.parse()?,
                    None => config
                        .run_config(&config.methods[0], config.seeds[0])?
                        .run
                        .backend
                        .parse()?,
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
        Command::ModelInfo {
            presets,
            seq_len,
            batch_size,
        } => {
            if seq_len == 0 || batch_size == 0 {
                anyhow::bail!("--seq-len and --batch-size must be at least 1 (a memory and FLOPs estimate of an empty batch means nothing)");
            }
            let names: Vec<String> = if presets.is_empty() {
                PRESETS.iter().map(|s| s.to_string()).collect()
            } else {
                presets
            };
            println!(
                "{:<14} {:>6} {:>15} {:>15} {:>14} {:>14} {:>10} {:>10} {:>10}",
                "preset",
                "family",
                "params",
                "non-embedding",
                "fwd GFLOP/tok",
                "train GFLOP/tok",
                "f32 GiB",
                "balanced",
                "bf16+bal."
            );
            for name in names {
                let c = ModelConfig::preset(&name).ok_or_else(|| {
                    anyhow::anyhow!(
                        "unknown preset `{name}`; choose one of: {}",
                        PRESETS.join(", ")
                    )
                })?;
                let fwd = c.forward_flops_per_token(seq_len) as f64 / 1e9;
                let gib = |balanced, precision| {
                    let compute = mixlm_model::Compute {
                        precision,
                        ..Default::default()
                    };
                    c.training_memory(batch_size, seq_len, balanced, compute)
                        .total() as f64
                        / (1u64 << 30) as f64
                };
                println!(
                    "{:<14} {:>6} {:>15} {:>15} {:>14.3} {:>14.3} {:>10.1} {:>10.1} {:>10.1}",
                    name,
                    format!("{:?}", c.family).to_lowercase(),
                    group_digits(c.num_params()),
                    group_digits(c.num_non_embedding_params()),
                    fwd,
                    3.0 * fwd,
                    gib(false, Precision::F32),
                    gib(true, Precision::F32),
                    gib(true, Precision::Bf16)
                );
            }
            println!(
                "(FLOPs at sequence length {seq_len}; training = 3x forward. Memory: estimated \
                 training with AdamW and fused attention at batch {batch_size} x {seq_len}: f32 \
                 without and with run.activation_checkpointing = \"balanced\", and bf16 with \
                 it; see ModelConfig::training_memory)"
            );
            Ok(())
        }
        Command::Prepare {
            config,
            inputs,
            tokenizer,
            output,
            overrides,
            force,
        } => {
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
        Command::DefaultConfig => {
            print!("{}", mixlm_train::config::DEFAULT_CONFIG);
            Ok(())
        }
    }
}

/// 162322944 -> "162,322,944".
fn group_digits(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}
