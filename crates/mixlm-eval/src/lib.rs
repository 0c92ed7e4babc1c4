//! Per-domain evaluation: validation loss and perplexity of each domain, and the
//! bookkeeping that turns per-sequence losses into per-domain means (shared with the
//! trainer, whose mixing feedback is the same quantity on training batches).

pub mod diversity;
pub mod model;
pub mod perplexity;
pub mod plots;
pub mod tasks;

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use mixlm_data::{fetch_batch, Split, TokenSource};
use mixlm_mixing::{DomainId, DomainLosses};
use mixlm_model::ModelBackend;
use mixlm_model::Transformer;
use serde::{Deserialize, Serialize};

/// Splits `[batch, seq_len + 1]` windows into model inputs and next-token targets.
pub fn inputs_and_targets<B: Backend>(
    windows: &[u32],
    batch: usize,
    seq_len: usize,
    device: &B::Device,
) -> (Tensor<B, 2, Int>, Tensor<B, 2, Int>) {
    assert_eq!(windows.len(), batch * (seq_len + 1), "window buffer size");
    let mut inputs = Vec::with_capacity(batch * seq_len);
    let mut targets = Vec::with_capacity(batch * seq_len);
    for row in windows.chunks_exact(seq_len + 1) {
        inputs.extend(row[..seq_len].iter().map(|&t| t as i64));
        targets.extend(row[1..].iter().map(|&t| t as i64));
    }
    (
        Tensor::from_data(TensorData::new(inputs, [batch, seq_len]), device),
        Tensor::from_data(TensorData::new(targets, [batch, seq_len]), device),
    )
}

/// Sums of per-sequence losses grouped by domain, for token-weighted means.
///
/// Every sequence has the same number of target tokens, so the token-weighted mean
/// loss of a domain is the mean of its sequences' mean losses.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DomainAccumulator {
    sums: Vec<f64>,
    counts: Vec<usize>,
}

impl DomainAccumulator {
    pub fn new(num_domains: usize) -> Self {
        Self {
            sums: vec![0.0; num_domains],
            counts: vec![0; num_domains],
        }
    }

    /// Adds the mean loss of each sequence (`seq_means[i]` belongs to `domains[i]`).
    pub fn add(&mut self, seq_means: &[f32], domains: &[DomainId]) {
        assert_eq!(seq_means.len(), domains.len(), "one domain per sequence");
        for (&loss, d) in seq_means.iter().zip(domains) {
            self.sums[d.0] += loss as f64;
            self.counts[d.0] += 1;
        }
    }

    /// An accumulator holding one batch's sequence means.
    pub fn of(num_domains: usize, seq_means: &[f32], domains: &[DomainId]) -> Self {
        let mut acc = Self::new(num_domains);
        acc.add(seq_means, domains);
        acc
    }

    /// Mean loss per domain; `None` for domains without sequences.
    pub fn means(&self) -> DomainLosses {
        DomainLosses(
            self.sums
                .iter()
                .zip(&self.counts)
                .map(|(&s, &n)| (n > 0).then(|| s / n as f64))
                .collect(),
        )
    }

    /// Sequences seen per domain.
    pub fn counts(&self) -> &[usize] {
        &self.counts
    }

    /// Sum of the sequence means per domain.
    pub fn sums(&self) -> &[f64] {
        &self.sums
    }

    /// Adds another accumulator's sequences (e.g. another data-parallel peer's).
    pub fn merge(&mut self, sums: &[f64], counts: &[usize]) {
        assert_eq!(sums.len(), self.sums.len(), "same domains");
        assert_eq!(counts.len(), self.counts.len(), "same domains");
        for (d, (&s, &n)) in sums.iter().zip(counts).enumerate() {
            self.sums[d] += s;
            self.counts[d] += n;
        }
    }
}

/// Mean loss of each sequence of a `[batch, seq]` token-loss tensor (one device sync).
pub fn sequence_means<B: Backend>(token_losses: Tensor<B, 2>) -> Vec<f32> {
    token_losses
        .mean_dim(1)
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .expect("f32 losses")
}

/// Mean validation loss (nats/token) of every domain over its first `sequences`
/// validation windows, `batch_size` windows per forward pass.
pub fn validation_losses<B: ModelBackend>(
    model: &Transformer<B>,
    source: &dyn TokenSource,
    seq_len: usize,
    sequences: usize,
    batch_size: usize,
    device: &B::Device,
) -> DomainLosses {
    let k = source.domain_names().len();
    // Bounded sources (prepared shards) have fewer windows than asked for when the
    // validation split is small: use each window once rather than wrap into repeats.
    let picks: Vec<(DomainId, u64)> = (0..k)
        .flat_map(|d| {
            let n = source
                .num_windows(DomainId(d), Split::Validation, seq_len)
                .map_or(sequences as u64, |w| w.min(sequences as u64));
            (0..n).map(move |i| (DomainId(d), i))
        })
        .collect();
    let mut acc = DomainAccumulator::new(k);
    for chunk in picks.chunks(batch_size) {
        let windows = fetch_batch(source, Split::Validation, chunk, seq_len);
        let (inputs, targets) = inputs_and_targets::<B>(&windows, chunk.len(), seq_len, device);
        let means = sequence_means(model.token_losses_chunked(
            inputs,
            targets,
            mixlm_model::EVAL_CHUNK_VALUES,
        ));
        let domains: Vec<DomainId> = chunk.iter().map(|(d, _)| *d).collect();
        acc.add(&means, &domains);
    }
    acc.means()
}

/// One row of the per-domain perplexity report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DomainRow {
    pub domain: String,
    /// Perplexity before training (when measured).
    pub initial_ppl: Option<f64>,
    pub ppl: f64,
    /// Best achievable perplexity, when the source knows it (synthetic data).
    pub floor_ppl: Option<f64>,
}

impl DomainRow {
    /// Achieved perplexity over the floor (1.0 = optimal).
    pub fn ratio_to_floor(&self) -> Option<f64> {
        self.floor_ppl.map(|f| self.ppl / f)
    }
}

/// Formats the per-domain perplexity table printed at the end of a run.
pub fn format_table(rows: &[DomainRow]) -> String {
    let width = rows
        .iter()
        .map(|r| r.domain.len())
        .max()
        .unwrap_or(6)
        .max(6);
    let mut s = format!(
        "{:<width$}  {:>10}  {:>10}  {:>10}  {:>9}\n",
        "domain", "initial", "final", "best", "final/best"
    );
    let opt = |v: Option<f64>| v.map_or("-".to_string(), |x| format!("{x:.3}"));
    for r in rows {
        s += &format!(
            "{:<width$}  {:>10}  {:>10.3}  {:>10}  {:>9}\n",
            r.domain,
            opt(r.initial_ppl),
            r.ppl,
            opt(r.floor_ppl),
            opt(r.ratio_to_floor()),
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domain_means_match_hand_computation() {
        let mut acc = DomainAccumulator::new(3);
        acc.add(&[1.0, 2.0, 4.0], &[DomainId(0), DomainId(2), DomainId(0)]);
        acc.add(&[3.0], &[DomainId(2)]);
        // domain 0: (1 + 4) / 2; domain 1: none; domain 2: (2 + 3) / 2.
        assert_eq!(acc.means(), DomainLosses(vec![Some(2.5), None, Some(2.5)]));
        assert_eq!(acc.counts(), &[2, 0, 2]);
    }

    #[test]
    fn inputs_and_targets_shift_by_one() {
        use burn::backend::NdArray;
        let device = Default::default();
        let (i, t) = inputs_and_targets::<NdArray<f32>>(&[1, 2, 3, 4, 5, 6], 2, 2, &device);
        let i: Vec<i64> = i.into_data().convert::<i64>().into_vec().unwrap();
        let t: Vec<i64> = t.into_data().convert::<i64>().into_vec().unwrap();
        assert_eq!(i, vec![1, 2, 4, 5]);
        assert_eq!(t, vec![2, 3, 5, 6]);
    }

    #[test]
    fn table_shows_ratio_to_floor() {
        let rows = [DomainRow {
            domain: "easy".into(),
            initial_ppl: Some(128.0),
            ppl: 3.0,
            floor_ppl: Some(2.0),
        }];
        let t = format_table(&rows);
        assert!(t.lines().nth(1).unwrap().ends_with("1.500"), "{t}");
    }
}
