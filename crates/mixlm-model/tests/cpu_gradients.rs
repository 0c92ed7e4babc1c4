//! CPU gradients are exact and reproducible to the bit.
//!
//! Burn 0.21's ndarray backend with its `simd` feature computes `recip` with the
//! approximate `rcp_ps` instruction on the aligned middle of a buffer and exactly on its
//! unaligned ends; Burn's autodiff uses `recip` in the backward of `log` and division. The
//! gradients then carried errors up to ~5e-5 (relative) that moved with allocation
//! addresses, so two identical runs drifted apart. mixlm builds burn-ndarray without
//! `simd`; these tests keep it that way.

use burn::backend::{Autodiff, NdArray};
use burn::tensor::{Int, Tensor, TensorData};
use mixlm_model::{token_nll, AttentionKernel, Compute, ModelConfig};

type B = Autodiff<NdArray<f32>>;

/// Burn's seeded generator is global, and parameters are initialised lazily, at their
/// first use: a test holds this from seeding until its model has run, so `cargo test`'s
/// other threads cannot draw in between.
static SEED: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn targets(
    b: usize,
    t: usize,
    vocab: usize,
    device: &burn::tensor::Device<B>,
) -> (Vec<usize>, Tensor<B, 2, Int>) {
    let ids: Vec<usize> = (0..b * t).map(|i| i * 37 % vocab).collect();
    let data = TensorData::new(ids.iter().map(|&i| i as i64).collect::<Vec<_>>(), [b, t]);
    (ids, Tensor::from_data(data, device))
}

/// d mean(nll) / d logits = (softmax - onehot) / tokens, computed in f64 on the host.
#[test]
fn token_nll_gradient_matches_the_formula() {
    let device = Default::default();
    let (b, t, vocab) = (4, 16, 128);
    // Host-generated values: Burn's seeded generator is global, and the other test
    // (run on another thread by `cargo test`) draws from it.
    let values: Vec<f32> = (0..b * t * vocab)
        .map(|i| ((i as f32 * 0.618_034).fract() - 0.5) * 6.0)
        .collect();
    let logits =
        Tensor::<B, 3>::from_data(TensorData::new(values, [b, t, vocab]), &device).require_grad();
    let (ids, target) = targets(b, t, vocab, &device);
    let grads = token_nll(logits.clone(), target).mean().backward();
    let got: Vec<f32> = logits.grad(&grads).unwrap().into_data().into_vec().unwrap();
    let x: Vec<f32> = logits.into_data().into_vec().unwrap();
    let mut worst = 0f64;
    for (row, &target) in ids.iter().enumerate() {
        let r = &x[row * vocab..(row + 1) * vocab];
        let max = r.iter().fold(f32::MIN, |m, &v| m.max(v)) as f64;
        let z: f64 = r.iter().map(|&v| (v as f64 - max).exp()).sum();
        for (i, &v) in r.iter().enumerate() {
            let p = (v as f64 - max).exp() / z;
            let want = (p - f64::from(u8::from(i == target))) / (b * t) as f64;
            let g = got[row * vocab + i] as f64;
            worst = worst.max((g - want).abs() / want.abs());
        }
    }
    // f32 rounding is ~1e-7 relative; the approximate reciprocal gave ~5e-5.
    assert!(worst < 2e-6, "worst relative error {worst:e}");
}

/// The embedding gradient of the whole model (every op's backward contributes) is
/// the same to the bit on every repetition.
#[test]
fn model_gradients_repeat_to_the_bit() {
    let device = Default::default();
    let mut config = ModelConfig::preset("tiny").unwrap();
    config.rotary_pct = 1.0;
    for attention in [AttentionKernel::Fused, AttentionKernel::Burn] {
        let run = || -> Vec<u32> {
            let seeded = SEED.lock().unwrap_or_else(|e| e.into_inner());
            <B as burn::tensor::backend::Backend>::seed(&device, 0);
            let model = config.init::<B>(&device).with_compute(Compute {
                attention,
                ..Default::default()
            });
            let (_, tokens) = targets(4, 17, config.vocab_size, &device);
            let inputs = tokens.clone().slice([0..4, 0..16]);
            let target = tokens.slice([0..4, 1..17]);
            let grads = model.token_losses(inputs, target).mean().backward();
            let g: Vec<f32> = model
                .embed
                .weight
                .grad(&grads)
                .unwrap()
                .into_data()
                .into_vec()
                .unwrap();
            drop(seeded);
            g.iter().map(|v| v.to_bits()).collect()
        };
        let first = run();
        for repetition in 1..12 {
            assert!(
                run() == first,
                "{attention:?}: repetition {repetition} differs"
            );
        }
    }
}

/// Evaluation's chunked losses (the output projection a few windows at a time) are
/// the whole batch's to the bit, for both families, whatever the chunk.
#[test]
fn chunked_evaluation_losses_equal_the_whole_batch() {
    use burn::backend::NdArray;
    type C = NdArray<f32>;
    let device = Default::default();
    for preset in ["tiny", "tiny-llama"] {
        let mut config = ModelConfig::preset(preset).unwrap();
        config.vocab_size = 300;
        let seeded = SEED.lock().unwrap_or_else(|e| e.into_inner());
        <C as burn::tensor::backend::Backend>::seed(&device, 1);
        let model = config.init::<C>(&device);
        let (b, t) = (5, 12);
        let ids: Vec<i64> = (0..b * (t + 1)).map(|i| (i * 53 % 300) as i64).collect();
        let tokens = Tensor::<C, 2, Int>::from_data(TensorData::new(ids, [b, t + 1]), &device);
        let inputs = tokens.clone().slice([0..b, 0..t]);
        let target = tokens.slice([0..b, 1..t + 1]);
        let whole: Vec<f32> = model
            .token_losses(inputs.clone(), target.clone())
            .into_data()
            .into_vec()
            .unwrap();
        // One window, two windows, and more than the batch per chunk.
        for max_logits in [1, 2 * t * 300, 100 * t * 300] {
            let chunked: Vec<f32> = model
                .token_losses_chunked(inputs.clone(), target.clone(), max_logits)
                .into_data()
                .into_vec()
                .unwrap();
            assert_eq!(chunked, whole, "{preset}, at most {max_logits} logits");
        }
        drop(seeded);
    }
}
