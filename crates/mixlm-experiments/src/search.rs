//! `mixlm mix-search`: the mixing methods that need several training runs, run by one
//! command that ends with a mixture file for the final `mixlm train --mixing FILE`.
//!
//! - `grid`: train one run per candidate static mixture ([`grid_points`]: an even
//!   grid for two domains, Aioli's Dirichlet cover for more) and keep the one with the
//!   lowest mean final validation loss;
//! - `law`: the same sweep, then fit a data mixing law per domain
//!   ([`mixlm_mixing::law`]) and take the mixture minimising the mean predicted loss;
//! - `doremi`: a reference run on the stratified mixture, then DoReMi's proxy run
//!   against it; the mixture is the proxy's average domain weights;
//! - `doge`: DoGE's proxy run; the mixture is its average domain weights;
//! - `skill_it`: one short run per domain trained on that domain alone, from the same
//!   initial model; `graph[i][j]` is the relative validation-loss decrease of domain
//!   `j` after training on `i`, `(L_j(0) - L_j(T)) / L_j(0)` (as the Aioli
//!   repository's `mixing_law_fitting.py skills_graph`). The file holds a Skill-It
//!   `[mixing]` section with that graph as measured, negative entries included (the
//!   scheduler counts them as 0: [`mixlm_mixing::skillit::effective_graph`]); Skill-It
//!   is an online method.
//!
//! The method's own parameters come from the config's `[mixing]` section when it
//! names the same method (`method = "doremi"` with `eta`, ...; its `reference` or
//! `graph` is filled in by the search), else the method's defaults.
//!
//! Every run is a normal run (`<out_dir>/<name>-<role>/`); the search writes
//! `<out_dir>/<name>-search/search.json` (every run, its losses, the fits) and
//! `learned_mixture.toml`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use mixlm_mixing::grid::grid_points;
use mixlm_mixing::law::{fit_group, minimise_mean_loss};
use mixlm_mixing::{
    DoReMiConfig, DogeConfig, ManualConfig, MixingConfig, NoParams, Proportions, SkillItConfig,
};
use serde::Serialize;

use mixlm_train::checkpoint::write_atomic;
use mixlm_train::config::RunConfig;
use mixlm_train::trainer::TrainOutcome;

/// Which method to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SearchMethod {
    Grid,
    Law,
    DoReMi,
    Doge,
    SkillIt,
}

impl SearchMethod {
    pub fn name(self) -> &'static str {
        match self {
            Self::Grid => "grid",
            Self::Law => "law",
            Self::DoReMi => "doremi",
            Self::Doge => "doge",
            Self::SkillIt => "skill_it",
        }
    }
}

impl std::str::FromStr for SearchMethod {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        [
            Self::Grid,
            Self::Law,
            Self::DoReMi,
            Self::Doge,
            Self::SkillIt,
        ]
        .into_iter()
        .find(|m| m.name() == s)
        .ok_or_else(|| {
            format!("unknown search method `{s}`: use grid, law, doremi, doge or skill_it")
        })
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct SearchOptions {
    pub method: SearchMethod,
    /// Number of static mixtures trained (grid, law).
    pub points: usize,
    /// Dirichlet concentration of the cover (K > 2).
    pub alpha: f64,
    /// Steps of the auxiliary runs (DoReMi's reference and proxy, DoGE's proxy,
    /// Skill-It's single-domain runs, the sweep's points: shorter runs are the Aioli
    /// paper's restricted setting); `None`: the config's `run.steps`.
    pub pilot_steps: Option<u64>,
}

impl SearchOptions {
    pub fn new(method: SearchMethod) -> Self {
        Self {
            method,
            points: 9,
            alpha: 1.0,
            pilot_steps: None,
        }
    }
}

/// One training run of the search.
#[derive(Debug, Clone, Serialize)]
pub struct SearchPoint {
    /// `pointNN`, `reference`, `proxy` or `skill-<domain>`.
    pub role: String,
    pub run: PathBuf,
    /// The sampling mixture it trained on.
    pub weights: BTreeMap<String, f64>,
    /// Validation loss per domain before training.
    pub initial_val_loss: BTreeMap<String, f64>,
    /// Final validation loss per domain.
    pub val_loss: BTreeMap<String, f64>,
    pub mean_val_loss: f64,
    /// The mixture the run learned (proxy runs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub learned: Option<BTreeMap<String, f64>>,
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
    /// The static mixture found (all methods but Skill-It).
    pub chosen: Option<BTreeMap<String, f64>>,
    /// Skill-It's graph, `graph[trained][evaluated]`.
    pub graph: Option<BTreeMap<String, BTreeMap<String, f64>>>,
    /// Mean validation loss the law predicts for `chosen` (law search only).
    pub predicted_mean_val_loss: Option<f64>,
    /// The `[mixing]` section written to `learned_mixture.toml`.
    pub mixing: MixingConfig,
    pub dir: PathBuf,
}

/// Runs the method's training runs with `train` (one call per run) and writes the
/// result.
pub fn mix_search(
    config: &RunConfig,
    options: &SearchOptions,
    train: impl FnMut(&RunConfig) -> Result<TrainOutcome>,
) -> Result<SearchOutcome> {
    let names = config.open_source()?.domain_names();
    let dir = PathBuf::from(&config.run.out_dir).join(format!("{}-search", config.run.name));
    let _lock = mixlm_data::FolderLock::acquire(&dir, "mixlm mix-search")?;
    let mut search = Search {
        config,
        names: &names,
        train,
        points: Vec::new(),
        save_final: false,
    };
    let found = match options.method {
        SearchMethod::Grid | SearchMethod::Law => search.sweep(options)?,
        SearchMethod::DoReMi => search.doremi(options)?,
        SearchMethod::Doge => search.doge(options)?,
        SearchMethod::SkillIt => search.skill_it(options)?,
    };
    let mixing = match &found.graph {
        Some(graph) => skill_it_mixing(config, graph.clone()),
        None => {
            let chosen = found.chosen.clone().expect("a static mixture");
            let p: Vec<f64> = names.iter().map(|n| chosen[n]).collect();
            Proportions::from_weights(p).context("the chosen mixture is not valid")?;
            MixingConfig::Manual(ManualConfig { weights: chosen })
        }
    };
    let outcome = SearchOutcome {
        method: options.method.name().into(),
        points: search.points,
        laws: found.laws,
        chosen: found.chosen,
        graph: found.graph,
        predicted_mean_val_loss: found.predicted,
        mixing,
        dir: dir.clone(),
    };
    write_atomic(
        &dir.join("search.json"),
        serde_json::to_string_pretty(&outcome)?.as_bytes(),
    )?;
    write_atomic(
        &dir.join("learned_mixture.toml"),
        mixlm_train::config::mixing_toml(&outcome.mixing)?.as_bytes(),
    )?;
    Ok(outcome)
}

/// Skill-It's section with a learned graph: the config's own `skill_it` parameters,
/// else the Aioli SlimPajama settings' values (`scripts/*/skillit/run.sh` of the Aioli
/// repository: `--eta 0.2`, `--update_steps 500` of 5,000 steps, i.e.
/// `update_steps = run.steps / 10`, `--skillit_window 3`). `eta = 0.2` is also the
/// Skill-It authors' value for Natural Instructions (`scripts/ni/pt/skillit.sh`).
fn skill_it_mixing(
    config: &RunConfig,
    graph: BTreeMap<String, BTreeMap<String, f64>>,
) -> MixingConfig {
    let mut c = match &config.mixing {
        MixingConfig::SkillIt(c) => c.clone(),
        _ => SkillItConfig {
            eta: 0.2,
            update_steps: (config.run.steps / 10).max(1),
            window: 3,
            graph: BTreeMap::new(),
        },
    };
    c.graph = graph;
    MixingConfig::SkillIt(c)
}

/// What a method found, before it is written.
struct Found {
    chosen: Option<BTreeMap<String, f64>>,
    graph: Option<BTreeMap<String, BTreeMap<String, f64>>>,
    laws: Vec<FittedLaw>,
    predicted: Option<f64>,
}

impl Found {
    fn mixture(chosen: BTreeMap<String, f64>) -> Self {
        Self {
            chosen: Some(chosen),
            graph: None,
            laws: Vec::new(),
            predicted: None,
        }
    }
}

struct Search<'a, F> {
    config: &'a RunConfig,
    names: &'a [String],
    train: F,
    points: Vec<SearchPoint>,
    /// Force a final checkpoint (a run another run loads).
    save_final: bool,
}

impl<F: FnMut(&RunConfig) -> Result<TrainOutcome>> Search<'_, F> {
    fn by_name(&self, v: &[f64]) -> BTreeMap<String, f64> {
        self.names.iter().cloned().zip(v.iter().copied()).collect()
    }

    /// Trains `<name>-<role>` with `mixing` (and `steps` if given) and records it.
    fn run(&mut self, role: &str, mixing: MixingConfig, steps: Option<u64>) -> Result<SearchPoint> {
        let mut run = self.config.clone();
        run.run.name = format!("{}-{role}", self.config.run.name);
        run.run.steps = steps.unwrap_or(run.run.steps);
        run.mixing = mixing;
        run.checkpoint.save_final |= self.save_final;
        eprintln!(
            "mix-search: run {} ({})",
            run.run.name,
            run.mixing.method_name()
        );
        let outcome = (self.train)(&run).with_context(|| format!("training run {role}"))?;
        let ln = |x: Option<f64>| x.map_or(f64::NAN, f64::ln);
        let initial: Vec<f64> = outcome.rows.iter().map(|r| ln(r.initial_ppl)).collect();
        let losses: Vec<f64> = outcome.rows.iter().map(|r| ln(Some(r.ppl))).collect();
        let k = self.names.len();
        let weights = match &run.mixing {
            MixingConfig::Manual(m) => m.weights.clone(),
            _ => self.by_name(&vec![1.0 / k as f64; k]),
        };
        let point = SearchPoint {
            role: role.into(),
            run: outcome.run_dir,
            weights,
            initial_val_loss: self.by_name(&initial),
            val_loss: self.by_name(&losses),
            mean_val_loss: losses.iter().sum::<f64>() / k as f64,
            learned: outcome.learned.map(|p| self.by_name(p.as_slice())),
        };
        self.points.push(point.clone());
        Ok(point)
    }

    fn sweep(&mut self, options: &SearchOptions) -> Result<Found> {
        let k = self.names.len();
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
        let grid = grid_points(k, options.points, options.alpha, self.config.run.seed);
        for (i, p) in grid.iter().enumerate() {
            let weights = self.by_name(p.as_slice());
            self.run(
                &format!("point{i:02}"),
                MixingConfig::Manual(ManualConfig { weights }),
                options.pilot_steps,
            )?;
        }
        if options.method == SearchMethod::Grid {
            let best = self
                .points
                .iter()
                .min_by(|a, b| a.mean_val_loss.total_cmp(&b.mean_val_loss))
                .expect("at least 2 points");
            return Ok(Found::mixture(best.weights.clone()));
        }
        let mixtures: Vec<Vec<f64>> = self
            .points
            .iter()
            .map(|p| self.names.iter().map(|n| p.weights[n]).collect())
            .collect();
        let mut laws = Vec::new();
        let mut fitted = Vec::new();
        for name in self.names {
            let losses: Vec<f64> = self.points.iter().map(|p| p.val_loss[name]).collect();
            let (law, rms) = fit_group(&mixtures, &losses);
            laws.push(FittedLaw {
                domain: name.clone(),
                a: law.a,
                b: law.b,
                m: self.by_name(&law.m),
                rms_residual: rms,
            });
            fitted.push(law);
        }
        let p = minimise_mean_loss(&fitted);
        let predicted = fitted.iter().map(|l| l.predict(&p)).sum::<f64>() / k as f64;
        Ok(Found {
            chosen: Some(self.by_name(&p)),
            graph: None,
            laws,
            predicted: Some(predicted),
        })
    }

    /// A proxy run's learned mixture, or an error saying why there is none.
    fn learned(point: &SearchPoint) -> Result<Found> {
        let learned = point.learned.clone().with_context(|| {
            format!(
                "the proxy run {} learned no mixture (no steps?)",
                point.run.display()
            )
        })?;
        Ok(Found::mixture(learned))
    }

    fn doremi(&mut self, options: &SearchOptions) -> Result<Found> {
        let steps = options.pilot_steps;
        // The proxy loads the reference's final checkpoint.
        self.save_final = true;
        let reference = self.run("reference", MixingConfig::Stratified(NoParams {}), steps);
        self.save_final = false;
        let reference_dir = reference?.run.clone();
        let mut c = match &self.config.mixing {
            MixingConfig::Doremi(c) => c.clone(),
            _ => DoReMiConfig::new(PathBuf::new()),
        };
        c.reference = reference_dir;
        let proxy = self.run("proxy", MixingConfig::Doremi(c), steps)?;
        Self::learned(&proxy)
    }

    fn doge(&mut self, options: &SearchOptions) -> Result<Found> {
        let c = match &self.config.mixing {
            MixingConfig::Doge(c) => c.clone(),
            _ => DogeConfig::default(),
        };
        let proxy = self.run("proxy", MixingConfig::Doge(c), options.pilot_steps)?;
        Self::learned(&proxy)
    }

    fn skill_it(&mut self, options: &SearchOptions) -> Result<Found> {
        let mut graph = BTreeMap::new();
        for trained in self.names {
            let weights = self
                .names
                .iter()
                .map(|n| (n.clone(), if n == trained { 1.0 } else { 0.0 }))
                .collect();
            let point = self.run(
                &format!("skill-{trained}"),
                MixingConfig::Manual(ManualConfig { weights }),
                options.pilot_steps,
            )?;
            let row: BTreeMap<String, f64> = self
                .names
                .iter()
                .map(|j| {
                    let (l0, l) = (point.initial_val_loss[j], point.val_loss[j]);
                    (j.clone(), (l0 - l) / l0)
                })
                .collect();
            if let Some((j, v)) = row.iter().find(|(_, v)| !v.is_finite()) {
                anyhow::bail!(
                    "Skill-It graph entry {trained} -> {j} is {v}: domain {j} has no \
                     validation loss (no validation data?)"
                );
            }
            graph.insert(trained.clone(), row);
        }
        Ok(Found {
            chosen: None,
            graph: Some(graph),
            laws: Vec::new(),
            predicted: None,
        })
    }
}
