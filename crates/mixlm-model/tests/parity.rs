//! Parity with Hugging Face transformers: tiny random GPT-NeoX and Llama models
//! built by `scripts/make_parity_fixtures.py`; their weights load into mixlm and the
//! logits must agree with the ones transformers computed (max abs diff < 1e-4).

use std::path::PathBuf;

use burn::backend::NdArray;
use burn::tensor::{Int, Tensor, TensorData};
use mixlm_model::hf::{config_from_hf, load_safetensors, to_safetensors};
use mixlm_model::{ModelBackend, ModelConfig, Precision, Transformer};
use safetensors::SafeTensors;

type B = NdArray<f32>;

/// A fixture's model config, weights, input ids (`[batch, seq]`) and expected logits.
struct Fixture {
    config: ModelConfig,
    weights: Vec<u8>,
    ids: Vec<i64>,
    shape: [usize; 2],
    logits: Vec<f32>,
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/parity")
        .join(name)
}

fn load(name: &str) -> Fixture {
    let dir = fixture(name);
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    let config = config_from_hf(&config).unwrap();
    let weights = std::fs::read(dir.join("model.safetensors")).unwrap();

    let io_bytes = std::fs::read(dir.join("io.safetensors")).unwrap();
    let io = SafeTensors::deserialize(&io_bytes).unwrap();
    let ids = io.tensor("input_ids").unwrap();
    let shape = ids.shape().to_vec();
    let ids: Vec<i64> = ids
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let expected: Vec<f32> = io
        .tensor("logits")
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    Fixture {
        config,
        weights,
        ids,
        shape: [shape[0], shape[1]],
        logits: expected,
    }
}

/// Loads the fixture's weights on `B`, computes in `precision` and returns the model and
/// the largest absolute logit difference from transformers.
fn max_logit_diff<B: ModelBackend>(
    f: &Fixture,
    precision: Precision,
    device: &B::Device,
) -> (Transformer<B>, f32) {
    let model = load_safetensors::<B>(&f.weights, &f.config, device)
        .unwrap()
        .with_precision(precision);
    let tokens = Tensor::<B, 2, Int>::from_data(TensorData::new(f.ids.clone(), f.shape), device);
    let logits: Vec<f32> = model
        .forward(tokens)
        .into_data()
        .convert::<f32>()
        .into_vec()
        .unwrap();
    assert_eq!(logits.len(), f.logits.len());
    let max_diff = logits
        .iter()
        .zip(&f.logits)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, |m, d| if d.is_nan() || d > m { d } else { m });
    (model, max_diff)
}

fn check(name: &str) {
    let f = load(name);
    let (model, max_diff) = max_logit_diff::<B>(&f, Precision::F32, &Default::default());
    let scale = f.logits.iter().map(|x| x.abs()).fold(0.0f32, f32::max);
    println!("{name}: max |logit| {scale:.3}, max abs diff {max_diff:.2e}");
    assert!(
        scale > 1.0,
        "fixture logits are too small to make the test sensitive"
    );
    assert!(max_diff < 1e-4, "{name}: max abs diff {max_diff}");
    let (config, weights) = (&f.config, &f.weights);

    // Saving writes the same tensors back (names, shapes and values).
    let saved = to_safetensors(&model, config).unwrap();
    let saved = SafeTensors::deserialize(&saved).unwrap();
    let original = SafeTensors::deserialize(weights).unwrap();
    let mut saved_names: Vec<_> = saved.names().into_iter().map(str::to_string).collect();
    saved_names.sort();
    let mut original_names: Vec<_> = original.names().into_iter().map(str::to_string).collect();
    original_names.sort();
    assert_eq!(saved_names, original_names);
    for n in &saved_names {
        assert_eq!(
            saved.tensor(n).unwrap().data(),
            original.tensor(n).unwrap().data(),
            "{n}"
        );
    }
}

#[test]
fn neox_parallel_residual_matches_transformers() {
    check("neox");
}

#[test]
fn neox_sequential_residual_matches_transformers() {
    check("neox_seq");
}

#[test]
fn llama_gqa_matches_transformers() {
    check("llama");
}

#[test]
fn llama_tied_embeddings_match_transformers() {
    check("llama_tied");
}

/// The same four models on wgpu, through the fused attention kernels: f32 within 1e-4
/// of transformers as on the CPU, and f16 compute (the mixed-precision path; bf16 is the
/// same code with another dtype, and lavapipe has no bf16) within what half precision
/// allows.
#[cfg(feature = "cubecl")]
#[test]
fn wgpu_fused_attention_and_half_precision_match_transformers() {
    if !mixlm_model::vulkan_driver_installed() {
        return;
    }
    type Gpu = burn::backend::Wgpu;
    let device = Default::default();
    for name in ["neox", "neox_seq", "llama", "llama_tied"] {
        let f = load(name);
        let (_, f32_diff) = max_logit_diff::<Gpu>(&f, Precision::F32, &device);
        let (_, f16_diff) = max_logit_diff::<Gpu>(&f, Precision::F16, &device);
        println!("{name} on wgpu: max abs diff f32 {f32_diff:.2e}, f16 {f16_diff:.2e}");
        assert!(f32_diff < 1e-4, "{name} f32: {f32_diff}");
        assert!(f16_diff < 2e-2, "{name} f16: {f16_diff}");
        assert!(
            f16_diff > 1e-5,
            "{name}: f16 gave f32's logits: not computed in f16?"
        );
    }
}

/// Mixed precision keeps f32 master weights: computing in f16 gives f32 gradients that
/// agree with the f32 computation's (relative L2 error), for every parameter tensor of
/// the first block and the embedding.
#[cfg(feature = "cubecl")]
#[test]
fn wgpu_half_precision_gradients_are_f32_and_track_f32() {
    if !mixlm_model::vulkan_driver_installed() {
        return;
    }
    type Gpu = burn::backend::Autodiff<burn::backend::Wgpu>;
    let device = Default::default();
    let f = load("llama");
    let grads = |precision: Precision| -> Vec<(String, Vec<f32>)> {
        let model = load_safetensors::<Gpu>(&f.weights, &f.config, &device)
            .unwrap()
            .with_precision(precision);
        let ids =
            Tensor::<Gpu, 2, Int>::from_data(TensorData::new(f.ids.clone(), f.shape), &device);
        let loss = model.token_losses(ids.clone(), ids).mean();
        let grads = loss.backward();
        let block = &model.blocks[0];
        let mut out = Vec::new();
        for (name, param) in [
            ("embed", &model.embed.weight),
            ("qkv", &block.attn.qkv.weight),
            ("out", &block.attn.out.weight),
            ("up", &block.mlp.up.weight),
            ("down", &block.mlp.down.weight),
        ] {
            let g = param.grad(&grads).expect(name);
            assert_eq!(g.dtype(), burn::tensor::DType::F32, "{name} gradient dtype");
            out.push((name.to_string(), g.into_data().to_vec::<f32>().unwrap()));
        }
        out
    };
    let full = grads(Precision::F32);
    let half = grads(Precision::F16);
    for ((name, a), (_, b)) in full.iter().zip(&half) {
        let norm = a.iter().map(|x| x * x).sum::<f32>().sqrt();
        let err = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y) * (x - y))
            .sum::<f32>()
            .sqrt();
        println!(
            "{name}: |g| {norm:.3e}, f16 relative error {:.2e}",
            err / norm
        );
        assert!(norm > 0.0 && err / norm < 3e-2, "{name}: {err} / {norm}");
        assert!(err > 0.0, "{name}: f16 gave f32's gradient");
    }
}
