//! Per-domain gradients for gradient-alignment methods (DoGE).
//!
//! Each micro-batch is split by domain and every domain's rows get their own forward
//! and backward pass (the same compute as one pass over the whole micro-batch), so a
//! step ends with one gradient per domain, of the sum of its sequences' mean losses.
//! Their Gram matrix (one `[n, P] x [P, n]` product per parameter tensor, read back
//! once) goes to the scheduler as a [`GradientAlignment`] of mean-loss gradients;
//! the model is then updated with the weighted sum of the domain gradients the
//! scheduler asks for. Memory: one extra gradient copy per domain.
//!
//! Data-parallel: each domain's gradient and sequence count are summed over the
//! peers before anything is computed from them (K gradient all-reduces a step instead
//! of one), and the validation target is split over the peers and summed, so every
//! peer sees the Gram matrix of the global batch, to the bit, and the scheduler's
//! weights are the same everywhere.

use std::marker::PhantomData;

use anyhow::Result;
use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Tensor};
use mixlm_data::seeding::hash_words;
use mixlm_data::{fetch_batch, Split, TokenSource};
use mixlm_eval::{inputs_and_targets, sequence_means};
use mixlm_mixing::{AlignmentTarget, DomainId, GradientAlignment};
use mixlm_model::{TrainBackend, Transformer};

use crate::distributed::{Peer, Rank};

/// One step's gradients, kept apart by domain.
pub struct DomainGradients<B: TrainBackend> {
    grads: Vec<GradientsAccumulator<Transformer<B>>>,
    /// Sequences behind each domain's gradient (it is of the sum of their means).
    counts: Vec<usize>,
}

impl<B: TrainBackend> DomainGradients<B> {
    pub fn new(k: usize) -> Self {
        Self {
            grads: (0..k).map(|_| GradientsAccumulator::new()).collect(),
            counts: vec![0; k],
        }
    }

    /// Forward and backward of each domain's rows of one micro-batch (`windows` is
    /// `[domains.len(), seq_len + 1]` row-major); returns every row's mean loss, in
    /// row order.
    pub fn backward(
        &mut self,
        model: &Transformer<B>,
        windows: &[u32],
        domains: &[DomainId],
        seq_len: usize,
        device: &B::Device,
    ) -> Vec<f32> {
        let row = seq_len + 1;
        let mut seq_means = vec![0.0f32; domains.len()];
        for d in 0..self.grads.len() {
            let rows: Vec<usize> = (0..domains.len()).filter(|&r| domains[r].0 == d).collect();
            if rows.is_empty() {
                continue;
            }
            let sub: Vec<u32> = rows
                .iter()
                .flat_map(|&r| windows[r * row..(r + 1) * row].iter().copied())
                .collect();
            let (inputs, targets) = inputs_and_targets::<B>(&sub, rows.len(), seq_len, device);
            let token_losses = model.token_losses(inputs, targets);
            for (&r, m) in rows
                .iter()
                .zip(sequence_means(token_losses.clone().inner()))
            {
                seq_means[r] = m;
            }
            let [b, _] = token_losses.dims();
            let loss = token_losses.mean_dim(1).reshape([b]).sum();
            self.grads[d].accumulate(model, GradientsParams::from_grads(loss.backward(), model));
            self.counts[d] += rows.len();
        }
        seq_means
    }

    /// Ends the step: every domain's gradient and sequence count, summed over the
    /// peers (a domain no peer drew stays empty).
    pub fn finish(
        self,
        model: &Transformer<B>,
        peer: &Peer<B::InnerBackend>,
    ) -> Result<StepGradients> {
        let local: Vec<f64> = self.counts.iter().map(|&c| c as f64).collect();
        let counts: Vec<usize> = peer
            .gather("per-domain sequence counts", &local)?
            .iter()
            .fold(vec![0; local.len()], |mut sum, peer| {
                sum.iter_mut()
                    .zip(peer)
                    .for_each(|(s, &c)| *s += c as usize);
                sum
            });
        let mut sets = Vec::with_capacity(counts.len());
        for (mut grads, &count) in self.grads.into_iter().zip(&counts) {
            let local = grads.grads();
            sets.push(if count == 0 {
                local
            } else {
                peer.sum_grads(model, local)?
            });
        }
        Ok(StepGradients { sets, counts })
    }
}

/// One step's per-domain gradients (of the sum of each domain's sequence means) over
/// all peers, and how many sequences each is of.
pub struct StepGradients {
    sets: Vec<GradientsParams>,
    counts: Vec<usize>,
}

impl StepGradients {
    /// The domains' mean-loss gradients as the scheduler sees them, plus the
    /// alignment with `target` (a mean-loss gradient) when given.
    pub fn alignment<B: TrainBackend>(
        &self,
        model: &Transformer<B>,
        target: Option<&GradientsParams>,
    ) -> GradientAlignment {
        let k = self.counts.len();
        let present: Vec<usize> = (0..k).filter(|&d| self.counts[d] > 0).collect();
        let mut refs: Vec<&GradientsParams> = present.iter().map(|&d| &self.sets[d]).collect();
        refs.extend(target);
        let raw = gram_matrix::<B>(model, &refs);
        let scale = |d: usize| 1.0 / self.counts[d] as f64;
        let mut gram = vec![vec![0.0; k]; k];
        for (a, &i) in present.iter().enumerate() {
            for (b, &j) in present.iter().enumerate() {
                gram[i][j] = raw[a][b] * scale(i) * scale(j);
            }
        }
        let n = present.len();
        let target = target.map(|_| {
            let mut dots = vec![0.0; k];
            for (a, &i) in present.iter().enumerate() {
                dots[i] = raw[a][n] * scale(i);
            }
            AlignmentTarget {
                dots,
                norm_sq: raw[n][n],
            }
        });
        GradientAlignment {
            present: (0..k).map(|d| self.counts[d] > 0).collect(),
            gram,
            target,
        }
    }

    /// `sum_i coefficients[i] * (mean-loss gradient of domain i)`.
    pub fn combine<B: TrainBackend>(
        &self,
        model: &Transformer<B>,
        coefficients: &[f64],
    ) -> GradientsParams {
        let scaled: Vec<f64> = coefficients
            .iter()
            .zip(&self.counts)
            .map(|(c, &n)| if n == 0 { 0.0 } else { c / n as f64 })
            .collect();
        let mut v = Combine::<B::InnerBackend> {
            sets: &self.sets,
            coefficients: &scaled,
            out: GradientsParams::new(),
            _b: PhantomData,
        };
        model.visit(&mut v);
        v.out
    }
}

/// The gradient of the mean loss over `sequences` validation windows spread evenly
/// over `domains`, drawn afresh for each `step` (deterministic in `seed`). Each peer
/// computes its share of the windows (every `world`-th), so the peers' results sum
/// to the gradient of the whole set; a peer with no share returns no gradients.
pub fn validation_gradient<B: TrainBackend>(
    model: &Transformer<B>,
    source: &dyn TokenSource,
    (sequences, domains): (usize, &[DomainId]),
    (seed, step): (u64, u64),
    (seq_len, rank): (usize, Rank),
    device: &B::Device,
) -> GradientsParams {
    let picks: Vec<(DomainId, u64)> = (rank.rank..sequences)
        .step_by(rank.world)
        .map(|i| {
            let d = domains[i % domains.len()];
            let n = source
                .num_windows(d, Split::Validation, seq_len)
                .unwrap_or(u32::MAX as u64)
                .max(1);
            (d, hash_words(&[seed, step, i as u64, 0xD06E]) % n)
        })
        .collect();
    if picks.is_empty() {
        return GradientsParams::new();
    }
    let windows = fetch_batch(source, Split::Validation, &picks, seq_len);
    let (inputs, targets) = inputs_and_targets::<B>(&windows, picks.len(), seq_len, device);
    let token_losses = model.token_losses(inputs, targets);
    let [rows, _] = token_losses.dims();
    let loss = token_losses
        .mean_dim(1)
        .reshape([rows])
        .sum()
        .div_scalar(sequences as f64);
    GradientsParams::from_grads(loss.backward(), model)
}

/// `G[a][b] = <sets[a], sets[b]>` over every parameter of `model` (missing
/// gradients count as zero).
pub fn gram_matrix<B: TrainBackend>(
    model: &Transformer<B>,
    sets: &[&GradientsParams],
) -> Vec<Vec<f64>> {
    let n = sets.len();
    let mut v = Gram::<B::InnerBackend> { sets, acc: None };
    model.visit(&mut v);
    let Some(acc) = v.acc else {
        return vec![vec![0.0; n]; n];
    };
    let flat: Vec<f64> = acc
        .into_data()
        .iter::<f32>()
        .map(|x| x.elem::<f64>())
        .collect();
    flat.chunks(n).map(<[f64]>::to_vec).collect()
}

struct Gram<'a, B: Backend> {
    sets: &'a [&'a GradientsParams],
    acc: Option<Tensor<B, 2>>,
}

impl<AB: AutodiffBackend> ModuleVisitor<AB> for Gram<'_, AB::InnerBackend> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AB, D>>) {
        let grads: Vec<Option<Tensor<AB::InnerBackend, D>>> =
            self.sets.iter().map(|s| s.get(param.id)).collect();
        let Some(any) = grads.iter().flatten().next() else {
            return;
        };
        let (len, device) = (any.shape().num_elements(), any.device());
        let rows: Vec<Tensor<AB::InnerBackend, 2>> = grads
            .into_iter()
            .map(|g| match g {
                Some(g) => g.reshape([1, len]),
                None => Tensor::zeros([1, len], &device),
            })
            .collect();
        let m = Tensor::cat(rows, 0);
        let g = m.clone().matmul(m.transpose());
        self.acc = Some(match self.acc.take() {
            Some(a) => a + g,
            None => g,
        });
    }
}

struct Combine<'a, B: Backend> {
    sets: &'a [GradientsParams],
    coefficients: &'a [f64],
    out: GradientsParams,
    _b: PhantomData<B>,
}

impl<AB: AutodiffBackend> ModuleVisitor<AB> for Combine<'_, AB::InnerBackend> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AB, D>>) {
        let mut sum: Option<Tensor<AB::InnerBackend, D>> = None;
        for (set, &c) in self.sets.iter().zip(self.coefficients) {
            if c == 0.0 {
                continue;
            }
            if let Some(g) = set.get::<AB::InnerBackend, D>(param.id) {
                let g = g.mul_scalar(c);
                sum = Some(match sum.take() {
                    Some(s) => s + g,
                    None => g,
                });
            }
        }
        if let Some(s) = sum {
            self.out.register::<AB::InnerBackend, D>(param.id, s);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use burn::backend::{Autodiff, NdArray};

    type B = Autodiff<NdArray<f32>>;

    /// The embedded demo's model, freshly initialised, and its corpus.
    pub(crate) fn tiny() -> (Transformer<B>, Box<dyn TokenSource>) {
        let config = crate::RunConfig::embedded(&[]).unwrap();
        let model = config
            .model
            .resolve()
            .unwrap()
            .init::<B>(&Default::default());
        (model, config.open_source().unwrap())
    }

    /// Every gradient of `set` flattened in visiting order, for checks on the host.
    pub(crate) fn flat(model: &Transformer<B>, set: &GradientsParams) -> Vec<f64> {
        struct Flat<'a>(&'a GradientsParams, Vec<f64>);
        impl ModuleVisitor<B> for Flat<'_> {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
                if let Some(g) = self.0.get::<NdArray<f32>, D>(param.id) {
                    self.1.extend(g.into_data().iter::<f32>().map(|x| x as f64));
                }
            }
        }
        let mut v = Flat(set, Vec::new());
        model.visit(&mut v);
        v.1
    }

    fn batch(corpus: &dyn TokenSource, domains: &[usize], seq_len: usize) -> Vec<u32> {
        let picks: Vec<(DomainId, u64)> = domains
            .iter()
            .enumerate()
            .map(|(i, &d)| (DomainId(d), i as u64))
            .collect();
        fetch_batch(corpus, Split::Train, &picks, seq_len)
    }

    /// The per-domain gradients, weighted by each domain's share of the sequences,
    /// add up to the gradient of the whole micro-batch's mean loss; the Gram matrix
    /// matches dot products of the flattened gradients.
    #[test]
    fn domain_gradients_recombine_to_the_batch_gradient() {
        let (model, corpus) = tiny();
        let device = Default::default();
        let seq_len = 16;
        let domains = [0usize, 2, 0, 1, 2, 0];
        let ids: Vec<DomainId> = domains.iter().map(|&d| DomainId(d)).collect();
        let windows = batch(corpus.as_ref(), &domains, seq_len);
        let k = corpus.domain_names().len();

        let mut per_domain = DomainGradients::<B>::new(k);
        per_domain.backward(&model, &windows, &ids, seq_len, &device);
        let step = per_domain.finish(&model, &Peer::solo(&device)).unwrap();
        let alignment = step.alignment(&model, None);
        assert_eq!(alignment.present[..3], [true, true, true]);
        assert!(alignment.present[3..].iter().all(|p| !p));
        let shares: Vec<f64> = (0..k)
            .map(|d| domains.iter().filter(|&&x| x == d).count() as f64 / 6.0)
            .collect();
        let combined = flat(&model, &step.combine(&model, &shares));

        let (inputs, targets) = inputs_and_targets::<B>(&windows, 6, seq_len, &device);
        let loss = model.token_losses(inputs, targets).mean();
        let whole = flat(
            &model,
            &GradientsParams::from_grads(loss.backward(), &model),
        );
        assert_eq!(combined.len(), whole.len());
        let err = combined
            .iter()
            .zip(&whole)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        // f32 sums in another order: equal to ~1e-7 of the largest entry (~1e-1).
        assert!(err < 1e-5, "max difference {err}");

        // Gram entries are of mean-loss gradients: domain 0 has 3 sequences, so its
        // accumulated gradient (of a sum of 3 means) is divided by 3.
        let g: Vec<Vec<f64>> = (0..3)
            .map(|d| {
                flat(&model, &step.sets[d])
                    .iter()
                    .map(|x| x / domains.iter().filter(|&&x| x == d).count() as f64)
                    .collect()
            })
            .collect();
        let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
        for i in 0..3 {
            for j in 0..3 {
                let want = dot(&g[i], &g[j]);
                let got = alignment.gram[i][j];
                assert!(
                    (got - want).abs() < 1e-4 * want.abs().max(1e-3),
                    "{i}{j}: {got} vs {want}"
                );
            }
        }
    }

    /// The validation target's alignment equals its dot products with the domain
    /// gradients, and the draw is deterministic per step.
    #[test]
    fn validation_target_dots_and_norm() {
        let (model, corpus) = tiny();
        let device = Default::default();
        let seq_len = 16;
        let domains = [1usize, 1, 3];
        let ids: Vec<DomainId> = domains.iter().map(|&d| DomainId(d)).collect();
        let windows = batch(corpus.as_ref(), &domains, seq_len);
        let all: Vec<DomainId> = (0..corpus.domain_names().len()).map(DomainId).collect();
        let mut per_domain = DomainGradients::<B>::new(all.len());
        per_domain.backward(&model, &windows, &ids, seq_len, &device);
        let val = |rank, step| {
            let shape = (seq_len, rank);
            validation_gradient(
                &model,
                corpus.as_ref(),
                (5, &all),
                (7, step),
                shape,
                &device,
            )
        };
        let (target, again, other) = (val(Rank::SOLO, 3), val(Rank::SOLO, 3), val(Rank::SOLO, 4));
        let t = flat(&model, &target);
        let max_diff = |a: &[f64], b: &[f64]| {
            a.iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0, f64::max)
        };
        // The same windows (up to ndarray's reduction order), other windows next step.
        assert!(max_diff(&t, &flat(&model, &again)) < 1e-6);
        assert!(max_diff(&t, &flat(&model, &other)) > 1e-3);
        let step = per_domain.finish(&model, &Peer::solo(&device)).unwrap();
        let a = step.alignment(&model, Some(&target)).target.unwrap();
        let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
        assert!((a.norm_sq - dot(&t, &t)).abs() < 1e-4 * a.norm_sq);
        let g1: Vec<f64> = flat(&model, &step.sets[1])
            .iter()
            .map(|x| x / 2.0)
            .collect();
        assert!((a.dots[1] - dot(&g1, &t)).abs() < 1e-4 * a.dots[1].abs().max(1e-3));
        assert_eq!(a.dots[0], 0.0);

        // Three peers' shares (2, 2 and 1 of the 5 windows) add up to the whole.
        let shares: Vec<Vec<f64>> = (0..3)
            .map(|rank| flat(&model, &val(Rank { rank, world: 3 }, 3)))
            .collect();
        let summed: Vec<f64> = (0..t.len())
            .map(|i| shares.iter().map(|s| s[i]).sum())
            .collect();
        assert!(max_diff(&t, &summed) < 1e-6, "{}", max_diff(&t, &summed));
        assert!(max_diff(&shares[0], &shares[1]) > 1e-3, "different windows");
        // A peer beyond the windows has no share.
        let none = validation_gradient(
            &model,
            corpus.as_ref(),
            (2, &all),
            (7, 3),
            (seq_len, Rank { rank: 2, world: 3 }),
            &device,
        );
        assert!(flat(&model, &none).is_empty());
    }
}
