//! `mixlm compare`: train every mixing method of a comparison on the same data,
//! evaluate each, and write a report a researcher can put in a paper.
//!
//! A comparison file names a base run config, seeds, and the methods (a `[mixing]`
//! section each; methods with extra runs name a `search` pipeline of `mixlm
//! mix-search`). Runs go one after the other on one device, as
//! `<out_dir>/<method>-s<seed>/`. A method with `then` (an Aioli section) is the
//! paper's "Aioli + X": X's search (or static mixture) gives a mixture, and the final
//! run is Aioli starting from it (`init_proportions`, `init_steps`; see
//! [`MethodEntry::then`]). A run whose `result.json` exists is not trained
//! again, and an interrupted run (a search's runs included) continues from its last
//! checkpoint ([`crate::continuation::train_or_continue`]), so rerunning an interrupted
//! comparison loses at most the steps since that checkpoint. `<out_dir>/compare/results.json` holds
//! everything the report is made of, so `--report-only` rewrites `report.md`
//! without training.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use mixlm_data::Split;
use mixlm_eval::perplexity::PerplexityOptions;
use mixlm_mixing::{InitWeights, MixingConfig};
use serde::{Deserialize, Serialize};

use crate::continuation::train_or_continue;
use crate::figures::Figure;
use crate::samplemix::{make_plan, model_free_plan, PlanOptions};
use crate::search::{mix_search, SearchMethod, SearchOptions};
use mixlm_inspect::evaluate::{default_max_tokens, evaluate_on, EvalOptions, EvalReport};
use mixlm_train::backend::BackendKind;
use mixlm_train::checkpoint::{latest_checkpoint, write_atomic};
use mixlm_train::config::RunConfig;
use mixlm_train::metrics::{Curves, RunLog, StepTimes};
use mixlm_train::trainer::TrainOptions;

/// The comparison file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompareConfig {
    /// Base run config, relative to the comparison file; the embedded demo config
    /// when absent.
    pub base: Option<PathBuf>,
    /// `section.key=value` overrides applied to the base for every run.
    #[serde(default)]
    pub set: Vec<String>,
    /// Where the runs and `compare/` go.
    pub out_dir: PathBuf,
    #[serde(default = "default_seeds")]
    pub seeds: Vec<u64>,
    /// Evaluation: tokens per domain and split (all of prepared data when absent;
    /// `eval.sequences` windows of the synthetic corpus).
    pub max_tokens: Option<u64>,
    #[serde(rename = "method")]
    pub methods: Vec<MethodEntry>,
}

fn default_seeds() -> Vec<u64> {
    vec![0]
}

/// One method of the comparison.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MethodEntry {
    /// Label in the report and run names (letters, digits, `-`, `_`).
    pub name: String,
    /// The `[mixing]` section of the final run (for searches: the searched method's
    /// parameters; the search writes the final section). With `then`, the static
    /// mixture X whose proportions Aioli starts from.
    pub mixing: Option<MixingConfig>,
    /// A `mixlm mix-search` pipeline that runs first (`doremi`, `doge`, `skill_it`,
    /// `grid`, `law`), whose mixture trains the final run; or `samplemix`: score the
    /// prepared corpus and plan the run's token budget.
    pub search: Option<String>,
    /// Steps of the search's auxiliary runs (default: the run's steps).
    pub pilot_steps: Option<u64>,
    /// Points of a `grid` / `law` search.
    pub points: Option<usize>,
    /// `search = "samplemix"`: weight of diversity against quality (default 0.8).
    pub alpha: Option<f64>,
    /// `search = "samplemix"`: k-means clusters (default 64).
    pub clusters: Option<usize>,
    /// "Aioli + X": the final run's `[mixing]` section, `method = "aioli"`, trained
    /// after X (the `search`, or a static `mixing`: stratified, natural, manual) with
    /// `init_proportions` set to X's learned mixture (`learned_mixture.toml`'s
    /// weights; for Skill-It its graph's mixture `p_i ∝ exp(eta sum_j graph[i][j])`),
    /// so its first `init_steps` steps train on X's mixture. `init_proportions` is
    /// filled in and must be absent; `init_steps = 0` needs `start_from_init = true`.
    pub then: Option<MixingConfig>,
    /// `search = "samplemix"`: a folder already scored by `mixlm score quality` and
    /// `mixlm score diversity` (with any scorer) to plan from; default: the model-free
    /// scorers, into `<data>/samplemix-model-free/` (scored once per corpus).
    pub scores: Option<PathBuf>,
}

/// One finished run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunResult {
    pub method: String,
    pub seed: u64,
    pub run_dir: PathBuf,
    pub steps: u64,
    /// Training steps spent outside the final run (a search's runs).
    pub extra_steps: u64,
    pub tokens_per_second: f64,
    /// Training wall-clock of the final run.
    pub wall_s: f64,
    /// The final run's step time by part, summed over its steps (zero in results
    /// written before it existed).
    #[serde(default)]
    pub step_time: StepTimes,
    pub eval: EvalReport,
    /// Validation loss and proportion trajectories of the final run, for the figures
    /// (read from its `metrics.jsonl`; absent in results written before they existed).
    #[serde(default, skip_serializing_if = "Curves::is_empty")]
    pub curves: Curves,
}

/// Everything the report is made of.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompareResults {
    pub methods: Vec<String>,
    pub results: Vec<RunResult>,
}

impl CompareConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read comparison {}", path.display()))?;
        let mut c: CompareConfig = toml::from_str(&text).map_err(|e| {
            anyhow::anyhow!("{}: {}", path.display(), e.to_string().replace('\n', " "))
        })?;
        // Paths in the file resolve against its folder, as in a run config: the base
        // config, input paths in `set`, a method's reference model, plan or scores.
        let dir = std::path::absolute(path.parent().unwrap_or(Path::new(""))).unwrap_or_default();
        c.base = c.base.map(|b| dir.join(b));
        for spec in &mut c.set {
            *spec = mixlm_train::config::resolve_override(spec, &dir);
        }
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() && !p.as_os_str().is_empty() {
                *p = dir.join(&*p);
            }
        };
        for m in &mut c.methods {
            for mixing in [m.mixing.as_mut(), m.then.as_mut()].into_iter().flatten() {
                match mixing {
                    MixingConfig::Doremi(d) => resolve(&mut d.reference),
                    MixingConfig::SampleMix(p) => resolve(&mut p.plan),
                    _ => {}
                }
            }
            if let Some(scores) = m.scores.as_mut() {
                resolve(scores);
            }
        }
        c.validate()
            .with_context(|| format!("in {}", path.display()))?;
        Ok(c)
    }

    fn validate(&self) -> Result<()> {
        if self.methods.is_empty() || self.seeds.is_empty() {
            anyhow::bail!("a comparison needs at least one [[method]] and one seed");
        }
        let mut seen = std::collections::BTreeSet::new();
        for m in &self.methods {
            if m.name.is_empty()
                || !m
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                anyhow::bail!("method name `{}`: use letters, digits, - and _", m.name);
            }
            if !seen.insert(&m.name) {
                anyhow::bail!("method name `{}` appears twice", m.name);
            }
            match (&m.mixing, &m.search) {
                (None, None) => {
                    anyhow::bail!("method `{}` needs a [method.mixing] or a search", m.name)
                }
                (_, Some(s)) if s == "samplemix" && m.scores.is_some() && m.clusters.is_some() => {
                    anyhow::bail!(
                        "method `{}`: clusters applies to the model-free scoring, not to given \
                         scores; drop one",
                        m.name
                    );
                }
                (_, Some(s)) if s == "samplemix" => {}
                (_, Some(s)) => {
                    s.parse::<SearchMethod>()
                        .map_err(|e| anyhow::anyhow!("method `{}`: {e}", m.name))?;
                }
                _ => {}
            }
            if let Some(then) = &m.then {
                check_then(m, then)?;
            }
            let samplemix_only = [
                ("alpha", m.alpha.is_some()),
                ("clusters", m.clusters.is_some()),
                ("scores", m.scores.is_some()),
            ];
            if m.search.as_deref() != Some("samplemix") {
                if let Some((key, _)) = samplemix_only.iter().find(|(_, set)| *set) {
                    anyhow::bail!(
                        "method `{}`: {key} applies only to search = \"samplemix\"",
                        m.name
                    );
                }
            }
        }
        Ok(())
    }

    /// The run config of `method` with `seed` (before any search; with `then`, X's).
    pub fn run_config(&self, method: &MethodEntry, seed: u64) -> Result<RunConfig> {
        let mut overrides = self.set.clone();
        overrides.push(format!("run.seed={seed}"));
        overrides.push(format!(
            "run.out_dir={}",
            toml::Value::String(self.out_dir.display().to_string())
        ));
        overrides.push(format!(
            "run.name={}",
            toml::Value::String(format!("{}-s{seed}", method.name))
        ));
        overrides.push("checkpoint.save_final=true".into());
        let mut config = match &self.base {
            Some(path) => RunConfig::load(path, &overrides)?,
            None => RunConfig::embedded(&overrides)?,
        };
        if let Some(m) = &method.mixing {
            config.mixing = m.clone();
        }
        if let Some(MixingConfig::Aioli(a)) = &method.then {
            if a.init_steps >= config.run.steps {
                anyhow::bail!(
                    "method `{}`: then.init_steps = {} leaves no step for Aioli: the run has \
                     run.steps = {}",
                    method.name,
                    a.init_steps,
                    config.run.steps
                );
            }
        }
        Ok(config)
    }
}

/// The checks of a `then` section that need no data (see [`MethodEntry::then`]).
fn check_then(m: &MethodEntry, then: &MixingConfig) -> Result<()> {
    let name = &m.name;
    let MixingConfig::Aioli(a) = then else {
        anyhow::bail!(
            "method `{name}`: then.method = \"{}\": only \"aioli\" continues another \
             method's mixture (the paper's Aioli + X)",
            then.method_name()
        );
    };
    if a.init_proportions != InitWeights::Stratified {
        anyhow::bail!(
            "method `{name}`: then.init_proportions is filled in with X's learned mixture; \
             drop it"
        );
    }
    if a.init_steps == 0 && !a.start_from_init {
        anyhow::bail!(
            "method `{name}`: then.init_steps = 0 without then.start_from_init = true never \
             uses X's learned mixture; give then.init_steps (steps on X's mixture before \
             Aioli's first round) or then.start_from_init = true"
        );
    }
    match (m.search.as_deref(), &m.mixing) {
        (Some("samplemix"), _) => anyhow::bail!(
            "method `{name}`: then cannot follow search = \"samplemix\" (a per-document \
             plan, not a mixture)"
        ),
        (Some(_), _) => Ok(()),
        (
            None,
            Some(MixingConfig::Stratified(_) | MixingConfig::Natural(_) | MixingConfig::Manual(_)),
        )
        | (None, None) => Ok(()),
        (None, Some(x)) => anyhow::bail!(
            "method `{name}`: then needs X's learned mixture: a search, or a static \
             [method.mixing] (stratified, natural, manual), not mixing.method = \"{}\"",
            x.method_name()
        ),
    }
}

/// X's mixture as Aioli's `init_proportions`: the static mixture `run` trains on
/// (after a search: its `learned_mixture.toml`); Skill-It's graph gives the mixture
/// its scheduler starts from ([`mixlm_mixing::SkillItConfig::start_weights`]; the
/// Aioli repository's
/// `aioli_trainer.py` with `--graph_path`: `exp(skillit_eta * graph . 1)`).
fn learned_init(run: &RunConfig) -> Result<InitWeights> {
    Ok(match &run.mixing {
        MixingConfig::Stratified(_) => InitWeights::Stratified,
        MixingConfig::Natural(_) => InitWeights::Natural,
        MixingConfig::Manual(m) => InitWeights::Weights(m.weights.clone()),
        MixingConfig::SkillIt(c) => {
            let names: Vec<String> = c.graph.keys().cloned().collect();
            let p = c.start_weights(&names);
            InitWeights::Weights(names.into_iter().zip(p).collect())
        }
        other => anyhow::bail!(
            "mixing.method = \"{}\" has no static mixture for Aioli to start from",
            other.method_name()
        ),
    })
}

/// Before anything trains: every `then` section is a valid Aioli section for the
/// data's domains.
fn check_then_sections(config: &CompareConfig) -> Result<()> {
    let mut names = None;
    for m in &config.methods {
        if let Some(then) = &m.then {
            let run = config.run_config(m, config.seeds[0])?;
            if names.is_none() {
                names = Some(run.open_source()?.domain_names());
            }
            then.validate(names.as_deref().unwrap_or_default())
                .map_err(|e| {
                    anyhow::anyhow!(
                        "method `{}`: then: {}",
                        m.name,
                        e.to_string().replacen("mixing.", "then.", 1)
                    )
                })?;
        }
    }
    Ok(())
}

/// Runs what is not done yet, evaluates, and writes `results.json` and `report.md`.
/// `options` gives `quiet` and `stop`: a stop request ends the current run with a
/// checkpoint and the comparison with a [`crate::continuation::Interrupted`] error.
pub fn compare(
    config: &CompareConfig,
    kind: BackendKind,
    options: &TrainOptions,
) -> Result<CompareResults> {
    check_test_split(&config.run_config(&config.methods[0], config.seeds[0])?)?;
    check_then_sections(config)?;
    let dir = config.out_dir.join("compare");
    let _lock = mixlm_data::FolderLock::acquire(&dir, "mixlm compare")?;
    let mut results = Vec::new();
    for seed in &config.seeds {
        for method in &config.methods {
            results.push(run_one(config, method, *seed, kind, options)?);
        }
    }
    let mut results = CompareResults {
        methods: config.methods.iter().map(|m| m.name.clone()).collect(),
        results,
    };
    backfill_curves(&mut results);
    write_atomic(
        &dir.join("results.json"),
        serde_json::to_string_pretty(&results)?.as_bytes(),
    )?;
    write_report(&dir, &results)?;
    Ok(results)
}

/// The report's headline is the average test perplexity: refuses, before any
/// training, data in which a domain has no test tokens.
fn check_test_split(run: &RunConfig) -> Result<()> {
    let source = run.open_source()?;
    let empty: Vec<String> = source
        .domain_names()
        .into_iter()
        .enumerate()
        .filter(|&(d, _)| {
            let d = mixlm_data::DomainId(d);
            match source.stream_documents(d, Split::Test) {
                Some(offsets) => offsets.last().is_none_or(|&n| n == 0),
                None => source.num_windows(d, Split::Test, run.run.seq_len) == Some(0),
            }
        })
        .map(|(_, name)| name)
        .collect();
    if !empty.is_empty() {
        anyhow::bail!(
            "{}: no test tokens for {} in the data; the comparison reports test \
             perplexity. Prepare the data with a test split: [data.prepare] \
             test_from_validation = true (half of each domain's validation documents) or \
             test_fraction > 0, and `mixlm prepare --force`",
            run.data
                .shard_dir()
                .map_or("the data".into(), |p| p.display().to_string()),
            empty.join(", ")
        );
    }
    Ok(())
}

/// Rewrites `report.md` from `results.json`, without training.
pub fn report_only(config: &CompareConfig) -> Result<CompareResults> {
    let dir = config.out_dir.join("compare");
    let path = dir.join("results.json");
    let mut results: CompareResults = serde_json::from_slice(
        &std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?,
    )
    .with_context(|| format!("{} is not a comparison's results", path.display()))?;
    if backfill_curves(&mut results) {
        write_atomic(&path, serde_json::to_string_pretty(&results)?.as_bytes())?;
    }
    write_report(&dir, &results)?;
    Ok(results)
}

/// Reads the trajectories of results that lack them from their run's metrics, where
/// the run folder still exists; says whether any were added.
fn backfill_curves(results: &mut CompareResults) -> bool {
    let mut added = false;
    for r in results.results.iter_mut().filter(|r| r.curves.is_empty()) {
        if let Ok(log) = RunLog::read(&r.run_dir.join("metrics.jsonl")) {
            r.curves = log.curves;
            added = true;
        }
    }
    added
}

/// `report.md` and its figures.
fn write_report(dir: &Path, results: &CompareResults) -> Result<()> {
    let figures = crate::figures::write_figures(dir, results)?;
    write_atomic(&dir.join("report.md"), report(results, &figures).as_bytes())
}

fn run_one(
    config: &CompareConfig,
    method: &MethodEntry,
    seed: u64,
    kind: BackendKind,
    options: &TrainOptions,
) -> Result<RunResult> {
    let mut run = config.run_config(method, seed)?;
    let run_dir = config.out_dir.join(&run.run.name);
    // Held through training, evaluation and result.json.
    let _lock = mixlm_train::trainer::lock_run(&run)?;
    let done = run_dir.join("result.json");
    if let Ok(bytes) = std::fs::read(&done) {
        if let Ok(r) = serde_json::from_slice::<RunResult>(&bytes) {
            eprintln!("compare: {} is done, skipped", run.run.name);
            return Ok(r);
        }
    }
    let train = |c: &RunConfig| train_or_continue(kind, c, options);
    let mut extra_steps = 0;
    if method.search.as_deref() == Some("samplemix") {
        // The token budget is what the run trains on.
        let data = run
            .data
            .shard_dir()
            .context("search = \"samplemix\" needs prepared shards (data.source = \"shards\")")?;
        let budget = run.run.steps * run.tokens_per_step();
        let plan = config.out_dir.join(format!("{}-plan", run.run.name));
        let plan_options = PlanOptions {
            scores: method
                .scores
                .clone()
                .unwrap_or_else(|| data.join("samplemix-model-free")),
            data,
            plan: plan.clone(),
            budget,
            alpha: method
                .alpha
                .unwrap_or(mixlm_mixing::samplemix::DEFAULT_ALPHA),
            seed,
        };
        if method.scores.is_some() {
            make_plan(&plan_options)?;
        } else {
            model_free_plan(
                &plan_options,
                method.clusters.unwrap_or(64),
                kind,
                options.quiet,
            )?;
        }
        run.mixing = MixingConfig::SampleMix(mixlm_mixing::samplemix::SampleMixConfig { plan });
    } else if let Some(search) = &method.search {
        let mut search_options = SearchOptions::new(search.parse().map_err(anyhow::Error::msg)?);
        search_options.pilot_steps = method.pilot_steps;
        if let Some(p) = method.points {
            search_options.points = p;
        }
        let outcome = mix_search(&run, &search_options, train)?;
        // Every search run (sweep points included) trains pilot_steps, default the
        // run's steps.
        extra_steps = outcome.points.len() as u64 * method.pilot_steps.unwrap_or(run.run.steps);
        run = run.with_mixing_file(&outcome.dir.join("learned_mixture.toml"))?;
    }
    if let Some(MixingConfig::Aioli(aioli)) = &method.then {
        let x = run.mixing.method_name();
        let mut aioli = aioli.clone();
        aioli.init_proportions =
            learned_init(&run).with_context(|| format!("method `{}`: then", method.name))?;
        eprintln!(
            "compare: {} continues {x}'s mixture with Aioli ({} steps on it first)",
            run.run.name, aioli.init_steps
        );
        run.mixing = MixingConfig::Aioli(aioli);
        run.validate()?;
    }
    eprintln!(
        "compare: run {} ({}{})",
        run.run.name,
        run.mixing.method_name(),
        run.mixing
            .note()
            .map_or(String::new(), |n| format!("; {n}"))
    );
    let outcome = train(&run)?;
    let max_tokens = config
        .max_tokens
        .or_else(|| default_max_tokens(&run, run.run.seq_len));
    let checkpoint = latest_checkpoint(&outcome.run_dir)?;
    let eval = evaluate_on(
        kind,
        &run,
        &EvalOptions {
            out: checkpoint.clone(),
            checkpoint,
            splits: vec![Split::Validation, Split::Test],
            perplexity: PerplexityOptions {
                seq_len: run.run.seq_len,
                stride: run.run.seq_len,
                batch_size: run.eval.batch_size,
                max_tokens,
            },
            tasks: Vec::new(),
            heldout: Vec::new(),
            tokenizer: None,
            allow_tokenizer_mismatch: false,
        },
    )?;
    let log = RunLog::read(&outcome.run_dir.join("metrics.jsonl"))?;
    let last = log
        .last_step
        .with_context(|| format!("{} has no training step", outcome.run_dir.display()))?;
    let result = RunResult {
        method: method.name.clone(),
        seed,
        steps: outcome.steps,
        extra_steps,
        // The whole run's, across interruptions (not only the last segment's).
        tokens_per_second: last.tokens_per_second(),
        wall_s: last.elapsed_s,
        curves: log.curves,
        step_time: log.step_time,
        run_dir: outcome.run_dir,
        eval,
    };
    write_atomic(&done, serde_json::to_string_pretty(&result)?.as_bytes())?;
    Ok(result)
}

/// Mean and sample standard deviation (0 for one value).
fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len().max(1) as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = if v.len() > 1 {
        v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (mean, var.sqrt())
}

/// `report.md`: average test perplexity per group (mean ± std over seeds) and its
/// difference to stratified, per-domain test perplexity, throughput and extra steps,
/// then the `figures` (written next to it).
pub fn report(results: &CompareResults, figures: &[Figure]) -> String {
    let by_method =
        |m: &str| -> Vec<&RunResult> { results.results.iter().filter(|r| r.method == m).collect() };
    let split_of = |r: &RunResult, s: &str| r.eval.splits.iter().find(|x| x.split == s).cloned();
    let avg = |m: &str, s: &str| -> Vec<f64> {
        by_method(m)
            .iter()
            .filter_map(|r| split_of(r, s).map(|x| x.average_ppl))
            .collect()
    };
    let baseline = results
        .methods
        .iter()
        .find(|m| m.as_str() == "stratified")
        .map(|m| mean_std(&avg(m, "test")).0);
    let seeds = results
        .results
        .iter()
        .map(|r| r.seed)
        .collect::<std::collections::BTreeSet<_>>()
        .len();
    let mut out = format!(
        "# Mixing methods compared\n\n{} methods x {seeds} seed(s). Perplexities are \
         token-weighted; \"avg\" is the mean over domains (the Aioli paper's average test \
         perplexity per group), as mean ± standard deviation over seeds. \"mixing share\" \
         is the share of the training loop's time spent in the mixing method (its own \
         validation passes included), which tokens/s also pays for.\n\n",
        results.methods.len()
    );
    out += "| method | avg test ppl | Δ vs stratified | avg val ppl | tokens/s | train wall-clock (s) | mixing share | extra steps |\n";
    out += "|---|---:|---:|---:|---:|---:|---:|---:|\n";
    for m in &results.methods {
        let runs = by_method(m);
        if runs.is_empty() {
            continue;
        }
        let (t, ts) = mean_std(&avg(m, "test"));
        let (v, vs) = mean_std(&avg(m, "validation"));
        let tps = mean_std(&runs.iter().map(|r| r.tokens_per_second).collect::<Vec<_>>()).0;
        let wall = mean_std(&runs.iter().map(|r| r.wall_s).collect::<Vec<_>>()).0;
        let delta = baseline.map_or("-".into(), |b| format!("{:+.3}", t - b));
        let shares: Vec<f64> = runs
            .iter()
            .filter_map(|r| r.step_time.mixing_share())
            .collect();
        let share = match shares.is_empty() {
            true => "-".to_string(),
            false => format!("{:.1}%", 100.0 * mean_std(&shares).0),
        };
        out += &format!(
            "| {m} | {t:.3} ± {ts:.3} | {delta} | {v:.3} ± {vs:.3} | {tps:.0} | {wall:.1} | {share} | {} |\n",
            runs[0].extra_steps
        );
    }
    // Per-domain test perplexity, mean over seeds.
    let domains: Vec<String> = results
        .results
        .first()
        .and_then(|r| split_of(r, "test"))
        .map(|s| s.domains.iter().map(|d| d.domain.clone()).collect())
        .unwrap_or_default();
    out += "\n## Test perplexity per domain (mean over seeds)\n\n| method |";
    for d in &domains {
        out += &format!(" {d} |");
    }
    out += "\n|---|";
    out += &"---:|".repeat(domains.len());
    out += "\n";
    for m in &results.methods {
        let mut per: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        for r in by_method(m) {
            if let Some(s) = split_of(r, "test") {
                for d in &s.domains {
                    per.entry(d.domain.clone()).or_default().push(d.token_ppl);
                }
            }
        }
        out += &format!("| {m} |");
        for d in &domains {
            let v = per.get(d.as_str()).map_or(f64::NAN, |v| mean_std(v).0);
            out += &format!(" {v:.3} |");
        }
        out += "\n";
    }
    for f in figures {
        out += &format!(
            "\n## {}\n\n{}\n\n![{}]({}) ([SVG]({}))\n",
            f.title, f.caption, f.title, f.png, f.svg
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_and_sample_std() {
        assert_eq!(mean_std(&[2.0]), (2.0, 0.0));
        let (m, s) = mean_std(&[1.0, 2.0, 3.0]);
        assert_eq!(m, 2.0);
        assert!((s - 1.0).abs() < 1e-12);
    }

    #[test]
    fn bad_comparisons_are_named() {
        let parse = |t: &str| -> Result<()> {
            let c: CompareConfig = toml::from_str(t)?;
            c.validate()
        };
        let e = parse(
            "out_dir = \"x\"\n[[method]]\nname = \"a b\"\nmixing = { method = \"stratified\" }",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("method name `a b`"), "{e}");
        let e = parse("out_dir = \"x\"\n[[method]]\nname = \"a\"\nsearch = \"bandit\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown search method `bandit`"), "{e}");
        let e = parse("out_dir = \"x\"\n[[method]]\nname = \"a\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("needs a [method.mixing] or a search"), "{e}");
        let e = parse("out_dir = \"x\"\nseeds = []\n[[method]]\nname = \"a\"\nmixing = { method = \"natural\" }")
            .unwrap_err()
            .to_string();
        assert!(e.contains("at least one"), "{e}");
        let e =
            parse("out_dir = \"x\"\n[[method]]\nname = \"a\"\nsearch = \"doremi\"\nclusters = 8")
                .unwrap_err()
                .to_string();
        assert!(
            e.contains("method `a`: clusters applies only to search = \"samplemix\""),
            "{e}"
        );
        let e = parse(
            "out_dir = \"x\"\n[[method]]\nname = \"a\"\nsearch = \"samplemix\"\nclusters = 8\nscores = \"s\"",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("not to given scores"), "{e}");
        parse("out_dir = \"x\"\n[[method]]\nname = \"a\"\nsearch = \"samplemix\"\nscores = \"s\"")
            .unwrap();
        // `then`: Aioli only, init_proportions filled in, X a search or a static mixture.
        let then = |method: &str, then: &str| {
            parse(&format!(
                "out_dir = \"x\"\n[[method]]\nname = \"a\"\n{method}\nthen = {{ {then} }}"
            ))
            .map_err(|e| e.to_string())
        };
        let aioli = "method = \"aioli\", eta = 0.2, update_steps = 250, init_steps = 500";
        then("search = \"doremi\"", aioli).unwrap();
        then("mixing = { method = \"stratified\" }", aioli).unwrap();
        let e = then("search = \"doremi\"", "method = \"natural\"").unwrap_err();
        assert!(
            e.contains("then.method = \"natural\": only \"aioli\""),
            "{e}"
        );
        let e = then(
            "search = \"doge\"",
            &format!("{aioli}, init_proportions = \"natural\""),
        )
        .unwrap_err();
        assert!(
            e.contains("method `a`: then.init_proportions is filled in"),
            "{e}"
        );
        let e = then(
            "search = \"doge\"",
            "method = \"aioli\", eta = 0.2, update_steps = 250",
        )
        .unwrap_err();
        assert!(
            e.contains("then.init_steps = 0 without then.start_from_init"),
            "{e}"
        );
        then(
            "search = \"doge\"",
            "method = \"aioli\", eta = 0.2, update_steps = 250, start_from_init = true",
        )
        .unwrap();
        let e = then("mixing = { method = \"odm\" }", aioli).unwrap_err();
        assert!(e.contains("not mixing.method = \"odm\""), "{e}");
        let e = then("search = \"samplemix\"", aioli).unwrap_err();
        assert!(e.contains("cannot follow search = \"samplemix\""), "{e}");
        let c: CompareConfig = toml::from_str(&format!(
            "out_dir = \"x\"\nset = [\"run.steps=500\"]\n[[method]]\nname = \"a\"\n\
             search = \"doge\"\nthen = {{ {aioli} }}"
        ))
        .unwrap();
        let e = c.run_config(&c.methods[0], 0).unwrap_err().to_string();
        assert!(
            e.contains(
                "then.init_steps = 500 leaves no step for Aioli: the run has run.steps = 500"
            ),
            "{e}"
        );
        assert!(
            toml::from_str::<CompareConfig>("out_dir = \"x\"\nsedes = [1]\nmethod = []")
                .unwrap_err()
                .to_string()
                .contains("sedes")
        );
    }

    #[test]
    fn aioli_starts_from_the_mixture_x_trained_on() {
        let run = |mixing: &str| {
            let mut run = RunConfig::embedded(&[]).unwrap();
            run.mixing =
                toml::from_str::<BTreeMap<String, MixingConfig>>(mixing).unwrap()["mixing"].clone();
            learned_init(&run)
        };
        assert_eq!(
            run("mixing = { method = \"stratified\" }").unwrap(),
            InitWeights::Stratified
        );
        let InitWeights::Weights(w) =
            run("mixing = { method = \"manual\", weights = { a = 1.0, b = 3.0 } }").unwrap()
        else {
            panic!()
        };
        assert_eq!((w["a"], w["b"]), (1.0, 3.0));
        // Skill-It: p_i ∝ exp(eta * sum_j graph[i][j]) = exp(0.5 * [1.0, 0.2]), the
        // negative entry counting as 0 (as the scheduler).
        let InitWeights::Weights(w) = run(
            "mixing = { method = \"skill_it\", eta = 0.5, update_steps = 10, graph = \
             { a = { a = 0.6, b = 0.4 }, b = { a = -0.3, b = 0.2 } } }",
        )
        .unwrap() else {
            panic!()
        };
        let (ea, eb) = (0.5f64.exp(), 0.1f64.exp());
        assert!((w["a"] - ea / (ea + eb)).abs() < 1e-12, "{w:?}");
        assert!((w["a"] + w["b"] - 1.0).abs() < 1e-12);
        let e = run("mixing = { method = \"odm\" }")
            .unwrap_err()
            .to_string();
        assert!(e.contains("no static mixture"), "{e}");
    }
}
