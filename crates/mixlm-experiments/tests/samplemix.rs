//! The SampleMix pipeline end to end on a generated corpus: scores, plan, and a
//! `mixlm compare` run with `search = "samplemix"` that trains on the plan.

use mixlm_data::prepare::testutil::{jsonl, texts, write_file, write_tokenizer};
use mixlm_data::resampled::{counts_path, read_counts};
use mixlm_data::{prepare, PrepareConfig, ShardSource, Split, TokenSource};
use mixlm_experiments::compare::{compare, CompareConfig};
use mixlm_experiments::samplemix::{
    read_values, score_diversity, score_quality, DiversityOptions, Embedder, QualityScorer,
    ScoreOptions,
};
use mixlm_mixing::samplemix::SampleSummary;
use mixlm_mixing::DomainId;
use mixlm_train::BackendKind;
use std::path::{Path, PathBuf};

/// Prose-like documents in `prose`, repetitive ones in `spam`, numbers in `nums`
/// (60 of each in train), prepared into `<tmp>/shards`; with `test_split`, half of
/// each domain's validation documents become its test split.
fn three_domain_corpus(tmp: &Path, test_split: bool) -> PathBuf {
    let tokenizer = tmp.join("tokenizer.json");
    write_tokenizer(&tokenizer, 0);
    let t = texts(60, 2);
    let mut rows: Vec<(&str, String)> = Vec::new();
    for (i, x) in t.iter().enumerate() {
        rows.push(("prose", format!("{x} {}", t[(i + 1) % t.len()])));
        rows.push(("spam", "buy now, best price. ".repeat(10 + i % 5)));
        rows.push((
            "nums",
            (0..40)
                .map(|j| ((i * 31 + j * 7) % 997).to_string())
                .collect::<Vec<_>>()
                .join(" "),
        ));
    }
    write_file(&tmp.join("raw/train/a.jsonl"), jsonl(&rows).as_bytes());
    write_file(
        &tmp.join("raw/validation/a.jsonl"),
        jsonl(&rows[..30]).as_bytes(),
    );
    let data = tmp.join("shards");
    prepare(&PrepareConfig {
        inputs: vec![tmp.join("raw").display().to_string()],
        tokenizer,
        output: data.clone(),
        test_from_validation: test_split,
        ..PrepareConfig::default()
    })
    .unwrap();
    data
}

#[test]
fn samplemix_scores_plans_and_trains_in_a_comparison() {
    let tmp = tempfile::tempdir().unwrap();
    let data = three_domain_corpus(tmp.path(), true);

    // Heuristic quality: prose scores above spam and numbers.
    let options = ScoreOptions {
        data: data.clone(),
        plan: data.join("samplemix"),
        max_doc_tokens: 256,
        batch_size: 8,
        backend: BackendKind::Cpu,
        quiet: true,
    };
    let means = score_quality(&options, &QualityScorer::Heuristic).unwrap();
    assert!(
        means["prose"] > means["spam"] && means["prose"] > means["nums"],
        "{means:?}"
    );
    // A second call finds every domain done and leaves the files alone.
    let q = data.join("samplemix/quality/prose.f32");
    let stamp = std::fs::metadata(&q).unwrap().modified().unwrap();
    assert_eq!(
        score_quality(&options, &QualityScorer::Heuristic).unwrap(),
        means
    );
    assert_eq!(std::fs::metadata(&q).unwrap().modified().unwrap(), stamp);

    let base = tmp.path().join("base.toml");
    std::fs::write(
        &base,
        format!(
            r#"
[run]
name = "x"
steps = 8
batch_size = 8
seq_len = 32
backend = "cpu"
[model]
preset = "tiny"
vocab_size = 260
[data]
source = "shards"
path = "{}"
[schedule]
warmup_steps = 1
[eval]
every = 0
sequences = 4
batch_size = 8
"#,
            data.display()
        ),
    )
    .unwrap();
    let file = tmp.path().join("cmp.toml");
    std::fs::write(
        &file,
        r#"
base = "base.toml"
out_dir = "out"
[[method]]
name = "natural"
mixing = { method = "natural" }
[[method]]
name = "samplemix"
search = "samplemix"
clusters = 3
"#,
    )
    .unwrap();
    let mut config = CompareConfig::load(&file).unwrap();
    config.out_dir = tmp.path().join("out");
    let results = compare(
        &config,
        BackendKind::Cpu,
        &mixlm_train::TrainOptions::quiet(),
    )
    .unwrap();
    assert_eq!(results.results.len(), 2);
    for r in &results.results {
        let test = &r.eval.splits[1];
        assert_eq!(test.split, "test");
        assert!(test.domains.iter().all(|d| d.tokens > 0), "{test:?}");
        assert!(test.average_ppl > 1.0 && test.average_ppl.is_finite());
    }

    // The plan spends the run's token budget (8 steps x 8 x 32) within one document.
    let plan = config.out_dir.join("samplemix-s0-plan");
    let summary: SampleSummary =
        serde_json::from_slice(&std::fs::read(plan.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary.budget, 8 * 8 * 32);
    assert_eq!(summary.scored_with["quality"], "heuristic");
    assert!(
        summary.scored_with["diversity"].starts_with("tfidf:1024, k-means k = 3 fitted on 180"),
        "{:?}",
        summary.scored_with
    );
    let shards = ShardSource::open(&data, 0).unwrap();
    let longest = (0..3)
        .flat_map(|d| {
            let o = shards.doc_offsets(DomainId(d), Split::Train).to_vec();
            o.windows(2).map(|w| w[1] - w[0]).collect::<Vec<_>>()
        })
        .max()
        .unwrap();
    assert!(
        summary.tokens_kept.abs_diff(summary.budget) < longest,
        "{summary:?}"
    );
    // Counts per document on disk agree with the summary.
    let mut kept = 0u64;
    for (d, name) in shards.domain_names().iter().enumerate() {
        let counts = read_counts(&counts_path(&plan, name)).unwrap();
        let o = shards.doc_offsets(DomainId(d), Split::Train);
        let tokens: u64 = counts
            .iter()
            .enumerate()
            .map(|(i, &c)| c as u64 * (o[i + 1] - o[i]))
            .sum();
        assert_eq!(tokens, summary.domain_tokens[name]);
        kept += tokens;
        // Scores for every document were written next to the data.
        let n = o.len() - 1;
        let div = read_values(
            &data.join(format!("samplemix-model-free/diversity/{name}.f32")),
            n,
        )
        .unwrap();
        assert!(div.iter().all(|v| (0.0..=1.0).contains(v)));
    }
    assert_eq!(kept, summary.tokens_kept);

    // The run trained with SampleMix's proportions.
    let run = results
        .results
        .iter()
        .find(|r| r.method == "samplemix")
        .unwrap();
    let toml_text = std::fs::read_to_string(run.run_dir.join("config.toml")).unwrap();
    assert!(toml_text.contains("method = \"samplemix\""), "{toml_text}");
    let last = run.curves.proportions.last().unwrap();
    for (name, p) in &summary.proportions {
        assert!(
            (last.values[name] - p).abs() < 1e-9,
            "{name}: {} vs {p}",
            last.values[name]
        );
    }
    assert!(run.eval.splits[1].average_ppl.is_finite());

    // Model-based scorers with the natural run's checkpoint: NLL percentiles average
    // 5 over the corpus (mid-ranks), and mean-pooled hidden states cluster all 180
    // documents in the model's width.
    let natural = results
        .results
        .iter()
        .find(|r| r.method == "natural")
        .unwrap();
    let checkpoint = mixlm_inspect::evaluate::resolve_checkpoint(&natural.run_dir).unwrap();
    let checkpoint_dir = checkpoint.clone();
    let by_model = ScoreOptions {
        plan: tmp.path().join("by-model"),
        ..options.clone()
    };
    let means = score_quality(
        &by_model,
        &QualityScorer::Model {
            checkpoint: checkpoint.clone(),
        },
    )
    .unwrap();
    let overall = means.values().sum::<f64>() / 3.0;
    assert!((overall - 5.0).abs() < 1e-4, "{means:?}");
    // The model reads each document's first max_doc_tokens: documents that share them
    // (after documents that share them too) get the same NLL whatever their tails; it
    // would differ if the tails were read.
    let prefix = "the quick brown fox jumps over the lazy dog. ";
    let tails = texts(6, 9);
    let rows: Vec<(&str, String)> = tails
        .iter()
        .map(|x| ("a", format!("{prefix}{x}")))
        .collect();
    write_file(
        &tmp.path().join("prefixed/train/a.jsonl"),
        jsonl(&rows).as_bytes(),
    );
    let prefixed = tmp.path().join("prefixed-shards");
    prepare(&PrepareConfig {
        inputs: vec![tmp.path().join("prefixed").display().to_string()],
        tokenizer: tmp.path().join("tokenizer.json"),
        output: prefixed.clone(),
        ..PrepareConfig::default()
    })
    .unwrap();
    let short = ScoreOptions {
        data: prefixed.clone(),
        plan: prefixed.join("samplemix"),
        max_doc_tokens: 8,
        ..options.clone()
    };
    score_quality(
        &short,
        &QualityScorer::Model {
            checkpoint: checkpoint.clone(),
        },
    )
    .unwrap();
    let nll = read_values(&prefixed.join("samplemix/nll/a.f32"), 6).unwrap();
    assert!(nll.iter().all(|v| v.is_finite()), "{nll:?}");
    // (The first has no context; the last window of a stream is shifted back.)
    for v in &nll[2..5] {
        assert!((v - nll[1]).abs() < 1e-5, "{nll:?}");
    }
    let div = DiversityOptions {
        embedder: Embedder::Model { checkpoint },
        k: 3,
        seed: 0,
        fit_documents: 90,
    };
    let report = score_diversity(&by_model, &div).unwrap();
    assert_eq!(report.sizes.iter().sum::<usize>(), 180);
    let fit: serde_json::Value =
        serde_json::from_slice(&std::fs::read(by_model.plan.join("kmeans/fit.json")).unwrap())
            .unwrap();
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(checkpoint_dir.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(fit["dim"], config["hidden_size"], "{fit} {config}");
}

/// `--scorer field`: the scores the records carry, captured at prepare time, become
/// the plan's quality unchanged; a corpus prepared without them is refused clearly.
#[test]
fn field_scorer_takes_the_prepared_quality() {
    let tmp = tempfile::tempdir().unwrap();
    let tokenizer = tmp.path().join("tokenizer.json");
    write_tokenizer(&tokenizer, 0);
    let t = texts(24, 4);
    let lines: String = t
        .iter()
        .enumerate()
        .map(|(i, x)| {
            let domain = ["a", "b"][i % 2];
            serde_json::json!({"text": x, "meta": {"redpajama_set_name": domain},
                "llm_quality": (i % 7) as f64 * 10.0})
            .to_string()
                + "\n"
        })
        .collect();
    write_file(&tmp.path().join("raw/train/x.jsonl"), lines.as_bytes());
    let config = |out: &str, keys: Vec<String>| PrepareConfig {
        inputs: vec![tmp.path().join("raw").display().to_string()],
        tokenizer: tokenizer.clone(),
        output: tmp.path().join(out),
        quality_keys: keys,
        quality_range: [0.0, 100.0],
        ..PrepareConfig::default()
    };
    let scored = config("scored", vec!["llm_quality".into()]);
    prepare(&scored).unwrap();
    let options = |data: &std::path::Path| ScoreOptions {
        data: data.to_path_buf(),
        plan: data.join("samplemix"),
        max_doc_tokens: 256,
        batch_size: 8,
        backend: BackendKind::Cpu,
        quiet: true,
    };
    // Heuristic scores first: the field scorer replaces them rather than taking the
    // finished domains as done.
    score_quality(&options(&scored.output), &QualityScorer::Heuristic).unwrap();
    let means = score_quality(&options(&scored.output), &QualityScorer::Field).unwrap();
    assert_eq!(
        std::fs::read_to_string(scored.output.join("samplemix/quality/scorer.txt")).unwrap(),
        "field"
    );
    for (d, name) in ["a", "b"].iter().enumerate() {
        let want: Vec<f32> = (0..24)
            .filter(|i| i % 2 == d)
            .map(|i| (i % 7) as f32)
            .collect();
        let got = read_values(
            &scored.output.join(format!("samplemix/quality/{name}.f32")),
            want.len(),
        )
        .unwrap();
        assert_eq!(got, want, "{name}");
        let mean = want.iter().map(|&v| v as f64).sum::<f64>() / want.len() as f64;
        assert!((means[*name] - mean).abs() < 1e-9, "{means:?}");
    }

    let plain = config("plain", vec![]);
    prepare(&plain).unwrap();
    let e = score_quality(&options(&plain.output), &QualityScorer::Field)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("prepared without quality fields") && e.contains("quality_keys"),
        "{e}"
    );
}

fn mtime(p: &Path) -> std::time::SystemTime {
    std::fs::metadata(p).unwrap().modified().unwrap()
}

/// Diversity fitted on a sample and assigned in chunks: every document scored, the
/// statistics over the whole corpus, the fit and finished domains reused on a rerun,
/// an interrupted domain redone to the same result, other settings refitted.
#[test]
fn diversity_fits_on_a_sample_assigns_everything_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let data = three_domain_corpus(tmp.path(), false);
    let plan = data.join("samplemix");
    let options = ScoreOptions {
        data: data.clone(),
        plan: plan.clone(),
        max_doc_tokens: 256,
        batch_size: 8,
        backend: BackendKind::Cpu,
        quiet: true,
    };
    let mut div = DiversityOptions::tfidf(3);
    div.fit_documents = 45;
    let report = score_diversity(&options, &div).unwrap();
    assert_eq!(report.fit_documents, 45);
    assert_eq!(report.sizes.iter().sum::<usize>(), 180, "{report:?}");
    // The three kinds of text are three clusters: each domain sits in one cluster
    // of its own.
    for (d, row) in &report.overlap {
        for (e, share) in row {
            assert_eq!(*share, if d == e { 1.0 } else { 0.0 }, "{d} {e} {report:?}");
        }
    }
    // Compactness is the mean of the stored distances over each cluster's members.
    let read_u32 = |p: PathBuf| -> Vec<u32> {
        std::fs::read(p)
            .unwrap()
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
            .collect()
    };
    let mut before = Vec::new();
    for name in ["nums", "prose", "spam"] {
        let a = read_u32(plan.join(format!("kmeans/assign/{name}.u32")));
        let x = read_values(&plan.join(format!("kmeans/distance/{name}.f32")), 60).unwrap();
        assert!(a.iter().all(|&c| c == a[0]), "{name}: {a:?}");
        let mean = x.iter().map(|&v| v as f64).sum::<f64>() / 60.0;
        assert!((report.compactness[a[0] as usize] - mean).abs() < 1e-5);
        let d = read_values(&plan.join(format!("diversity/{name}.f32")), 60).unwrap();
        assert!(d.iter().all(|&v| (0.0..=1.0).contains(&v) && v == d[0]));
        before.push(d);
    }

    // A rerun reuses the fit and the assignments.
    let fit = plan.join("kmeans/fit.json");
    let prose = plan.join("kmeans/assign/prose.u32");
    let (fit_time, prose_time) = (mtime(&fit), mtime(&prose));
    std::thread::sleep(std::time::Duration::from_millis(20));
    // An interrupted run: one domain not assigned yet.
    std::fs::remove_file(plan.join("kmeans/assign/spam.u32")).unwrap();
    assert_eq!(score_diversity(&options, &div).unwrap(), report);
    assert_eq!((mtime(&fit), mtime(&prose)), (fit_time, prose_time));
    assert!(plan.join("kmeans/assign/spam.u32").exists());
    for (name, d) in ["nums", "prose", "spam"].iter().zip(&before) {
        assert_eq!(
            &read_values(&plan.join(format!("diversity/{name}.f32")), 60).unwrap(),
            d
        );
    }

    // Other settings: a new fit, and the old assignments are not mixed in.
    div.k = 2;
    let two = score_diversity(&options, &div).unwrap();
    assert_eq!(two.k, 2);
    assert_ne!(mtime(&fit), fit_time);
    assert!(read_u32(prose).iter().all(|&c| c < 2));
}

/// The comparison's headline is the average test perplexity: data prepared without a
/// test split is refused before anything trains, naming the domains and the fix.
#[test]
fn a_comparison_without_test_data_is_refused_before_training() {
    let tmp = tempfile::tempdir().unwrap();
    let data = three_domain_corpus(tmp.path(), false);
    let base = tmp.path().join("base.toml");
    let toml = format!(
        "[model]\npreset = \"tiny\"\nvocab_size = 260\n[data]\nsource = \"shards\"\npath = \"{}\"\n",
        data.display()
    );
    std::fs::write(&base, toml).unwrap();
    let file = tmp.path().join("cmp.toml");
    std::fs::write(
        &file,
        "base = \"base.toml\"\nout_dir = \"out\"\n[[method]]\nname = \"natural\"\nmixing = { method = \"natural\" }\n",
    )
    .unwrap();
    let mut config = CompareConfig::load(&file).unwrap();
    config.out_dir = tmp.path().join("out");
    let e = compare(
        &config,
        BackendKind::Cpu,
        &mixlm_train::TrainOptions::quiet(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("no test tokens for nums, prose, spam")
            && e.contains("test_from_validation = true"),
        "{e}"
    );
    assert!(!config.out_dir.exists(), "nothing was trained");
}
