//! The training loop: the one place where model, data and mixing scheduler meet.
//!
//! One optimizer step reads top to bottom in [`train_peer`] (nanoGPT style), each
//! part decided by its own component: the scheduler's validation request, the
//! loader's micro-batches with their proportions ([`StepLoader`]), the learning rate
//! ([`RunState::lr`]), forward and backward ([`Objective`]), the update
//! ([`RunState::apply`]), the fault verdict ([`FaultPolicy`]), the scheduler's
//! feedback, the record ([`Report`]), maybe an evaluation, maybe a checkpoint, the
//! stop check. Setting a run up and finishing it are [`Run::set_up`] and
//! [`Run::finish`].

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use mixlm_data::{check_split_ids, FolderLock, MixtureSampler, SamplerState, Split, TokenSource};
use mixlm_eval::DomainRow;
use mixlm_mixing::{build_scheduler, DomainId, DomainInfo, Scheduler, StepFeedback};
use mixlm_model::hf::hf_config;
use mixlm_model::{ModelConfig, TrainBackend, Transformer};

use crate::checkpoint::{
    checkpoint_dir, checkpoint_step, latest_checkpoint, load_verified_sliced, write_checkpoint,
    Restored,
};
use crate::config::RunConfig;
use crate::distributed::{
    check_agreement, checksum, run_peers, sum_domain_losses, GradSyncServer, Peer, Rank,
};
use crate::faults::{FaultPolicy, FaultRecord, SequenceRef, Verdict};
use crate::laps::Laps;
use crate::loader::StepLoader;
use crate::metrics::{StepRecord, StepTimes};
use crate::objective::{Objective, StepContext, StepLosses};
use crate::optim::{HostMoments, StepStats};
use crate::report::Report;
use crate::resume::check_continues;
use crate::state::RunState;
use crate::validation::Validation;

/// Switches for how a run starts and reports, not what it computes.
#[derive(Debug, Clone, Default)]
pub struct TrainOptions {
    /// Hide the progress bar (tests); log lines still follow `run.log_every`.
    pub quiet: bool,
    /// A new run, or the continuation of the one in `<out_dir>/<name>`.
    pub start: Start,
    /// Set from outside (Ctrl-C, SIGTERM) to stop after the current step with a
    /// checkpoint.
    pub stop: Option<Arc<AtomicBool>>,
}

/// What a run does with its folder, `<out_dir>/<name>`.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum Start {
    /// A new run; refused where the folder already holds one (metrics or
    /// checkpoints), so that nothing is silently replaced.
    #[default]
    New,
    /// A new run that replaces the folder's metrics and checkpoints.
    Overwrite,
    /// Continue from the newest valid checkpoint, which the trainer finds and
    /// verifies (hashing every file: about a minute for an 8B preset's); the config
    /// must be the one saved there, up to [`crate::resume::SAFE_KEYS`].
    Resume,
    /// Continue from this checkpoint, already verified by the caller
    /// ([`crate::resume::resume_config`]).
    ResumeFrom(PathBuf),
}

impl TrainOptions {
    /// Whether [`Self::stop`] has been set.
    pub fn stop_requested(&self) -> bool {
        self.stop.as_ref().is_some_and(|s| s.load(Ordering::SeqCst))
    }

    /// No progress bar, otherwise the defaults (tests, and jobs that print their own).
    pub fn quiet() -> Self {
        Self {
            quiet: true,
            ..Self::default()
        }
    }
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct TrainOutcome {
    pub run_dir: PathBuf,
    /// Per-domain validation perplexity before and after training.
    pub rows: Vec<DomainRow>,
    /// Mean training loss of the last step.
    pub final_train_loss: f64,
    pub tokens_per_second: f64,
    pub steps: u64,
    /// The static mixture the scheduler learned (DoReMi, DoGE proxy runs).
    pub learned: Option<mixlm_mixing::Proportions>,
    /// The step a resumed run continued from.
    pub resumed_from: Option<u64>,
    /// Stopped by [`TrainOptions::stop`] before `run.steps`, after writing a checkpoint
    /// (`steps` says where); `rows` is then empty.
    pub interrupted: bool,
    /// Bytes of AdamW state peer 0 held at the end: its slices when sharded
    /// (`distributed.shard`), everything otherwise.
    pub optimizer_bytes: usize,
}

/// Trains the model a config describes, on backend `B`, and writes
/// `<out_dir>/<name>/{config.toml, metrics.jsonl, checkpoints/}`. With
/// `distributed.devices = N > 1`, N data-parallel peers share `device`: meant for the
/// CPU (on a GPU, Burn 0.21 is not reliable with several threads on one device; use
/// [`train_data_parallel`] with one device per peer, as `mixlm train --devices` does).
pub fn train<B: TrainBackend>(
    config: &RunConfig,
    device: &B::Device,
    options: &TrainOptions,
) -> Result<TrainOutcome> {
    train_data_parallel::<B>(
        config,
        &vec![device.clone(); config.distributed.devices],
        options,
    )
}

/// [`train`] with one data-parallel peer per device of `devices` (as many as
/// `distributed.devices`), threads of this process (see [`crate::distributed`]).
pub fn train_data_parallel<B: TrainBackend>(
    config: &RunConfig,
    devices: &[B::Device],
    options: &TrainOptions,
) -> Result<TrainOutcome> {
    config.validate()?;
    // Opened once, and checked against the config, before anything is written.
    let source: Arc<dyn TokenSource> = Arc::from(config.open_checked_source()?);
    let d = &config.distributed;
    let local = d.devices;
    if devices.len() != local {
        bail!(
            "distributed.devices = {local}, but {} device(s) were given",
            devices.len()
        );
    }
    let world = d.world_size();
    let _lock = lock_run(config)?;
    // The checkpoint a resumed run continues from, verified once for all peers.
    let resume_from = match &options.start {
        Start::ResumeFrom(verified) => Some(verified.clone()),
        Start::Resume => Some(latest_checkpoint(
            &PathBuf::from(&config.run.out_dir).join(&config.run.name),
        )?),
        Start::New | Start::Overwrite => None,
    };
    let resume_from = resume_from.as_deref();
    if !d.collective() {
        let peer = Peer::solo(&devices[0]);
        return train_peer::<B>(config, &source, &devices[0], options, resume_from, &peer);
    }
    let nodes = (d.nodes > 1).then_some(d);
    // Burn's collective server is one per backend and process: one group at a time.
    static GROUP: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _group = GROUP.lock().unwrap_or_else(|e| e.into_inner());
    let timeout = std::time::Duration::from_secs(config.distributed.timeout_s);
    let _grad_sync = match d.nccl() {
        true => Some(GradSyncServer::<B::InnerBackend>::start(devices)?),
        false => None,
    };
    run_peers::<B::InnerBackend, _, _>(local, timeout, |local_rank, heartbeat| {
        let device = &devices[local_rank.rank];
        let rank = Rank {
            rank: d.node_rank * local + local_rank.rank,
            world,
        };
        let peer = Peer::register_on_nodes(rank, local, nodes, device, heartbeat)?
            .with_bucket_mb(d.bucket_mb)
            .with_grads_in_backward(d.nccl())
            .with_shard(d.shard);
        let outcome = train_peer::<B>(config, &source, device, options, resume_from, &peer);
        if outcome.is_ok() {
            peer.finish();
        }
        outcome
    })
}

/// Locks the run's folder for writing ([`mixlm_data::lock`]) before anything in it
/// is written; `None` on nodes other than node 0, which write nothing there.
pub fn lock_run(config: &RunConfig) -> Result<Option<FolderLock>> {
    if config.distributed.node_rank > 0 {
        return Ok(None);
    }
    let run_dir = PathBuf::from(&config.run.out_dir).join(&config.run.name);
    Ok(Some(FolderLock::acquire(&run_dir, "mixlm train")?))
}

/// Refuses a `run.precision` the device cannot compute in, saying what to use.
pub fn check_precision<B: burn::tensor::backend::Backend>(
    precision: mixlm_model::Precision,
    device: &B::Device,
) -> Result<()> {
    let dtype = precision.dtype().into();
    if !B::supports_dtype(device, dtype) {
        bail!(
            "run.precision = \"{}\": the {} backend cannot compute in {dtype:?} on this \
             device; use precision = \"f32\" (bf16 needs a GPU that has it, on the cuda backend)",
            precision.name(),
            B::name(device)
        );
    }
    Ok(())
}

/// Every peer's `(domain, window)` picks of the step, peer by peer: the global batch.
fn global_picks<B: burn::tensor::backend::Backend>(
    peer: &Peer<B>,
    picks: &[(DomainId, u64)],
) -> Result<Vec<(DomainId, u64)>> {
    let encoded: Vec<f64> = picks
        .iter()
        .flat_map(|&(d, window)| [d.0 as f64, window as f64])
        .collect();
    let all = peer.gather("the step's sequences", &encoded)?;
    Ok(all
        .iter()
        .flat_map(|p| p.chunks_exact(2))
        .map(|c| (DomainId(c[0] as usize), c[1] as u64))
        .collect())
}

/// Serialises model initialisation: Burn's backends seed one global generator, so
/// data-parallel peers initialising at once would draw from it in turn and peer 0's
/// weights (broadcast to the others) would depend on thread timing.
static INIT: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// One peer's training loop (the only peer of a run on one device); `resume_from`:
/// the verified checkpoint a resumed run continues from.
fn train_peer<B: TrainBackend>(
    config: &RunConfig,
    source: &Arc<dyn TokenSource>,
    device: &B::Device,
    options: &TrainOptions,
    resume_from: Option<&Path>,
    peer: &Peer<B::InnerBackend>,
) -> Result<TrainOutcome> {
    let run = &config.run;
    let mut r = Run::<B>::set_up(config, source, device, options, resume_from, peer)?;
    let (leader, world, k) = (peer.rank().is_leader(), peer.rank().world, r.names.len());
    let start = r.state.step;
    r.report.start_at(start);
    r.state.clock.start();
    while r.state.step < run.steps {
        let (step, state) = (r.state.step, &mut r.state);
        let mut laps = Laps::start(r.report.since_record());
        peer.heartbeat().at_step(step);
        if state.scheduler.wants_validation(step) {
            let val = r.validation.shared(state.model(), peer, device)?;
            state.scheduler.observe_validation(step, &val);
        }
        let proportions = r.loader.begin(step, state.scheduler.as_mut());
        let lr = state.lr(config);
        let (model, scheduler) = state.model_and_scheduler();
        let out = r.objective.step(StepContext {
            step,
            lr,
            model,
            scheduler,
            domains: k,
            batches: &mut r.loader,
            peer,
            device,
            grad_accum: run.grad_accum,
            seq_len: run.seq_len,
            laps: &mut laps,
        })?;
        // The global batch's losses, the stop request of any peer, and a check that
        // every peer drew with the same proportions.
        let (losses, stop_now) = over_peers(peer, out.losses, &proportions, options, step)?;
        let loss = r.faults.loss(step + 1, losses.mean());
        let stats = state.apply(lr, out.grads, loss, peer)?;
        laps.model();
        let describe = |kind: &'static str, action: &'static str| -> Result<FaultRecord> {
            let sequences = global_picks(peer, &out.picks)?;
            Ok(fault_record(
                (kind, action),
                (step + 1, loss, stats.grad_norm),
                &losses,
                &sequences,
                &r.names,
                r.source.as_ref(),
                run.seq_len,
            ))
        };
        let facts = (step + 1, loss, stats.grad_norm, stats.applied);
        match r.faults.judge(facts, &mut state.counters, &describe)? {
            Verdict::Applied | Verdict::Skipped => {}
            Verdict::RollBack(what) => {
                let checkpoint =
                    load_for_rollback::<B>(&r.run_dir, device, peer).with_context(|| {
                        format!("{what}; faults.on_nan = \"rollback\" needs a checkpoint")
                    })?;
                let (dir, lr_scale) = (
                    checkpoint.dir.clone(),
                    r.faults.backed_off(state.counters.lr_scale),
                );
                let sampler = state.restore(checkpoint, config, k)?;
                state.counters.lr_scale = lr_scale;
                r.faults
                    .rolled_back(&what, (&dir, state.step, lr_scale), &describe)?;
                r.report.rewind(state.step)?;
                r.loader.restart(sampler, state.step);
                continue;
            }
        }
        let feedback = losses.feedback(run.grad_accum * world);
        state.scheduler.observe_train(step, &feedback);
        laps.mixing();
        state.step += 1;
        let record = step_record(
            state,
            config,
            (lr, loss, stats),
            &feedback,
            &proportions,
            &r.names,
            laps.times,
        );
        r.report.step(&record)?;
        let at_end = state.step == run.steps;
        if leader && due(config.eval.every, state.step) && !at_end {
            let val = r.validation.losses(state.model(), device);
            crate::chaos::pause_at("eval");
            let epochs = data_epochs(r.source.as_ref(), r.loader.consumed_state(), run.seq_len);
            r.report
                .eval((state.step, record.tokens), &r.names, &val, &epochs)?;
            r.report.eval_line(state.step, &r.names, &val);
        }
        let stopping = !at_end && stop_now;
        if (due(config.checkpoint.every, state.step) && !at_end) || stopping {
            r.save()?;
        }
        if stopping {
            r.report.abandon();
            break;
        }
    }
    r.finish(start, resume_from.is_some())
}

/// Whether a periodic action with period `every` (0: never) falls after step `step`.
fn due(every: u64, step: u64) -> bool {
    every > 0 && step.is_multiple_of(every)
}

/// Sums this peer's step losses over the peers; also whether any peer was asked to
/// stop, after checking that every peer drew step `step` with the same proportions.
fn over_peers<B: burn::tensor::backend::Backend>(
    peer: &Peer<B>,
    losses: StepLosses,
    proportions: &mixlm_mixing::Proportions,
    options: &TrainOptions,
    step: u64,
) -> Result<(StepLosses, bool)> {
    let stop = options.stop_requested();
    if !peer.collective() {
        return Ok((losses, stop));
    }
    let mut extra = vec![f64::from(u8::from(stop))];
    extra.extend(checksum(proportions.as_slice()));
    let (summed, extras) = sum_domain_losses(peer, "per-domain losses", &losses.parts(), &extra)?;
    check_agreement(
        "mixture proportions",
        step + 1,
        &extras.iter().map(|e| e[1..].to_vec()).collect::<Vec<_>>(),
    )?;
    let stop = extras.iter().any(|e| e[0] != 0.0);
    Ok((losses.with_parts(summed.into_iter()), stop))
}

/// A line of `faults.jsonl` for step `step` (1-based), listing the global batch's
/// `sequences`.
fn fault_record(
    (kind, action): (&'static str, &'static str),
    (step, loss, grad_norm): (u64, f64, f64),
    losses: &StepLosses,
    sequences: &[(DomainId, u64)],
    names: &[String],
    source: &dyn TokenSource,
    seq_len: usize,
) -> FaultRecord {
    FaultRecord {
        kind,
        step,
        action,
        loss,
        grad_norm: grad_norm.is_finite().then_some(grad_norm),
        mean: None,
        rolled_back_to: None,
        lr_scale: None,
        domain_loss: crate::metrics::by_name(names, &losses.train.means().0),
        sequences: sequences
            .iter()
            .map(|&(d, window)| SequenceRef {
                domain: names[d.0].clone(),
                window,
                documents: source.window_documents(d, Split::Train, window, seq_len),
            })
            .collect(),
    }
}

/// The `metrics.jsonl` record of the step `state` has just completed.
fn step_record<B: TrainBackend>(
    state: &RunState<B>,
    config: &RunConfig,
    (lr, loss, stats): (f64, f64, StepStats),
    feedback: &StepFeedback,
    proportions: &mixlm_mixing::Proportions,
    names: &[String],
    times: StepTimes,
) -> StepRecord {
    let tokens = state.step * config.tokens_per_step();
    let elapsed = state.clock.elapsed();
    StepRecord {
        kind: "train",
        step: state.step,
        tokens,
        lr,
        loss,
        grad_norm: stats.grad_norm,
        skipped: !stats.applied,
        domain_loss: crate::metrics::by_name(names, &feedback.train.0),
        sequences: crate::metrics::by_name(names, &feedback.sequences),
        proportions: crate::metrics::by_name(names, proportions.as_slice()),
        domain_weights: state
            .scheduler
            .domain_weights()
            .map(|w| crate::metrics::by_name(names, w.as_slice())),
        elapsed_s: elapsed,
        tokens_per_s: tokens as f64 / elapsed.max(1e-9),
        method: state
            .scheduler
            .watch()
            .into_iter()
            .map(|(quantity, values)| (quantity, crate::metrics::by_index_or_name(names, &values)))
            .collect(),
        wall_time: mixlm_tensorboard::now(),
        time_s: times,
    }
}

/// Everything one peer's run is made of: the state the loop advances and the
/// components it asks for each part of a step.
struct Run<'a, B: TrainBackend> {
    config: &'a RunConfig,
    device: &'a B::Device,
    peer: &'a Peer<B::InnerBackend>,
    run_dir: PathBuf,
    model_config: ModelConfig,
    source: Arc<dyn TokenSource>,
    names: Vec<String>,
    state: RunState<B>,
    loader: StepLoader,
    objective: Box<dyn Objective<B>>,
    validation: Validation,
    faults: FaultPolicy,
    report: Report,
}

impl<'a, B: TrainBackend> Run<'a, B> {
    /// Builds the scheduler for the data, and starts the model afresh or from the
    /// checkpoint `resume_from`; measures the initial validation losses (peer 0).
    fn set_up(
        config: &'a RunConfig,
        source: &Arc<dyn TokenSource>,
        device: &'a B::Device,
        options: &TrainOptions,
        resume_from: Option<&Path>,
        peer: &'a Peer<B::InnerBackend>,
    ) -> Result<Self> {
        let run = &config.run;
        let leader = peer.rank().is_leader();
        let model_config: ModelConfig = config.model.resolve().map_err(anyhow::Error::msg)?;
        check_precision::<B>(run.precision, device)?;
        let source = source.clone();
        let names = source.domain_names();
        let k = names.len();
        let scheduler: Box<dyn Scheduler> = build_scheduler(
            &config.mixing,
            &DomainInfo {
                names: names.clone(),
                natural_weights: source.natural_weights(),
                seed: run.seed,
                steps: run.steps,
            },
        )?;
        // Evaluated windows are checked here, training batches as they are drawn.
        check_split_ids(source.as_ref(), Split::Validation, model_config.vocab_size)
            .map_err(anyhow::Error::msg)?;
        let requirements = scheduler.requirements();
        let run_dir = PathBuf::from(&run.out_dir).join(&run.name);
        let restored = match resume_from {
            Some(dir) => Some(restore::<B>(
                &run_dir,
                dir,
                config,
                &model_config,
                device,
                peer,
            )?),
            None => {
                if leader {
                    refuse_to_overwrite(&run_dir, options.start == Start::Overwrite)?;
                }
                None
            }
        };
        let quiet = options.quiet;
        let mut report = Report::open(
            &run_dir,
            config,
            restored.as_ref().map(|r| r.state.step),
            leader,
            quiet,
        )?;
        let reference = match &requirements.reference_model {
            Some(path) => Some(load_reference::<B::InnerBackend>(
                path,
                &model_config,
                device,
            )?),
            None => None,
        };
        let (mut state, sampler) = match restored {
            Some(r) => {
                let shard = peer.shard_layout(&r.model);
                RunState::resumed(r, scheduler, config, k, shard)?
            }
            None => {
                let model = initial_model::<B>(config, &model_config, device, peer)?;
                let shard = peer.shard_layout(&model);
                (
                    RunState::new(model, scheduler, config, shard),
                    MixtureSampler::new(k, run.seed, config.data.composition),
                )
            }
        };
        let loader = StepLoader::new(
            source.clone(),
            config,
            model_config.vocab_size,
            peer.rank(),
            sampler,
            state.step,
        );
        let objective = crate::objective::for_scheduler::<B>(
            &requirements,
            reference,
            k,
            (source.clone(), run.seed),
        );
        let validation = Validation::new(source.clone(), config);
        // Only peer 0 reports (the metrics, the final table).
        if state.initial.is_none() && leader {
            let initial = validation.losses(state.model(), device);
            if state.step == 0 {
                report.eval((0, 0), &names, &initial, &[])?;
            }
            state.initial = Some(initial);
        }
        Ok(Self {
            config,
            device,
            peer,
            faults: FaultPolicy::new(&config.faults, &run_dir, leader),
            run_dir,
            model_config,
            source,
            names,
            state,
            loader,
            objective,
            validation,
            report,
        })
    }

    /// Writes a checkpoint of the state after its last step (peer 0; every peer
    /// takes part when the optimizer state is sharded, to gather it).
    fn save(&self) -> Result<()> {
        match self.state.optimizer.host_moments(self.peer)? {
            Some(moments) => self.write(&moments),
            None => Ok(()),
        }
    }

    /// Writes the checkpoint with the whole `moments` (peer 0).
    fn write(&self, moments: &HostMoments) -> Result<()> {
        let world = self.peer.rank().world;
        let snapshot = self
            .state
            .snapshot(self.loader.consumed_state(), self.config, world);
        let state = &self.state;
        write_checkpoint(
            &self.run_dir,
            state.model(),
            &self.model_config,
            moments,
            &snapshot,
            self.config,
        )
        .map(drop)
    }

    /// After the loop (`start`: the step this process began at): at the end of the
    /// run, the final evaluation, learned mixture and checkpoint (peer 0).
    fn finish(mut self, start: u64, resumed: bool) -> Result<TrainOutcome> {
        let (config, run) = (self.config, &self.config.run);
        // Steps completed: `run.steps`, or fewer when a stop request ended the loop.
        let completed = self.state.step;
        let elapsed = self.state.clock.since_start();
        let trained_tokens = (completed - start) * config.tokens_per_step();
        let interrupted = completed < run.steps;
        if !interrupted {
            self.report.finish();
        }
        let mut outcome = TrainOutcome {
            run_dir: self.run_dir.clone(),
            rows: Vec::new(),
            final_train_loss: self.state.counters.last_loss,
            tokens_per_second: trained_tokens as f64 / elapsed.max(1e-9),
            steps: completed,
            learned: None,
            resumed_from: resumed.then_some(start),
            interrupted,
            optimizer_bytes: self.state.optimizer.state_bytes(),
        };
        if interrupted {
            return Ok(outcome);
        }
        outcome.learned = self.state.scheduler.learned_proportions();
        // Every peer gives its part of a sharded optimizer state; peer 0 alone
        // evaluates, reports and writes the final checkpoint.
        let moments = match config.checkpoint.save_final {
            true => self.state.optimizer.host_moments(self.peer)?,
            false => None,
        };
        if !self.peer.rank().is_leader() {
            return Ok(outcome);
        }
        let names = &self.names;
        let last = self.validation.losses(self.state.model(), self.device);
        let epochs = data_epochs(
            self.source.as_ref(),
            self.loader.consumed_state(),
            run.seq_len,
        );
        self.report.eval(
            (run.steps, run.steps * config.tokens_per_step()),
            names,
            &last,
            &epochs,
        )?;
        for (name, e) in names.iter().zip(&epochs) {
            if let Some(e) = e.filter(|e| *e > 1.0) {
                eprintln!("note: domain {name} was repeated: {e:.2} epochs of its training data");
            }
        }
        if let Some(learned) = &outcome.learned {
            let path = self.run_dir.join("learned_mixture.toml");
            crate::checkpoint::write_atomic(
                &path,
                learned_mixture_toml(names, learned).as_bytes(),
            )?;
            eprintln!(
                "learned mixture ({}) written to {}; train on it with --mixing {}",
                self.state.scheduler.name(),
                path.display(),
                path.display()
            );
        }
        if let Some(moments) = &moments {
            self.write(moments)?;
        }
        let initial = self.state.initial.as_ref();
        outcome.rows = names
            .iter()
            .enumerate()
            .map(|(d, name)| DomainRow {
                domain: name.clone(),
                initial_ppl: initial.and_then(|i| i.0[d]).map(f64::exp),
                ppl: last.0[d].map(f64::exp).unwrap_or(f64::NAN),
                floor_ppl: self
                    .source
                    .floor_loss(DomainId(d), run.seq_len)
                    .map(f64::exp),
            })
            .collect();
        Ok(outcome)
    }
}

/// A new run's model: `model.init_from`'s weights or a fresh initialisation on peer
/// 0, broadcast to the others.
fn initial_model<B: TrainBackend>(
    config: &RunConfig,
    model_config: &ModelConfig,
    device: &B::Device,
    peer: &Peer<B::InnerBackend>,
) -> Result<Transformer<B>> {
    let model = {
        let _init = INIT.lock().unwrap_or_else(|e| e.into_inner());
        B::seed(device, config.run.seed);
        let model = match &config.model.init_from {
            // Peer 0's copy is broadcast to the others.
            Some(path) if peer.rank().is_leader() => load_initial::<B>(path, model_config, device)?,
            _ => crate::distributed::materialize(model_config.init(device)),
        };
        // The GPU backends queue the draws: run them before another peer may reseed
        // the generator.
        B::sync(device)?;
        model
    };
    peer.broadcast_model(model)
}

/// The newest checkpoint, loaded for a rollback. Peer 0 finds and verifies it and
/// names its step to the others, so its files are hashed once per run rather than
/// once per peer (minutes for an 8B preset's) and every peer loads the same one.
fn load_for_rollback<B: TrainBackend>(
    run_dir: &std::path::Path,
    device: &B::Device,
    peer: &Peer<B::InnerBackend>,
) -> Result<Restored<B>> {
    let newest = match peer.rank().is_leader() {
        // A `step-N` folder: `latest_checkpoint` picks among those.
        true => checkpoint_step(&latest_checkpoint(run_dir)?).unwrap_or_default(),
        false => 0,
    };
    let named = peer.gather("the checkpoint to roll back to", &[newest as f64])?[0][0];
    load_for_peer::<B>(&checkpoint_dir(run_dir, named as u64), device, peer)
}

/// Loads a verified checkpoint with the moments `peer` keeps (its slices when the
/// run is sharded).
fn load_for_peer<B: TrainBackend>(
    dir: &std::path::Path,
    device: &B::Device,
    peer: &Peer<B::InnerBackend>,
) -> Result<Restored<B>> {
    load_verified_sliced::<B>(dir, device, |model| {
        peer.shard_layout(model).map(|l| l.owned_by_path())
    })
}

/// A fresh start must not silently replace the metrics and checkpoints of an earlier
/// run of the same name.
fn refuse_to_overwrite(run_dir: &std::path::Path, overwrite: bool) -> Result<()> {
    let metrics = run_dir.join("metrics.jsonl");
    let has_run = std::fs::metadata(&metrics).is_ok_and(|m| m.len() > 0)
        || run_dir.join("checkpoints").is_dir();
    if !has_run {
        return Ok(());
    }
    if !overwrite {
        bail!(
            "{} already holds a run: continue it with `mixlm train --resume {0}`, start over \
             with --overwrite (its metrics and checkpoints are replaced), or choose another \
             run.name",
            run_dir.display()
        );
    }
    let checkpoints = run_dir.join("checkpoints");
    if checkpoints.is_dir() {
        std::fs::remove_dir_all(&checkpoints)
            .with_context(|| format!("cannot delete {}", checkpoints.display()))?;
    }
    let faults = run_dir.join("faults.jsonl");
    if faults.exists() {
        std::fs::remove_file(&faults)
            .with_context(|| format!("cannot delete {}", faults.display()))?;
    }
    Ok(())
}

/// Loads the checkpoint `dir` (verified) that `run_dir` resumes from and checks it
/// belongs to this config.
fn restore<B: TrainBackend>(
    run_dir: &std::path::Path,
    dir: &std::path::Path,
    config: &RunConfig,
    model_config: &ModelConfig,
    device: &B::Device,
    peer: &Peer<B::InnerBackend>,
) -> Result<Restored<B>> {
    let Rank { rank, world } = peer.rank();
    let restored = load_for_peer::<B>(dir, device, peer)?;
    if !crate::resume::same_global_batch(&restored.run_config, config) {
        bail!(
            "{}: {}",
            dir.display(),
            crate::resume::another_global_batch(&restored.run_config, world)
        );
    }
    check_continues(&restored.run_config, config)
        .with_context(|| format!("cannot resume from {}", dir.display()))?;
    if hf_config(&restored.model_config) != hf_config(model_config) {
        bail!(
            "{}: the saved model does not match the config's [model]",
            dir.display()
        );
    }
    let step = restored.state.step;
    if step >= config.run.steps {
        bail!(
            "{} already finished: its checkpoint is at step {step} and run.steps = {}; \
             continue it with --set run.steps=N (N > {step})",
            run_dir.display(),
            config.run.steps
        );
    }
    if rank == 0 {
        eprintln!("resuming {} from {}", run_dir.display(), dir.display());
    }
    Ok(restored)
}

/// Loads the model of `path` (a checkpoint folder, a run folder's latest checkpoint,
/// or a Hugging Face folder) for the config key `key` that names it.
fn load_weights<B: burn::tensor::backend::Backend>(
    path: &std::path::Path,
    key: &str,
    device: &B::Device,
) -> Result<(Transformer<B>, ModelConfig, PathBuf)> {
    let dir = if path.join("checkpoints").is_dir() {
        crate::checkpoint::latest_checkpoint(path)?
    } else {
        path.to_path_buf()
    };
    let (model, config) = crate::checkpoint::load_model::<B>(&dir, device)
        .with_context(|| format!("cannot load the model of {key} = {}", path.display()))?;
    Ok((model, config, dir))
}

/// Loads a scheduler's frozen reference model (DoReMi), from a checkpoint folder or a
/// run folder's latest checkpoint; it must share the run's vocabulary.
fn load_reference<B: burn::tensor::backend::Backend>(
    path: &std::path::Path,
    run_model: &ModelConfig,
    device: &B::Device,
) -> Result<Transformer<B>> {
    let (model, config, dir) = load_weights::<B>(path, "mixing.reference", device)?;
    if config.vocab_size != run_model.vocab_size {
        anyhow::bail!(
            "the reference model in {} has vocab_size {}, the run's model {}: train the \
             reference on the same data and tokenizer",
            dir.display(),
            config.vocab_size,
            run_model.vocab_size
        );
    }
    Ok(model)
}

/// The initial weights of `model.init_from`: a model of exactly the run's shape (its
/// initialisation scale and context length aside), else an error naming each field
/// that differs.
fn load_initial<B: burn::tensor::backend::Backend>(
    path: &std::path::Path,
    run_model: &ModelConfig,
    device: &B::Device,
) -> Result<Transformer<B>> {
    let (model, config, dir) = load_weights::<B>(path, "model.init_from", device)?;
    let shape = |c: &ModelConfig| {
        let mut c = c.clone();
        c.init_std = run_model.init_std;
        c.max_seq_len = run_model.max_seq_len;
        serde_json::to_value(&c).expect("a model config serialises")
    };
    let (theirs, ours) = (shape(&config), shape(run_model));
    if theirs != ours {
        let differ: Vec<String> = ours
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(k, v)| theirs.get(k.as_str()) != Some(*v))
            .map(|(k, v)| format!("{k} {} (the run's [model]: {v})", theirs[k.as_str()]))
            .collect();
        bail!(
            "model.init_from = {}: the model in {} has another shape: {}; set [model] to \
             its shape (or start from another checkpoint)",
            path.display(),
            dir.display(),
            differ.join(", ")
        );
    }
    Ok(model)
}

/// A `[mixing]` section with `method = "manual"` and the learned weights.
pub fn learned_mixture_toml(names: &[String], p: &mixlm_mixing::Proportions) -> String {
    let weights = crate::metrics::by_name(names, p.as_slice());
    crate::config::mixing_toml(&mixlm_mixing::MixingConfig::Manual(
        mixlm_mixing::ManualConfig { weights },
    ))
    .expect("a manual mixture serialises")
}

/// Training epochs each domain has consumed (`None` for unbounded sources).
fn data_epochs(
    source: &dyn TokenSource,
    sampler: &SamplerState,
    seq_len: usize,
) -> Vec<Option<f64>> {
    sampler
        .cursors
        .iter()
        .enumerate()
        .map(|(d, &drawn)| {
            source
                .num_windows(DomainId(d), Split::Train, seq_len)
                .map(|n| drawn as f64 / n.max(1) as f64)
        })
        .collect()
}
