//! Every subcommand against bad input: an error (or a quiet exit), never a panic.
//! Then the faults that used to panic or answer wrongly without a word: a shard
//! whose token ids exceed the vocabulary, a closed stdout, a head count that does
//! not divide the width, manual weights that do not sum to 1.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use mixlm_data::prepare::testutil::{jsonl, texts, write_file, write_tokenizer};

fn mixlm_in(dir: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mixlm"))
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// A small prepared dataset (two domains, a validation split) in `dir/data`.
fn prepared(dir: &Path) -> std::path::PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let tokenizer = dir.join("tokenizer.json");
    write_tokenizer(&tokenizer, 0);
    let t = texts(120, 3);
    let rows: Vec<(&str, String)> = t
        .iter()
        .enumerate()
        .map(|(i, x)| (if i % 2 == 0 { "a" } else { "b" }, x.repeat(3)))
        .collect();
    write_file(&dir.join("raw/c.jsonl"), jsonl(&rows).as_bytes());
    let out = dir.join("data");
    let (ok, _, text) = common::mixlm(&[
        "prepare",
        "--input",
        dir.join("raw").to_str().unwrap(),
        "--tokenizer",
        tokenizer.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--set",
        "validation_fraction=0.2",
    ]);
    assert!(ok, "{text}");
    out
}

/// `mixlm train` of the tiny model for 3 steps on the prepared `data`, run `name`
/// in `cwd/runs`.
fn train_on(cwd: &Path, name: &str, data: &Path) -> (bool, String) {
    let sets = [
        format!("run.out_dir=\"{}\"", cwd.join("runs").display()),
        format!("run.name=\"{name}\""),
        format!("data.path=\"{}\"", data.display()),
        "data.source=\"shards\"".into(),
        "model.vocab_size=260".into(),
        "run.steps=3".into(),
        "run.batch_size=4".into(),
        "run.seq_len=16".into(),
        "schedule.warmup_steps=1".into(),
        "eval.sequences=4".into(),
    ];
    let mut args = vec!["train", "--quiet"];
    for s in &sets {
        args.extend(["--set", s.as_str()]);
    }
    mixlm_in(cwd, &args)
}

#[test]
fn no_subcommand_panics_on_bad_input() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let garbage = dir.join("garbage.toml");
    std::fs::write(&garbage, "\u{0}\u{1} not [toml\n").unwrap();
    let empty = dir.join("empty");
    std::fs::create_dir(&empty).unwrap();
    let g = garbage.to_str().unwrap();
    let e = empty.to_str().unwrap();
    let missing = "/nonexistent/x";
    // A prepared dataset whose train shards hold ids beyond the vocabulary.
    let data = prepared(&dir.join("damaged"));
    damage_all_train(&data);
    let (ok, text) = train_on(dir, "damaged", &data);
    assert!(
        !ok && text.contains("error") && !text.contains("panicked at"),
        "{text}"
    );
    let cases: Vec<Vec<&str>> = vec![
        vec!["doctor", data.to_str().unwrap(), "--tokenizer", g],
        vec!["train", "--config", g],
        vec!["train", "--config", missing],
        vec!["train", "--resume", e],
        vec!["train", "--resume", missing],
        vec!["train", "--mixing", g, "--set", "run.steps=1"],
        vec!["train", "--set", "run.steps=-1"],
        vec!["train", "--set", "model.n_heads=0"],
        vec!["train", "--set", "run.backend=\"tpu\""],
        vec!["train", "--devices", "0"],
        vec!["doctor", e],
        vec!["doctor", g],
        vec!["doctor", missing],
        vec!["check-backend", "--backend", "tpu"],
        vec!["check-backend", "--backend", "cpu", "--precision", "f16"],
        vec!["eval", "--checkpoint", e],
        vec!["eval", "--checkpoint", missing],
        vec!["eval", "--checkpoint", e, "--data", e],
        vec!["compare", g],
        vec!["compare", missing, "--report-only"],
        vec!["score", "quality", "--data", e],
        vec!["score", "diversity", "--data", missing, "--k", "0"],
        vec!["samplemix", "--data", e, "--budget", "0"],
        vec!["model-info", "no-such-preset"],
        vec!["model-info", "tiny", "--seq-len", "0"],
        vec!["prepare", "--input", e, "--tokenizer", g, "--output", e],
        vec!["prepare", "--config", g],
        vec!["mix-search", "--config", g],
        vec!["mix-search", "--method", "nope"],
        vec!["orchestrator", "--port", "nope"],
        vec!["no-such-command"],
    ];
    for args in &cases {
        let (ok, text) = mixlm_in(dir, args);
        assert!(!ok, "mixlm {args:?} succeeded: {text}");
        assert!(
            !text.contains("panicked at") && !text.contains("RUST_BACKTRACE"),
            "mixlm {args:?} panicked: {text}"
        );
        assert!(
            text.contains("error"),
            "mixlm {args:?} gave no error: {text}"
        );
    }
}

/// A shard of the right size whose ids exceed the vocabulary: training and evaluation
/// stop with an error naming the shard and the id, not a backend's assertion.
#[test]
fn token_ids_beyond_the_vocabulary_are_named_with_their_shard() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepared(tmp.path());
    let train = |name: &str| train_on(tmp.path(), name, &data);
    let (ok, text) = train("healthy");
    assert!(ok, "{text}");
    // 0xffff at the start of each shard of a split (u16 tokens: id 65535).
    let damage = |split: &str| {
        for domain in ["a", "b"] {
            let shard = data.join(split).join(format!("{domain}.bin"));
            let mut bytes = std::fs::read(&shard).unwrap();
            bytes[..2].copy_from_slice(&[0xff, 0xff]);
            std::fs::write(&shard, bytes).unwrap();
        }
    };
    damage("validation");
    let (ok, text) = train("bad-validation");
    assert!(!ok && !text.contains("panicked"), "{text}");
    assert!(
        text.contains(&format!(
            "{}: token id 65535 (at token 0) is not below the model's vocabulary size 260",
            data.join("validation/a.bin").display()
        )),
        "{text}"
    );
    let run = tmp.path().join("runs/healthy");
    let (ok, text) = mixlm_in(
        tmp.path(),
        &[
            "eval",
            "--checkpoint",
            run.to_str().unwrap(),
            "--splits",
            "validation",
        ],
    );
    assert!(!ok && !text.contains("panicked"), "{text}");
    assert!(text.contains("validation/a.bin: token id 65535"), "{text}");

    // A train shard: found in the first batch that reads the window.
    let fresh = prepared(&tmp.path().join("again"));
    damage_all_train(&fresh);
    let (ok, text) = train_on(tmp.path(), "bad-train", &fresh);
    assert!(!ok && !text.contains("panicked"), "{text}");
    assert!(
        text.contains("/train/")
            && text.contains(".bin: token id 65535 (in window ")
            && text.contains("mixlm doctor"),
        "{text}"
    );
}

/// Every token of every train shard set to 0xffff: any window reads one.
fn damage_all_train(data: &Path) {
    for domain in ["a", "b"] {
        let shard = data.join("train").join(format!("{domain}.bin"));
        let n = std::fs::metadata(&shard).unwrap().len() as usize;
        std::fs::write(&shard, vec![0xff; n]).unwrap();
    }
}

/// `mixlm model-info | head -1` and `mixlm doctor ... | head`: the closed pipe ends
/// the process quietly, exit status 0, as it ends Unix tools.
#[test]
fn a_closed_stdout_ends_the_command_quietly() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepared(tmp.path());
    for args in [
        vec!["model-info".to_string()],
        vec!["doctor".to_string(), data.display().to_string()],
        vec!["default-config".to_string()],
    ] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader); // closed before the first line is written
        let out = Command::new(env!("CARGO_BIN_EXE_mixlm"))
            .args(&args)
            .stdout(writer)
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{args:?}: {} {stderr}", out.status);
        assert!(stderr.is_empty(), "{args:?}: {stderr}");
    }
}

/// A head count that does not divide `d_model` is refused; manual weights that do not
/// sum to 1 are trained on normalised, and the header line says so.
#[test]
fn model_shapes_and_weights_are_not_changed_silently() {
    let tmp = tempfile::tempdir().unwrap();
    let (ok, text) = mixlm_in(
        tmp.path(),
        &[
            "train",
            "--set",
            "model.n_heads=6",
            "--set",
            "model.d_model=64",
        ],
    );
    assert!(!ok);
    assert!(
        text.contains("model.n_heads = 6 does not divide model.d_model = 64"),
        "{text}"
    );
    let (ok, text) = mixlm_in(
        tmp.path(),
        &[
            "train",
            "--quiet",
            "--set",
            "run.steps=1",
            "--set",
            "schedule.warmup_steps=1",
            "--set",
            "eval.sequences=2",
            "--set",
            "mixing.method=\"manual\"",
            "--set",
            "mixing.weights={ markov1 = 1.0, markov2 = 0.5, shared_a = 0.5, shared_b = 0.2, noisy = 0.1 }",
        ],
    );
    assert!(ok, "{text}");
    let header = text
        .lines()
        .find(|l| l.starts_with("mixlm train:"))
        .unwrap();
    assert!(
        header.contains("mixing manual (mixing.weights sum to 2.3, normalised to markov1 0.4348"),
        "{header}"
    );
}

/// Paths in a config file resolve against the file's folder, whatever the current
/// folder; a run saves them absolute, so `doctor`, `eval` and `--resume` of the run
/// work from any folder.
#[test]
fn config_paths_resolve_against_the_file_and_saved_runs_work_from_anywhere() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepared(tmp.path());
    let configs = tmp.path().join("configs");
    std::fs::create_dir(&configs).unwrap();
    let config = configs.join("run.toml");
    let text = mixlm_train::config::DEFAULT_CONFIG.replace(
        "source = \"synthetic\"",
        "source = \"shards\"\npath = \"../data\"",
    );
    assert!(text.contains("path = \"../data\""));
    std::fs::write(&config, text).unwrap();
    let elsewhere = tmp.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    let (ok, text) = mixlm_in(
        &elsewhere,
        &[
            "train",
            "--quiet",
            "--config",
            config.to_str().unwrap(),
            "--set",
            "run.out_dir=\"runs\"",
            "--set",
            "model.vocab_size=260",
            "--set",
            "run.steps=4",
            "--set",
            "run.seq_len=16",
            "--set",
            "run.batch_size=4",
            "--set",
            "schedule.warmup_steps=1",
            "--set",
            "eval.sequences=4",
            "--set",
            "checkpoint.every=2",
            "--set",
            "checkpoint.save_final=false",
        ],
    );
    assert!(ok, "{text}");
    // `run.out_dir` is where the command runs.
    let run = elsewhere.join("runs/demo");
    let saved = std::fs::read_to_string(run.join("config.toml")).unwrap();
    assert!(
        saved.contains(&format!("path = \"{}\"", configs.join("../data").display())),
        "{saved}"
    );
    let other = tmp.path().join("other");
    std::fs::create_dir(&other).unwrap();
    let r = run.to_str().unwrap();
    let (ok, text) = mixlm_in(&other, &["doctor", r]);
    assert!(ok, "{text}");
    let (ok, text) = mixlm_in(&other, &["eval", "--checkpoint", r, "--out", "e"]);
    assert!(ok, "{text}");
    let (ok, text) = mixlm_in(
        &other,
        &["train", "--quiet", "--resume", r, "--set", "run.steps=6"],
    );
    assert!(ok, "{text}");
    assert_eq!(common::last_step(&run), 6);
    let _ = data;
}
