//! Continuing a run that stopped: which config it continues with, and how its
//! `metrics.jsonl` is cut back to the checkpoint it resumes from.
//!
//! A resumed run continues with the config saved in its checkpoint. Keys that only
//! change how long it runs or how it reports ([`SAFE_KEYS`]) may be overridden; any
//! other change would make the continuation a different run than the one whose state
//! was saved, and is refused with the key named.
//!
//! Pipelines of several runs (`mixlm compare`, `mixlm mix-search`) continue each
//! interrupted run the same way when they are rerun
//! (`mixlm_experiments::continuation`).

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::checkpoint::{latest_checkpoint, write_atomic};
use crate::config::RunConfig;

/// Config keys a resumed run may change (`section.key`, or `section.*` for a whole
/// section).
pub const SAFE_KEYS: [&str; 17] = [
    "run.steps",
    "run.log_every",
    "run.tensorboard",
    "run.backend",
    "run.activation_checkpointing",
    "run.attention",
    "eval.*",
    "checkpoint.*",
    "faults.on_nan",
    "faults.lr_backoff",
    "distributed.timeout_s",
    "distributed.always_collective",
    "distributed.bucket_mb",
    // Checkpoints hold the whole optimizer state, whatever the sharding.
    "distributed.shard",
    // Where each node is and which one this is: the same run from another seat.
    "distributed.node_rank",
    "distributed.orchestrator",
    "distributed.node_address",
];

fn is_safe(key: &str) -> bool {
    SAFE_KEYS.iter().any(|safe| match safe.strip_suffix(".*") {
        Some(section) => key.split('.').next() == Some(section),
        None => key == *safe,
    })
}

/// The config of the run in `run_dir`, as its newest valid checkpoint saved it, with
/// `overrides` applied (each must be a [`SAFE_KEYS`] key), and that checkpoint,
/// verified, with a warning for each newer one skipped (hand it to the trainer as
/// [`crate::Start::ResumeFrom`], which spares hashing it again). The run's
/// name and output folder follow `run_dir`, wherever it has been moved.
pub fn resume_config(run_dir: &Path, overrides: &[String]) -> Result<(RunConfig, PathBuf)> {
    // The peer counts (`--devices`, `--nodes`) and the accumulation may change only
    // together, keeping the global batch ([`same_global_batch`]).
    let mut counts: Vec<(&str, usize)> = Vec::new();
    let mut safe: Vec<String> = Vec::new();
    for spec in overrides {
        let (key, value) = spec.split_once('=').unwrap_or((spec.as_str(), ""));
        let key = key.trim();
        if GLOBAL_BATCH_KEYS.contains(&key) {
            let n = value.trim().parse::<usize>().ok().filter(|&n| n > 0);
            let n = n.with_context(|| format!("--set {key}={value}: expected a count >= 1"))?;
            counts.push((key, n));
            continue;
        }
        safe.push(spec.clone());
        if !is_safe(key) {
            bail!(
                "--set {key}: cannot change on resume (it would no longer continue the same \
                 run); keys that may change: {}. Start a new run to change it",
                SAFE_KEYS.join(", ")
            );
        }
    }
    let checkpoint = latest_checkpoint(run_dir)?;
    let saved = checkpoint.join("run.toml");
    let mut config = RunConfig::load_saved(&saved, &safe)?;
    let trained = config.clone();
    for (key, value) in counts {
        match key {
            "distributed.devices" => config.distributed.devices = value,
            "distributed.nodes" => config.distributed.nodes = value,
            _ => config.run.grad_accum = value,
        }
    }
    if !same_global_batch(&trained, &config) {
        bail!(
            "{}: {}",
            run_dir.display(),
            another_global_batch(&trained, config.distributed.world_size())
        );
    }
    let (out_dir, name) = split_run_dir(run_dir)?;
    config.run.out_dir = out_dir;
    config.run.name = name;
    config.validate()?;
    Ok((config, checkpoint))
}

fn split_run_dir(run_dir: &Path) -> Result<(String, String)> {
    let name = run_dir
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("{} is not a run folder", run_dir.display()))?;
    let parent = run_dir.parent().map(PathBuf::from).unwrap_or_default();
    let out_dir = if parent.as_os_str().is_empty() {
        ".".to_string()
    } else {
        parent.display().to_string()
    };
    Ok((out_dir, name.to_string()))
}

/// The keys that say how a step's global batch is split: they may change on resume
/// only together ([`same_global_batch`]).
pub const GLOBAL_BATCH_KEYS: [&str; 3] =
    ["distributed.devices", "distributed.nodes", "run.grad_accum"];

/// Whether `config` draws each step's global batch as `saved` did: the same number
/// of micro-batches (peers x accumulation) of the same size. Each peer reads every
/// `world`-th micro-batch of one shared stream, so the steps then train on the same
/// sequences, and the checkpointed sampler serves any peer count that keeps it.
pub fn same_global_batch(saved: &RunConfig, config: &RunConfig) -> bool {
    let micro = |c: &RunConfig| c.distributed.world_size() * c.run.grad_accum;
    saved.run.batch_size == config.run.batch_size && micro(saved) == micro(config)
}

/// Why a run trained as `saved` cannot continue on `world` peers, and what would.
pub fn another_global_batch(saved: &RunConfig, world: usize) -> String {
    let trained_on = saved.distributed.world_size();
    let micro = trained_on * saved.run.grad_accum;
    let on_world = match micro.is_multiple_of(world) {
        true => format!(
            "on {world} peers, set run.grad_accum = {} (--set run.grad_accum={})",
            micro / world,
            micro / world
        ),
        false => format!("{world} peers do not divide {micro}"),
    };
    format!(
        "the run was trained on {trained_on} data-parallel peer(s) with run.grad_accum = {} \
         ({micro} micro-batches of run.batch_size = {} per step), and resumes only with as \
         many per step (which sequences each peer reads depends on it): resume with \
         --devices {trained_on}, or on another peer count that keeps {micro} ({on_world})",
        saved.run.grad_accum, saved.run.batch_size
    )
}

/// The dotted keys whose values differ between two configs.
pub fn changed_keys(a: &RunConfig, b: &RunConfig) -> Result<Vec<String>> {
    let (a, b) = (toml::Value::try_from(a)?, toml::Value::try_from(b)?);
    let mut out = Vec::new();
    diff("", &a, &b, &mut out);
    Ok(out)
}

fn diff(prefix: &str, a: &toml::Value, b: &toml::Value, out: &mut Vec<String>) {
    match (a, b) {
        (toml::Value::Table(x), toml::Value::Table(y)) => {
            let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                match (x.get(k), y.get(k)) {
                    (Some(v), Some(w)) => diff(&key, v, w, out),
                    _ => out.push(key),
                }
            }
        }
        _ if a != b => out.push(prefix.to_string()),
        _ => {}
    }
}

/// Checks that `config` continues the run `saved` describes: the same except for
/// [`SAFE_KEYS`] (and the run's name and folder, which follow where it lives now).
pub fn check_continues(saved: &RunConfig, config: &RunConfig) -> Result<()> {
    let regrouped = same_global_batch(saved, config);
    let changed: Vec<String> = changed_keys(saved, config)?
        .into_iter()
        .filter(|k| !is_safe(k) && k != "run.name" && k != "run.out_dir")
        .filter(|k| !(regrouped && GLOBAL_BATCH_KEYS.contains(&k.as_str())))
        .collect();
    if !changed.is_empty() {
        bail!(
            "the config differs from the one the checkpoint was written with in {}: a \
             resumed run may change only {}",
            changed.join(", "),
            SAFE_KEYS.join(", ")
        );
    }
    Ok(())
}

/// Cuts `metrics.jsonl` back to the records of steps up to `step` (evaluations
/// included), so that the resumed run appends each later step exactly once. A torn
/// last line of a killed run is dropped; a damaged line anywhere else is refused
/// (it may be a record of a step the checkpoint covers, which would be lost; `mixlm
/// doctor` fails the same line), leaving the file as it was. The file is replaced
/// atomically. Returns how many lines were dropped.
pub fn truncate_metrics(path: &Path, step: u64) -> Result<usize> {
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => bail!("cannot read {}: {e}", path.display()),
    };
    let mut kept = String::with_capacity(text.len());
    let mut dropped = 0;
    let lines = text.lines().count();
    for (i, line) in text.lines().enumerate() {
        let record = serde_json::from_str::<serde_json::Value>(line).ok();
        if record.is_none() && i + 1 < lines {
            bail!(
                "{}:{}: not JSON, and not the last line (a kill tears only that one): a \
                 damaged record, which resuming would lose. Nothing was changed; fix or \
                 delete the line (`mixlm doctor` on the run folder reports it), then resume",
                path.display(),
                i + 1
            );
        }
        let line_step = record.and_then(|v| v.get("step").and_then(|s| s.as_u64()));
        match line_step {
            Some(s) if s <= step => {
                kept.push_str(line);
                kept.push('\n');
            }
            _ => dropped += 1,
        }
    }
    write_atomic(path, kept.as_bytes())?;
    Ok(dropped)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safe_keys_and_sections() {
        assert!(is_safe("run.steps"));
        assert!(is_safe("eval.every"));
        assert!(is_safe("checkpoint.keep"));
        assert!(!is_safe("run.seed"));
        assert!(!is_safe("optimizer.lr"));
        assert!(!is_safe("evaluation.every"));
        assert!(!is_safe("run.steps_extra"));
    }

    #[test]
    fn changed_keys_are_named() {
        let a = RunConfig::embedded(&[]).unwrap();
        let b = RunConfig::embedded(&["optimizer.lr=0.01".into(), "run.steps=500".into()]).unwrap();
        assert_eq!(
            changed_keys(&a, &b).unwrap(),
            vec!["optimizer.lr".to_string(), "run.steps".to_string()]
        );
        let e = check_continues(&a, &b).unwrap_err().to_string();
        assert!(e.contains("in optimizer.lr:"), "{e}");
        assert!(!e.contains("in optimizer.lr, run.steps"), "{e}");
        let c = RunConfig::embedded(&["run.steps=500".into(), "eval.every=7".into()]).unwrap();
        check_continues(&a, &c).unwrap();
    }

    /// Every node resumes the run node 0 saved: its own rank and addresses differ,
    /// the number of nodes may not.
    #[test]
    fn a_node_resumes_from_its_own_seat_but_not_with_another_world() {
        let node = |rank: usize, nodes: usize, address: &str| {
            RunConfig::embedded(&[
                format!("distributed.nodes={nodes}"),
                format!("distributed.node_rank={rank}"),
                "distributed.orchestrator=\"10.0.0.1:29500\"".into(),
                format!("distributed.node_address=\"{address}\""),
            ])
            .unwrap()
        };
        let saved = node(0, 2, "10.0.0.1:29501");
        check_continues(&saved, &node(1, 2, "10.0.0.2:29501")).unwrap();
        let e = check_continues(&saved, &node(1, 3, "10.0.0.2:29501"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("distributed.nodes"), "{e}");
        let mut third = node(1, 2, "10.0.0.3:29501");
        third.distributed.node_rank = 2;
        let e = third.validate().unwrap_err().to_string();
        assert!(e.contains("node_rank = 2 must be below"), "{e}");
        let e = RunConfig::embedded(&["distributed.nodes=2".into()])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("distributed.orchestrator") && e.contains("HOST:PORT"),
            "{e}"
        );
    }

    #[test]
    fn metrics_are_cut_back_to_the_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        let mut text = String::from("{\"kind\":\"eval\",\"step\":0}\n");
        for s in 1..=7 {
            text += &format!("{{\"kind\":\"train\",\"step\":{s}}}\n");
        }
        text += "{\"kind\":\"eval\",\"step\":4}\n{\"kind\":\"train\",\"st"; // torn
        fs::write(&path, &text).unwrap();
        assert_eq!(truncate_metrics(&path, 4).unwrap(), 4);
        let steps: Vec<u64> = fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(steps, vec![0, 1, 2, 3, 4, 4]);
    }

    /// A torn line with records after it is no kill's doing: refused, naming the line,
    /// and the file is left as it was.
    #[test]
    fn a_damaged_line_in_the_middle_is_refused_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        let text = "{\"kind\":\"train\",\"step\":1}\n{\"kind\":\"tr\n\
                    {\"kind\":\"train\",\"step\":3}\n";
        fs::write(&path, text).unwrap();
        let e = truncate_metrics(&path, 3).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!(
                "{}:2: not JSON, and not the last line",
                path.display()
            )) && e.contains("Nothing was changed"),
            "{e}"
        );
        assert_eq!(fs::read_to_string(&path).unwrap(), text);
    }
}
