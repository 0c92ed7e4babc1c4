//! The command line's contract: one clear line for each kind of user error, and
//! model-info's parameter counts.

use std::process::Command;

fn mixlm(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mixlm"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
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
