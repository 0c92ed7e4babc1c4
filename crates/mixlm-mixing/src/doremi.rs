//! DoReMi (Xie et al. 2023, "DoReMi: Optimizing Data Mixtures Speeds Up Language
//! Model Pretraining"), the proxy run of its three-step recipe:
//!
//! 1. train a reference model on the reference mixture (stratified here: `mixlm train`
//!    with `method = "stratified"`);
//! 2. **this scheduler**: train a proxy model of the same shape with Group DRO.
//!    Batches are drawn from the reference mixture (uniform, exact counts). Each
//!    micro-batch, the per-domain excess loss `lambda_i` = mean over domain `i`'s
//!    tokens of `max(loss_proxy - loss_ref, 0)` updates
//!    `alpha' = normalize(alpha * exp(eta * lambda))`,
//!    `alpha = (1 - smoothing) alpha' + smoothing / K`, and the proxy is trained on
//!    `sum_i alpha_i * (mean loss of domain i)`;
//! 3. train the final model on the average of `alpha` over the proxy run, which this
//!    scheduler reports as [`Scheduler::learned_proportions`] (the trainer writes it to
//!    `learned_mixture.toml`).
//!
//! Defaults are the paper's: `eta = 1`, `smoothing = 1e-3`. Domains absent from a
//! micro-batch have `lambda = 0`.

use crate::config::{check_eta, check_range, MixingConfigError};
use crate::proportions::softmax;
use crate::{
    restore_state, Composition, DomainInfo, Proportions, Requirements, Scheduler, StepFeedback,
};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// `method = "doremi"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DoReMiConfig {
    /// The reference model: a checkpoint folder, or a run folder (its latest
    /// checkpoint). Required to train; `mixlm mix-search --method doremi` fills it in.
    #[serde(default)]
    pub reference: PathBuf,
    #[serde(default = "default_eta")]
    pub eta: f64,
    /// Weight of the uniform distribution mixed into the domain weights, in `[0, 1]`.
    #[serde(default = "default_smoothing")]
    pub smoothing: f64,
}

fn default_eta() -> f64 {
    1.0
}
fn default_smoothing() -> f64 {
    1e-3
}

impl DoReMiConfig {
    /// The paper's defaults against `reference`.
    pub fn new(reference: PathBuf) -> Self {
        Self {
            reference,
            eta: default_eta(),
            smoothing: default_smoothing(),
        }
    }

    pub fn validate(&self) -> Result<(), MixingConfigError> {
        if self.reference.as_os_str().is_empty() {
            return Err(MixingConfigError::Invalid {
                field: "reference",
                message: "is missing: give the reference model (a run or checkpoint \
                          folder trained with method = \"stratified\"), or let \
                          `mixlm mix-search --method doremi` train both"
                    .into(),
            });
        }
        check_eta(self.eta)?;
        check_range(
            "smoothing",
            self.smoothing,
            0.0,
            1.0,
            false,
            "must be in [0, 1]",
        )
    }
}

/// One DoReMi update: `normalize(alpha * exp(eta * lambda))`, then smoothed towards
/// uniform. Computed in log space, so large excess losses cannot overflow.
pub fn doremi_update(alpha: &[f64], excess: &[f64], eta: f64, smoothing: f64) -> Vec<f64> {
    let k = alpha.len() as f64;
    let logits: Vec<f64> = alpha
        .iter()
        .zip(excess)
        .map(|(a, l)| a.ln() + eta * l)
        .collect();
    softmax(&logits)
        .iter()
        .map(|x| (1.0 - smoothing) * x + smoothing / k)
        .collect()
}

/// What DoReMi carries between steps (checkpointed).
pub type DoReMiState = crate::proportions::AveragedWeights;

/// DoReMi's proxy run as a [`Scheduler`].
#[derive(Debug, Clone)]
pub struct DoReMiScheduler {
    config: DoReMiConfig,
    state: DoReMiState,
}

impl DoReMiScheduler {
    pub fn new(config: &DoReMiConfig, domains: &DomainInfo) -> Result<Self, MixingConfigError> {
        config.validate()?;
        let k = domains.names.len();
        Ok(Self {
            config: config.clone(),
            state: DoReMiState::uniform(k),
        })
    }

    pub fn state_ref(&self) -> &DoReMiState {
        &self.state
    }
}

impl Scheduler for DoReMiScheduler {
    fn name(&self) -> &str {
        "doremi"
    }

    fn requirements(&self) -> Requirements {
        Requirements {
            reference_model: Some(self.config.reference.clone()),
            ..Requirements::default()
        }
    }

    /// Batches come from the reference mixture (uniform).
    fn proportions(&mut self, _step: u64) -> Proportions {
        Proportions::uniform(self.state.alpha.len())
    }

    fn fixed_in_advance(&self) -> bool {
        true
    }

    fn composition(&self, _step: u64) -> Option<Composition> {
        Some(Composition::Fixed)
    }

    fn loss_weights(&mut self, _step: u64, micro_batch: &StepFeedback) -> Option<Vec<f64>> {
        let excess: Vec<f64> = match &micro_batch.excess {
            Some(e) => e.0.iter().map(|l| l.unwrap_or(0.0)).collect(),
            // No reference losses (cannot happen when the trainer honours
            // `requirements`): no update.
            None => return Some(self.state.alpha.clone()),
        };
        let alpha = doremi_update(
            &self.state.alpha,
            &excess,
            self.config.eta,
            self.config.smoothing,
        );
        self.state.push(alpha.clone());
        Some(alpha)
    }

    fn domain_weights(&self) -> Option<Proportions> {
        self.state.current()
    }

    fn learned_proportions(&self) -> Option<Proportions> {
        self.state.average()
    }

    fn state(&self) -> serde_json::Value {
        serde_json::to_value(&self.state).expect("DoReMi state serialises")
    }

    fn restore(&mut self, state: &serde_json::Value) -> Result<(), String> {
        let k = self.state.alpha.len();
        self.state = restore_state("DoReMi", state, k, |s: &DoReMiState| s.alpha.len())?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DomainLosses;

    fn close(a: &[f64], b: &[f64]) {
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-9, "{a:?} vs {b:?}");
        }
    }

    fn micro(excess: &[Option<f64>]) -> StepFeedback {
        StepFeedback {
            excess: Some(DomainLosses(excess.to_vec())),
            ..StepFeedback::train_only(
                DomainLosses(vec![Some(1.0); excess.len()]),
                vec![1; excess.len()],
            )
        }
    }

    #[test]
    fn update_matches_hand_computation() {
        // alpha = [0.5, 0.5], lambda = [ln 3, 0], eta = 1: alpha' = [0.75, 0.25];
        // smoothing 0.1: 0.9 * [0.75, 0.25] + 0.05 = [0.725, 0.275].
        close(
            &doremi_update(&[0.5, 0.5], &[3f64.ln(), 0.0], 1.0, 0.1),
            &[0.725, 0.275],
        );
        // eta scales the exponent: eta = 2, lambda = [ln 3 / 2, 0] gives the same.
        close(
            &doremi_update(&[0.5, 0.5], &[3f64.ln() / 2.0, 0.0], 2.0, 0.1),
            &[0.725, 0.275],
        );
        // No overflow for huge excess.
        let a = doremi_update(&[0.5, 0.5], &[1e6, 0.0], 1.0, 1e-3);
        close(&a, &[1.0 - 0.0005, 0.0005]);
    }

    #[test]
    fn proxy_run_reweights_and_averages() {
        let domains = DomainInfo {
            names: vec!["a".into(), "b".into()],
            natural_weights: vec![1.0, 1.0],
            seed: 0,
        };
        let cfg: crate::MixingConfig =
            toml::from_str("method = \"doremi\"\nreference = \"runs/ref\"\nsmoothing = 0.1")
                .unwrap();
        let mut s = crate::build_scheduler(&cfg, &domains).unwrap();
        assert_eq!(
            s.requirements().reference_model,
            Some(PathBuf::from("runs/ref"))
        );
        assert_eq!(s.proportions(0).as_slice(), &[0.5, 0.5]);
        assert_eq!(s.composition(0), Some(Composition::Fixed));
        assert_eq!(s.learned_proportions(), None);
        let w1 = s.loss_weights(0, &micro(&[Some(3f64.ln()), None])).unwrap();
        close(&w1, &[0.725, 0.275]);
        // Second update from [0.725, 0.275] with lambda = [0, ln 2]:
        // alpha' ∝ [0.725, 0.55] = [0.5686275, 0.4313725]; smoothed:
        // 0.9 * alpha' + 0.05 = [0.5617647, 0.4382353].
        let w2 = s
            .loss_weights(0, &micro(&[Some(0.0), Some(2f64.ln())]))
            .unwrap();
        close(&w2, &[0.561_764_705_882_353, 0.438_235_294_117_647]);
        // Sampling stays uniform; the learned mixture is the average of the weights.
        assert_eq!(s.proportions(1).as_slice(), &[0.5, 0.5]);
        let avg = s.learned_proportions().unwrap();
        close(
            avg.as_slice(),
            &[(0.725 + w2[0]) / 2.0, (0.275 + w2[1]) / 2.0],
        );
        // A config without a reference parses (mix-search fills it in) but does not
        // validate for training.
        let c = toml::from_str::<crate::MixingConfig>("method = \"doremi\"\neta = 1.0").unwrap();
        let e = c.validate(&["a".into()]).unwrap_err().to_string();
        assert!(e.contains("mixing.reference is missing"), "{e}");
    }
}
