//! Pipelines of runs: `mix-search`'s methods end to end on the tiny model, an
//! interrupted pipeline's runs continued or read back, and the folder locks of
//! every writer a pipeline starts.

use burn::backend::{Autodiff, NdArray};
use mixlm_train::checkpoint::latest_checkpoint;
use mixlm_train::{train, RunConfig, TrainOptions};

#[path = "../../mixlm-train/tests/common/mod.rs"]
mod common;
use common::{held_by_another_process, metrics, short_run};

type B = Autodiff<NdArray<f32>>;

/// `mix-search`: a grid sweep picks its best point; a law search fits one law per
/// domain and writes a mixture the final run reads.
#[test]
fn mix_search_grid_and_law() {
    use mixlm_experiments::search::{mix_search, SearchMethod, SearchOptions};
    let tmp = tempfile::tempdir().unwrap();
    let config = short_run(
        tmp.path(),
        "sweep",
        &[
            "run.steps=15",
            "run.batch_size=8",
            "eval.every=0",
            "checkpoint.every=0",
            "checkpoint.save_final=false",
        ],
    );
    let train_fn = |c: &RunConfig| {
        train::<B>(
            c,
            &Default::default(),
            &TrainOptions {
                quiet: true,
                start: mixlm_train::Start::Overwrite,
                ..Default::default()
            },
        )
    };
    let grid = mix_search(
        &config,
        &SearchOptions {
            points: 3,
            ..SearchOptions::new(SearchMethod::Grid)
        },
        train_fn,
    )
    .unwrap();
    assert_eq!(grid.points.len(), 3);
    let best = grid
        .points
        .iter()
        .min_by(|a, b| a.mean_val_loss.total_cmp(&b.mean_val_loss))
        .unwrap();
    assert_eq!(grid.chosen.as_ref(), Some(&best.weights));
    // Each point trained on its own mixture, as its metrics say.
    for p in &grid.points {
        let last = metrics(&p.run)
            .into_iter()
            .rfind(|l| l["kind"] == "train")
            .unwrap();
        for (n, w) in &p.weights {
            assert!((last["proportions"][n].as_f64().unwrap() - w).abs() < 1e-12);
        }
    }
    let config = RunConfig::embedded(&[])
        .unwrap()
        .with_mixing_file(&grid.dir.join("learned_mixture.toml"))
        .unwrap();
    let mixlm_mixing::MixingConfig::Manual(m) = &config.mixing else {
        panic!()
    };
    for (n, w) in grid.chosen.as_ref().unwrap() {
        assert!((m.weights[n] - w).abs() < 1e-12);
    }

    let mut law_config = short_run(
        tmp.path(),
        "law",
        &[
            "run.steps=10",
            "run.batch_size=8",
            "eval.every=0",
            "checkpoint.every=0",
            "checkpoint.save_final=false",
        ],
    );
    law_config.run.name = "law".into();
    let too_few = mix_search(
        &law_config,
        &SearchOptions {
            points: 4,
            ..SearchOptions::new(SearchMethod::Law)
        },
        train_fn,
    )
    .unwrap_err()
    .to_string();
    assert!(too_few.contains("--points >= 7"), "{too_few}");
    let law = mix_search(
        &law_config,
        &SearchOptions {
            points: 7,
            ..SearchOptions::new(SearchMethod::Law)
        },
        train_fn,
    )
    .unwrap();
    assert_eq!(law.laws.len(), 5);
    let total: f64 = law.chosen.as_ref().unwrap().values().sum();
    assert!((total - 1.0).abs() < 1e-9);
    assert!(law.predicted_mean_val_loss.unwrap().is_finite());
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(law.dir.join("search.json")).unwrap()).unwrap();
    assert_eq!(json["points"].as_array().unwrap().len(), 7);
    assert_eq!(json["method"], "law");
}

/// `mix-search` runs the multi-run pipelines in one call: DoReMi (reference, then
/// proxy against its final checkpoint), DoGE (proxy), Skill-It (one single-domain run
/// per domain; the graph is each run's relative validation-loss decrease). Each
/// writes a `[mixing]` file the final run reads.
#[test]
fn mix_search_pipelines_doremi_doge_skill_it() {
    use mixlm_experiments::search::{mix_search, SearchMethod, SearchOptions};
    let tmp = tempfile::tempdir().unwrap();
    let config = short_run(
        tmp.path(),
        "pipe",
        &[
            "run.steps=30",
            "run.batch_size=10",
            "eval.every=0",
            "eval.sequences=16",
            "checkpoint.every=0",
            "checkpoint.save_final=false",
            "optimizer.lr=0.01",
        ],
    );
    let train_fn = |c: &RunConfig| {
        train::<B>(
            c,
            &Default::default(),
            &TrainOptions {
                quiet: true,
                start: mixlm_train::Start::Overwrite,
                ..Default::default()
            },
        )
    };
    let options = |m| SearchOptions {
        pilot_steps: Some(12),
        ..SearchOptions::new(m)
    };
    let final_run = |outcome: &mixlm_experiments::search::SearchOutcome| {
        config
            .clone()
            .with_mixing_file(&outcome.dir.join("learned_mixture.toml"))
            .unwrap()
    };

    let doremi = mix_search(&config, &options(SearchMethod::DoReMi), train_fn).unwrap();
    let roles: Vec<&str> = doremi.points.iter().map(|p| p.role.as_str()).collect();
    assert_eq!(roles, ["reference", "proxy"]);
    let proxy_config: RunConfig =
        toml::from_str(&std::fs::read_to_string(doremi.points[1].run.join("config.toml")).unwrap())
            .unwrap();
    let mixlm_mixing::MixingConfig::Doremi(d) = &proxy_config.mixing else {
        panic!("{:?}", proxy_config.mixing)
    };
    assert_eq!(d.reference, doremi.points[0].run);
    assert_eq!(proxy_config.run.steps, 12);
    assert!(latest_checkpoint(&doremi.points[0].run).is_ok());
    let learned = doremi.points[1].learned.clone().unwrap();
    assert_eq!(doremi.chosen.as_ref(), Some(&learned));
    let mixlm_mixing::MixingConfig::Manual(m) = &final_run(&doremi).mixing else {
        panic!()
    };
    assert_eq!(m.weights, learned);

    let doge = mix_search(&config, &options(SearchMethod::Doge), train_fn).unwrap();
    assert_eq!(doge.points.len(), 1);
    assert_eq!(doge.chosen, doge.points[0].learned);
    let total: f64 = doge.chosen.as_ref().unwrap().values().sum();
    assert!((total - 1.0).abs() < 1e-9);

    let skill = mix_search(&config, &options(SearchMethod::SkillIt), train_fn).unwrap();
    let names = ["markov1", "markov2", "shared_a", "shared_b", "noisy"];
    assert_eq!(skill.points.len(), 5);
    let graph = skill.graph.as_ref().unwrap();
    for (p, trained) in skill.points.iter().zip(names) {
        assert_eq!(p.role, format!("skill-{trained}"));
        assert_eq!(p.weights[trained], 1.0);
        for j in names {
            let want = (p.initial_val_loss[j] - p.val_loss[j]) / p.initial_val_loss[j];
            assert!((graph[trained][j] - want).abs() < 1e-12, "{trained} -> {j}");
        }
        // Training on a domain lowers its own loss more than any other domain's.
        for j in names.iter().filter(|&&j| j != trained) {
            assert!(
                graph[trained][trained] > graph[trained][*j],
                "{trained}: {graph:?}"
            );
        }
    }
    println!("Skill-It graph: {graph:?}");
    // `shared_a` and `shared_b` share half their transitions: the only positive
    // transfer between different domains (single-domain training otherwise shifts
    // the model's predictions onto the trained domain's tokens).
    for (i, j) in [("shared_a", "shared_b"), ("shared_b", "shared_a")] {
        assert!(graph[i][j] > 0.0, "{i} -> {j}: {graph:?}");
    }
    for i in ["markov1", "markov2", "noisy"] {
        for j in names.iter().filter(|&&j| j != i) {
            assert!(graph[i][*j] < 0.0, "{i} -> {j}: {graph:?}");
        }
    }
    let mixlm_mixing::MixingConfig::SkillIt(c) = &final_run(&skill).mixing else {
        panic!()
    };
    assert_eq!(&c.graph, graph);
    // eta: the Aioli repository's SlimPajama Skill-It scripts' 0.2.
    assert_eq!((c.eta, c.update_steps, c.window), (0.2, 3, 3));
    // The final run trains with it.
    let mut run = final_run(&skill);
    run.run.name = "skill-final".into();
    run.run.steps = 4;
    train::<B>(&run, &Default::default(), &TrainOptions::quiet()).unwrap();
}

/// A pipeline's run (compare, mix-search) stopped by a signal continues from its
/// checkpoint when the pipeline is rerun, and ends with the uninterrupted run's
/// metrics; once trained it is read back without training (the same outcome, nothing
/// appended); a changed config, or another `run.steps`, starts over; a stop that came
/// between runs starts none.
#[test]
fn an_interrupted_pipeline_run_continues_and_a_finished_one_is_read_back() {
    use mixlm_experiments::continuation::{train_or_continue, Interrupted};
    use mixlm_train::BackendKind;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    let tmp = tempfile::tempdir().unwrap();
    let cpu = BackendKind::Cpu;
    // Long enough for the stop below to land mid-run.
    let steps = ["run.steps=300", "eval.every=100", "checkpoint.every=100"];
    let whole = short_run(tmp.path(), "whole", &steps);
    let reference = train_or_continue(cpu, &whole, &TrainOptions::quiet()).unwrap();
    assert_eq!((reference.resumed_from, reference.steps), (None, 300));

    let config = short_run(tmp.path(), "stopped", &steps);
    let flag = Arc::new(AtomicBool::new(true));
    let stop = TrainOptions {
        quiet: true,
        stop: Some(flag.clone()),
        ..Default::default()
    };
    let e = train_or_continue(cpu, &config, &stop).unwrap_err();
    assert_eq!(e.downcast_ref::<Interrupted>().map(|i| i.step), Some(0));
    assert!(!tmp.path().join("stopped").exists());

    // Ctrl-C once the run has logged its first step.
    flag.store(false, Ordering::SeqCst);
    let log = tmp.path().join("stopped/metrics.jsonl");
    let signal = std::thread::spawn(move || loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("\"kind\":\"train\"") {
            flag.store(true, Ordering::SeqCst);
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    });
    let e = train_or_continue(cpu, &config, &stop).unwrap_err();
    signal.join().unwrap();
    let stopped = e
        .downcast_ref::<Interrupted>()
        .expect("an Interrupted error");
    assert!((1..300).contains(&stopped.step), "{e}");
    assert!(
        e.to_string().contains(&format!(
            "stopped after step {} with a checkpoint",
            stopped.step
        )),
        "{e}"
    );

    let resumed = train_or_continue(cpu, &config, &TrainOptions::quiet()).unwrap();
    assert_eq!(resumed.resumed_from, Some(stopped.step));
    assert_eq!(resumed.steps, 300);
    // Timing aside, the continued run logged what the uninterrupted one did.
    let strip = |dir: &std::path::Path| {
        metrics(dir)
            .into_iter()
            .map(|mut l| {
                let o = l.as_object_mut().unwrap();
                for timing in mixlm_train::metrics::CLOCK_FIELDS {
                    o.remove(timing);
                }
                l
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(strip(&resumed.run_dir), strip(&reference.run_dir));
    for (a, b) in resumed.rows.iter().zip(&reference.rows) {
        assert_eq!((a.ppl, a.initial_ppl), (b.ppl, b.initial_ppl));
    }

    let log_before = std::fs::read(resumed.run_dir.join("metrics.jsonl")).unwrap();
    let read_back = train_or_continue(cpu, &config, &TrainOptions::quiet()).unwrap();
    assert_eq!(read_back.resumed_from, Some(300));
    assert_eq!(read_back.rows, resumed.rows);
    assert_eq!(read_back.final_train_loss, resumed.final_train_loss);
    assert_eq!(read_back.learned, None);
    assert!(read_back.tokens_per_second > 0.0);
    assert_eq!(
        std::fs::read(resumed.run_dir.join("metrics.jsonl")).unwrap(),
        log_before
    );

    // Another learning rate is another run: trained from the start in the folder.
    let six = |lr: &str| {
        let lr = format!("optimizer.lr={lr}");
        short_run(
            tmp.path(),
            "stopped",
            &["run.steps=6", "checkpoint.every=4", &lr],
        )
    };
    let run = |c: &RunConfig| train_or_continue(cpu, c, &TrainOptions::quiet()).unwrap();
    assert_eq!(run(&six("1e-3")).resumed_from, None);
    assert_eq!(run(&six("1e-3")).resumed_from, Some(6));
    let fresh = run(&six("2e-3"));
    assert_eq!((fresh.resumed_from, fresh.steps), (None, 6));
    // A longer run is not this run stretched: also from the start.
    let longer = short_run(
        tmp.path(),
        "stopped",
        &["checkpoint.every=4", "optimizer.lr=2e-3", "run.steps=8"],
    );
    let fresh = run(&longer);
    assert_eq!((fresh.resumed_from, fresh.steps), (None, 8));
    assert_eq!(metrics(&fresh.run_dir).last().unwrap()["step"], 8);
}

/// Every writer of a folder another process holds is refused before it writes
/// there: a run, a comparison, a search, and each run a comparison starts.
#[test]
fn writers_of_a_folder_another_process_holds_are_refused() {
    use mixlm_experiments::compare::{compare, CompareConfig};
    use mixlm_experiments::search::{mix_search, SearchMethod, SearchOptions};
    let tmp = tempfile::tempdir().unwrap();
    let in_use = |e: anyhow::Error, folder: &std::path::Path| {
        let e = e.to_string();
        assert!(
            e.starts_with(&format!(
                "{} is in use by another mixlm (PID 4242, mixlm train)",
                folder.display()
            )) && e.contains("kill 4242"),
            "{e}"
        );
    };
    let config = short_run(tmp.path(), "held", &[]);
    let run_dir = tmp.path().join("held");
    let lock = held_by_another_process(&run_dir);
    let e = train::<B>(&config, &Default::default(), &TrainOptions::quiet()).unwrap_err();
    in_use(e, &run_dir);
    assert!(!run_dir.join("metrics.jsonl").exists() && !run_dir.join("config.toml").exists());
    // Released (here: the holder's file closed, as at its process's end) it trains.
    drop(lock);
    train::<B>(&config, &Default::default(), &TrainOptions::quiet()).unwrap();

    let search_dir = tmp.path().join("held-search");
    let _search = held_by_another_process(&search_dir);
    let e = mix_search(
        &config,
        &SearchOptions::new(SearchMethod::Grid),
        |c: &RunConfig| train::<B>(c, &Default::default(), &TrainOptions::quiet()),
    )
    .unwrap_err();
    in_use(e, &search_dir);

    let file = tmp.path().join("cmp.toml");
    std::fs::write(
        &file,
        "out_dir = \"out\"\nset = [\"run.steps=2\", \"run.seq_len=16\", \"schedule.warmup_steps=1\"]\n\n[[method]]\n\
         name = \"stratified\"\nmixing = { method = \"stratified\" }\n",
    )
    .unwrap();
    let mut cmp = CompareConfig::load(&file).unwrap();
    cmp.out_dir = tmp.path().join("out");
    let run = cmp.out_dir.join("stratified-s0");
    let held = held_by_another_process(&run);
    let e = compare(&cmp, mixlm_train::BackendKind::Cpu, &TrainOptions::quiet()).unwrap_err();
    in_use(e, &run);
    drop(held);
    let _compare = held_by_another_process(&cmp.out_dir.join("compare"));
    let e = compare(&cmp, mixlm_train::BackendKind::Cpu, &TrainOptions::quiet()).unwrap_err();
    in_use(e, &cmp.out_dir.join("compare"));
}
