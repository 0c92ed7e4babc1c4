//! SampleMix (Xi et al. 2025, "SampleMix: A Sample-wise Pre-training Data Mixing
//! Strategy by Coordinating Data Quality and Diversity"): a weight per document
//! instead of per domain, and a token budget turned into how often each document is
//! trained on. The domain proportions are an output.
//!
//! The pieces, each a pure function so it is tested against the formulas:
//! - [`cluster_diversity`]: a cluster's diversity from its compactness (mean distance
//!   of its members to the centroid: tight clusters hold near-duplicates) and its
//!   separation (distance to the nearest other centroid: isolated clusters are rare
//!   content), their product, min-max normalised over clusters to `[0, 1]`;
//! - [`sample_weights`]: min-max normalised quality `q` and diversity `d` combined as
//!   `p(x) = alpha * d(x) + (1 - alpha) * q(x)` (`alpha = 0.8`, the paper's best);
//! - [`expected_counts`]: `n(x) = T * p(x) / sum_y p(y) len(y)`, so the expected
//!   tokens `sum_x n(x) len(x)` are the budget `T`, below or above the corpus size;
//! - [`sample_counts`]: `floor(n) + Bernoulli(n - floor(n))` per document. The
//!   Bernoulli draws are coupled (weighted pipage rounding, in a seeded random order)
//!   so that each document's marginal is exactly that Bernoulli while the tokens kept
//!   differ from the budget by less than one document;
//! - [`SampleSummary`]: tokens kept per domain, the resulting proportions, and the
//!   histogram of counts.

use std::collections::BTreeMap;
use std::path::PathBuf;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// `method = "samplemix"`: train on a sampling plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SampleMixConfig {
    /// The plan folder `mixlm samplemix` wrote (`counts/<domain>.u32`).
    pub plan: PathBuf,
}

impl SampleMixConfig {
    pub fn validate(&self) -> Result<(), crate::MixingConfigError> {
        if self.plan.as_os_str().is_empty() {
            return Err(crate::MixingConfigError::Invalid {
                field: "plan",
                message: "is empty: name the folder mixlm samplemix wrote".into(),
            });
        }
        Ok(())
    }
}

/// The paper's best mix of diversity and quality.
pub const DEFAULT_ALPHA: f64 = 0.8;

/// Why SampleMix inputs are unusable.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SampleMixError {
    #[error("{what}: {n} values for {expected} documents")]
    Length {
        what: &'static str,
        n: usize,
        expected: usize,
    },
    #[error("{what} of document {index} is {value}: scores must be finite")]
    NotFinite {
        what: &'static str,
        index: usize,
        value: f64,
    },
    #[error("alpha = {0} must be within [0, 1]")]
    Alpha(f64),
    #[error("no document has tokens: nothing to sample")]
    Empty,
}

/// `(v - min) / (max - min)`; all zeros when the values are equal (they carry no
/// preference). Rejects non-finite values, naming `what` and the document.
pub fn min_max(values: &[f64], what: &'static str) -> Result<Vec<f64>, SampleMixError> {
    if let Some((index, &value)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(SampleMixError::NotFinite { what, index, value });
    }
    let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    Ok(if hi > lo {
        values.iter().map(|v| (v - lo) / (hi - lo)).collect()
    } else {
        vec![0.0; values.len()]
    })
}

/// Diversity of each cluster in `[0, 1]`: `compactness * separation`, min-max
/// normalised. `mean_distance[c]` is the mean distance of cluster `c`'s members to its
/// centroid, `nearest_centroid[c]` the distance from its centroid to the nearest other
/// one. Empty clusters should be given `0` for both.
pub fn cluster_diversity(
    mean_distance: &[f64],
    nearest_centroid: &[f64],
) -> Result<Vec<f64>, SampleMixError> {
    check_len(
        "nearest_centroid",
        nearest_centroid.len(),
        mean_distance.len(),
    )?;
    let raw: Vec<f64> = mean_distance
        .iter()
        .zip(nearest_centroid)
        .map(|(c, s)| c * s)
        .collect();
    min_max(&raw, "cluster diversity")
}

fn check_len(what: &'static str, n: usize, expected: usize) -> Result<(), SampleMixError> {
    if n == expected {
        Ok(())
    } else {
        Err(SampleMixError::Length { what, n, expected })
    }
}

/// `p(x) = alpha * d(x) + (1 - alpha) * q(x)` with both scores min-max normalised over
/// the corpus (quality on any scale, e.g. the paper's 0..10).
pub fn sample_weights(
    quality: &[f64],
    diversity: &[f64],
    alpha: f64,
) -> Result<Vec<f64>, SampleMixError> {
    if !(0.0..=1.0).contains(&alpha) {
        return Err(SampleMixError::Alpha(alpha));
    }
    check_len("diversity", diversity.len(), quality.len())?;
    let q = min_max(quality, "quality")?;
    let d = min_max(diversity, "diversity")?;
    Ok(q.iter()
        .zip(&d)
        .map(|(q, d)| alpha * d + (1.0 - alpha) * q)
        .collect())
}

/// `n(x) = budget * p(x) / sum_y p(y) len(y)`: expected times each document is
/// trained on, so that the expected tokens are `budget`. When every weight is zero
/// (all scores equal) the documents are weighted equally.
pub fn expected_counts(
    weights: &[f64],
    lengths: &[u64],
    budget: u64,
) -> Result<Vec<f64>, SampleMixError> {
    check_len("lengths", lengths.len(), weights.len())?;
    if let Some((index, &value)) = weights
        .iter()
        .enumerate()
        .find(|(_, w)| !w.is_finite() || **w < 0.0)
    {
        return Err(SampleMixError::NotFinite {
            what: "weight",
            index,
            value,
        });
    }
    let mass = |w: &dyn Fn(usize) -> f64| -> f64 {
        lengths
            .iter()
            .enumerate()
            .map(|(i, &l)| w(i) * l as f64)
            .sum()
    };
    let weighted = mass(&|i| weights[i]);
    let (weights, total): (Vec<f64>, f64) = if weighted > 0.0 {
        (weights.to_vec(), weighted)
    } else {
        (vec![1.0; weights.len()], mass(&|_| 1.0))
    };
    if total <= 0.0 {
        return Err(SampleMixError::Empty);
    }
    let scale = budget as f64 / total;
    Ok(weights
        .iter()
        .zip(lengths)
        .map(|(w, &l)| if l == 0 { 0.0 } else { w * scale })
        .collect())
}

/// Integer counts with `floor(n) + Bernoulli(n - floor(n))` marginals whose tokens
/// `sum_x count(x) len(x)` differ from `sum_x n(x) len(x)` by less than the longest
/// document. Deterministic for a `seed`.
///
/// Weighted pipage rounding: documents are visited in a seeded random order; the one
/// still fractional and the next are moved along the direction that keeps their
/// token mass `f_a len_a + f_b len_b`, by one of the two largest steps that keep both
/// in `[0, 1]`, chosen with probabilities that leave each expectation unchanged; one
/// of the pair ends at 0 or 1. The last fractional document is rounded on its own.
pub fn sample_counts(expected: &[f64], lengths: &[u64], seed: u64) -> Vec<u32> {
    assert_eq!(expected.len(), lengths.len(), "one length per document");
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut counts: Vec<u32> = expected.iter().map(|n| n.floor() as u32).collect();
    let mut frac: Vec<f64> = expected.iter().map(|n| n - n.floor()).collect();
    let mut order: Vec<usize> = (0..expected.len())
        .filter(|&i| frac[i] > 0.0 && lengths[i] > 0)
        .collect();
    order.shuffle(&mut rng);
    let mut open: Option<usize> = None;
    for j in order {
        let Some(i) = open else {
            open = Some(j);
            continue;
        };
        let (wi, wj) = (lengths[i] as f64, lengths[j] as f64);
        // Up: i gains t / wi, j loses t / wj; down: the reverse. t is token mass.
        let up = ((1.0 - frac[i]) * wi).min(frac[j] * wj);
        let down = (frac[i] * wi).min((1.0 - frac[j]) * wj);
        let t = if rng.random::<f64>() * (up + down) < down {
            up
        } else {
            -down
        };
        frac[i] = (frac[i] + t / wi).clamp(0.0, 1.0);
        frac[j] = (frac[j] - t / wj).clamp(0.0, 1.0);
        // Whichever reached 0 or 1 is settled; the other stays open.
        let settled = |f: f64| !(1e-12..=1.0 - 1e-12).contains(&f);
        open = match (settled(frac[i]), settled(frac[j])) {
            (true, true) => None,
            (true, false) => Some(j),
            _ => Some(i),
        };
        for k in [i, j] {
            if settled(frac[k]) && Some(k) != open {
                frac[k] = frac[k].round();
            }
        }
    }
    if let Some(i) = open {
        frac[i] = f64::from(rng.random::<f64>() < frac[i]);
    }
    for (c, f) in counts.iter_mut().zip(&frac) {
        *c += f.round() as u32;
    }
    counts
}

/// What a sampling plan keeps: tokens and documents per domain, the resulting
/// proportions, and how many documents got each count.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampleSummary {
    pub budget: u64,
    pub tokens_kept: u64,
    pub documents: u64,
    /// Documents sampled at least once.
    pub documents_kept: u64,
    /// Per domain: tokens kept.
    pub domain_tokens: BTreeMap<String, u64>,
    /// Per domain: share of the tokens kept (the mixture SampleMix arrived at).
    pub proportions: BTreeMap<String, f64>,
    /// Per domain: share of the corpus's tokens (the natural mixture), to compare.
    pub natural: BTreeMap<String, f64>,
    /// `histogram[c]`: documents sampled `c` times.
    pub histogram: Vec<u64>,
    /// How the scores were made (`quality`, `diversity`), as the scoring steps
    /// recorded them; filled in by the caller.
    #[serde(default)]
    pub scored_with: BTreeMap<String, String>,
}

impl SampleSummary {
    /// Tallies `counts` of documents with `lengths` in `domains` (a name each).
    pub fn new(budget: u64, counts: &[u32], lengths: &[u64], domains: &[&str]) -> Self {
        let mut domain_tokens: BTreeMap<String, u64> = BTreeMap::new();
        let mut corpus: BTreeMap<String, u64> = BTreeMap::new();
        let mut histogram = Vec::new();
        for ((&c, &l), &d) in counts.iter().zip(lengths).zip(domains) {
            *domain_tokens.entry(d.to_string()).or_default() += c as u64 * l;
            *corpus.entry(d.to_string()).or_default() += l;
            if histogram.len() <= c as usize {
                histogram.resize(c as usize + 1, 0);
            }
            histogram[c as usize] += 1;
        }
        let share = |m: &BTreeMap<String, u64>| {
            let total = m.values().sum::<u64>().max(1) as f64;
            m.iter()
                .map(|(k, &v)| (k.clone(), v as f64 / total))
                .collect::<BTreeMap<_, _>>()
        };
        Self {
            budget,
            tokens_kept: domain_tokens.values().sum(),
            documents: counts.len() as u64,
            documents_kept: counts.iter().filter(|&&c| c > 0).count() as u64,
            proportions: share(&domain_tokens),
            natural: share(&corpus),
            domain_tokens,
            histogram,
            scored_with: BTreeMap::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &[f64], b: &[f64]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-12)
    }

    #[test]
    fn min_max_and_constant_scores() {
        assert!(close(
            &min_max(&[2.0, 4.0, 3.0], "q").unwrap(),
            &[0.0, 1.0, 0.5]
        ));
        assert_eq!(min_max(&[7.0, 7.0], "q").unwrap(), vec![0.0, 0.0]);
        let e = min_max(&[1.0, f64::NAN], "quality").unwrap_err();
        assert_eq!(
            e.to_string(),
            "quality of document 1 is NaN: scores must be finite"
        );
    }

    #[test]
    fn diversity_orders_loose_isolated_clusters_first() {
        // Cluster 0: tight and near another (redundant); 1: loose, near; 2: loose and
        // far (rarest). Products 0.1*1, 0.5*1, 0.5*4.
        let d = cluster_diversity(&[0.1, 0.5, 0.5], &[1.0, 1.0, 4.0]).unwrap();
        assert!(close(&d, &[0.0, 0.4 / 1.9, 1.0]), "{d:?}");
        assert!(cluster_diversity(&[1.0], &[]).is_err());
    }

    #[test]
    fn weights_follow_the_formula() {
        // q normalised: [0, 1, 0.5]; d normalised: [1, 0, 0.5].
        let p = sample_weights(&[0.0, 10.0, 5.0], &[0.9, 0.1, 0.5], 0.8).unwrap();
        assert!(close(&p, &[0.8, 0.2, 0.5]), "{p:?}");
        let p = sample_weights(&[0.0, 10.0, 5.0], &[0.9, 0.1, 0.5], 0.0).unwrap();
        assert!(close(&p, &[0.0, 1.0, 0.5]));
        assert_eq!(
            sample_weights(&[1.0], &[1.0], 1.5).unwrap_err(),
            SampleMixError::Alpha(1.5)
        );
        assert!(sample_weights(&[1.0, 2.0], &[1.0], 0.5).is_err());
    }

    #[test]
    fn expected_counts_spend_the_budget() {
        let w = [0.8, 0.2, 0.5, 0.0];
        let len = [100u64, 300, 50, 10];
        for budget in [100u64, 1_000, 10_000] {
            let n = expected_counts(&w, &len, budget).unwrap();
            let tokens: f64 = n.iter().zip(&len).map(|(n, &l)| n * l as f64).sum();
            assert!(
                (tokens - budget as f64).abs() < 1e-6,
                "{tokens} vs {budget}"
            );
            // n(x) / n(y) = p(x) / p(y); a zero weight is never sampled.
            assert!((n[0] / n[1] - 4.0).abs() < 1e-12);
            assert_eq!(n[3], 0.0);
        }
        // sum p len = 80 + 60 + 25 = 165; n(0) = 1000 * 0.8 / 165.
        let n = expected_counts(&w, &len, 1_000).unwrap();
        assert!((n[0] - 800.0 / 165.0).abs() < 1e-12);
        // All weights zero: uniform.
        let n = expected_counts(&[0.0, 0.0], &[10, 30], 80).unwrap();
        assert!(close(&n, &[2.0, 2.0]));
        assert_eq!(
            expected_counts(&[1.0], &[0], 10).unwrap_err(),
            SampleMixError::Empty
        );
    }

    #[test]
    fn counts_keep_the_budget_within_one_document() {
        let len: Vec<u64> = (0..500).map(|i| 20 + (i * 37 % 400) as u64).collect();
        let w: Vec<f64> = (0..500).map(|i| ((i * 13) % 17) as f64 / 16.0).collect();
        let longest = *len.iter().max().unwrap() as f64;
        for budget in [5_000u64, 60_000, 250_000] {
            let n = expected_counts(&w, &len, budget).unwrap();
            for seed in 0..5 {
                let c = sample_counts(&n, &len, seed);
                let tokens: u64 = c.iter().zip(&len).map(|(&c, &l)| c as u64 * l).sum();
                assert!(
                    (tokens as f64 - budget as f64).abs() < longest,
                    "budget {budget} seed {seed}: {tokens}"
                );
                for (c, n) in c.iter().zip(&n) {
                    assert!(*c as f64 == n.floor() || *c as f64 == n.floor() + 1.0);
                }
            }
        }
    }

    #[test]
    fn counts_are_deterministic_and_unbiased() {
        let n = [0.25, 1.5, 0.75, 2.1, 0.4];
        let len = [10u64, 40, 25, 5, 60];
        assert_eq!(sample_counts(&n, &len, 7), sample_counts(&n, &len, 7));
        let runs = 20_000;
        let mut sum = [0.0f64; 5];
        let mut differs = false;
        for seed in 0..runs {
            let c = sample_counts(&n, &len, seed);
            differs |= c != sample_counts(&n, &len, 0);
            for (s, &c) in sum.iter_mut().zip(&c) {
                *s += c as f64;
            }
        }
        assert!(differs, "the seed changes the draw");
        // Each marginal is floor(n) + Bernoulli(frac): its mean is n (within 4 sd).
        for (s, &n) in sum.iter().zip(&n) {
            let f = n - f64::floor(n);
            let sd = (f * (1.0 - f) / runs as f64).sqrt();
            assert!(
                (s / runs as f64 - n).abs() < 4.0 * sd + 1e-9,
                "{} vs {n}",
                s / runs as f64
            );
        }
    }

    #[test]
    fn summary_tallies_domains_and_histogram() {
        let s = SampleSummary::new(100, &[0, 2, 1, 2], &[10, 20, 30, 5], &["a", "a", "b", "b"]);
        assert_eq!(s.tokens_kept, 40 + 30 + 10);
        assert_eq!(s.domain_tokens["a"], 40);
        assert!((s.proportions["b"] - 0.5).abs() < 1e-12);
        assert!((s.natural["a"] - 30.0 / 65.0).abs() < 1e-12);
        assert_eq!(s.histogram, vec![1, 1, 2]);
        assert_eq!((s.documents, s.documents_kept), (4, 3));
    }
}
