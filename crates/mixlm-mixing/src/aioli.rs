//! Aioli (Chen et al. 2024, "Aioli: A Unified Optimization Framework for Language
//! Model Data Mixing"), as in the authors' code (`trainer/aioli_trainer.py`).
//!
//! Aioli fits the *linear dynamic mixing law* `L^{t+1} = L^t - A p^t` online: the
//! validation loss of each group `i` drops by `sum_j A_ij p_j` after a step on mixture
//! `p`, and `A_ij` says how much training on group `j` helps group `i`.
//!
//! Training is split into rounds of `update_steps` steps. Each round starts with
//! **LearnParams**, `lp_rounds` sweeps over the `K` groups in a fresh random order;
//! each segment trains `lp_steps` real steps on the smoothed one-hot mixture of its
//! group `j` (`one_hot_factor` on `j`, the rest spread evenly, batches composed with
//! exact counts) and records the per-group validation loss drop since the previous
//! measurement in column `j` of `G`. `G` is averaged over sweeps and unmixed:
//! `A = G W^{-1}`, with `W` the matrix whose row `j` is group `j`'s smoothed one-hot.
//! With `normalize_a`, `A` is shifted by its minimum if that is negative and divided
//! by the sum of its entries. Then
//! - without `ema`: `p <- p * exp(eta * colsum(A))`, normalised;
//! - with `ema = gamma`: `A_ema <- (1 - gamma) A + gamma A_ema` (`A_ema = A` in the
//!   first round) and `p = exp(eta * colsum(A_ema))`, normalised (not multiplicative).
//!
//! The rest of the round trains on `p`. LearnParams steps are real training steps and
//! count towards the budget. `init_steps` steps on `init_proportions` can come first
//! (the paper's "Aioli + X", continuing another method's mixture); with
//! `start_from_init` Aioli's `p` also starts there instead of uniform (the official
//! code restarts from uniform).
//!
//! Agreement with the official code is checked by the golden tests
//! (`tests/golden_aioli.rs`, `tests/golden/aioli-*.json`): trajectories recorded from
//! the authors' `AioliTrainer.train` (HazyResearch/aioli, commit `a236112`) for K = 2,
//! 3 and 7, with and without EMA and with a prior, agree with this scheduler to 1e-12
//! per proportion (in practice to the last bit or two of an `f64`), given the same
//! group orders. The official orders come from numpy's global RNG
//! (`np.random.permutation`); mixlm draws its own from the run's seed, and
//! [`AioliScheduler::with_group_orders`] replays recorded ones.
//!
//! Differences from the official code:
//! - LearnParams batches hold exactly the apportioned counts. The official code
//!   (`dataset/slimpj_dataset.py`: `get_tokenized_dataset(mapped_train=True)` and
//!   `interleave_per_batch_mapped`) draws `int(p_i * lp_steps * B)` sequences per group
//!   for the segment and composes every batch of `max(1, int(p_i * B))` sequences of
//!   group `i`, the last group taking `B` minus the others, until some group runs out;
//!   the training loop stops at `lp_steps` batches or when the data ends. Where these
//!   round exactly (K = 2 at 0.625, K = 3 at 0.5, K = 7 at 0.25, batch size 8) both
//!   agree step for step. At the full-setting script's K = 7, `one_hot_factor` 0.75,
//!   batch size 8, `lp_rounds` 2, `lp_steps` 10 they do not: per batch the segment's
//!   group gets 6, every other group 1 and the last group (wikipedia) `8 - 11 = -3`,
//!   i.e. none; the segment draws 60 sequences of its group and 3 of each other (5 of
//!   the last), so after 3 such 11-sequence batches a 3-sequence group runs out and the
//!   segment holds 33 sequences: 5 steps (8, 8, 8, 8, 1) instead of 10, with no
//!   wikipedia at all. The last group's own segment composes batches of 1 of each
//!   other group and 2 (not 6) of wikipedia, 25% instead of 75%, and trains 3 steps
//!   (24 sequences). A LearnParams thus trains 2 * (6 * 5 + 3) = 66 steps, but the
//!   round counter still advances by the nominal `lp_rounds * lp_steps * K` = 140, and
//!   the round trains on `p` until the counter reaches the next multiple of
//!   `update_steps` (200): 60 steps, so a round trains 126 batches, and the 40000-step
//!   run (were it to get past its `--prior_steps 0`, below) 200 * 126 = 25200, while
//!   `A` is still unmixed with the nominal `W` (75% on the segment's group). mixlm does not reproduce this: it trains every segment
//!   `lp_steps` steps on exactly the nominal mixture and every round `update_steps`
//!   steps. Given the same validation losses it computes the same `A` and `p` every
//!   round (checked by the `k7-full-script` golden test); only the step counts and
//!   the LearnParams batch contents differ.
//! - The official round boundaries are multiples of `update_steps` of its counter,
//!   which starts at `prior_steps`; with a prior whose `prior_steps` is not a multiple
//!   of `update_steps` its first round is shorter and the run ends short. mixlm's rounds
//!   are `update_steps` long from `init_steps` on (the two agree when `prior_steps` is
//!   a multiple of `update_steps`, as in the golden test). With `--aioli_prior` and
//!   `--prior_steps 0` (as in the official `scripts/full/aioli/run.sh`) the official
//!   static phase never ends (it checks `counter == prior_steps` only after a step);
//!   mixlm's `init_steps = 0` simply starts with Aioli.
//! - `A` is scaled by its sum only when that sum is positive (the official code divides
//!   unconditionally, giving NaN for an all-zero `A`). The `aioli_diagonal` variant and
//!   the Skill-It-initialised variant (`--graph_path`) are not implemented.
//! - Validation uses the run's `eval.sequences` per group rather than the whole
//!   validation split.

use crate::config::{check_eta, check_range, InitWeights};
use crate::proportions::softmax;
use crate::{
    restore_state, Composition, DomainInfo, DomainLosses, MixingConfigError, Proportions, Scheduler,
};
use nalgebra::{DMatrix, DVector};
use serde::{Deserialize, Serialize};

/// `method = "aioli"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AioliConfig {
    /// Step size of the exponentiated-gradient update.
    pub eta: f64,
    /// Steps per round, LearnParams included.
    pub update_steps: u64,
    /// Sweeps over the groups per LearnParams.
    #[serde(default = "default_lp_rounds")]
    pub lp_rounds: u64,
    /// Training steps per LearnParams segment.
    #[serde(default = "default_lp_steps")]
    pub lp_steps: u64,
    /// Weight of the segment's group in its mixture, in `(0, 1]` (1: one-hot).
    #[serde(default = "default_one_hot_factor")]
    pub one_hot_factor: f64,
    /// Exponential moving average of `A` across rounds, in `[0, 1)`; absent: the
    /// multiplicative update.
    #[serde(default)]
    pub ema: Option<f64>,
    /// Shift `A` to be non-negative and divide by its sum before the update.
    #[serde(default = "default_true")]
    pub normalize_a: bool,
    /// Steps trained on `init_proportions` before the first round.
    #[serde(default)]
    pub init_steps: u64,
    #[serde(default)]
    pub init_proportions: InitWeights,
    /// Start Aioli's `p` from `init_proportions` instead of uniform.
    #[serde(default)]
    pub start_from_init: bool,
}

fn default_lp_rounds() -> u64 {
    1
}
fn default_lp_steps() -> u64 {
    5
}
fn default_one_hot_factor() -> f64 {
    1.0
}
fn default_true() -> bool {
    true
}

impl AioliConfig {
    /// Steps of LearnParams in each round: `lp_rounds * lp_steps * K`.
    pub fn learn_params_steps(&self, k: usize) -> u64 {
        self.lp_rounds * self.lp_steps * k as u64
    }

    pub fn validate(&self, domains: &[String]) -> Result<(), MixingConfigError> {
        let k = domains.len();
        check_eta(self.eta)?;
        check_range(
            "one_hot_factor",
            self.one_hot_factor,
            f64::MIN_POSITIVE,
            1.0,
            false,
            "must be in (0, 1]",
        )?;
        if k > 1 && (self.one_hot_factor - 1.0 / k as f64).abs() < 1e-9 {
            return Err(MixingConfigError::Invalid {
                field: "one_hot_factor",
                message: format!(
                    "= 1/K = {} makes every LearnParams mixture uniform, so A cannot be \
                     unmixed; use a larger value",
                    self.one_hot_factor
                ),
            });
        }
        if let Some(ema) = self.ema {
            check_range("ema", ema, 0.0, 1.0, true, "must be in [0, 1)")?;
        }
        if self.lp_rounds == 0 || self.lp_steps == 0 {
            return Err(MixingConfigError::Invalid {
                field: "lp_steps",
                message: "lp_rounds and lp_steps must be >= 1".into(),
            });
        }
        let lp = self.learn_params_steps(k);
        if self.update_steps <= lp {
            return Err(MixingConfigError::Invalid {
                field: "update_steps",
                message: format!(
                    "= {} leaves no step to train on the learned mixture: LearnParams takes \
                     lp_rounds * lp_steps * K = {} * {} * {k} = {lp} steps of each round",
                    self.update_steps, self.lp_rounds, self.lp_steps
                ),
            });
        }
        self.init_proportions
            .validate("mixing.init_proportions", domains)
    }
}

/// The LearnParams mixture of group `j`: `factor` on `j`, `(1 - factor) / (K - 1)` on
/// every other group.
pub fn smoothed_one_hot(k: usize, j: usize, factor: f64) -> Vec<f64> {
    if k == 1 {
        return vec![1.0];
    }
    let rest = (1.0 - factor) / (k - 1) as f64;
    (0..k).map(|i| if i == j { factor } else { rest }).collect()
}

/// `A = G W^{-1}`: each row `i` of `A` solves `W a = G_i` (`W` symmetric), where
/// `G[i][j]` is group `i`'s loss drop over segment `j` and `W`'s row `j` is segment
/// `j`'s mixture.
pub fn unmix(graph: &[Vec<f64>], factor: f64) -> Vec<Vec<f64>> {
    let k = graph.len();
    let w = DMatrix::from_fn(k, k, |r, c| smoothed_one_hot(k, r, factor)[c]);
    let lu = w.lu();
    graph
        .iter()
        .map(|row| {
            let x = lu
                .solve(&DVector::from_column_slice(row))
                .expect("W is invertible for one_hot_factor != 1/K");
            x.iter().copied().collect()
        })
        .collect()
}

/// Shifts `a` by its minimum if that is negative, then divides by the sum of all
/// entries (left unscaled if the sum is 0).
pub fn normalize(a: &[Vec<f64>]) -> Vec<Vec<f64>> {
    let min = a.iter().flatten().copied().fold(f64::INFINITY, f64::min);
    let shift = if min < 0.0 { -min } else { 0.0 };
    let sum: f64 = a.iter().flatten().map(|x| x + shift).sum();
    let scale = if sum > 0.0 { 1.0 / sum } else { 1.0 };
    a.iter()
        .map(|row| row.iter().map(|x| (x + shift) * scale).collect())
        .collect()
}

/// `p * exp(eta * colsum(a))`, normalised (max-shifted in log space, so large
/// `eta` cannot overflow).
pub fn exponentiated_update(p: &[f64], a: &[Vec<f64>], eta: f64) -> Vec<f64> {
    let k = p.len();
    let logits: Vec<f64> = (0..k)
        .map(|j| p[j].ln() + eta * a.iter().map(|row| row[j]).sum::<f64>())
        .collect();
    softmax(&logits)
}

/// A deterministic permutation of `0..k` from `(seed, round, sweep)` (Fisher-Yates
/// over splitmix64), so a resumed run repeats the order without storing it.
fn permutation(k: usize, seed: u64, round: u64, sweep: u64) -> Vec<usize> {
    let mut x = seed ^ round.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ sweep.rotate_left(32);
    let mut next = || {
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let mut order: Vec<usize> = (0..k).collect();
    for i in (1..k).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    order
}

/// What Aioli carries between steps (checkpointed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AioliState {
    /// The mixture trained on outside LearnParams.
    pub p: Vec<f64>,
    /// Loss drops of the LearnParams in progress, `[validation group][segment group]`.
    pub graph: Vec<Vec<f64>>,
    /// The last validation losses measured in this LearnParams.
    pub previous: Option<Vec<f64>>,
    pub ema: Option<Vec<Vec<f64>>>,
    pub rounds_done: u64,
    /// The last estimate `A = G W^{-1}` (before normalisation), for inspection.
    pub last_a: Option<Vec<Vec<f64>>>,
}

/// Where a step falls in Aioli's schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Init,
    /// LearnParams of `round`, segment `segment`, `offset` steps into it.
    Learn {
        round: u64,
        segment: u64,
        offset: u64,
    },
    /// Training on `p`; `first` is the round's first such step.
    Exploit {
        first: bool,
    },
}

/// Aioli as a [`Scheduler`].
#[derive(Debug, Clone)]
pub struct AioliScheduler {
    config: AioliConfig,
    k: usize,
    seed: u64,
    init: Proportions,
    state: AioliState,
    /// LearnParams group orders supplied by [`AioliScheduler::with_group_orders`].
    group_orders: Vec<Vec<usize>>,
}

impl AioliScheduler {
    pub fn new(config: &AioliConfig, domains: &DomainInfo) -> Result<Self, MixingConfigError> {
        config.validate(&domains.names)?;
        let k = domains.names.len();
        let init = config
            .init_proportions
            .resolve("mixing.init_proportions", domains)?;
        let p = if config.start_from_init {
            init.as_slice().to_vec()
        } else {
            vec![1.0 / k as f64; k]
        };
        Ok(Self {
            config: config.clone(),
            k,
            seed: domains.seed,
            init,
            state: AioliState {
                p,
                graph: vec![vec![0.0; k]; k],
                previous: None,
                ema: None,
                rounds_done: 0,
                last_a: None,
            },
            group_orders: Vec::new(),
        })
    }

    /// Replays given LearnParams group orders instead of drawing them from the seed:
    /// `orders[r]` is round `r`'s order over all its segments, `lp_rounds`
    /// concatenated permutations of `0..K` (the official code's `mixture_order`,
    /// drawn there with numpy's global RNG). Rounds past the end of `orders` draw
    /// from the seed as usual. For replaying a recorded run, such as the golden tests
    /// against the authors' code. The orders are not part of the checkpointed state:
    /// supply them again when resuming.
    pub fn with_group_orders(mut self, orders: Vec<Vec<usize>>) -> Result<Self, MixingConfigError> {
        let k = self.k;
        let len = self.config.lp_rounds as usize * k;
        for (r, order) in orders.iter().enumerate() {
            let sweeps_ok = order.len() == len
                && order.chunks(k).all(|sweep| {
                    let mut s = sweep.to_vec();
                    s.sort_unstable();
                    s.iter().copied().eq(0..k)
                });
            if !sweeps_ok {
                return Err(MixingConfigError::Invalid {
                    field: "group_orders",
                    message: format!(
                        "round {r}: {order:?} is not lp_rounds = {} permutations of 0..{k}",
                        self.config.lp_rounds
                    ),
                });
            }
        }
        self.group_orders = orders;
        Ok(self)
    }

    pub fn state_ref(&self) -> &AioliState {
        &self.state
    }

    fn phase(&self, step: u64) -> Phase {
        let c = &self.config;
        if step < c.init_steps {
            return Phase::Init;
        }
        let d = step - c.init_steps;
        let (round, pos) = (d / c.update_steps, d % c.update_steps);
        let lp = c.learn_params_steps(self.k);
        if pos < lp {
            Phase::Learn {
                round,
                segment: pos / c.lp_steps,
                offset: pos % c.lp_steps,
            }
        } else {
            Phase::Exploit { first: pos == lp }
        }
    }

    /// The group trained in `segment` of `round`'s LearnParams.
    fn segment_group(&self, round: u64, segment: u64) -> usize {
        if let Some(order) = self.group_orders.get(round as usize) {
            return order[segment as usize];
        }
        let k = self.k as u64;
        permutation(self.k, self.seed, round, segment / k)[(segment % k) as usize]
    }

    /// Closes a LearnParams: unmix, normalise, update `p`.
    fn finish_round(&mut self) {
        let rounds = self.config.lp_rounds as f64;
        let graph: Vec<Vec<f64>> = self
            .state
            .graph
            .iter()
            .map(|row| row.iter().map(|x| x / rounds).collect())
            .collect();
        let a = unmix(&graph, self.config.one_hot_factor);
        let used = if self.config.normalize_a {
            normalize(&a)
        } else {
            a.clone()
        };
        let eta = self.config.eta;
        self.state.p = match self.config.ema {
            None => exponentiated_update(&self.state.p, &used, eta),
            Some(gamma) => {
                let ema = match &self.state.ema {
                    None => used,
                    Some(prev) => used
                        .iter()
                        .zip(prev)
                        .map(|(r, q)| {
                            r.iter()
                                .zip(q)
                                .map(|(x, y)| (1.0 - gamma) * x + gamma * y)
                                .collect()
                        })
                        .collect(),
                };
                let p = exponentiated_update(&vec![1.0; self.k], &ema, eta);
                self.state.ema = Some(ema);
                p
            }
        };
        self.state.last_a = Some(a);
        self.state.rounds_done += 1;
        self.state.graph = vec![vec![0.0; self.k]; self.k];
        self.state.previous = None;
    }
}

impl Scheduler for AioliScheduler {
    fn name(&self) -> &str {
        "aioli"
    }

    fn wants_validation(&self, step: u64) -> bool {
        match self.phase(step) {
            Phase::Learn { offset, .. } => offset == 0,
            Phase::Exploit { first } => first,
            Phase::Init => false,
        }
    }

    fn observe_validation(&mut self, step: u64, losses: &DomainLosses) {
        let phase = self.phase(step);
        let (round, ended) = match phase {
            Phase::Learn {
                round,
                segment,
                offset: 0,
            } => (round, segment),
            Phase::Exploit { first: true } => {
                let lp = self.config.learn_params_steps(self.k) / self.config.lp_steps;
                let d = step - self.config.init_steps;
                (d / self.config.update_steps, lp)
            }
            _ => return,
        };
        // A domain without a validation loss keeps its previous value (no drop).
        let new: Vec<f64> = match &self.state.previous {
            Some(prev) => losses
                .0
                .iter()
                .zip(prev)
                .map(|(l, p)| l.unwrap_or(*p))
                .collect(),
            None => losses.0.iter().map(|l| l.unwrap_or(0.0)).collect(),
        };
        if ended > 0 {
            if let Some(prev) = &self.state.previous {
                let j = self.segment_group(round, ended - 1);
                for (i, row) in self.state.graph.iter_mut().enumerate() {
                    row[j] += prev[i] - new[i];
                }
            }
        } else {
            self.state.graph = vec![vec![0.0; self.k]; self.k];
        }
        self.state.previous = Some(new);
        if matches!(phase, Phase::Exploit { .. }) {
            self.finish_round();
        }
    }

    fn proportions(&mut self, step: u64) -> Proportions {
        let p = match self.phase(step) {
            Phase::Init => return self.init.clone(),
            Phase::Learn { round, segment, .. } => smoothed_one_hot(
                self.k,
                self.segment_group(round, segment),
                self.config.one_hot_factor,
            ),
            Phase::Exploit { .. } => self.state.p.clone(),
        };
        Proportions::from_weights(p).expect("Aioli mixtures are valid distributions")
    }

    fn composition(&self, step: u64) -> Option<Composition> {
        match self.phase(step) {
            Phase::Learn { .. } => Some(Composition::Fixed),
            _ => None,
        }
    }

    /// The rows of the last estimate of `A` (`A[i]`: how training on each group moves
    /// group `i`'s loss), once the first LearnParams round has ended.
    fn watch(&self) -> Vec<(String, Vec<f64>)> {
        let rows = self.state.last_a.iter().flatten().enumerate();
        rows.map(|(i, row)| (format!("A[{i}]"), row.clone()))
            .collect()
    }

    fn state(&self) -> serde_json::Value {
        serde_json::to_value(&self.state).expect("Aioli state serialises")
    }

    fn restore(&mut self, state: &serde_json::Value) -> Result<(), String> {
        let s = restore_state("Aioli", state, self.k, |s: &AioliState| s.p.len())?;
        if s.graph.len() != self.k {
            return Err(format!(
                "Aioli state holds a {}-row graph for {} domains",
                s.graph.len(),
                self.k
            ));
        }
        self.state = s;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &[f64], b: &[f64], tol: f64) {
        assert_eq!(a.len(), b.len(), "{a:?} vs {b:?}");
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < tol, "{a:?} vs {b:?}");
        }
    }

    fn info(k: usize) -> DomainInfo {
        DomainInfo {
            names: (0..k).map(|i| format!("g{i}")).collect(),
            natural_weights: vec![1.0; k],
            seed: 7,
            steps: 1000,
        }
    }

    fn config() -> AioliConfig {
        AioliConfig {
            eta: 1.0,
            update_steps: 20,
            lp_rounds: 2,
            lp_steps: 3,
            one_hot_factor: 0.75,
            ema: None,
            normalize_a: true,
            init_steps: 0,
            init_proportions: InitWeights::Stratified,
            start_from_init: false,
        }
    }

    #[test]
    fn smoothed_one_hot_spreads_the_rest_evenly() {
        close(&smoothed_one_hot(3, 1, 0.5), &[0.25, 0.5, 0.25], 1e-15);
        close(&smoothed_one_hot(2, 0, 1.0), &[1.0, 0.0], 1e-15);
    }

    #[test]
    fn unmixing_and_normalisation_match_hand_computation() {
        // W = [[0.75, 0.25], [0.25, 0.75]], W^-1 = [[1.5, -0.5], [-0.5, 1.5]].
        // G = [[0.4, 0.1], [0.2, 0.3]]: A_0 = W^-1 [0.4, 0.1] = [0.55, -0.05],
        // A_1 = W^-1 [0.2, 0.3] = [0.15, 0.35].
        let a = unmix(&[vec![0.4, 0.1], vec![0.2, 0.3]], 0.75);
        close(&a[0], &[0.55, -0.05], 1e-12);
        close(&a[1], &[0.15, 0.35], 1e-12);
        // Shift by 0.05, divide by the sum 1.2.
        let n = normalize(&a);
        close(&n[0], &[0.5, 0.0], 1e-12);
        close(&n[1], &[0.15 / 1.2 + 0.05 / 1.2, 0.4 / 1.2], 1e-12);
        // Non-negative A: no shift.
        let n = normalize(&[vec![1.0, 3.0]]);
        close(&n[0], &[0.25, 0.75], 1e-12);
        // One-hot (factor 1): A = G.
        let g = vec![vec![0.3, -0.1], vec![0.0, 0.2]];
        assert_eq!(unmix(&g, 1.0), g);
    }

    #[test]
    fn exponentiated_gradient_matches_hand_computation() {
        // colsum of [[0.5, 0], [1/6, 1/3]] = [2/3, 1/3]; p = [0.5, 0.5], eta = 1:
        // p ∝ [e^(2/3), e^(1/3)] = [0.5825702, 0.4174298].
        let a = vec![vec![0.5, 0.0], vec![1.0 / 6.0, 1.0 / 3.0]];
        close(
            &exponentiated_update(&[0.5, 0.5], &a, 1.0),
            &[0.582_570_2, 0.417_429_8],
            1e-7,
        );
        // Multiplicative: a prior p carries over.
        let p = exponentiated_update(&[0.2, 0.8], &a, 1.0);
        let w = [0.2 * (2.0f64 / 3.0).exp(), 0.8 * (1.0f64 / 3.0).exp()];
        close(&p, &[w[0] / (w[0] + w[1]), w[1] / (w[0] + w[1])], 1e-12);
    }

    #[test]
    fn schedule_of_learn_params_and_exploit_steps() {
        let mut cfg = config();
        cfg.init_steps = 4;
        let s = AioliScheduler::new(&cfg, &info(3)).unwrap();
        // LearnParams: 2 sweeps * 3 steps * 3 groups = 18 of every 20 steps.
        assert_eq!(s.phase(3), Phase::Init);
        assert_eq!(
            s.phase(4),
            Phase::Learn {
                round: 0,
                segment: 0,
                offset: 0
            }
        );
        assert_eq!(
            s.phase(4 + 17),
            Phase::Learn {
                round: 0,
                segment: 5,
                offset: 2
            }
        );
        assert_eq!(s.phase(4 + 18), Phase::Exploit { first: true });
        assert_eq!(s.phase(4 + 19), Phase::Exploit { first: false });
        assert_eq!(
            s.phase(4 + 20),
            Phase::Learn {
                round: 1,
                segment: 0,
                offset: 0
            }
        );
        let wants: Vec<u64> = (0..30).filter(|&t| s.wants_validation(t)).collect();
        assert_eq!(wants, [4, 7, 10, 13, 16, 19, 22, 24, 27]);
        // Each sweep visits every group once; rounds use different orders.
        for round in 0..3 {
            for sweep in 0..2 {
                let mut g: Vec<usize> = (0..3)
                    .map(|i| s.segment_group(round, sweep * 3 + i))
                    .collect();
                g.sort();
                assert_eq!(g, [0, 1, 2]);
            }
        }
        let orders: Vec<Vec<usize>> = (0..6)
            .map(|r| (0..3).map(|i| s.segment_group(r, i)).collect())
            .collect();
        assert!(orders.iter().any(|o| o != &orders[0]), "{orders:?}");
        assert_eq!(
            s.composition(5),
            Some(Composition::Fixed),
            "LearnParams batches have exact counts"
        );
        assert_eq!(s.composition(4 + 19), None);
    }

    /// Feeding losses that follow the linear dynamic mixing law exactly,
    /// `L <- L - A p` per step, LearnParams recovers `lp_steps * A` (the drop over a
    /// segment) whatever the group order, and the update follows from it.
    #[test]
    fn learn_params_recovers_the_mixing_law_exactly() {
        let a_true = [
            vec![0.03, 0.01, 0.0],
            vec![0.005, 0.02, 0.01],
            vec![0.0, 0.0, 0.04],
        ];
        let mut cfg = config();
        cfg.init_steps = 2;
        let mut s = AioliScheduler::new(&cfg, &info(3)).unwrap();
        let mut loss = [5.0, 6.0, 7.0];
        for step in 0..cfg.init_steps + cfg.update_steps {
            if s.wants_validation(step) {
                s.observe_validation(step, &DomainLosses(loss.iter().map(|l| Some(*l)).collect()));
            }
            let p = s.proportions(step);
            for (i, l) in loss.iter_mut().enumerate() {
                *l -= (0..3).map(|j| a_true[i][j] * p.as_slice()[j]).sum::<f64>();
            }
        }
        let st = s.state_ref().clone();
        assert_eq!(st.rounds_done, 1);
        let a = st.last_a.as_ref().unwrap();
        for i in 0..3 {
            let want: Vec<f64> = a_true[i].iter().map(|x| x * 3.0).collect();
            close(&a[i], &want, 1e-9);
        }
        // Normalised A = A_true / sum (all entries >= 0); colsum = [0.035, 0.03, 0.05]/0.115.
        let sum: f64 = a_true.iter().flatten().sum();
        let col = [0.035 / sum, 0.03 / sum, 0.05 / sum];
        let w: Vec<f64> = col.iter().map(|c| c.exp()).collect();
        let z: f64 = w.iter().sum();
        close(&st.p, &w.iter().map(|x| x / z).collect::<Vec<_>>(), 1e-9);
        // The exploit steps of the round train on p.
        close(
            s.proportions(cfg.init_steps + 19).as_slice(),
            &st.p.clone(),
            1e-12,
        );
    }

    #[test]
    fn ema_variant_restarts_from_uniform_each_round() {
        let mut cfg = config();
        cfg.ema = Some(0.5);
        cfg.lp_rounds = 1;
        cfg.update_steps = 10;
        let mut s = AioliScheduler::new(&cfg, &info(2)).unwrap();
        // Round 0: A_0 ∝ [[1, 0], [0, 1]]; round 1: A_1 ∝ [[0, 0], [0, 1]].
        let rounds = [
            [vec![0.1, 0.0], vec![0.0, 0.1]],
            [vec![0.0, 0.0], vec![0.0, 0.2]],
        ];
        let mut loss = [5.0, 5.0];
        for step in 0..20u64 {
            if s.wants_validation(step) {
                s.observe_validation(step, &DomainLosses(loss.iter().map(|l| Some(*l)).collect()));
            }
            let p = s.proportions(step);
            let a = &rounds[(step / 10) as usize];
            for (i, l) in loss.iter_mut().enumerate() {
                *l -= (0..2).map(|j| a[i][j] * p.as_slice()[j]).sum::<f64>();
            }
        }
        // Round 0 normalised: [[0.5, 0], [0, 0.5]] -> p uniform. Round 1 normalised:
        // [[0, 0], [0, 1]]; EMA 0.5: [[0.25, 0], [0, 0.75]]; p ∝ exp([0.25, 0.75]).
        let s_state = s.state_ref();
        assert_eq!(s_state.rounds_done, 2);
        let w = [0.25f64.exp(), 0.75f64.exp()];
        close(
            &s_state.p,
            &[w[0] / (w[0] + w[1]), w[1] / (w[0] + w[1])],
            1e-9,
        );
    }

    #[test]
    fn supplied_group_orders_are_replayed_and_checked() {
        let cfg = config(); // lp_rounds 2, K = 3
        let s = AioliScheduler::new(&cfg, &info(3))
            .unwrap()
            .with_group_orders(vec![vec![2, 0, 1, 1, 2, 0]])
            .unwrap();
        let groups: Vec<usize> = (0..6).map(|seg| s.segment_group(0, seg)).collect();
        assert_eq!(groups, [2, 0, 1, 1, 2, 0]);
        // Past the supplied rounds: the seeded orders.
        let seeded = AioliScheduler::new(&cfg, &info(3)).unwrap();
        assert_eq!(s.segment_group(1, 4), seeded.segment_group(1, 4));
        for bad in [
            vec![0, 1, 2],
            vec![0, 0, 1, 1, 2, 2],
            vec![0, 1, 3, 0, 1, 2],
        ] {
            let e = AioliScheduler::new(&cfg, &info(3))
                .unwrap()
                .with_group_orders(vec![bad])
                .unwrap_err()
                .to_string();
            assert!(e.starts_with("mixing.group_orders round 0: "), "{e}");
        }
    }

    #[test]
    fn config_checks_name_the_field() {
        let names = info(3).names;
        let mut c = config();
        c.update_steps = 18;
        let e = c.validate(&names).unwrap_err().to_string();
        assert!(
            e.starts_with("mixing.update_steps") && e.contains("18"),
            "{e}"
        );
        let mut c = config();
        c.one_hot_factor = 1.0 / 3.0;
        let e = c.validate(&names).unwrap_err().to_string();
        assert!(e.starts_with("mixing.one_hot_factor"), "{e}");
        let mut c = config();
        c.ema = Some(1.0);
        assert!(c
            .validate(&names)
            .unwrap_err()
            .to_string()
            .starts_with("mixing.ema"));
        let toml_cfg: crate::MixingConfig = toml::from_str(
            "method = \"aioli\"\neta = 0.2\nupdate_steps = 250\nlp_rounds = 4\nlp_steps = 4\n\
             one_hot_factor = 0.625\nema = 0.1\ninit_steps = 100\n\
             init_proportions = { g0 = 1.0, g1 = 3.0, g2 = 0.0 }",
        )
        .unwrap();
        let mut s = crate::build_scheduler(&toml_cfg, &info(3)).unwrap();
        assert_eq!(s.name(), "aioli");
        close(s.proportions(0).as_slice(), &[0.25, 0.75, 0.0], 1e-12);
        let e = toml::from_str::<crate::MixingConfig>("method = \"aioli\"\neta = 0.2")
            .unwrap_err()
            .to_string();
        assert!(e.contains("update_steps"), "{e}");
    }

    #[test]
    fn state_round_trips() {
        let mut s = AioliScheduler::new(&config(), &info(2)).unwrap();
        s.observe_validation(0, &DomainLosses(vec![Some(3.0), Some(4.0)]));
        let saved = s.state();
        let mut t = AioliScheduler::new(&config(), &info(2)).unwrap();
        t.restore(&saved).unwrap();
        assert_eq!(t.state_ref(), s.state_ref());
        let mut u = AioliScheduler::new(&config(), &info(3)).unwrap();
        assert!(u.restore(&saved).unwrap_err().contains("2 domains"));
    }
}
