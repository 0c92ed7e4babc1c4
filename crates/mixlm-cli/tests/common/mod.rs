//! What the command-line tests share.
// Each test binary uses some of these.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

use serde_json::Value;

/// Runs the `mixlm` binary: (success, stdout, stderr).
pub fn mixlm(args: &[&str]) -> (bool, String, String) {
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

/// The records of a run's `metrics.jsonl` without their wall-clock fields (every line
/// must be whole).
pub fn metrics(run_dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: Value = serde_json::from_str(l).expect("no torn line");
            let o = v.as_object_mut().unwrap();
            for timing in mixlm_train::metrics::CLOCK_FIELDS {
                o.remove(timing);
            }
            v
        })
        .collect()
}

/// The last training step a (perhaps still running) run has logged; 0 before any.
pub fn last_step(run_dir: &Path) -> u64 {
    let Ok(text) = std::fs::read_to_string(run_dir.join("metrics.jsonl")) else {
        return 0;
    };
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["kind"] == "train")
        .filter_map(|v| v["step"].as_u64())
        .max()
        .unwrap_or(0)
}
