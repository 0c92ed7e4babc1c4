//! `runs/<name>/metrics.jsonl`: one JSON object per line, one line per optimizer
//! step (`"kind": "train"`) and per evaluation (`"kind": "eval"`), so a run's
//! losses and proportion trajectories can be plotted or compared with any tool.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use mixlm_mixing::DomainLosses;
use serde::Serialize;

/// Pairs each domain name with its value, for readable JSON.
pub fn by_name<T: Clone>(names: &[String], values: &[T]) -> BTreeMap<String, T> {
    names.iter().cloned().zip(values.iter().cloned()).collect()
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
    out: BufWriter<File>,
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
            out: BufWriter::new(file),
        })
    }

    fn write<T: Serialize>(&mut self, record: &T) -> Result<()> {
        serde_json::to_writer(&mut self.out, record)?;
        self.out
            .write_all(b"\n")
            .and_then(|_| self.out.flush())
            .with_context(|| format!("cannot write to {} (disk full?)", self.path.display()))
    }

    pub fn step(&mut self, record: &StepRecord) -> Result<()> {
        self.write(record)
    }

    pub fn eval(&mut self, record: &EvalRecord) -> Result<()> {
        self.write(record)
    }
}
