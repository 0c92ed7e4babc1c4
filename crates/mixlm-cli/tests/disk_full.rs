//! A disk that fills up during a run: the run stops with an error naming what could not
//! be written and where, the checkpoints already written stay valid, no half-written
//! checkpoint is left, `metrics.jsonl` keeps every step it logged, and the run resumes.
//!
//! Needs a size-limited filesystem: a tmpfs mounted for the test (root on Linux). Where
//! the machine does not allow it, the test says so and passes; the write paths are also
//! tested with injected errors in `mixlm-train`'s unit tests.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// A tmpfs of a given size, unmounted on drop.
struct SmallFs {
    dir: PathBuf,
}

impl SmallFs {
    fn mount(kib: u64) -> Option<Self> {
        let dir = tempfile::tempdir().unwrap().keep();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={kib}k"), "tmpfs"])
            .arg(&dir)
            .output();
        match out {
            Ok(o) if o.status.success() => Some(Self { dir }),
            Ok(o) => {
                eprintln!(
                    "skipped: cannot mount a size-limited tmpfs here: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                None
            }
            Err(e) => {
                eprintln!("skipped: no `mount` command: {e}");
                None
            }
        }
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn train(out_dir: &Path, name: &str, extra: &[&str]) -> (bool, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mixlm"));
    cmd.args(["train", "--quiet"]);
    let out = format!("run.out_dir=\"{}\"", out_dir.display());
    let name = format!("run.name=\"{name}\"");
    let sets = [
        out.as_str(),
        name.as_str(),
        "run.steps=12",
        "run.batch_size=4",
        "run.seq_len=16",
        "schedule.warmup_steps=2",
        "eval.every=0",
        "eval.sequences=4",
        "checkpoint.every=3",
        "checkpoint.keep=0",
    ];
    for s in sets.iter().chain(extra) {
        cmd.args(["--set", s]);
    }
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_full_disk_keeps_earlier_checkpoints_and_the_run_resumes() {
    // One checkpoint of the tiny model is ~1.4 MB (weights 0.47 MB, AdamW moments
    // 0.94 MB): 2 MB hold the first one but not the second.
    let Some(fs) = SmallFs::mount(2000) else {
        return;
    };
    let (ok, stderr) = train(&fs.dir, "full", &[]);
    assert!(!ok, "the run cannot have fitted: {stderr}");
    assert!(
        stderr.contains("checkpoint at step 6 not written; the earlier checkpoints in")
            && stderr.contains("No space left on device"),
        "{stderr}"
    );
    let run_dir = fs.dir.join("full");
    let root = run_dir.join("checkpoints");
    let mut left: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(
        left,
        ["latest", "step-00000003"],
        "no half-written checkpoint left"
    );
    mixlm_train::checkpoint::verify(&root.join("step-00000003")).unwrap();
    let logged = common::metrics(&run_dir);
    assert_eq!(logged.last().unwrap()["step"], 6, "steps 1-6 logged");

    // With no more checkpoints to write, the run resumes from step 3 and ends exactly
    // like one that never ran out of space.
    // Starting the same run again is refused rather than replacing what was written.
    let (ok, stderr) = train(&fs.dir, "full", &[]);
    assert!(!ok && stderr.contains("already holds a run"), "{stderr}");
    assert_eq!(common::metrics(&run_dir), logged);
    let resume = Command::new(env!("CARGO_BIN_EXE_mixlm"))
        .args(["train", "--quiet", "--resume"])
        .arg(&run_dir)
        .args([
            "--set",
            "checkpoint.every=0",
            "--set",
            "checkpoint.save_final=false",
        ])
        .output()
        .unwrap();
    assert!(
        resume.status.success(),
        "{}",
        String::from_utf8_lossy(&resume.stderr)
    );
    let reference = tempfile::tempdir().unwrap();
    let (ok, stderr) = train(reference.path(), "full", &[]);
    assert!(ok, "{stderr}");
    assert_eq!(
        common::metrics(&run_dir),
        common::metrics(&reference.path().join("full"))
    );
}

/// The disk fills while `metrics.jsonl` grows: the run stops naming the file, and every
/// record written before stays readable (a torn last line at most, which a resume drops).
#[test]
fn a_full_disk_while_logging_names_the_metrics_file() {
    let Some(fs) = SmallFs::mount(64) else {
        return;
    };
    let (ok, stderr) = train(
        &fs.dir,
        "log",
        &[
            "run.steps=400",
            "checkpoint.every=0",
            "checkpoint.save_final=false",
        ],
    );
    assert!(!ok, "400 records cannot fit 64 KiB: {stderr}");
    assert!(
        stderr.contains("metrics.jsonl (disk full?)") && stderr.contains("No space left on device"),
        "{stderr}"
    );
    let text = std::fs::read_to_string(fs.dir.join("log/metrics.jsonl")).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let complete = if text.ends_with('\n') {
        &lines[..]
    } else {
        &lines[..lines.len() - 1]
    };
    assert!(complete.len() > 10, "{} records", complete.len());
    for (i, line) in complete.iter().enumerate() {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("line {}: {e}", i + 1));
        if i > 0 {
            assert_eq!(v["step"], i as u64, "steps in order, none lost");
        }
    }
}

/// Writes a one-file jsonl corpus of `n` documents over two domains.
fn corpus(path: &Path, n: usize, seed: u64) {
    use mixlm_data::prepare::testutil::{jsonl, texts, write_file};
    let texts = texts(n, seed);
    let records: Vec<(&str, String)> = texts
        .into_iter()
        .enumerate()
        .map(|(i, t)| (if i % 3 == 0 { "Beta" } else { "Alpha" }, t))
        .collect();
    write_file(path, jsonl(&records).as_bytes());
}

fn prepare(input: &Path, tokenizer: &Path, output: &Path, force: bool) -> (bool, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mixlm"));
    cmd.arg("prepare")
        .arg("--input")
        .arg(input)
        .arg("--tokenizer")
        .arg(tokenizer)
        .arg("--output")
        .arg(output);
    if force {
        cmd.arg("--force");
    }
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The disk fills while `mixlm prepare --force` rebuilds a finished dataset: the error
/// names what ran out, the old dataset is still there whole (`mixlm doctor` passes), no
/// staging folder is left, and a rebuild that fits replaces it.
#[test]
fn a_full_disk_during_a_rebuild_keeps_the_previous_dataset() {
    let Some(fs) = SmallFs::mount(1024) else {
        return;
    };
    let inputs = tempfile::tempdir().unwrap();
    let tokenizer = inputs.path().join("tokenizer.json");
    mixlm_data::prepare::testutil::write_tokenizer(&tokenizer, 0);
    let small = inputs.path().join("small.jsonl");
    let big = inputs.path().join("big.jsonl");
    corpus(&small, 1500, 1);
    corpus(&big, 4500, 2);
    let out = fs.dir.join("data");
    let (ok, stderr) = prepare(&small, &tokenizer, &out, false);
    assert!(ok, "{stderr}");
    let used: u64 = walk(&out).iter().map(|p| p.metadata().unwrap().len()).sum();
    assert!(
        (250_000..450_000).contains(&used),
        "the small dataset takes {used} bytes: the test's sizes need adjusting"
    );
    let before: Vec<(PathBuf, Vec<u8>)> = walk(&out)
        .into_iter()
        .map(|p| (p.clone(), std::fs::read(&p).unwrap()))
        .collect();

    let (ok, stderr) = prepare(&big, &tokenizer, &out, true);
    assert!(
        !ok,
        "three times the data cannot fit next to the old dataset"
    );
    assert!(
        stderr.contains(".building/")
            && stderr.contains("No space left on device")
            && stderr.contains("the dataset already there is intact and usable"),
        "{stderr}"
    );
    assert_eq!(
        stderr.matches("No space left").count(),
        1,
        "each cause said once: {stderr}"
    );
    let after: Vec<(PathBuf, Vec<u8>)> = walk(&out)
        .into_iter()
        .map(|p| (p.clone(), std::fs::read(&p).unwrap()))
        .collect();
    assert!(after == before, "the old dataset changed");
    let doctor = Command::new(env!("CARGO_BIN_EXE_mixlm"))
        .arg("doctor")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        doctor.status.success(),
        "{}",
        String::from_utf8_lossy(&doctor.stdout)
    );

    // A rebuild that fits next to the old one replaces it.
    let smaller = inputs.path().join("smaller.jsonl");
    corpus(&smaller, 1000, 3);
    let (ok, stderr) = prepare(&smaller, &tokenizer, &out, true);
    assert!(ok, "{stderr}");
    let m = mixlm_data::prepare::Manifest::read(&out).unwrap().unwrap();
    assert_eq!(m.inputs.len(), 1);
    assert!(m.inputs[0].path.ends_with("smaller.jsonl"));
    assert!(walk(&out)
        .iter()
        .all(|p| !p.to_string_lossy().contains(".building")));
}

/// Every file under `dir`, sorted.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if !p.ends_with(mixlm_data::lock::LOCK_FILE) {
                // The lock file names its holder's PID: each prepare rewrites it.
                files.push(p);
            }
        }
    }
    files.sort();
    files
}
