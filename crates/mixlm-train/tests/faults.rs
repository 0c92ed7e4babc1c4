//! `[faults] on_nan`: a step whose loss is NaN (injected with
//! `faults.inject_nan_steps`) is skipped, rolled back or stops the run, as configured,
//! and every fault is reported in `faults.jsonl` with the step's batch.

use burn::backend::{Autodiff, NdArray};
use mixlm_train::checkpoint::latest_checkpoint;
use mixlm_train::{train, RunConfig, TrainOptions};
use serde_json::Value;

type B = Autodiff<NdArray<f32>>;

fn config(dir: &std::path::Path, name: &str, extra: &[&str]) -> RunConfig {
    let mut overrides: Vec<String> = vec![
        format!("run.out_dir=\"{}\"", dir.display()),
        format!("run.name=\"{name}\""),
        "run.steps=12".into(),
        "run.batch_size=4".into(),
        "run.seq_len=16".into(),
        "schedule.warmup_steps=2".into(),
        "eval.every=0".into(),
        "eval.sequences=4".into(),
        "checkpoint.every=3".into(),
        "faults.inject_nan_steps=[5, 8]".into(),
    ];
    overrides.extend(extra.iter().map(|s| s.to_string()));
    RunConfig::embedded(&overrides).unwrap()
}

fn run(config: &RunConfig) -> anyhow::Result<mixlm_train::TrainOutcome> {
    let options = TrainOptions::quiet();
    train::<B>(config, &Default::default(), &options)
}

fn jsonl(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The step records of `metrics.jsonl`, without their wall-clock fields.
fn train_records(run_dir: &std::path::Path) -> Vec<Value> {
    jsonl(&run_dir.join("metrics.jsonl"))
        .into_iter()
        .filter(|v| v["kind"] == "train")
        .map(|mut v| {
            let o = v.as_object_mut().unwrap();
            for timing in mixlm_train::metrics::CLOCK_FIELDS {
                o.remove(timing);
            }
            v
        })
        .collect()
}

fn state(run_dir: &std::path::Path) -> Value {
    let dir = latest_checkpoint(run_dir).unwrap();
    serde_json::from_slice(&std::fs::read(dir.join("state.json")).unwrap()).unwrap()
}

#[test]
fn skip_leaves_the_model_and_counts_the_step() {
    let tmp = tempfile::tempdir().unwrap();
    let outcome = run(&config(tmp.path(), "skip", &[])).unwrap();
    let steps = train_records(&outcome.run_dir);
    assert_eq!(steps.len(), 12);
    for s in &steps {
        let n = s["step"].as_u64().unwrap();
        let bad = n == 5 || n == 8;
        assert_eq!(s.get("skipped").is_some(), bad, "step {n}: {s}");
        assert_eq!(s["loss"].is_null(), bad, "step {n}");
    }
    // AdamW took 10 updates in 12 steps.
    let st = state(&outcome.run_dir);
    assert_eq!(
        (st["step"].as_u64(), st["optimizer_steps"].as_u64()),
        (Some(12), Some(10))
    );
    assert_eq!(st["skipped_steps"], 2);
    let faults = jsonl(&outcome.run_dir.join("faults.jsonl"));
    assert_eq!(faults.len(), 2);
    for (f, step) in faults.iter().zip([5, 8]) {
        assert_eq!(
            (f["kind"].as_str(), f["action"].as_str()),
            (Some("nan"), Some("skipped"))
        );
        assert_eq!(f["step"], step);
        // The batch: 4 sequences named by domain and window (the synthetic corpus has
        // no documents).
        let seqs = f["sequences"].as_array().unwrap();
        assert_eq!(seqs.len(), 4);
        assert!(
            seqs.iter().all(|s| s["domain"].is_string()
                && s["window"].is_u64()
                && s.get("documents").is_none()),
            "{f}"
        );
    }
}

#[test]
fn rollback_reloads_the_checkpoint_with_a_lower_learning_rate() {
    let tmp = tempfile::tempdir().unwrap();
    let plain = run(&config(
        tmp.path(),
        "plain",
        &["faults.inject_nan_steps=[]"],
    ))
    .unwrap();
    let outcome = run(&config(
        tmp.path(),
        "rollback",
        &["faults.on_nan=\"rollback\""],
    ))
    .unwrap();
    let (a, b) = (
        train_records(&plain.run_dir),
        train_records(&outcome.run_dir),
    );
    assert_eq!(b.len(), 12, "each step once");
    let lr = |v: &Value| v["lr"].as_f64().unwrap();
    let steps: Vec<u64> = b.iter().map(|v| v["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, (1..=12).collect::<Vec<_>>());
    // Steps 1-3 as without faults; from the rollback to step 3, half the learning
    // rate; from the one to step 6, a quarter.
    for i in 0..12 {
        let scale = match i + 1 {
            1..=3 => 1.0,
            4..=6 => 0.5,
            _ => 0.25,
        };
        assert!(
            (lr(&b[i]) - scale * lr(&a[i])).abs() < 1e-15,
            "step {}",
            i + 1
        );
    }
    assert_eq!(a[..3], b[..3]);
    let faults = jsonl(&outcome.run_dir.join("faults.jsonl"));
    let back: Vec<(u64, f64)> = faults
        .iter()
        .map(|f| {
            assert_eq!(f["action"], "rolled_back");
            (
                f["rolled_back_to"].as_u64().unwrap(),
                f["lr_scale"].as_f64().unwrap(),
            )
        })
        .collect();
    assert_eq!(back, vec![(3, 0.5), (6, 0.25)]);
    assert_eq!(state(&outcome.run_dir)["lr_scale"], 0.25);
}

#[test]
fn stop_reports_and_the_run_resumes_with_another_policy() {
    let tmp = tempfile::tempdir().unwrap();
    let c = config(tmp.path(), "stop", &["faults.on_nan=\"stop\""]);
    let e = format!("{:#}", run(&c).unwrap_err());
    assert!(
        e.starts_with("step 5: the loss is NaN") && e.contains("faults.on_nan = \"stop\""),
        "{e}"
    );
    assert!(e.contains("mixlm train --resume"), "{e}");
    let run_dir = tmp.path().join("stop");
    assert_eq!(train_records(&run_dir).len(), 4, "steps 1-4 logged");
    assert_eq!(jsonl(&run_dir.join("faults.jsonl"))[0]["action"], "stopped");

    // Resumed from step 3 with skip: the NaN of step 5 is injected again and skipped.
    let mut c = c;
    c.faults.on_nan = mixlm_train::faults::OnNan::Skip;
    let outcome = train::<B>(
        &c,
        &Default::default(),
        &TrainOptions {
            quiet: true,
            start: mixlm_train::Start::Resume,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(outcome.resumed_from, Some(3));
    let steps = train_records(&run_dir);
    assert_eq!(steps.len(), 12);
    assert_eq!(state(&run_dir)["skipped_steps"], 2);
}

#[test]
fn too_many_bad_steps_in_a_row_stop_any_policy() {
    let tmp = tempfile::tempdir().unwrap();
    let c = config(
        tmp.path(),
        "many",
        &[
            "faults.inject_nan_steps=[2, 3, 4]",
            "faults.max_consecutive=2",
        ],
    );
    let e = format!("{:#}", run(&c).unwrap_err());
    assert!(
        e.starts_with("step 4: ") && e.contains("3 bad step(s) in a row"),
        "{e}"
    );
}

#[test]
fn rollback_needs_a_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let c = config(
        tmp.path(),
        "early",
        &["faults.on_nan=\"rollback\"", "faults.inject_nan_steps=[2]"],
    );
    let e = format!("{:#}", run(&c).unwrap_err());
    assert!(
        e.contains("faults.on_nan = \"rollback\" needs a checkpoint")
            && e.contains("has no checkpoint"),
        "{e}"
    );
}

/// With data-parallel peers a fault report lists the whole global batch, every peer's
/// sequences (peer 0's micro-batch, then peer 1's): the same as one device's
/// accumulating both micro-batches.
#[test]
fn a_fault_report_lists_every_peers_sequences() {
    let tmp = tempfile::tempdir().unwrap();
    let reports = |name: &str, devices: usize, accum: usize| {
        let c = config(
            tmp.path(),
            name,
            &[
                "run.batch_size=2",
                &format!("run.grad_accum={accum}"),
                &format!("distributed.devices={devices}"),
            ],
        );
        jsonl(&run(&c).unwrap().run_dir.join("faults.jsonl"))
    };
    let (peers, single) = (reports("peers", 2, 1), reports("single", 1, 2));
    assert_eq!(peers.len(), 2);
    for (p, s) in peers.iter().zip(&single) {
        assert_eq!(p["sequences"].as_array().unwrap().len(), 4, "{p}");
        assert_eq!(p["sequences"], s["sequences"]);
        assert_eq!((&p["step"], &p["action"]), (&s["step"], &s["action"]));
    }
}
