//! The run's TensorBoard view: `runs/<name>/tensorboard/events.out.tfevents.*`, the
//! same numbers as `metrics.jsonl`, written (and flushed) with every record.
//!
//! Each record's values go in twice: keyed by step (`train/loss`, `val/ppl/<domain>`,
//! ...) and keyed by training tokens, under `by_tokens/` (TensorBoard's x axis is the
//! step, so the tokens take its place there). Tags:
//! - `train/{loss, lr, grad_norm, tokens_per_s}`, `train/loss/<domain>`,
//!   `proportion/<domain>`, `domain_weight/<domain>` (DoReMi's and DoGE's weights),
//!   `method/<quantity>/<domain>` (the method's own, e.g. ODM's rewards, Aioli's `A`);
//! - `val/loss/<domain>`, `val/ppl/<domain>`.
//!
//! A resumed or rolled-back run has `metrics.jsonl` cut back to its checkpoint; the
//! event files are then written afresh from it, so no step appears twice. A write that
//! fails (a full disk, an unwritable folder) is a warning naming the file, and the run
//! goes on without TensorBoard; `metrics.jsonl` is unaffected.

use std::path::{Path, PathBuf};

use mixlm_tensorboard::{EventWriter, Point};
use serde_json::Value;

/// Where a run's event files go.
pub fn dir(run_dir: &Path) -> PathBuf {
    run_dir.join("tensorboard")
}

/// Writes a run's event files; inert after a failure or when switched off.
pub struct Board {
    dir: PathBuf,
    writer: Option<EventWriter>,
}

impl Board {
    /// A board that writes nothing.
    fn off(run_dir: &Path) -> Self {
        Self {
            dir: dir(run_dir),
            writer: None,
        }
    }

    /// Starts the run's event files afresh (earlier ones are removed) and writes the
    /// records of `replay` (`metrics.jsonl`'s, for a run that already has some).
    pub fn open(run_dir: &Path, replay: &[Value]) -> Self {
        let mut board = Self::off(run_dir);
        let start = || -> std::io::Result<EventWriter> {
            for old in mixlm_tensorboard::event_files(&board.dir)? {
                std::fs::remove_file(&old)?;
            }
            EventWriter::create(&board.dir, mixlm_tensorboard::now(), 0)
        };
        match start() {
            Ok(writer) => board.writer = Some(writer),
            Err(e) => board.warn(&board.dir.clone(), &e),
        }
        for record in replay {
            board.write(record, false);
        }
        board.flush();
        board
    }

    /// [`Board::open`] for a resumed or rolled-back run: its `metrics.jsonl`, already
    /// cut back to the checkpoint, is written again. An unreadable one is a warning.
    pub fn resume(run_dir: &Path) -> Self {
        match crate::run_report::read_records(run_dir) {
            Ok(records) => Self::open(run_dir, &records),
            Err(e) => {
                let mut board = Self::off(run_dir);
                board.warn(&run_dir.join("metrics.jsonl"), &format!("{e:#}"));
                board
            }
        }
    }

    /// Whether events are still written (no write has failed).
    pub fn is_writing(&self) -> bool {
        self.writer.is_some()
    }

    /// One `metrics.jsonl` record (as JSON), flushed so a live run shows it.
    pub fn record(&mut self, record: &Value) {
        self.write(record, true);
    }

    fn write(&mut self, record: &Value, flush: bool) {
        let Some(writer) = self.writer.as_mut() else {
            return;
        };
        let Some((step, tokens, points)) = points(record) else {
            return;
        };
        let wall = record
            .get("wall_time")
            .and_then(Value::as_f64)
            .unwrap_or_else(mixlm_tensorboard::now);
        let by_tokens: Points = points
            .iter()
            .map(|(tag, p)| (format!("by_tokens/{tag}"), p.clone()))
            .collect();
        let result = writer
            .write(step, wall, &points)
            .and_then(|_| writer.write(tokens, wall, &by_tokens))
            .and_then(|_| if flush { writer.flush() } else { Ok(()) });
        if let Err(e) = result {
            let path = writer.path().to_path_buf();
            self.warn(&path, &e);
        }
    }

    fn flush(&mut self) {
        if let Some(writer) = self.writer.as_mut() {
            if let Err(e) = writer.flush() {
                let path = writer.path().to_path_buf();
                self.warn(&path, &e);
            }
        }
    }

    fn warn(&mut self, path: &Path, e: &dyn std::fmt::Display) {
        eprintln!(
            "warning: cannot write TensorBoard events to {} ({e}); the run goes on without \
             them (metrics.jsonl has every number; `mixlm export tensorboard` can write them later)",
            path.display()
        );
        self.writer = None;
    }
}

/// Tagged values of one event.
pub type Points = Vec<(String, Point)>;

/// A record's step, tokens and tagged values; `None` for a record of another kind.
pub fn points(record: &Value) -> Option<(u64, u64, Points)> {
    let step = record.get("step")?.as_u64()?;
    let tokens = record.get("tokens").and_then(Value::as_u64).unwrap_or(0);
    let mut out = Vec::new();
    let mut scalar = |tag: String, v: Option<&Value>| {
        if let Some(v) = v.and_then(Value::as_f64) {
            out.push((tag, Point::Scalar(v)));
        }
    };
    let per_domain = |field: &str| -> Vec<(String, Option<&Value>)> {
        record
            .get(field)
            .and_then(Value::as_object)
            .map(|m| m.iter().map(|(k, v)| (k.clone(), Some(v))).collect())
            .unwrap_or_default()
    };
    match record.get("kind")?.as_str()? {
        "train" => {
            for key in ["loss", "lr", "grad_norm", "tokens_per_s"] {
                scalar(format!("train/{key}"), record.get(key));
            }
            for (field, prefix) in [
                ("domain_loss", "train/loss"),
                ("proportions", "proportion"),
                ("domain_weights", "domain_weight"),
            ] {
                for (domain, v) in per_domain(field) {
                    scalar(format!("{prefix}/{domain}"), v);
                }
            }
            if let Some(method) = record.get("method").and_then(Value::as_object) {
                for (quantity, values) in method {
                    for (domain, v) in values.as_object().into_iter().flatten() {
                        scalar(format!("method/{quantity}/{domain}"), Some(v));
                    }
                }
            }
        }
        "eval" => {
            for (field, prefix) in [("val_loss", "val/loss"), ("val_ppl", "val/ppl")] {
                for (domain, v) in per_domain(field) {
                    scalar(format!("{prefix}/{domain}"), v);
                }
            }
        }
        _ => return None,
    }
    Some((step, tokens, out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn train(step: u64) -> Value {
        json!({"kind": "train", "step": step, "tokens": step * 64, "loss": 5.0 - step as f64,
               "lr": 1e-3, "proportions": {"a": 0.25, "b": 0.75},
               "method": {"reward": {"a": 0.5, "b": 1.5}}, "wall_time": 1000.0 + step as f64})
    }

    /// `(step, value)` of `tag` over every event file of the run, in reading order.
    fn scalars(run: &Path, tag: &str) -> Vec<(i64, f32)> {
        let mut out = Vec::new();
        for file in mixlm_tensorboard::event_files(&dir(run)).unwrap() {
            for e in mixlm_tensorboard::read_events(&file).unwrap() {
                for v in e.summary.iter().flat_map(|s| &s.value) {
                    if v.tag == tag {
                        out.push((e.step, v.simple_value.unwrap()));
                    }
                }
            }
        }
        out
    }

    /// Tags by step and by tokens; after a resume from step 2 (metrics.jsonl cut back),
    /// the event files hold every step once, with the original wall times.
    #[test]
    fn a_resumed_run_has_each_step_once() {
        let run = tempfile::tempdir().unwrap();
        let metrics = run.path().join("metrics.jsonl");
        let mut board = Board::open(run.path(), &[]);
        for step in 1..=3 {
            board.record(&train(step));
        }
        assert_eq!(
            scalars(run.path(), "train/loss"),
            [(1, 4.0), (2, 3.0), (3, 2.0)]
        );
        assert_eq!(scalars(run.path(), "by_tokens/train/loss")[2], (192, 2.0));
        assert_eq!(scalars(run.path(), "proportion/b")[0], (1, 0.75));
        assert_eq!(scalars(run.path(), "method/reward/b")[0], (1, 1.5));
        drop(board);

        let kept: Vec<String> = (1..=2).map(|s| train(s).to_string()).collect();
        std::fs::write(&metrics, kept.join("\n") + "\n").unwrap();
        let mut board = Board::resume(run.path());
        board.record(&train(3));
        board.record(&train(4));
        let steps: Vec<i64> = scalars(run.path(), "train/loss")
            .iter()
            .map(|p| p.0)
            .collect();
        assert_eq!(steps, [1, 2, 3, 4]);
        let file = &mixlm_tensorboard::event_files(&dir(run.path())).unwrap()[0];
        let first = &mixlm_tensorboard::read_events(file).unwrap()[1];
        assert_eq!((first.step, first.wall_time), (1, 1001.0));
    }

    /// A folder that cannot be written is a warning; the board then writes nothing.
    #[test]
    fn an_unwritable_folder_is_not_an_error() {
        let run = tempfile::tempdir().unwrap();
        std::fs::write(dir(run.path()), "a file where the folder should be").unwrap();
        let mut board = Board::open(run.path(), &[]);
        board.record(&train(1));
        assert!(!board.is_writing());
    }
}
