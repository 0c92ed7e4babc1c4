//! Online Data Mixing (Albalak et al. 2023, "Efficient Online Data Mixing For
//! Language Model Pre-Training"): a multi-armed bandit over domains whose reward is
//! the training loss a domain's batches had, so domains the model still finds hard
//! are sampled more.
//!
//! With `t` the 1-based optimizer step and `K` domains:
//! - exploration `eps_t = min(1/K, sqrt(ln K / (K t)))`;
//! - `variant = "paper"` (Algorithm 1): policy
//!   `pi_t = (1 - K eps_t) softmax(eps_{t-1} R) + eps_t` (Gibbs distribution over the
//!   reward estimates, `eps_0 = 1/K`); after the step, each domain `i` that had
//!   sequences gets `R_i <- alpha R_i + (1 - alpha) L_i / pi_t(i)` (loss importance
//!   weighted by the probability it was drawn with);
//! - `variant = "official"` (the authors' GPT-NeoX code, `SmoothedMeanWeightUpdater`,
//!   which produced the paper's results): `R_i <- alpha R_i + (1 - alpha) exp(L_i)`
//!   with no importance weight, and a linear normalisation
//!   `pi = (1 - K eps) R / sum(R) + eps`, computed after step `t - 1` with
//!   `eps_{t-1}` (the code updates the weights at the end of each iteration).
//!
//! In both, rewards start at 0 and only domains present in a step are updated; during
//! the first `warmup_steps` steps the policy is frozen at `init` and no reward is
//! recorded (as in the official code, whose `t` still counts those steps).

use crate::config::{check_range, InitWeights};
use crate::proportions::softmax;
use crate::{
    restore_state, Composition, DomainInfo, MixingConfigError, Proportions, Scheduler, StepFeedback,
};
use serde::{Deserialize, Serialize};

/// Which published form of ODM to run (see the module docs for the difference).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OdmVariant {
    /// The paper's Algorithm 1: Gibbs policy, importance-weighted loss reward.
    #[default]
    Paper,
    /// The authors' code: linear policy over an EMA of `exp(loss)`.
    Official,
}

/// How ODM's micro-batches are composed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OdmBatches {
    /// Each sequence's domain drawn from the policy.
    #[default]
    Mixed,
    /// One domain per micro-batch, drawn from the policy (the official code's
    /// "mixed minibatches": each micro-batch single-domain, several per step).
    Single,
}

/// `method = "odm"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OdmConfig {
    #[serde(default)]
    pub variant: OdmVariant,
    /// Reward smoothing: `R <- alpha R + (1 - alpha) reward`, in `[0, 1)`. The
    /// official code defaults to 0.9; the paper's 1B runs use 0.5.
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    /// Steps at the start with the policy frozen at `init` (official runs: 2000).
    #[serde(default)]
    pub warmup_steps: u64,
    /// The policy during warmup.
    #[serde(default)]
    pub init: InitWeights,
    #[serde(default)]
    pub batches: OdmBatches,
}

fn default_alpha() -> f64 {
    0.9
}

impl Default for OdmConfig {
    fn default() -> Self {
        Self {
            variant: OdmVariant::default(),
            alpha: default_alpha(),
            warmup_steps: 0,
            init: InitWeights::default(),
            batches: OdmBatches::default(),
        }
    }
}

impl OdmConfig {
    pub fn validate(&self, domains: &[String]) -> Result<(), MixingConfigError> {
        check_range("alpha", self.alpha, 0.0, 1.0, true, "must be in [0, 1)")?;
        self.init.validate("mixing.init", domains)
    }
}

/// The exploration rate `eps_t = min(1/K, sqrt(ln K / (K t)))`; `eps_0 = 1/K`.
pub fn exploration(k: usize, t: u64) -> f64 {
    let kf = k as f64;
    if t == 0 || k < 2 {
        return 1.0 / kf;
    }
    (1.0 / kf).min((kf.ln() / (kf * t as f64)).sqrt())
}

/// The paper's policy `(1 - K eps_t) softmax(eps_{t-1} R) + eps_t`.
pub fn gibbs_policy(rewards: &[f64], t: u64) -> Vec<f64> {
    let k = rewards.len();
    let (eps, temp) = (exploration(k, t), exploration(k, t.saturating_sub(1)));
    let logits: Vec<f64> = rewards.iter().map(|r| temp * r).collect();
    softmax(&logits)
        .iter()
        .map(|e| (1.0 - k as f64 * eps) * e + eps)
        .collect()
}

/// The official code's policy `(1 - K eps) R / sum(R) + eps` (uniform while no reward
/// has been recorded).
pub fn linear_policy(rewards: &[f64], eps: f64) -> Vec<f64> {
    let k = rewards.len() as f64;
    let sum: f64 = rewards.iter().sum();
    rewards
        .iter()
        .map(|r| {
            let share = if sum > 0.0 { r / sum } else { 1.0 / k };
            (1.0 - k * eps) * share + eps
        })
        .collect()
}

/// The largest reward one step can contribute. A diverged step's loss (or, in the
/// official variant, `exp` of a loss above ~710) would otherwise overflow the rewards
/// to infinity and the policy to NaN; `1e100` (`exp(230)`) is far beyond the reward of
/// any loss a run that is still learning produces.
pub const MAX_REWARD: f64 = 1e100;

/// ODM as a [`Scheduler`].
#[derive(Debug, Clone)]
pub struct OdmScheduler {
    config: OdmConfig,
    init: Proportions,
    state: OdmState,
}

/// What ODM carries between steps (checkpointed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OdmState {
    /// Smoothed reward estimate per domain.
    pub rewards: Vec<f64>,
    /// The policy of the last step handed out, for the importance weights.
    pub last_policy: Option<(u64, Proportions)>,
}

impl OdmScheduler {
    pub fn new(config: &OdmConfig, domains: &DomainInfo) -> Result<Self, MixingConfigError> {
        config.validate(&domains.names)?;
        Ok(Self {
            init: config.init.resolve("mixing.init", domains)?,
            config: config.clone(),
            state: OdmState {
                rewards: vec![0.0; domains.names.len()],
                last_policy: None,
            },
        })
    }

    /// The policy for 0-based step `step` (a function of the state; no side effect).
    pub fn policy(&self, step: u64) -> Proportions {
        if step < self.config.warmup_steps {
            return self.init.clone();
        }
        let t = step + 1;
        let k = self.state.rewards.len();
        let p = match self.config.variant {
            OdmVariant::Paper => gibbs_policy(&self.state.rewards, t),
            OdmVariant::Official => linear_policy(&self.state.rewards, exploration(k, t - 1)),
        };
        Proportions::from_weights(p).expect("an ODM policy is a valid distribution")
    }

    pub fn rewards(&self) -> &[f64] {
        &self.state.rewards
    }
}

impl Scheduler for OdmScheduler {
    fn name(&self) -> &str {
        "odm"
    }

    fn proportions(&mut self, step: u64) -> Proportions {
        let p = self.policy(step);
        self.state.last_policy = Some((step, p.clone()));
        p
    }

    fn composition(&self, _step: u64) -> Option<Composition> {
        Some(match self.config.batches {
            OdmBatches::Mixed => Composition::Sample,
            OdmBatches::Single => Composition::Single,
        })
    }

    fn observe_train(&mut self, step: u64, feedback: &StepFeedback) {
        if step < self.config.warmup_steps {
            return;
        }
        let policy = match &self.state.last_policy {
            Some((s, p)) if *s == step => p.clone(),
            _ => self.policy(step),
        };
        let alpha = self.config.alpha;
        for (i, loss) in feedback.train.0.iter().enumerate() {
            let Some(loss) = loss else { continue };
            let reward = match self.config.variant {
                OdmVariant::Paper => loss / policy.as_slice()[i],
                OdmVariant::Official => loss.exp(),
            };
            let r = &mut self.state.rewards[i];
            *r = alpha * *r + (1.0 - alpha) * reward.min(MAX_REWARD);
        }
    }

    fn state(&self) -> serde_json::Value {
        serde_json::to_value(&self.state).expect("ODM state serialises")
    }

    fn restore(&mut self, state: &serde_json::Value) -> Result<(), String> {
        let k = self.state.rewards.len();
        self.state = restore_state("ODM", state, k, |s: &OdmState| s.rewards.len())?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DomainLosses;

    fn info(k: usize) -> DomainInfo {
        DomainInfo {
            names: (0..k).map(|i| format!("d{i}")).collect(),
            natural_weights: (1..=k).map(|i| i as f64).collect(),
            seed: 0,
        }
    }

    fn close(a: &[f64], b: &[f64], tol: f64) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < tol, "{a:?} vs {b:?}");
        }
    }

    fn feedback(losses: &[Option<f64>]) -> StepFeedback {
        StepFeedback {
            train: DomainLosses(losses.to_vec()),
            sequences: losses.iter().map(|l| usize::from(l.is_some())).collect(),
            reference: None,
            excess: None,
        }
    }

    #[test]
    fn exploration_schedule() {
        // K = 4: eps = 1/K while ln K / (K t) >= 1/K^2, i.e. t <= K ln K = 5.545.
        assert_eq!(exploration(4, 0), 0.25);
        assert_eq!(exploration(4, 1), 0.25);
        assert_eq!(exploration(4, 5), 0.25);
        // sqrt(ln 4 / 24) = 0.2403378...
        assert!((exploration(4, 6) - 0.240_337_8).abs() < 1e-7);
        // sqrt(ln 4 / (4 * 23)) = sqrt(1.3862944 / 92) = 0.1227535...
        assert!((exploration(4, 23) - 0.122_753_5).abs() < 1e-7);
        // sqrt(ln 4 / 400) = 0.0588705...
        assert!((exploration(4, 100) - 0.058_870_5).abs() < 1e-7);
        // K = 2, t = 10: sqrt(ln 2 / 20) = 0.1861649...
        assert!((exploration(2, 10) - 0.186_164_9).abs() < 1e-7);
    }

    #[test]
    fn gibbs_policy_matches_hand_computation() {
        // K = 2, t = 10, R = [1, 3]: eps_10 = 0.1861649, temperature eps_9 =
        // sqrt(ln 2 / 18) = 0.1962350; softmax(0.1962350 * [1, 3]) =
        // [1, e^0.3924700] / (1 + e^0.3924700) = [0.4031233, 0.5968767];
        // pi = (1 - 2 * 0.1861649) * softmax + 0.1861649.
        let p = gibbs_policy(&[1.0, 3.0], 10);
        close(&p, &[0.4391931, 0.5608069], 1e-6);
        // All-equal rewards: uniform whatever t.
        close(&gibbs_policy(&[5.0; 3], 50), &[1.0 / 3.0; 3], 1e-12);
        // Huge rewards do not overflow.
        let p = gibbs_policy(&[1e6, 0.0], 1_000_000);
        assert!(p.iter().all(|x| x.is_finite()) && p[0] > p[1]);
    }

    #[test]
    fn linear_policy_matches_hand_computation() {
        // R = [1, 3], eps = 0.1: (1 - 0.2) * [0.25, 0.75] + 0.1 = [0.3, 0.7].
        close(&linear_policy(&[1.0, 3.0], 0.1), &[0.3, 0.7], 1e-12);
        // No reward yet: uniform.
        close(
            &linear_policy(&[0.0, 0.0, 0.0], 0.1),
            &[1.0 / 3.0; 3],
            1e-12,
        );
    }

    #[test]
    fn paper_rewards_are_importance_weighted_moving_averages() {
        let cfg = OdmConfig {
            alpha: 0.5,
            ..OdmConfig::default()
        };
        let mut s = OdmScheduler::new(&cfg, &info(2)).unwrap();
        // t = 1: eps_1 = 1/2 -> uniform.
        let p0 = s.proportions(0);
        close(p0.as_slice(), &[0.5, 0.5], 1e-12);
        s.observe_train(0, &feedback(&[Some(2.0), Some(1.0)]));
        // R = 0.5 * 0 + 0.5 * L / 0.5 = L.
        close(s.rewards(), &[2.0, 1.0], 1e-12);
        // Only domains present are updated.
        let p1 = s.proportions(1);
        s.observe_train(1, &feedback(&[None, Some(3.0)]));
        let want1 = 0.5 * 1.0 + 0.5 * 3.0 / p1.as_slice()[1];
        close(s.rewards(), &[2.0, want1], 1e-12);
    }

    #[test]
    fn official_rewards_average_exp_loss_and_policy_lags_a_step() {
        let cfg = OdmConfig {
            variant: OdmVariant::Official,
            alpha: 0.5,
            ..OdmConfig::default()
        };
        let mut s = OdmScheduler::new(&cfg, &info(4)).unwrap();
        s.proportions(0);
        s.observe_train(0, &feedback(&[Some(1.0), Some(2.0), None, Some(0.0)]));
        let e = std::f64::consts::E;
        close(s.rewards(), &[0.5 * e, 0.5 * e * e, 0.0, 0.5], 1e-12);
        // Step 30 (t = 31) uses eps_30 = sqrt(ln 4 / 120) = 0.1074823.
        let eps = (4f64.ln() / 120.0).sqrt();
        let sum = 0.5 * e + 0.5 * e * e + 0.5;
        let want: Vec<f64> = s
            .rewards()
            .iter()
            .map(|r| (1.0 - 4.0 * eps) * r / sum + eps)
            .collect();
        close(s.policy(30).as_slice(), &want, 1e-12);
        // Hand value of the first entry: 0.5700706 * 1.3591409 / 5.5536437 + 0.1074823.
        assert!((s.policy(30).as_slice()[0] - 0.246_995).abs() < 1e-5);
    }

    #[test]
    fn warmup_freezes_the_policy_at_init_and_records_nothing() {
        let cfg = OdmConfig {
            warmup_steps: 3,
            init: InitWeights::Natural,
            ..OdmConfig::default()
        };
        let mut s = OdmScheduler::new(&cfg, &info(3)).unwrap();
        for step in 0..3 {
            close(
                s.proportions(step).as_slice(),
                &[1.0 / 6.0, 2.0 / 6.0, 3.0 / 6.0],
                1e-12,
            );
            s.observe_train(step, &feedback(&[Some(5.0); 3]));
        }
        assert_eq!(s.rewards(), &[0.0; 3]);
        // After warmup: t = 4 <= K ln K / ... -> eps = 1/3 -> uniform, then learning.
        close(s.proportions(3).as_slice(), &[1.0 / 3.0; 3], 1e-12);
        s.observe_train(3, &feedback(&[Some(5.0); 3]));
        assert!(s.rewards().iter().all(|&r| r > 0.0));
    }

    /// The behaviour the paper predicts: probability moves to the domain whose loss
    /// stays highest, in both variants.
    ///
    /// The paper's form moves much less: its smoothed reward stays bounded while the
    /// Gibbs temperature `eps_{t-1}` shrinks like `1/sqrt(t)`, so the policy drifts back
    /// towards uniform (about 0.35 vs 0.33 here after 2000 steps); the official
    /// linear policy over `exp(loss)` concentrates (about 0.78).
    #[test]
    fn probability_moves_to_the_domain_whose_loss_stays_high() {
        for (variant, margin) in [(OdmVariant::Paper, 0.015), (OdmVariant::Official, 0.4)] {
            let cfg = OdmConfig {
                variant,
                ..OdmConfig::default()
            };
            let mut s = OdmScheduler::new(&cfg, &info(3)).unwrap();
            let mut p = s.proportions(0);
            for step in 0..2000u64 {
                p = s.proportions(step);
                // Domains 0 and 1 are learned (loss decays to 1.0); 2 stays at 3.0.
                let decay = 1.0 + 2.0 * (-(step as f64) / 200.0).exp();
                s.observe_train(step, &feedback(&[Some(decay), Some(decay), Some(3.0)]));
            }
            let p = p.as_slice();
            assert!(p[2] > p[0].max(p[1]) + margin, "{variant:?}: {p:?}");
            assert!(
                (p[0] - p[1]).abs() < 1e-12,
                "equal feedback, equal share: {p:?}"
            );
        }
    }

    #[test]
    fn state_round_trips_and_rejects_other_domain_counts() {
        let mut s = OdmScheduler::new(&OdmConfig::default(), &info(3)).unwrap();
        s.proportions(0);
        s.observe_train(0, &feedback(&[Some(1.0), Some(2.0), Some(3.0)]));
        let saved = s.state();
        let mut t = OdmScheduler::new(&OdmConfig::default(), &info(3)).unwrap();
        t.restore(&saved).unwrap();
        assert_eq!(t.policy(7), s.policy(7));
        let mut u = OdmScheduler::new(&OdmConfig::default(), &info(2)).unwrap();
        assert!(u.restore(&saved).unwrap_err().contains("3 domains"));
    }

    #[test]
    fn config_from_toml_with_checked_ranges() {
        let c: crate::MixingConfig = toml::from_str(
            "method = \"odm\"\nvariant = \"official\"\nalpha = 0.5\nwarmup_steps = 2000\n\
             batches = \"single\"\ninit = { d0 = 1.0, d1 = 3.0 }",
        )
        .unwrap();
        let crate::MixingConfig::Odm(o) = &c else {
            panic!("{c:?}")
        };
        assert_eq!(o.variant, OdmVariant::Official);
        assert_eq!(o.batches, OdmBatches::Single);
        c.validate(&info(2).names).unwrap();
        let mut s = crate::build_scheduler(&c, &info(2)).unwrap();
        close(s.proportions(0).as_slice(), &[0.25, 0.75], 1e-12);
        assert_eq!(s.composition(0), Some(Composition::Single));

        let bad: crate::MixingConfig = toml::from_str("method = \"odm\"\nalpha = 1.0").unwrap();
        assert_eq!(
            bad.validate(&info(2).names).unwrap_err().to_string(),
            "mixing.alpha = 1: must be in [0, 1)"
        );
        let e = toml::from_str::<crate::MixingConfig>("method = \"odm\"\ninit = \"natrual\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("natrual") && e.contains("\"natural\""), "{e}");
        let bad: crate::MixingConfig =
            toml::from_str("method = \"odm\"\ninit = { d0 = 1.0, dx = 1.0 }").unwrap();
        assert!(bad
            .validate(&info(2).names)
            .unwrap_err()
            .to_string()
            .starts_with("mixing.init names domain `dx`"));
    }
}
