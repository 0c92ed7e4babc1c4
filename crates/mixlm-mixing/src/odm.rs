//! Online Data Mixing (Albalak et al. 2023, "Efficient Online Data Mixing For
//! Language Model Pre-Training"): a multi-armed bandit over domains whose reward is
//! the training loss a domain's batches had, so domains the model still finds hard
//! are sampled more. Three forms, chosen by `variant`:
//!
//! - **`"paper"`** (default): the paper's Algorithm 1. With `t` the 1-based step,
//!   `K` domains and `eps_t = min(1/K, sqrt(ln K / (K t)))` (`eps_0 = 1/K`), step `t`
//!   draws with `pi_t = (1 - K eps_t) softmax(eps_{t-1} R) + eps_t`. Each of the `G`
//!   micro-batches of the step is one domain drawn from `pi_t` (`batches = "single"`);
//!   `L_Di` sums domain `i`'s micro-batch losses (0 for a domain not drawn) and then
//!   every domain gets `R_i <- alpha R_i + (1 - alpha) L_Di / pi_t(i)` (lines 5-11).
//!   The importance weight makes `L_Di / pi_t(i)` an unbiased estimate of `G` times
//!   the domain's loss, whatever `pi_t` is. With mixed batches (`batches = "mixed"`,
//!   each sequence's domain drawn from `pi_t`), mixlm uses the Horvitz-Thompson
//!   estimator with the same expectation: `L_Di = (sum of domain i's sequence
//!   losses) / b` over the step, with `b` the sequences per micro-batch, so
//!   `E[L_Di / pi_t(i)] = G * loss_i` in both modes (tested by simulation). For
//!   single-domain micro-batches this is exactly Algorithm 1's sum.
//!   Warm-up: the paper's 1% of the steps by default, with the policy at `init` and
//!   no reward recorded; `t` counts the warm-up steps.
//! - **`"official"`**: the authors' GPT-NeoX code (alon-albalak/online-data-mixing,
//!   `megatron/data/data_sampling_utils.py`, `SmoothedMeanWeightUpdater.group_update`,
//!   called by `train_mixed_minibatch` in `megatron/training.py`, as in the
//!   repository's `scripts/train_1B_ema*.sh`). After step `s` (its `iteration = s +
//!   1`), each domain present gets `R_i <- alpha R_i + (1 - alpha) exp(mean loss)`
//!   (no importance weight), and the next policy is linear:
//!   `(1 - K eps) R / sum(R) + eps` with `eps = eps_{s+1}`. The code's first update
//!   comes after step `warmup_steps` (`iteration > warmup_steps`), so steps
//!   `0..=warmup_steps` are drawn from `init`. During the warm-up the code trains
//!   on mixed batches and afterwards on single-domain micro-batches; mixlm does the
//!   same with `batches = "single"`.
//! - **`"exp3"`**: the same repository's `Exp3WeightUpdater`, which its shipped 1B
//!   script (`scripts/train_1B_exp3.sh`) runs. It differs from the paper's text in
//!   three ways: the reward is cumulative (`R_i <- R_i + (loss/10) / pi(i)`, no
//!   smoothing), scaled by 1/10 "so that cumulative reward doesn't explode", and the
//!   exploration rate is indexed by the update (the step), with the temperature the
//!   previous update's rate: `pi = (1 - K eps_{s+1}) softmax(eps_prev R) + eps_{s+1}`,
//!   where `eps_prev` is `1/K` at the first update. Updates start as in `official`.
//!   That script draws one domain per optimizer step; mixlm's `batches = "single"`
//!   draws one per micro-batch, which is the same with `grad_accum = 1` on one
//!   device and otherwise the repository's `train_1B_exp3_mixed_minibatches.sh`
//!   (`group_update` with each domain's mean micro-batch loss).
//!
//! Differences from the official code, both variants: losses are mixlm's per-domain
//! token means; domains whose loss is not finite count as absent; a reward is capped
//! at [`MAX_REWARD`]; the softmax is computed shifted by its maximum (the code's
//! plain `exp` overflows for large rewards; the results agree to rounding). The
//! golden trajectories in `tests/golden/` replay recorded losses through the
//! authors' updaters and through these schedulers.

use crate::config::{check_range, InitWeights};
use crate::proportions::softmax;
use crate::{
    restore_state, Composition, DomainInfo, MixingConfigError, Proportions, Scheduler, StepFeedback,
};
use serde::{Deserialize, Serialize};

/// Which published form of ODM to run (see the module docs for the differences).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OdmVariant {
    /// The paper's Algorithm 1: Gibbs policy, EMA of importance-weighted summed losses.
    #[default]
    Paper,
    /// The authors' code, `SmoothedMeanWeightUpdater`: linear policy over an EMA of
    /// `exp(loss)`.
    Official,
    /// The authors' code, `Exp3WeightUpdater`: Gibbs policy over the cumulative
    /// importance-weighted loss / 10.
    Exp3,
}

/// How ODM's micro-batches are composed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OdmBatches {
    /// Each sequence's domain drawn from the policy.
    Mixed,
    /// One domain per micro-batch, drawn from the policy (Algorithm 1; the official
    /// code's "mixed minibatches").
    #[default]
    Single,
}

/// `method = "odm"`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OdmConfig {
    #[serde(default)]
    pub variant: OdmVariant,
    /// Reward smoothing `R <- alpha R + (1 - alpha) reward`, in `[0, 1)`, for `paper`
    /// and `official`; default 0.9, the official code's `data_sampling_smoothing_factor`
    /// (its `scripts/train_1B_ema_0.5smoothing.sh` uses 0.5). `exp3` has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alpha: Option<f64>,
    /// Steps at the start with the policy at `init` and no reward recorded. Default:
    /// 1% of `run.steps` for `paper` (the paper's warm-up), 0 for `official` and
    /// `exp3` (the code's default; its scripts use 2000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warmup_steps: Option<u64>,
    /// The policy during warmup.
    #[serde(default)]
    pub init: InitWeights,
    #[serde(default)]
    pub batches: OdmBatches,
}

/// The official code's default `data_sampling_smoothing_factor`.
const DEFAULT_ALPHA: f64 = 0.9;

impl OdmConfig {
    pub fn validate(&self, domains: &[String]) -> Result<(), MixingConfigError> {
        match (self.variant, self.alpha) {
            (OdmVariant::Exp3, Some(_)) => {
                return Err(MixingConfigError::Invalid {
                    field: "alpha",
                    message: "does not apply to variant = \"exp3\" (its reward is cumulative, \
                              not smoothed): remove it, or use variant = \"paper\" or \
                              \"official\""
                        .into(),
                })
            }
            (_, Some(alpha)) => check_range("alpha", alpha, 0.0, 1.0, true, "must be in [0, 1)")?,
            _ => {}
        }
        self.init.validate("mixing.init", domains)
    }

    /// The smoothing factor in use (`paper`, `official`).
    pub fn alpha(&self) -> f64 {
        self.alpha.unwrap_or(DEFAULT_ALPHA)
    }

    /// The warm-up in steps for a run of `steps` steps.
    pub fn warmup(&self, steps: u64) -> u64 {
        match (self.warmup_steps, self.variant) {
            (Some(w), _) => w,
            (None, OdmVariant::Paper) => (steps as f64 * 0.01).round() as u64,
            (None, _) => 0,
        }
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

/// `(1 - K eps) softmax(temperature R) + eps`: the Gibbs policy of the paper (with
/// `eps_t`, `eps_{t-1}`) and of the official `Exp3WeightUpdater`.
pub fn gibbs(rewards: &[f64], eps: f64, temperature: f64) -> Vec<f64> {
    let k = rewards.len() as f64;
    let logits: Vec<f64> = rewards.iter().map(|r| temperature * r).collect();
    softmax(&logits)
        .iter()
        .map(|e| (1.0 - k * eps) * e + eps)
        .collect()
}

/// The paper's policy for 1-based step `t`: `(1 - K eps_t) softmax(eps_{t-1} R) + eps_t`.
pub fn gibbs_policy(rewards: &[f64], t: u64) -> Vec<f64> {
    let k = rewards.len();
    gibbs(
        rewards,
        exploration(k, t),
        exploration(k, t.saturating_sub(1)),
    )
}

/// The official code's linear policy, in its own order of operations:
/// `w_i = R_i prev_eps (1 - K eps) / sum_j(R_j prev_eps) + eps`, normalised (the
/// `prev_eps` cancels but is kept so the rounding is the code's). Uniform while no
/// reward has been recorded.
pub fn linear_policy(rewards: &[f64], eps: f64, prev_eps: f64) -> Vec<f64> {
    let k = rewards.len() as f64;
    let total: f64 = rewards.iter().map(|r| r * prev_eps).sum();
    if total <= 0.0 {
        return vec![1.0 / k; rewards.len()];
    }
    let scaling = (1.0 - k * eps) / total;
    let w: Vec<f64> = rewards
        .iter()
        .map(|r| r * prev_eps * scaling + eps)
        .collect();
    let sum: f64 = w.iter().sum();
    w.iter().map(|x| x / sum).collect()
}

/// Algorithm 1's reward estimate for each domain from one step's feedback: the
/// step's summed micro-batch losses of the domain, `L_Di`, over the probability it
/// was drawn with. `L_Di = mean_i n_i / b` with `n_i` the domain's sequences and
/// `b = S / G` the sequences per micro-batch: the sum of the domain's micro-batch
/// means with single-domain micro-batches, the Horvitz-Thompson estimate of it with
/// mixed ones. 0 for a domain absent from the step; `None` for one that had
/// sequences but no finite loss (its reward is left as it was).
pub fn importance_weighted_loss(feedback: &StepFeedback, policy: &[f64]) -> Vec<Option<f64>> {
    let total: usize = feedback.sequences.iter().sum();
    let per_micro_batch = total as f64 / feedback.micro_batches.max(1) as f64;
    (0..policy.len())
        .map(|i| {
            let n = feedback.sequences.get(i).copied().unwrap_or(0);
            match feedback.train.0.get(i).copied().flatten() {
                _ if n == 0 => Some(0.0),
                Some(mean) => Some(mean * n as f64 / per_micro_batch / policy[i]),
                None => None,
            }
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
    /// The warm-up in steps, resolved against the run's length.
    warmup: u64,
    init: Proportions,
    state: OdmState,
}

/// What ODM carries between steps (checkpointed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OdmState {
    /// Reward estimate per domain: smoothed (`paper`, `official`) or cumulative (`exp3`).
    pub rewards: Vec<f64>,
    /// The policy of the last step handed out, for the importance weights.
    pub last_policy: Option<(u64, Proportions)>,
    /// `official`, `exp3`: the weights the updater computed at its last update, which
    /// the following steps draw with (`None`: no update yet, `init`), and its
    /// exploration rate then (the next update's `prev_eps`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated: Option<Updated>,
}

/// The official updaters' weights after an update, and the `eps` they were made with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Updated {
    pub policy: Vec<f64>,
    pub eps: f64,
}

impl OdmScheduler {
    pub fn new(config: &OdmConfig, domains: &DomainInfo) -> Result<Self, MixingConfigError> {
        config.validate(&domains.names)?;
        Ok(Self {
            init: config.init.resolve("mixing.init", domains)?,
            warmup: config.warmup(domains.steps),
            config: config.clone(),
            state: OdmState {
                rewards: vec![0.0; domains.names.len()],
                last_policy: None,
                updated: None,
            },
        })
    }

    /// The policy for 0-based step `step` (a function of the state; no side effect).
    pub fn policy(&self, step: u64) -> Proportions {
        let p = match self.config.variant {
            _ if step < self.warmup => return self.init.clone(),
            OdmVariant::Paper => gibbs_policy(&self.state.rewards, step + 1),
            OdmVariant::Official | OdmVariant::Exp3 => match &self.state.updated {
                Some(u) => u.policy.clone(),
                None => return self.init.clone(),
            },
        };
        Proportions::from_weights(p).expect("an ODM policy is a valid distribution")
    }

    pub fn rewards(&self) -> &[f64] {
        &self.state.rewards
    }

    /// The warm-up in steps this run uses.
    pub fn warmup_steps(&self) -> u64 {
        self.warmup
    }

    /// The official updaters' `update`/`group_update` after 0-based step `step`.
    fn official_update(&mut self, step: u64, feedback: &StepFeedback, policy: &Proportions) {
        let k = self.state.rewards.len();
        let prev_eps = self
            .state
            .updated
            .as_ref()
            .map_or(1.0 / k as f64, |u| u.eps);
        let eps = exploration(k, step + 1);
        let alpha = self.config.alpha();
        for (i, loss) in feedback.train.0.iter().enumerate() {
            let Some(loss) = loss else { continue };
            let r = &mut self.state.rewards[i];
            *r = match self.config.variant {
                OdmVariant::Exp3 => *r + (loss / 10.0 / policy.as_slice()[i]).min(MAX_REWARD),
                _ => alpha * *r + (1.0 - alpha) * loss.exp().min(MAX_REWARD),
            };
        }
        let rewards = &self.state.rewards;
        let weights = match self.config.variant {
            OdmVariant::Exp3 => {
                let w = gibbs(rewards, eps, prev_eps);
                let sum: f64 = w.iter().sum();
                w.iter().map(|x| x / sum).collect()
            }
            _ => linear_policy(rewards, eps, prev_eps),
        };
        self.state.updated = Some(Updated {
            policy: weights,
            eps,
        });
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

    fn composition(&self, step: u64) -> Option<Composition> {
        Some(match self.config.batches {
            OdmBatches::Mixed => Composition::Sample,
            // The official code warms up on mixed batches (`train_mixed_minibatch`).
            OdmBatches::Single
                if self.config.variant == OdmVariant::Official && step < self.warmup =>
            {
                Composition::Sample
            }
            OdmBatches::Single => Composition::Single,
        })
    }

    fn observe_train(&mut self, step: u64, feedback: &StepFeedback) {
        if step < self.warmup {
            return;
        }
        let policy = match &self.state.last_policy {
            Some((s, p)) if *s == step => p.clone(),
            _ => self.policy(step),
        };
        if self.config.variant != OdmVariant::Paper {
            return self.official_update(step, feedback, &policy);
        }
        let alpha = self.config.alpha();
        let rewards = importance_weighted_loss(feedback, policy.as_slice());
        for (r, reward) in self.state.rewards.iter_mut().zip(rewards) {
            if let Some(reward) = reward {
                *r = alpha * *r + (1.0 - alpha) * reward.min(MAX_REWARD);
            }
        }
    }

    /// The reward estimate of each domain (`R_i` above).
    fn watch(&self) -> Vec<(String, Vec<f64>)> {
        vec![("reward".into(), self.state.rewards.clone())]
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
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn info(k: usize) -> DomainInfo {
        DomainInfo {
            names: (0..k).map(|i| format!("d{i}")).collect(),
            natural_weights: (1..=k).map(|i| i as f64).collect(),
            seed: 0,
            steps: 1000,
        }
    }

    fn close(a: &[f64], b: &[f64], tol: f64) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < tol, "{a:?} vs {b:?}");
        }
    }

    /// One sequence per domain present, in one micro-batch.
    fn feedback(losses: &[Option<f64>]) -> StepFeedback {
        StepFeedback {
            train: DomainLosses(losses.to_vec()),
            sequences: losses.iter().map(|l| usize::from(l.is_some())).collect(),
            micro_batches: 1,
            reference: None,
            excess: None,
        }
    }

    fn config(variant: OdmVariant, alpha: Option<f64>, warmup: u64) -> OdmConfig {
        OdmConfig {
            variant,
            alpha,
            warmup_steps: Some(warmup),
            ..OdmConfig::default()
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
        // R = [1, 3], eps = 0.1: (1 - 0.2) * [0.25, 0.75] + 0.1 = [0.3, 0.7], whatever
        // prev_eps.
        close(&linear_policy(&[1.0, 3.0], 0.1, 0.3), &[0.3, 0.7], 1e-12);
        close(&linear_policy(&[1.0, 3.0], 0.1, 0.05), &[0.3, 0.7], 1e-12);
        // No reward yet: uniform.
        close(
            &linear_policy(&[0.0, 0.0, 0.0], 0.1, 0.1),
            &[1.0 / 3.0; 3],
            1e-12,
        );
    }

    /// Algorithm 1 by hand: summed micro-batch losses over the probability drawn with,
    /// every domain updated (0 for one not drawn).
    #[test]
    fn paper_rewards_sum_micro_batch_losses_over_the_policy() {
        let mut s = OdmScheduler::new(&config(OdmVariant::Paper, Some(0.5), 0), &info(2)).unwrap();
        // t = 1: eps_1 = 1/2 -> uniform.
        close(s.proportions(0).as_slice(), &[0.5, 0.5], 1e-12);
        // G = 2 micro-batches of b = 4 sequences, both drawn from d0 (mean loss 2):
        // L_D0 = 2 + 2 = 4, reward 4 / 0.5 = 8, R0 = 0.5 * 8 = 4; d1 not drawn: R1 = 0.
        let step0 = StepFeedback {
            train: DomainLosses(vec![Some(2.0), None]),
            sequences: vec![8, 0],
            micro_batches: 2,
            reference: None,
            excess: None,
        };
        s.observe_train(0, &step0);
        close(s.rewards(), &[4.0, 0.0], 1e-12);
        // One micro-batch each (losses 1 and 3): L_D0 = 1, L_D1 = 3.
        let p1 = s.proportions(1);
        let step1 = StepFeedback {
            train: DomainLosses(vec![Some(1.0), Some(3.0)]),
            sequences: vec![4, 4],
            ..step0
        };
        s.observe_train(1, &step1);
        let p1 = p1.as_slice();
        let want = [0.5 * 4.0 + 0.5 / p1[0], 0.5 * 3.0 / p1[1]];
        close(s.rewards(), &want, 1e-12);
        // The domain that has no reward yet decays; a domain with sequences but no
        // finite loss keeps its reward.
        let before = s.rewards().to_vec();
        s.proportions(2);
        s.observe_train(
            2,
            &StepFeedback {
                train: DomainLosses(vec![None, None]),
                sequences: vec![4, 4],
                ..step1
            },
        );
        close(s.rewards(), &before, 1e-12);
    }

    /// The draws of one step: `(domain of each sequence, micro-batch count)`.
    fn draw_step(
        rng: &mut ChaCha8Rng,
        pi: &[f64],
        mode: OdmBatches,
        micro_batches: usize,
        per_micro_batch: usize,
    ) -> Vec<usize> {
        let mut draw = || {
            let u: f64 = rng.random();
            let mut acc = 0.0;
            for (i, p) in pi.iter().enumerate() {
                acc += p;
                if u < acc {
                    return i;
                }
            }
            pi.len() - 1
        };
        let mut counts = vec![0; pi.len()];
        for _ in 0..micro_batches {
            match mode {
                OdmBatches::Single => counts[draw()] += per_micro_batch,
                OdmBatches::Mixed => (0..per_micro_batch).for_each(|_| counts[draw()] += 1),
            }
        }
        counts
    }

    fn step_feedback(true_loss: &[f64], counts: Vec<usize>, micro_batches: usize) -> StepFeedback {
        StepFeedback {
            train: DomainLosses(
                counts
                    .iter()
                    .zip(true_loss)
                    .map(|(&n, &l)| (n > 0).then_some(l))
                    .collect(),
            ),
            sequences: counts,
            micro_batches,
            reference: None,
            excess: None,
        }
    }

    /// With fixed true losses `l`, Algorithm 1's reward `L_Di / pi(i)` averages to
    /// `G l_i` whatever the policy (each of the `G` micro-batches is domain `i` with
    /// probability `pi(i)` and then adds `l_i`). mixlm's estimate must average to the
    /// same in both batch modes. The old estimate (the domain's mean loss over `pi`,
    /// for the domains present) does not: it grows as `1/pi` in mixed batches.
    #[test]
    fn reward_estimate_averages_to_algorithm_1s_in_both_batch_modes() {
        let true_loss = [1.0, 2.0, 4.0];
        let pi = [0.6, 0.3, 0.1];
        let (g, b, n) = (4, 2, 200_000);
        let expected: Vec<f64> = true_loss.iter().map(|l| g as f64 * l).collect();
        for mode in [OdmBatches::Single, OdmBatches::Mixed] {
            let mut rng = ChaCha8Rng::seed_from_u64(7);
            let mut sum = [0.0; 3];
            let mut old = [0.0; 3];
            for _ in 0..n {
                let fb = step_feedback(&true_loss, draw_step(&mut rng, &pi, mode, g, b), g);
                for (i, r) in importance_weighted_loss(&fb, &pi).iter().enumerate() {
                    sum[i] += r.unwrap() / n as f64;
                    old[i] += fb.train.0[i].map_or(0.0, |l| l / pi[i]) / n as f64;
                }
            }
            for i in 0..3 {
                let rel = (sum[i] - expected[i]).abs() / expected[i];
                assert!(rel < 0.02, "{mode:?}: {sum:?} vs {expected:?}");
            }
            if mode == OdmBatches::Mixed {
                // E[old] = P(present) l / pi: [1.0 x 1/0.6, ..., (1 - 0.9^8) 4 / 0.1].
                let ratio = old[2] / old[0];
                assert!(
                    ratio > 10.0,
                    "the 1/pi estimate favours rare domains: {old:?}"
                );
            }
        }
    }

    /// The same through the scheduler, whose policy follows the rewards: the rewards'
    /// average over a run equals `G l` in both modes, so the policy ranks domains by
    /// their loss and not by how rarely they are drawn.
    #[test]
    fn simulated_paper_rewards_average_to_g_times_the_loss() {
        let true_loss = [1.0, 2.0, 4.0];
        let (g, b, steps) = (4, 2, 40_000u64);
        for mode in [OdmBatches::Single, OdmBatches::Mixed] {
            let cfg = OdmConfig {
                batches: mode,
                ..config(OdmVariant::Paper, Some(0.9), 0)
            };
            let mut s = OdmScheduler::new(&cfg, &info(3)).unwrap();
            let mut rng = ChaCha8Rng::seed_from_u64(11);
            let mut mean = [0.0; 3];
            let mut p = s.proportions(0);
            for step in 0..steps {
                p = s.proportions(step);
                let counts = draw_step(&mut rng, p.as_slice(), mode, g, b);
                s.observe_train(step, &step_feedback(&true_loss, counts, g));
                if step >= steps / 2 {
                    for (m, r) in mean.iter_mut().zip(s.rewards()) {
                        *m += r / (steps / 2) as f64;
                    }
                }
            }
            for i in 0..3 {
                let want = g as f64 * true_loss[i];
                assert!(
                    (mean[i] - want).abs() / want < 0.05,
                    "{mode:?}: mean rewards {mean:?}"
                );
            }
            let p = p.as_slice();
            assert!(p[2] > p[1] && p[1] > p[0], "{mode:?}: {p:?}");
        }
    }

    #[test]
    fn paper_warms_up_for_one_percent_of_the_run_by_default() {
        let cfg = OdmConfig {
            init: InitWeights::Natural,
            ..OdmConfig::default()
        };
        let s = OdmScheduler::new(&cfg, &info(3)).unwrap();
        assert_eq!(s.warmup_steps(), 10, "1% of 1000 steps");
        let official = OdmConfig {
            variant: OdmVariant::Official,
            ..OdmConfig::default()
        };
        assert_eq!(
            OdmScheduler::new(&official, &info(3))
                .unwrap()
                .warmup_steps(),
            0
        );
        assert_eq!(cfg.alpha(), 0.9);
        assert_eq!(s.composition(0), Some(Composition::Single));
    }

    /// The official `SmoothedMeanWeightUpdater.group_update` by hand, with its
    /// schedule: the first update comes after step `warmup_steps`, so steps
    /// `0..=warmup_steps` draw from `init`.
    #[test]
    fn official_draws_init_through_step_warmup_then_a_linear_policy() {
        let cfg = OdmConfig {
            init: InitWeights::Natural,
            ..config(OdmVariant::Official, Some(0.9), 10)
        };
        let mut s = OdmScheduler::new(&cfg, &info(3)).unwrap();
        let natural = [1.0 / 6.0, 2.0 / 6.0, 3.0 / 6.0];
        for step in 0..=10 {
            close(s.proportions(step).as_slice(), &natural, 1e-15);
            let want = if step < 10 {
                Composition::Sample
            } else {
                Composition::Single
            };
            assert_eq!(s.composition(step), Some(want), "step {step}");
            s.observe_train(step, &feedback(&[Some(1.0), Some(2.0), None]));
        }
        // Only step 10 (iteration 11) was recorded: R = 0.1 [e, e^2, 0].
        let e = std::f64::consts::E;
        close(s.rewards(), &[0.1 * e, 0.1 * e * e, 0.0], 1e-12);
        // eps_11 = sqrt(ln 3 / 33) = 0.1824590; R / sum R = [0.2689414, 0.7310586, 0];
        // pi = (1 - 3 eps) R / sum R + eps = [0.3041881, 0.5133529, 0.1824590].
        close(
            s.proportions(11).as_slice(),
            &[0.304_188_1, 0.513_352_9, 0.182_459_0],
            1e-6,
        );
    }

    #[test]
    fn official_without_warmup_starts_from_init() {
        let cfg = OdmConfig {
            init: InitWeights::Natural,
            ..config(OdmVariant::Official, None, 0)
        };
        let mut s = OdmScheduler::new(&cfg, &info(2)).unwrap();
        close(s.proportions(0).as_slice(), &[1.0 / 3.0, 2.0 / 3.0], 1e-15);
        s.observe_train(0, &feedback(&[Some(1.0), None]));
        // eps_1 = 1/2 for K = 2: uniform after the first update.
        close(s.proportions(1).as_slice(), &[0.5, 0.5], 1e-12);
    }

    /// `Exp3WeightUpdater.update` by hand: cumulative reward / 10 over the drawn
    /// probability, Gibbs weights with the previous update's exploration rate.
    #[test]
    fn exp3_matches_hand_computation() {
        let mut s = OdmScheduler::new(&config(OdmVariant::Exp3, None, 0), &info(2)).unwrap();
        close(s.proportions(0).as_slice(), &[0.5, 0.5], 1e-15);
        s.observe_train(0, &feedback(&[Some(2.0), None]));
        // R0 = (2 / 10) / 0.5 = 0.4; eps = eps_1 = 1/2 -> uniform.
        close(s.rewards(), &[0.4, 0.0], 1e-15);
        close(s.proportions(1).as_slice(), &[0.5, 0.5], 1e-12);
        s.observe_train(1, &feedback(&[None, Some(3.0)]));
        // R1 = 0.3 / 0.5 = 0.6; prev_eps = 1/2, eps_2 = sqrt(ln 2 / 4) = 0.4162773;
        // softmax(0.5 [0.4, 0.6]) = [0.4750208, 0.5249792];
        // pi = (1 - 2 eps) softmax + eps = [0.4958174, 0.5041826].
        close(s.rewards(), &[0.4, 0.6], 1e-15);
        close(
            s.proportions(2).as_slice(),
            &[0.495_817_4, 0.504_182_6],
            1e-6,
        );
        // The reward keeps accumulating (no smoothing).
        s.observe_train(2, &feedback(&[Some(1.0), None]));
        let p2 = 0.495_817_4;
        assert!((s.rewards()[0] - (0.4 + 0.1 / p2)).abs() < 1e-6);
    }

    #[test]
    fn warmup_freezes_the_policy_at_init_and_records_nothing() {
        let cfg = OdmConfig {
            init: InitWeights::Natural,
            ..config(OdmVariant::Paper, None, 3)
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
        // After warmup: t = 4 <= K ln K -> eps = 1/3 -> uniform, then learning.
        close(s.proportions(3).as_slice(), &[1.0 / 3.0; 3], 1e-12);
        s.observe_train(3, &feedback(&[Some(5.0); 3]));
        assert!(s.rewards().iter().all(|&r| r > 0.0));
    }

    /// Probability moves to the domain whose loss stays highest, in every variant.
    ///
    /// The paper's form moves least: its smoothed reward stays bounded (about the
    /// loss) while the Gibbs temperature `eps_{t-1}` shrinks like `1/sqrt(t)`; the
    /// official linear policy over `exp(loss)` concentrates (about 0.78 here), and so
    /// does Exp3 (about 0.59), whose cumulative reward grows faster than its
    /// temperature shrinks.
    #[test]
    fn probability_moves_to_the_domain_whose_loss_stays_high() {
        for (variant, alpha, margin) in [
            (OdmVariant::Paper, Some(0.9), 0.005),
            (OdmVariant::Official, Some(0.9), 0.4),
            (OdmVariant::Exp3, None, 0.3),
        ] {
            let mut s = OdmScheduler::new(&config(variant, alpha, 0), &info(3)).unwrap();
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
        for variant in [OdmVariant::Paper, OdmVariant::Official, OdmVariant::Exp3] {
            let alpha = (variant != OdmVariant::Exp3).then_some(0.9);
            let cfg = config(variant, alpha, 0);
            let mut s = OdmScheduler::new(&cfg, &info(3)).unwrap();
            s.proportions(0);
            s.observe_train(0, &feedback(&[Some(1.0), Some(2.0), Some(3.0)]));
            let saved = s.state();
            let mut t = OdmScheduler::new(&cfg, &info(3)).unwrap();
            t.restore(&saved).unwrap();
            assert_eq!(t.policy(7), s.policy(7), "{variant:?}");
            let mut u = OdmScheduler::new(&cfg, &info(2)).unwrap();
            assert!(u.restore(&saved).unwrap_err().contains("3 domains"));
        }
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
        assert_eq!((o.alpha(), o.warmup(10)), (0.5, 2000));
        c.validate(&info(2).names).unwrap();
        let mut s = crate::build_scheduler(&c, &info(2)).unwrap();
        close(s.proportions(0).as_slice(), &[0.25, 0.75], 1e-12);
        assert_eq!(s.composition(0), Some(Composition::Sample), "warm-up");
        assert_eq!(s.composition(2000), Some(Composition::Single));

        let exp3: crate::MixingConfig =
            toml::from_str("method = \"odm\"\nvariant = \"exp3\"").unwrap();
        exp3.validate(&info(2).names).unwrap();
        let bad: crate::MixingConfig =
            toml::from_str("method = \"odm\"\nvariant = \"exp3\"\nalpha = 0.5").unwrap();
        let e = bad.validate(&info(2).names).unwrap_err().to_string();
        assert!(
            e.starts_with("mixing.alpha does not apply to variant = \"exp3\""),
            "{e}"
        );

        let bad: crate::MixingConfig = toml::from_str("method = \"odm\"\nalpha = 1.0").unwrap();
        assert_eq!(
            bad.validate(&info(2).names).unwrap_err().to_string(),
            "mixing.alpha = 1: must be in [0, 1)"
        );
        let e = toml::from_str::<crate::MixingConfig>("method = \"odm\"\ninit = \"natrual\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("natrual") && e.contains("\"natural\""), "{e}");
        let e = toml::from_str::<crate::MixingConfig>("method = \"odm\"\nvariant = \"exp4\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("exp4") && e.contains("exp3"), "{e}");
        let bad: crate::MixingConfig =
            toml::from_str("method = \"odm\"\ninit = { d0 = 1.0, dx = 1.0 }").unwrap();
        assert!(bad
            .validate(&info(2).names)
            .unwrap_err()
            .to_string()
            .starts_with("mixing.init names domain `dx`"));
    }
}
