//! DoGE's step (Fan et al. 2024, Algorithm 1; the Aioli repository's
//! `DogeTrainer`, see `mixlm_mixing::doge`): every domain's sequences get their own
//! backward pass, their gradients' inner products (with each other, or with a
//! validation gradient) go to the scheduler, and the model is updated with the
//! weighted sum of the domain gradients it asks for. The mechanics of the gradients
//! (per-domain accumulation, the sums over the peers, the Gram matrix) are in
//! [`crate::alignment`].

use std::sync::Arc;

use anyhow::{Context, Result};
use mixlm_data::TokenSource;
use mixlm_mixing::GradientTarget;
use mixlm_model::TrainBackend;

use super::{Objective, StepContext, StepLosses, StepOutput};
use crate::alignment::{validation_gradient, DomainGradients};
use crate::optim::StepGrads;

/// Per-domain gradients, aligned and combined (see the module docs).
pub struct AlignedGradients {
    target: GradientTarget,
    domains: usize,
    /// The validation windows of [`GradientTarget::Validation`], drawn afresh each
    /// step from `seed`.
    source: Arc<dyn TokenSource>,
    seed: u64,
}

impl AlignedGradients {
    pub fn new(
        target: GradientTarget,
        domains: usize,
        source: Arc<dyn TokenSource>,
        seed: u64,
    ) -> Self {
        Self {
            target,
            domains,
            source,
            seed,
        }
    }
}

impl<B: TrainBackend> Objective<B> for AlignedGradients {
    fn step(&mut self, mut cx: StepContext<'_, B>) -> Result<StepOutput> {
        let mut losses = StepLosses::new(self.domains);
        let mut picks = Vec::new();
        let mut per_domain = DomainGradients::<B>::new(self.domains);
        cx.laps.mixing();
        for _ in 0..cx.grad_accum {
            let batch = cx.take(&mut picks)?;
            let seq_means = per_domain.backward(
                cx.model,
                &batch.windows,
                &batch.domains,
                cx.seq_len,
                cx.device,
            );
            losses.train.add(&seq_means, &batch.domains);
            cx.laps.model();
        }
        let target = match &self.target {
            GradientTarget::Validation { sequences, domains } => {
                let own = validation_gradient(
                    cx.model,
                    self.source.as_ref(),
                    (*sequences, domains),
                    (self.seed, cx.step),
                    (cx.seq_len, cx.peer.rank()),
                    cx.device,
                );
                Some(cx.peer.sum_grads(cx.model, own)?)
            }
            GradientTarget::Train => None,
        };
        let per_domain = per_domain.finish(cx.model, cx.peer)?;
        let alignment = per_domain.alignment(cx.model, target.as_ref());
        let coefficients = cx
            .scheduler
            .gradient_weights(cx.step, cx.lr, &alignment)
            .context("the scheduler asked for per-domain gradients but gave no weights")?;
        Ok(StepOutput {
            grads: StepGrads::Whole(per_domain.combine(cx.model, &coefficients)),
            losses,
            picks,
        })
    }
}
