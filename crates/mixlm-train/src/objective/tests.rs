//! Each objective on the embedded demo's tiny model, against losses and gradients
//! computed here directly (one forward and backward pass of the loss the objective
//! is meant to minimise), and against numbers worked out by hand on a model whose
//! weights are all zero (every token's loss is then `ln V` exactly).

use std::collections::VecDeque;

use burn::backend::{Autodiff, NdArray};
use burn::module::{AutodiffModule, Module, ModuleMapper, Param};
use mixlm_data::{fetch_batch, MixtureSampler, Split, TokenSource};
use mixlm_eval::sequence_means;
use mixlm_mixing::{GradientAlignment, GradientTarget, Proportions};

use super::*;
use crate::alignment::gram_matrix;
use crate::alignment::tests::{flat, tiny};
use crate::distributed::Peer;

type B = Autodiff<NdArray<f32>>;

const SEQ_LEN: usize = 16;

/// A micro-batch of the given domains' training windows (`offset` picks others).
fn micro(corpus: &dyn TokenSource, domains: &[usize], offset: u64) -> Prefetched {
    let picks: Vec<(DomainId, u64)> = domains
        .iter()
        .enumerate()
        .map(|(i, &d)| (DomainId(d), offset + i as u64))
        .collect();
    Prefetched {
        windows: fetch_batch(corpus, Split::Train, &picks, SEQ_LEN),
        picks,
        state_after: MixtureSampler::new(1, 0, Default::default()).state(),
    }
}

struct Queue(VecDeque<Prefetched>);

impl MicroBatches for Queue {
    fn next_micro_batch(&mut self) -> Result<Prefetched> {
        Ok(self.0.pop_front().expect("a micro-batch queued"))
    }
}

/// A scheduler that gives fixed loss weights or gradient coefficients and keeps
/// what it was shown.
#[derive(Default)]
struct Stub {
    loss_weights: Option<Vec<f64>>,
    coefficients: Option<Vec<f64>>,
    shown: Vec<StepFeedback>,
    alignment: Option<GradientAlignment>,
}

impl Scheduler for Stub {
    fn name(&self) -> &str {
        "stub"
    }
    fn proportions(&mut self, _step: u64) -> Proportions {
        unreachable!("objectives do not ask for proportions")
    }
    fn loss_weights(&mut self, _step: u64, micro_batch: &StepFeedback) -> Option<Vec<f64>> {
        self.shown.push(micro_batch.clone());
        self.loss_weights.clone()
    }
    fn gradient_weights(&mut self, _: u64, _: f64, g: &GradientAlignment) -> Option<Vec<f64>> {
        self.alignment = Some(g.clone());
        self.coefficients.clone()
    }
    fn state(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
    fn restore(&mut self, _: &serde_json::Value) -> Result<(), String> {
        Ok(())
    }
}

/// One step of `objective` over `batches`.
fn run(
    objective: &mut dyn Objective<B>,
    model: &Transformer<B>,
    scheduler: &mut Stub,
    batches: Vec<Prefetched>,
    domains: usize,
) -> StepOutput {
    let device = Default::default();
    let peer = Peer::solo(&device);
    let mut laps = Laps::start(0.0);
    let grad_accum = batches.len();
    objective
        .step(StepContext {
            step: 0,
            lr: 1e-3,
            model,
            scheduler,
            domains,
            batches: &mut Queue(batches.into()),
            peer: &peer,
            device: &device,
            grad_accum,
            seq_len: SEQ_LEN,
            laps: &mut laps,
        })
        .unwrap()
}

/// Per-sequence mean losses of a micro-batch, as a tensor to differentiate.
fn seq_losses(model: &Transformer<B>, batch: &Prefetched) -> Tensor<B, 1> {
    let (inputs, targets) = inputs_and_targets::<B>(
        &batch.windows,
        batch.picks.len(),
        SEQ_LEN,
        &Default::default(),
    );
    model
        .token_losses(inputs, targets)
        .mean_dim(1)
        .reshape([batch.picks.len()])
}

/// The mean of domain `d`'s rows of `seq`.
fn domain_mean(seq: &Tensor<B, 1>, batch: &Prefetched, d: usize) -> Tensor<B, 1> {
    let mask: Vec<f32> = batch
        .picks
        .iter()
        .map(|(x, _)| f32::from(u8::from(x.0 == d)))
        .collect();
    let n = mask.iter().sum::<f32>();
    let mask = Tensor::<B, 1>::from_data(
        TensorData::new(mask, [batch.picks.len()]),
        &Default::default(),
    );
    (seq.clone() * mask).sum().div_scalar(n)
}

fn grads_of(model: &Transformer<B>, loss: Tensor<B, 1>) -> GradientsParams {
    GradientsParams::from_grads(loss.backward(), model)
}

/// `|a - b|` over all parameters, summed on the host in f64 (through the f32 Gram
/// matrix, `|a|^2 + |b|^2 - 2 <a, b>` would lose the difference to rounding).
fn difference(model: &Transformer<B>, a: &GradientsParams, b: &GradientsParams) -> f64 {
    let (a, b) = (flat(model, a), flat(model, b));
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).powi(2))
        .sum::<f64>()
        .sqrt()
}

/// `|a - b| / |b|` over all parameters.
fn relative_difference(model: &Transformer<B>, a: &GradientsParams, b: &GradientsParams) -> f64 {
    let norm = flat(model, b).iter().map(|x| x * x).sum::<f64>().sqrt();
    difference(model, a, b) / norm
}

fn sequence_means_of(model: &Transformer<B>, batch: &Prefetched) -> Vec<f32> {
    sequence_means(
        seq_losses(model, batch)
            .inner()
            .reshape([batch.picks.len(), 1]),
    )
}

#[test]
fn mean_loss_is_the_token_mean_of_the_step() {
    let (model, corpus) = tiny();
    let k = corpus.domain_names().len();
    let batches = vec![
        micro(corpus.as_ref(), &[0, 1, 0], 0),
        micro(corpus.as_ref(), &[1, 1, 0], 3),
    ];
    let out = run(
        &mut MeanLoss::new(k),
        &model,
        &mut Stub::default(),
        batches.clone(),
        k,
    );

    // The gradient of the mean over both micro-batches' tokens.
    let direct = seq_losses(&model, &batches[0]).mean().div_scalar(2.0)
        + seq_losses(&model, &batches[1]).mean().div_scalar(2.0);
    let diff = relative_difference(
        &model,
        out.grads.as_whole().unwrap(),
        &grads_of(&model, direct),
    );
    assert!(diff < 1e-5, "relative difference {diff}");

    // Per-domain sums of the sequences' mean losses, and their counts.
    let mut want = DomainAccumulator::new(k);
    for b in &batches {
        let domains: Vec<DomainId> = b.picks.iter().map(|p| p.0).collect();
        want.add(&sequence_means_of(&model, b), &domains);
    }
    assert_eq!(out.losses.train.counts()[..2], [3, 3]);
    for d in 0..2 {
        assert!((out.losses.train.sums()[d] - want.sums()[d]).abs() < 1e-5);
    }
    assert!(out.losses.reference.is_none());
    assert_eq!(out.picks.len(), 6);
    assert_eq!(out.picks[3], (DomainId(1), 3));
}

#[test]
fn mean_loss_takes_the_schedulers_domain_weights() {
    let (model, corpus) = tiny();
    let k = corpus.domain_names().len();
    let batch = micro(corpus.as_ref(), &[0, 1, 1, 0, 0], 0);
    let mut weights = vec![0.0; k];
    (weights[0], weights[1]) = (0.25, 0.75);
    let mut stub = Stub {
        loss_weights: Some(weights),
        ..Stub::default()
    };
    let out = run(
        &mut MeanLoss::new(k),
        &model,
        &mut stub,
        vec![batch.clone()],
        k,
    );

    // 0.25 x (mean loss of domain 0's tokens) + 0.75 x (domain 1's).
    let seq = seq_losses(&model, &batch);
    let direct = domain_mean(&seq, &batch, 0).mul_scalar(0.25)
        + domain_mean(&seq, &batch, 1).mul_scalar(0.75);
    let diff = relative_difference(
        &model,
        out.grads.as_whole().unwrap(),
        &grads_of(&model, direct),
    );
    assert!(diff < 1e-5, "relative difference {diff}");
    // The scheduler saw this micro-batch's per-domain means and counts.
    let shown = &stub.shown[0];
    assert_eq!(shown.sequences[..2], [3, 2]);
    let means = out.losses.train.means();
    assert_eq!(shown.train.0[..2], means.0[..2]);
}

/// A model with every weight zero: every logit is 0, so every token's loss is
/// `ln V` (V the vocabulary size), whatever the data.
fn zeroed(model: Transformer<B>) -> Transformer<B> {
    struct Zero;
    impl ModuleMapper<B> for Zero {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let (id, tensor, mapper) = param.consume();
            Param::from_mapped_value(id, tensor.zeros_like(), mapper)
        }
    }
    model.map(&mut Zero)
}

#[test]
fn excess_loss_by_hand_on_a_zero_reference() {
    let (model, corpus) = tiny();
    let k = corpus.domain_names().len();
    let vocab = crate::RunConfig::embedded(&[])
        .unwrap()
        .model
        .resolve()
        .unwrap()
        .vocab_size;
    let ln_v = (vocab as f64).ln();
    let reference = zeroed(model.clone()).valid();
    let batch = micro(corpus.as_ref(), &[2, 0, 2], 0);
    let mut stub = Stub::default();

    // Trained on the zero model itself: the reference's losses are ln V, and so are
    // the model's; no excess.
    let zero = zeroed(model.clone());
    let out = run(
        &mut ExcessLoss::new(reference.clone(), k),
        &zero,
        &mut stub,
        vec![batch.clone()],
        k,
    );
    let r = out.losses.reference.as_ref().unwrap();
    assert_eq!(r.reference.counts()[..3], [1, 0, 2]);
    assert!(
        (r.reference.sums()[2] - 2.0 * ln_v).abs() < 1e-5,
        "{:?}",
        r.reference.sums()
    );
    assert!((out.losses.train.sums()[0] - ln_v).abs() < 1e-5);
    assert_eq!(r.excess.sums()[..3], [0.0, 0.0, 0.0]);
    let shown = &stub.shown[0];
    assert_eq!(shown.excess.as_ref().unwrap().0[0], Some(0.0));
    assert!((shown.reference.as_ref().unwrap().0[2].unwrap() - ln_v).abs() < 1e-5);

    // The tiny model against the zero reference: each sequence's excess is the
    // mean of max(loss - ln V, 0) over its tokens.
    let out = run(
        &mut ExcessLoss::new(reference, k),
        &model,
        &mut Stub::default(),
        vec![batch.clone()],
        k,
    );
    let (inputs, targets) =
        inputs_and_targets::<B>(&batch.windows, 3, SEQ_LEN, &Default::default());
    let token: Vec<f32> = model
        .token_losses(inputs, targets)
        .into_data()
        .into_vec()
        .unwrap();
    let excess: Vec<f64> = token
        .chunks(SEQ_LEN)
        .map(|row| row.iter().map(|&l| (l as f64 - ln_v).max(0.0)).sum::<f64>() / SEQ_LEN as f64)
        .collect();
    let got = out.losses.reference.unwrap().excess;
    assert!((got.sums()[2] - (excess[0] + excess[2])).abs() < 1e-5);
    assert!((got.sums()[0] - excess[1]).abs() < 1e-5);
    assert!(
        excess.iter().any(|&e| e > 0.0),
        "some tokens do worse than uniform"
    );
}

#[test]
fn aligned_gradients_combine_the_domains_with_the_schedulers_coefficients() {
    let (model, corpus) = tiny();
    let k = corpus.domain_names().len();
    let batch = micro(corpus.as_ref(), &[0, 1, 0, 0], 0);
    let mut coefficients = vec![0.0; k];
    (coefficients[0], coefficients[1]) = (2.0, 0.5);
    let mut stub = Stub {
        coefficients: Some(coefficients),
        ..Stub::default()
    };
    let mut objective =
        AlignedGradients::new(GradientTarget::Train, k, std::sync::Arc::from(corpus), 1);
    let out = run(&mut objective, &model, &mut stub, vec![batch.clone()], k);

    // 2 x (gradient of domain 0's mean loss) + 0.5 x (domain 1's).
    let seq = seq_losses(&model, &batch);
    let g0 = grads_of(&model, domain_mean(&seq, &batch, 0));
    let seq = seq_losses(&model, &batch);
    let g1 = grads_of(&model, domain_mean(&seq, &batch, 1));
    let seq = seq_losses(&model, &batch);
    let direct =
        domain_mean(&seq, &batch, 0).mul_scalar(2.0) + domain_mean(&seq, &batch, 1).mul_scalar(0.5);
    // Measured against the terms' sizes: the sum may cancel (the two domains' gradients
    // can point apart), and each domain's rows ran as a batch of their own, so f32 sums
    // come in another order.
    let want = gram_matrix::<B>(&model, &[&g0, &g1]);
    let (n0, n1) = (want[0][0].sqrt(), want[1][1].sqrt());
    let diff = difference(
        &model,
        out.grads.as_whole().unwrap(),
        &grads_of(&model, direct),
    );
    assert!(
        diff < 1e-5 * (2.0 * n0 + 0.5 * n1),
        "difference {diff} ({n0}, {n1})"
    );
    // The scheduler saw the Gram matrix of the two mean-loss gradients.
    let gram = &stub.alignment.unwrap().gram;
    for (i, j) in [(0, 0), (0, 1), (1, 1)] {
        let scale = (want[i][i] * want[j][j]).sqrt();
        assert!(
            (gram[i][j] - want[i][j]).abs() < 1e-4 * scale,
            "{i}{j}: {} vs {}",
            gram[i][j],
            want[i][j]
        );
    }
    assert_eq!(out.losses.train.counts()[..2], [3, 1]);
}

#[test]
fn the_step_loss_weights_domains_by_sequences() {
    let mut losses = StepLosses::new(3);
    // 3 sequences at 1.0 and 1 at 4.0: (3 + 4) / 4.
    losses.train.add(
        &[1.0, 1.0, 4.0, 1.0],
        &[DomainId(0), DomainId(0), DomainId(2), DomainId(0)],
    );
    assert_eq!(losses.mean(), 1.75);
}
