//! `mixlm doctor` on a healthy run and dataset, then on damaged copies: each damage is
//! found and named, and the exit status says whether anything is wrong.

use std::path::Path;

use mixlm_data::prepare::testutil::{jsonl, texts, write_file, write_tokenizer};

mod common;
use common::mixlm;

fn doctor(path: &Path, extra: &[&str]) -> (bool, String) {
    let mut args = vec!["doctor", path.to_str().unwrap()];
    args.extend_from_slice(extra);
    let (ok, out, err) = mixlm(&args);
    (ok, format!("{out}{err}"))
}

fn fail_lines(report: &str) -> Vec<&str> {
    report.lines().filter(|l| l.starts_with("FAIL")).collect()
}

#[test]
fn doctor_checks_a_run_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let sets = [
        format!("run.out_dir=\"{}\"", tmp.path().display()),
        "run.name=\"r\"".into(),
        "run.steps=6".into(),
        "run.batch_size=4".into(),
        "run.seq_len=16".into(),
        "schedule.warmup_steps=2".into(),
        "eval.sequences=4".into(),
        "checkpoint.every=3".into(),
        "checkpoint.save_final=false".into(),
    ];
    let mut args = vec!["train", "--quiet"];
    for s in &sets {
        args.extend(["--set", s.as_str()]);
    }
    let (ok, _, err) = mixlm(&args);
    assert!(ok, "{err}");
    let run = tmp.path().join("r");

    let (ok, report) = doctor(&run, &[]);
    assert!(ok, "{report}");
    assert!(report.contains("steps 1-6 once each"), "{report}");
    assert!(report.contains("step-00000003") && report.contains("match their SHA-256"));
    // The last checkpoint is at step 3 of 6 (no final one was written).
    assert!(report.contains("resumable from step 3 of 6"), "{report}");

    // A truncated optimizer state, and a step logged twice.
    let opt = run.join("checkpoints/step-00000003/optimizer.safetensors");
    let bytes = std::fs::read(&opt).unwrap();
    std::fs::write(&opt, &bytes[..bytes.len() / 2]).unwrap();
    let metrics = run.join("metrics.jsonl");
    let text = std::fs::read_to_string(&metrics).unwrap();
    let second = text.lines().nth(2).unwrap().to_string();
    std::fs::write(&metrics, format!("{text}{second}\n")).unwrap();

    let (ok, report) = doctor(&run, &[]);
    assert!(!ok, "{report}");
    let fails = fail_lines(&report);
    assert!(
        fails
            .iter()
            .any(|l| l.contains("optimizer.safetensors has") && l.contains("(truncated?)")),
        "{report}"
    );
    assert!(fails.iter().any(|l| l.contains("logged twice")), "{report}");
    assert!(
        fails.iter().any(|l| l.contains("cannot resume")),
        "{report}"
    );
}

#[test]
fn doctor_checks_a_prepared_dataset() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("corpus");
    let records: Vec<(&str, String)> = texts(40, 1)
        .into_iter()
        .enumerate()
        .map(|(i, t)| (if i % 2 == 0 { "A" } else { "B" }, t))
        .collect();
    write_file(&input.join("part.jsonl"), jsonl(&records).as_bytes());
    let tokenizer = tmp.path().join("tokenizer.json");
    write_tokenizer(&tokenizer, 0);
    let out = tmp.path().join("data");
    let (ok, _, err) = mixlm(&[
        "prepare",
        "--input",
        input.to_str().unwrap(),
        "--tokenizer",
        tokenizer.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");

    let (ok, report) = doctor(&out, &[]);
    assert!(ok, "{report}");
    assert!(
        report.contains("is the one the shards were made with"),
        "{report}"
    );
    assert!(report.contains("each ends with EOS"), "{report}");

    // Another tokenizer (one more vocabulary entry: another hash).
    let other = tmp.path().join("other.json");
    write_tokenizer(&other, 1);
    let (ok, report) = doctor(&out, &["--tokenizer", other.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        fail_lines(&report)
            .iter()
            .any(|l| l.contains("prepare the data again")),
        "{report}"
    );

    // A token id beyond the vocabulary written into a shard (same size, bad content).
    let shard = std::fs::read_dir(out.join("train"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "bin"))
        .unwrap();
    let mut bytes = std::fs::read(&shard).unwrap();
    bytes[0] = 0xff;
    bytes[1] = 0xff;
    std::fs::write(&shard, &bytes).unwrap();
    let (ok, report) = doctor(&out, &[]);
    assert!(!ok);
    assert!(
        fail_lines(&report)
            .iter()
            .any(|l| l.contains("token ids >= the tokenizer's vocabulary")),
        "{report}"
    );

    // A shard cut short: the manifest's size check names it.
    std::fs::write(&shard, &bytes[..bytes.len() - 2]).unwrap();
    let (ok, report) = doctor(&out, &[]);
    assert!(!ok);
    assert!(
        fail_lines(&report)
            .iter()
            .any(|l| l.contains(shard.file_name().unwrap().to_str().unwrap())),
        "{report}"
    );
}

#[test]
fn doctor_names_what_it_cannot_check() {
    let tmp = tempfile::tempdir().unwrap();
    let (ok, report) = doctor(tmp.path(), &[]);
    assert!(!ok);
    assert!(report.contains("is neither a run folder"), "{report}");
}
