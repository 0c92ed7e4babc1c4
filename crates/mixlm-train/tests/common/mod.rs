//! Helpers shared by the trainer's integration tests and those of the crates built
//! on it (`mixlm-experiments` includes this file by path).
#![allow(dead_code)]

use mixlm_train::RunConfig;

/// A short run of the embedded demo config in `dir`/`name`, with `extra` overrides.
pub fn short_run(dir: &std::path::Path, name: &str, extra: &[&str]) -> RunConfig {
    let mut overrides: Vec<String> = vec![
        format!("run.out_dir=\"{}\"", dir.display()),
        format!("run.name=\"{name}\""),
        "run.steps=6".into(),
        "run.batch_size=4".into(),
        "run.seq_len=16".into(),
        "schedule.warmup_steps=2".into(),
        "eval.every=3".into(),
        "eval.sequences=4".into(),
        "eval.batch_size=8".into(),
        "checkpoint.every=3".into(),
    ];
    overrides.extend(extra.iter().map(|s| s.to_string()));
    RunConfig::embedded(&overrides).unwrap()
}

/// The records of a run folder's `metrics.jsonl`.
pub fn metrics(dir: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Holds `folder`'s lock as another process would (its own open of the lock file),
/// naming PID 4242; dropping the file releases it.
pub fn held_by_another_process(folder: &std::path::Path) -> std::fs::File {
    std::fs::create_dir_all(folder).unwrap();
    let path = folder.join(mixlm_data::lock::LOCK_FILE);
    std::fs::write(&path, "PID 4242, mixlm train\n").unwrap();
    let file = std::fs::File::open(&path).unwrap();
    file.try_lock().unwrap();
    file
}
