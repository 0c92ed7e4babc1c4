//! The step loader: which micro-batches each step trains on, read ahead.
//!
//! It asks the scheduler for a step's proportions when the step begins, and, when the
//! scheduler fixes them in advance (static mixtures), for the next step's too, so
//! the [`Prefetcher`]'s thread reads a whole step ahead. Every micro-batch taken is
//! checked against the model's vocabulary.

use std::collections::VecDeque;
use std::sync::Arc;

use anyhow::Result;
use mixlm_data::{
    check_token_ids, MixtureSampler, Prefetched, Prefetcher, SamplerState, Split, TokenSource,
};
use mixlm_mixing::{Composition, Proportions, Scheduler};

use crate::config::RunConfig;
use crate::distributed::Rank;
use crate::objective::MicroBatches;

/// A peer's training batches (see the module docs).
pub struct StepLoader {
    source: Arc<dyn TokenSource>,
    prefetcher: Prefetcher,
    /// Proportions of the steps whose micro-batches are requested and not begun.
    planned: VecDeque<Proportions>,
    /// Steps whose micro-batches have all been requested.
    requested_steps: u64,
    /// What each request draws.
    shape: Shape,
}

/// What the loader draws: `grad_accum` micro-batches of `batch_size` sequences of
/// `seq_len` tokens a step, for `steps` steps; peer `rank` of `world` reads its own.
#[derive(Debug, Clone)]
struct Shape {
    grad_accum: usize,
    batch_size: usize,
    seq_len: usize,
    steps: u64,
    composition: Composition,
    rank: Rank,
    vocab_size: usize,
}

impl StepLoader {
    /// A loader continuing `sampler`'s stream at step `step`.
    pub fn new(
        source: Arc<dyn TokenSource>,
        config: &RunConfig,
        vocab_size: usize,
        rank: Rank,
        sampler: MixtureSampler,
        step: u64,
    ) -> Self {
        let run = &config.run;
        let shape = Shape {
            grad_accum: run.grad_accum,
            batch_size: run.batch_size,
            seq_len: run.seq_len,
            steps: run.steps,
            composition: config.data.composition,
            rank,
            vocab_size,
        };
        Self {
            prefetcher: spawn(&source, &shape, sampler),
            source,
            planned: VecDeque::new(),
            requested_steps: step,
            shape,
        }
    }

    /// Starts over from `sampler` at step `step` (a rollback): what was read ahead is
    /// dropped.
    pub fn restart(&mut self, sampler: MixtureSampler, step: u64) {
        self.prefetcher = spawn(&self.source, &self.shape, sampler);
        self.planned.clear();
        self.requested_steps = step;
    }

    /// The proportions of step `step`, whose micro-batches are requested now unless
    /// they were a step earlier; with a scheduler that fixes them in advance, the
    /// next step's are requested too.
    pub fn begin(&mut self, step: u64, scheduler: &mut dyn Scheduler) -> Proportions {
        let proportions = match self.planned.pop_front() {
            Some(p) => p,
            None => {
                let p = scheduler.proportions(step);
                self.request(step, &p, scheduler);
                p
            }
        };
        let next = step + 1;
        if scheduler.fixed_in_advance() && self.requested_steps == next && next < self.shape.steps {
            let p = scheduler.proportions(next);
            self.request(next, &p, scheduler);
            self.planned.push_back(p);
        }
        proportions
    }

    fn request(&mut self, step: u64, proportions: &Proportions, scheduler: &dyn Scheduler) {
        let composition = scheduler
            .composition(step)
            .unwrap_or(self.shape.composition);
        for _ in 0..self.shape.grad_accum {
            self.prefetcher.request(proportions, composition);
        }
        self.requested_steps += 1;
    }

    /// The sampler state after the last micro-batch taken: what a checkpoint saves.
    pub fn consumed_state(&self) -> &SamplerState {
        self.prefetcher.consumed_state()
    }
}

impl MicroBatches for StepLoader {
    fn next_micro_batch(&mut self) -> Result<Prefetched> {
        let batch = self.prefetcher.take();
        check_token_ids(
            self.source.as_ref(),
            Split::Train,
            &batch.picks,
            &batch.windows,
            self.shape.vocab_size,
        )
        .map_err(anyhow::Error::msg)?;
        Ok(batch)
    }
}

fn spawn(source: &Arc<dyn TokenSource>, shape: &Shape, sampler: MixtureSampler) -> Prefetcher {
    Prefetcher::spawn_shard(
        source.clone(),
        sampler,
        Split::Train,
        shape.batch_size,
        shape.seq_len,
        shape.rank.rank,
        shape.rank.world,
    )
}
