//! `mixlm eval`: per-domain perplexity of a checkpoint on the validation and test
//! splits, with the average per group, written as a terminal table, `eval.json` and
//! `eval.md`.
//!
//! The checkpoint is a mixlm checkpoint folder, a run folder (its latest checkpoint),
//! or any folder with Hugging Face `config.json` + `model.safetensors` of a supported
//! family. The data are the run's own (`run.toml` saved in the checkpoint) unless a
//! config or `--data` folder says otherwise.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use mixlm_data::prepare::PreparedTokenizer;
use mixlm_data::{Split, TokenSource};
use mixlm_eval::model::LanguageModel;
use mixlm_eval::perplexity::{split_perplexity, PerplexityOptions, SplitPerplexity};
use mixlm_eval::tasks::{load_task, score_task, ModelScorer, TaskScore};
use serde::{Deserialize, Serialize};

use mixlm_train::backend::BackendKind;
use mixlm_train::checkpoint::{latest_checkpoint, write_atomic};
use mixlm_train::config::RunConfig;
use mixlm_train::engine::{on_engine, Engine};

/// What to evaluate and how.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// The folder holding `config.json` + `model.safetensors` (resolved).
    pub checkpoint: PathBuf,
    pub splits: Vec<Split>,
    pub perplexity: PerplexityOptions,
    /// Where `eval.json` and `eval.md` go.
    pub out: PathBuf,
    /// Downstream task files (jsonl, see [`mixlm_eval::tasks`]); named by file stem.
    pub tasks: Vec<PathBuf>,
    /// Held-out jsonl / jsonl.zst / parquet files, folders or globs, each scored as a
    /// set of its own (see [`heldout_perplexity`]).
    pub heldout: Vec<String>,
    /// The tokenizer for task texts and held-out sets; default: the one the prepared
    /// data was made with.
    pub tokenizer: Option<PathBuf>,
    /// Score tokens of another tokenizer than the model was trained on (refused
    /// otherwise: the perplexities would mean nothing).
    pub allow_tokenizer_mismatch: bool,
}

/// A checkpoint's evaluation, as written to `eval.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    pub checkpoint: PathBuf,
    /// Training step of the checkpoint, when it says (`state.json`).
    pub step: Option<u64>,
    pub model_params: u64,
    pub seq_len: usize,
    pub stride: usize,
    pub max_tokens: Option<u64>,
    pub splits: Vec<SplitPerplexity>,
    /// One entry per `--heldout` set, named `heldout:<name>`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub heldout: Vec<SplitPerplexity>,
    #[serde(default)]
    pub tasks: Vec<TaskScore>,
}

/// The folder holding the model: `path` itself, or a run folder's latest checkpoint.
pub fn resolve_checkpoint(path: &Path) -> Result<PathBuf> {
    if path.join("checkpoints").is_dir() {
        return latest_checkpoint(path);
    }
    if mixlm_train::checkpoint::has_weights(path) {
        return Ok(path.to_path_buf());
    }
    anyhow::bail!(
        "{} is neither a checkpoint folder (config.json + model.safetensors, or its \
         shards with model.safetensors.index.json) nor a run folder with checkpoints/",
        path.display()
    )
}

/// Tokens per domain and split when none are asked for: all of prepared data, and
/// the `eval.sequences` windows the trainer evaluates of a synthetic (unbounded) one.
pub fn default_max_tokens(config: &RunConfig, seq_len: usize) -> Option<u64> {
    matches!(
        config.data.source,
        mixlm_train::config::DataSource::Synthetic
    )
    .then_some((config.eval.sequences * seq_len) as u64)
}

/// The run config saved with a checkpoint (`run.toml`), if any.
pub fn checkpoint_run_config(dir: &Path, overrides: &[String]) -> Result<Option<RunConfig>> {
    let path = dir.join("run.toml");
    if !path.is_file() {
        return Ok(None);
    }
    Ok(Some(RunConfig::load_saved(&path, overrides)?))
}

/// Evaluates on `engine`'s device.
pub fn evaluate(
    engine: &dyn Engine,
    config: &RunConfig,
    options: &EvalOptions,
) -> Result<EvalReport> {
    engine.check_precision(config.run.precision)?;
    // In the run's precision and attention kernel (`mixlm eval --precision`).
    let model = engine.load_model(&options.checkpoint, Some(config.run.compute()))?;
    let model = model.as_ref();
    let model_config = model.config();
    let source = config.open_eval_source()?;
    if source.vocab_size() > model_config.vocab_size {
        anyhow::bail!(
            "the data's vocabulary ({} ids) does not fit the model's ({}): evaluate on data \
             prepared with the model's tokenizer",
            source.vocab_size(),
            model_config.vocab_size
        );
    }
    let p = &options.perplexity;
    if p.seq_len > model_config.max_seq_len {
        anyhow::bail!(
            "--seq-len {} exceeds the model's context of {} tokens",
            p.seq_len,
            model_config.max_seq_len
        );
    }
    let trained = trained_tokenizer(&options.checkpoint);
    let check = |what: String, sha256: &str, name: &str| {
        check_tokenizer(
            trained.as_ref(),
            &options.checkpoint,
            &what,
            sha256,
            name,
            options.allow_tokenizer_mismatch,
        )
    };
    if !options.splits.is_empty() {
        if let Some(data) = config.data_tokenizer() {
            let dir = config.data.shard_dir().unwrap_or_default();
            check(
                format!("the data in {}", dir.display()),
                &data.sha256,
                &data.path,
            )?;
        }
    }
    for &split in &options.splits {
        mixlm_data::check_split_ids(source.as_ref(), split, model_config.vocab_size)
            .map_err(anyhow::Error::msg)?;
    }
    let splits = options
        .splits
        .iter()
        .map(|&split| {
            split_perplexity(model, source.as_ref(), split, p).map_err(anyhow::Error::msg)
        })
        .collect::<Result<Vec<_>>>()?;
    // Held-out sets and tasks read text: find the tokenizer once, when needed.
    let tokenizer = (!options.heldout.is_empty() || !options.tasks.is_empty())
        .then(|| data_tokenizer(config, options))
        .transpose()?;
    if let Some(path) = &tokenizer {
        let (_, sha256) = mixlm_data::prepare::tokenize::sha256_file(path)
            .with_context(|| format!("cannot read the tokenizer {}", path.display()))?;
        check(
            "the held-out sets' and tasks' tokens".into(),
            &sha256,
            &path.display().to_string(),
        )?;
    }
    let heldout = options
        .heldout
        .iter()
        .map(|input| {
            heldout_perplexity(
                model,
                config,
                options,
                input,
                tokenizer.as_deref().expect("resolved above"),
            )
        })
        .collect::<Result<Vec<_>>>()?;
    let tasks = if options.tasks.is_empty() {
        Vec::new()
    } else {
        let tokenizer =
            PreparedTokenizer::load(tokenizer.as_deref().expect("resolved above"), None)?;
        let encode = |s: &str| tokenizer.encode(s);
        let mut scorer = ModelScorer(model);
        options
            .tasks
            .iter()
            .map(|path| {
                let name = path
                    .file_stem()
                    .map_or("task".into(), |s| s.to_string_lossy().into_owned());
                let task = load_task(path).map_err(anyhow::Error::msg)?;
                score_task(&name, &task, &encode, &mut scorer, p.batch_size)
                    .map_err(anyhow::Error::msg)
            })
            .collect::<Result<Vec<_>>>()?
    };
    let step = std::fs::read(options.checkpoint.join("state.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v["step"].as_u64());
    let report = EvalReport {
        checkpoint: options.checkpoint.clone(),
        step,
        model_params: model_config.num_params(),
        seq_len: p.seq_len,
        stride: p.stride,
        max_tokens: p.max_tokens,
        splits,
        heldout,
        tasks,
    };
    std::fs::create_dir_all(&options.out)
        .with_context(|| format!("cannot create {}", options.out.display()))?;
    write_atomic(
        &options.out.join("eval.json"),
        serde_json::to_string_pretty(&report)?.as_bytes(),
    )?;
    write_atomic(&options.out.join("eval.md"), report.markdown().as_bytes())?;
    Ok(report)
}

/// The name of a held-out set: its file name without the data extensions (or the
/// folder's name), in characters that can name a folder.
pub fn heldout_name(input: &str) -> String {
    let base = Path::new(input.trim_end_matches('/'))
        .file_name()
        .map_or("heldout".into(), |s| s.to_string_lossy().into_owned());
    let stem = match mixlm_data::prepare::ingest::corpus_stem(&base) {
        s if s.len() == base.len() => s.strip_suffix(".zst").unwrap_or(s),
        s => s,
    };
    let name: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    if name.trim_matches('.').is_empty() {
        "heldout".into()
    } else {
        name
    }
}

/// Perplexity on a held-out set: `input` is prepared like a corpus (the data's
/// tokenizer and `[data.prepare]` keys and renames, every document in one split,
/// records without a domain field under the set's name) into
/// `<out>/heldout/<name>/`, which later evaluations reuse while the inputs are
/// unchanged, and scored domain by domain with the same windows as the splits.
fn heldout_perplexity(
    model: &dyn LanguageModel,
    config: &RunConfig,
    options: &EvalOptions,
    input: &str,
    tokenizer: &Path,
) -> Result<SplitPerplexity> {
    let model_vocab = model.config().vocab_size;
    let name = heldout_name(input);
    let mut prepare = config.data.prepare.clone().unwrap_or_default();
    prepare.inputs = vec![input.to_string()];
    prepare.tokenizer = tokenizer.to_path_buf();
    prepare.output = options.out.join("heldout").join(&name);
    prepare.keep = None;
    prepare.drop = Vec::new();
    prepare.default_domain = Some(name.clone());
    // Scoring needs no quality scores, and held-out records need not carry them.
    prepare.quality_keys = Vec::new();
    prepare.split = Some(Split::Test);
    prepare.test_from_validation = false;
    prepare.force = false;
    mixlm_data::prepare::prepare(&prepare)
        .with_context(|| format!("preparing the held-out set {input}"))?;
    let source = mixlm_data::ShardSource::open_for_eval(&prepare.output)?;
    if source.vocab_size() > model_vocab {
        anyhow::bail!(
            "held-out set {input}: its tokenizer's vocabulary ({} ids) does not fit the \
             model's ({model_vocab}); give the model's tokenizer with --tokenizer",
            source.vocab_size()
        );
    }
    let mut scored = split_perplexity(model, &source, Split::Test, &options.perplexity)
        .map_err(anyhow::Error::msg)?;
    scored.split = format!("heldout:{name}");
    Ok(scored)
}

/// The tokenizer a checkpoint's model was trained on, where it says: its
/// `state.json`, else the manifest of the data its `run.toml` names (checkpoints
/// written before the state recorded it). `None` for Hugging Face folders and runs on
/// the synthetic corpus.
pub fn trained_tokenizer(checkpoint: &Path) -> Option<mixlm_data::prepare::TokenizerRecord> {
    let state = std::fs::read(checkpoint.join("state.json")).ok()?;
    let state: mixlm_train::checkpoint::TrainState = serde_json::from_slice(&state).ok()?;
    state.tokenizer.or_else(|| {
        checkpoint_run_config(checkpoint, &[])
            .ok()
            .flatten()?
            .data_tokenizer()
    })
}

/// Refuses to score `what` (tokens of the tokenizer `name`, hashing to `sha256`) with
/// a model trained on another tokenizer's, unless `allow`.
fn check_tokenizer(
    trained: Option<&mixlm_data::prepare::TokenizerRecord>,
    checkpoint: &Path,
    what: &str,
    sha256: &str,
    name: &str,
    allow: bool,
) -> Result<()> {
    let Some(trained) = trained else {
        return Ok(());
    };
    if trained.sha256 == sha256 {
        return Ok(());
    }
    let short = |h: &str| h[..h.len().min(12)].to_string();
    let text = format!(
        "the model in {} was trained on tokens of the tokenizer {} (SHA-256 {}…), {what} \
         are of {name} (SHA-256 {}…): the same ids are other words, so perplexities would \
         mean nothing",
        checkpoint.display(),
        trained.path,
        short(&trained.sha256),
        short(sha256)
    );
    if allow {
        eprintln!("warning: {text} (--allow-tokenizer-mismatch)");
        return Ok(());
    }
    anyhow::bail!(
        "{text}; evaluate on data prepared with the model's tokenizer (--tokenizer {} for \
         held-out sets), or pass --allow-tokenizer-mismatch if you mean it",
        trained.path
    )
}

/// The tokenizer of held-out sets and tasks: `--tokenizer`, else the checkpoint
/// folder's own `tokenizer.json` (Hugging Face folders ship their model's), else the
/// one recorded in the prepared data's manifest.
fn data_tokenizer(config: &RunConfig, options: &EvalOptions) -> Result<PathBuf> {
    if let Some(p) = &options.tokenizer {
        return Ok(p.clone());
    }
    let own = options.checkpoint.join("tokenizer.json");
    if own.is_file() {
        return Ok(own);
    }
    let record = config.data_tokenizer().with_context(|| {
        format!(
            "scoring tasks or held-out sets needs a tokenizer: give --tokenizer ({} has no \
             tokenizer.json, and the data is not prepared shards whose manifest names one)",
            options.checkpoint.display()
        )
    })?;
    let p = PathBuf::from(&record.path);
    if !p.is_file() {
        let dir = config.data.shard_dir().unwrap_or_default();
        anyhow::bail!(
            "the data's tokenizer {} (from {}/manifest.json) is not there: give --tokenizer",
            p.display(),
            dir.display()
        );
    }
    Ok(p)
}

fn heldout_section(report: &EvalReport) -> String {
    if report.heldout.is_empty() {
        return String::new();
    }
    format!("\n## Held-out sets\n\n{}", report.heldout_table(true))
}

/// [`evaluate`] on the backend `kind` names.
pub fn evaluate_on(
    kind: BackendKind,
    config: &RunConfig,
    options: &EvalOptions,
) -> Result<EvalReport> {
    on_engine(kind, |engine| evaluate(engine, config, options))
}

impl EvalReport {
    /// One row per domain, for each split its token-weighted and sequence-mean
    /// perplexity; a last row with the average per group.
    pub fn table(&self, markdown: bool) -> String {
        let domains: Vec<&str> = self
            .splits
            .first()
            .map(|s| s.domains.iter().map(|d| d.domain.as_str()).collect())
            .unwrap_or_default();
        let mut header = vec!["domain".to_string()];
        for s in &self.splits {
            header.push(format!("{} ppl", s.split));
            header.push(format!("{} seq-mean ppl", s.split));
            header.push(format!("{} tokens", s.split));
        }
        let mut rows = vec![header];
        for (i, name) in domains.iter().enumerate() {
            let mut row = vec![name.to_string()];
            for s in &self.splits {
                let d = &s.domains[i];
                if d.tokens == 0 {
                    row.extend(["-".into(), "-".into(), "0".into()]);
                } else {
                    row.push(format!("{:.3}", d.token_ppl));
                    row.push(format!("{:.3}", d.sequence_ppl));
                    row.push(d.tokens.to_string());
                }
            }
            rows.push(row);
        }
        let mut avg = vec!["average per group".to_string()];
        for s in &self.splits {
            let tokens: u64 = s.domains.iter().map(|d| d.tokens).sum();
            match tokens {
                0 => avg.extend(["-".into(), "-".into()]),
                _ => {
                    avg.push(format!("{:.3}", s.average_ppl));
                    avg.push(format!("{:.3}", s.average_sequence_ppl));
                }
            }
            avg.push(tokens.to_string());
        }
        rows.push(avg);
        render(&rows, markdown)
    }

    /// One row per held-out set and domain, and each set's average when it has
    /// several domains; empty without held-out sets.
    pub fn heldout_table(&self, markdown: bool) -> String {
        if self.heldout.is_empty() {
            return String::new();
        }
        let mut rows = vec![["set", "domain", "ppl", "seq-mean ppl", "tokens"]
            .map(String::from)
            .to_vec()];
        for s in &self.heldout {
            let set = s.split.trim_start_matches("heldout:").to_string();
            for d in &s.domains {
                rows.push(vec![
                    set.clone(),
                    d.domain.clone(),
                    format!("{:.3}", d.token_ppl),
                    format!("{:.3}", d.sequence_ppl),
                    d.tokens.to_string(),
                ]);
            }
            if s.domains.len() > 1 {
                rows.push(vec![
                    set,
                    "average per group".into(),
                    format!("{:.3}", s.average_ppl),
                    format!("{:.3}", s.average_sequence_ppl),
                    s.domains.iter().map(|d| d.tokens).sum::<u64>().to_string(),
                ]);
            }
        }
        render(&rows, markdown)
    }

    /// `eval.md`: what was evaluated, the table, and what the columns mean.
    pub fn markdown(&self) -> String {
        let step = self.step.map_or(String::new(), |s| format!(" (step {s})"));
        format!(
            "# Evaluation of `{}`{step}\n\n{:.1}M parameters; windows of {} tokens, stride \
             {}{}.\n\n{}\n`ppl` is token-weighted (`exp` of the mean NLL over all tokens); \
             `seq-mean ppl` is `exp` of the mean over sequences (documents of prepared \
             shards, windows otherwise) of their mean NLL. The last row averages over \
             domains (groups), as the Aioli paper reports test perplexity.\n",
            self.checkpoint.display(),
            self.model_params as f64 / 1e6,
            self.seq_len,
            self.stride,
            self.max_tokens
                .map_or(String::new(), |m| format!(", first {m} tokens per domain")),
            self.table(true),
        ) + &heldout_section(self)
            + &self.tasks_table(true)
    }

    /// Accuracies of the downstream tasks (empty when none were scored).
    pub fn tasks_table(&self, markdown: bool) -> String {
        if self.tasks.is_empty() {
            return String::new();
        }
        let opt = |v: Option<f64>, f: fn(f64) -> String| v.map_or("-".to_string(), f);
        let mut rows = vec![vec![
            "task".to_string(),
            "examples".into(),
            "acc".into(),
            "acc_norm".into(),
            "ppl".into(),
        ]];
        for t in &self.tasks {
            rows.push(vec![
                t.task.clone(),
                t.examples.to_string(),
                format!("{:.4}", t.acc),
                opt(t.acc_norm, |x| format!("{x:.4}")),
                opt(t.ppl, |x| format!("{x:.3}")),
            ]);
        }
        let intro = if markdown {
            "\n## Downstream tasks (zero-shot, log-likelihood)\n\n`acc`: best total \
             log-likelihood of the choice; `acc_norm`: best per byte; LAMBADA: greedy \
             last-word accuracy and last-word perplexity.\n\n"
        } else {
            "\n"
        };
        format!("{intro}{}", render(&rows, markdown))
    }
}

/// Aligned columns (first left, others right), or a markdown table.
fn render(rows: &[Vec<String>], markdown: bool) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let width: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .map(|r| r.get(c).map_or(0, String::len))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for (i, row) in rows.iter().enumerate() {
        let cells: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(c, v)| {
                if c == 0 {
                    format!("{v:<w$}", w = width[c])
                } else {
                    format!("{v:>w$}", w = width[c])
                }
            })
            .collect();
        if markdown {
            out += &format!("| {} |\n", cells.join(" | "));
            if i == 0 {
                let rule: Vec<String> = (0..cols)
                    .map(|c| {
                        let dashes = "-".repeat(width[c].max(3));
                        if c == 0 {
                            dashes
                        } else {
                            format!("{}:", &dashes[1..])
                        }
                    })
                    .collect();
                out += &format!("| {} |\n", rule.join(" | "));
            }
        } else {
            out += &format!("{}\n", cells.join("  "));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use mixlm_eval::perplexity::{DomainPerplexity, SplitPerplexity, StreamScore};

    /// A split without data shows `-` in its rows and its average, not a perplexity
    /// of zero.
    #[test]
    fn a_split_without_tokens_has_no_average() {
        let score = StreamScore {
            nll: 2.0,
            tokens: 2,
            documents: vec![(2.0, 2)],
        };
        let split = |name: &str, s: &StreamScore| {
            SplitPerplexity::new(
                name,
                vec![
                    DomainPerplexity::from_score("a", s),
                    DomainPerplexity::from_score("b", s),
                ],
            )
        };
        let report = EvalReport {
            checkpoint: PathBuf::from("ckpt"),
            step: None,
            model_params: 1,
            seq_len: 4,
            stride: 4,
            max_tokens: None,
            splits: vec![
                split("validation", &score),
                split("test", &StreamScore::default()),
            ],
            heldout: Vec::new(),
            tasks: Vec::new(),
        };
        let table = report.table(true);
        let average = table
            .lines()
            .find(|l| l.starts_with("| average per group"))
            .unwrap();
        let cells: Vec<&str> = average.split('|').map(str::trim).collect();
        // domain, then validation ppl, seq-mean ppl, tokens, then test's.
        assert_eq!(
            cells[1..8],
            ["average per group", "2.718", "2.718", "4", "-", "-", "0"],
            "{table}"
        );
    }
}
