//! DoReMi (Xie et al. 2023, "DoReMi: Optimizing Data Mixtures Speeds Up Language
//! Model Pretraining"), the proxy run of its three-step recipe:
//!
//! 1. train a reference model on the reference mixture (stratified here: `mixlm train`
//!    with `method = "stratified"`);
//! 2. **this scheduler**: train a proxy model of the same shape with Group DRO,
//!    batches drawn from the reference mixture (uniform), the loss reweighted by
//!    domain weights `alpha` that follow each domain's excess loss over the reference;
//! 3. train the final model on the average of `alpha` over the proxy run, which this
//!    scheduler reports as [`Scheduler::learned_proportions`] (the trainer writes it to
//!    `learned_mixture.toml`).
//!
//! Two variants of step 2 (`variant = "paper" | "aioli"`, default `"paper"`):
//!
//! * **`paper`** reproduces the DoReMi paper, Section 2 ("Step 2: Train proxy model
//!   with Group DRO"), Algorithm 1 (the online Group DRO optimizer of the minimax
//!   objective Eq. (1)), with its per-token clipped excess loss. Every *micro-batch*, the
//!   per-domain excess `lambda_i` = mean over domain `i`'s tokens of
//!   `max(loss_proxy - loss_ref, 0)` (clipped per token) updates
//!   `alpha' = normalize(alpha * exp(eta * lambda))`,
//!   `alpha = (1 - smoothing) alpha' + smoothing / K`, and that micro-batch is trained
//!   on `sum_i alpha_i * (mean loss of domain i)` with the freshly updated `alpha`.
//!   A domain absent from the micro-batch has `lambda = 0`. Batches have exact
//!   per-domain counts ([`Composition::Fixed`]). The learned mixture is the average of
//!   `alpha` after every update (every micro-batch).
//! * **`aioli`** reproduces the DoReMi baseline of the Aioli repository
//!   (HazyResearch/aioli, commit a2361123335cb91d68f5ad86a6c85de7a79e6d5e,
//!   `trainer/doremi_trainer.py`: `DoremiTrainer.update_domain_weights`, called from
//!   `DoremiTrainer.train_step`, driven by `DoremiTrainer.train`), whose numbers the
//!   Aioli paper reports. It differs from `paper` in:
//!   1. **clipping of domain means**: `lambda_i = max(mean proxy loss of domain i -
//!      mean reference loss of domain i, 0)` (the difference of the micro-batch's
//!      per-domain means, clipped after), not the mean of per-token clipped
//!      differences;
//!   2. **absent domains keep their last excess**: where that difference is exactly
//!      `0` (a domain absent from the micro-batch has both losses `0`; a present one
//!      with equal losses counts the same), `lambda_i` is the domain's clipped excess
//!      of the previous update, `1e-6` before the first;
//!   3. **one update per optimizer step, from the last micro-batch only**: with `G`
//!      micro-batches per step, the update reads only the last micro-batch's losses,
//!      each divided by `G` (so the effective step size is `eta / G`); the losses of
//!      the other micro-batches are computed and discarded;
//!   4. **loss weights**: the last micro-batch is trained on the weights just updated
//!      from it, divided by `G` like every micro-batch here; the other micro-batches
//!      get weight `0` (Aioli never calls backward on them, so the proxy model only
//!      learns from one micro-batch in `G`). This scheduler learns `G` by counting
//!      [`Scheduler::loss_weights`] calls between [`Scheduler::observe_train`] calls,
//!      so on the run's first step (`G` not known yet) every micro-batch is trained on
//!      the weights it would give as the last one; from the second step on it is exact.
//!      The domain weights themselves are committed in `observe_train`, so
//!      [`Scheduler::domain_weights`] is exact from the first step;
//!   5. **averaging**: the learned mixture is the average of `alpha` after each of
//!      these per-step updates (Aioli's `avg_dw / dw_update_steps`);
//!   6. **sampling**: each sequence's domain drawn i.i.d. uniform
//!      ([`Composition::Sample`]), as Aioli's `sample_rule = "stratified"` draws
//!      (`rng.choice(K, batch_size, p = uniform)`), so domains can be absent from a
//!      micro-batch.
//!
//!   Shared by both: uniform initial `alpha`, the same exponentiated-gradient update
//!   and smoothing (Aioli's `reweight_eps = 1e-3` is not configurable there; its
//!   `--doremi_mu` defaults to `1.0`, the paper's `eta`, but all its
//!   `scripts/*/doremi/run_proxy.sh` pass `--doremi_mu 0.01`). Not reproduced from
//!   Aioli (trainer side, not the weights): it clips the gradient norm after each
//!   domain's backward pass, and steps the optimizer and learning-rate schedule on
//!   every micro-batch (so a run of `--max_steps S` with `G` accumulation steps has
//!   `S / G` parameter updates on a schedule of `S` steps); Aioli also computes in
//!   float32, this scheduler in f64.
//!
//! Defaults are the paper's: `eta = 1`, `smoothing = 1e-3`.

use crate::config::{check_eta, check_range, MixingConfigError};
use crate::proportions::{softmax, AveragedWeights};
use crate::{
    restore_state, Composition, DomainInfo, DomainLosses, Proportions, Requirements, Scheduler,
    StepFeedback,
};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Whose DoReMi proxy run to reproduce (see the module docs for every difference).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DoReMiVariant {
    /// Xie et al. 2023, Algorithm 1: an update every micro-batch from per-token
    /// clipped excess losses.
    #[default]
    Paper,
    /// The Aioli repository's `trainer/doremi_trainer.py`: an update every optimizer
    /// step from the last micro-batch's clipped difference of domain means, absent
    /// domains keeping their last excess.
    Aioli,
}

/// `method = "doremi"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DoReMiConfig {
    /// The reference model: a checkpoint folder, or a run folder (its latest
    /// checkpoint). Required to train; `mixlm mix-search --method doremi` fills it in.
    #[serde(default)]
    pub reference: PathBuf,
    /// Step size of the exponentiated-gradient update (Aioli's `--doremi_mu`).
    #[serde(default = "default_eta")]
    pub eta: f64,
    /// Weight of the uniform distribution mixed into the domain weights, in `[0, 1]`
    /// (Aioli's `reweight_eps`).
    #[serde(default = "default_smoothing")]
    pub smoothing: f64,
    /// `"paper"` (default) or `"aioli"`.
    #[serde(default)]
    pub variant: DoReMiVariant,
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
            variant: DoReMiVariant::Paper,
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

/// The Aioli repository's excess losses (`update_domain_weights`): with `G`
/// micro-batches per step, `d_i = train_i / G - reference_i / G` of the last
/// micro-batch (an unmeasured loss counts as `0`, like its zero-initialised buffers);
/// where `d_i == 0` (absent domain) it takes `last[i]`; then clipped at `0`. `last`
/// becomes the result (Aioli's `perdomain_scores`).
pub fn aioli_excess(
    train: &[Option<f64>],
    reference: &[Option<f64>],
    micro_batches: u64,
    last: &mut [f64],
) -> Vec<f64> {
    let g = micro_batches.max(1) as f64;
    let excess: Vec<f64> = (train.iter().zip(reference).zip(last.iter()))
        .map(|((t, r), prev)| {
            let d = t.unwrap_or(0.0) / g - r.unwrap_or(0.0) / g;
            let d = if d == 0.0 { *prev } else { d };
            d.max(0.0)
        })
        .collect();
    last.copy_from_slice(&excess);
    excess
}

/// Aioli's `perdomain_scores` before the first update.
pub const AIOLI_INITIAL_EXCESS: f64 = 1e-6;

/// The last micro-batch's per-domain mean losses (variant `aioli`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MicroBatchLosses {
    pub train: DomainLosses,
    pub reference: DomainLosses,
}

/// What DoReMi carries between steps (checkpointed). The fields after `weights` are
/// used by variant `aioli` only; a checkpoint without them (older mixlm) loads with
/// their defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DoReMiState {
    /// `alpha`, and the sum of its values after every update for the average.
    #[serde(flatten)]
    pub weights: AveragedWeights,
    /// Clipped excess of each domain at the last update (`1e-6` before the first).
    #[serde(default)]
    pub last_excess: Vec<f64>,
    /// The latest micro-batch of the step under way.
    #[serde(default)]
    pub last_micro_batch: Option<MicroBatchLosses>,
    /// Micro-batches seen in the step under way.
    #[serde(default)]
    pub micro_batches_seen: u64,
    /// Micro-batches per step, learned at the end of the first step (0: not yet).
    #[serde(default)]
    pub micro_batches_per_step: u64,
}

impl DoReMiState {
    fn uniform(k: usize) -> Self {
        Self {
            weights: AveragedWeights::uniform(k),
            last_excess: vec![AIOLI_INITIAL_EXCESS; k],
            last_micro_batch: None,
            micro_batches_seen: 0,
            micro_batches_per_step: 0,
        }
    }
}

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

    fn k(&self) -> usize {
        self.state.weights.alpha.len()
    }

    /// Variant `paper`: update from this micro-batch, train it on the result.
    fn paper_loss_weights(&mut self, micro_batch: &StepFeedback) -> Vec<f64> {
        let excess: Vec<f64> = match &micro_batch.excess {
            Some(e) => e.0.iter().map(|l| l.unwrap_or(0.0)).collect(),
            // No reference losses (cannot happen when the trainer honours
            // `requirements`): no update.
            None => return self.state.weights.alpha.clone(),
        };
        let alpha = doremi_update(
            &self.state.weights.alpha,
            &excess,
            self.config.eta,
            self.config.smoothing,
        );
        self.state.weights.push(alpha.clone());
        alpha
    }

    /// The weights Aioli's update would give if `micro` were the step's last of `g`.
    fn aioli_candidate(&self, micro: &MicroBatchLosses, g: u64) -> Vec<f64> {
        let mut last = self.state.last_excess.clone();
        let excess = aioli_excess(&micro.train.0, &micro.reference.0, g, &mut last);
        doremi_update(
            &self.state.weights.alpha,
            &excess,
            self.config.eta,
            self.config.smoothing,
        )
    }

    /// Variant `aioli`: remember the micro-batch; weight 0 unless it is the step's
    /// last (as far as known), else the weights it would update to.
    fn aioli_loss_weights(&mut self, micro_batch: &StepFeedback) -> Vec<f64> {
        self.state.micro_batches_seen += 1;
        let Some(reference) = &micro_batch.reference else {
            self.state.last_micro_batch = None;
            return self.state.weights.alpha.clone();
        };
        let micro = MicroBatchLosses {
            train: micro_batch.train.clone(),
            reference: reference.clone(),
        };
        let (seen, per_step) = (
            self.state.micro_batches_seen,
            self.state.micro_batches_per_step,
        );
        let weights = if per_step > 0 && seen < per_step {
            vec![0.0; self.k()]
        } else {
            self.aioli_candidate(&micro, if per_step > 0 { per_step } else { seen })
        };
        self.state.last_micro_batch = Some(micro);
        weights
    }

    /// Variant `aioli`: the step's one update, from its last micro-batch.
    fn aioli_observe_train(&mut self) {
        let g = std::mem::take(&mut self.state.micro_batches_seen);
        if g == 0 {
            return;
        }
        self.state.micro_batches_per_step = g;
        if let Some(micro) = self.state.last_micro_batch.take() {
            let excess = aioli_excess(
                &micro.train.0,
                &micro.reference.0,
                g,
                &mut self.state.last_excess,
            );
            let alpha = doremi_update(
                &self.state.weights.alpha,
                &excess,
                self.config.eta,
                self.config.smoothing,
            );
            self.state.weights.push(alpha);
        }
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
        Proportions::uniform(self.k())
    }

    fn fixed_in_advance(&self) -> bool {
        true
    }

    /// `paper`: exact counts; `aioli`: i.i.d. draws, as Aioli's stratified sampler.
    fn composition(&self, _step: u64) -> Option<Composition> {
        Some(match self.config.variant {
            DoReMiVariant::Paper => Composition::Fixed,
            DoReMiVariant::Aioli => Composition::Sample,
        })
    }

    fn observe_train(&mut self, _step: u64, _feedback: &StepFeedback) {
        if self.config.variant == DoReMiVariant::Aioli {
            self.aioli_observe_train();
        }
    }

    fn loss_weights(&mut self, _step: u64, micro_batch: &StepFeedback) -> Option<Vec<f64>> {
        Some(match self.config.variant {
            DoReMiVariant::Paper => self.paper_loss_weights(micro_batch),
            DoReMiVariant::Aioli => self.aioli_loss_weights(micro_batch),
        })
    }

    fn domain_weights(&self) -> Option<Proportions> {
        self.state.weights.current()
    }

    fn learned_proportions(&self) -> Option<Proportions> {
        self.state.weights.average()
    }

    fn state(&self) -> serde_json::Value {
        serde_json::to_value(&self.state).expect("DoReMi state serialises")
    }

    fn restore(&mut self, state: &serde_json::Value) -> Result<(), String> {
        let k = self.k();
        let mut s = restore_state("DoReMi", state, k, |s: &DoReMiState| s.weights.alpha.len())?;
        if s.last_excess.is_empty() {
            s.last_excess = vec![AIOLI_INITIAL_EXCESS; k];
        }
        if s.last_excess.len() != k {
            return Err(format!(
                "DoReMi state has {} last excess losses, the run {k} domains",
                s.last_excess.len()
            ));
        }
        self.state = s;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &[f64], b: &[f64]) {
        assert_eq!(a.len(), b.len(), "{a:?} vs {b:?}");
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-12, "{a:?} vs {b:?}");
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

    /// A micro-batch with proxy, reference and per-token clipped excess losses.
    fn full(
        train: &[Option<f64>],
        reference: &[Option<f64>],
        excess: &[Option<f64>],
    ) -> StepFeedback {
        StepFeedback {
            reference: Some(DomainLosses(reference.to_vec())),
            excess: Some(DomainLosses(excess.to_vec())),
            ..StepFeedback::train_only(
                DomainLosses(train.to_vec()),
                train.iter().map(|t| t.is_some() as usize).collect(),
            )
        }
    }

    fn domains(k: usize) -> DomainInfo {
        DomainInfo {
            names: (0..k).map(|i| format!("d{i}")).collect(),
            natural_weights: vec![1.0; k],
            seed: 0,
            steps: 1000,
        }
    }

    fn scheduler(toml_extra: &str, k: usize) -> Box<dyn Scheduler> {
        let cfg: crate::MixingConfig = toml::from_str(&format!(
            "method = \"doremi\"\nreference = \"runs/ref\"\n{toml_extra}"
        ))
        .unwrap();
        crate::build_scheduler(&cfg, &domains(k)).unwrap()
    }

    fn weights(s: &dyn Scheduler) -> Vec<f64> {
        s.domain_weights().unwrap().as_slice().to_vec()
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
    fn variant_parses_snake_case_and_defaults_to_paper() {
        let parse = |s: &str| toml::from_str::<crate::MixingConfig>(s);
        let c = parse("method = \"doremi\"\nreference = \"r\"").unwrap();
        let crate::MixingConfig::Doremi(c) = c else {
            panic!("not doremi")
        };
        assert_eq!(c.variant, DoReMiVariant::Paper);
        let c = parse("method = \"doremi\"\nreference = \"r\"\nvariant = \"aioli\"").unwrap();
        let crate::MixingConfig::Doremi(c) = c else {
            panic!("not doremi")
        };
        assert_eq!(c.variant, DoReMiVariant::Aioli);
        assert!(parse("method = \"doremi\"\nreference = \"r\"\nvariant = \"Aioli\"").is_err());
        assert!(parse("method = \"doremi\"\nreference = \"r\"\nvarient = \"aioli\"").is_err());
    }

    #[test]
    fn proxy_run_reweights_and_averages() {
        let mut s = scheduler("smoothing = 0.1", 2);
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
        // observe_train does not update the paper variant.
        s.observe_train(0, &micro(&[Some(5.0), Some(0.0)]));
        close(&weights(&*s), &w2);
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

    /// (a) Aioli clips the difference of the domain means, the paper each token.
    #[test]
    fn aioli_clips_difference_of_domain_means() {
        let ln3 = 3f64.ln();
        // Domain 0: means 1 + ln 3 vs 1 (difference ln 3); per-token clipped excess
        // ln 3 + 0.2 (some tokens below the reference). Domain 1: means 1 vs 1.5
        // (difference -0.5, clipped to 0); per-token clipped excess 0.4.
        let f = full(
            &[Some(1.0 + ln3), Some(1.0)],
            &[Some(1.0), Some(1.5)],
            &[Some(ln3 + 0.2), Some(0.4)],
        );
        let mut aioli = scheduler("smoothing = 0.1\nvariant = \"aioli\"", 2);
        assert_eq!(aioli.composition(0), Some(Composition::Sample));
        // lambda = [ln 3, 0]: [0.725, 0.275] as above; the last (only) micro-batch is
        // trained on them.
        close(&aioli.loss_weights(0, &f).unwrap(), &[0.725, 0.275]);
        aioli.observe_train(0, &f);
        close(&weights(&*aioli), &[0.725, 0.275]);
        // The paper variant reads lambda = [ln 3 + 0.2, 0.4]: alpha' ∝ [3 e^-0.2, 1]
        // = [0.7106642, 0.2893358]; smoothed [0.6895978, 0.3104022].
        let mut paper = scheduler("smoothing = 0.1", 2);
        close(
            &paper.loss_weights(0, &f).unwrap(),
            &[0.689_597_819_653_851_6, 0.310_402_180_346_148_4],
        );
    }

    /// (b) A domain absent from the (last) micro-batch keeps its last excess in
    /// `aioli` (1e-6 before the first update); `paper` gives it 0.
    #[test]
    fn aioli_absent_domain_keeps_last_excess() {
        let (ln2, ln3) = (2f64.ln(), 3f64.ln());
        let mut s = scheduler("smoothing = 0.0\nvariant = \"aioli\"", 3);
        // Step 0: domain 2 absent. Differences [ln 2, -0.5, (0 - 0)] -> lambda =
        // [ln 2, 0, 1e-6]: alpha ∝ [2, 1, e^1e-6].
        let f0 = full(
            &[Some(1.0 + ln2), Some(1.0), None],
            &[Some(1.0), Some(1.5), None],
            &[Some(ln2), Some(0.1), None],
        );
        s.loss_weights(0, &f0);
        s.observe_train(0, &f0);
        let e6 = 1e-6f64.exp();
        let z0 = 3.0 + e6;
        close(&weights(&*s), &[2.0 / z0, 1.0 / z0, e6 / z0]);
        // Step 1: domains 0 and 1 absent; domain 2's difference ln 3. lambda = [ln 2
        // (kept), 0 (kept: the clipped -0.5), ln 3]: alpha ∝ [4, 1, 3 e^1e-6].
        let f1 = full(
            &[None, None, Some(1.0 + ln3)],
            &[None, None, Some(1.0)],
            &[None, None, Some(ln3)],
        );
        s.loss_weights(1, &f1);
        s.observe_train(1, &f1);
        let z1 = 5.0 + 3.0 * e6;
        let w1 = [4.0 / z1, 1.0 / z1, 3.0 * e6 / z1];
        close(&weights(&*s), &w1);
        // Averaged over the two updates.
        close(
            s.learned_proportions().unwrap().as_slice(),
            &[
                (2.0 / z0 + w1[0]) / 2.0,
                (1.0 / z0 + w1[1]) / 2.0,
                (e6 / z0 + w1[2]) / 2.0,
            ],
        );
        // The paper variant gives absent domains lambda = 0: [1/3, 1/3, 1/3] * [1, 1, 3].
        let mut p = scheduler("smoothing = 0.0", 3);
        close(&p.loss_weights(0, &f1).unwrap(), &[0.2, 0.2, 0.6]);
    }

    /// (c) `aioli` updates once per optimizer step, from the last of its `G`
    /// micro-batches with losses divided by `G`; the others train with weight 0 once
    /// `G` is known. `paper` updates on every micro-batch.
    #[test]
    fn aioli_updates_once_per_step_from_last_micro_batch() {
        let ln3 = 3f64.ln();
        let mut s = scheduler("smoothing = 0.1\nvariant = \"aioli\"", 2);
        // A first micro-batch the update must ignore: lambda would be [0, 5].
        let first = full(
            &[Some(1.0), Some(6.0)],
            &[Some(1.0), Some(1.0)],
            &[None, None],
        );
        // The last: differences / G = [(1 + 2 ln 3)/2 - 1/2, 2/2 - 2.2/2] = [ln 3, -0.1]
        // -> lambda = [ln 3, 0] -> [0.725, 0.275].
        let last = full(
            &[Some(1.0 + 2.0 * ln3), Some(2.0)],
            &[Some(1.0), Some(2.2)],
            &[None, None],
        );
        let step = StepFeedback {
            micro_batches: 2,
            ..first.clone()
        };
        // Step 0: G not known yet, each micro-batch gets the weights it would give as
        // the last one (the first one with G = 1: lambda = [1e-6, 5]).
        let w = s.loss_weights(0, &first).unwrap();
        close(&w, &doremi_update(&[0.5, 0.5], &[1e-6, 5.0], 1.0, 0.1));
        close(&weights(&*s), &[0.5, 0.5]);
        close(&s.loss_weights(0, &last).unwrap(), &[0.725, 0.275]);
        close(&weights(&*s), &[0.5, 0.5]);
        s.observe_train(0, &step);
        close(&weights(&*s), &[0.725, 0.275]);
        // Step 1: G = 2 known; the first micro-batch gets weight 0. The last, with
        // differences / 2 = [ln 2, 0 -> kept 0]: alpha' ∝ [0.725 * 2, 0.275] =
        // [0.8405797, 0.1594203]; smoothed [0.8065217, 0.1934783].
        assert_eq!(s.loss_weights(1, &first).unwrap(), vec![0.0, 0.0]);
        let last1 = full(
            &[Some(1.0 + 2.0 * 2f64.ln()), Some(3.0)],
            &[Some(1.0), Some(3.0)],
            &[None, None],
        );
        let w2 = [0.9 * 1.45 / 1.725 + 0.05, 0.9 * 0.275 / 1.725 + 0.05];
        close(&s.loss_weights(1, &last1).unwrap(), &w2);
        // Checkpointed mid-step and restored, the step ends the same.
        let mut r = scheduler("smoothing = 0.1\nvariant = \"aioli\"", 2);
        r.restore(&s.state()).unwrap();
        assert_eq!(r.state(), s.state());
        for x in [&mut s, &mut r] {
            x.observe_train(1, &step);
            close(&weights(&**x), &w2);
            close(
                x.learned_proportions().unwrap().as_slice(),
                &[(0.725 + w2[0]) / 2.0, (0.275 + w2[1]) / 2.0],
            );
        }
        assert_eq!(r.state(), s.state());
        // The paper variant updated on both micro-batches of a step.
        let mut p = scheduler("smoothing = 0.1", 2);
        p.loss_weights(0, &micro(&[Some(0.0), Some(0.0)]));
        p.loss_weights(0, &micro(&[Some(0.0), Some(0.0)]));
        let st: DoReMiState = serde_json::from_value(p.state()).unwrap();
        assert_eq!(st.weights.updates, 2);
    }

    #[test]
    fn state_round_trips_and_old_checkpoints_load() {
        let mut s = scheduler("variant = \"aioli\"", 2);
        let f = full(&[Some(2.0), None], &[Some(1.0), None], &[Some(1.0), None]);
        s.loss_weights(0, &f);
        s.observe_train(0, &f);
        let mut r = scheduler("variant = \"aioli\"", 2);
        r.restore(&s.state()).unwrap();
        assert_eq!(r.state(), s.state());
        let st: DoReMiState = serde_json::from_value(r.state()).unwrap();
        assert_eq!(st.last_excess, vec![1.0, 1e-6]);
        assert_eq!(st.micro_batches_per_step, 1);
        // A checkpoint of an older mixlm: only the averaged weights.
        let old = serde_json::json!({"alpha": [0.25, 0.75], "alpha_sum": [0.5, 1.5], "updates": 2});
        let mut o = scheduler("", 2);
        o.restore(&old).unwrap();
        close(&weights(&*o), &[0.25, 0.75]);
        let st: DoReMiState = serde_json::from_value(o.state()).unwrap();
        assert_eq!(st.last_excess, vec![1e-6, 1e-6]);
        // Another corpus is refused.
        let mut three = scheduler("", 3);
        assert!(three.restore(&old).unwrap_err().contains("2 domains"));
    }
}
