//! A run's TensorBoard event files, read by TensorBoard's own reader (the `tensorboard`
//! Python package, `scripts/tensorboard_scalars.py`), hold the numbers of its
//! `metrics.jsonl`, and a resumed run has each step once. `.ci/run` installs the
//! package into `target/tb-venv`; without it the test says so and skips.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A Python that imports `tensorboard`: `MIXLM_TENSORBOARD_PYTHON`, CI's venv, or
/// `python3`.
fn python() -> Option<PathBuf> {
    let candidates = [
        std::env::var_os("MIXLM_TENSORBOARD_PYTHON").map(PathBuf::from),
        Some(workspace().join("target/tb-venv/bin/python")),
        Some(PathBuf::from("python3")),
    ];
    let found = candidates.into_iter().flatten().find(|p| {
        Command::new(p)
            .args(["-c", "import tensorboard"])
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if found.is_none() {
        eprintln!(
            "skipped: no Python with the tensorboard package (python3 -m venv target/tb-venv \
             && target/tb-venv/bin/pip install tensorboard, as .ci/run does)"
        );
    }
    found
}

/// `{tag: [(step, value)]}` as TensorBoard reads the folder.
fn read_back(python: &Path, logdir: &Path) -> serde_json::Map<String, Value> {
    let out = Command::new(python)
        .arg(workspace().join("scripts/tensorboard_scalars.py"))
        .arg(logdir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn train(dir: &Path, extra: &[&str]) {
    train_named(dir, "tb", extra)
}

/// A 6-step run of the demo model named `name` in `dir`.
fn train_named(dir: &Path, name: &str, extra: &[&str]) {
    let out = format!("run.out_dir=\"{}\"", dir.display());
    let name = format!("run.name=\"{name}\"");
    let mut args = vec!["train", "--quiet", "--set", &out, "--set", &name];
    for s in [
        "run.steps=6",
        "run.batch_size=4",
        "run.seq_len=32",
        "eval.every=3",
        "eval.sequences=8",
        "checkpoint.every=4",
        "schedule.warmup_steps=2",
    ]
    .iter()
    .chain(extra)
    {
        args.extend(["--set", s]);
    }
    let (ok, _, err) = common::mixlm(&args);
    assert!(ok, "{err}");
}

#[test]
fn tensorboard_reads_the_metrics_and_a_resumed_run_has_each_step_once() {
    let Some(python) = python() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    train(dir.path(), &["checkpoint.save_final=false"]);
    let run = dir.path().join("tb");
    assert_eq!(common::last_step(&run), 6);
    // Resumed from the checkpoint of step 4: steps 5 and 6 are trained again.
    let (ok, _, err) = common::mixlm(&[
        "train",
        "--quiet",
        "--resume",
        run.to_str().unwrap(),
        "--set",
        "run.steps=8",
    ]);
    assert!(ok, "{err}");

    let board = read_back(&python, &run.join("tensorboard"));
    let series = |tag: &str| -> Vec<(u64, f64)> {
        board
            .get(tag)
            .unwrap_or_else(|| panic!("no tag {tag} in {:?}", board.keys().collect::<Vec<_>>()))
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (p[0].as_u64().unwrap(), p[1].as_f64().unwrap()))
            .collect()
    };
    let steps: Vec<u64> = series("train/loss").iter().map(|p| p.0).collect();
    assert_eq!(steps, (1..=8).collect::<Vec<_>>(), "each step once");

    // Every number of metrics.jsonl, at its step and at its tokens (f32 in the files).
    let near = |a: f64, b: f64| (a - b).abs() <= 1e-6 * b.abs().max(1e-30);
    let mut checked = 0;
    for record in common::metrics(&run) {
        let step = record["step"].as_u64().unwrap();
        let tokens = record["tokens"].as_u64().unwrap();
        let mut expect = |tag: String, want: &Value| {
            let Some(want) = want.as_f64() else { return };
            for (tag, at) in [(tag.clone(), step), (format!("by_tokens/{tag}"), tokens)] {
                let got = series(&tag);
                let hits: Vec<f64> = got.iter().filter(|p| p.0 == at).map(|p| p.1).collect();
                assert_eq!(hits.len(), 1, "{tag} at {at}: {got:?}");
                assert!(
                    near(hits[0], want as f32 as f64),
                    "{tag} at {at}: {} vs {want}",
                    hits[0]
                );
                checked += 1;
            }
        };
        match record["kind"].as_str().unwrap() {
            "train" => {
                for key in ["loss", "lr", "grad_norm"] {
                    expect(format!("train/{key}"), &record[key]);
                }
                for (field, prefix) in
                    [("domain_loss", "train/loss"), ("proportions", "proportion")]
                {
                    for (d, v) in record[field].as_object().unwrap() {
                        expect(format!("{prefix}/{d}"), v);
                    }
                }
            }
            _ => {
                for (field, prefix) in [("val_loss", "val/loss"), ("val_ppl", "val/ppl")] {
                    for (d, v) in record[field].as_object().unwrap() {
                        expect(format!("{prefix}/{d}"), v);
                    }
                }
            }
        }
    }
    assert!(checked > 200, "only {checked} values compared");
}

/// A method's own quantities (ODM's reward per domain) are in `metrics.jsonl` under
/// `method` and in TensorBoard under `method/reward/<domain>`, step by step.
#[test]
fn the_methods_own_quantities_reach_tensorboard() {
    let Some(python) = python() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    train_named(dir.path(), "odm", &["mixing.method=\"odm\""]);
    let run = dir.path().join("odm");
    let board = read_back(&python, &run.join("tensorboard"));
    let mut checked = 0;
    for record in common::metrics(&run)
        .iter()
        .filter(|r| r["kind"] == "train")
    {
        let step = record["step"].as_u64().unwrap();
        let rewards = record["method"]["reward"]
            .as_object()
            .expect("ODM's rewards");
        assert_eq!(rewards.len(), 5, "{record}");
        for (domain, want) in rewards {
            let tag = format!("method/reward/{domain}");
            let got = board[&tag].as_array().unwrap();
            let at = got
                .iter()
                .find(|p| p[0] == step)
                .unwrap_or_else(|| panic!("{tag} {step}"));
            let want = want.as_f64().unwrap() as f32 as f64;
            assert_eq!(at[1].as_f64().unwrap(), want, "{tag} at {step}");
            checked += 1;
        }
    }
    assert_eq!(checked, 6 * 5);
}
