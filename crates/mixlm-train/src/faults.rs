//! What the trainer does when a step goes wrong: a NaN or infinite loss or gradient
//! norm (`[faults] on_nan`), and loss spikes (logged with the batch's sequences).
//!
//! Every fault is appended to `runs/<name>/faults.jsonl`, one JSON object per event,
//! so `metrics.jsonl` keeps exactly one record per step and the faults of a run can
//! be read apart from it.

use std::collections::VecDeque;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// `[faults] on_nan`: what a step whose loss or gradient norm is not finite does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnNan {
    /// Leave the model and optimizer as they were, count the step, go on with the
    /// next batch.
    #[default]
    Skip,
    /// Reload the newest checkpoint, multiply the learning rate by `lr_backoff`, and
    /// train on from there.
    Rollback,
    /// Stop the run with a report (the last checkpoint stays the resume point).
    Stop,
}

impl OnNan {
    pub fn name(self) -> &'static str {
        match self {
            OnNan::Skip => "skip",
            OnNan::Rollback => "rollback",
            OnNan::Stop => "stop",
        }
    }
}

/// `[faults]`: the policies for bad steps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FaultsSection {
    pub on_nan: OnNan,
    /// Learning-rate factor applied at each rollback, in (0, 1].
    pub lr_backoff: f64,
    /// Most skipped or rolled-back steps in a row before the run stops anyway.
    pub max_consecutive: u64,
    /// A step whose loss exceeds `spike_factor` x the mean of the previous
    /// `spike_window` steps is logged as a spike (0 = off).
    pub spike_factor: f64,
    pub spike_window: usize,
    /// Steps (1-based) whose loss is replaced by NaN: a way to try the `on_nan`
    /// policy before a long run depends on it. Empty in real runs.
    pub inject_nan_steps: Vec<u64>,
}

impl Default for FaultsSection {
    fn default() -> Self {
        Self {
            on_nan: OnNan::Skip,
            lr_backoff: 0.5,
            max_consecutive: 10,
            spike_factor: 2.0,
            spike_window: 50,
            inject_nan_steps: Vec::new(),
        }
    }
}

impl FaultsSection {
    /// Range checks, as [`crate::RunConfig::validate`] reports them.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.lr_backoff > 0.0 && self.lr_backoff <= 1.0) {
            return Err(format!(
                "faults.lr_backoff = {} must be within (0, 1]",
                self.lr_backoff
            ));
        }
        if self.max_consecutive == 0 {
            return Err("faults.max_consecutive must be >= 1".into());
        }
        if !(self.spike_factor == 0.0 || self.spike_factor > 1.0) || !self.spike_factor.is_finite()
        {
            return Err(format!(
                "faults.spike_factor = {} must be 0 (off) or > 1",
                self.spike_factor
            ));
        }
        if self.spike_factor > 0.0 && self.spike_window < 2 {
            return Err("faults.spike_window must be >= 2".into());
        }
        Ok(())
    }
}

/// Flags steps whose loss jumps well above the recent mean.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpikeDetector {
    factor: f64,
    window: usize,
    recent: VecDeque<f64>,
}

impl SpikeDetector {
    pub fn new(factor: f64, window: usize) -> Self {
        Self {
            factor,
            window,
            recent: VecDeque::with_capacity(window),
        }
    }

    /// Feeds a step's loss; returns the running mean it spiked above, if it did.
    /// Checking starts once the window is full; non-finite losses are not fed.
    pub fn observe(&mut self, loss: f64) -> Option<f64> {
        if self.factor <= 0.0 || !loss.is_finite() {
            return None;
        }
        let mean = (self.recent.len() == self.window)
            .then(|| self.recent.iter().sum::<f64>() / self.window as f64);
        if self.recent.len() == self.window {
            self.recent.pop_front();
        }
        self.recent.push_back(loss);
        mean.filter(|m| loss > self.factor * m)
    }
}

/// One line of `faults.jsonl`.
#[derive(Debug, Clone, Serialize)]
pub struct FaultRecord {
    /// `nan` or `spike`.
    pub kind: &'static str,
    /// The step (1-based) it happened at.
    pub step: u64,
    /// What was done: `skipped`, `rolled_back`, `stopped`, `logged`.
    pub action: &'static str,
    pub loss: f64,
    pub grad_norm: Option<f64>,
    /// Running mean the spike was measured against.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mean: Option<f64>,
    /// Checkpoint step a rollback went back to, and the learning-rate scale after it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rolled_back_to: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lr_scale: Option<f64>,
    /// Per-domain mean loss of the step's sequences.
    pub domain_loss: std::collections::BTreeMap<String, Option<f64>>,
    /// Every sequence of the step, to find the data.
    pub sequences: Vec<SequenceRef>,
}

/// Where one training sequence came from.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SequenceRef {
    pub domain: String,
    /// The sampler's window index in the domain (epochs included).
    pub window: u64,
    /// First and last document (stream order of the prepared training split) whose
    /// tokens the window holds; absent for the synthetic corpus.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub documents: Option<[u64; 2]>,
}

/// Appends [`FaultRecord`]s to `faults.jsonl`.
pub struct FaultLog {
    path: PathBuf,
    /// Only data-parallel peer 0 writes (every peer sees the same faults).
    enabled: bool,
}

impl FaultLog {
    pub fn new(run_dir: &Path) -> Self {
        Self {
            path: run_dir.join("faults.jsonl"),
            enabled: true,
        }
    }

    /// A log that writes nothing (data-parallel peers other than peer 0).
    pub fn disabled(run_dir: &Path) -> Self {
        Self {
            enabled: false,
            ..Self::new(run_dir)
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn write(&self, record: &FaultRecord) -> Result<()> {
        if !self.enabled {
            return Ok(());
        }
        let mut line = serde_json::to_string(record)?;
        line.push('\n');
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .and_then(|mut f| f.write_all(line.as_bytes()).and_then(|_| f.sync_data()))
            .with_context(|| format!("cannot write {} (disk full?)", self.path.display()))
    }
}

/// What a run counts across steps besides the model, optimizer, sampler and
/// scheduler; checkpointed so a resumed run continues them.
#[derive(Debug, Clone)]
pub struct Counters {
    /// Mean training loss of the last applied step.
    pub last_loss: f64,
    /// Learning-rate factor from rollbacks.
    pub lr_scale: f64,
    /// Steps whose update was skipped.
    pub skipped: u64,
    pub spikes: SpikeDetector,
}

impl Counters {
    /// A run's counters before its first step.
    pub fn new(faults: &FaultsSection) -> Self {
        Self {
            last_loss: f64::NAN,
            lr_scale: 1.0,
            skipped: 0,
            spikes: SpikeDetector::new(faults.spike_factor, faults.spike_window),
        }
    }
}

/// What the loop does after a step, as the fault policy decides.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// The update was applied.
    Applied,
    /// The update was not applied (`on_nan = "skip"`): go on with the next batch.
    Skipped,
    /// Reload the newest checkpoint with a lower learning rate (`on_nan =
    /// "rollback"`); the text says what went wrong.
    RollBack(String),
}

/// The `[faults]` policies applied to each step's outcome, with the fault log.
/// A stop is an error ([`FaultPolicy::judge`]).
pub struct FaultPolicy {
    section: FaultsSection,
    log: FaultLog,
    /// Steps in a row whose update was not applied (NaN), rollbacks included.
    consecutive_bad: u64,
    /// Steps (1-based) whose loss is still to be replaced by NaN.
    injected: std::collections::BTreeSet<u64>,
    /// The run's folder, for the resume advice of a stop.
    run_dir: PathBuf,
}

/// What a fault record says of a step besides its kind and action: built only when
/// a fault is recorded (it gathers the sequences of every data-parallel peer, so
/// every peer builds it at the same points).
pub type DescribeStep<'a> = dyn Fn(&'static str, &'static str) -> Result<FaultRecord> + 'a;

impl FaultPolicy {
    /// `log`: enabled on data-parallel peer 0 only.
    pub fn new(section: &FaultsSection, run_dir: &Path, log: bool) -> Self {
        Self {
            section: section.clone(),
            log: match log {
                true => FaultLog::new(run_dir),
                false => FaultLog::disabled(run_dir),
            },
            consecutive_bad: 0,
            injected: section.inject_nan_steps.iter().copied().collect(),
            run_dir: run_dir.to_path_buf(),
        }
    }

    /// Step `step`'s (1-based) loss, NaN where `inject_nan_steps` says.
    pub fn loss(&mut self, step: u64, loss: f64) -> f64 {
        match self.injected.remove(&step) {
            true => f64::NAN,
            false => loss,
        }
    }

    /// The verdict on step `step` (1-based) with mean loss `loss`, whose optimizer
    /// update was applied or not; loss spikes and bad steps are logged (`describe`
    /// gives the record) and counted in `counters`. A bad step that the policy (or
    /// too many bad steps in a row) stops at is an error naming the resume command.
    pub fn judge(
        &mut self,
        (step, loss, grad_norm, applied): (u64, f64, f64, bool),
        counters: &mut Counters,
        describe: &DescribeStep<'_>,
    ) -> Result<Verdict> {
        let warn = self.log.enabled;
        if applied {
            self.consecutive_bad = 0;
            counters.last_loss = loss;
            if let Some(mean) = counters.spikes.observe(loss) {
                if warn {
                    eprintln!(
                        "warning: loss spike at step {step}: {loss:.4} against a mean of \
                         {mean:.4} over the last {} steps (batch in {})",
                        self.section.spike_window,
                        self.log.path().display()
                    );
                }
                self.log.write(&FaultRecord {
                    mean: Some(mean),
                    ..describe("spike", "logged")?
                })?;
            }
            return Ok(Verdict::Applied);
        }
        self.consecutive_bad += 1;
        let what = format!("step {step}: the loss is {loss} and the gradient norm {grad_norm}");
        let f = &self.section;
        if self.consecutive_bad > f.max_consecutive || f.on_nan == OnNan::Stop {
            self.log.write(&describe("nan", "stopped")?)?;
            anyhow::bail!(
                "{what}; stopping (faults.on_nan = \"{}\", {} bad step(s) in a row, \
                 faults.max_consecutive = {}). The batch is in {}. Resume from the last \
                 checkpoint with `mixlm train --resume {}` (--set faults.on_nan=\"rollback\" \
                 lowers the learning rate each time it goes back)",
                f.on_nan.name(),
                self.consecutive_bad,
                f.max_consecutive,
                self.log.path().display(),
                self.run_dir.display()
            );
        }
        if f.on_nan == OnNan::Rollback {
            return Ok(Verdict::RollBack(what));
        }
        counters.skipped += 1;
        self.log.write(&describe("nan", "skipped")?)?;
        if warn {
            eprintln!(
                "warning: {what}; update skipped ({} so far, details in {})",
                counters.skipped,
                self.log.path().display()
            );
        }
        Ok(Verdict::Skipped)
    }

    /// The learning-rate scale after one more rollback from `lr_scale`.
    pub fn backed_off(&self, lr_scale: f64) -> f64 {
        lr_scale * self.section.lr_backoff
    }

    /// Logs a rollback (after [`Verdict::RollBack`]`(what)`) to the checkpoint
    /// `dir` at step `to`, with the learning rate scaled by `lr_scale`.
    pub fn rolled_back(
        &self,
        what: &str,
        (dir, to, lr_scale): (&Path, u64, f64),
        describe: &DescribeStep<'_>,
    ) -> Result<()> {
        self.log.write(&FaultRecord {
            action: "rolled_back",
            rolled_back_to: Some(to),
            lr_scale: Some(lr_scale),
            ..describe("nan", "rolled_back")?
        })?;
        if self.log.enabled {
            eprintln!(
                "warning: {what}; rolled back to {} with the learning rate scaled by {lr_scale}",
                dir.display()
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spikes_are_measured_against_the_previous_window() {
        let mut d = SpikeDetector::new(2.0, 3);
        for l in [1.0, 1.2, 0.8] {
            assert_eq!(d.observe(l), None, "window not full yet");
        }
        assert_eq!(d.observe(1.9), None, "1.9 < 2 x mean 1.0");
        // Window now 1.2, 0.8, 1.9: mean 1.3, threshold 2.6.
        assert_eq!(d.observe(f64::NAN), None, "non-finite losses are not fed");
        let mean = d.observe(2.7).expect("2.7 > 2 x 1.3");
        assert!((mean - 1.3).abs() < 1e-12, "{mean}");
        let mut off = SpikeDetector::new(0.0, 3);
        assert!((0..10).all(|i| off.observe(10f64.powi(i)).is_none()));
    }

    #[test]
    fn ranges_are_checked() {
        let ok = FaultsSection::default();
        ok.validate().unwrap();
        let bad = |f: FaultsSection| f.validate().unwrap_err();
        assert!(bad(FaultsSection {
            lr_backoff: 0.0,
            ..ok.clone()
        })
        .contains("faults.lr_backoff = 0"));
        assert!(bad(FaultsSection {
            spike_factor: 0.5,
            ..ok.clone()
        })
        .contains("faults.spike_factor = 0.5"));
        assert!(bad(FaultsSection {
            max_consecutive: 0,
            ..ok
        })
        .contains("max_consecutive"));
    }
}
