//! Progress display: an indicatif bar on a terminal (step, loss, tokens/s, current
//! proportions by domain, ETA); plain log lines every `log_every` steps otherwise.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use mixlm_mixing::DomainLosses;

use crate::metrics::StepRecord;

pub struct Progress {
    bar: ProgressBar,
    log_every: u64,
    /// Short names of the domains, in the order of `metrics.jsonl` (sorted).
    short: Vec<String>,
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
        Self {
            bar,
            log_every,
            short: Vec::new(),
        }
    }

    pub fn update(&mut self, r: &StepRecord) {
        if self.short.len() != r.proportions.len() {
            self.short = short_names(r.proportions.keys());
        }
        let p: Vec<String> = (self.short.iter().zip(r.proportions.values()))
            .map(|(n, p)| format!("{n} {p:.3}"))
            .collect();
        let msg = format!(
            "loss {:.4} | {:.0} tok/s | lr {:.2e} | p {}",
            r.loss,
            r.tokens_per_s,
            r.lr,
            p.join(" ")
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

/// Names short enough for a progress line: the prefix all names share is dropped
/// (`RedPajamaArXiv`, `RedPajamaBook`, ... -> `ArXiv`, `Book`, ...), then each is cut to
/// its shortest prefix of at least three characters that no other name starts with
/// (a single domain keeps its whole name).
pub fn short_names<'a>(names: impl IntoIterator<Item = &'a String>) -> Vec<String> {
    let names: Vec<Vec<char>> = names.into_iter().map(|n| n.chars().collect()).collect();
    let common = match names.as_slice() {
        [] | [_] => 0,
        [first, rest @ ..] => (0..first.len())
            .take_while(|&i| rest.iter().all(|n| n.get(i) == first.get(i)))
            .count(),
    };
    // Kept when a name is the shared prefix itself (`web`, `webtext`).
    let common = if names.iter().all(|n| n.len() > common) {
        common
    } else {
        0
    };
    let stems: Vec<&[char]> = names.iter().map(|n| &n[common..]).collect();
    if stems.len() == 1 {
        return vec![stems[0].iter().collect()];
    }
    stems
        .iter()
        .map(|stem| {
            let unique = |k: usize| {
                stems
                    .iter()
                    .filter(|other| other.len() >= k && other[..k] == stem[..k])
                    .count()
                    == 1
            };
            let k = (3.min(stem.len())..=stem.len())
                .find(|&k| unique(k))
                .unwrap_or(stem.len());
            stem[..k].iter().collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::short_names;

    fn short(names: &[&str]) -> Vec<String> {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        short_names(&names)
    }

    #[test]
    fn short_names_drop_the_shared_prefix_and_stay_unique() {
        let slimpajama = [
            "RedPajamaArXiv",
            "RedPajamaBook",
            "RedPajamaC4",
            "RedPajamaCommonCrawl",
            "RedPajamaGithub",
            "RedPajamaStackExchange",
            "RedPajamaWikipedia",
        ];
        assert_eq!(
            short(&slimpajama),
            ["ArX", "Boo", "C4", "Com", "Git", "Sta", "Wik"]
        );
        // Names that share a longer start keep going until they differ.
        assert_eq!(
            short(&["code", "common", "commoncrawl", "web"]),
            ["cod", "common", "commonc", "web"]
        );
        // One domain keeps its name; a name that is another's prefix is kept whole.
        assert_eq!(short(&["wikipedia"]), ["wikipedia"]);
        assert_eq!(short(&["web", "webtext"]), ["web", "webt"]);
    }
}
