//! `mixlm compare` on the CPU backend: every method and seed is trained and
//! evaluated, a second call skips finished runs (and reads back a trained run whose
//! result is missing), and the report is regenerated from the saved results without
//! retraining.

use mixlm_experiments::compare::{compare, report_only, CompareConfig};
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
    // One TensorBoard run per method and seed (`tensorboard --logdir out` shows them
    // side by side), each with its 4 steps' loss.
    for r in &results.results {
        let files = mixlm_tensorboard::event_files(&r.run_dir.join("tensorboard")).unwrap();
        assert_eq!(files.len(), 1, "{}", r.run_dir.display());
        let steps: Vec<i64> = mixlm_tensorboard::read_events(&files[0])
            .unwrap()
            .iter()
            .filter(|e| {
                e.summary
                    .iter()
                    .flat_map(|s| &s.value)
                    .any(|v| v.tag == "train/loss")
            })
            .map(|e| e.step)
            .collect();
        assert_eq!(steps, [1, 2, 3, 4], "{}", r.run_dir.display());
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

/// "Aioli + X" (`then = { method = "aioli", ... }`): X's search (DoGE here) or static
/// mixture (manual) gives a mixture, and the final run is Aioli whose
/// `init_proportions` are that mixture and whose first `init_steps` steps train on
/// it. A second call reads everything back without training.
#[test]
fn aioli_after_x_starts_from_the_mixture_x_learned() {
    use mixlm_mixing::{InitWeights, MixingConfig};
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("cmp.toml");
    std::fs::write(
        &file,
        r#"
out_dir = "out"
set = ["run.steps=12", "run.batch_size=5", "run.seq_len=16", "schedule.warmup_steps=1",
       "eval.every=6", "eval.sequences=4", "eval.batch_size=8"]

[[method]]
name = "aioli-doge"
search = "doge"
pilot_steps = 3
then = { method = "aioli", eta = 1.0, update_steps = 8, lp_rounds = 1, lp_steps = 1, one_hot_factor = 0.75, init_steps = 4 }

[[method]]
name = "aioli-manual"
mixing = { method = "manual", weights = { markov1 = 4.0, markov2 = 1.0, shared_a = 1.0, shared_b = 1.0, noisy = 1.0 } }
then = { method = "aioli", eta = 1.0, update_steps = 8, lp_rounds = 1, lp_steps = 1, one_hot_factor = 0.75, init_steps = 4 }
"#,
    )
    .unwrap();
    let mut config = CompareConfig::load(&file).unwrap();
    config.out_dir = tmp.path().join("out");
    let results = compare(&config, BackendKind::Cpu, &TrainOptions::quiet()).unwrap();
    assert_eq!(results.results.len(), 2);
    let (doge, manual) = (&results.results[0], &results.results[1]);
    assert_eq!((doge.steps, doge.extra_steps), (12, 3));
    assert_eq!((manual.steps, manual.extra_steps), (12, 0));

    // X's learned mixture, as the search wrote it.
    let learned = config
        .run_config(&config.methods[0], 0)
        .unwrap()
        .with_mixing_file(
            &config
                .out_dir
                .join("aioli-doge-s0-search/learned_mixture.toml"),
        )
        .unwrap();
    let MixingConfig::Manual(x) = &learned.mixing else {
        panic!("{:?}", learned.mixing)
    };
    let sum: f64 = x.weights.values().sum();
    let doge_mixture: std::collections::BTreeMap<String, f64> = x
        .weights
        .iter()
        .map(|(k, v)| (k.clone(), v / sum))
        .collect();
    let manual_mixture: std::collections::BTreeMap<String, f64> = [
        ("markov1", 0.5),
        ("markov2", 0.125),
        ("shared_a", 0.125),
        ("shared_b", 0.125),
        ("noisy", 0.125),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();

    for (r, want) in [(doge, &doge_mixture), (manual, &manual_mixture)] {
        // The final run is Aioli with X's mixture as init_proportions ...
        let saved = mixlm_train::RunConfig::load(&r.run_dir.join("config.toml"), &[]).unwrap();
        let MixingConfig::Aioli(a) = &saved.mixing else {
            panic!("{}: {:?}", r.method, saved.mixing)
        };
        assert_eq!(a.init_steps, 4);
        let InitWeights::Weights(init) = &a.init_proportions else {
            panic!("{}: {:?}", r.method, a.init_proportions)
        };
        let isum: f64 = init.values().sum();
        for (name, p) in want {
            assert!((init[name] / isum - p).abs() < 1e-9, "{}: {name}", r.method);
        }
        // ... and its first init_steps steps trained on it (metrics.jsonl), the next
        // one on LearnParams' smoothed one-hot mixtures.
        let steps = &r.curves.proportions;
        assert_eq!(steps.len(), 12, "{}", r.method);
        for point in &steps[..4] {
            for (name, p) in want {
                assert!(
                    (point.values[name] - p).abs() < 1e-9,
                    "{}: step {point:?} vs {want:?}",
                    r.method
                );
            }
        }
        let first_lp = &steps[4].values;
        assert!(
            first_lp.values().any(|&p| (p - 0.75).abs() < 1e-9),
            "{}: {first_lp:?}",
            r.method
        );
    }

    // Read back: the search's runs and both final runs are not trained again.
    let stamp = |r: &mixlm_experiments::compare::RunResult| {
        std::fs::metadata(r.run_dir.join("metrics.jsonl"))
            .unwrap()
            .modified()
            .unwrap()
    };
    let before = (stamp(doge), stamp(manual));
    std::fs::remove_file(doge.run_dir.join("result.json")).unwrap();
    let again = compare(&config, BackendKind::Cpu, &TrainOptions::quiet()).unwrap();
    assert!(again == results, "the second call changed the results");
    assert_eq!(before, (stamp(&again.results[0]), stamp(&again.results[1])));
}

#[test]
fn then_sections_are_checked_before_training() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("cmp.toml");
    // LearnParams takes 1 * 2 * 5 = 10 steps of a round of 8: refused before the
    // DoGE proxy trains, naming the field.
    std::fs::write(
        &file,
        r#"
out_dir = "out"
set = ["run.steps=12", "run.batch_size=5", "run.seq_len=16", "schedule.warmup_steps=1",
       "eval.sequences=4"]

[[method]]
name = "aioli-doge"
search = "doge"
pilot_steps = 3
then = { method = "aioli", eta = 1.0, update_steps = 8, lp_rounds = 1, lp_steps = 2, init_steps = 4 }
"#,
    )
    .unwrap();
    let mut config = CompareConfig::load(&file).unwrap();
    config.out_dir = tmp.path().join("out");
    let e = compare(&config, BackendKind::Cpu, &TrainOptions::quiet())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("method `aioli-doge`: then: then.update_steps = 8"),
        "{e}"
    );
    assert!(!config.out_dir.join("aioli-doge-s0-proxy").exists());
}
