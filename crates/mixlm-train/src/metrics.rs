//! `runs/<name>/metrics.jsonl`: one JSON object per line, one line per optimizer
//! step (`"kind": "train"`) and per evaluation (`"kind": "eval"`), so a run's
//! losses and proportion trajectories can be plotted or compared with any tool.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use mixlm_mixing::DomainLosses;
use serde::{Deserialize, Serialize};

/// Pairs each domain name with its value, for readable JSON.
pub fn by_name<T: Clone>(names: &[String], values: &[T]) -> BTreeMap<String, T> {
    names.iter().cloned().zip(values.iter().cloned()).collect()
}

/// The fields of a record that read the clock: two runs that are equal to the bit
/// differ only in these.
pub const CLOCK_FIELDS: [&str; 4] = ["elapsed_s", "tokens_per_s", "time_s", "wall_time"];

/// Names values by domain when there is one per domain, else by index (a method's
/// groups of domains).
pub fn by_index_or_name(names: &[String], values: &[f64]) -> BTreeMap<String, f64> {
    match values.len() == names.len() {
        true => by_name(names, values),
        false => values
            .iter()
            .enumerate()
            .map(|(i, v)| (i.to_string(), *v))
            .collect(),
    }
}

/// One optimizer step.
#[derive(Debug, Clone, Serialize)]
pub struct StepRecord {
    pub kind: &'static str,
    /// Steps completed (1 after the first update).
    pub step: u64,
    /// Training tokens consumed so far.
    pub tokens: u64,
    pub lr: f64,
    /// Mean training loss of the step (nats/token).
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// The update was not applied (a NaN loss or gradient norm, `faults.on_nan = "skip"`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub skipped: bool,
    /// Mean training loss of each domain's sequences in this step (null if none).
    pub domain_loss: BTreeMap<String, Option<f64>>,
    /// Sequences of each domain in this step.
    pub sequences: BTreeMap<String, usize>,
    /// Proportions the scheduler chose for this step.
    pub proportions: BTreeMap<String, f64>,
    /// Weights on each domain's loss or gradient when the method keeps its own
    /// apart from the sampling proportions (DoReMi's and DoGE's `alpha`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub domain_weights: Option<BTreeMap<String, f64>>,
    pub elapsed_s: f64,
    pub tokens_per_s: f64,
    /// The method's own per-domain quantities (ODM's rewards, Aioli's `A` rows), by
    /// quantity and domain ([`mixlm_mixing::Scheduler::watch`]).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub method: BTreeMap<String, BTreeMap<String, f64>>,
    /// When the record was written (seconds since the Unix epoch).
    pub wall_time: f64,
    /// Where this step's wall-clock went.
    pub time_s: StepTimes,
}

/// One step's wall-clock by part (seconds), to see whether anything besides the model
/// keeps the device waiting. The model's share includes waiting for the device: its
/// work is asynchronous and is waited for when the losses are read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct StepTimes {
    /// Waiting for the next batch from the loader thread.
    pub data: f64,
    /// Inputs to the device, forward, backward, optimizer.
    pub model: f64,
    /// The scheduler: proportions, loss weights, feedback, its validation passes.
    pub mixing: f64,
    /// Metrics, progress, periodic evaluation and checkpoints (of the previous step).
    pub other: f64,
}

impl StepTimes {
    pub fn total(&self) -> f64 {
        self.data + self.model + self.mixing + self.other
    }

    /// The mixing method's share of the time (its validation passes included): what
    /// a method costs on top of training, apart from the tokens/s of the whole run.
    pub fn mixing_share(&self) -> Option<f64> {
        (self.total() > 0.0).then(|| self.mixing / self.total())
    }
}

/// One per-domain validation pass.
#[derive(Debug, Clone, Serialize)]
pub struct EvalRecord {
    pub kind: &'static str,
    pub step: u64,
    pub tokens: u64,
    pub val_loss: BTreeMap<String, Option<f64>>,
    pub val_ppl: BTreeMap<String, Option<f64>>,
    /// Training epochs consumed per domain (windows drawn / windows available); empty
    /// for unbounded sources. Above 1 means the domain's data was repeated.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub data_epochs: BTreeMap<String, f64>,
    /// When the record was written (seconds since the Unix epoch).
    pub wall_time: f64,
}

impl EvalRecord {
    pub fn new(step: u64, tokens: u64, names: &[String], losses: &DomainLosses) -> Self {
        let ppl: Vec<Option<f64>> = losses.0.iter().map(|l| l.map(f64::exp)).collect();
        Self {
            kind: "eval",
            step,
            tokens,
            val_loss: by_name(names, &losses.0),
            val_ppl: by_name(names, &ppl),
            data_epochs: BTreeMap::new(),
            wall_time: mixlm_tensorboard::now(),
        }
    }

    /// Adds the epochs consumed per domain, for sources with a known size.
    pub fn with_epochs(mut self, names: &[String], epochs: &[Option<f64>]) -> Self {
        self.data_epochs = names
            .iter()
            .zip(epochs)
            .filter_map(|(n, e)| e.map(|e| (n.clone(), e)))
            .collect();
        self
    }
}

/// Appends records to `metrics.jsonl`, flushing each line so a killed run keeps
/// every step it finished.
pub struct MetricsWriter {
    path: PathBuf,
    /// `None`: a data-parallel peer other than peer 0, which writes nothing.
    out: Option<BufWriter<File>>,
}

impl MetricsWriter {
    /// Starts a fresh file (an existing one from an earlier run of the same name is replaced).
    pub fn create(path: &Path) -> Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(path)
            .with_context(|| format!("cannot open {} for writing", path.display()))?;
        Ok(Self {
            path: path.to_path_buf(),
            out: Some(BufWriter::new(file)),
        })
    }

    /// Continues an existing file from the records of steps up to `step` (a resumed or
    /// rolled-back run; see [`crate::resume::truncate_metrics`]).
    pub fn resume(path: &Path, step: u64) -> Result<Self> {
        crate::resume::truncate_metrics(path, step)?;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open {} for appending", path.display()))?;
        Ok(Self {
            path: path.to_path_buf(),
            out: Some(BufWriter::new(file)),
        })
    }

    /// A writer that writes nothing (data-parallel peers other than peer 0).
    pub fn disabled(path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
            out: None,
        }
    }

    fn write<T: Serialize>(&mut self, record: &T) -> Result<()> {
        let Some(out) = self.out.as_mut() else {
            return Ok(());
        };
        if crate::chaos::is_pause("metrics-line") {
            let line = serde_json::to_vec(record)?;
            let _ = out
                .write_all(&line[..line.len() / 2])
                .and_then(|_| out.flush());
            crate::chaos::wait_to_be_killed();
        }
        serde_json::to_writer(&mut *out, record)?;
        out.write_all(b"\n")
            .and_then(|_| out.flush())
            .with_context(|| format!("cannot write to {} (disk full?)", self.path.display()))
    }

    pub fn step(&mut self, record: &StepRecord) -> Result<()> {
        self.write(record)
    }

    pub fn eval(&mut self, record: &EvalRecord) -> Result<()> {
        self.write(record)
    }
}

/// Most points kept of a per-step trajectory: enough for a figure, small in JSON.
pub const MAX_CURVE_POINTS: usize = 250;

/// A run's trajectories read back from its `metrics.jsonl`, for reports and plots.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Curves {
    /// Per-domain validation loss at every evaluation, by training tokens.
    pub val_loss: Vec<CurvePoint>,
    /// The proportions of (at most [`MAX_CURVE_POINTS`] evenly spaced) steps.
    pub proportions: Vec<CurvePoint>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CurvePoint {
    pub tokens: u64,
    pub values: BTreeMap<String, f64>,
}

impl Curves {
    pub fn is_empty(&self) -> bool {
        self.val_loss.is_empty() && self.proportions.is_empty()
    }
}

/// What reports and pipelines read back from a run's `metrics.jsonl`, in one pass.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunLog {
    pub curves: Curves,
    /// The training steps' times, summed.
    pub step_time: StepTimes,
    /// Every evaluation, in order: its step and per-domain validation loss (`None`:
    /// no value).
    pub evals: Vec<(u64, BTreeMap<String, Option<f64>>)>,
    /// The last training step's line.
    pub last_step: Option<LastStep>,
}

/// Where a run's log ends.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LastStep {
    /// Steps completed.
    pub step: u64,
    pub tokens: u64,
    /// Mean training loss of the step.
    pub loss: f64,
    /// Training wall-clock since the run began; a resumed run's earlier segments are
    /// included (up to the checkpoint it continued from).
    pub elapsed_s: f64,
}

impl LastStep {
    /// Training tokens per second over the whole run.
    pub fn tokens_per_second(&self) -> f64 {
        self.tokens as f64 / self.elapsed_s.max(1e-9)
    }
}

impl RunLog {
    /// Reads `metrics.jsonl`. A line that does not parse (the torn last line of a
    /// killed run) is skipped; so is a missing field (lines written before it existed).
    pub fn read(path: &Path) -> Result<Self> {
        #[derive(Deserialize)]
        struct Line {
            kind: String,
            #[serde(default)]
            step: u64,
            #[serde(default)]
            tokens: u64,
            #[serde(default)]
            val_loss: BTreeMap<String, Option<f64>>,
            #[serde(default)]
            proportions: BTreeMap<String, f64>,
            #[serde(default)]
            loss: f64,
            time_s: Option<StepTimes>,
            elapsed_s: Option<f64>,
        }
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let mut log = RunLog::default();
        let mut t = StepTimes::default();
        for line in text.lines() {
            let Ok(line) = serde_json::from_str::<Line>(line) else {
                continue;
            };
            match line.kind.as_str() {
                "eval" => {
                    log.curves.val_loss.push(CurvePoint {
                        tokens: line.tokens,
                        values: line
                            .val_loss
                            .iter()
                            .filter_map(|(k, v)| v.map(|v| (k.clone(), v)))
                            .collect(),
                    });
                    log.evals.push((line.step, line.val_loss));
                }
                "train" => {
                    if let Some(s) = line.time_s {
                        t = StepTimes {
                            data: t.data + s.data,
                            model: t.model + s.model,
                            mixing: t.mixing + s.mixing,
                            other: t.other + s.other,
                        };
                    }
                    if let Some(elapsed_s) = line.elapsed_s {
                        log.last_step = Some(LastStep {
                            step: line.step,
                            tokens: line.tokens,
                            loss: line.loss,
                            elapsed_s,
                        });
                    }
                    log.curves.proportions.push(CurvePoint {
                        tokens: line.tokens,
                        values: line.proportions,
                    });
                }
                _ => {}
            }
        }
        log.step_time = t;
        log.curves.proportions = thin(log.curves.proportions, MAX_CURVE_POINTS);
        Ok(log)
    }
}

/// Every `ceil(n / max)`-th point, and always the last.
fn thin(points: Vec<CurvePoint>, max: usize) -> Vec<CurvePoint> {
    let n = points.len();
    if n <= max {
        return points;
    }
    let stride = n.div_ceil(max);
    points
        .into_iter()
        .enumerate()
        .filter(|(i, _)| i % stride == 0 || *i == n - 1)
        .map(|(_, p)| p)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The step times of a run's training lines are summed; evaluation lines and a
    /// torn last line are not counted.
    #[test]
    fn step_times_are_summed_over_training_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        let line = |kind: &str, t: [f64; 4]| {
            let total: f64 = t.iter().sum();
            format!(
                "{{\"kind\":\"{kind}\",\"step\":{},\"tokens\":{},\"loss\":{},\"elapsed_s\":{total},\"time_s\":{{\"data\":{},\"model\":{},\"mixing\":{},\"other\":{}}}}}\n",
                total as u64, total as u64 * 100, t[1], t[0], t[1], t[2], t[3]
            )
        };
        let text = line("train", [0.5, 2.0, 0.25, 0.25])
            + &line("eval", [9.0, 9.0, 9.0, 9.0])
            + &line("train", [0.5, 4.0, 0.75, 0.75])
            + "{\"kind\":\"train\",\"time_s\":{\"data\":";
        std::fs::write(&path, text).unwrap();
        let log = RunLog::read(&path).unwrap();
        let t = log.step_time;
        assert_eq!(
            t,
            StepTimes {
                data: 1.0,
                model: 6.0,
                mixing: 1.0,
                other: 1.0
            }
        );
        assert_eq!(t.mixing_share(), Some(1.0 / 9.0));
        assert_eq!(StepTimes::default().mixing_share(), None);
        // The log ends at the last whole training line (the eval line is not one).
        let last = log.last_step.unwrap();
        assert_eq!(
            (last.step, last.tokens, last.loss, last.elapsed_s),
            (6, 600, 4.0, 6.0)
        );
        assert_eq!(last.tokens_per_second(), 100.0);
    }

    #[test]
    fn curves_are_read_back_from_metrics() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        let mut text = String::from(
            r#"{"kind":"eval","step":0,"tokens":0,"val_loss":{"a":4.0,"b":null},"val_ppl":{}}"#,
        );
        text.push('\n');
        for step in 1..=1000u64 {
            text += &format!(
                "{{\"kind\":\"train\",\"step\":{step},\"tokens\":{},\"proportions\":{{\"a\":{},\"b\":{}}}}}\n",
                step * 10,
                step as f64 / 1000.0,
                1.0 - step as f64 / 1000.0
            );
        }
        text += r#"{"kind":"eval","step":1000,"tokens":10000,"val_loss":{"a":2.5,"b":3.0},"val_ppl":{}}"#;
        text += "\n{\"kind\":\"train\",\"ste"; // torn last line of a killed run
        std::fs::write(&path, text).unwrap();

        let log = RunLog::read(&path).unwrap();
        let c = &log.curves;
        assert_eq!(c.val_loss.len(), 2);
        assert_eq!(
            c.val_loss[0].values,
            BTreeMap::from([("a".to_string(), 4.0)])
        );
        assert_eq!(c.val_loss[1].tokens, 10_000);
        assert_eq!(c.val_loss[1].values["b"], 3.0);
        // 1000 steps thinned with stride 4: steps 1, 5, ..., 997, and the last one.
        assert_eq!(c.proportions.len(), 251);
        assert_eq!(c.proportions[1].tokens, 50);
        let last = c.proportions.last().unwrap();
        assert_eq!((last.tokens, last.values["a"]), (10_000, 1.0));
        assert_eq!(
            log.evals.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
            [0, 1000]
        );
        assert_eq!(log.evals[0].1["b"], None);
        assert!(RunLog::read(&dir.path().join("missing.jsonl")).is_err());
    }
}
