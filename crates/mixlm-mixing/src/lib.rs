//! Data-mixing schedulers for mixlm.
//!
//! A scheduler decides, before every optimizer step, which share of the batch each
//! domain gets ([`Proportions`]), and learns from what the trainer reports back
//! ([`StepFeedback`], validation losses). Everything here is a pure function of
//! that feedback: no Burn, no tensors, no I/O, so every update rule is unit-tested
//! against the formulas of its paper.
//!
//! The trainer drives a [`Scheduler`] in this order for each step `t`:
//! 1. if [`Scheduler::wants_validation`]`(t)`, evaluate per-domain validation loss
//!    and pass it to [`Scheduler::observe_validation`];
//! 2. `p = scheduler.proportions(t)`, draw the batch with `p`, train one step;
//! 3. [`Scheduler::observe_train`] with the per-domain training loss of that step.
//!
//! Online methods fit this shape: ODM reads step 3, Aioli sets short one-hot-smoothed
//! segments in step 2 and reads validation losses between them in step 1, DoReMi
//! reads the reference losses carried in [`StepFeedback::reference`].

mod guard;
pub use guard::{finite_losses, FiniteFeedback};
pub mod aioli;
mod config;
pub mod doge;
pub mod doremi;
pub mod grid;
pub mod law;
pub mod odm;
mod proportions;
pub mod samplemix;
mod schedulers;
pub mod skillit;

pub use aioli::{AioliConfig, AioliScheduler};
pub use config::{InitWeights, ManualConfig, MixingConfig, MixingConfigError, NoParams};
pub use doge::{DogeConfig, DogeScheduler, DogeTarget};
pub use doremi::{DoReMiConfig, DoReMiScheduler, DoReMiVariant};
pub use odm::{OdmBatches, OdmConfig, OdmScheduler, OdmVariant};
pub use proportions::{Composition, DomainId, DomainLosses, Proportions, ProportionsError};
pub use schedulers::{StaticKind, StaticScheduler};
pub use skillit::{SkillItConfig, SkillItScheduler};

use serde::{Deserialize, Serialize};

/// What the trainer measured during one optimizer step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepFeedback {
    /// Mean training loss (nats/token) of each domain's sequences in this step;
    /// `None` for domains that had no sequence in the batch.
    pub train: DomainLosses,
    /// Number of sequences of each domain in this step (all micro-batches together).
    pub sequences: Vec<usize>,
    /// How many micro-batches (of all peers together) those sequences came in: the
    /// `G` of ODM's Algorithm 1, whose reward sums a domain's micro-batch losses.
    /// 1 for the feedback of a single micro-batch.
    #[serde(default = "one")]
    pub micro_batches: usize,
    /// Per-domain loss of a reference model on the same batch, for methods that
    /// ask for one through [`Requirements::reference_model`] (DoReMi).
    pub reference: Option<DomainLosses>,
    /// Per-domain mean over tokens of the clipped excess loss
    /// `max(loss - reference loss, 0)` (DoReMi's `lambda`), with a reference model.
    pub excess: Option<DomainLosses>,
}

fn one() -> usize {
    1
}

impl StepFeedback {
    /// Training losses of one micro-batch only (no reference model).
    pub fn train_only(train: DomainLosses, sequences: Vec<usize>) -> Self {
        Self {
            train,
            sequences,
            micro_batches: 1,
            reference: None,
            excess: None,
        }
    }
}

/// Extra measurements a scheduler needs from the trainer beyond training losses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Requirements {
    /// A frozen reference model (a checkpoint folder, or a run folder whose latest
    /// checkpoint is taken) whose per-token losses on every training batch fill
    /// [`StepFeedback::reference`] and [`StepFeedback::excess`].
    pub reference_model: Option<std::path::PathBuf>,
    /// Per-domain gradients, aligned with a target gradient (DoGE): the trainer
    /// computes each domain's gradient separately, hands their Gram matrix to
    /// [`Scheduler::gradient_weights`] and updates the model with the weighted sum.
    pub gradients: Option<GradientTarget>,
}

/// The gradient that per-domain gradients are aligned with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GradientTarget {
    /// The per-domain training gradients themselves (their sum).
    Train,
    /// The gradient of the mean loss over `sequences` validation windows, spread
    /// evenly over `domains` (a different draw each step).
    Validation {
        sequences: usize,
        domains: Vec<DomainId>,
    },
}

/// Inner products of one step's gradients, all of mean losses: what a
/// gradient-alignment method needs, with no tensor in sight.
#[derive(Debug, Clone, PartialEq)]
pub struct GradientAlignment {
    /// Whether domain `i` had sequences in the step (absent domains have no gradient).
    pub present: Vec<bool>,
    /// `gram[i][j] = <g_i, g_j>` of the domain gradients (0 where either is absent).
    pub gram: Vec<Vec<f64>>,
    /// With [`GradientTarget::Validation`]: the target gradient's alignments.
    pub target: Option<AlignmentTarget>,
}

/// `<g_i, g_T>` for each domain and `|g_T|^2`.
#[derive(Debug, Clone, PartialEq)]
pub struct AlignmentTarget {
    pub dots: Vec<f64>,
    pub norm_sq: f64,
}

/// A data-mixing method, as the trainer sees it. See the crate docs for the call order.
pub trait Scheduler: Send {
    /// Short name used in logs and metrics (`"stratified"`, `"odm"`, ...).
    fn name(&self) -> &str;

    /// Extra feedback this method needs; the default is training losses only.
    fn requirements(&self) -> Requirements {
        Requirements::default()
    }

    /// Whether per-domain validation losses must be measured before step `step`.
    fn wants_validation(&self, _step: u64) -> bool {
        false
    }

    /// Per-domain validation losses measured before step `step`.
    fn observe_validation(&mut self, _step: u64, _losses: &DomainLosses) {}

    /// The domain proportions to sample step `step` (0-based optimizer step) with.
    fn proportions(&mut self, step: u64) -> Proportions;

    /// Whether [`Scheduler::proportions`] of a step never depends on feedback of
    /// earlier steps, so the trainer may ask for step `t + 1` before step `t`'s
    /// feedback and read its batch ahead. `false` (the safe default) still lets the
    /// trainer read a step's micro-batches ahead of each other.
    fn fixed_in_advance(&self) -> bool {
        false
    }

    /// How step `step`'s batches are split among domains, when the method needs a
    /// particular way (Aioli's LearnParams: fixed counts); `None`: the run's
    /// `data.composition`.
    fn composition(&self, _step: u64) -> Option<Composition> {
        None
    }

    /// Feedback of step `step`, after its optimizer update.
    fn observe_train(&mut self, _step: u64, _feedback: &StepFeedback) {}

    /// Per-domain weights of the training objective for one micro-batch of step
    /// `step`, given that micro-batch's forward-pass losses; called before its
    /// backward pass. The loss becomes `sum_i w_i * (mean loss of domain i's tokens)`
    /// over the domains present. `None` (the default): the plain token mean.
    /// DoReMi's proxy run uses it for its reweighted (DRO) objective.
    fn loss_weights(&mut self, _step: u64, _micro_batch: &StepFeedback) -> Option<Vec<f64>> {
        None
    }

    /// Coefficients of each domain's gradient in the model update, from the step's
    /// gradient inner products at learning rate `lr`; called once per step when
    /// [`Requirements::gradients`] is set. `None`: the method does not use them.
    fn gradient_weights(
        &mut self,
        _step: u64,
        _lr: f64,
        _alignment: &GradientAlignment,
    ) -> Option<Vec<f64>> {
        None
    }

    /// The weights the method currently puts on each domain's loss or gradient
    /// when they are not the sampling proportions (DoReMi's and DoGE's `alpha`);
    /// the trainer logs them every step as `domain_weights`.
    fn domain_weights(&self) -> Option<Proportions> {
        None
    }

    /// The method's own quantities worth watching as a run goes, each a name and one
    /// value per domain (or per group of domains): ODM's rewards, the rows of Aioli's
    /// `A`. The trainer logs them every step under `method` in `metrics.jsonl` and in
    /// TensorBoard. Empty by default.
    fn watch(&self) -> Vec<(String, Vec<f64>)> {
        Vec::new()
    }

    /// A static mixture this run has learned for a later run (DoReMi: the average of
    /// its domain weights); the trainer writes it to `learned_mixture.toml`.
    fn learned_proportions(&self) -> Option<Proportions> {
        None
    }

    /// The scheduler's full state as JSON, written into checkpoints so a resumed run
    /// continues with the same decisions.
    fn state(&self) -> serde_json::Value;

    /// Restores what [`Scheduler::state`] produced.
    fn restore(&mut self, state: &serde_json::Value) -> Result<(), String>;
}

/// Decodes a scheduler's checkpointed state and checks it was saved by a run over
/// `k` domains (`domains_of` reads the count the state holds), so a checkpoint
/// from another corpus is refused instead of indexing out of bounds.
pub(crate) fn restore_state<T: serde::de::DeserializeOwned>(
    method: &str,
    state: &serde_json::Value,
    k: usize,
    domains_of: impl Fn(&T) -> usize,
) -> Result<T, String> {
    let s: T = serde_json::from_value(state.clone()).map_err(|e| format!("{method} state: {e}"))?;
    match domains_of(&s) {
        n if n == k => Ok(s),
        n => Err(format!("{method} state has {n} domains, the run {k}")),
    }
}

/// What a scheduler is built from: the domain names and their sizes in the data.
#[derive(Debug, Clone, PartialEq)]
pub struct DomainInfo {
    /// Domain names, index = [`DomainId`].
    pub names: Vec<String>,
    /// Training tokens per domain (for `natural`); `None` where a source is unbounded
    /// and its natural share is defined by [`DomainInfo::natural_weights`].
    pub natural_weights: Vec<f64>,
    /// The run's seed, for methods with randomness of their own (Aioli's group orders).
    pub seed: u64,
    /// The run's optimizer steps (`run.steps`), for defaults given as a share of the
    /// run (ODM's warm-up: 1% of the steps in the paper).
    pub steps: u64,
}

/// Builds the scheduler named by the config for these domains.
pub fn build_scheduler(
    config: &MixingConfig,
    domains: &DomainInfo,
) -> Result<Box<dyn Scheduler>, MixingConfigError> {
    config.validate(&domains.names)?;
    let scheduler: Box<dyn Scheduler> = match config {
        MixingConfig::Odm(c) => Box::new(OdmScheduler::new(c, domains)?),
        MixingConfig::Aioli(c) => Box::new(AioliScheduler::new(c, domains)?),
        MixingConfig::SkillIt(c) => Box::new(SkillItScheduler::new(c, domains)?),
        MixingConfig::Doremi(c) => Box::new(DoReMiScheduler::new(c, domains)?),
        MixingConfig::Doge(c) => Box::new(DogeScheduler::new(c, domains)?),
        _ => Box::new(StaticScheduler::from_config(config, domains)?),
    };
    Ok(Box::new(FiniteFeedback(scheduler)))
}
