//! ODM's `official` and `exp3` variants against the authors' own updaters.
//!
//! Each `tests/golden/odm-*.json` holds a loss stream and the proportions that
//! alon-albalak/online-data-mixing's `SmoothedMeanWeightUpdater` / `Exp3WeightUpdater`
//! produced from it, step by step, through the repository's `UpdateScheduler` (see
//! `tests/golden/README.md`). The same stream is replayed through mixlm's scheduler,
//! which must hand out the same proportions at every step.

use mixlm_mixing::{build_scheduler, DomainInfo, DomainLosses, MixingConfig, StepFeedback};
use serde_json::Value;

fn golden(case: &str) -> Value {
    let path = format!(
        "{}/tests/golden/odm-{case}.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

/// Replays a golden file and returns the largest difference to the authors'
/// proportions.
fn replay(g: &Value) -> f64 {
    let mixlm = &g["mixlm"];
    let init = mixlm["init"].as_object().unwrap();
    let names: Vec<String> = init.keys().cloned().collect();
    let init_table: Vec<String> = init.iter().map(|(n, w)| format!("{n} = {w}")).collect();
    let alpha = match mixlm["alpha"].as_f64() {
        Some(a) => format!("alpha = {a}\n"),
        None => String::new(),
    };
    let text = format!(
        "method = \"odm\"\nvariant = {}\n{alpha}warmup_steps = {}\nbatches = \"single\"\n\
         init = {{ {} }}",
        mixlm["variant"],
        mixlm["warmup_steps"],
        init_table.join(", ")
    );
    let config: MixingConfig = toml::from_str(&text).unwrap();
    let info = DomainInfo {
        natural_weights: vec![1.0; names.len()],
        names,
        seed: 0,
        steps: 1_000_000,
    };
    let mut scheduler = build_scheduler(&config, &info).unwrap();
    let micro_batches = g["micro_batches"].as_u64().unwrap() as usize;
    let mut worst = 0.0f64;
    for record in g["steps"].as_array().unwrap() {
        let step = record["step"].as_u64().unwrap();
        let want = floats(&record["proportions"]);
        let got = scheduler.proportions(step);
        for (a, b) in got.as_slice().iter().zip(&want) {
            worst = worst.max((a - b).abs());
        }
        let feedback = StepFeedback {
            train: DomainLosses(
                record["loss"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(Value::as_f64)
                    .collect(),
            ),
            sequences: record["sequences"]
                .as_array()
                .unwrap()
                .iter()
                .map(|n| n.as_u64().unwrap() as usize)
                .collect(),
            micro_batches,
            reference: None,
            excess: None,
        };
        scheduler.observe_train(step, &feedback);
    }
    worst
}

#[test]
fn official_matches_smoothed_mean_weight_updater() {
    for case in ["official-k3", "official-k5-alpha05-nowarmup"] {
        let worst = replay(&golden(case));
        assert!(
            worst < 1e-12,
            "{case}: proportions differ by up to {worst:e}"
        );
    }
}

#[test]
fn exp3_matches_exp3_weight_updater() {
    for case in ["exp3-k3-step", "exp3-k4-grouped"] {
        let worst = replay(&golden(case));
        assert!(
            worst < 1e-12,
            "{case}: proportions differ by up to {worst:e}"
        );
    }
}

/// The replay can fail: one expected number moved by 1e-9, or the stream replayed
/// through another variant, is caught.
#[test]
fn the_replay_notices_a_difference() {
    let mut g = golden("official-k3");
    let p = &mut g["steps"][40]["proportions"][1];
    *p = Value::from(p.as_f64().unwrap() + 1e-9);
    assert!(replay(&g) > 5e-10);

    let mut g = golden("official-k3");
    g["mixlm"]["variant"] = Value::from("exp3");
    g["mixlm"]["alpha"] = Value::Null;
    assert!(replay(&g) > 1e-3);
}
