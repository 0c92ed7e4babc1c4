//! Progress display: an indicatif bar on a terminal (step, loss, tokens/s, current
//! proportions, ETA); plain log lines every `log_every` steps otherwise.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use mixlm_mixing::{DomainLosses, Proportions};

use crate::metrics::StepRecord;

pub struct Progress {
    bar: ProgressBar,
    log_every: u64,
}

impl Progress {
    pub fn new(steps: u64, quiet: bool, log_every: u64) -> Self {
        let bar = if quiet {
            ProgressBar::with_draw_target(Some(steps), ProgressDrawTarget::hidden())
        } else {
            ProgressBar::new(steps)
        };
        bar.set_style(
            ProgressStyle::with_template("{spinner} step {pos}/{len} [{bar:30}] {msg} ETA {eta}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        Self { bar, log_every }
    }

    pub fn update(&mut self, r: &StepRecord, p: &Proportions) {
        let msg = format!(
            "loss {:.4} | {:.0} tok/s | lr {:.2e} | p {}",
            r.loss, r.tokens_per_s, r.lr, p
        );
        self.bar.set_position(r.step);
        if self.log_every > 0 && r.step.is_multiple_of(self.log_every) && self.bar.is_hidden() {
            eprintln!("step {}/{} {msg}", r.step, self.bar.length().unwrap_or(0));
        }
        self.bar.set_message(msg);
    }

    pub fn eval_line(&self, step: u64, names: &[String], val: &DomainLosses) {
        let parts: Vec<String> = names
            .iter()
            .zip(&val.0)
            .map(|(n, l)| format!("{n} {:.3}", l.map_or(f64::NAN, f64::exp)))
            .collect();
        let line = format!("eval @ step {step}: val ppl {}", parts.join(", "));
        if self.bar.is_hidden() {
            if self.log_every > 0 {
                eprintln!("{line}");
            }
        } else {
            self.bar.println(line);
        }
    }

    /// A resumed run: the bar starts at the checkpoint's step, and its rate and ETA
    /// count only the steps of this process.
    pub fn start_at(&mut self, step: u64) {
        self.bar.set_position(step);
        self.bar.reset_eta();
    }

    /// Stops drawing without marking the run finished (it was interrupted).
    pub fn abandon(&self) {
        self.bar.abandon();
    }

    pub fn finish(&self) {
        self.bar.finish();
    }
}
