//! `mixlm eval --checkpoint` of a Hugging Face folder (made by transformers:
//! `scripts/make_parity_fixtures.py`): the folder's own config and tokenizer win over
//! the embedded demo config's, with no `--set`.

mod common;

use std::path::{Path, PathBuf};

use mixlm_data::prepare::testutil::{texts, write_tokenizer};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/parity")
        .join(name)
}

/// A GPT-NeoX with 300 token ids (the demo config has 128) scores a held-out file with
/// the folder's own `tokenizer.json`; without one, the error says where it looked.
#[test]
fn a_hugging_face_folder_is_evaluated_with_its_own_vocabulary_and_tokenizer() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    std::fs::create_dir(&model).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture("neox_vocab300").join(f), model.join(f)).unwrap();
    }
    let held = tmp.path().join("wiki.jsonl");
    let lines: String = texts(6, 3)
        .iter()
        .map(|t| serde_json::json!({ "text": t.repeat(4) }).to_string() + "\n")
        .collect();
    std::fs::write(&held, lines).unwrap();
    let eval = |out: &str| {
        common::mixlm(&[
            "eval",
            "--checkpoint",
            model.to_str().unwrap(),
            "--heldout",
            held.to_str().unwrap(),
            "--max-tokens",
            "256",
            "--out",
            tmp.path().join(out).to_str().unwrap(),
        ])
    };
    let (ok, _, err) = eval("e0");
    assert!(!ok);
    assert!(
        err.contains("give --tokenizer") && err.contains("has no tokenizer.json"),
        "{err}"
    );

    // The byte-level test tokenizer: 257 ids, which fit the model's 300.
    write_tokenizer(&model.join("tokenizer.json"), 0);
    let (ok, out, err) = eval("e1");
    assert!(ok, "{err}");
    let row = out
        .lines()
        .find(|l| l.starts_with("wiki ") && !l.contains("average"))
        .unwrap_or_else(|| panic!("no held-out row in:\n{out}"));
    let ppl: f64 = row.split_whitespace().nth(2).unwrap().parse().unwrap();
    assert!(ppl.is_finite() && ppl > 1.0, "{row}");
}
