//! The training loop: the one place where model, data and mixing scheduler meet.
//!
//! One optimizer step reads top to bottom (nanoGPT style): ask the scheduler for
//! proportions, draw micro-batches with them, forward + per-token loss, backward,
//! accumulate, clip + AdamW, report per-domain training loss back to the scheduler,
//! log, maybe evaluate, maybe checkpoint.
//!
//! Micro-batches are drawn and read on a background thread ([`Prefetcher`]): all of
//! a step's as soon as its proportions are known, and the next step's too when the
//! scheduler fixes proportions in advance (static mixtures).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use burn::module::AutodiffModule;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::{Tensor, TensorData};
use mixlm_data::{
    check_split_ids, check_token_ids, FolderLock, MixtureSampler, Prefetcher, SamplerState, Split,
    TokenSource,
};
use mixlm_eval::{
    inputs_and_targets, sequence_means, validation_losses, DomainAccumulator, DomainRow,
};
use mixlm_mixing::{
    build_scheduler, DomainId, DomainInfo, DomainLosses, GradientTarget, Scheduler, StepFeedback,
};
use mixlm_model::hf::hf_config;
use mixlm_model::{ModelConfig, TrainBackend, Transformer};

use crate::alignment::{validation_gradient, DomainGradients};
use crate::checkpoint::{
    checkpoint_dir, checkpoint_step, latest_checkpoint, load_verified, write_checkpoint, Restored,
    TrainState,
};
use crate::config::RunConfig;
use crate::distributed::{
    check_agreement, checksum, mark_for_all_reduce, run_peers, GradSyncServer, Peer, Rank,
};
use crate::faults::{FaultLog, FaultRecord, OnNan, SequenceRef, SpikeDetector};
use crate::metrics::{EvalRecord, MetricsWriter, StepRecord, StepTimes};
use crate::optim::{lr_at, AdamW, StepStats};
use crate::progress::Progress;
use crate::resume::check_continues;

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
}

/// Builds the token source a `[data]` section names.
pub fn build_source(config: &RunConfig) -> Result<Box<dyn TokenSource>> {
    Ok(config.open_source()?)
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
        return train_peer::<B>(config, &devices[0], options, resume_from, &peer);
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
            .with_grads_in_backward(d.nccl());
        let outcome = train_peer::<B>(config, device, options, resume_from, &peer);
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
pub(crate) fn check_precision<B: burn::tensor::backend::Backend>(
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
    device: &B::Device,
    options: &TrainOptions,
    resume_from: Option<&std::path::Path>,
    peer: &Peer<B::InnerBackend>,
) -> Result<TrainOutcome> {
    let run = &config.run;
    let Rank { world, .. } = peer.rank();
    let leader = peer.rank().is_leader();
    let model_config: ModelConfig = config.model.resolve().map_err(anyhow::Error::msg)?;
    check_precision::<B>(run.precision, device)?;
    let source: Arc<dyn TokenSource> = Arc::from(build_source(config)?);
    let names = source.domain_names();
    let k = names.len();
    let mut scheduler: Box<dyn Scheduler> = build_scheduler(
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
            peer.rank(),
        )?),
        None => {
            if leader {
                refuse_to_overwrite(&run_dir, options.start == Start::Overwrite)?;
            }
            None
        }
    };
    let metrics_path = run_dir.join("metrics.jsonl");
    let mut metrics = if leader {
        std::fs::create_dir_all(&run_dir)
            .with_context(|| format!("cannot create run folder {}", run_dir.display()))?;
        crate::checkpoint::write_atomic(
            &run_dir.join("config.toml"),
            toml::to_string_pretty(config)?.as_bytes(),
        )?;
        match &restored {
            Some(r) => MetricsWriter::resume(&metrics_path, r.state.step)?,
            None => MetricsWriter::create(&metrics_path)?,
        }
    } else {
        MetricsWriter::disabled(&metrics_path)
    };

    let reference = match requirements.reference_model {
        Some(path) => Some(load_reference::<B::InnerBackend>(
            &path,
            &model_config,
            device,
        )?),
        None => None,
    };

    let mut optimizer = AdamW::<B::InnerBackend>::new(config.optimizer.clone());
    let mut sampler = MixtureSampler::new(k, run.seed, config.data.composition);
    let (mut model, saved) = match restored {
        Some(r) => {
            let (model, state) = continue_from(r, &mut optimizer, &mut sampler, &mut *scheduler)?;
            (model, Some(state))
        }
        None => {
            let model = {
                let _init = INIT.lock().unwrap_or_else(|e| e.into_inner());
                B::seed(device, run.seed);
                let model = match &config.model.init_from {
                    // Peer 0's copy is broadcast to the others.
                    Some(path) if leader => load_initial::<B>(path, &model_config, device)?,
                    _ => crate::distributed::materialize(model_config.init(device)),
                };
                // The GPU backends queue the draws: run them before another peer
                // may reseed the generator.
                B::sync(device)?;
                model
            };
            (peer.broadcast_model(model)?, None)
        }
    };
    model = model.with_compute(run.compute());
    let start = saved.as_ref().map_or(0, |s| s.step);
    let saved_initial = saved
        .as_ref()
        .filter(|s| s.initial_val.len() == k)
        .map(|s| DomainLosses(s.initial_val.clone()));
    let elapsed_before = saved.as_ref().map_or(0.0, |s| s.elapsed_s);
    let faults = &config.faults;
    let mut counters = Counters::new(saved.as_ref(), faults);
    let fault_log = match leader {
        true => FaultLog::new(&run_dir),
        false => FaultLog::disabled(&run_dir),
    };
    let mut injected_nan: std::collections::BTreeSet<u64> =
        faults.inject_nan_steps.iter().copied().collect();
    let spawn = |sampler: MixtureSampler| {
        Prefetcher::spawn_shard(
            source.clone(),
            sampler,
            Split::Train,
            run.batch_size,
            run.seq_len,
            peer.rank().rank,
            world,
        )
    };
    let mut batches = spawn(sampler);
    // Steps whose micro-batches have all been requested.
    let mut requested_steps = start;

    let evaluate = |model: &Transformer<B>| -> DomainLosses {
        validation_losses(
            &model.valid(),
            source.as_ref(),
            run.seq_len,
            config.eval.sequences,
            config.eval.batch_size,
            device,
        )
    };
    // What a scheduler learns from validation, the same on every peer: peer 0
    // measures it and hands it to the others.
    let shared_evaluate = |model: &Transformer<B>| -> Result<DomainLosses> {
        if !peer.collective() {
            return Ok(evaluate(model));
        }
        let mine = if leader {
            evaluate(model).0
        } else {
            vec![None; k]
        };
        let encoded: Vec<f64> = mine.iter().map(|l| l.unwrap_or(f64::NAN)).collect();
        let all = peer.gather("validation losses", &encoded)?;
        Ok(DomainLosses(
            all[0].iter().map(|&l| (!l.is_nan()).then_some(l)).collect(),
        ))
    };
    let tokens_per_step = config.tokens_per_step();
    let initial = match saved_initial {
        Some(initial) => initial,
        // Only peer 0 reports (the metrics, the final table).
        None if !leader => DomainLosses(vec![None; k]),
        None => {
            let initial = evaluate(&model);
            if start == 0 {
                metrics.eval(&EvalRecord::new(0, 0, &names, &initial))?;
            }
            initial
        }
    };

    let quiet = options.quiet || !leader;
    let mut progress = Progress::new(run.steps, quiet, if leader { run.log_every } else { 0 });
    progress.start_at(start);
    let started = Instant::now();
    // Steps in a row whose update was not applied (NaN), rollbacks included.
    let mut consecutive_bad = 0u64;
    let stop_requested = || options.stop_requested();
    let tokenizer = config.data_tokenizer();
    let save = |step: u64,
                model: &Transformer<B>,
                optimizer: &AdamW<B::InnerBackend>,
                sampler: &SamplerState,
                scheduler: &dyn Scheduler,
                counters: &Counters| {
        let mut state =
            TrainState::new(step, step * tokens_per_step, optimizer, sampler, scheduler);
        state.initial_val = initial.0.clone();
        state.elapsed_s = elapsed_before + started.elapsed().as_secs_f64();
        state.world_size = world;
        state.tokenizer = tokenizer.clone();
        counters.save_into(&mut state);
        match leader {
            true => write_checkpoint(&run_dir, model, &model_config, optimizer, &state, config)
                .map(drop),
            false => Ok(()),
        }
    };
    // Bookkeeping after a step's record is written counts in the next step's `other`.
    let mut after_record = Instant::now();
    let mut step = start;
    while step < run.steps {
        let mut times = StepTimes {
            other: after_record.elapsed().as_secs_f64(),
            ..StepTimes::default()
        };
        let mut clock = Instant::now();
        let mut lap = |part: &mut f64| {
            let now = Instant::now();
            *part += (now - clock).as_secs_f64();
            clock = now;
        };
        peer.heartbeat().at_step(step);
        if scheduler.wants_validation(step) {
            let val = shared_evaluate(&model)?;
            scheduler.observe_validation(step, &val);
        }
        // Requested ahead: the scheduler fixed this step's proportions a step earlier.
        let proportions = match batches.queued().next() {
            Some(p) if requested_steps > step => p.clone(),
            _ => scheduler.proportions(step),
        };
        let composition = |s: u64, scheduler: &dyn Scheduler| {
            scheduler.composition(s).unwrap_or(config.data.composition)
        };
        if requested_steps == step {
            let c = composition(step, scheduler.as_ref());
            for _ in 0..run.grad_accum {
                batches.request(&proportions, c);
            }
            requested_steps += 1;
        }
        if scheduler.fixed_in_advance() && requested_steps == step + 1 && step + 1 < run.steps {
            let next = scheduler.proportions(step + 1);
            let c = composition(step + 1, scheduler.as_ref());
            for _ in 0..run.grad_accum {
                batches.request(&next, c);
            }
            requested_steps += 1;
        }
        let lr = counters.lr_scale
            * lr_at(
                step,
                config.optimizer.lr,
                config.schedule.min_lr,
                config.schedule.warmup_steps,
                run.steps,
            );
        // `(domain, window)` of every sequence of the step, for fault reports.
        let mut picks: Vec<(DomainId, u64)> = Vec::new();

        let mut grads = GradientsAccumulator::<Transformer<B>>::new();
        let mut per_domain =
            (requirements.gradients.as_ref()).map(|_| DomainGradients::<B>::new(k));
        let mut by_domain = DomainAccumulator::new(k);
        let mut ref_by_domain = DomainAccumulator::new(k);
        let mut excess_by_domain = DomainAccumulator::new(k);
        // With `nccl`, the backward passes through a marked copy of the model average
        // the gradients over the peers as they go (per-domain gradients are combined
        // by the scheduler first, so they go through `Peer` as before).
        let in_backward = peer.grads_in_backward() && per_domain.is_none();
        let marked = in_backward.then(|| mark_for_all_reduce(model.clone()));
        let forward_model = marked.as_ref().unwrap_or(&model);
        lap(&mut times.mixing);
        for _ in 0..run.grad_accum {
            let batch = batches.take();
            lap(&mut times.data);
            picks.extend_from_slice(&batch.picks);
            check_token_ids(
                source.as_ref(),
                Split::Train,
                &batch.picks,
                &batch.windows,
                model_config.vocab_size,
            )
            .map_err(anyhow::Error::msg)?;
            let domains: Vec<DomainId> = batch.picks.iter().map(|(d, _)| *d).collect();
            if let Some(per_domain) = per_domain.as_mut() {
                let seq_means =
                    per_domain.backward(&model, &batch.windows, &domains, run.seq_len, device);
                by_domain.add(&seq_means, &domains);
                lap(&mut times.model);
                continue;
            }
            let (inputs, targets) =
                inputs_and_targets::<B>(&batch.windows, run.batch_size, run.seq_len, device);
            let ref_losses = reference
                .as_ref()
                .map(|r| r.token_losses(inputs.clone().inner(), targets.clone().inner()));
            let token_losses = forward_model.token_losses(inputs, targets);
            let seq_means = sequence_means(token_losses.clone().inner());
            let micro = DomainAccumulator::of(k, &seq_means, &domains);
            let mut feedback = StepFeedback::train_only(micro.means(), micro.counts().to_vec());
            if let Some(ref_losses) = ref_losses {
                let excess = (token_losses.clone().inner() - ref_losses.clone()).clamp_min(0.0);
                let (ref_seq, excess_seq) = (sequence_means(ref_losses), sequence_means(excess));
                let mut micro_all = [
                    micro.clone(),
                    DomainAccumulator::of(k, &ref_seq, &domains),
                    DomainAccumulator::of(k, &excess_seq, &domains),
                ];
                // DoReMi's weights follow the excess losses of the whole (all peers')
                // micro-batch, so every peer updates them alike.
                if peer.collective() {
                    micro_all = merge_across_peers(peer, "micro-batch losses", micro_all)?;
                }
                let [micro_train, micro_ref, micro_excess] = micro_all;
                feedback =
                    StepFeedback::train_only(micro_train.means(), micro_train.counts().to_vec());
                feedback.reference = Some(micro_ref.means());
                feedback.excess = Some(micro_excess.means());
                ref_by_domain.add(&ref_seq, &domains);
                excess_by_domain.add(&excess_seq, &domains);
            }
            lap(&mut times.model);
            let weights = scheduler.loss_weights(step, &feedback);
            lap(&mut times.mixing);
            let loss = match weights {
                None => token_losses.mean(),
                Some(w) => weighted_loss(token_losses, &domains, micro.counts(), &w, device),
            };
            let loss = loss.div_scalar(run.grad_accum as f64);
            let backward = match in_backward {
                true => peer.backward_all_reduce(|| loss.backward()),
                false => loss.backward(),
            };
            grads.accumulate(&model, GradientsParams::from_grads(backward, forward_model));
            by_domain.add(&seq_means, &domains);
            lap(&mut times.model);
        }
        let grads = match (per_domain.take(), &requirements.gradients) {
            (Some(per_domain), Some(target)) => {
                let target = match target {
                    GradientTarget::Validation { sequences, domains } => {
                        let own = validation_gradient(
                            &model,
                            source.as_ref(),
                            (*sequences, domains),
                            (run.seed, step),
                            (run.seq_len, peer.rank()),
                            device,
                        );
                        Some(peer.sum_grads(&model, own)?)
                    }
                    GradientTarget::Train => None,
                };
                let per_domain = per_domain.finish(&model, peer)?;
                let alignment = per_domain.alignment(&model, target.as_ref());
                let coefficients = scheduler
                    .gradient_weights(step, lr, &alignment)
                    .context("the scheduler asked for per-domain gradients but gave no weights")?;
                per_domain.combine(&model, &coefficients)
            }
            _ if in_backward => grads.grads(),
            _ => peer.mean_grads(&model, grads.grads())?,
        };
        // The global batch's per-domain losses, the stop request of any peer, and a
        // check that every peer drew with the same proportions.
        let mut stop_now = stop_requested();
        if peer.collective() {
            let mut extra = vec![f64::from(u8::from(stop_now))];
            extra.extend(checksum(proportions.as_slice()));
            let (merged, extras) = merge_with_extras(
                peer,
                "per-domain losses",
                [by_domain, ref_by_domain, excess_by_domain],
                &extra,
            )?;
            check_agreement(
                "mixture proportions",
                step + 1,
                &extras.iter().map(|e| e[1..].to_vec()).collect::<Vec<_>>(),
            )?;
            stop_now = extras.iter().any(|e| e[0] != 0.0);
            [by_domain, ref_by_domain, excess_by_domain] = merged;
        }
        let train = by_domain.means();
        let mut step_loss = mean_over_sequences(&train, by_domain.counts());
        if injected_nan.remove(&(step + 1)) {
            step_loss = f64::NAN;
        }
        // A non-finite loss never reaches the optimizer; a non-finite gradient norm
        // makes it leave the model as it was.
        let stats = if step_loss.is_finite() {
            let (updated, stats) = optimizer.step(lr, model, grads);
            model = updated;
            stats
        } else {
            StepStats::not_applied(f64::NAN)
        };
        lap(&mut times.model);
        // A fault report lists the whole global batch: every peer takes the same
        // branch below (the loss and gradient norm are global), so they gather
        // their sequences together.
        let fault = |kind: &'static str, action: &'static str| -> Result<FaultRecord> {
            Ok(FaultRecord {
                kind,
                step: step + 1,
                action,
                loss: step_loss,
                grad_norm: stats.grad_norm.is_finite().then_some(stats.grad_norm),
                mean: None,
                rolled_back_to: None,
                lr_scale: None,
                domain_loss: crate::metrics::by_name(&names, &train.0),
                sequences: global_picks(peer, &picks)?
                    .into_iter()
                    .map(|(d, window)| SequenceRef {
                        domain: names[d.0].clone(),
                        window,
                        documents: source.window_documents(d, Split::Train, window, run.seq_len),
                    })
                    .collect(),
            })
        };
        if stats.applied {
            consecutive_bad = 0;
            counters.last_loss = step_loss;
            if let Some(mean) = counters.spikes.observe(step_loss) {
                if leader {
                    eprintln!(
                        "warning: loss spike at step {}: {step_loss:.4} against a mean of \
                         {mean:.4} over the last {} steps (batch in {})",
                        step + 1,
                        faults.spike_window,
                        fault_log.path().display()
                    );
                }
                fault_log.write(&FaultRecord {
                    mean: Some(mean),
                    ..fault("spike", "logged")?
                })?;
            }
        } else {
            consecutive_bad += 1;
            let what = format!(
                "step {}: the loss is {step_loss} and the gradient norm {}",
                step + 1,
                stats.grad_norm
            );
            if consecutive_bad > faults.max_consecutive || faults.on_nan == OnNan::Stop {
                fault_log.write(&fault("nan", "stopped")?)?;
                bail!(
                    "{what}; stopping (faults.on_nan = \"{}\", {consecutive_bad} bad step(s) in a \
                     row, faults.max_consecutive = {}). The batch is in {}. Resume from the last \
                     checkpoint with `mixlm train --resume {}` (--set faults.on_nan=\"rollback\" \
                     lowers the learning rate each time it goes back)",
                    faults.on_nan.name(),
                    faults.max_consecutive,
                    fault_log.path().display(),
                    run_dir.display()
                );
            }
            if faults.on_nan == OnNan::Rollback {
                let restored =
                    load_for_rollback::<B>(&run_dir, device, peer).with_context(|| {
                        format!("{what}; faults.on_nan = \"rollback\" needs a checkpoint")
                    })?;
                let dir = restored.dir.clone();
                let mut sampler = MixtureSampler::new(k, run.seed, config.data.composition);
                optimizer = AdamW::new(config.optimizer.clone());
                let (restored_model, state) =
                    continue_from(restored, &mut optimizer, &mut sampler, &mut *scheduler)?;
                model = restored_model.with_compute(run.compute());
                let lr_scale = counters.lr_scale * faults.lr_backoff;
                counters = Counters::new(Some(&state), faults);
                counters.lr_scale = lr_scale;
                fault_log.write(&FaultRecord {
                    action: "rolled_back",
                    rolled_back_to: Some(state.step),
                    lr_scale: Some(lr_scale),
                    ..fault("nan", "rolled_back")?
                })?;
                if leader {
                    eprintln!(
                        "warning: {what}; rolled back to {} with the learning rate scaled by \
                         {lr_scale}",
                        dir.display()
                    );
                    drop(metrics);
                    metrics = MetricsWriter::resume(&metrics_path, state.step)?;
                }
                batches = spawn(sampler);
                requested_steps = state.step;
                step = state.step;
                progress.start_at(state.step);
                after_record = Instant::now();
                continue;
            }
            counters.skipped += 1;
            fault_log.write(&fault("nan", "skipped")?)?;
            if leader {
                eprintln!(
                    "warning: {what}; update skipped ({} so far, details in {})",
                    counters.skipped,
                    fault_log.path().display()
                );
            }
        }
        // A domain whose loss is not finite counts as absent from the step, in the
        // metrics as for the scheduler.
        let train = mixlm_mixing::finite_losses(&train);
        let feedback = StepFeedback {
            train,
            sequences: by_domain.counts().to_vec(),
            micro_batches: run.grad_accum * world,
            reference: reference.as_ref().map(|_| ref_by_domain.means()),
            excess: reference.as_ref().map(|_| excess_by_domain.means()),
        };
        scheduler.observe_train(step, &feedback);
        lap(&mut times.mixing);

        let tokens = (step + 1) * tokens_per_step;
        let elapsed = elapsed_before + started.elapsed().as_secs_f64();
        let record = StepRecord {
            kind: "train",
            step: step + 1,
            tokens,
            lr,
            loss: step_loss,
            grad_norm: stats.grad_norm,
            skipped: !stats.applied,
            domain_loss: crate::metrics::by_name(&names, &feedback.train.0),
            sequences: crate::metrics::by_name(&names, &feedback.sequences),
            proportions: crate::metrics::by_name(&names, proportions.as_slice()),
            domain_weights: scheduler
                .domain_weights()
                .map(|w| crate::metrics::by_name(&names, w.as_slice())),
            elapsed_s: elapsed,
            tokens_per_s: tokens as f64 / elapsed.max(1e-9),
            time_s: times,
        };
        after_record = Instant::now();
        crate::chaos::pause_at("step");
        metrics.step(&record)?;
        progress.update(&record, &proportions);

        let at_end = step + 1 == run.steps;
        if leader
            && config.eval.every > 0
            && (step + 1).is_multiple_of(config.eval.every)
            && !at_end
        {
            let val = evaluate(&model);
            crate::chaos::pause_at("eval");
            let epochs = data_epochs(source.as_ref(), batches.consumed_state(), run.seq_len);
            metrics.eval(
                &EvalRecord::new(step + 1, tokens, &names, &val).with_epochs(&names, &epochs),
            )?;
            progress.eval_line(step + 1, &names, &val);
        }
        let periodic = config.checkpoint.every > 0
            && (step + 1).is_multiple_of(config.checkpoint.every)
            && !at_end;
        let stopping = !at_end && stop_now;
        if periodic || stopping {
            let sampler = batches.consumed_state();
            save(
                step + 1,
                &model,
                &optimizer,
                sampler,
                scheduler.as_ref(),
                &counters,
            )?;
        }
        step += 1;
        if stopping {
            progress.abandon();
            break;
        }
    }
    // Steps completed: `run.steps`, or fewer when a stop request ended the loop.
    let completed = step;
    let last_loss = counters.last_loss;
    let elapsed = started.elapsed().as_secs_f64();
    let trained_tokens = (completed - start) * tokens_per_step;
    let interrupted = completed < run.steps;
    if !interrupted {
        progress.finish();
    }
    let tokens = run.steps * tokens_per_step;
    // A stop request ended the loop after a checkpoint; or this is not peer 0, which
    // alone evaluates, reports and writes the final checkpoint.
    if interrupted || !leader {
        return Ok(TrainOutcome {
            run_dir,
            rows: Vec::new(),
            final_train_loss: last_loss,
            tokens_per_second: trained_tokens as f64 / elapsed.max(1e-9),
            steps: completed,
            learned: match interrupted {
                true => None,
                false => scheduler.learned_proportions(),
            },
            resumed_from: resume_from.is_some().then_some(start),
            interrupted,
        });
    }

    let last = evaluate(&model);
    let epochs = data_epochs(source.as_ref(), batches.consumed_state(), run.seq_len);
    metrics
        .eval(&EvalRecord::new(run.steps, tokens, &names, &last).with_epochs(&names, &epochs))?;
    for (name, e) in names.iter().zip(&epochs) {
        if let Some(e) = e.filter(|e| *e > 1.0) {
            eprintln!("note: domain {name} was repeated: {e:.2} epochs of its training data");
        }
    }
    let learned = scheduler.learned_proportions();
    if let Some(learned) = &learned {
        let path = run_dir.join("learned_mixture.toml");
        crate::checkpoint::write_atomic(&path, learned_mixture_toml(&names, learned).as_bytes())?;
        eprintln!(
            "learned mixture ({}) written to {}; train on it with --mixing {}",
            scheduler.name(),
            path.display(),
            path.display()
        );
    }
    if config.checkpoint.save_final {
        let sampler = batches.consumed_state();
        save(
            run.steps,
            &model,
            &optimizer,
            sampler,
            scheduler.as_ref(),
            &counters,
        )?;
    }
    let rows = names
        .iter()
        .enumerate()
        .map(|(d, name)| DomainRow {
            domain: name.clone(),
            initial_ppl: initial.0[d].map(f64::exp),
            ppl: last.0[d].map(f64::exp).unwrap_or(f64::NAN),
            floor_ppl: source.floor_loss(DomainId(d), run.seq_len).map(f64::exp),
        })
        .collect();
    Ok(TrainOutcome {
        run_dir,
        rows,
        final_train_loss: last_loss,
        tokens_per_second: trained_tokens as f64 / elapsed.max(1e-9),
        steps: run.steps,
        learned,
        resumed_from: resume_from.is_some().then_some(start),
        interrupted: false,
    })
}

/// What a run counts across steps besides the model, optimizer, sampler and scheduler;
/// checkpointed so a resumed run continues them.
struct Counters {
    /// Mean training loss of the last applied step.
    last_loss: f64,
    /// Learning-rate factor from rollbacks.
    lr_scale: f64,
    /// Steps whose update was skipped.
    skipped: u64,
    spikes: SpikeDetector,
}

impl Counters {
    fn new(saved: Option<&TrainState>, faults: &crate::faults::FaultsSection) -> Self {
        Self {
            last_loss: saved.and_then(|s| s.last_loss).unwrap_or(f64::NAN),
            lr_scale: saved.map_or(1.0, |s| s.lr_scale),
            skipped: saved.map_or(0, |s| s.skipped_steps),
            spikes: saved
                .and_then(|s| s.spikes.clone())
                .unwrap_or_else(|| SpikeDetector::new(faults.spike_factor, faults.spike_window)),
        }
    }

    fn save_into(&self, state: &mut TrainState) {
        state.last_loss = self.last_loss.is_finite().then_some(self.last_loss);
        state.lr_scale = self.lr_scale;
        state.skipped_steps = self.skipped;
        state.spikes = Some(self.spikes.clone());
    }
}

/// Puts a checkpoint's optimizer moments, sampler cursors and scheduler state in
/// place, checking they fit this run; returns its model and counters.
fn continue_from<B: TrainBackend>(
    r: Restored<B>,
    optimizer: &mut AdamW<B::InnerBackend>,
    sampler: &mut MixtureSampler,
    scheduler: &mut dyn Scheduler,
) -> Result<(Transformer<B>, TrainState)> {
    let s = r.state;
    optimizer.moments = r.moments;
    optimizer.steps = s.optimizer_steps;
    sampler
        .restore(s.sampler.clone())
        .with_context(|| format!("in {}", r.dir.display()))?;
    if s.scheduler_name != scheduler.name() {
        bail!(
            "{}: the checkpoint's mixing state is from `{}`, the run mixes with `{}`",
            r.dir.display(),
            s.scheduler_name,
            scheduler.name()
        );
    }
    scheduler
        .restore(&s.scheduler)
        .map_err(|e| anyhow::anyhow!("{}: {e}", r.dir.join("state.json").display()))?;
    Ok((r.model, s))
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
    load_verified::<B>(&checkpoint_dir(run_dir, named as u64), device)
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
    Rank { rank, world }: Rank,
) -> Result<Restored<B>> {
    let restored = load_verified::<B>(dir, device)?;
    let trained_on = restored.state.world_size;
    if trained_on != world {
        bail!(
            "{}: the run was trained on {trained_on} data-parallel peer(s) and resumes only on \
             as many (which sequences each peer reads depends on it); resume with \
             distributed.devices = {trained_on} (--devices {trained_on})",
            dir.display()
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

/// Sums each of `accs` over the data-parallel peers (one collective operation), in
/// rank order, so every peer gets the same totals to the bit.
fn merge_across_peers<B: burn::tensor::backend::Backend, const N: usize>(
    peer: &Peer<B>,
    what: &'static str,
    accs: [DomainAccumulator; N],
) -> Result<[DomainAccumulator; N]> {
    Ok(merge_with_extras(peer, what, accs, &[])?.0)
}

/// [`merge_across_peers`], also gathering a few values of each peer (by rank).
fn merge_with_extras<B: burn::tensor::backend::Backend, const N: usize>(
    peer: &Peer<B>,
    what: &'static str,
    accs: [DomainAccumulator; N],
    extra: &[f64],
) -> Result<([DomainAccumulator; N], Vec<Vec<f64>>)> {
    let k = accs.first().map_or(0, |a| a.counts().len());
    let mut values: Vec<f64> = Vec::with_capacity(N * 2 * k + extra.len());
    for acc in &accs {
        values.extend_from_slice(acc.sums());
        values.extend(acc.counts().iter().map(|&n| n as f64));
    }
    values.extend_from_slice(extra);
    let all = peer.gather(what, &values)?;
    let mut merged: [DomainAccumulator; N] = std::array::from_fn(|_| DomainAccumulator::new(k));
    for theirs in &all {
        for (i, acc) in merged.iter_mut().enumerate() {
            let part = &theirs[i * 2 * k..(i + 1) * 2 * k];
            let counts: Vec<usize> = part[k..].iter().map(|&n| n as usize).collect();
            acc.merge(&part[..k], &counts);
        }
    }
    let extras = all.iter().map(|v| v[N * 2 * k..].to_vec()).collect();
    Ok((merged, extras))
}

/// `sum_i w_i * (mean loss of domain i's tokens)` over the domains present: each
/// sequence weighs `w_d / n_d` (`n_d` sequences of its domain `d`, all of equal length).
fn weighted_loss<B: TrainBackend>(
    token_losses: Tensor<B, 2>,
    domains: &[DomainId],
    counts: &[usize],
    weights: &[f64],
    device: &B::Device,
) -> Tensor<B, 1> {
    let per_seq: Vec<f32> = domains
        .iter()
        .map(|d| (weights[d.0] / counts[d.0].max(1) as f64) as f32)
        .collect();
    let w = Tensor::<B, 1>::from_data(TensorData::new(per_seq, [domains.len()]), device);
    let [b, _] = token_losses.dims();
    (token_losses.mean_dim(1).reshape([b]) * w).sum()
}

/// A `[mixing]` section with `method = "manual"` and the learned weights.
pub fn learned_mixture_toml(names: &[String], p: &mixlm_mixing::Proportions) -> String {
    let weights = crate::metrics::by_name(names, p.as_slice());
    crate::search::mixing_toml(&mixlm_mixing::MixingConfig::Manual(
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

/// Mean over all sequences of a step (= token mean, as sequences have equal length).
fn mean_over_sequences(losses: &DomainLosses, counts: &[usize]) -> f64 {
    let total: usize = counts.iter().sum();
    losses
        .0
        .iter()
        .zip(counts)
        .filter_map(|(l, &n)| l.map(|l| l * n as f64))
        .sum::<f64>()
        / total.max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_loss_weights_domains_by_sequences() {
        let losses = DomainLosses(vec![Some(1.0), None, Some(4.0)]);
        // 3 sequences at 1.0 and 1 at 4.0: (3 + 4) / 4.
        assert_eq!(mean_over_sequences(&losses, &[3, 0, 1]), 1.75);
    }
}
