//! The command line's contract: one clear line for each kind of user error, and
//! model-info's parameter counts.

mod common;
use common::mixlm;

/// `--set` arguments for a 2-step run of the tiny demo model writing into `dir`.
fn tiny_run(dir: &std::path::Path, extra: &[&str]) -> Vec<String> {
    let out = format!("run.out_dir=\"{}\"", dir.display());
    [
        out.as_str(),
        "run.steps=2",
        "run.batch_size=4",
        "run.seq_len=16",
        "schedule.warmup_steps=1",
        "eval.sequences=4",
        "eval.every=0",
    ]
    .iter()
    .chain(extra)
    .flat_map(|s| ["--set".to_string(), s.to_string()])
    .collect()
}

fn single_error_line(stderr: &str) -> &str {
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {stderr}");
    lines[0]
}

#[test]
fn config_typo_is_one_line_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    let text =
        mixlm_train::config::DEFAULT_CONFIG.replace("warmup_steps = 20", "warmup_stpes = 20");
    std::fs::write(&path, text).unwrap();
    let (ok, _, err) = mixlm(&["train", "--config", path.to_str().unwrap()]);
    assert!(!ok);
    let line = single_error_line(&err);
    assert!(
        line.starts_with("error: ") && line.contains("bad.toml"),
        "{line}"
    );
    assert!(line.contains("unknown field `warmup_stpes`"), "{line}");
}

#[test]
fn bad_override_and_range_errors_are_one_line() {
    let (ok, _, err) = mixlm(&["train", "--set", "optimizer.lr=0"]);
    assert!(!ok);
    assert_eq!(
        single_error_line(&err),
        "error: optimizer.lr = 0 must be > 0"
    );
    let (ok, _, err) = mixlm(&[
        "train",
        "--set",
        "mixing.method=\"manual\"",
        "--set",
        "mixing.weights={nope=1.0}",
    ]);
    assert!(!ok);
    let line = single_error_line(&err);
    assert!(
        line.contains("mixing.weights names domain `nope`"),
        "{line}"
    );
}

#[test]
fn missing_config_file_is_named() {
    let (ok, _, err) = mixlm(&["train", "--config", "/nonexistent/run.toml"]);
    assert!(!ok);
    assert!(single_error_line(&err).starts_with("error: cannot read config /nonexistent/run.toml"));
}

#[cfg(not(feature = "cuda"))]
#[test]
fn missing_backend_is_one_line() {
    let (ok, _, err) = mixlm(&["train", "--backend", "cuda"]);
    assert!(!ok);
    assert_eq!(
        single_error_line(&err),
        "error: backend `cuda` is not compiled into this mixlm binary; rebuild with `cargo build --release --features cuda`"
    );
    let (ok, _, err) = mixlm(&["train", "--backend", "tpu"]);
    assert!(!ok);
    assert_eq!(
        single_error_line(&err),
        "error: run.backend: unknown backend `tpu`: choose cpu, wgpu or cuda"
    );
}

#[test]
fn model_info_shows_hugging_face_pythia_counts() {
    let (ok, out, _) = mixlm(&["model-info", "pythia-160m", "pythia-410m", "pythia-1b"]);
    assert!(ok);
    assert!(out.contains("162,322,944"), "{out}");
    assert!(out.contains("405,334,016"), "{out}");
    assert!(out.contains("1,011,781,632"), "{out}");
    let (ok, _, err) = mixlm(&["model-info", "gpt-5"]);
    assert!(!ok);
    assert!(single_error_line(&err).contains("unknown preset `gpt-5`"));
}

/// `mixlm prepare` on the real development corpus, then `mixlm train` from the shards
/// with the Pythia-style tiny model. Skips (saying why) when `../shared` is absent.
#[test]
fn prepare_then_train_on_the_shared_corpus() {
    let shared = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data");
    if !shared.join("corpus").exists() {
        println!(
            "skipped: {} not found (the shared development corpus)",
            shared.display()
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("shards");
    let input = format!(
        "{}/corpus/*/RedPajamaStackExchange.jsonl.zst",
        shared.display()
    );
    let tokenizer = shared.join("tokenizers/gpt-neox-20b/tokenizer.json");
    let prepare = |extra: &[&str]| {
        let mut args = vec![
            "prepare",
            "--input",
            &input,
            "--tokenizer",
            tokenizer.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        mixlm(&args)
    };
    let (ok, stdout, stderr) = prepare(&[]);
    assert!(ok, "{stderr}");
    // Token counts of the shared corpus README (GPT-NeoX tokens + one EOS per document).
    assert!(stdout.contains("4,146,199"), "{stdout}");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(
        manifest["splits"]["train"]["RedPajamaStackExchange"]["documents"],
        4077
    );
    assert_eq!(manifest["tokenizer"]["eos_id"], 0);
    let (ok, stdout, _) = prepare(&[]);
    assert!(ok && stdout.contains("up to date"), "{stdout}");

    let runs = dir.path().join("runs");
    let (ok, stdout, stderr) = mixlm(&[
        "train",
        "--config",
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../configs/shared-corpus.toml"
        ),
        "--quiet",
        "--set",
        &format!("data.path=\"{}\"", out.display()),
        "--set",
        &format!("run.out_dir=\"{}\"", runs.display()),
        "--set",
        "run.steps=3",
        "--set",
        "run.batch_size=2",
        "--set",
        "run.seq_len=32",
        "--set",
        "schedule.warmup_steps=1",
        "--set",
        "eval.sequences=2",
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("RedPajamaStackExchange"), "{stdout}");
    let metrics = std::fs::read_to_string(runs.join("shared-corpus/metrics.jsonl")).unwrap();
    assert_eq!(
        metrics
            .lines()
            .filter(|l| l.contains("\"kind\":\"train\""))
            .count(),
        3
    );
}

#[test]
fn prepare_without_inputs_is_one_line() {
    let (ok, _, err) = mixlm(&["prepare", "--tokenizer", "t.json", "--output", "out"]);
    assert!(!ok);
    assert_eq!(
        single_error_line(&err),
        "error: mixlm prepare needs --input (or data.prepare in --config)"
    );
}

/// `mix-search --method skill_it` trains one run per domain and prints the graph;
/// the mixture file it names trains with `--mixing`. Bad methods and DoReMi without
/// a reference are one line each.
#[test]
fn mix_search_skill_it_then_train_on_its_file() {
    let dir = tempfile::tempdir().unwrap();
    let small = tiny_run(
        dir.path(),
        &["checkpoint.every=0", "checkpoint.save_final=false"],
    );
    let small: Vec<&str> = small.iter().map(String::as_str).collect();
    let mut args = vec!["mix-search", "--method", "skill_it", "--quiet"];
    args.extend_from_slice(&small);
    let (ok, stdout, err) = mixlm(&args);
    assert!(ok, "{err}");
    assert!(stdout.contains("Skill-It graph"), "{stdout}");
    let file = dir.path().join("demo-search/learned_mixture.toml");
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.contains("method = \"skill_it\""), "{text}");
    for d in ["markov1", "markov2", "shared_a", "shared_b", "noisy"] {
        assert!(dir
            .path()
            .join(format!("demo-skill-{d}/metrics.jsonl"))
            .exists());
    }
    let mut args = vec!["train", "--quiet", "--mixing", file.to_str().unwrap()];
    args.extend_from_slice(&small);
    let (ok, _, err) = mixlm(&args);
    assert!(ok, "{err}");

    let (ok, _, err) = mixlm(&["mix-search", "--method", "bandit"]);
    assert!(!ok);
    assert!(
        err.contains("use grid, law, doremi, doge or skill_it"),
        "{err}"
    );
    let (ok, _, err) = mixlm(&["train", "--set", "mixing.method=\"doremi\""]);
    assert!(!ok);
    assert!(
        single_error_line(&err).contains("mixing.reference is missing"),
        "{err}"
    );
}

/// `mixlm eval` of a run folder: a per-domain table for validation and test with the
/// average per group, eval.json + eval.md next to the checkpoint; user errors are
/// one line.
#[test]
fn eval_prints_the_table_and_writes_reports() {
    let dir = tempfile::tempdir().unwrap();
    let sets = tiny_run(dir.path(), &[]);
    let mut args = vec!["train", "--quiet"];
    args.extend(sets.iter().map(String::as_str));
    let (ok, _, err) = mixlm(&args);
    assert!(ok, "{err}");
    let run = dir.path().join("demo");
    let (ok, stdout, err) = mixlm(&["eval", "--checkpoint", run.to_str().unwrap()]);
    assert!(ok, "{err}");
    let header = stdout.lines().next().unwrap();
    for col in [
        "validation ppl",
        "validation seq-mean ppl",
        "test ppl",
        "test tokens",
    ] {
        assert!(header.contains(col), "{header}");
    }
    assert!(stdout.contains("average per group"), "{stdout}");
    let ckpt = run.join("checkpoints/step-00000002");
    assert!(ckpt.join("eval.json").is_file() && ckpt.join("eval.md").is_file());

    let (ok, _, err) = mixlm(&[
        "eval",
        "--checkpoint",
        run.to_str().unwrap(),
        "--stride",
        "32",
    ]);
    assert!(!ok);
    assert_eq!(
        single_error_line(&err),
        "error: --stride must be in 1..=16 (--seq-len)"
    );
    let (ok, _, err) = mixlm(&["eval", "--checkpoint", "/nonexistent"]);
    assert!(!ok);
    assert!(
        single_error_line(&err).contains("neither a checkpoint folder"),
        "{err}"
    );
    let (ok, _, err) = mixlm(&[
        "eval",
        "--checkpoint",
        run.to_str().unwrap(),
        "--splits",
        "valid",
    ]);
    assert!(!ok);
    assert!(
        single_error_line(&err).contains("unknown split `valid`"),
        "{err}"
    );
    // The precision reaches the evaluator: the CPU has no bf16, and says so.
    let (ok, _, err) = mixlm(&[
        "eval",
        "--checkpoint",
        run.to_str().unwrap(),
        "--precision",
        "bf16",
    ]);
    assert!(!ok);
    assert!(
        single_error_line(&err).starts_with("error: run.precision = \"bf16\": the ")
            && err.contains("use precision = \"f32\""),
        "{err}"
    );
}

/// `--devices 2` on the CPU: the start line states the global batch, the run trains and
/// reports once; resuming it on three peers is refused with the accumulation that
/// keeps the global batch, and goes on with it.
#[test]
fn train_on_two_cpu_peers_then_resume_on_three() {
    let dir = tempfile::tempdir().unwrap();
    let run = tiny_run(dir.path(), &["run.grad_accum=3"]);
    let mut args = vec!["train", "--quiet", "--devices", "2"];
    args.extend(run.iter().map(String::as_str));
    let (ok, stdout, stderr) = mixlm(&args);
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains(
            "data-parallel: 2 peers x micro-batch 4 x 3 accumulation step(s) = global batch \
             of 24 sequences (384 tokens per step); gradients averaged through \
             burn-collective after the backward pass"
        ),
        "{stderr}"
    );
    assert_eq!(
        stdout.matches("Per-domain validation perplexity").count(),
        1,
        "{stdout}"
    );
    let run_dir = dir.path().join("demo");
    let metrics = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap();
    let last_train = metrics
        .lines()
        .rfind(|l| l.contains("\"kind\":\"train\""))
        .unwrap();
    assert!(last_train.contains("\"tokens\":768"), "{last_train}");
    let (ok, _, stderr) = mixlm(&[
        "train",
        "--resume",
        run_dir.to_str().unwrap(),
        "--devices",
        "3",
        "--set",
        "run.steps=4",
    ]);
    assert!(!ok);
    assert!(
        stderr.contains("trained on 2 data-parallel peer(s) with run.grad_accum = 3")
            && stderr.contains("resume with --devices 2")
            && stderr.contains("on 3 peers, set run.grad_accum = 2"),
        "{stderr}"
    );
    let (ok, _, stderr) = mixlm(&[
        "train",
        "--quiet",
        "--resume",
        run_dir.to_str().unwrap(),
        "--devices",
        "3",
        "--set",
        "run.grad_accum=2",
        "--set",
        "run.steps=4",
    ]);
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains("3 peers x micro-batch 4 x 2 accumulation step(s) = global batch of 24"),
        "{stderr}"
    );
    let metrics = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap();
    let last_train = metrics
        .lines()
        .rfind(|l| l.contains("\"kind\":\"train\""))
        .unwrap();
    assert!(last_train.contains("\"tokens\":1536"), "{last_train}");
}

/// `mixlm check-backend` on the CPU: every check passes (exit 0); a precision the
/// device lacks fails with the reason (exit non-zero, one error line); a precision
/// training does not offer is refused.
#[test]
fn check_backend_passes_on_the_cpu_and_fails_a_precision_it_lacks() {
    let (ok, out, err) = mixlm(&["check-backend", "--backend", "cpu", "--steps", "2"]);
    assert!(ok, "{out}{err}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("ok   training: 2 steps of the tiny preset on cpu")),
        "{out}"
    );
    assert!(out.lines().all(|l| !l.starts_with("FAIL")), "{out}");
    assert_eq!(
        out.lines().last(),
        Some("the cpu backend computes what the CPU reference does")
    );

    let (ok, out, err) = mixlm(&["check-backend", "--backend", "cpu", "--precision", "bf16"]);
    assert!(!ok);
    assert_eq!(
        single_error_line(&err),
        "error: 1 check(s) failed on the cpu backend"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("FAIL run.precision = \"bf16\": the ")),
        "{out}"
    );
    let (ok, _, err) = mixlm(&["check-backend", "--backend", "cpu", "--precision", "f16"]);
    assert!(!ok);
    assert_eq!(
        single_error_line(&err),
        "error: --precision f16: use f32 or bf16"
    );
}
