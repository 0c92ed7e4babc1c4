//! Parity with Hugging Face transformers: tiny random GPT-NeoX and Llama models
//! built by `scripts/make_parity_fixtures.py`; their weights load into mixlm and the
//! logits must agree with the ones transformers computed (max abs diff < 1e-4).

use std::path::PathBuf;

use burn::backend::NdArray;
use burn::tensor::{Int, Tensor, TensorData};
use mixlm_model::hf::{config_from_hf, load_safetensors, to_safetensors};
use safetensors::SafeTensors;

type B = NdArray<f32>;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/parity")
        .join(name)
}

fn check(name: &str) {
    let dir = fixture(name);
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    let config = config_from_hf(&config).unwrap();
    let device = Default::default();
    let weights = std::fs::read(dir.join("model.safetensors")).unwrap();
    let model = load_safetensors::<B>(&weights, &config, &device).unwrap();

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

    let tokens =
        Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [shape[0], shape[1]]), &device);
    let logits: Vec<f32> = model
        .forward(tokens)
        .into_data()
        .convert::<f32>()
        .into_vec()
        .unwrap();
    assert_eq!(logits.len(), expected.len());
    let max_diff = logits
        .iter()
        .zip(&expected)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    let scale = expected.iter().map(|x| x.abs()).fold(0.0f32, f32::max);
    println!("{name}: max |logit| {scale:.3}, max abs diff {max_diff:.2e}");
    assert!(
        scale > 1.0,
        "fixture logits are too small to make the test sensitive"
    );
    assert!(max_diff < 1e-4, "{name}: max abs diff {max_diff}");

    // Saving writes the same tensors back (names, shapes and values).
    let saved = to_safetensors(&model, &config).unwrap();
    let saved = SafeTensors::deserialize(&saved).unwrap();
    let original = SafeTensors::deserialize(&weights).unwrap();
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
