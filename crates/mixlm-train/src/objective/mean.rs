//! The plain objective: the mean loss over the step's tokens, or the per-domain
//! weighting of it that the scheduler asks for ([`Scheduler::loss_weights`]).
//!
//! [`Scheduler::loss_weights`]: mixlm_mixing::Scheduler::loss_weights

use anyhow::Result;
use mixlm_eval::{sequence_means, DomainAccumulator};
use mixlm_mixing::StepFeedback;
use mixlm_model::TrainBackend;

use super::{tensors, Backward, Objective, StepContext, StepLosses, StepOutput};

/// The token mean (see the module docs).
pub struct MeanLoss {
    domains: usize,
}

impl MeanLoss {
    pub fn new(domains: usize) -> Self {
        Self { domains }
    }
}

impl<B: TrainBackend> Objective<B> for MeanLoss {
    fn step(&mut self, mut cx: StepContext<'_, B>) -> Result<StepOutput> {
        let k = self.domains;
        let mut losses = StepLosses::new(k);
        let mut picks = Vec::new();
        let mut backward = Backward::new(&cx);
        cx.laps.mixing();
        for _ in 0..cx.grad_accum {
            let batch = cx.take(&mut picks)?;
            let (inputs, targets) = tensors(&cx, &batch);
            let token_losses = backward.model(cx.model).token_losses(inputs, targets);
            let seq_means = sequence_means(token_losses.clone().inner());
            let micro = DomainAccumulator::of(k, &seq_means, &batch.domains);
            let feedback = StepFeedback::train_only(micro.means(), micro.counts().to_vec());
            backward.micro_batch(&mut cx, token_losses, &batch.domains, &micro, &feedback);
            losses.train.add(&seq_means, &batch.domains);
            cx.laps.model();
        }
        Ok(StepOutput {
            grads: backward.finish(&cx)?,
            losses,
            picks,
        })
    }
}
