//! `mixlm compare` on the CPU backend: every method and seed is trained and
//! evaluated, a second call skips finished runs (and reads back a trained run whose
//! result is missing), and the report is regenerated from the saved results without
//! retraining.

use mixlm_train::compare::{compare, report_only, CompareConfig};
use mixlm_train::{BackendKind, TrainOptions};

#[test]
fn compare_runs_each_method_once_and_rewrites_the_report_from_results() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("cmp.toml");
    std::fs::write(
        &file,
        r#"
out_dir = "out"
seeds = [0, 1]
set = ["run.steps=4", "run.batch_size=5", "run.seq_len=16", "schedule.warmup_steps=1",
       "eval.every=2", "eval.sequences=4", "eval.batch_size=8"]

[[method]]
name = "stratified"
mixing = { method = "stratified" }

[[method]]
name = "natural"
mixing = { method = "natural" }

[[method]]
name = "doge"
search = "doge"
pilot_steps = 3
"#,
    )
    .unwrap();
    let mut config = CompareConfig::load(&file).unwrap();
    config.out_dir = tmp.path().join("out");
    let results = compare(&config, BackendKind::Cpu, &TrainOptions::quiet()).unwrap();
    assert_eq!(results.results.len(), 6);
    let doge: Vec<_> = results
        .results
        .iter()
        .filter(|r| r.method == "doge")
        .collect();
    assert!(doge.iter().all(|r| r.extra_steps == 3 && r.steps == 4));
    // The final DoGE runs trained on the learned mixture.
    let run_toml = std::fs::read_to_string(doge[0].run_dir.join("config.toml")).unwrap();
    assert!(run_toml.contains("method = \"manual\""), "{run_toml}");
    for r in &results.results {
        assert_eq!(r.eval.splits.len(), 2);
        assert!(r.eval.splits[1].average_ppl.is_finite());
    }
    let md_path = config.out_dir.join("compare/report.md");
    let md = std::fs::read_to_string(&md_path).unwrap();
    // The figures are written next to the report and embedded in it.
    let dir = config.out_dir.join("compare");
    for stem in ["val_loss", "proportions", "test_ppl"] {
        assert!(
            md.contains(&format!("]({stem}.png) ([SVG]({stem}.svg))")),
            "{md}"
        );
        let png = std::fs::read(dir.join(format!("{stem}.png"))).unwrap();
        assert_eq!(&png[..4], b"\x89PNG");
        let svg = std::fs::read_to_string(dir.join(format!("{stem}.svg"))).unwrap();
        for m in ["stratified", "natural", "doge"] {
            assert!(svg.contains(m), "{stem}.svg has no {m}");
        }
    }
    // Each run kept its trajectories: evaluations at 0, 2 and 4 steps, one
    // proportion point per step, summing to one.
    for r in &results.results {
        let tokens: Vec<u64> = r.curves.val_loss.iter().map(|p| p.tokens).collect();
        assert_eq!(tokens, [0, 2 * 5 * 16, 4 * 5 * 16]);
        assert_eq!(r.curves.proportions.len(), 4);
        let sum: f64 = r.curves.proportions[3].values.values().sum();
        assert!((sum - 1.0).abs() < 1e-9);
    }
    for m in ["stratified", "natural", "doge"] {
        assert!(md.contains(&format!("| {m} |")), "{md}");
    }
    // Every run's step time by part, and the mixing method's share of it.
    assert!(md.contains("| mixing share |"), "{md}");
    for r in &results.results {
        let share = r.step_time.mixing_share().unwrap();
        assert!(
            r.step_time.model > 0.0 && (0.0..1.0).contains(&share),
            "{r:?}"
        );
    }
    // Stratified's own difference is zero; the test ppl is mean ± std over 2 seeds.
    let strat = md
        .lines()
        .find(|l| l.starts_with("| stratified |"))
        .unwrap();
    assert!(strat.contains("| +0.000 |"), "{strat}");
    let t: Vec<f64> = results
        .results
        .iter()
        .filter(|r| r.method == "natural")
        .map(|r| r.eval.splits[1].average_ppl)
        .collect();
    let mean = (t[0] + t[1]) / 2.0;
    let natural = md.lines().find(|l| l.starts_with("| natural |")).unwrap();
    assert!(
        natural.contains(&format!("| {mean:.3} ± ")),
        "{natural} vs {mean}"
    );

    // Finished runs are skipped: the same results come back (their files untouched).
    // A run trained to its end whose result was not written (the process died in its
    // evaluation) is read back and evaluated, its search's runs too, not retrained.
    let stamp = std::fs::metadata(doge[0].run_dir.join("metrics.jsonl"))
        .unwrap()
        .modified()
        .unwrap();
    std::fs::remove_file(doge[0].run_dir.join("result.json")).unwrap();
    let again = compare(&config, BackendKind::Cpu, &TrainOptions::quiet()).unwrap();
    assert!(again == results, "the second call changed the results");
    let stamp2 = std::fs::metadata(doge[0].run_dir.join("metrics.jsonl"))
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(stamp, stamp2);

    // The report is rebuilt from results.json alone: remove every run folder.
    for r in &results.results {
        std::fs::remove_dir_all(&r.run_dir).unwrap();
    }
    std::fs::remove_file(&md_path).unwrap();
    std::fs::remove_file(dir.join("val_loss.svg")).unwrap();
    let rebuilt = report_only(&config).unwrap();
    assert!(rebuilt == results, "results.json does not round-trip");
    assert_eq!(std::fs::read_to_string(&md_path).unwrap(), md);
    assert!(
        dir.join("val_loss.svg").exists(),
        "figures are redrawn from results"
    );
}
