//! DoReMi's proxy objective: the frozen reference model scores every training
//! sequence too, and the scheduler weighs each domain's loss by its excess over the
//! reference (Xie et al. 2023, Algorithm 1; which variant, the paper's or the Aioli
//! repository's, is the scheduler's business: see `mixlm_mixing::doremi`).
//!
//! Each micro-batch's per-domain losses, the reference's and the excess losses
//! (`max(loss - reference, 0)` per token) are summed over the data-parallel peers
//! before the scheduler sees them, so every peer gets the same weights.

use anyhow::Result;
use mixlm_eval::{sequence_means, DomainAccumulator};
use mixlm_mixing::StepFeedback;
use mixlm_model::{TrainBackend, Transformer};

use super::{tensors, Backward, Objective, ReferenceLosses, StepContext, StepLosses, StepOutput};
use crate::distributed::sum_domain_losses;

/// DoReMi's excess-weighted loss (see the module docs).
pub struct ExcessLoss<B: TrainBackend> {
    reference: Transformer<B::InnerBackend>,
    domains: usize,
}

impl<B: TrainBackend> ExcessLoss<B> {
    pub fn new(reference: Transformer<B::InnerBackend>, domains: usize) -> Self {
        Self { reference, domains }
    }
}

impl<B: TrainBackend> Objective<B> for ExcessLoss<B> {
    fn step(&mut self, mut cx: StepContext<'_, B>) -> Result<StepOutput> {
        let k = self.domains;
        let mut losses = StepLosses::new(k);
        let mut reference = ReferenceLosses {
            reference: DomainAccumulator::new(k),
            excess: DomainAccumulator::new(k),
        };
        let mut picks = Vec::new();
        let mut backward = Backward::new(&cx);
        cx.laps.mixing();
        for _ in 0..cx.grad_accum {
            let batch = cx.take(&mut picks)?;
            let domains = &batch.domains;
            let (inputs, targets) = tensors(&cx, &batch);
            let ref_losses =
                (self.reference).token_losses(inputs.clone().inner(), targets.clone().inner());
            let token_losses = backward.model(cx.model).token_losses(inputs, targets);
            let seq_means = sequence_means(token_losses.clone().inner());
            let excess = (token_losses.clone().inner() - ref_losses.clone()).clamp_min(0.0);
            let (ref_seq, excess_seq) = (sequence_means(ref_losses), sequence_means(excess));
            let micro = DomainAccumulator::of(k, &seq_means, domains);
            let mut all = vec![
                micro.clone(),
                DomainAccumulator::of(k, &ref_seq, domains),
                DomainAccumulator::of(k, &excess_seq, domains),
            ];
            // The weights follow the excess losses of the whole (all peers')
            // micro-batch, so every peer updates them alike.
            if cx.peer.collective() {
                all = sum_domain_losses(
                    cx.peer,
                    "micro-batch losses",
                    &all.iter().collect::<Vec<_>>(),
                    &[],
                )?
                .0;
            }
            let mut feedback = StepFeedback::train_only(all[0].means(), all[0].counts().to_vec());
            feedback.reference = Some(all[1].means());
            feedback.excess = Some(all[2].means());
            reference.reference.add(&ref_seq, domains);
            reference.excess.add(&excess_seq, domains);
            backward.micro_batch(&mut cx, token_losses, domains, &micro, &feedback);
            losses.train.add(&seq_means, domains);
            cx.laps.model();
        }
        losses.reference = Some(reference);
        Ok(StepOutput {
            grads: backward.finish(&cx)?,
            losses,
            picks,
        })
    }
}
