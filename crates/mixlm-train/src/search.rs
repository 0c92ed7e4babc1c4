//! `mixlm mix-search`: the offline baselines that need several training runs.
//!
//! - `grid`: train one run per candidate static mixture ([`grid_points`]: an even
//!   grid for two domains, Aioli's Dirichlet cover for more) and keep the one with the
//!   lowest mean final validation loss;
//! - `law`: the same sweep, then fit a data mixing law per domain
//!   ([`mixlm_mixing::law`]) and take the mixture minimising the mean predicted loss.
//!
//! Every run is a normal run (`<out_dir>/<name>-pointNN/`); the search writes
//! `<out_dir>/<name>-search/search.json` (every point, its losses, the fits) and
//! `learned_mixture.toml`, which `mixlm train --mixing FILE` reads.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use mixlm_mixing::grid::grid_points;
use mixlm_mixing::law::{fit_group, minimise_mean_loss};
use mixlm_mixing::{ManualConfig, MixingConfig, Proportions};
use serde::Serialize;

use crate::checkpoint::write_atomic;
use crate::config::RunConfig;
use crate::trainer::{learned_mixture_toml, TrainOutcome};

/// Which offline baseline to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SearchMethod {
    Grid,
    Law,
}

impl std::str::FromStr for SearchMethod {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "grid" => Ok(Self::Grid),
            "law" => Ok(Self::Law),
            other => Err(format!("unknown search method `{other}`: use grid or law")),
        }
    }
}

/// What to sweep.
#[derive(Debug, Clone)]
pub struct SearchOptions {
    pub method: SearchMethod,
    /// Number of static mixtures trained.
    pub points: usize,
    /// Dirichlet concentration of the cover (K > 2).
    pub alpha: f64,
}

/// One trained point of the sweep.
#[derive(Debug, Clone, Serialize)]
pub struct SearchPoint {
    pub run: PathBuf,
    pub weights: BTreeMap<String, f64>,
    /// Final validation loss per domain.
    pub val_loss: BTreeMap<String, f64>,
    pub mean_val_loss: f64,
}

/// A fitted law of one domain, `b + a exp(m . p)`.
#[derive(Debug, Clone, Serialize)]
pub struct FittedLaw {
    pub domain: String,
    pub a: f64,
    pub b: f64,
    pub m: BTreeMap<String, f64>,
    pub rms_residual: f64,
}

/// What a search found.
#[derive(Debug, Clone, Serialize)]
pub struct SearchOutcome {
    pub method: String,
    pub points: Vec<SearchPoint>,
    pub laws: Vec<FittedLaw>,
    pub chosen: BTreeMap<String, f64>,
    /// Mean validation loss the law predicts for `chosen` (law search only).
    pub predicted_mean_val_loss: Option<f64>,
    pub dir: PathBuf,
}

/// Runs the sweep with `train` (one call per point) and writes the result.
pub fn mix_search(
    config: &RunConfig,
    options: &SearchOptions,
    mut train: impl FnMut(&RunConfig) -> Result<TrainOutcome>,
) -> Result<SearchOutcome> {
    let names = config.open_source()?.domain_names();
    let k = names.len();
    if options.points < 2 {
        anyhow::bail!("mix-search needs at least 2 points (--points)");
    }
    if options.method == SearchMethod::Law && options.points < k + 2 {
        anyhow::bail!(
            "a mixing-law fit has {} parameters per domain: give --points >= {} (K + 2)",
            k + 2,
            k + 2
        );
    }
    let by_name = |v: &[f64]| -> BTreeMap<String, f64> {
        names.iter().cloned().zip(v.iter().copied()).collect()
    };
    let mut points = Vec::new();
    for (i, p) in grid_points(k, options.points, options.alpha, config.run.seed)
        .iter()
        .enumerate()
    {
        let mut run = config.clone();
        run.run.name = format!("{}-point{i:02}", config.run.name);
        run.mixing = MixingConfig::Manual(ManualConfig {
            weights: by_name(p.as_slice()),
        });
        eprintln!(
            "mix-search: point {}/{} {:?}",
            i + 1,
            options.points,
            p.as_slice()
        );
        let outcome = train(&run).with_context(|| format!("training point {i}"))?;
        let losses: Vec<f64> = outcome.rows.iter().map(|r| r.ppl.ln()).collect();
        points.push(SearchPoint {
            run: outcome.run_dir,
            weights: by_name(p.as_slice()),
            val_loss: by_name(&losses),
            mean_val_loss: losses.iter().sum::<f64>() / k as f64,
        });
    }
    let mut laws = Vec::new();
    let (chosen, predicted) = match options.method {
        SearchMethod::Grid => {
            let best = points
                .iter()
                .min_by(|a, b| a.mean_val_loss.total_cmp(&b.mean_val_loss))
                .expect("at least 2 points");
            (best.weights.clone(), None)
        }
        SearchMethod::Law => {
            let mixtures: Vec<Vec<f64>> = points
                .iter()
                .map(|p| names.iter().map(|n| p.weights[n]).collect())
                .collect();
            let mut fitted = Vec::new();
            for name in &names {
                let losses: Vec<f64> = points.iter().map(|p| p.val_loss[name]).collect();
                let (law, rms) = fit_group(&mixtures, &losses);
                laws.push(FittedLaw {
                    domain: name.clone(),
                    a: law.a,
                    b: law.b,
                    m: by_name(&law.m),
                    rms_residual: rms,
                });
                fitted.push(law);
            }
            let p = minimise_mean_loss(&fitted);
            let predicted = fitted.iter().map(|l| l.predict(&p)).sum::<f64>() / k as f64;
            (by_name(&p), Some(predicted))
        }
    };
    let dir = PathBuf::from(&config.run.out_dir).join(format!("{}-search", config.run.name));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let outcome = SearchOutcome {
        method: format!("{:?}", options.method).to_lowercase(),
        points,
        laws,
        chosen,
        predicted_mean_val_loss: predicted,
        dir: dir.clone(),
    };
    write_atomic(
        &dir.join("search.json"),
        serde_json::to_string_pretty(&outcome)?.as_bytes(),
    )?;
    let chosen: Vec<f64> = names.iter().map(|n| outcome.chosen[n]).collect();
    let chosen = Proportions::from_weights(chosen).context("the chosen mixture is not valid")?;
    write_atomic(
        &dir.join("learned_mixture.toml"),
        learned_mixture_toml(&names, &chosen).as_bytes(),
    )?;
    Ok(outcome)
}
