//! One optimizer step's forward and backward passes: the seam where a mixing method
//! that changes the training objective or the gradient plugs in.
//!
//! An [`Objective`] takes the step's micro-batches from the loader, runs forward and
//! backward over them and hands back the gradient to apply, already averaged (or
//! combined) over the data-parallel peers, with this peer's per-domain losses. The
//! training loop does not know which one it runs:
//! - [`MeanLoss`] (`mean.rs`): the token mean, or the per-domain weights a scheduler
//!   puts on it through [`Scheduler::loss_weights`]; with `communication = "nccl"` the
//!   gradients are averaged during the backward pass.
//! - [`ExcessLoss`] (`excess.rs`): DoReMi's proxy objective, which also runs the frozen
//!   reference model and weighs domains by their excess loss.
//! - [`AlignedGradients`] (`aligned.rs`): DoGE's per-domain backward passes,
//!   aligned with a target gradient and combined with the scheduler's coefficients.
//!
//! [`for_scheduler`] picks one from the scheduler's [`Requirements`]. A method that
//! only reweights the loss per domain needs no objective of its own: it implements
//! `loss_weights` and runs under [`MeanLoss`].

mod aligned;
mod excess;
mod mean;
#[cfg(test)]
mod tests;

use anyhow::Result;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::{Tensor, TensorData};
use mixlm_data::Prefetched;
use mixlm_eval::{inputs_and_targets, DomainAccumulator};
use mixlm_mixing::{DomainId, DomainLosses, Requirements, Scheduler, StepFeedback};
use mixlm_model::{TrainBackend, Transformer};

use crate::distributed::{mark_for_all_reduce, Peer};
use crate::laps::Laps;
use crate::optim::StepGrads;

pub use aligned::AlignedGradients;
pub use excess::ExcessLoss;
pub use mean::MeanLoss;

/// Forward and backward over one step's micro-batches.
pub trait Objective<B: TrainBackend> {
    /// Runs step `cx.step`: takes `cx.grad_accum` micro-batches from `cx.batches`,
    /// and returns the gradient to apply (the same on every peer) with the per-domain
    /// losses of this peer's sequences.
    fn step(&mut self, cx: StepContext<'_, B>) -> Result<StepOutput>;
}

/// Where a step's micro-batches come from: the loader, checked against the model's
/// vocabulary.
pub trait MicroBatches {
    fn next_micro_batch(&mut self) -> Result<Prefetched>;
}

/// What an objective may use during one step.
pub struct StepContext<'a, B: TrainBackend> {
    pub step: u64,
    /// The step's learning rate (DoGE's update rule uses it).
    pub lr: f64,
    pub model: &'a Transformer<B>,
    pub scheduler: &'a mut dyn Scheduler,
    /// Domains of the run.
    pub domains: usize,
    pub batches: &'a mut dyn MicroBatches,
    pub peer: &'a Peer<B::InnerBackend>,
    pub device: &'a B::Device,
    /// Micro-batches in the step, and their sequences' length.
    pub grad_accum: usize,
    pub seq_len: usize,
    /// Time spent, by part.
    pub laps: &'a mut Laps,
}

impl<B: TrainBackend> StepContext<'_, B> {
    /// The next micro-batch, the wait for it timed as data; its `(domain, window)`
    /// picks are added to `picks` (for fault reports).
    fn take(&mut self, picks: &mut Vec<(DomainId, u64)>) -> Result<MicroBatch> {
        let batch = self.batches.next_micro_batch()?;
        self.laps.data();
        picks.extend_from_slice(&batch.picks);
        Ok(MicroBatch {
            domains: batch.picks.iter().map(|(d, _)| *d).collect(),
            windows: batch.windows,
        })
    }
}

/// One micro-batch's tokens and the domain of each sequence.
struct MicroBatch {
    domains: Vec<DomainId>,
    /// `[domains.len(), seq_len + 1]` tokens, row-major.
    windows: Vec<u32>,
}

/// What one step's forward and backward passes give the loop.
pub struct StepOutput {
    /// The gradient to apply, the same on every peer.
    pub grads: StepGrads,
    /// This peer's per-domain losses (the loop sums them over the peers).
    pub losses: StepLosses,
    /// `(domain, window)` of each of this peer's sequences, for fault reports.
    pub picks: Vec<(DomainId, u64)>,
}

/// Per-domain sums of sequence losses over a step: training losses, and with a
/// reference model (DoReMi) the reference's and the excess losses.
#[derive(Debug, Clone, PartialEq)]
pub struct StepLosses {
    pub train: DomainAccumulator,
    pub reference: Option<ReferenceLosses>,
}

/// The frozen reference model's losses on the step's sequences, and the excess of
/// the trained model's over them (clipped at 0), per domain.
#[derive(Debug, Clone, PartialEq)]
pub struct ReferenceLosses {
    pub reference: DomainAccumulator,
    pub excess: DomainAccumulator,
}

impl StepLosses {
    pub fn new(k: usize) -> Self {
        Self {
            train: DomainAccumulator::new(k),
            reference: None,
        }
    }

    /// The accumulators, in a fixed order, for summing over the peers.
    pub fn parts(&self) -> Vec<&DomainAccumulator> {
        let mut parts = vec![&self.train];
        if let Some(r) = &self.reference {
            parts.extend([&r.reference, &r.excess]);
        }
        parts
    }

    /// The same shape with every accumulator replaced, in [`Self::parts`] order.
    pub fn with_parts(&self, mut parts: impl Iterator<Item = DomainAccumulator>) -> Self {
        let mut next = || parts.next().expect("as many parts as StepLosses::parts");
        Self {
            train: next(),
            reference: self.reference.as_ref().map(|_| ReferenceLosses {
                reference: next(),
                excess: next(),
            }),
        }
    }

    /// The scheduler's feedback: per-domain mean losses (a domain whose mean is not
    /// finite counts as absent) and sequence counts.
    pub fn feedback(&self, micro_batches: usize) -> StepFeedback {
        StepFeedback {
            train: mixlm_mixing::finite_losses(&self.train.means()),
            sequences: self.train.counts().to_vec(),
            micro_batches,
            reference: self.reference.as_ref().map(|r| r.reference.means()),
            excess: self.reference.as_ref().map(|r| r.excess.means()),
        }
    }

    /// Mean over all sequences of the step (= token mean, as sequences have equal
    /// length).
    pub fn mean(&self) -> f64 {
        mean_over_sequences(&self.train.means(), self.train.counts())
    }
}

/// Mean over all sequences of per-domain means weighted by their sequence counts.
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

/// The objective a scheduler's [`Requirements`] call for; `reference` is the frozen
/// model loaded for [`Requirements::reference_model`], `source` and `seed` where
/// DoGE's validation windows are drawn from.
pub fn for_scheduler<B: TrainBackend>(
    requirements: &Requirements,
    reference: Option<Transformer<B::InnerBackend>>,
    domains: usize,
    (source, seed): (std::sync::Arc<dyn mixlm_data::TokenSource>, u64),
) -> Box<dyn Objective<B>> {
    match (&requirements.gradients, reference) {
        (Some(target), _) => Box::new(AlignedGradients::new(target.clone(), domains, source, seed)),
        (None, Some(reference)) => Box::new(ExcessLoss::new(reference, domains)),
        (None, None) => Box::new(MeanLoss::new(domains)),
    }
}

/// The backward passes of a step whose loss is one tensor per micro-batch: the
/// scheduler's per-domain loss weights, the scaling for accumulation, and the
/// gradient sum; with `communication = "nccl"` through a copy of the model marked so
/// that the backward pass averages the gradients over the peers as it goes.
struct Backward<B: TrainBackend> {
    grads: GradientsAccumulator<Transformer<B>>,
    marked: Option<Transformer<B>>,
}

impl<B: TrainBackend> Backward<B> {
    fn new(cx: &StepContext<'_, B>) -> Self {
        Self {
            grads: GradientsAccumulator::new(),
            marked: cx
                .peer
                .grads_in_backward()
                .then(|| mark_for_all_reduce(cx.model.clone())),
        }
    }

    /// The model to run the forward pass with.
    fn model<'m>(&'m self, model: &'m Transformer<B>) -> &'m Transformer<B> {
        self.marked.as_ref().unwrap_or(model)
    }

    /// Backward of one micro-batch's loss: the token mean, or `sum_i w_i * (mean
    /// loss of domain i's tokens)` with the weights the scheduler gives for
    /// `feedback` (that micro-batch's losses); `micro` holds this peer's part of it.
    fn micro_batch(
        &mut self,
        cx: &mut StepContext<'_, B>,
        token_losses: Tensor<B, 2>,
        domains: &[DomainId],
        micro: &DomainAccumulator,
        feedback: &StepFeedback,
    ) {
        cx.laps.model();
        let weights = cx.scheduler.loss_weights(cx.step, feedback);
        cx.laps.mixing();
        let loss = match weights {
            None => token_losses.mean(),
            Some(w) => weighted_loss(token_losses, domains, micro.counts(), &w, cx.device),
        };
        let loss = loss.div_scalar(cx.grad_accum as f64);
        let forward_model = self.model(cx.model);
        let backward = match self.marked.is_some() {
            true => cx.peer.backward_all_reduce(|| loss.backward()),
            false => loss.backward(),
        };
        self.grads.accumulate(
            cx.model,
            GradientsParams::from_grads(backward, forward_model),
        );
    }

    /// The step's gradient, averaged over the peers (this peer's slices of it under
    /// `distributed.shard = "gradients"`).
    fn finish(mut self, cx: &StepContext<'_, B>) -> Result<StepGrads> {
        match self.marked.is_some() {
            true => Ok(StepGrads::Whole(self.grads.grads())),
            false => cx.peer.step_grads(cx.model, self.grads.grads()),
        }
    }
}

/// A micro-batch's inputs and targets on the device.
fn tensors<B: TrainBackend>(
    cx: &StepContext<'_, B>,
    batch: &MicroBatch,
) -> (
    Tensor<B, 2, burn::tensor::Int>,
    Tensor<B, 2, burn::tensor::Int>,
) {
    inputs_and_targets::<B>(&batch.windows, batch.domains.len(), cx.seq_len, cx.device)
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
