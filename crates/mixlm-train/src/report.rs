//! What a run reports as it goes: `metrics.jsonl` and its TensorBoard view (peer 0
//! only), and the progress bar or log lines.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use mixlm_mixing::DomainLosses;

use crate::config::RunConfig;
use crate::metrics::{EvalRecord, MetricsWriter, StepRecord};
use crate::progress::Progress;
use crate::tensorboard::Board;

/// The run's metrics file and progress display.
pub struct Report {
    metrics: MetricsWriter,
    metrics_path: PathBuf,
    /// `None` unless `[run] tensorboard` and this is peer 0.
    board: Option<Board>,
    progress: Progress,
    /// Peer 0, which alone writes and shows anything.
    leader: bool,
    /// When the last step's record was written: the bookkeeping after it counts in
    /// the next step's `other` time.
    after_record: Instant,
}

impl Report {
    /// Opens `run_dir`'s metrics (peer 0 creates the folder and writes the run's
    /// `config.toml`): continued after step `resumed_at`, or started afresh.
    pub fn open(
        run_dir: &Path,
        config: &RunConfig,
        resumed_at: Option<u64>,
        leader: bool,
        quiet: bool,
    ) -> Result<Self> {
        let metrics_path = run_dir.join("metrics.jsonl");
        let metrics = if leader {
            std::fs::create_dir_all(run_dir)
                .with_context(|| format!("cannot create run folder {}", run_dir.display()))?;
            crate::checkpoint::write_atomic(
                &run_dir.join("config.toml"),
                toml::to_string_pretty(config)?.as_bytes(),
            )?;
            match resumed_at {
                Some(step) => MetricsWriter::resume(&metrics_path, step)?,
                None => MetricsWriter::create(&metrics_path)?,
            }
        } else {
            MetricsWriter::disabled(&metrics_path)
        };
        let run = &config.run;
        let board = (leader && run.tensorboard).then(|| match resumed_at {
            Some(_) => Board::resume(run_dir),
            None => Board::open(run_dir, &[]),
        });
        Ok(Self {
            metrics,
            metrics_path,
            board,
            progress: Progress::new(
                run.steps,
                quiet || !leader,
                if leader { run.log_every } else { 0 },
            ),
            leader,
            after_record: Instant::now(),
        })
    }

    /// The progress display starts at step `step` (its rate and ETA count from now).
    pub fn start_at(&mut self, step: u64) {
        self.progress.start_at(step);
        self.after_record = Instant::now();
    }

    /// Seconds since the last step's record.
    pub fn since_record(&self) -> f64 {
        self.after_record.elapsed().as_secs_f64()
    }

    /// A step's record, and the progress display.
    pub fn step(&mut self, record: &StepRecord) -> Result<()> {
        self.after_record = Instant::now();
        crate::chaos::pause_at("step");
        self.metrics.step(record)?;
        if let Some(board) = &mut self.board {
            board.record(&serde_json::to_value(record)?);
        }
        self.progress.update(record);
        Ok(())
    }

    /// A validation pass after `step` steps, with each domain's epochs of training
    /// data so far (empty before training).
    pub fn eval(
        &mut self,
        (step, tokens): (u64, u64),
        names: &[String],
        losses: &DomainLosses,
        epochs: &[Option<f64>],
    ) -> Result<()> {
        let mut record = EvalRecord::new(step, tokens, names, losses);
        if !epochs.is_empty() {
            record = record.with_epochs(names, epochs);
        }
        self.metrics.eval(&record)?;
        if let Some(board) = &mut self.board {
            board.record(&serde_json::to_value(&record)?);
        }
        Ok(())
    }

    /// The line a periodic evaluation shows.
    pub fn eval_line(&self, step: u64, names: &[String], losses: &DomainLosses) {
        self.progress.eval_line(step, names, losses);
    }

    /// Back to step `step` (a rollback): the records after it are removed.
    pub fn rewind(&mut self, step: u64) -> Result<()> {
        if self.leader {
            self.metrics = MetricsWriter::disabled(&self.metrics_path);
            self.metrics = MetricsWriter::resume(&self.metrics_path, step)?;
        }
        if self.board.is_some() {
            // The old writer is closed before its files are replaced.
            self.board = None;
            let run_dir = self.metrics_path.parent().unwrap_or(Path::new("."));
            self.board = Some(Board::resume(run_dir));
        }
        self.start_at(step);
        Ok(())
    }

    /// The run stopped before its end (a stop request).
    pub fn abandon(&self) {
        self.progress.abandon();
    }

    /// The run trained its last step.
    pub fn finish(&self) {
        self.progress.finish();
    }
}
