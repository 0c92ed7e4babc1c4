//! The boundary every scheduler sits behind: losses that are not finite (a NaN from a
//! diverged step, an infinity from an overflow) are rejected there, counted as "no
//! measurement" for that domain, so no update rule ever sees one and the proportions
//! stay finite whatever the trainer feeds.

use crate::{
    AlignmentTarget, Composition, DomainLosses, GradientAlignment, Proportions, Requirements,
    Scheduler, StepFeedback,
};

/// Wraps a [`Scheduler`] so that every loss and gradient statistic it is given is
/// finite; [`crate::build_scheduler`] returns schedulers wrapped in it.
pub struct FiniteFeedback(pub Box<dyn Scheduler>);

/// `None` for a domain whose loss is not finite.
pub fn finite_losses(losses: &DomainLosses) -> DomainLosses {
    DomainLosses(
        losses
            .0
            .iter()
            .map(|l| l.filter(|v| v.is_finite()))
            .collect(),
    )
}

fn finite_feedback(f: &StepFeedback) -> StepFeedback {
    StepFeedback {
        train: finite_losses(&f.train),
        sequences: f.sequences.clone(),
        micro_batches: f.micro_batches,
        reference: f.reference.as_ref().map(finite_losses),
        excess: f.excess.as_ref().map(finite_losses),
    }
}

/// A domain whose gradient statistics are not all finite counts as absent from the
/// step (as a domain without sequences does); a target with a non-finite statistic
/// is dropped.
fn finite_alignment(a: &GradientAlignment) -> GradientAlignment {
    let k = a.present.len();
    let row_ok = |i: usize| {
        a.gram[i].iter().all(|v| v.is_finite())
            && a.target.as_ref().is_none_or(|t| t.dots[i].is_finite())
    };
    let present: Vec<bool> = (0..k).map(|i| a.present[i] && row_ok(i)).collect();
    let gram = (0..k)
        .map(|i| {
            (0..k)
                .map(|j| {
                    if present[i] && present[j] {
                        a.gram[i][j]
                    } else {
                        0.0
                    }
                })
                .collect()
        })
        .collect();
    let target = a.target.as_ref().and_then(|t| {
        t.norm_sq.is_finite().then(|| AlignmentTarget {
            dots: (0..k)
                .map(|i| if present[i] { t.dots[i] } else { 0.0 })
                .collect(),
            norm_sq: t.norm_sq,
        })
    });
    GradientAlignment {
        present,
        gram,
        target,
    }
}

impl Scheduler for FiniteFeedback {
    fn name(&self) -> &str {
        self.0.name()
    }
    fn requirements(&self) -> Requirements {
        self.0.requirements()
    }
    fn wants_validation(&self, step: u64) -> bool {
        self.0.wants_validation(step)
    }
    fn observe_validation(&mut self, step: u64, losses: &DomainLosses) {
        self.0.observe_validation(step, &finite_losses(losses))
    }
    fn proportions(&mut self, step: u64) -> Proportions {
        self.0.proportions(step)
    }
    fn fixed_in_advance(&self) -> bool {
        self.0.fixed_in_advance()
    }
    fn composition(&self, step: u64) -> Option<Composition> {
        self.0.composition(step)
    }
    fn observe_train(&mut self, step: u64, feedback: &StepFeedback) {
        self.0.observe_train(step, &finite_feedback(feedback))
    }
    fn loss_weights(&mut self, step: u64, micro_batch: &StepFeedback) -> Option<Vec<f64>> {
        self.0.loss_weights(step, &finite_feedback(micro_batch))
    }
    fn gradient_weights(
        &mut self,
        step: u64,
        lr: f64,
        alignment: &GradientAlignment,
    ) -> Option<Vec<f64>> {
        self.0
            .gradient_weights(step, lr, &finite_alignment(alignment))
    }
    fn domain_weights(&self) -> Option<Proportions> {
        self.0.domain_weights()
    }
    fn learned_proportions(&self) -> Option<Proportions> {
        self.0.learned_proportions()
    }
    fn watch(&self) -> Vec<(String, Vec<f64>)> {
        self.0.watch()
    }
    fn state(&self) -> serde_json::Value {
        self.0.state()
    }
    fn restore(&mut self, state: &serde_json::Value) -> Result<(), String> {
        self.0.restore(state)
    }
}
