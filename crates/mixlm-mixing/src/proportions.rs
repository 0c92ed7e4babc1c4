//! Domain identifiers, proportions and per-domain losses.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Index of a domain in the run's domain list (the order of `[data]` in the config).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DomainId(pub usize);

/// Why a vector of weights is not a valid mixture.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProportionsError {
    #[error("proportions are empty: at least one domain is needed")]
    Empty,
    #[error("proportion of domain {index} is {value}: every proportion must be finite and >= 0")]
    Invalid { index: usize, value: f64 },
    #[error("proportions sum to {0}: at least one must be > 0")]
    ZeroSum(f64),
}

/// A probability distribution over domains: finite, non-negative, summing to 1.
///
/// The constructor is the only way to get one, so a scheduler can never hand the
/// trainer NaN or negative weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "Vec<f64>", into = "Vec<f64>")]
pub struct Proportions(Vec<f64>);

impl Proportions {
    /// Normalises non-negative finite weights to sum to 1.
    pub fn from_weights(weights: Vec<f64>) -> Result<Self, ProportionsError> {
        if weights.is_empty() {
            return Err(ProportionsError::Empty);
        }
        if let Some((index, &value)) = weights
            .iter()
            .enumerate()
            .find(|(_, w)| !w.is_finite() || **w < 0.0)
        {
            return Err(ProportionsError::Invalid { index, value });
        }
        let sum: f64 = weights.iter().sum();
        if sum <= 0.0 || !sum.is_finite() {
            return Err(ProportionsError::ZeroSum(sum));
        }
        Ok(Self(weights.into_iter().map(|w| w / sum).collect()))
    }

    /// Equal weight on each of `k` domains.
    pub fn uniform(k: usize) -> Self {
        assert!(k > 0, "uniform proportions need at least one domain");
        Self(vec![1.0 / k as f64; k])
    }

    /// All weight on domain `d` of `k`.
    pub fn one_hot(k: usize, d: DomainId) -> Self {
        let mut w = vec![0.0; k];
        w[d.0] = 1.0;
        Self(w)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn as_slice(&self) -> &[f64] {
        &self.0
    }

    pub fn get(&self, d: DomainId) -> f64 {
        self.0[d.0]
    }

    /// Largest-remainder apportionment of `n` items: counts that sum to `n` exactly and
    /// differ from `n * p_i` by less than one. Used for fixed per-batch compositions.
    pub fn apportion(&self, n: usize) -> Vec<usize> {
        let exact: Vec<f64> = self.0.iter().map(|p| p * n as f64).collect();
        let mut counts: Vec<usize> = exact.iter().map(|x| x.floor() as usize).collect();
        let assigned: usize = counts.iter().sum();
        let mut order: Vec<usize> = (0..self.0.len()).collect();
        // Largest fractional part first; ties go to the lower index for determinism.
        order.sort_by(|&a, &b| {
            let fa = exact[a] - exact[a].floor();
            let fb = exact[b] - exact[b].floor();
            fb.partial_cmp(&fa).unwrap().then(a.cmp(&b))
        });
        for &i in order.iter().take(n.saturating_sub(assigned)) {
            counts[i] += 1;
        }
        counts
    }
}

impl TryFrom<Vec<f64>> for Proportions {
    type Error = ProportionsError;
    fn try_from(v: Vec<f64>) -> Result<Self, Self::Error> {
        Self::from_weights(v)
    }
}

impl From<Proportions> for Vec<f64> {
    fn from(p: Proportions) -> Self {
        p.0
    }
}

impl fmt::Display for Proportions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(|p| format!("{p:.3}")).collect();
        write!(f, "[{}]", parts.join(" "))
    }
}

/// Mean loss (nats per token) of each domain; `None` where a domain was not measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DomainLosses(pub Vec<Option<f64>>);

impl DomainLosses {
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn get(&self, d: DomainId) -> Option<f64> {
        self.0[d.0]
    }
}

/// How a batch's sequences are split among domains.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Composition {
    /// Each sequence's domain is drawn i.i.d. from the proportions: unbiased, noisy
    /// (what most mixing papers assume).
    #[default]
    Sample,
    /// Exact counts by largest-remainder apportionment: no sampling noise, so small
    /// proportions may get zero sequences in every batch.
    Fixed,
    /// One domain per micro-batch, drawn from the proportions: every sequence of the
    /// batch comes from it (ODM's single-domain batches).
    Single,
}

/// Domain weights a proxy run updates every step and averages into the mixture it
/// learns (DoReMi's and DoGE's `alpha`); checkpointed as the method's state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AveragedWeights {
    /// The current domain weights.
    pub alpha: Vec<f64>,
    /// Sum of the weights after every update, for the average.
    pub alpha_sum: Vec<f64>,
    pub updates: u64,
}

impl AveragedWeights {
    /// Uniform weights over `k` domains, nothing averaged yet.
    pub fn uniform(k: usize) -> Self {
        Self {
            alpha: vec![1.0 / k as f64; k],
            alpha_sum: vec![0.0; k],
            updates: 0,
        }
    }

    /// Records the weights of one more update.
    pub fn push(&mut self, alpha: Vec<f64>) {
        for (s, a) in self.alpha_sum.iter_mut().zip(&alpha) {
            *s += a;
        }
        self.updates += 1;
        self.alpha = alpha;
    }

    /// The current weights.
    pub fn current(&self) -> Option<Proportions> {
        Proportions::from_weights(self.alpha.clone()).ok()
    }

    /// The average over all updates (`None` before the first).
    pub fn average(&self) -> Option<Proportions> {
        if self.updates == 0 {
            return None;
        }
        Proportions::from_weights(self.alpha_sum.clone()).ok()
    }
}

/// `softmax(logits)`, max-shifted so large logits cannot overflow. Every
/// multiplicative-weights rule here (`p * exp(eta * g)`) is a softmax of
/// `ln p + eta * g`.
pub fn softmax(logits: &[f64]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
    let sum: f64 = e.iter().sum();
    e.iter().map(|x| x / sum).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_weights() {
        let p = Proportions::from_weights(vec![1.0, 3.0]).unwrap();
        assert_eq!(p.as_slice(), &[0.25, 0.75]);
    }

    #[test]
    fn rejects_nan_negative_and_zero() {
        assert_eq!(
            Proportions::from_weights(vec![1.0, f64::NAN])
                .unwrap_err()
                .to_string(),
            "proportion of domain 1 is NaN: every proportion must be finite and >= 0"
        );
        assert!(matches!(
            Proportions::from_weights(vec![-0.1, 1.0]),
            Err(ProportionsError::Invalid { index: 0, .. })
        ));
        assert!(matches!(
            Proportions::from_weights(vec![0.0, 0.0]),
            Err(ProportionsError::ZeroSum(_))
        ));
        assert_eq!(
            Proportions::from_weights(vec![]),
            Err(ProportionsError::Empty)
        );
    }

    #[test]
    fn apportion_sums_exactly_and_stays_within_one() {
        let p = Proportions::from_weights(vec![0.5, 0.3, 0.2]).unwrap();
        assert_eq!(p.apportion(10), vec![5, 3, 2]);
        // 7 * [0.5, 0.3, 0.2] = [3.5, 2.1, 1.4]: floors 3,2,1 (6); the largest remainder (0.5) gets the 7th.
        assert_eq!(p.apportion(7), vec![4, 2, 1]);
        let p = Proportions::uniform(3);
        assert_eq!(p.apportion(4), vec![2, 1, 1]);
    }

    #[test]
    fn serde_round_trip_validates() {
        let p = Proportions::from_weights(vec![2.0, 2.0]).unwrap();
        let s = serde_json::to_string(&p).unwrap();
        assert_eq!(s, "[0.5,0.5]");
        let back: Proportions = serde_json::from_str(&s).unwrap();
        assert_eq!(back, p);
        assert!(serde_json::from_str::<Proportions>("[-1.0, 2.0]").is_err());
    }
}
