//! Turning domain proportions into batches: which domain and which window each
//! sequence of a batch comes from.

use crate::seeding::{rng_from_words, unit_f64};
use crate::source::{Split, TokenSource};
use mixlm_mixing::{Composition, DomainId, Proportions};
use serde::{Deserialize, Serialize};

const TAG_SAMPLER: u64 = 0x73616d706c6572; // "sampler"

/// Everything needed to continue the exact batch sequence after a restart; saved in checkpoints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SamplerState {
    pub rng_seed: u64,
    /// Number of batches drawn so far; batch `b`'s randomness is keyed on `(rng_seed, b)`.
    pub batches_drawn: u64,
    /// Next unused training window index of each domain.
    pub cursors: Vec<u64>,
}

/// A checkpointed sampler state that does not fit the run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SamplerError {
    #[error("sampler state has {found} domain cursors but the data has {expected} domains")]
    DomainCount { expected: usize, found: usize },
}

/// Draws the domain and window of every sequence of a batch.
///
/// Each domain is read sequentially through its own cursor, so no window is seen
/// twice (until a bounded source wraps) whatever the proportions do. Batch `b` draws
/// its domains with a generator keyed on `(seed, b)` only, so a sampler restored from
/// [`MixtureSampler::state`] continues the identical sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MixtureSampler {
    seed: u64,
    composition: Composition,
    batches_drawn: u64,
    cursors: Vec<u64>,
}

impl MixtureSampler {
    pub fn new(num_domains: usize, seed: u64, composition: Composition) -> Self {
        Self {
            seed,
            composition,
            batches_drawn: 0,
            cursors: vec![0; num_domains],
        }
    }

    /// A sampler continuing from a checkpointed state.
    pub fn from_state(state: SamplerState, composition: Composition) -> Self {
        Self {
            seed: state.rng_seed,
            composition,
            batches_drawn: state.batches_drawn,
            cursors: state.cursors,
        }
    }

    pub fn state(&self) -> SamplerState {
        SamplerState {
            rng_seed: self.seed,
            batches_drawn: self.batches_drawn,
            cursors: self.cursors.clone(),
        }
    }

    /// Replaces the state with a checkpointed one, checking it has one cursor per domain.
    pub fn restore(&mut self, state: SamplerState) -> Result<(), SamplerError> {
        if state.cursors.len() != self.cursors.len() {
            return Err(SamplerError::DomainCount {
                expected: self.cursors.len(),
                found: state.cursors.len(),
            });
        }
        self.seed = state.rng_seed;
        self.batches_drawn = state.batches_drawn;
        self.cursors = state.cursors;
        Ok(())
    }

    pub fn composition(&self) -> Composition {
        self.composition
    }

    pub fn num_domains(&self) -> usize {
        self.cursors.len()
    }

    /// `(domain, window index)` of each of the `batch_size` sequences of the next
    /// batch, split among domains by the sampler's own composition.
    pub fn next_batch(
        &mut self,
        proportions: &Proportions,
        batch_size: usize,
    ) -> Vec<(DomainId, u64)> {
        self.next_batch_as(proportions, self.composition, batch_size)
    }

    /// [`MixtureSampler::next_batch`] with a composition chosen for this batch (a
    /// scheduler may ask for another one, e.g. Aioli's fixed LearnParams batches).
    ///
    /// [`Composition::Sample`]: domains drawn i.i.d. from `proportions`, in draw order;
    /// [`Composition::Fixed`]: `proportions.apportion(batch_size)` sequences of each
    /// domain, grouped in domain order; [`Composition::Single`]: one domain drawn from
    /// `proportions` for the whole batch. The window index is the domain's cursor,
    /// which then advances. Panics if `proportions` does not have one entry per domain.
    pub fn next_batch_as(
        &mut self,
        proportions: &Proportions,
        composition: Composition,
        batch_size: usize,
    ) -> Vec<(DomainId, u64)> {
        assert_eq!(
            proportions.len(),
            self.cursors.len(),
            "proportions have {} domains, the sampler {}",
            proportions.len(),
            self.cursors.len()
        );
        let domains: Vec<usize> = match composition {
            Composition::Sample | Composition::Single => {
                let p = proportions.as_slice();
                let mut cum: Vec<f64> = p
                    .iter()
                    .scan(0.0, |acc, &x| {
                        *acc += x;
                        Some(*acc)
                    })
                    .collect();
                // Close the distribution at the last positive domain so rounding can
                // never select a zero-weight domain.
                let last = p.iter().rposition(|&x| x > 0.0).unwrap_or(0);
                for c in &mut cum[last..] {
                    *c = f64::INFINITY;
                }
                let mut rng = rng_from_words(&[TAG_SAMPLER, self.seed, self.batches_drawn]);
                let mut draw = || {
                    let u = unit_f64(&mut rng);
                    cum.partition_point(|&c| c <= u)
                };
                if composition == Composition::Single {
                    vec![draw(); batch_size]
                } else {
                    (0..batch_size).map(|_| draw()).collect()
                }
            }
            Composition::Fixed => proportions
                .apportion(batch_size)
                .into_iter()
                .enumerate()
                .flat_map(|(d, n)| std::iter::repeat_n(d, n))
                .collect(),
        };
        self.batches_drawn += 1;
        domains
            .into_iter()
            .map(|d| {
                let index = self.cursors[d];
                self.cursors[d] += 1;
                (DomainId(d), index)
            })
            .collect()
    }
}

/// The tokens of `picks`, flattened row-major as `[picks.len(), seq_len + 1]`.
pub fn fetch_batch(
    source: &dyn TokenSource,
    split: Split,
    picks: &[(DomainId, u64)],
    seq_len: usize,
) -> Vec<u32> {
    let mut out = Vec::with_capacity(picks.len() * (seq_len + 1));
    for &(domain, index) in picks {
        let before = out.len();
        source.window_into(domain, split, index, seq_len, &mut out);
        assert_eq!(
            out.len() - before,
            seq_len + 1,
            "token source returned a window of the wrong length"
        );
    }
    out
}

/// The fixed validation set of a domain: windows `0..n` (to fetch from [`Split::Validation`]).
pub fn validation_picks(domain: DomainId, n: u64) -> Vec<(DomainId, u64)> {
    (0..n).map(|i| (domain, i)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{SyntheticConfig, SyntheticCorpus};

    fn props(w: &[f64]) -> Proportions {
        Proportions::from_weights(w.to_vec()).unwrap()
    }

    #[test]
    fn same_seed_same_batches_different_seed_different() {
        let p = props(&[0.4, 0.3, 0.2, 0.1]);
        let mut a = MixtureSampler::new(4, 5, Composition::Sample);
        let mut b = MixtureSampler::new(4, 5, Composition::Sample);
        let mut c = MixtureSampler::new(4, 6, Composition::Sample);
        let xa: Vec<_> = (0..20).map(|_| a.next_batch(&p, 32)).collect();
        let xb: Vec<_> = (0..20).map(|_| b.next_batch(&p, 32)).collect();
        let xc: Vec<_> = (0..20).map(|_| c.next_batch(&p, 32)).collect();
        assert_eq!(xa, xb);
        assert_ne!(xa, xc);
    }

    #[test]
    fn restore_mid_way_continues_identically() {
        // Proportions change every step, as a scheduler's would.
        let schedule = |t: usize| props(&[1.0 + t as f64, 2.0, 0.5 * (t % 3) as f64]);
        for composition in [Composition::Sample, Composition::Fixed] {
            let mut s = MixtureSampler::new(3, 11, composition);
            let mut saved = None;
            let mut tail = Vec::new();
            for t in 0..12 {
                if t == 5 {
                    saved = Some(serde_json::to_string(&s.state()).unwrap());
                }
                let batch = s.next_batch(&schedule(t), 9);
                if t >= 5 {
                    tail.push(batch);
                }
            }
            let state: SamplerState = serde_json::from_str(&saved.unwrap()).unwrap();
            assert_eq!(state.batches_drawn, 5);
            let mut resumed = MixtureSampler::from_state(state.clone(), composition);
            let mut restored = MixtureSampler::new(3, 0, composition);
            restored.restore(state).unwrap();
            for (i, expected) in tail.iter().enumerate() {
                assert_eq!(&resumed.next_batch(&schedule(5 + i), 9), expected);
                assert_eq!(&restored.next_batch(&schedule(5 + i), 9), expected);
            }
            assert_eq!(resumed.state(), s.state());
        }
    }

    #[test]
    fn restore_rejects_wrong_domain_count() {
        let mut s = MixtureSampler::new(3, 0, Composition::Sample);
        let state = MixtureSampler::new(2, 0, Composition::Sample).state();
        assert_eq!(
            s.restore(state),
            Err(SamplerError::DomainCount {
                expected: 3,
                found: 2
            })
        );
    }

    #[test]
    fn sample_composition_honours_proportions() {
        let w = [0.5, 0.3, 0.15, 0.05, 0.0];
        let p = props(&w);
        let mut s = MixtureSampler::new(5, 3, Composition::Sample);
        let n = 20_000usize;
        let mut counts = [0usize; 5];
        let mut next_index = [0u64; 5];
        for _ in 0..n / 100 {
            for (d, index) in s.next_batch(&p, 100) {
                counts[d.0] += 1;
                // Each domain's windows are read in order, none skipped or repeated.
                assert_eq!(index, next_index[d.0]);
                next_index[d.0] += 1;
            }
        }
        for (i, &pi) in w.iter().enumerate() {
            let expected = n as f64 * pi;
            let sigma = (n as f64 * pi * (1.0 - pi)).sqrt();
            println!(
                "domain {i}: {} drawn, {expected} expected (sigma {sigma:.1})",
                counts[i]
            );
            assert!(
                (counts[i] as f64 - expected).abs() <= 4.0 * sigma,
                "domain {i}"
            );
        }
        assert_eq!(counts[4], 0, "a zero-weight domain is never drawn");
        assert_eq!(s.state().cursors, next_index.to_vec());
    }

    #[test]
    fn fixed_composition_uses_apportion_in_domain_order() {
        let p = props(&[0.5, 0.3, 0.2]);
        let mut s = MixtureSampler::new(3, 0, Composition::Fixed);
        let b = s.next_batch(&p, 7);
        assert_eq!(p.apportion(7), vec![4, 2, 1]);
        let expected: Vec<(DomainId, u64)> = vec![
            (DomainId(0), 0),
            (DomainId(0), 1),
            (DomainId(0), 2),
            (DomainId(0), 3),
            (DomainId(1), 0),
            (DomainId(1), 1),
            (DomainId(2), 0),
        ];
        assert_eq!(b, expected);
        let b2 = s.next_batch(&p, 7);
        assert_eq!(b2[0], (DomainId(0), 4));
        assert_eq!(s.state().cursors, vec![8, 4, 2]);
    }

    #[test]
    fn fetch_batch_concatenates_windows_row_major() {
        let corpus = SyntheticCorpus::new(&SyntheticConfig::default()).unwrap();
        let picks = vec![(DomainId(1), 3), (DomainId(4), 0), (DomainId(1), 3)];
        let seq_len = 16;
        let tokens = fetch_batch(&corpus, Split::Train, &picks, seq_len);
        assert_eq!(tokens.len(), 3 * 17);
        for (row, &(d, i)) in picks.iter().enumerate() {
            assert_eq!(
                tokens[row * 17..(row + 1) * 17],
                corpus.window(d, Split::Train, i, seq_len)[..]
            );
        }
        let val = fetch_batch(
            &corpus,
            Split::Validation,
            &validation_picks(DomainId(2), 4),
            8,
        );
        assert_eq!(val.len(), 4 * 9);
        assert_eq!(
            val[..9],
            corpus.window(DomainId(2), Split::Validation, 0, 8)[..]
        );
    }

    #[test]
    fn serde_names() {
        assert_eq!(
            serde_json::to_string(&Composition::Fixed).unwrap(),
            "\"fixed\""
        );
        assert_eq!(
            serde_json::from_str::<Composition>("\"sample\"").unwrap(),
            Composition::Sample
        );
        assert_eq!(
            serde_json::to_string(&Split::Validation).unwrap(),
            "\"validation\""
        );
    }
}
