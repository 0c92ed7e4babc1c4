//! Everything a run carries from one step to the next: the model, the optimizer, the
//! mixing scheduler, the fault counters and the clock. A checkpoint saves it
//! ([`RunState::snapshot`]) with the sampler's cursor, and resuming and rolling back
//! after a NaN put a checkpoint back through the same [`RunState::restore`].

use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use mixlm_data::{MixtureSampler, SamplerState};
use mixlm_mixing::{DomainLosses, Scheduler};
use mixlm_model::{TrainBackend, Transformer};

use crate::checkpoint::{Restored, TrainState};
use crate::config::RunConfig;
use crate::distributed::{Peer, ShardLayout};
use crate::faults::Counters;
use crate::optim::{lr_at, AdamW, StepGrads, StepStats};

/// A run between two steps (see the module docs).
pub struct RunState<B: TrainBackend> {
    /// Optimizer steps completed.
    pub step: u64,
    /// Taken out only for the length of an optimizer update ([`Self::apply`]), which
    /// consumes it so its tensors can be updated in place.
    model: Option<Transformer<B>>,
    pub optimizer: AdamW<B::InnerBackend>,
    pub scheduler: Box<dyn Scheduler>,
    pub counters: Counters,
    pub clock: RunClock,
    /// Per-domain validation losses before training, for the final report; `None`
    /// until measured (and on peers other than 0, which do not report).
    pub initial: Option<DomainLosses>,
    /// The tokenizer of the training data (read once), which checkpoints record.
    tokenizer: Option<mixlm_data::prepare::TokenizerRecord>,
}

/// Wall-clock seconds of training, continued across resumes.
#[derive(Debug, Clone)]
pub struct RunClock {
    started: Instant,
    /// Seconds trained before this process started (a resumed run's).
    before: f64,
}

impl RunClock {
    fn new(before: f64) -> Self {
        Self {
            started: Instant::now(),
            before,
        }
    }

    /// Seconds of the whole run so far.
    pub fn elapsed(&self) -> f64 {
        self.before + self.since_start()
    }

    /// Starts counting this process's training time from now.
    pub fn start(&mut self) {
        self.started = Instant::now();
    }

    /// Seconds since this process started training.
    pub fn since_start(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }
}

impl<B: TrainBackend> RunState<B> {
    /// A run at step 0 with `model`; `shard`: this peer's slices when the optimizer
    /// state is sharded.
    pub fn new(
        model: Transformer<B>,
        scheduler: Box<dyn Scheduler>,
        config: &RunConfig,
        shard: Option<Arc<ShardLayout>>,
    ) -> Self {
        Self {
            step: 0,
            model: Some(model.with_compute(config.run.compute())),
            optimizer: AdamW::sharded(config.optimizer.clone(), shard),
            scheduler,
            counters: Counters::new(&config.faults),
            clock: RunClock::new(0.0),
            initial: None,
            tokenizer: config.data_tokenizer(),
        }
    }

    /// A run continued from checkpoint `r` (resume): [`Self::restore`], and the
    /// clock and the initial losses where it left them. Returns the sampler to
    /// continue with.
    pub fn resumed(
        r: Restored<B>,
        scheduler: Box<dyn Scheduler>,
        config: &RunConfig,
        domains: usize,
        shard: Option<Arc<ShardLayout>>,
    ) -> Result<(Self, MixtureSampler)> {
        // The checkpoint's model twice: a clone shares its tensors.
        let mut state = Self::new(r.model.clone(), scheduler, config, shard);
        let saved = r.state.clone();
        let sampler = state.restore(r, config, domains)?;
        state.clock = RunClock::new(saved.elapsed_s);
        state.initial =
            (saved.initial_val.len() == domains).then_some(DomainLosses(saved.initial_val));
        Ok((state, sampler))
    }

    /// Puts checkpoint `r` in place (resume and rollback alike): the model, the
    /// optimizer's moments, the scheduler's state, the counters and the step,
    /// checking they fit this run; returns the sampler to continue with.
    pub fn restore(
        &mut self,
        r: Restored<B>,
        config: &RunConfig,
        domains: usize,
    ) -> Result<MixtureSampler> {
        let s = r.state;
        let mut sampler = MixtureSampler::new(domains, config.run.seed, config.data.composition);
        sampler
            .restore(s.sampler.clone())
            .with_context(|| format!("in {}", r.dir.display()))?;
        if s.scheduler_name != self.scheduler.name() {
            bail!(
                "{}: the checkpoint's mixing state is from `{}`, the run mixes with `{}`",
                r.dir.display(),
                s.scheduler_name,
                self.scheduler.name()
            );
        }
        self.scheduler
            .restore(&s.scheduler)
            .map_err(|e| anyhow::anyhow!("{}: {e}", r.dir.join("state.json").display()))?;
        self.optimizer = AdamW::sharded(config.optimizer.clone(), self.optimizer.shard.clone());
        self.optimizer.moments = r.moments;
        self.optimizer.steps = s.optimizer_steps;
        self.model = Some(r.model.with_compute(config.run.compute()));
        self.counters = Counters {
            last_loss: s.last_loss.unwrap_or(f64::NAN),
            lr_scale: s.lr_scale,
            skipped: s.skipped_steps,
            spikes: (s.spikes.clone()).unwrap_or_else(|| Counters::new(&config.faults).spikes),
        };
        self.step = s.step;
        Ok(sampler)
    }

    /// What a checkpoint at this step saves besides the weights and moments;
    /// `sampler`: the cursor after the last batch trained on.
    pub fn snapshot(&self, sampler: &SamplerState, config: &RunConfig, world: usize) -> TrainState {
        let step = self.step;
        let mut state = TrainState::new(
            step,
            step * config.tokens_per_step(),
            &self.optimizer,
            sampler,
            self.scheduler.as_ref(),
        );
        state.initial_val = self.initial.as_ref().map_or_else(Vec::new, |i| i.0.clone());
        state.elapsed_s = self.clock.elapsed();
        state.world_size = world;
        state.tokenizer = self.tokenizer.clone();
        let c = &self.counters;
        state.last_loss = c.last_loss.is_finite().then_some(c.last_loss);
        state.lr_scale = c.lr_scale;
        state.skipped_steps = c.skipped;
        state.spikes = Some(c.spikes.clone());
        state
    }

    /// The model being trained.
    pub fn model(&self) -> &Transformer<B> {
        self.model
            .as_ref()
            .expect("the model is only taken during an update")
    }

    /// The model, and the scheduler to change while it is used.
    pub fn model_and_scheduler(&mut self) -> (&Transformer<B>, &mut dyn Scheduler) {
        let model = self
            .model
            .as_ref()
            .expect("the model is only taken during an update");
        (model, self.scheduler.as_mut())
    }

    /// The learning rate of step `self.step`: the schedule's, scaled by rollbacks.
    pub fn lr(&self, config: &RunConfig) -> f64 {
        self.counters.lr_scale
            * lr_at(
                self.step,
                config.optimizer.lr,
                config.schedule.min_lr,
                config.schedule.warmup_steps,
                config.run.steps,
            )
    }

    /// One optimizer update with `grads` at `lr`. A non-finite `loss` never reaches
    /// the optimizer; a non-finite gradient norm makes it leave the model as it was.
    /// (The loss and the norm are the peers' global ones, so all peers decide alike.)
    pub fn apply(
        &mut self,
        lr: f64,
        grads: StepGrads,
        loss: f64,
        peer: &Peer<B::InnerBackend>,
    ) -> Result<StepStats> {
        if !loss.is_finite() {
            return Ok(StepStats::not_applied(f64::NAN));
        }
        let model = self
            .model
            .take()
            .expect("the model is only taken during an update");
        let (updated, stats) = self.optimizer.apply(lr, model, grads, peer)?;
        self.model = Some(updated);
        Ok(stats)
    }
}
