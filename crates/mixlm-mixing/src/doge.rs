//! DoGE (Fan et al. 2024, "DoGE: Domain Reweighting with Generalization
//! Estimation"), the proxy run that learns domain weights from gradient alignment.
//!
//! Every step the trainer computes the gradient `g_i` of each domain's mean training
//! loss separately (batches are drawn uniformly, exact counts) and a target gradient
//! `g_T`: the gradient of the mean loss on a batch of validation windows of all
//! domains (`target = "validation"`, the default, as in the official code and Aioli's
//! comparison), or the sum of the domain gradients (`target = "train"`, the paper's
//! universal-generalisation objective). `target_domains` restricts the validation
//! batch to some domains: the paper's out-of-domain setting, where the mixture is
//! tuned for a target the proxy does not need to weigh. As in the official code, each gradient is
//! first clipped to norm `grad_clip`. With learning rate `lr`:
//!
//! - `W_i = <g_i, g_T>` (`target = "train"`: `sum_j <g_i, g_j>`),
//! - `s_i = clip(lr * W_i / mean_i |g_i|, lr * dw_min, lr * dw_max)`,
//! - `alpha = softmax(ln alpha_prev + s / mu)`, then `(1 - smoothing) alpha + smoothing / K`,
//! - the model is updated with `sum_i alpha_i g_i`;
//!
//! and the final mixture is the average of `alpha` over the run, which the trainer
//! writes to `learned_mixture.toml` (train the final model with `--mixing FILE`).
//! The scheduler never sees a tensor: the trainer hands it the Gram matrix of the
//! gradients ([`GradientAlignment`]) and applies the coefficients it returns.
//!
//! Defaults follow the official code: `mu = 0.01`, `dw_min = 0`, `dw_max = 5`,
//! `smoothing = 0`, `grad_clip = 1`.

use crate::config::{check_range, MixingConfigError};
use crate::proportions::softmax;
use crate::{
    restore_state, Composition, DomainId, DomainInfo, GradientAlignment, GradientTarget,
    Proportions, Requirements, Scheduler,
};
use serde::{Deserialize, Serialize};

/// What DoGE aligns each domain's gradient with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DogeTarget {
    /// The gradient of the mean validation loss over all domains.
    #[default]
    Validation,
    /// The sum of the per-domain training gradients (universal generalisation).
    Train,
}

/// `method = "doge"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DogeConfig {
    /// Bregman regularisation: the update is `exp(score / mu)`; smaller moves faster.
    #[serde(default = "default_mu")]
    pub mu: f64,
    #[serde(default)]
    pub target: DogeTarget,
    /// Validation windows per step for the target gradient (`target = "validation"`).
    #[serde(default = "default_val_sequences")]
    pub val_sequences: usize,
    /// Domains whose validation data make the target; empty (the default): all.
    #[serde(default)]
    pub target_domains: Vec<String>,
    /// Weight of the uniform distribution mixed into the domain weights, in `[0, 1]`.
    #[serde(default)]
    pub smoothing: f64,
    /// Scores are clipped to `[lr * dw_min, lr * dw_max]`.
    #[serde(default)]
    pub dw_min: f64,
    #[serde(default = "default_dw_max")]
    pub dw_max: f64,
    /// Each gradient is clipped to this norm before alignment; 0 disables.
    #[serde(default = "default_grad_clip")]
    pub grad_clip: f64,
}

fn default_mu() -> f64 {
    0.01
}
fn default_val_sequences() -> usize {
    8
}
fn default_dw_max() -> f64 {
    5.0
}
fn default_grad_clip() -> f64 {
    1.0
}

impl Default for DogeConfig {
    fn default() -> Self {
        Self {
            mu: default_mu(),
            target: DogeTarget::default(),
            val_sequences: default_val_sequences(),
            target_domains: Vec::new(),
            smoothing: 0.0,
            dw_min: 0.0,
            dw_max: default_dw_max(),
            grad_clip: default_grad_clip(),
        }
    }
}

impl DogeConfig {
    pub fn validate(&self, domains: &[String]) -> Result<(), MixingConfigError> {
        for name in &self.target_domains {
            if !domains.contains(name) {
                return Err(MixingConfigError::UnknownDomain {
                    field: "mixing.target_domains",
                    name: name.clone(),
                    known: domains.join(", "),
                });
            }
        }
        if self.target == DogeTarget::Train && !self.target_domains.is_empty() {
            return Err(MixingConfigError::Invalid {
                field: "target_domains",
                message: "needs target = \"validation\" (the train target is every domain)".into(),
            });
        }
        check_range(
            "mu",
            self.mu,
            f64::MIN_POSITIVE,
            f64::MAX,
            false,
            "must be finite and > 0",
        )?;
        check_range(
            "smoothing",
            self.smoothing,
            0.0,
            1.0,
            false,
            "must be in [0, 1]",
        )?;
        check_range(
            "grad_clip",
            self.grad_clip,
            0.0,
            f64::MAX,
            false,
            "must be finite and >= 0 (0 disables)",
        )?;
        check_range(
            "dw_min",
            self.dw_min,
            f64::MIN,
            f64::MAX,
            false,
            "must be finite",
        )?;
        check_range(
            "dw_max",
            self.dw_max,
            self.dw_min,
            f64::MAX,
            false,
            "must be finite and >= dw_min",
        )?;
        if self.target == DogeTarget::Validation && self.val_sequences == 0 {
            return Err(MixingConfigError::Invalid {
                field: "val_sequences",
                message: "must be >= 1 with target = \"validation\"".into(),
            });
        }
        Ok(())
    }
}

/// What DoGE carries between steps (checkpointed).
pub type DogeState = crate::proportions::AveragedWeights;

/// The result of one DoGE update.
#[derive(Debug, Clone, PartialEq)]
pub struct DogeUpdate {
    /// New domain weights.
    pub alpha: Vec<f64>,
    /// Coefficient of each domain's raw (unclipped) gradient in the model update:
    /// `alpha_i * clip_i`, 0 for domains absent from the batch.
    pub coefficients: Vec<f64>,
    /// The clipped scores `s_i`.
    pub scores: Vec<f64>,
}

/// `min(1, max_norm / (norm + 1e-6))`, PyTorch's `clip_grad_norm_` factor.
fn clip_factor(norm_sq: f64, max_norm: f64) -> f64 {
    if max_norm <= 0.0 {
        return 1.0;
    }
    (max_norm / (norm_sq.max(0.0).sqrt() + 1e-6)).min(1.0)
}

/// One DoGE update from the gradient Gram matrix (see the module docs).
pub fn doge_update(
    alpha: &[f64],
    g: &GradientAlignment,
    lr: f64,
    config: &DogeConfig,
) -> DogeUpdate {
    let k = alpha.len();
    let present: Vec<usize> = (0..k).filter(|&i| g.present[i]).collect();
    let clip: Vec<f64> = (0..k)
        .map(|i| clip_factor(g.gram[i][i], config.grad_clip))
        .collect();
    let alignment: Vec<f64> = (0..k)
        .map(|i| {
            if !g.present[i] {
                return 0.0;
            }
            match &g.target {
                Some(t) => clip[i] * t.dots[i] * clip_factor(t.norm_sq, config.grad_clip),
                None => present
                    .iter()
                    .map(|&j| clip[i] * clip[j] * g.gram[i][j])
                    .sum(),
            }
        })
        .collect();
    let avg_norm = present
        .iter()
        .map(|&i| clip[i] * g.gram[i][i].max(0.0).sqrt())
        .sum::<f64>()
        / present.len().max(1) as f64;
    let scores: Vec<f64> = (0..k)
        .map(|i| {
            (lr * alignment[i] / (avg_norm + 1e-6)).clamp(lr * config.dw_min, lr * config.dw_max)
        })
        .collect();
    let logits: Vec<f64> = alpha
        .iter()
        .zip(&scores)
        .map(|(a, s)| a.ln() + s / config.mu)
        .collect();
    let kf = k as f64;
    let alpha: Vec<f64> = softmax(&logits)
        .iter()
        .map(|a| (1.0 - config.smoothing) * a + config.smoothing / kf)
        .collect();
    let coefficients = (0..k)
        .map(|i| {
            if g.present[i] {
                alpha[i] * clip[i]
            } else {
                0.0
            }
        })
        .collect();
    DogeUpdate {
        alpha,
        coefficients,
        scores,
    }
}

/// DoGE's proxy run as a [`Scheduler`].
#[derive(Debug, Clone)]
pub struct DogeScheduler {
    config: DogeConfig,
    /// The domains of the validation target.
    targets: Vec<DomainId>,
    state: DogeState,
}

impl DogeScheduler {
    pub fn new(config: &DogeConfig, domains: &DomainInfo) -> Result<Self, MixingConfigError> {
        config.validate(&domains.names)?;
        let k = domains.names.len();
        let targets = (0..k)
            .filter(|&d| {
                config.target_domains.is_empty()
                    || config.target_domains.contains(&domains.names[d])
            })
            .map(DomainId)
            .collect();
        Ok(Self {
            config: config.clone(),
            targets,
            state: DogeState::uniform(k),
        })
    }

    pub fn state_ref(&self) -> &DogeState {
        &self.state
    }
}

impl Scheduler for DogeScheduler {
    fn name(&self) -> &str {
        "doge"
    }

    fn requirements(&self) -> Requirements {
        Requirements {
            gradients: Some(match self.config.target {
                DogeTarget::Validation => GradientTarget::Validation {
                    sequences: self.config.val_sequences,
                    domains: self.targets.clone(),
                },
                DogeTarget::Train => GradientTarget::Train,
            }),
            ..Requirements::default()
        }
    }

    /// Batches are drawn uniformly, as in the paper.
    fn proportions(&mut self, _step: u64) -> Proportions {
        Proportions::uniform(self.state.alpha.len())
    }

    fn fixed_in_advance(&self) -> bool {
        true
    }

    fn composition(&self, _step: u64) -> Option<Composition> {
        Some(Composition::Fixed)
    }

    fn gradient_weights(&mut self, _step: u64, lr: f64, g: &GradientAlignment) -> Option<Vec<f64>> {
        let update = doge_update(&self.state.alpha, g, lr, &self.config);
        self.state.push(update.alpha);
        Some(update.coefficients)
    }

    fn domain_weights(&self) -> Option<Proportions> {
        self.state.current()
    }

    fn learned_proportions(&self) -> Option<Proportions> {
        self.state.average()
    }

    fn state(&self) -> serde_json::Value {
        serde_json::to_value(&self.state).expect("DoGE state serialises")
    }

    fn restore(&mut self, state: &serde_json::Value) -> Result<(), String> {
        let k = self.state.alpha.len();
        self.state = restore_state("DoGE", state, k, |s: &DogeState| s.alpha.len())?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::AlignmentTarget;

    fn info(k: usize) -> DomainInfo {
        DomainInfo {
            names: (0..k).map(|i| format!("d{i}")).collect(),
            natural_weights: vec![1.0; k],
            seed: 0,
            steps: 1000,
        }
    }

    /// Gradients as explicit vectors, to build the Gram matrix the trainer would.
    fn alignment(grads: &[Option<Vec<f64>>], target: Option<&[f64]>) -> GradientAlignment {
        let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
        let k = grads.len();
        let gram = (0..k)
            .map(|i| {
                (0..k)
                    .map(|j| match (&grads[i], &grads[j]) {
                        (Some(a), Some(b)) => dot(a, b),
                        _ => 0.0,
                    })
                    .collect()
            })
            .collect();
        GradientAlignment {
            present: grads.iter().map(Option::is_some).collect(),
            gram,
            target: target.map(|t| AlignmentTarget {
                dots: grads
                    .iter()
                    .map(|g| g.as_ref().map_or(0.0, |g| dot(g, t)))
                    .collect(),
                norm_sq: dot(t, t),
            }),
        }
    }

    #[test]
    fn validation_target_update_matches_hand_computation() {
        // g_0 = (0.3, 0.4) (norm 0.5), g_1 = (0, 0.2) (norm 0.2), g_T = (0.6, 0.0)
        // (norm 0.6); nothing clipped at grad_clip = 1.
        let g = alignment(
            &[Some(vec![0.3, 0.4]), Some(vec![0.0, 0.2])],
            Some(&[0.6, 0.0]),
        );
        let config = DogeConfig {
            mu: 0.5,
            ..DogeConfig::default()
        };
        let lr = 0.1;
        let u = doge_update(&[0.5, 0.5], &g, lr, &config);
        // W = (0.18, 0); mean norm 0.35; s = (0.1 * 0.18 / 0.35, 0).
        let s0 = 0.1 * 0.18 / (0.35 + 1e-6);
        assert!((u.scores[0] - s0).abs() < 1e-12 && u.scores[1] == 0.0);
        let e = (s0 / 0.5f64).exp();
        let want = [e / (e + 1.0), 1.0 / (e + 1.0)];
        for (i, w) in want.iter().enumerate() {
            assert!((u.alpha[i] - w).abs() < 1e-12, "{:?}", u.alpha);
            // clip factor 1 - 1e-6/|g| ~ 1 up to the epsilon of clip_grad_norm_.
            assert!((u.coefficients[i] - w).abs() < 1e-5);
        }
    }

    #[test]
    fn train_target_clips_gradients_and_scores() {
        // g_0 = (3, 4) (norm 5, clipped to 1: (0.6, 0.8)), g_1 = (0.6, -0.8)
        // (norm 1); W_i = sum_j <g_i, g_j> over the clipped gradients:
        // W_0 = 1 + (0.36 - 0.64) = 0.72, W_1 = -0.28 + 1 = 0.72.
        let g = alignment(&[Some(vec![3.0, 4.0]), Some(vec![0.6, -0.8])], None);
        let config = DogeConfig {
            target: DogeTarget::Train,
            dw_max: 0.5,
            ..DogeConfig::default()
        };
        let u = doge_update(&[0.25, 0.75], &g, 1.0, &config);
        // 0.72 / ~1.0 exceeds dw_max = 0.5: both scores clip to lr * 0.5.
        assert!(u.scores.iter().all(|s| (s - 0.5).abs() < 1e-12));
        // Equal scores leave the weights where they were.
        assert!((u.alpha[0] - 0.25).abs() < 1e-12 && (u.alpha[1] - 0.75).abs() < 1e-12);
        let clip0 = 1.0 / (5.0 + 1e-6);
        assert!((u.coefficients[0] - 0.25 * clip0).abs() < 1e-12);
    }

    #[test]
    fn negative_alignment_is_clipped_at_dw_min_and_absent_domains_skip() {
        let g = alignment(
            &[Some(vec![1.0, 0.0]), Some(vec![-1.0, 0.0]), None],
            Some(&[0.5, 0.0]),
        );
        let config = DogeConfig::default();
        let u = doge_update(&[1.0 / 3.0; 3], &g, 0.01, &config);
        assert!(u.scores[0] > 0.0);
        assert_eq!(&u.scores[1..], &[0.0, 0.0]);
        assert_eq!(u.coefficients[2], 0.0);
        // Domain 0 gains, the others keep equal shares.
        assert!(u.alpha[0] > 1.0 / 3.0 && (u.alpha[1] - u.alpha[2]).abs() < 1e-15);
    }

    #[test]
    fn learned_mixture_is_the_average_and_state_round_trips() {
        let mut s = DogeScheduler::new(&DogeConfig::default(), &info(2)).unwrap();
        assert_eq!(s.learned_proportions(), None);
        let g = alignment(
            &[Some(vec![1.0, 0.0]), Some(vec![0.0, 1.0])],
            Some(&[1.0, 0.0]),
        );
        let mut sum = [0.0; 2];
        for step in 0..3 {
            s.gradient_weights(step, 1e-3, &g).unwrap();
            for (acc, a) in sum.iter_mut().zip(&s.state_ref().alpha) {
                *acc += a;
            }
        }
        let learned = s.learned_proportions().unwrap();
        for (l, s) in learned.as_slice().iter().zip(sum) {
            assert!((l - s / 3.0).abs() < 1e-12);
        }
        assert!(learned.as_slice()[0] > 0.5);
        let mut t = DogeScheduler::new(&DogeConfig::default(), &info(2)).unwrap();
        t.restore(&s.state()).unwrap();
        assert_eq!(t.state_ref(), s.state_ref());
        let mut u = DogeScheduler::new(&DogeConfig::default(), &info(3)).unwrap();
        assert!(u.restore(&s.state()).unwrap_err().contains("2 domains"));
    }

    #[test]
    fn config_from_toml_with_checked_ranges() {
        let c: crate::MixingConfig = toml::from_str(
            "method = \"doge\"\nmu = 0.05\ntarget = \"train\"\nsmoothing = 0.1\ndw_max = 3.0",
        )
        .unwrap();
        let crate::MixingConfig::Doge(d) = &c else {
            panic!("{c:?}")
        };
        assert_eq!((d.mu, d.target, d.dw_max), (0.05, DogeTarget::Train, 3.0));
        let names = vec!["a".to_string(), "b".to_string()];
        c.validate(&names).unwrap();
        let unknown: crate::MixingConfig =
            toml::from_str("method = \"doge\"\ntarget_domains = [\"c\"]").unwrap();
        let e = unknown.validate(&names).unwrap_err().to_string();
        assert!(
            e.contains("mixing.target_domains") && e.contains("`c`"),
            "{e}"
        );
        let s = DogeScheduler::new(
            &DogeConfig {
                target_domains: vec!["d1".into()],
                ..DogeConfig::default()
            },
            &info(3),
        )
        .unwrap();
        assert_eq!(
            s.requirements().gradients,
            Some(GradientTarget::Validation {
                sequences: 8,
                domains: vec![DomainId(1)]
            })
        );
        let bad: crate::MixingConfig = toml::from_str("method = \"doge\"\nmu = 0.0").unwrap();
        assert!(bad
            .validate(&names)
            .unwrap_err()
            .to_string()
            .contains("mixing.mu"));
        let typo = toml::from_str::<crate::MixingConfig>("method = \"doge\"\nmuu = 1.0");
        assert!(typo.unwrap_err().to_string().contains("muu"));
    }
}
