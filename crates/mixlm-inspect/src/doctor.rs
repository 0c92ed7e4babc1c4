//! `mixlm doctor`: checks a run folder, a checkpoint folder or a prepared dataset and
//! says what it found, so a user knows before a long job whether its inputs are whole
//! and whether a run can be resumed.

use std::fmt;
use std::fs;
use std::path::Path;

use mixlm_data::prepare::{Manifest as DataManifest, MANIFEST_FILE};
use mixlm_data::{DomainId, ShardSource, Split, TokenSource};
use serde_json::Value;

use mixlm_train::checkpoint::{checkpoint_dirs, find_resumable, verify};
use mixlm_train::config::RunConfig;
use mixlm_train::resume::check_continues;

/// How a finding weighs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Ok,
    /// Not broken, but worth knowing (something a resume repairs, a check not made).
    Warn,
    Fail,
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    pub level: Level,
    pub message: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tag = match self.level {
            Level::Ok => "ok  ",
            Level::Warn => "warn",
            Level::Fail => "FAIL",
        };
        write!(f, "{tag} {}", self.message)
    }
}

/// How many of `findings` failed (what `doctor` and `check-backend` exit on).
pub fn failures(findings: &[Finding]) -> usize {
    findings.iter().filter(|f| f.level == Level::Fail).count()
}

#[derive(Default)]
struct Report(Vec<Finding>);

impl Report {
    fn push(&mut self, level: Level, message: impl Into<String>) {
        self.0.push(Finding {
            level,
            message: message.into(),
        });
    }
    fn ok(&mut self, m: impl Into<String>) {
        self.push(Level::Ok, m)
    }
    fn warn(&mut self, m: impl Into<String>) {
        self.push(Level::Warn, m)
    }
    fn fail(&mut self, m: impl Into<String>) {
        self.push(Level::Fail, m)
    }
}

/// Checks `path`: a run folder (`config.toml`, `metrics.jsonl`, `checkpoints/`), one
/// checkpoint folder, or a folder `mixlm prepare` wrote. `tokenizer`: a tokenizer.json
/// to check the dataset's shards against.
pub fn doctor(path: &Path, tokenizer: Option<&Path>) -> Vec<Finding> {
    let mut r = Report::default();
    if let Some(holder) = mixlm_data::lock::holder(path) {
        r.warn(format!(
            "{} is being written by {holder}: what follows may change while it runs",
            path.display()
        ));
    }
    if !path.is_dir() {
        r.fail(format!("{} is not a folder", path.display()));
    } else if mixlm_train::checkpoint::has_weights(path) {
        check_checkpoint(path, &mut r);
    } else if path.join("config.toml").exists() || path.join("checkpoints").is_dir() {
        check_run(path, &mut r);
    } else if path.join(MANIFEST_FILE).exists() {
        check_dataset(path, tokenizer, &mut r);
    } else {
        r.fail(format!(
            "{} is neither a run folder (config.toml, checkpoints/), a checkpoint \
             (model.safetensors) nor a prepared dataset (manifest.json)",
            path.display()
        ));
    }
    r.0
}

fn check_checkpoint(dir: &Path, r: &mut Report) {
    match verify(dir) {
        Ok(m) => r.ok(format!(
            "checkpoint {} (step {}): {} files match their SHA-256",
            dir.display(),
            m.step,
            m.files.len()
        )),
        Err(e) => r.fail(format!("checkpoint {}: {e:#}", dir.display())),
    }
}

fn check_run(dir: &Path, r: &mut Report) {
    let config_path = dir.join("config.toml");
    let opened =
        RunConfig::load_saved(&config_path, &[]).and_then(|c| c.open_checked_source().map(|_| c));
    let config = match opened {
        Ok(c) => {
            r.ok(format!(
                "{}: valid (model {}, mixing {}, {} steps; data opens)",
                config_path.display(),
                c.model.preset,
                c.mixing.method_name(),
                c.run.steps
            ));
            Some(c)
        }
        Err(e) => {
            r.fail(format!("{e}"));
            None
        }
    };
    check_metrics(&dir.join("metrics.jsonl"), r);

    let root = dir.join("checkpoints");
    let dirs = checkpoint_dirs(&root).unwrap_or_default();
    if dirs.is_empty() {
        r.warn(format!("{}: no checkpoints", root.display()));
    }
    for (_, d) in &dirs {
        check_checkpoint(d, r);
    }
    match fs::read_to_string(root.join("latest")) {
        Ok(name) if root.join(name.trim()).is_dir() => {
            r.ok(format!("checkpoints/latest names {}", name.trim()))
        }
        Ok(name) => r.warn(format!(
            "checkpoints/latest names {}, which does not exist (resume uses the newest valid one)",
            name.trim()
        )),
        Err(_) if !dirs.is_empty() => r.warn("checkpoints/latest is missing"),
        Err(_) => {}
    }
    for entry in fs::read_dir(&root).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".tmp") {
            r.warn(format!(
                "checkpoints/{name}: left by an interrupted write (deleted by the next one)"
            ));
        }
    }

    match find_resumable(dir) {
        Ok((ckpt, _)) => {
            let state: Option<Value> = fs::read(ckpt.join("state.json"))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            let step = state.as_ref().and_then(|s| s["step"].as_u64()).unwrap_or(0);
            let saved = RunConfig::load_saved(&ckpt.join("run.toml"), &[]);
            match (&config, saved) {
                (Some(c), Ok(saved)) => match check_continues(&saved, c) {
                    Ok(()) if step >= c.run.steps => r.ok(format!(
                        "finished at step {step}; `mixlm train --resume {} --set run.steps=N` \
                         trains on",
                        dir.display()
                    )),
                    Ok(()) => r.ok(format!(
                        "resumable from step {step} of {}: mixlm train --resume {}",
                        c.run.steps,
                        dir.display()
                    )),
                    Err(e) => r.fail(format!("config.toml and the checkpoint disagree: {e:#}")),
                },
                (_, Err(e)) => r.fail(format!("cannot resume: {e}")),
                (None, _) => r.fail("cannot resume: config.toml is not valid"),
            }
        }
        Err(e) if !dirs.is_empty() => r.fail(format!("cannot resume: {e:#}")),
        Err(_) => {}
    }

    if let Ok(text) = fs::read_to_string(dir.join("faults.jsonl")) {
        let mut counts = std::collections::BTreeMap::<String, u64>::new();
        for v in text
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        {
            let key = format!(
                "{} {}",
                v["kind"].as_str().unwrap_or("?"),
                v["action"].as_str().unwrap_or("?")
            );
            *counts.entry(key).or_default() += 1;
        }
        let list: Vec<String> = counts.iter().map(|(k, n)| format!("{n} x {k}")).collect();
        r.warn(format!("faults.jsonl: {}", list.join(", ")));
    }
}

/// Each step once, in order; a torn last line is reported (a resume drops it).
fn check_metrics(path: &Path, r: &mut Report) {
    let Ok(text) = fs::read_to_string(path) else {
        r.warn(format!("{}: missing", path.display()));
        return;
    };
    let lines: Vec<&str> = text.lines().collect();
    let mut expected = 1u64;
    let mut evals = 0;
    for (i, line) in lines.iter().enumerate() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            if i + 1 == lines.len() {
                r.warn(format!(
                    "{}: the last line is torn (a killed run; dropped on resume)",
                    path.display()
                ));
            } else {
                r.fail(format!(
                    "{}:{}: not JSON, in the middle of the file (a damaged record; resume \
                     refuses the file until the line is fixed or deleted)",
                    path.display(),
                    i + 1
                ));
            }
            continue;
        };
        match (v["kind"].as_str(), v["step"].as_u64()) {
            (Some("train"), Some(step)) => {
                if step != expected {
                    r.fail(format!(
                        "{}:{}: step {step} where step {expected} was due (a step missing or \
                         logged twice)",
                        path.display(),
                        i + 1
                    ));
                    return;
                }
                expected += 1;
            }
            (Some("eval"), Some(_)) => evals += 1,
            _ => r.fail(format!("{}:{}: not a mixlm record", path.display(), i + 1)),
        }
    }
    r.ok(format!(
        "{}: steps 1-{} once each, {evals} evaluations",
        path.display(),
        expected - 1
    ));
}

fn check_dataset(dir: &Path, tokenizer: Option<&Path>, r: &mut Report) {
    let manifest = match DataManifest::read(dir) {
        Ok(Some(m)) => m,
        Ok(None) => return r.fail(format!("{}: no manifest.json", dir.display())),
        Err(e) => return r.fail(format!("{}: {e}", dir.join(MANIFEST_FILE).display())),
    };
    let source = match ShardSource::open_for_eval(dir) {
        Ok(s) => s,
        Err(e) => return r.fail(e.to_string()),
    };
    r.ok(format!(
        "{}: {} domains, every shard of the size the manifest records",
        dir.join(MANIFEST_FILE).display(),
        source.domain_names().len()
    ));
    let recorded = &manifest.tokenizer;
    let check_tokenizer = |file: &Path, r: &mut Report| match fs::read(file) {
        Ok(bytes) => {
            let hash = mixlm_train::checkpoint::FileDigest::of(&bytes).sha256;
            if hash == recorded.sha256 {
                r.ok(format!(
                    "tokenizer {} is the one the shards were made with",
                    file.display()
                ));
            } else {
                r.fail(format!(
                    "tokenizer {} has SHA-256 {}…, the shards were made with {}…: its token \
                     ids would not match; prepare the data again with this tokenizer",
                    file.display(),
                    &hash[..12],
                    &recorded.sha256[..12.min(recorded.sha256.len())]
                ));
            }
        }
        Err(e) => r.warn(format!(
            "tokenizer {} not readable ({e}); its hash was not checked",
            file.display()
        )),
    };
    match tokenizer {
        Some(file) => check_tokenizer(file, r),
        None => check_tokenizer(Path::new(&recorded.path), r),
    }
    let names = source.domain_names();
    let mut tokens = Vec::new();
    for (d, name) in names.iter().enumerate() {
        for split in Split::ALL {
            let offsets = source.doc_offsets(DomainId(d), split);
            let Some(&total) = offsets.last() else {
                continue;
            };
            tokens.clear();
            source.read_tokens(DomainId(d), split, 0..total, &mut tokens);
            let too_big = tokens
                .iter()
                .filter(|&&t| t as usize >= recorded.vocab_size)
                .count();
            let no_eos = offsets[1..]
                .iter()
                .filter(|&&end| tokens[end as usize - 1] != recorded.eos_id)
                .count();
            let what = format!(
                "{name} / {split}: {} documents, {total} tokens",
                offsets.len() - 1
            );
            match (too_big, no_eos) {
                (0, 0) => r.ok(format!(
                    "{what}; ids < {}, each ends with EOS",
                    recorded.vocab_size
                )),
                (n, 0) => r.fail(format!(
                    "{what}; {n} token ids >= the tokenizer's vocabulary {} (corrupt shard)",
                    recorded.vocab_size
                )),
                (_, n) => r.fail(format!(
                    "{what}; {n} documents do not end with EOS id {} (corrupt shard or offsets)",
                    recorded.eos_id
                )),
            }
        }
    }
}
