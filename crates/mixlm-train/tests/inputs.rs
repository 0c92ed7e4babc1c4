//! The config parser and the checkpoint loader on damaged input: mutated configs and
//! checkpoint files with arbitrary bytes (behind a manifest that matches them, so the
//! checksum does not stop them before the parsers) give an error, never a panic. The
//! same entry points are cargo-fuzz targets (`tests/fuzz`, `scripts/fuzz.sh`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use burn::backend::{Autodiff, NdArray};
use mixlm_train::checkpoint::{
    latest_checkpoint, load_checkpoint, FileDigest, Manifest, CHECKPOINT_FILES, CHECKPOINT_FORMAT,
};
use mixlm_train::config::DEFAULT_CONFIG;
use mixlm_train::{train, RunConfig, TrainOptions};
use proptest::prelude::*;

type B = Autodiff<NdArray<f32>>;

fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("-1".to_string()),
        Just("0".to_string()),
        Just("3".to_string()),
        Just("2.5".to_string()),
        Just("1e400".to_string()),
        Just("nan".to_string()),
        Just("inf".to_string()),
        Just("\"x\"".to_string()),
        Just("[]".to_string()),
        Just("{}".to_string()),
        Just("true".to_string()),
        Just("\"".to_string()),
        "[a-z_]{1,8}",
    ]
}

/// A mutation of one line of the default config.
#[derive(Debug, Clone)]
enum Edit {
    Delete,
    Value(String),
    Duplicate,
    Insert(String),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        Just(Edit::Delete),
        value().prop_map(Edit::Value),
        Just(Edit::Duplicate),
        "[a-z_.=\\[\\] \"0-9]{0,20}".prop_map(Edit::Insert),
    ]
}

fn mutate(edits: &[(prop::sample::Index, Edit)]) -> String {
    let mut lines: Vec<String> = DEFAULT_CONFIG.lines().map(String::from).collect();
    for (at, e) in edits {
        let i = at.index(lines.len());
        match e {
            Edit::Delete => {
                lines.remove(i);
            }
            Edit::Value(v) => {
                if let Some((key, _)) = lines[i].split_once('=') {
                    lines[i] = format!("{key}= {v}");
                }
            }
            Edit::Duplicate => lines.insert(i, lines[i].clone()),
            Edit::Insert(s) => lines.insert(i, s.clone()),
        }
    }
    lines.join("\n")
}

/// The files of a real checkpoint of the tiny model (trained once per process).
fn checkpoint_files() -> &'static Vec<(String, Vec<u8>)> {
    static FILES: OnceLock<Vec<(String, Vec<u8>)>> = OnceLock::new();
    FILES.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let overrides = [
            format!("run.out_dir=\"{}\"", dir.path().display()),
            "run.steps=2".into(),
            "run.batch_size=2".into(),
            "run.seq_len=8".into(),
            "schedule.warmup_steps=1".into(),
            "eval.sequences=2".into(),
            "eval.every=0".into(),
        ];
        let config = RunConfig::embedded(&overrides).unwrap();
        let options = TrainOptions::quiet();
        let outcome = train::<B>(&config, &Default::default(), &options).unwrap();
        let ckpt = latest_checkpoint(&outcome.run_dir).unwrap();
        std::iter::once(&"model.safetensors")
            .chain(&CHECKPOINT_FILES)
            .map(|f| (f.to_string(), std::fs::read(ckpt.join(f)).unwrap()))
            .collect()
    })
}

/// Writes `files` as a checkpoint folder with a manifest that matches them.
fn write_checkpoint(dir: &Path, files: &[(String, Vec<u8>)]) -> PathBuf {
    let ckpt = dir.join("step-00000002");
    std::fs::create_dir_all(&ckpt).unwrap();
    let mut manifest = Manifest {
        format: CHECKPOINT_FORMAT,
        step: 2,
        files: BTreeMap::new(),
    };
    for (name, bytes) in files {
        std::fs::write(ckpt.join(name), bytes).unwrap();
        manifest.files.insert(name.clone(), FileDigest::of(bytes));
    }
    std::fs::write(
        ckpt.join("manifest.json"),
        serde_json::to_vec(&manifest).unwrap(),
    )
    .unwrap();
    ckpt
}

#[derive(Debug, Clone)]
enum Damage {
    Truncate(prop::sample::Index),
    Flip(prop::sample::Index, u8),
    Replace(Vec<u8>),
    Append(Vec<u8>),
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        any::<prop::sample::Index>().prop_map(Damage::Truncate),
        (any::<prop::sample::Index>(), 1u8..=255).prop_map(|(i, b)| Damage::Flip(i, b)),
        proptest::collection::vec(any::<u8>(), 0..64).prop_map(Damage::Replace),
        proptest::collection::vec(any::<u8>(), 1..64).prop_map(Damage::Append),
    ]
}

fn apply(bytes: &[u8], d: &Damage) -> Vec<u8> {
    match d {
        Damage::Truncate(i) => bytes[..i.index(bytes.len())].to_vec(),
        Damage::Flip(i, b) => {
            let mut out = bytes.to_vec();
            let i = i.index(out.len());
            out[i] ^= b;
            out
        }
        Damage::Replace(new) => new.clone(),
        Damage::Append(extra) => [bytes, &extra[..]].concat(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn config_parser_errors_are_one_line(edits in proptest::collection::vec((any::<prop::sample::Index>(), edit()), 1..4)) {
        let text = mutate(&edits);
        // Pure validation, then the checks against the data.
        let opened = RunConfig::from_toml(&text, "fuzz.toml", &[]).and_then(|c| c.open_checked_source());
        if let Err(e) = opened {
            let message = e.to_string();
            prop_assert!(!message.is_empty() && !message.contains('\n'), "{message}");
        }
    }

    #[test]
    fn checkpoint_loader_rejects_damage_without_panicking(file in 0usize..5, d in damage()) {
        let mut files = checkpoint_files().clone();
        files[file].1 = apply(&files[file].1, &d);
        let dir = tempfile::tempdir().unwrap();
        let ckpt = write_checkpoint(dir.path(), &files);
        // Loads (the damage left the file meaningful) or says what is wrong.
        if let Err(e) = load_checkpoint::<B>(&ckpt, &Default::default()) {
            let message = format!("{e:#}");
            prop_assert!(!message.is_empty());
        }
    }
}

#[test]
fn an_undamaged_checkpoint_loads() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = write_checkpoint(dir.path(), checkpoint_files());
    let restored = load_checkpoint::<B>(&ckpt, &Default::default()).unwrap();
    assert_eq!(restored.state.step, 2);
}

/// Evaluation and DoReMi's reference load a run's newest checkpoint that verifies: a
/// corrupt newest one is skipped, not loaded.
#[test]
fn the_latest_checkpoint_of_a_run_is_a_verified_one() {
    let run = tempfile::tempdir().unwrap();
    let root = run.path().join("checkpoints");
    let good = write_checkpoint(&root, checkpoint_files());
    let newer = root.join("step-00000004");
    std::fs::create_dir_all(&newer).unwrap();
    for entry in std::fs::read_dir(&good).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), newer.join(entry.file_name())).unwrap();
    }
    std::fs::write(root.join("latest"), "step-00000004").unwrap();
    assert_eq!(latest_checkpoint(run.path()).unwrap(), newer);
    let weights = newer.join("model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&weights, bytes).unwrap();
    assert_eq!(latest_checkpoint(run.path()).unwrap(), good);
}
