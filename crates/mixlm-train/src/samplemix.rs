//! The SampleMix pipeline over a prepared corpus: score every training document's
//! quality and diversity, then turn a token budget into a sampling plan that
//! `[mixing] method = "samplemix"` trains from.
//!
//! Everything lives in one plan folder (default `<data>/samplemix/`), one file per
//! domain and quantity, `f32` / `u32` little-endian, one value per training document
//! in shard order:
//! - `quality/<domain>.f32`: 0..10 (`mixlm score quality`);
//! - `diversity/<domain>.f32`: 0..1 (`mixlm score diversity`), with `clusters.json`
//!   and the cross-domain cluster overlap (`overlap.md`, the paper's Figure 1);
//! - `counts/<domain>.u32` and `summary.json` (`mixlm samplemix`).
//!
//! Quality is scored per domain and a finished domain is not scored again, so an
//! interrupted scoring run continues where it stopped.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Int, Tensor, TensorData};
use indicatif::{ProgressBar, ProgressStyle};
use mixlm_data::prepare::PreparedTokenizer;
use mixlm_data::resampled::{counts_bytes, counts_path};
use mixlm_data::{ShardSource, Split, TokenSource};
use mixlm_eval::diversity::{hashed_tfidf, kmeans, KMeans};
use mixlm_eval::perplexity::{model_nll, score_stream, PerplexityOptions};
use mixlm_mixing::samplemix::{expected_counts, sample_counts, sample_weights, SampleSummary};
use mixlm_mixing::DomainId;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::backend::{dispatch, BackendKind, OnBackend};
use crate::checkpoint::{load_model, write_atomic};

/// How document quality is scored.
#[derive(Debug, Clone, PartialEq)]
pub enum QualityScorer {
    /// Scores the records already carry (an LLM judge's, say), captured at prepare
    /// time by `[data.prepare] quality_keys` and mapped onto 0..10 there.
    Field,
    /// Gopher / C4 rules on the decoded text ([`mixlm_data::quality`]).
    Heuristic,
    /// A reference model's mean NLL per document, mapped to 0..10 by percentile
    /// (10: the lowest NLL of the corpus).
    Model { checkpoint: PathBuf },
}

/// How documents are embedded for clustering.
#[derive(Debug, Clone, PartialEq)]
pub enum Embedder {
    /// Hashed unigram + bigram TF-IDF of the token ids, `dim` buckets.
    TfIdf { dim: usize },
    /// Mean-pooled final hidden states of a mixlm checkpoint.
    Model { checkpoint: PathBuf },
}

/// Shared settings of the scoring commands.
#[derive(Debug, Clone)]
pub struct ScoreOptions {
    /// The prepared corpus.
    pub data: PathBuf,
    /// The plan folder.
    pub plan: PathBuf,
    /// Tokens of each document looked at (its first ones) by models and embeddings.
    pub max_doc_tokens: usize,
    pub batch_size: usize,
    pub backend: BackendKind,
    pub quiet: bool,
}

/// The default plan folder of a corpus.
pub fn default_plan(data: &Path) -> PathBuf {
    data.join("samplemix")
}

fn values_path(plan: &Path, what: &str, domain: &str) -> PathBuf {
    plan.join(what).join(format!("{domain}.f32"))
}

/// [`write_atomic`] into a folder created if missing.
fn write_in_folder(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p).with_context(|| format!("cannot create {}", p.display()))?;
    }
    write_atomic(path, bytes)
}

fn write_values(path: &Path, values: &[f32]) -> Result<()> {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    write_in_folder(path, &bytes)
}

/// Whether a per-document file for `documents` documents is already there (the
/// size [`read_values`] checks), without reading it: finished work is skipped.
fn has_values(path: &Path, documents: usize) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.len() == documents as u64 * 4)
}

/// Reads a per-document file, checking it has one value per training document.
pub fn read_values(path: &Path, documents: usize) -> Result<Vec<f32>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    if bytes.len() != documents * 4 {
        anyhow::bail!(
            "{}: {} values for {documents} training documents; it was made for other data: \
             score again",
            path.display(),
            bytes.len() / 4
        );
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

/// The training documents of each domain: `(name, token offsets)`.
type DomainDocs = Vec<(String, Vec<u64>)>;

fn documents(source: &ShardSource) -> DomainDocs {
    source
        .domain_names()
        .into_iter()
        .enumerate()
        .map(|(d, name)| (name, source.doc_offsets(DomainId(d), Split::Train).to_vec()))
        .collect()
}

fn progress(total: u64, what: &str, quiet: bool) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:30}] {pos}/{len} documents ({per_sec}, ETA {eta})",
        )
        .expect("template")
        .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar
}

/// The corpus, its training documents, and a progress bar over them.
fn open_corpus(
    options: &ScoreOptions,
    what: &str,
) -> Result<(ShardSource, DomainDocs, ProgressBar)> {
    let source = ShardSource::open(&options.data, 0)?;
    let docs = documents(&source);
    let total = docs
        .iter()
        .map(|d| d.1.len().saturating_sub(1) as u64)
        .sum();
    let bar = progress(total, what, options.quiet);
    Ok((source, docs, bar))
}

/// Reads a document's first `max` tokens.
fn doc_tokens(source: &ShardSource, d: usize, offsets: &[u64], i: usize, max: usize) -> Vec<u32> {
    let end = offsets[i + 1].min(offsets[i].saturating_add(max as u64));
    let mut out = Vec::new();
    source.read_tokens(DomainId(d), Split::Train, offsets[i]..end, &mut out);
    out
}

/// Scores every training document's quality into `<plan>/quality/`; returns the mean
/// score per domain.
pub fn score_quality(
    options: &ScoreOptions,
    scorer: &QualityScorer,
) -> Result<BTreeMap<String, f64>> {
    let (source, docs, bar) = open_corpus(options, "quality")?;
    match scorer {
        QualityScorer::Field => {
            for (d, (name, offsets)) in docs.iter().enumerate() {
                let n = offsets.len().saturating_sub(1);
                let from = source.quality_path(DomainId(d)).ok_or_else(|| {
                    anyhow::anyhow!(
                        "{} was prepared without quality fields: list them in [data.prepare] \
                         quality_keys (and quality_range) and prepare again, or use \
                         --scorer heuristic or model",
                        options.data.display()
                    )
                })?;
                write_values(
                    &values_path(&options.plan, "quality", name),
                    &read_values(&from, n)?,
                )?;
                bar.inc(n as u64);
            }
        }
        QualityScorer::Heuristic => {
            let path = PathBuf::from(&source.manifest().tokenizer.path);
            let tokenizer = PreparedTokenizer::load(&path, None).with_context(|| {
                format!(
                    "the corpus's tokenizer {} (from its manifest) is needed to read the texts",
                    path.display()
                )
            })?;
            for (d, (name, offsets)) in docs.iter().enumerate() {
                let out = values_path(&options.plan, "quality", name);
                let n = offsets.len().saturating_sub(1);
                if has_values(&out, n) {
                    bar.inc(n as u64);
                    continue;
                }
                // Decoding and the rules are per document: spread over the cores.
                let scores = (0..n)
                    .into_par_iter()
                    .map(|i| {
                        let tokens = doc_tokens(&source, d, offsets, i, usize::MAX);
                        let text = tokenizer
                            .decode(&tokens)
                            .map_err(|e| anyhow::anyhow!("{name} document {i}: {e}"))?;
                        bar.inc(1);
                        Ok(mixlm_data::quality::heuristic_quality(&text) as f32)
                    })
                    .collect::<Result<Vec<f32>>>()?;
                write_values(&out, &scores)?;
            }
        }
        QualityScorer::Model { checkpoint } => {
            // Mean NLL per document first (resumable per domain), then one mapping of
            // the whole corpus to 0..10.
            struct Job<'a>(
                &'a ScoreOptions,
                &'a ShardSource,
                &'a [(String, Vec<u64>)],
                &'a Path,
                &'a ProgressBar,
            );
            impl OnBackend for Job<'_> {
                type Output = ();
                fn run<B: AutodiffBackend>(self, device: &B::Device) -> Result<()> {
                    let Job(options, source, docs, checkpoint, bar) = self;
                    let (model, config) = load_model::<B::InnerBackend>(checkpoint, device)?;
                    if source.vocab_size() > config.vocab_size {
                        anyhow::bail!(
                            "the corpus's vocabulary ({} ids) does not fit the reference model's ({})",
                            source.vocab_size(),
                            config.vocab_size
                        );
                    }
                    let seq_len = options.max_doc_tokens.min(config.max_seq_len);
                    let mut nll = model_nll(&model, device);
                    for (d, (name, offsets)) in docs.iter().enumerate() {
                        let out = values_path(&options.plan, "nll", name);
                        let n = offsets.len().saturating_sub(1);
                        if has_values(&out, n) {
                            bar.inc(n as u64);
                            continue;
                        }
                        let stream = *offsets.last().unwrap_or(&0);
                        let p = PerplexityOptions {
                            seq_len,
                            stride: seq_len,
                            batch_size: options.batch_size,
                            max_tokens: None,
                        };
                        let s = score_stream(
                            stream,
                            offsets,
                            &p,
                            |r, out| source.read_tokens(DomainId(d), Split::Train, r, out),
                            &mut nll,
                        );
                        let mut mean: Vec<f32> = s
                            .documents
                            .iter()
                            .take(n)
                            .map(|&(l, t)| {
                                if t == 0 {
                                    f32::NAN
                                } else {
                                    (l / t as f64) as f32
                                }
                            })
                            .collect();
                        mean.resize(n, f32::NAN);
                        write_values(&out, &mean)?;
                        bar.inc(n as u64);
                    }
                    Ok(())
                }
            }
            dispatch(
                options.backend,
                Job(options, &source, &docs, checkpoint, &bar),
            )?;
            let all: Vec<Vec<f32>> = docs
                .iter()
                .map(|(name, o)| {
                    read_values(
                        &values_path(&options.plan, "nll", name),
                        o.len().saturating_sub(1),
                    )
                })
                .collect::<Result<_>>()?;
            let quality = nll_to_quality(&all);
            for ((name, _), q) in docs.iter().zip(quality) {
                write_values(&values_path(&options.plan, "quality", name), &q)?;
            }
        }
    }
    bar.finish_and_clear();
    let mut means = BTreeMap::new();
    for (name, offsets) in &docs {
        let q = read_values(
            &values_path(&options.plan, "quality", name),
            offsets.len().saturating_sub(1),
        )?;
        means.insert(
            name.clone(),
            q.iter().map(|&v| v as f64).sum::<f64>() / q.len().max(1) as f64,
        );
    }
    Ok(means)
}

/// Percentile of each document's NLL over the corpus, flipped to quality: 10 for the
/// lowest NLL, 0 for the highest; documents without a score (a one-token document)
/// get the median, 5.
pub fn nll_to_quality(nll: &[Vec<f32>]) -> Vec<Vec<f32>> {
    let mut sorted: Vec<f32> = nll
        .iter()
        .flatten()
        .copied()
        .filter(|v| v.is_finite())
        .collect();
    sorted.sort_by(f32::total_cmp);
    let n = sorted.len();
    nll.iter()
        .map(|domain| {
            domain
                .iter()
                .map(|&v| {
                    if !v.is_finite() || n < 2 {
                        return 5.0;
                    }
                    // Mid-rank of v among the scores, so ties share a value.
                    let below = sorted.partition_point(|&x| x < v);
                    let upto = sorted.partition_point(|&x| x <= v);
                    let rank = (below + upto - 1) as f32 / 2.0;
                    10.0 * (1.0 - rank / (n - 1) as f32)
                })
                .collect()
        })
        .collect()
}

/// What `score diversity` found.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterReport {
    pub k: usize,
    pub iterations: usize,
    pub sizes: Vec<usize>,
    pub compactness: Vec<f64>,
    pub separation: Vec<f64>,
    /// `overlap[a][b]`: the share of the clusters holding documents of domain `a` that
    /// also hold documents of domain `b`.
    pub overlap: BTreeMap<String, BTreeMap<String, f64>>,
}

/// Embeds every training document, clusters with k-means on the device, and writes
/// each document's diversity into `<plan>/diversity/`, with `clusters.json` and
/// `overlap.md`.
pub fn score_diversity(
    options: &ScoreOptions,
    embedder: &Embedder,
    k: usize,
    seed: u64,
) -> Result<ClusterReport> {
    let (source, docs, bar) = open_corpus(options, "embedding")?;

    struct Job<'a> {
        options: &'a ScoreOptions,
        source: &'a ShardSource,
        docs: &'a [(String, Vec<u64>)],
        embedder: &'a Embedder,
        k: usize,
        seed: u64,
        bar: &'a ProgressBar,
    }
    impl OnBackend for Job<'_> {
        type Output = KMeans;
        fn run<B: AutodiffBackend>(self, device: &B::Device) -> Result<KMeans> {
            let o = self.options;
            let texts: Vec<Vec<u32>> = self
                .docs
                .iter()
                .enumerate()
                .flat_map(|(d, (_, offs))| {
                    (0..offs.len().saturating_sub(1))
                        .map(move |i| doc_tokens(self.source, d, offs, i, o.max_doc_tokens))
                })
                .collect();
            let (embeddings, dim) = match self.embedder {
                Embedder::TfIdf { dim } => {
                    let refs: Vec<&[u32]> = texts.iter().map(Vec::as_slice).collect();
                    self.bar.inc(texts.len() as u64);
                    (hashed_tfidf(&refs, *dim), *dim)
                }
                Embedder::Model { checkpoint } => {
                    let (model, config) = load_model::<B::InnerBackend>(checkpoint, device)?;
                    let max = o.max_doc_tokens.min(config.max_seq_len);
                    let mut out = Vec::with_capacity(texts.len() * config.d_model);
                    for chunk in texts.chunks(o.batch_size.max(1)) {
                        let len = chunk
                            .iter()
                            .map(|t| t.len().min(max))
                            .max()
                            .unwrap_or(1)
                            .max(1);
                        let mut ids = Vec::with_capacity(chunk.len() * len);
                        let mut mask = Vec::with_capacity(chunk.len() * len);
                        for t in chunk {
                            let t = &t[..t.len().min(max)];
                            ids.extend(t.iter().map(|&x| x as i64));
                            ids.extend(std::iter::repeat_n(
                                self.source.eos_id() as i64,
                                len - t.len(),
                            ));
                            mask.extend(std::iter::repeat_n(1f32, t.len()));
                            mask.extend(std::iter::repeat_n(0f32, len - t.len()));
                        }
                        let b = chunk.len();
                        let tokens = Tensor::<B::InnerBackend, 2, Int>::from_data(
                            TensorData::new(ids, [b, len]),
                            device,
                        );
                        let mask = Tensor::<B::InnerBackend, 3>::from_data(
                            TensorData::new(mask, [b, len, 1]),
                            device,
                        );
                        // Causal: padding after a document does not change its states.
                        let h = model.hidden(tokens) * mask.clone();
                        let pooled = h.sum_dim(1).reshape([b, config.d_model])
                            / mask.sum_dim(1).reshape([b, 1]).clamp_min(1.0);
                        out.extend(
                            pooled
                                .into_data()
                                .convert::<f32>()
                                .into_vec::<f32>()
                                .expect("f32"),
                        );
                        self.bar.inc(b as u64);
                    }
                    (out, config.d_model)
                }
            };
            self.bar.set_message("k-means");
            Ok(kmeans::<B::InnerBackend>(
                &embeddings,
                dim,
                self.k,
                100,
                self.seed,
                device,
            ))
        }
    }
    let km = dispatch(
        options.backend,
        Job {
            options,
            source: &source,
            docs: &docs,
            embedder,
            k,
            seed,
            bar: &bar,
        },
    )?;
    bar.finish_and_clear();
    let diversity = km.diversity()?;
    let mut at = 0;
    let mut clusters_of: BTreeMap<String, std::collections::BTreeSet<usize>> = BTreeMap::new();
    for (name, offsets) in &docs {
        let n = offsets.len().saturating_sub(1);
        let d: Vec<f32> = diversity[at..at + n].iter().map(|&v| v as f32).collect();
        clusters_of.insert(
            name.clone(),
            km.assignment[at..at + n].iter().copied().collect(),
        );
        write_values(&values_path(&options.plan, "diversity", name), &d)?;
        at += n;
    }
    let overlap = clusters_of
        .iter()
        .map(|(a, ca)| {
            let row = clusters_of
                .iter()
                .map(|(b, cb)| {
                    let shared = ca.intersection(cb).count();
                    (b.clone(), shared as f64 / ca.len().max(1) as f64)
                })
                .collect();
            (a.clone(), row)
        })
        .collect();
    let report = ClusterReport {
        k: km.k,
        iterations: km.iterations,
        sizes: km.sizes(),
        compactness: km.compactness(),
        separation: km.separation(),
        overlap,
    };
    write_atomic(
        &options.plan.join("clusters.json"),
        serde_json::to_string_pretty(&report)?.as_bytes(),
    )?;
    write_atomic(
        &options.plan.join("overlap.md"),
        overlap_markdown(&report).as_bytes(),
    )?;
    Ok(report)
}

/// The cross-domain cluster overlap as a markdown table.
pub fn overlap_markdown(report: &ClusterReport) -> String {
    let names: Vec<&String> = report.overlap.keys().collect();
    let mut out = format!(
        "# Cross-domain cluster overlap ({} clusters)\n\nRow domain: the share of the \
         clusters holding its documents that also hold documents of the column domain.\n\n| |",
        report.k
    );
    for n in &names {
        out += &format!(" {n} |");
    }
    out += "\n|---|";
    out += &"---:|".repeat(names.len());
    out += "\n";
    for a in &names {
        out += &format!("| {a} |");
        for b in &names {
            out += &format!(" {:.2} |", report.overlap[*a][*b]);
        }
        out += "\n";
    }
    out
}

/// `mixlm samplemix`: the plan.
#[derive(Debug, Clone)]
pub struct PlanOptions {
    pub data: PathBuf,
    /// Where `quality/` and `diversity/` are.
    pub scores: PathBuf,
    /// Where `counts/` and `summary.json` go (often the same folder).
    pub plan: PathBuf,
    /// Training tokens the plan should hold.
    pub budget: u64,
    pub alpha: f64,
    pub seed: u64,
}

/// Combines the scores, turns the budget into counts, writes `counts/` and
/// `summary.json`.
pub fn make_plan(options: &PlanOptions) -> Result<SampleSummary> {
    let source = ShardSource::open(&options.data, 0)?;
    let docs = documents(&source);
    let (mut quality, mut diversity, mut lengths, mut domain_of) = (vec![], vec![], vec![], vec![]);
    for (name, offsets) in &docs {
        let n = offsets.len().saturating_sub(1);
        let q = read_values(&values_path(&options.scores, "quality", name), n)
            .context("run mixlm score quality first")?;
        let d = read_values(&values_path(&options.scores, "diversity", name), n)
            .context("run mixlm score diversity first")?;
        quality.extend(q.iter().map(|&v| v as f64));
        diversity.extend(d.iter().map(|&v| v as f64));
        lengths.extend(offsets.windows(2).map(|w| w[1] - w[0]));
        domain_of.extend(std::iter::repeat_n(name.as_str(), n));
    }
    let weights = sample_weights(&quality, &diversity, options.alpha)?;
    let expected = expected_counts(&weights, &lengths, options.budget)?;
    let counts = sample_counts(&expected, &lengths, options.seed);
    let mut at = 0;
    for (name, offsets) in &docs {
        let n = offsets.len().saturating_sub(1);
        write_in_folder(
            &counts_path(&options.plan, name),
            &counts_bytes(&counts[at..at + n]),
        )?;
        at += n;
    }
    let summary = SampleSummary::new(options.budget, &counts, &lengths, &domain_of);
    write_in_folder(
        &options.plan.join("summary.json"),
        serde_json::to_string_pretty(&summary)?.as_bytes(),
    )?;
    Ok(summary)
}

/// The whole pipeline with model-free scorers, as `mixlm compare` runs it for
/// `search = "samplemix"`: heuristic quality and TF-IDF diversity into
/// `options.scores` (kept for later runs: scored once per corpus), then the plan.
pub fn model_free_plan(
    options: &PlanOptions,
    clusters: usize,
    backend: BackendKind,
    quiet: bool,
) -> Result<SampleSummary> {
    let scoring = ScoreOptions {
        data: options.data.clone(),
        plan: options.scores.clone(),
        max_doc_tokens: 2048,
        batch_size: 16,
        backend,
        quiet,
    };
    score_quality(&scoring, &QualityScorer::Heuristic)?;
    let source = ShardSource::open(&options.data, 0)?;
    let have_diversity = documents(&source).iter().all(|(name, o)| {
        has_values(
            &values_path(&options.scores, "diversity", name),
            o.len().saturating_sub(1),
        )
    });
    if !have_diversity {
        score_diversity(&scoring, &Embedder::TfIdf { dim: 1024 }, clusters, 0)?;
    }
    make_plan(options)
}

/// The summary for the terminal: proportions against the natural mixture, and the
/// histogram of counts.
pub fn summary_table(s: &SampleSummary) -> String {
    let mut out = format!(
        "budget {} tokens, kept {} tokens; {} of {} documents sampled at least once\n\n\
         domain                   natural   samplemix   tokens kept\n",
        s.budget, s.tokens_kept, s.documents_kept, s.documents
    );
    for (d, p) in &s.proportions {
        out += &format!(
            "{d:<24} {:>7.3}   {p:>9.3}   {:>11}\n",
            s.natural[d], s.domain_tokens[d]
        );
    }
    out += "\ncount  documents\n";
    for (c, n) in s.histogram.iter().enumerate() {
        out += &format!("{c:>5}  {n}\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nll_percentiles_become_quality() {
        let q = nll_to_quality(&[vec![1.0, 3.0], vec![2.0, f32::NAN, 3.0]]);
        // Sorted: 1, 2, 3, 3 -> ranks 0, 1, 2.5 (tied), over n - 1 = 3.
        assert_eq!(q[0][0], 10.0);
        assert!((q[1][0] - 10.0 * (1.0 - 1.0 / 3.0)).abs() < 1e-6);
        assert!((q[0][1] - 10.0 * (1.0 - 2.5 / 3.0)).abs() < 1e-6);
        assert_eq!(q[0][1], q[1][2]);
        assert_eq!(q[1][1], 5.0);
    }
}
