//! Hugging Face folders as `mixlm eval --checkpoint` and `model.init_from` read them
//! (`checkpoint::load_model`), on fixtures transformers wrote
//! (`scripts/make_parity_fixtures.py`): a sharded checkpoint loads as the unsharded one
//! does, and models mixlm cannot represent are refused naming the reason.

use std::path::PathBuf;

use burn::backend::NdArray;
use burn::tensor::{Int, Tensor, TensorData};
use mixlm_train::checkpoint::{has_weights, load_model, weight_files};
use safetensors::SafeTensors;

type B = NdArray<f32>;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/parity")
        .join(name)
}

/// `llama/`'s input ids and the logits transformers computed for them.
fn llama_io() -> (Vec<i64>, [usize; 2], Vec<f32>) {
    let bytes = std::fs::read(fixture("llama/io.safetensors")).unwrap();
    let io = SafeTensors::deserialize(&bytes).unwrap();
    let ids = io.tensor("input_ids").unwrap();
    let shape = [ids.shape()[0], ids.shape()[1]];
    let ids = ids
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let logits = io
        .tensor("logits")
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    (ids, shape, logits)
}

fn logits_of(folder: &str) -> Vec<f32> {
    let (ids, shape, _) = llama_io();
    let (model, _) = load_model::<B>(&fixture(folder), &Default::default()).unwrap();
    let tokens = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, shape), &Default::default());
    model.forward(tokens).into_data().into_vec().unwrap()
}

/// `save_pretrained(max_shard_size=...)`'s index and seven shards load into the same
/// model as the single file: the same logits to the bit, within 1e-4 of transformers'.
#[test]
fn a_sharded_checkpoint_loads_as_the_single_file_does() {
    let dir = fixture("llama_sharded");
    assert!(has_weights(&dir) && !dir.join("model.safetensors").exists());
    assert_eq!(weight_files(&dir).unwrap().len(), 7);
    let sharded = logits_of("llama_sharded");
    assert_eq!(sharded, logits_of("llama"));
    let (_, _, expected) = llama_io();
    let max_diff = sharded
        .iter()
        .zip(&expected)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(max_diff < 1e-4, "max abs diff {max_diff}");

    // An index that names a shard which is not there is refused, naming both.
    let tmp = tempfile::tempdir().unwrap();
    for f in std::fs::read_dir(&dir).unwrap() {
        let f = f.unwrap().path();
        if !f.ends_with("model-00003-of-00007.safetensors") {
            std::fs::copy(&f, tmp.path().join(f.file_name().unwrap())).unwrap();
        }
    }
    let err = format!(
        "{:#}",
        load_model::<B>(tmp.path(), &Default::default()).unwrap_err()
    );
    assert!(
        err.contains("model-00003-of-00007.safetensors") && err.contains("index.json"),
        "{err}"
    );
}

/// Each unsupported model is refused with the reason: GPT-2's `model_type` (not a
/// missing `hidden_size`), and biases mixlm's layers do not have (their tensors would
/// be dropped and the perplexity be wrong), named by their config key.
#[test]
fn unsupported_models_are_refused_naming_the_reason() {
    for (folder, wanted) in [
        ("gpt2", &["model_type `gpt2`", "gpt_neox", "llama"][..]),
        (
            "neox_no_attention_bias",
            &["`attention_bias = false`", "gpt_neox"],
        ),
        (
            "llama_attention_bias",
            &["`attention_bias = true`", "llama"],
        ),
        ("llama_mlp_bias", &["`mlp_bias = true`", "llama"]),
    ] {
        let dir = fixture("unsupported").join(folder);
        let err = format!(
            "{:#}",
            load_model::<B>(&dir, &Default::default()).unwrap_err()
        );
        for w in wanted {
            assert!(err.contains(w), "{folder}: `{w}` not in: {err}");
        }
        assert!(
            err.contains("config.json"),
            "{folder}: names the file: {err}"
        );
    }
}
