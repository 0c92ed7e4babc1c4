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

/// A checkpoint above `checkpoint.shard_mb` is written as transformers writes a large
/// model (shards and their index, all in the manifest) and loads back to the same
/// logits as the unsharded checkpoint of the same run; a damaged shard is named.
#[test]
fn large_checkpoints_are_written_in_shards() {
    use mixlm_train::{train, RunConfig, TrainOptions};
    type AB = burn::backend::Autodiff<B>;
    let run = |dir: &std::path::Path, shard_mb: &str| {
        let config = RunConfig::embedded(&[
            format!("run.out_dir=\"{}\"", dir.display()),
            "run.steps=2".into(),
            "run.batch_size=2".into(),
            "run.seq_len=8".into(),
            "schedule.warmup_steps=1".into(),
            "eval.every=0".into(),
            "eval.sequences=2".into(),
            format!("checkpoint.shard_mb={shard_mb}"),
        ])
        .unwrap();
        let outcome = train::<AB>(&config, &Default::default(), &TrainOptions::quiet()).unwrap();
        mixlm_train::checkpoint::latest_checkpoint(&outcome.run_dir).unwrap()
    };
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let single = run(a.path(), "0");
    let sharded = run(b.path(), "0.1");
    assert!(single.join("model.safetensors").is_file());
    assert!(!sharded.join("model.safetensors").exists());
    let shards = weight_files(&sharded).unwrap();
    assert!(shards.len() >= 3, "{shards:?}");
    for shard in &shards {
        assert!(
            std::fs::metadata(shard).unwrap().len() <= 100_000 + 60_000,
            "{shard:?}"
        );
    }
    let index: serde_json::Value = serde_json::from_slice(
        &std::fs::read(sharded.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let single_bytes = std::fs::read(single.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&single_bytes).unwrap();
    let total: usize = st.tensors().iter().map(|(_, t)| t.data().len()).sum();
    assert_eq!(index["metadata"]["total_size"], total);
    assert_eq!(index["weight_map"].as_object().unwrap().len(), st.len());
    mixlm_train::checkpoint::verify(&sharded).unwrap();

    let logits = |dir: &std::path::Path| -> Vec<f32> {
        let (model, _) = load_model::<B>(dir, &Default::default()).unwrap();
        let ids = Tensor::<B, 2, Int>::from_data(
            TensorData::new((0..16).map(|i| i % 100).collect::<Vec<i64>>(), [2, 8]),
            &Default::default(),
        );
        model.forward(ids).into_data().into_vec().unwrap()
    };
    assert_eq!(logits(&sharded), logits(&single));

    let victim = &shards[1];
    let mut bytes = std::fs::read(victim).unwrap();
    let n = bytes.len();
    bytes[n - 5] ^= 1;
    std::fs::write(victim, bytes).unwrap();
    let err = format!(
        "{:#}",
        mixlm_train::checkpoint::verify(&sharded).unwrap_err()
    );
    assert!(
        err.contains(victim.file_name().unwrap().to_str().unwrap()),
        "{err}"
    );
}
