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
use indicatif::{ProgressBar, ProgressStyle};
use mixlm_data::prepare::PreparedTokenizer;
use mixlm_data::resampled::{counts_bytes, counts_path, read_counts};
use mixlm_data::{ShardSource, Split, TokenSource};
use mixlm_eval::diversity::{ClusterStats, TfIdf};
use mixlm_eval::model::LanguageModel;
use mixlm_eval::perplexity::{score_stream, PerplexityOptions};
use mixlm_mixing::samplemix::{expected_counts, sample_counts, sample_weights, SampleSummary};
use mixlm_mixing::DomainId;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use mixlm_train::backend::BackendKind;
use mixlm_train::checkpoint::write_atomic;
use mixlm_train::engine::on_engine;

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
    write_in_folder(path, &f32_bytes(values))
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
    Ok(f32_values(&bytes))
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

impl QualityScorer {
    /// What `<plan>/quality/scorer.txt` records: scores made otherwise are not reused.
    fn tag(&self, options: &ScoreOptions) -> String {
        match self {
            QualityScorer::Field => "field".into(),
            QualityScorer::Heuristic => "heuristic".into(),
            QualityScorer::Model { checkpoint } => format!(
                "model {} (first {} tokens)",
                checkpoint.display(),
                options.max_doc_tokens
            ),
        }
    }
}

/// The file naming how the scores in `<plan>/<what>/` were made.
fn scorer_path(plan: &Path, what: &str) -> PathBuf {
    plan.join(what).join("scorer.txt")
}

/// Makes `<plan>/<what>/` (and `also`, intermediate results of the same scorer) hold
/// only scores made with `tag`: scores made otherwise are removed, so a finished
/// domain is skipped only when it was scored the same way.
fn claim_folder(plan: &Path, what: &str, also: &[&str], tag: &str) -> Result<()> {
    let path = scorer_path(plan, what);
    if std::fs::read_to_string(&path).is_ok_and(|t| t == tag) {
        return Ok(());
    }
    for sub in std::iter::once(&what).chain(also) {
        remove_if_present(&plan.join(sub))?;
    }
    write_in_folder(&path, tag.as_bytes())
}

/// Removes a file or folder (with its contents); one that is not there is fine.
fn remove_if_present(path: &Path) -> Result<()> {
    let removed = if path.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
    match removed {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("cannot remove {}", path.display()))
        }
        _ => Ok(()),
    }
}

/// Scores every training document's quality into `<plan>/quality/`; returns the mean
/// score per domain.
pub fn score_quality(
    options: &ScoreOptions,
    scorer: &QualityScorer,
) -> Result<BTreeMap<String, f64>> {
    let (source, docs, bar) = open_corpus(options, "quality")?;
    claim_folder(&options.plan, "quality", &["nll"], &scorer.tag(options))?;
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
            on_engine(options.backend, |engine| {
                let model = engine.load_model(checkpoint, None)?;
                let config = model.config();
                if source.vocab_size() > config.vocab_size {
                    anyhow::bail!(
                        "the corpus's vocabulary ({} ids) does not fit the reference model's ({})",
                        source.vocab_size(),
                        config.vocab_size
                    );
                }
                let seq_len = options.max_doc_tokens.min(config.max_seq_len);
                let mut nll = |w: &[u32], batch, len| model.nll(w, batch, len);
                for (d, (name, offsets)) in docs.iter().enumerate() {
                    let out = values_path(&options.plan, "nll", name);
                    let n = offsets.len().saturating_sub(1);
                    if has_values(&out, n) {
                        bar.inc(n as u64);
                        continue;
                    }
                    // The stream of every document's first `max_doc_tokens`
                    // tokens, so the cost per document is bounded.
                    let cap = options.max_doc_tokens.max(2) as u64;
                    let mut kept = Vec::with_capacity(offsets.len());
                    kept.push(0u64);
                    for w in offsets.windows(2) {
                        kept.push(kept[kept.len() - 1] + (w[1] - w[0]).min(cap));
                    }
                    let read = |r: std::ops::Range<u64>, out: &mut Vec<u32>| {
                        let mut p = r.start;
                        while p < r.end {
                            let i = mixlm_data::document_at(&kept, p);
                            let end = kept[i + 1].min(r.end);
                            let from = offsets[i] + (p - kept[i]);
                            source.read_tokens(
                                DomainId(d),
                                Split::Train,
                                from..from + (end - p),
                                out,
                            );
                            p = end;
                        }
                    };
                    let p = PerplexityOptions {
                        seq_len,
                        stride: seq_len,
                        batch_size: options.batch_size,
                        max_tokens: None,
                    };
                    let s = score_stream(*kept.last().unwrap_or(&0), &kept, &p, read, &mut nll);
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
            })?;
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
    /// Documents k-means was fitted on (the rest were assigned to its centroids).
    #[serde(default)]
    pub fit_documents: usize,
    pub sizes: Vec<usize>,
    pub compactness: Vec<f64>,
    pub separation: Vec<f64>,
    /// `overlap[a][b]`: the share of the clusters holding documents of domain `a` that
    /// also hold documents of domain `b`.
    pub overlap: BTreeMap<String, BTreeMap<String, f64>>,
}

/// `mixlm score diversity`: how documents are embedded and clustered.
#[derive(Debug, Clone, PartialEq)]
pub struct DiversityOptions {
    pub embedder: Embedder,
    /// Clusters.
    pub k: usize,
    /// Seeds the fitting sample and k-means++.
    pub seed: u64,
    /// Documents k-means is fitted on: a seeded uniform sample of the corpus (all of
    /// it when smaller). The rest is assigned to the fitted centroids chunk by chunk,
    /// so memory does not grow with the corpus.
    pub fit_documents: usize,
}

impl DiversityOptions {
    /// TF-IDF (1024 buckets), seed 0, fitted on up to 200,000 documents.
    pub fn tfidf(k: usize) -> Self {
        Self {
            embedder: Embedder::TfIdf { dim: 1024 },
            k,
            seed: 0,
            fit_documents: 200_000,
        }
    }
}

/// What a clustering is fitted with: a rerun with equal settings reuses the
/// centroids and the domains already assigned.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct FitSettings {
    embedder: String,
    k: usize,
    seed: u64,
    fit_documents: usize,
    max_doc_tokens: usize,
    /// Training documents per domain.
    documents: Vec<(String, usize)>,
}

/// `kmeans/fit.json`: the settings and what the fit found.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct FitRecord {
    settings: FitSettings,
    dim: usize,
    clusters: usize,
    iterations: usize,
}

/// Documents read and embedded at a time when assigning.
const ASSIGN_CHUNK: usize = 4096;

/// An embedder ready on a device.
enum Embed<'a> {
    TfIdf(TfIdf),
    Model {
        model: &'a dyn LanguageModel,
        max: usize,
        eos: u32,
        batch_size: usize,
    },
}

impl Embed<'_> {
    fn dim(&self) -> usize {
        match self {
            Embed::TfIdf(t) => t.dim,
            Embed::Model { model, .. } => model.config().d_model,
        }
    }

    /// `[texts, dim]` row-major.
    fn embed(&self, texts: &[Vec<u32>]) -> Vec<f32> {
        match self {
            Embed::TfIdf(t) => texts
                .par_chunks(256)
                .flat_map_iter(|c| {
                    let refs: Vec<&[u32]> = c.iter().map(Vec::as_slice).collect();
                    t.embed(&refs)
                })
                .collect(),
            Embed::Model {
                model,
                max,
                eos,
                batch_size,
            } => model.embed(texts, *max, *eos, *batch_size),
        }
    }
}

/// `<kmeans>/assign/<domain>.u32`: each training document's cluster, in the plan's
/// `u32` encoding ([`counts_bytes`] / [`read_counts`]).
fn assign_path(kdir: &Path, domain: &str) -> PathBuf {
    kdir.join("assign").join(format!("{domain}.u32"))
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn f32_values(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// Embeds the training documents, fits k-means on a sample of them on the device,
/// assigns every document to its nearest centroid, and writes each document's
/// diversity into `<plan>/diversity/`, with `clusters.json` and `overlap.md`.
///
/// The fit (`<plan>/kmeans/`) and each domain's assignment are kept, so an
/// interrupted run continues with the domains not yet assigned.
pub fn score_diversity(
    options: &ScoreOptions,
    diversity: &DiversityOptions,
) -> Result<ClusterReport> {
    let (source, docs, bar) = open_corpus(options, "assigning")?;
    let kdir = options.plan.join("kmeans");
    let wanted = FitSettings {
        embedder: match &diversity.embedder {
            Embedder::TfIdf { dim } => format!("tfidf:{dim}"),
            Embedder::Model { checkpoint } => format!("model:{}", checkpoint.display()),
        },
        k: diversity.k,
        seed: diversity.seed,
        fit_documents: diversity.fit_documents,
        max_doc_tokens: options.max_doc_tokens,
        documents: docs
            .iter()
            .map(|(n, o)| (n.clone(), o.len().saturating_sub(1)))
            .collect(),
    };

    let (fit, centroids) = on_engine(options.backend, |engine| {
        let read =
            |d: usize, i: usize| doc_tokens(&source, d, &docs[d].1, i, options.max_doc_tokens);
        let model = match &diversity.embedder {
            Embedder::TfIdf { .. } => None,
            Embedder::Model { checkpoint } => Some(engine.load_model(checkpoint, None)?),
        };
        let ready = |idf: Option<Vec<f32>>| -> Embed<'_> {
            match (&diversity.embedder, &model) {
                (Embedder::TfIdf { dim }, _) => Embed::TfIdf(TfIdf {
                    dim: *dim,
                    idf: idf.expect("fitted idf"),
                }),
                (Embedder::Model { .. }, Some(m)) => Embed::Model {
                    model: m.as_ref(),
                    max: options.max_doc_tokens.min(m.config().max_seq_len),
                    eos: source.eos_id(),
                    batch_size: options.batch_size.max(1),
                },
                _ => unreachable!("the model is loaded for model embeddings"),
            }
        };

        // The fit: reused when made with the same settings, else redone (and the
        // assignments made against the old one removed first).
        let fit_path = kdir.join("fit.json");
        let old: Option<FitRecord> = std::fs::read(&fit_path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let centroids_path = kdir.join("centroids.f32");
        let idf_path = kdir.join("idf.f32");
        let reusable = old.filter(|f| {
            f.settings == wanted
                && has_values(&centroids_path, f.clusters * f.dim)
                && (model.is_some() || has_values(&idf_path, f.dim))
        });
        let (fit, centroids, embed) = if let Some(fit) = reusable {
            let centroids = f32_values(&std::fs::read(&centroids_path)?);
            let idf = model
                .is_none()
                .then(|| std::fs::read(&idf_path).map(|b| f32_values(&b)))
                .transpose()?;
            (fit, centroids, ready(idf))
        } else {
            for stale in ["fit.json", "assign", "distance"] {
                remove_if_present(&kdir.join(stale))?;
            }
            // A seeded uniform sample, in corpus order.
            let all: Vec<(usize, usize)> = docs
                .iter()
                .enumerate()
                .flat_map(|(d, (_, offs))| (0..offs.len().saturating_sub(1)).map(move |i| (d, i)))
                .collect();
            let m = diversity.fit_documents.clamp(1, all.len().max(1));
            let mut rng =
                <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(diversity.seed);
            let mut picked = rand::seq::index::sample(&mut rng, all.len(), m).into_vec();
            picked.sort_unstable();
            bar.set_message(format!("embedding {m} documents to fit on"));
            let texts: Vec<Vec<u32>> = picked
                .par_iter()
                .map(|&j| read(all[j].0, all[j].1))
                .collect();
            let idf = match &diversity.embedder {
                Embedder::TfIdf { dim } => {
                    let refs: Vec<&[u32]> = texts.iter().map(Vec::as_slice).collect();
                    Some(TfIdf::fit(&refs, *dim).idf)
                }
                Embedder::Model { .. } => None,
            };
            let embed = ready(idf.clone());
            let points = embed.embed(&texts);
            drop(texts);
            bar.set_message(format!("k-means on {m} documents"));
            let km = engine.kmeans(&points, embed.dim(), diversity.k, 100, diversity.seed);
            std::fs::create_dir_all(&kdir)
                .with_context(|| format!("cannot create {}", kdir.display()))?;
            write_atomic(&centroids_path, &f32_bytes(&km.centroids))?;
            if let Some(idf) = &idf {
                write_atomic(&idf_path, &f32_bytes(idf))?;
            }
            let fit = FitRecord {
                settings: wanted.clone(),
                dim: km.dim,
                clusters: km.k,
                iterations: km.iterations,
            };
            write_atomic(&fit_path, serde_json::to_string_pretty(&fit)?.as_bytes())?;
            (fit, km.centroids, embed)
        };

        // Every document to its nearest centroid, a domain at a time (a finished
        // domain is skipped on a rerun).
        bar.set_message("assigning");
        for (d, (name, offsets)) in docs.iter().enumerate() {
            let n = offsets.len().saturating_sub(1);
            let assign_path = assign_path(&kdir, name);
            let distance_path = values_path(&kdir, "distance", name);
            if has_values(&assign_path, n) && has_values(&distance_path, n) {
                bar.inc(n as u64);
                continue;
            }
            let (mut clusters, mut distances): (Vec<u32>, Vec<f32>) =
                (Vec::with_capacity(n), Vec::with_capacity(n));
            for start in (0..n).step_by(ASSIGN_CHUNK) {
                let texts: Vec<Vec<u32>> = (start..(start + ASSIGN_CHUNK).min(n))
                    .into_par_iter()
                    .map(|i| read(d, i))
                    .collect();
                let points = embed.embed(&texts);
                let (c, dist) = engine.assign(&points, &centroids, fit.dim);
                clusters.extend(c.into_iter().map(|c| c as u32));
                distances.extend(dist);
                bar.inc(texts.len() as u64);
            }
            write_in_folder(&distance_path, &f32_bytes(&distances))?;
            write_in_folder(&assign_path, &counts_bytes(&clusters))?;
        }
        Ok((fit, centroids))
    })?;
    bar.finish_and_clear();

    // Cluster statistics over the whole corpus, then each document's diversity.
    let read_assignment = |name: &str, n: usize| -> Result<Vec<u32>> {
        let path = assign_path(&kdir, name);
        let clusters = read_counts(&path)?;
        if clusters.len() != n || clusters.iter().any(|&c| c as usize >= fit.clusters) {
            anyhow::bail!("{} is damaged: score diversity again", path.display());
        }
        Ok(clusters)
    };
    let mut stats = ClusterStats::new(fit.clusters);
    let mut clusters_of: BTreeMap<String, std::collections::BTreeSet<usize>> = BTreeMap::new();
    for (name, offsets) in &docs {
        let n = offsets.len().saturating_sub(1);
        let clusters = read_assignment(name, n)?;
        let distances = read_values(&values_path(&kdir, "distance", name), n)?;
        for (&c, &x) in clusters.iter().zip(&distances) {
            stats.add(c as usize, x);
        }
        clusters_of.insert(name.clone(), clusters.iter().map(|&c| c as usize).collect());
    }
    let per_cluster = stats.diversity(&centroids, fit.dim)?;
    claim_folder(
        &options.plan,
        "diversity",
        &[],
        &format!(
            "{}, k-means k = {} fitted on {} documents (seed {})",
            fit.settings.embedder,
            fit.clusters,
            fit.settings.fit_documents.min(stats.sizes.iter().sum()),
            fit.settings.seed
        ),
    )?;
    for (name, offsets) in &docs {
        let clusters = read_assignment(name, offsets.len().saturating_sub(1))?;
        let d: Vec<f32> = clusters
            .iter()
            .map(|&c| per_cluster[c as usize] as f32)
            .collect();
        write_values(&values_path(&options.plan, "diversity", name), &d)?;
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
        k: fit.clusters,
        iterations: fit.iterations,
        fit_documents: diversity.fit_documents.min(stats.sizes.iter().sum()),
        sizes: stats.sizes.clone(),
        compactness: stats.compactness(),
        separation: stats.separation(&centroids, fit.dim),
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
    let mut summary = SampleSummary::new(options.budget, &counts, &lengths, &domain_of);
    for what in ["quality", "diversity"] {
        if let Ok(tag) = std::fs::read_to_string(scorer_path(&options.scores, what)) {
            summary.scored_with.insert(what.to_string(), tag);
        }
    }
    write_in_folder(
        &options.plan.join("summary.json"),
        serde_json::to_string_pretty(&summary)?.as_bytes(),
    )?;
    Ok(summary)
}

/// The whole pipeline with model-free scorers, as `mixlm compare` runs it for
/// `search = "samplemix"`: heuristic quality and TF-IDF diversity into
/// `options.scores` (kept for later runs: each is redone only when made otherwise),
/// then the plan.
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
    score_diversity(&scoring, &DiversityOptions::tfidf(clusters))?;
    make_plan(options)
}

/// The summary for the terminal: proportions against the natural mixture, and the
/// histogram of counts.
pub fn summary_table(s: &SampleSummary) -> String {
    let mut out = format!(
        "budget {} tokens, kept {} tokens; {} of {} documents sampled at least once\n",
        s.budget, s.tokens_kept, s.documents_kept, s.documents
    );
    for (what, how) in &s.scored_with {
        out += &format!("{what}: {how}\n");
    }
    out += "\ndomain                   natural   samplemix   tokens kept\n";
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
