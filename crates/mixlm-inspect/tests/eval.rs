//! `mixlm eval` end to end on the CPU backend: a trained checkpoint's perplexity on
//! the synthetic corpus (equal to the trainer's own final evaluation) and on prepared
//! shards (every target scored once, sequences = documents, sliding windows).

use burn::backend::{Autodiff, NdArray};
use mixlm_data::prepare::testutil::{jsonl, texts, write_file, write_tokenizer};
use mixlm_data::{prepare, PrepareConfig, ShardSource, Split, TokenSource};
use mixlm_eval::perplexity::PerplexityOptions;
use mixlm_inspect::evaluate::{evaluate_on, resolve_checkpoint, EvalOptions, EvalReport};
use mixlm_mixing::DomainId;
use mixlm_train::{train, BackendKind, RunConfig, TrainOptions};

type B = Autodiff<NdArray<f32>>;

fn train_short(dir: &std::path::Path, extra: &[&str]) -> std::path::PathBuf {
    let mut o: Vec<String> = vec![
        format!("run.out_dir=\"{}\"", dir.display()),
        "run.steps=4".into(),
        "run.batch_size=4".into(),
        "run.seq_len=16".into(),
        "schedule.warmup_steps=1".into(),
        "eval.every=0".into(),
        "eval.sequences=6".into(),
        "eval.batch_size=4".into(),
        "checkpoint.every=0".into(),
        "checkpoint.save_final=true".into(),
    ];
    o.extend(extra.iter().map(|s| s.to_string()));
    let config = RunConfig::embedded(&o).unwrap();
    train::<B>(&config, &Default::default(), &TrainOptions::quiet())
        .unwrap()
        .run_dir
}

fn eval(
    config: &RunConfig,
    checkpoint: &std::path::Path,
    out: &std::path::Path,
    p: PerplexityOptions,
) -> EvalReport {
    eval_tasks(config, checkpoint, out, p, Vec::new())
}

fn eval_tasks(
    config: &RunConfig,
    checkpoint: &std::path::Path,
    out: &std::path::Path,
    p: PerplexityOptions,
    tasks: Vec<std::path::PathBuf>,
) -> EvalReport {
    eval_with(config, checkpoint, out, p, tasks, Vec::new())
}

fn eval_with(
    config: &RunConfig,
    checkpoint: &std::path::Path,
    out: &std::path::Path,
    p: PerplexityOptions,
    tasks: Vec<std::path::PathBuf>,
    heldout: Vec<String>,
) -> EvalReport {
    let options = EvalOptions {
        checkpoint: checkpoint.to_path_buf(),
        splits: vec![Split::Validation, Split::Test],
        perplexity: p,
        out: out.to_path_buf(),
        tasks,
        heldout,
        tokenizer: None,
        allow_tokenizer_mismatch: false,
    };
    evaluate_on(BackendKind::Cpu, config, &options).unwrap()
}

/// The error of an evaluation the tokenizer check refuses, and that `--allow-
/// tokenizer-mismatch` lets it run.
fn refused_for_its_tokenizer(config: &RunConfig, mut options: EvalOptions) -> String {
    let e = evaluate_on(BackendKind::Cpu, config, &options)
        .unwrap_err()
        .to_string();
    options.allow_tokenizer_mismatch = true;
    evaluate_on(BackendKind::Cpu, config, &options).unwrap();
    e
}

/// On the same windows the trainer evaluates (validation windows `0..eval.sequences`),
/// `mixlm eval` of the final checkpoint reproduces the run's final validation losses.
#[test]
fn eval_of_a_checkpoint_matches_the_trainers_final_evaluation() {
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = train_short(tmp.path(), &[]);
    let checkpoint = resolve_checkpoint(&run_dir).unwrap();
    let config = RunConfig::load(&checkpoint.join("run.toml"), &[]).unwrap();
    let out = tmp.path().join("eval");
    let report = eval(
        &config,
        &checkpoint,
        &out,
        PerplexityOptions {
            seq_len: 16,
            stride: 16,
            batch_size: 5,
            max_tokens: Some(6 * 16),
        },
    );
    let last_eval: serde_json::Value = std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .rfind(|l| l["kind"] == "eval")
        .unwrap();
    let validation = &report.splits[0];
    assert_eq!(validation.split, "validation");
    for d in &validation.domains {
        let want = last_eval["val_loss"][&d.domain].as_f64().unwrap();
        assert!(
            (d.token_loss - want).abs() < 1e-5,
            "{}: {} vs {want}",
            d.domain,
            d.token_loss
        );
        assert_eq!((d.tokens, d.sequences), (6 * 16, 6));
        // Equal-length windows: both means agree.
        assert!((d.sequence_loss - d.token_loss).abs() < 1e-9);
    }
    assert_eq!(report.step, Some(4));
    // The written report round-trips and the markdown has one row per domain + average.
    let json: EvalReport =
        serde_json::from_slice(&std::fs::read(out.join("eval.json")).unwrap()).unwrap();
    assert_eq!(json.splits.len(), 2);
    for (a, b) in json.splits.iter().zip(&report.splits) {
        for (x, y) in a.domains.iter().zip(&b.domains) {
            assert_eq!((&x.domain, x.tokens), (&y.domain, y.tokens));
            assert!((x.token_ppl - y.token_ppl).abs() < 1e-9 * y.token_ppl);
        }
    }
    let md = std::fs::read_to_string(out.join("eval.md")).unwrap();
    let rows = md.lines().filter(|l| l.starts_with("| ")).count();
    assert_eq!(rows, 2 + 5 + 1, "{md}");
    assert!(md.contains("| average per group"), "{md}");
}

/// On prepared shards the split is one stream: every target is scored once (stream
/// length - 1 tokens), sequences are the documents, documents of unequal length make
/// the two means differ, and sliding windows score the same tokens with more context.
#[test]
fn eval_on_prepared_shards_scores_streams_by_document() {
    let tmp = tempfile::tempdir().unwrap();
    let tokenizer = tmp.path().join("tokenizer.json");
    write_tokenizer(&tokenizer, 0);
    let t = texts(90, 11);
    let rows: Vec<(&str, String)> = t
        .iter()
        .enumerate()
        .map(|(i, x)| {
            (
                if i % 3 == 0 { "beta" } else { "alpha" },
                x.repeat(1 + i % 4),
            )
        })
        .collect();
    write_file(
        &tmp.path().join("raw/corpus.jsonl"),
        jsonl(&rows).as_bytes(),
    );
    let shards = tmp.path().join("shards");
    prepare(&PrepareConfig {
        inputs: vec![tmp.path().join("raw").display().to_string()],
        tokenizer,
        output: shards.clone(),
        validation_fraction: 0.25,
        test_fraction: 0.25,
        ..PrepareConfig::default()
    })
    .unwrap();
    let data = [
        "data.source=\"shards\"".to_string(),
        format!("data.path=\"{}\"", shards.display()),
        "model.vocab_size=260".into(),
    ];
    let data: Vec<&str> = data.iter().map(String::as_str).collect();
    let run_dir = train_short(tmp.path(), &data);
    let checkpoint = resolve_checkpoint(&run_dir).unwrap();
    let config = RunConfig::load(&checkpoint.join("run.toml"), &[]).unwrap();
    let source = ShardSource::open(&shards, 0).unwrap();
    let opts = |stride| PerplexityOptions {
        seq_len: 16,
        stride,
        batch_size: 7,
        max_tokens: None,
    };
    let disjoint = eval(&config, &checkpoint, &tmp.path().join("e1"), opts(16));
    let sliding = eval(&config, &checkpoint, &tmp.path().join("e2"), opts(4));
    for (s, split) in [(0, Split::Validation), (1, Split::Test)] {
        for (d, name) in source.domain_names().iter().enumerate() {
            let offsets = source.stream_documents(DomainId(d), split).unwrap();
            let (a, b) = (
                &disjoint.splits[s].domains[d],
                &sliding.splits[s].domains[d],
            );
            assert_eq!(&a.domain, name);
            assert_eq!(a.tokens, offsets.last().unwrap() - 1, "{name} {split}");
            assert_eq!(a.sequences as usize, offsets.len() - 1, "one per document");
            assert_eq!((b.tokens, b.sequences), (a.tokens, a.sequences));
            assert!((a.token_loss - a.sequence_loss).abs() > 1e-6, "{a:?}");
            assert!(a.token_loss.is_finite() && b.token_loss.is_finite());
            assert!(
                (a.token_loss - b.token_loss).abs() > 1e-7,
                "more context, other loss"
            );
        }
        let avg = disjoint.splits[s]
            .domains
            .iter()
            .map(|d| d.token_ppl)
            .sum::<f64>()
            / 2.0;
        assert!((disjoint.splits[s].average_ppl - avg).abs() < 1e-9);
    }

    // Held-out sets: a file holding exactly the validation documents, in corpus order,
    // scores like the validation split; records without a domain field form one
    // domain named after their file.
    let validation_rows: Vec<(&str, String)> = rows
        .iter()
        .filter(|(_, t)| mixlm_data::prepare::hash_split(t, 0.25, 0.25) == Split::Validation)
        .cloned()
        .collect();
    let held = tmp.path().join("held/same-as-validation.jsonl.zst");
    write_file(&held, jsonl(&validation_rows).as_bytes());
    let plain = tmp.path().join("held/plain.jsonl");
    let plain_text: String = t[..5]
        .iter()
        .map(|x| serde_json::json!({ "text": x }).to_string() + "\n")
        .collect();
    write_file(&plain, plain_text.as_bytes());
    let inputs = vec![held.display().to_string(), plain.display().to_string()];
    let out = tmp.path().join("e4");
    let with_heldout = eval_with(
        &config,
        &checkpoint,
        &out,
        opts(16),
        Vec::new(),
        inputs.clone(),
    );
    let [same, other] = &with_heldout.heldout[..] else {
        panic!("{:?}", with_heldout.heldout)
    };
    assert_eq!(same.split, "heldout:same-as-validation");
    for (a, b) in same.domains.iter().zip(&disjoint.splits[0].domains) {
        assert_eq!(
            (&a.domain, a.tokens, a.sequences),
            (&b.domain, b.tokens, b.sequences)
        );
        assert!((a.token_loss - b.token_loss).abs() < 1e-6, "{a:?} vs {b:?}");
    }
    assert_eq!(other.domains.len(), 1);
    assert_eq!(other.domains[0].domain, "plain");
    assert_eq!(other.domains[0].sequences, 5);
    assert!(out.join("heldout/plain/manifest.json").is_file());
    let md = std::fs::read_to_string(out.join("eval.md")).unwrap();
    assert!(md.contains("## Held-out sets"), "{md}");
    assert!(
        md.lines()
            .any(|l| l.starts_with("| plain ") && l.matches("plain").count() == 2),
        "{md}"
    );
    // A second evaluation reuses the tokenized sets (their manifests are untouched).
    let stamp = |p: &std::path::Path| std::fs::metadata(p).unwrap().modified().unwrap();
    let before = stamp(&out.join("heldout/plain/manifest.json"));
    let again = eval_with(&config, &checkpoint, &out, opts(16), Vec::new(), inputs);
    assert_eq!(again.heldout, with_heldout.heldout);
    assert_eq!(stamp(&out.join("heldout/plain/manifest.json")), before);

    // Downstream tasks with the data's own tokenizer (from the manifest). Identical
    // choices tie and the first wins, so the accuracy is known whatever the model.
    let task = tmp.path().join("ties.jsonl");
    std::fs::write(
        &task,
        "{\"context\": \"the river\", \"choices\": [\"other\", \"other\"], \"gold\": 0}\n\
         {\"context\": \"the thing\", \"choices\": [\"river\", \"river\"], \"gold\": 1}\n",
    )
    .unwrap();
    let lambada = tmp.path().join("lambada.jsonl");
    std::fs::write(&lambada, "{\"text\": \"the other river\"}\n").unwrap();
    let with_tasks = eval_tasks(
        &config,
        &checkpoint,
        &tmp.path().join("e3"),
        opts(16),
        vec![task, lambada],
    );
    let t = &with_tasks.tasks;
    assert_eq!(
        (t[0].task.as_str(), t[0].examples, t[0].acc),
        ("ties", 2, 0.5)
    );
    assert_eq!(t[0].acc_norm, Some(0.5));
    assert_eq!((t[1].task.as_str(), t[1].examples), ("lambada", 1));
    assert!(t[1].ppl.unwrap().is_finite() && t[1].ppl.unwrap() > 1.0);
    let md = std::fs::read_to_string(tmp.path().join("e3/eval.md")).unwrap();
    assert!(
        md.contains("| ties ") && md.contains("Downstream tasks"),
        "{md}"
    );

    // The same texts through another tokenizer of the same size (two tokens' ids
    // swapped): refused unless asked for, as data (`--data`) and as the tokenizer of
    // held-out sets.
    let other_tokenizer = tmp.path().join("other-tokenizer.json");
    let mut json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tmp.path().join("tokenizer.json")).unwrap()).unwrap();
    json["model"]["vocab"]["th"] = 259.into();
    json["model"]["vocab"]["er"] = 257.into();
    std::fs::write(&other_tokenizer, json.to_string()).unwrap();
    let other = tmp.path().join("other-shards");
    prepare(&PrepareConfig {
        inputs: vec![tmp.path().join("raw").display().to_string()],
        tokenizer: other_tokenizer.clone(),
        output: other.clone(),
        validation_fraction: 0.25,
        test_fraction: 0.25,
        ..PrepareConfig::default()
    })
    .unwrap();
    let on_other = RunConfig::load(
        &checkpoint.join("run.toml"),
        &[format!("data.path=\"{}\"", other.display())],
    )
    .unwrap();
    let options = EvalOptions {
        checkpoint: checkpoint.clone(),
        splits: vec![Split::Validation],
        perplexity: opts(16),
        out: tmp.path().join("e5"),
        tasks: Vec::new(),
        heldout: Vec::new(),
        tokenizer: None,
        allow_tokenizer_mismatch: false,
    };
    let e = refused_for_its_tokenizer(&on_other, options.clone());
    let trained = tmp.path().join("tokenizer.json").display().to_string();
    assert!(
        e.starts_with(&format!(
            "the model in {} was trained on tokens of the tokenizer {trained} (SHA-256 ",
            checkpoint.display()
        )) && e.contains(&format!(
            "the data in {} are of {}",
            other.display(),
            other_tokenizer.display()
        )) && e.contains("--allow-tokenizer-mismatch"),
        "{e}"
    );
    let e = refused_for_its_tokenizer(
        &config,
        EvalOptions {
            splits: Vec::new(),
            heldout: vec![plain.display().to_string()],
            tokenizer: Some(other_tokenizer.clone()),
            out: tmp.path().join("e6"),
            ..options
        },
    );
    assert!(
        e.contains(&format!(
            "the held-out sets' and tasks' tokens are of {}",
            other_tokenizer.display()
        )) && e.contains(&format!("--tokenizer {trained}")),
        "{e}"
    );
}

/// A prepared folder with validation and test splits and no train split (SlimPajama's
/// holdouts prepared on their own: `validation/` and `test/` inputs) is evaluation data
/// as it is, with the domains of its splits.
#[test]
fn eval_data_needs_no_train_split() {
    let tmp = tempfile::tempdir().unwrap();
    let tokenizer = tmp.path().join("tokenizer.json");
    write_tokenizer(&tokenizer, 0);
    let t = texts(40, 12);
    let rows = |from: usize, to: usize| -> Vec<(&str, String)> {
        (from..to)
            .map(|i| (if i % 2 == 0 { "alpha" } else { "beta" }, t[i].repeat(3)))
            .collect()
    };
    let prepared = |name: &str, files: &[(&str, Vec<(&str, String)>)]| {
        for (path, rows) in files {
            write_file(&tmp.path().join(name).join(path), jsonl(rows).as_bytes());
        }
        let out = tmp.path().join(format!("{name}-shards"));
        prepare(&PrepareConfig {
            inputs: vec![tmp.path().join(name).display().to_string()],
            tokenizer: tokenizer.clone(),
            output: out.clone(),
            ..PrepareConfig::default()
        })
        .unwrap();
        out
    };
    let training = prepared(
        "corpus",
        &[
            ("train/a.jsonl", rows(0, 20)),
            ("validation/a.jsonl", rows(20, 26)),
        ],
    );
    let holdout = prepared(
        "holdout",
        &[
            ("validation/a.jsonl", rows(26, 32)),
            ("test/a.jsonl", rows(32, 40)),
        ],
    );
    assert!(
        ShardSource::open(&holdout, 0).is_err(),
        "no train split: not training data"
    );

    let run_dir = train_short(
        tmp.path(),
        &[
            "data.source=\"shards\"",
            &format!("data.path=\"{}\"", training.display()),
            "model.vocab_size=260",
        ],
    );
    let checkpoint = resolve_checkpoint(&run_dir).unwrap();
    let config = RunConfig::load(
        &checkpoint.join("run.toml"),
        &[format!("data.path=\"{}\"", holdout.display())],
    )
    .unwrap();
    let p = PerplexityOptions {
        seq_len: 16,
        stride: 16,
        batch_size: 4,
        max_tokens: None,
    };
    let report = eval(&config, &checkpoint, &tmp.path().join("e"), p);
    let source = ShardSource::open_for_eval(&holdout).unwrap();
    for (s, split) in [(0, Split::Validation), (1, Split::Test)] {
        let domains = &report.splits[s].domains;
        assert_eq!(
            domains
                .iter()
                .map(|d| d.domain.as_str())
                .collect::<Vec<_>>(),
            ["alpha", "beta"]
        );
        for (d, scored) in domains.iter().enumerate() {
            let offsets = source.stream_documents(DomainId(d), split).unwrap();
            assert_eq!(scored.tokens, offsets.last().unwrap() - 1, "{split}");
            assert!(scored.token_loss.is_finite());
        }
    }
}
