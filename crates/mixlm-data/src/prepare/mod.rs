//! Preparing a text corpus for training: SlimPajama-style `.jsonl` / `.jsonl.zst`
//! records or SlimPajama-6B `.parquet` rows in, tokenized per-domain shards out, read back by [`crate::ShardSource`].
//!
//! ```text
//! inputs ──ingest──▶ (domain, text, split) ──tokenize──▶ OUT/<split>/<domain>.bin + .idx
//!                                                        OUT/manifest.json (last)
//! ```
//!
//! - [`ingest`]: input files, line decoding, bad-record policy, domain mapping, splits;
//! - [`tokenize`]: the Hugging Face tokenizer, parallel encoding, token dtype;
//! - [`shards`]: the shard files, written under temporary names and renamed;
//! - [`manifest`]: what was made and from what, written last.
//!
//! Rebuilding (`force`) a folder that holds a finished dataset
//! writes the new one under `OUT/.building/` and swaps it in by renames only once it
//! is complete, so a full disk or a crash mid-rebuild leaves the old dataset usable
//! (at the cost of room for both while it runs).
//!
//! One reader thread decodes and parses the inputs into batches of documents; the
//! calling thread tokenizes each batch on the rayon pool and appends the results in
//! input order, so the shards are identical whatever the number of threads, and only
//! a couple of batches (and one write buffer per shard) are ever in memory.

pub mod ingest;
pub mod manifest;
mod parquet_input;
pub mod shards;
pub mod tokenize;

pub use ingest::{
    hash_split, resolve_inputs, Document, IngestOptions, Ingestor, InputFile, SinkClosed, SkipKind,
    SkipReport,
};
pub use manifest::{Manifest, ManifestOptions, SplitMethod, TokenizerRecord, MANIFEST_FILE};
pub use shards::ShardCounts;
pub use tokenize::{PreparedTokenizer, TokenDtype};

use crate::source::Split;
use indicatif::{ProgressBar, ProgressStyle};
use manifest::{ManifestReadError, FORMAT_VERSION, HASH_SPLIT_RULE};
use serde::{Deserialize, Serialize};
use shards::{ShardWriter, TMP_SUFFIX};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// A batch is handed to the tokenizer when it has this many bytes of text, even if
/// it has fewer than `batch_documents` documents (bounds memory for long documents).
pub const BATCH_BYTES: usize = 8 << 20;

/// What to do with bad input (malformed lines, missing keys, corrupt files).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    /// Stop at the first problem, naming the file and line.
    #[default]
    Fail,
    /// Skip it, count it per kind, and report it (summary and manifest).
    Skip,
}

/// `[data.prepare]`: how to turn a corpus into shards.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrepareConfig {
    /// Files, folders (walked recursively for `*.jsonl`, `*.jsonl.zst` and
    /// `*.parquet`) or glob patterns.
    pub inputs: Vec<String>,
    /// A Hugging Face `tokenizer.json`.
    pub tokenizer: PathBuf,
    /// The output folder (`<split>/<domain>.{bin,idx}` and `manifest.json`).
    pub output: PathBuf,
    /// Dotted path of the text in each record.
    pub text_key: String,
    /// Dotted path of the domain name in each record.
    pub domain_key: String,
    /// Source domain name -> stored name; several sources may share a name (merged).
    pub rename: BTreeMap<String, String>,
    /// If set, only these domains (names after renaming) are kept.
    pub keep: Option<Vec<String>>,
    /// Domains (names after renaming) left out.
    pub drop: Vec<String>,
    /// The domain of records that have no `domain_key` field (jsonl) or a null one
    /// (parquet), before renaming; absent: such records are bad input. For corpora
    /// that are one domain, and held-out sets (`mixlm eval --heldout`).
    pub default_domain: Option<String>,
    /// Put every document into this split, whatever its path says (held-out sets).
    pub split: Option<Split>,
    /// Numeric fields (dotted paths) holding a quality score the records already carry,
    /// such as an LLM judge's per-dimension scores (SampleMix's seven dimensions):
    /// their sum, mapped from `quality_range` onto 0..10, is stored per training
    /// document (`train/<domain>.quality.f32`) for `mixlm score quality --scorer
    /// field`. A record missing one, or outside the range, is bad input.
    pub quality_keys: Vec<String>,
    /// The range of the sum of `quality_keys`, mapped onto 0..10.
    pub quality_range: [f64; 2],
    pub on_error: OnError,
    /// Hash split only (inputs that name no split): fraction sent to validation.
    pub validation_fraction: f64,
    /// Hash split only: fraction sent to test.
    pub test_fraction: f64,
    /// Aioli's convention: split each domain's validation documents in half, by a
    /// seeded shuffle of their indices, into validation and test (for inputs that
    /// have no test split of their own, such as SlimPajama-6B's validation set).
    pub test_from_validation: bool,
    /// End-of-document id; default: the tokenizer's `<|endoftext|>`.
    pub eos_id: Option<u32>,
    /// Rebuild even if the folder is up to date or was made from other inputs.
    pub force: bool,
    /// Documents per tokenizer batch (also bounded by [`BATCH_BYTES`]).
    pub batch_documents: usize,
}

impl Default for PrepareConfig {
    fn default() -> Self {
        Self {
            inputs: Vec::new(),
            tokenizer: PathBuf::new(),
            output: PathBuf::new(),
            text_key: "text".into(),
            domain_key: "meta.redpajama_set_name".into(),
            rename: BTreeMap::new(),
            keep: None,
            drop: Vec::new(),
            default_domain: None,
            split: None,
            quality_keys: Vec::new(),
            quality_range: [0.0, 10.0],
            on_error: OnError::Fail,
            validation_fraction: 0.005,
            test_fraction: 0.005,
            test_from_validation: false,
            eos_id: None,
            force: false,
            batch_documents: 1024,
        }
    }
}

impl PrepareConfig {
    /// Checks the values that need no filesystem access; the errors name the field
    /// as `data.prepare.<field>`.
    pub fn validate(&self) -> Result<(), PrepareError> {
        let err = |field: &'static str, m: String| Err(PrepareError::config(field, m));
        if self.inputs.is_empty() {
            return err(
                "inputs",
                "is empty: list the .jsonl / .jsonl.zst / .parquet files, folders or glob patterns to \
                 prepare"
                    .into(),
            );
        }
        if let Some(i) = self.inputs.iter().position(|s| s.trim().is_empty()) {
            return err("inputs", format!("entry {i} is empty"));
        }
        if self.tokenizer.as_os_str().is_empty() {
            return err(
                "tokenizer",
                "is not set: give the path of a tokenizer.json".into(),
            );
        }
        if self.output.as_os_str().is_empty() {
            return err(
                "output",
                "is not set: give the folder to write shards to".into(),
            );
        }
        let keys = [
            ("text_key", &self.text_key),
            ("domain_key", &self.domain_key),
        ]
        .into_iter()
        .chain(self.quality_keys.iter().map(|k| ("quality_keys", k)));
        for (field, key) in keys {
            if key.is_empty() || key.split('.').any(str::is_empty) {
                return err(
                    field,
                    format!("`{key}` is not a dotted key path such as `meta.redpajama_set_name`"),
                );
            }
        }
        for (field, v) in [
            ("validation_fraction", self.validation_fraction),
            ("test_fraction", self.test_fraction),
        ] {
            if !(0.0..1.0).contains(&v) {
                return err(field, format!("{v} is not in [0, 1)"));
            }
        }
        if self.validation_fraction + self.test_fraction >= 1.0 {
            return err(
                "test_fraction",
                format!(
                    "validation_fraction + test_fraction = {} leaves nothing for training; it \
                     must be below 1",
                    self.validation_fraction + self.test_fraction
                ),
            );
        }
        let [lo, hi] = self.quality_range;
        if !(lo.is_finite() && hi.is_finite() && lo < hi) {
            return err(
                "quality_range",
                format!("[{lo}, {hi}] is not a range [low, high] with low < high"),
            );
        }
        if self.batch_documents == 0 {
            return err("batch_documents", "must be at least 1".into());
        }
        for (from, to) in &self.rename {
            if let Some(why) = ingest::domain_name_problem(to) {
                return err(
                    "rename",
                    format!("`{from}` -> `{to}`: `{to}` cannot name a shard file ({why})"),
                );
            }
        }
        if let Some(keep) = &self.keep {
            if keep.is_empty() {
                return err(
                    "keep",
                    "is empty, which would drop every domain: list the domains to keep, or \
                     remove the key to keep all"
                        .into(),
                );
            }
            if let Some(both) = keep.iter().find(|k| self.drop.contains(k)) {
                return err(
                    "drop",
                    format!("`{both}` is both in data.prepare.keep and data.prepare.drop"),
                );
            }
        }
        Ok(())
    }

    fn manifest_options(&self) -> ManifestOptions {
        ManifestOptions {
            text_key: self.text_key.clone(),
            domain_key: self.domain_key.clone(),
            rename: self.rename.clone(),
            keep: self.keep.clone(),
            drop: self.drop.clone(),
            on_error: self.on_error,
            validation_fraction: self.validation_fraction,
            test_fraction: self.test_fraction,
            test_from_validation: self.test_from_validation,
            eos_id: self.eos_id,
            default_domain: self.default_domain.clone(),
            quality_keys: self.quality_keys.clone(),
            quality_range: (!self.quality_keys.is_empty()).then_some(self.quality_range),
        }
    }
}

/// Why a prepare failed.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error("data.prepare.{field}: {message}")]
    Config {
        field: &'static str,
        message: String,
    },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("tokenizer {}: {message}", path.display())]
    Tokenizer { path: PathBuf, message: String },
    /// Bad input under `on_error = "fail"`; `location` is `file:line` (or `file`).
    #[error("{location}: {detail} [{kind}]; {advice}")]
    BadInput {
        location: String,
        kind: SkipKind,
        detail: String,
        advice: &'static str,
    },
    #[error(
        "{} was prepared from other inputs or settings:\n  - {}\nSet data.prepare.force = true \
         to rebuild it (its shards are replaced), or choose another data.prepare.output",
        output.display(),
        changes.join("\n  - ")
    )]
    Changed {
        output: PathBuf,
        changes: Vec<String>,
    },
    #[error(
        "{}: {problem}; set data.prepare.force = true to rebuild the folder",
        path.display()
    )]
    BadManifest { path: PathBuf, problem: String },
    /// A rebuild over a finished dataset failed; that dataset was left as it was.
    #[error(
        "{source}\nthe rebuild of {} stopped; the dataset already there is intact and \
         usable (its manifest and shards were not touched); free space or fix the cause, \
         then run the prepare again",
        output.display()
    )]
    RebuildFailed {
        output: PathBuf,
        source: Box<PrepareError>,
    },
    /// Another prepare writes the output folder.
    #[error(transparent)]
    Locked(#[from] crate::lock::LockError),
}

impl PrepareError {
    pub(crate) fn config(field: &'static str, message: String) -> Self {
        PrepareError::Config { field, message }
    }

    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        PrepareError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// What a prepare did (or found already done).
#[derive(Debug, Clone, PartialEq)]
pub struct PrepareSummary {
    pub output: PathBuf,
    /// Nothing to do: the folder was made from the same inputs, tokenizer and
    /// options, and its shards are intact. Nothing was rewritten.
    pub up_to_date: bool,
    /// Per split, per domain.
    pub splits: BTreeMap<Split, BTreeMap<String, ShardCounts>>,
    pub skipped: SkipReport,
    pub dropped_documents: BTreeMap<String, u64>,
    pub split_method: SplitMethod,
    pub token_dtype: TokenDtype,
    pub input_files: usize,
    pub input_bytes: u64,
    /// Wall time of this call.
    pub seconds: f64,
    /// Things worth a look that did not stop the prepare.
    pub warnings: Vec<String>,
}

fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

impl PrepareSummary {
    fn from_manifest(output: &Path, m: &Manifest, seconds: f64, warnings: Vec<String>) -> Self {
        Self {
            output: output.to_path_buf(),
            up_to_date: false,
            splits: m.splits.clone(),
            skipped: m.skipped.clone(),
            dropped_documents: m.dropped_documents.clone(),
            split_method: m.split_method.clone(),
            token_dtype: m.token_dtype,
            input_files: m.inputs.len(),
            input_bytes: m.inputs.iter().map(|f| f.bytes).sum(),
            seconds,
            warnings,
        }
    }

    /// Documents and tokens of one split, summed over domains.
    pub fn split_total(&self, split: Split) -> ShardCounts {
        self.splits
            .get(&split)
            .into_iter()
            .flat_map(|d| d.values())
            .fold(ShardCounts::default(), |a, c| ShardCounts {
                documents: a.documents + c.documents,
                tokens: a.tokens + c.tokens,
            })
    }

    /// The end-of-run table: one row per split and domain, a total per split, then
    /// skipped and dropped input and warnings.
    pub fn table(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let state = if self.up_to_date {
            "up to date (nothing rewritten)".to_string()
        } else {
            format!("prepared in {:.1} s", self.seconds)
        };
        let method = match &self.split_method {
            SplitMethod::Dataset => "the dataset's own splits".to_string(),
            SplitMethod::Hash {
                validation_fraction,
                test_fraction,
                ..
            } => format!("hash split (validation {validation_fraction}, test {test_fraction})"),
        };
        let _ = writeln!(
            s,
            "{}: {state}; {} input files ({:.1} MB), {method}, tokens stored as {}",
            self.output.display(),
            self.input_files,
            self.input_bytes as f64 / 1e6,
            self.token_dtype
        );
        let width = self
            .splits
            .values()
            .flat_map(|d| d.keys())
            .map(|k| k.len())
            .max()
            .unwrap_or(0)
            .max(6);
        let _ = writeln!(
            s,
            "{:<10}  {:<width$}  {:>12}  {:>15}",
            "split", "domain", "documents", "tokens"
        );
        for (split, domains) in &self.splits {
            for (name, c) in domains {
                let _ = writeln!(
                    s,
                    "{:<10}  {:<width$}  {:>12}  {:>15}",
                    split.name(),
                    name,
                    thousands(c.documents),
                    thousands(c.tokens)
                );
            }
            let t = self.split_total(*split);
            let _ = writeln!(
                s,
                "{:<10}  {:<width$}  {:>12}  {:>15}",
                split.name(),
                "(all)",
                thousands(t.documents),
                thousands(t.tokens)
            );
        }
        if !self.skipped.is_empty() {
            let counts: Vec<String> = self
                .skipped
                .counts
                .iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect();
            let _ = writeln!(
                s,
                "skipped {} bad records/files ({})",
                self.skipped.total(),
                counts.join(", ")
            );
            for e in &self.skipped.examples {
                let _ = writeln!(s, "  {e}");
            }
        }
        if !self.dropped_documents.is_empty() {
            let d: Vec<String> = self
                .dropped_documents
                .iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect();
            let _ = writeln!(s, "dropped by keep/drop (documents): {}", d.join(", "));
        }
        for w in &self.warnings {
            let _ = writeln!(s, "warning: {w}");
        }
        s
    }
}

/// `path` made absolute with `..` and symlinks resolved as far as it exists.
pub(crate) fn normalize(path: &Path) -> PathBuf {
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut existing = abs.as_path();
    let mut rest = Vec::new();
    loop {
        if let Ok(c) = std::fs::canonicalize(existing) {
            let mut out = c;
            for r in rest.iter().rev() {
                out.push(r);
            }
            return out;
        }
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_os_string());
                existing = parent;
            }
            _ => return abs,
        }
    }
}

/// The split method for the resolved inputs: the dataset's own when every file
/// names a split, the hash split when none does; a mix is refused (it would put
/// unsplit files' documents partly in validation while the others follow folders).
fn split_method(files: &[InputFile], config: &PrepareConfig) -> Result<SplitMethod, PrepareError> {
    let named = files.iter().filter(|f| f.split.is_some()).count();
    if named == files.len() {
        Ok(SplitMethod::Dataset)
    } else if named == 0 {
        Ok(SplitMethod::Hash {
            validation_fraction: config.validation_fraction,
            test_fraction: config.test_fraction,
            rule: HASH_SPLIT_RULE.into(),
        })
    } else {
        let with = files.iter().find(|f| f.split.is_some()).unwrap();
        let without = files.iter().find(|f| f.split.is_none()).unwrap();
        Err(PrepareError::config(
            "inputs",
            format!(
                "mixes files under split folders (e.g. {}) with files that name no split (e.g. \
                 {}); prepare them separately, or move the latter under train/ or validation/",
                with.path.display(),
                without.path.display()
            ),
        ))
    }
}

/// Checks that every shard the manifest lists is there with the right size.
fn shards_intact(dir: &Path, m: &Manifest) -> bool {
    m.splits.iter().all(|(split, domains)| {
        domains.iter().all(|(name, c)| {
            let d = dir.join(split.name());
            let size = |p: PathBuf| std::fs::metadata(p).map(|m| m.len()).ok();
            size(shards::bin_path(&d, name)) == Some(c.bin_bytes(m.token_dtype))
                && size(shards::idx_path(&d, name)) == Some(c.idx_bytes())
                && (*split != Split::Train
                    || m.options.quality_keys.is_empty()
                    || size(shards::quality_path(&d, name)) == Some(c.documents * 4))
        })
    })
}

/// Removes what a previous prepare (finished or not) left in the split folders:
/// shard files and temporaries, so domains no longer produced do not linger.
fn clear_previous(output: &Path) -> Result<(), PrepareError> {
    for split in Split::ALL {
        let dir = output.join(split.name());
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = entry.map_err(|e| PrepareError::io(&dir, e))?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if [".bin", ".idx", ".f32", TMP_SUFFIX]
                .iter()
                .any(|s| name.ends_with(s))
            {
                std::fs::remove_file(&path).map_err(|e| PrepareError::io(&path, e))?;
            }
        }
    }
    Ok(())
}

/// Where a rebuild over a finished dataset writes, inside the output folder (same
/// filesystem, so the swap is a rename).
const STAGING_DIR: &str = ".building";
/// Where the replaced dataset's split folders go during the swap, then deleted.
const PREVIOUS_DIR: &str = ".previous";

fn remove_dir_if_there(dir: &Path) -> Result<(), PrepareError> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(PrepareError::io(dir, e)),
        _ => Ok(()),
    }
}

/// Deletes `output`'s manifest (durably), marking the folder unfinished.
fn remove_manifest(output: &Path) -> Result<(), PrepareError> {
    let path = output.join(MANIFEST_FILE);
    match std::fs::remove_file(&path) {
        Ok(()) => manifest::sync_dir(output),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(PrepareError::io(&path, e)),
    }
    Ok(())
}

/// Replaces `output`'s dataset with the complete one in `staging` by renames only:
/// the old manifest goes first (so no old manifest ever describes new shards), the
/// old split folders move to `previous`, the new ones and then the new manifest move in.
/// A crash in between leaves a folder without manifest, which the next prepare rebuilds.
fn swap_in(output: &Path, staging: &Path, previous: &Path) -> Result<(), PrepareError> {
    let rename =
        |from: &Path, to: &Path| std::fs::rename(from, to).map_err(|e| PrepareError::io(from, e));
    remove_manifest(output)?;
    std::fs::create_dir(previous).map_err(|e| PrepareError::io(previous, e))?;
    for split in Split::ALL {
        let old = output.join(split.name());
        if old.exists() {
            rename(&old, &previous.join(split.name()))?;
        }
        let new = staging.join(split.name());
        if new.exists() {
            rename(&new, &old)?;
        }
    }
    rename(&staging.join(MANIFEST_FILE), &output.join(MANIFEST_FILE))?;
    manifest::sync_dir(output);
    Ok(())
}

/// Prepares `config.output` from `config.inputs` (see the module docs), or does
/// nothing if it is already prepared from the same inputs, tokenizer and options.
///
/// Shows a progress bar on stderr when it is a terminal.
pub fn prepare(config: &PrepareConfig) -> Result<PrepareSummary, PrepareError> {
    let start = Instant::now();
    config.validate()?;
    let mut files = ingest::resolve_inputs(&config.inputs)?;
    if let Some(split) = config.split {
        for f in &mut files {
            f.split = Some(split);
        }
    }
    let output_abs = normalize(&config.output);
    for input in &config.inputs {
        let p = Path::new(input);
        if p.is_dir() && output_abs.starts_with(normalize(p)) {
            return Err(PrepareError::config(
                "output",
                format!(
                    "{} is inside the input folder {input}; write it somewhere else",
                    config.output.display()
                ),
            ));
        }
    }
    if files
        .iter()
        .any(|f| normalize(&f.path).starts_with(&output_abs))
    {
        return Err(PrepareError::config(
            "inputs",
            format!(
                "an input lies inside the output folder {}",
                config.output.display()
            ),
        ));
    }
    let split_method = split_method(&files, config)?;
    let tok = PreparedTokenizer::load(&config.tokenizer, config.eos_id)?;

    let mut manifest = Manifest {
        format_version: FORMAT_VERSION,
        created_by: concat!("mixlm-data ", env!("CARGO_PKG_VERSION")).into(),
        tokenizer: TokenizerRecord {
            path: config.tokenizer.display().to_string(),
            sha256: tok.sha256.clone(),
            vocab_size: tok.vocab_size,
            eos_id: tok.eos_id,
        },
        token_dtype: tok.dtype,
        domain_key: config.domain_key.clone(),
        split_method,
        options: config.manifest_options(),
        inputs: files,
        splits: BTreeMap::new(),
        skipped: SkipReport::default(),
        dropped_documents: BTreeMap::new(),
    };

    let output = &config.output;
    let manifest_path = output.join(MANIFEST_FILE);
    let mut warnings = Vec::new();
    // A finished, intact dataset already there is kept until its replacement is
    // complete: a full disk or a crash mid-rebuild must not lose it.
    let mut keep_previous = false;
    // One prepare per output folder: held until this one returns.
    let _lock = crate::lock::FolderLock::acquire(output, "mixlm prepare")?;
    match Manifest::read(output) {
        Ok(Some(old)) => {
            let changes = old.differences(&manifest);
            keep_previous = config.force && shards_intact(output, &old);
            if !config.force {
                if !changes.is_empty() {
                    return Err(PrepareError::Changed {
                        output: output.clone(),
                        changes,
                    });
                }
                if shards_intact(output, &old) {
                    let mut s = PrepareSummary::from_manifest(
                        output,
                        &old,
                        start.elapsed().as_secs_f64(),
                        Vec::new(),
                    );
                    s.up_to_date = true;
                    return Ok(s);
                }
                warnings.push(
                    "the previous prepare's shards were missing or had the wrong size; rebuilt"
                        .into(),
                );
            }
        }
        Ok(None) => {}
        Err(e @ (ManifestReadError::Parse(_) | ManifestReadError::Version(_))) => {
            if !config.force {
                return Err(PrepareError::BadManifest {
                    path: manifest_path,
                    problem: e.to_string(),
                });
            }
        }
        Err(ManifestReadError::Io(e)) => return Err(PrepareError::io(&manifest_path, e)),
    }

    std::fs::create_dir_all(output).map_err(|e| PrepareError::io(output, e))?;
    let staging = output.join(STAGING_DIR);
    let previous = output.join(PREVIOUS_DIR);
    // What an interrupted rebuild left (never a finished dataset: that has a manifest).
    remove_dir_if_there(&staging)?;
    remove_dir_if_there(&previous)?;
    let dir = if keep_previous {
        std::fs::create_dir(&staging).map_err(|e| PrepareError::io(&staging, e))?;
        staging.clone()
    } else {
        // Nothing finished to keep: rebuild in place, first making the folder
        // unfinished, so an interruption never leaves an old manifest over new shards.
        remove_manifest(output)?;
        clear_previous(output)?;
        output.clone()
    };
    // Leaves no partial shards behind; the previous dataset, if kept, is untouched.
    let discard = |e: PrepareError| {
        if keep_previous {
            let _ = std::fs::remove_dir_all(&staging);
            PrepareError::RebuildFailed {
                output: output.clone(),
                source: Box::new(e),
            }
        } else {
            let _ = clear_previous(output);
            e
        }
    };

    let options = IngestOptions::new(
        &config.text_key,
        &config.domain_key,
        &config.rename,
        config.keep.as_deref(),
        &config.drop,
        config.on_error,
    )
    .with_default_domain(config.default_domain.clone())
    .with_quality(&config.quality_keys, config.quality_range);
    let built = build(config, &dir, &manifest, &tok, options).map_err(discard)?;
    let Built {
        splits,
        ingestor,
        input_bytes,
    } = built;

    let splits = if config.test_from_validation {
        split_validation_in_half(&dir, splits, tok.dtype).map_err(discard)?
    } else {
        splits
    };
    manifest.splits = splits;
    manifest.skipped = ingestor.report;
    manifest.dropped_documents = ingestor.dropped;
    if let Some(keep) = &config.keep {
        for k in keep {
            if !ingestor.seen_domains.contains(k) {
                warnings.push(format!(
                    "data.prepare.keep names `{k}`, which no record has (after renaming)"
                ));
            }
        }
    }
    for split in [Split::Train, Split::Validation] {
        if manifest.splits.get(&split).is_none_or(|d| d.is_empty()) {
            warnings.push(format!("the {split} split is empty"));
        }
    }
    if let (Some(train), Some(validation)) = (
        manifest.splits.get(&Split::Train),
        manifest.splits.get(&Split::Validation),
    ) {
        for d in train.keys() {
            if !validation.contains_key(d) {
                warnings.push(format!(
                    "domain `{d}` has no validation data, so no validation loss"
                ));
            }
        }
    }
    if let Some(train) = manifest.splits.get(&Split::Train) {
        for (split, domains) in &manifest.splits {
            for d in domains.keys() {
                if *split != Split::Train && !train.contains_key(d) {
                    warnings.push(format!(
                        "domain `{d}` has {split} data but no train data; training will not \
                         see it"
                    ));
                }
            }
        }
    }
    for (kind, n) in &manifest.skipped.counts {
        if *kind == SkipKind::EmptyFile {
            warnings.push(format!("{n} empty input file(s) skipped"));
        }
    }
    if keep_previous {
        // The new manifest is written in the staging folder first, so everything that
        // needs space is written while the previous dataset is still whole; the swap
        // only renames.
        manifest
            .write(&staging)
            .map_err(|e| discard(PrepareError::io(&staging.join(MANIFEST_FILE), e)))?;
        swap_in(output, &staging, &previous)?;
        let _ = std::fs::remove_dir_all(&previous);
        let _ = std::fs::remove_dir_all(&staging);
    } else {
        manifest
            .write(output)
            .map_err(|e| PrepareError::io(&manifest_path, e))?;
    }
    let mut summary =
        PrepareSummary::from_manifest(output, &manifest, start.elapsed().as_secs_f64(), warnings);
    summary.input_bytes = input_bytes;
    Ok(summary)
}

/// Seed tag of the validation/test half split (never change: it defines the splits).
const TAG_HALF_SPLIT: u64 = 0x68616c66; // "half"

/// Moves half of each domain's validation documents, chosen by a shuffle of their
/// indices seeded by the domain name, into a new test split (Aioli's convention of
/// halving a validation set). Both halves keep the documents' original order.
fn split_validation_in_half(
    output: &Path,
    mut splits: BTreeMap<Split, BTreeMap<String, ShardCounts>>,
    dtype: TokenDtype,
) -> Result<BTreeMap<Split, BTreeMap<String, ShardCounts>>, PrepareError> {
    use rand::seq::SliceRandom;
    if splits.get(&Split::Test).is_some_and(|d| !d.is_empty()) {
        return Err(PrepareError::config(
            "test_from_validation",
            "the inputs already have a test split; set test_from_validation = false or \
             test_fraction = 0"
                .to_string(),
        ));
    }
    let Some(validation) = splits.remove(&Split::Validation) else {
        return Ok(splits);
    };
    let (val_dir, test_dir) = (
        output.join(Split::Validation.name()),
        output.join(Split::Test.name()),
    );
    std::fs::create_dir_all(&test_dir).map_err(|e| PrepareError::io(&test_dir, e))?;
    let mut halves = [BTreeMap::new(), BTreeMap::new()];
    for domain in validation.keys() {
        let bin = shards::bin_path(&val_dir, domain);
        let idx = shards::idx_path(&val_dir, domain);
        let bytes = std::fs::read(&bin).map_err(|e| PrepareError::io(&bin, e))?;
        let offsets: Vec<u64> = std::fs::read(&idx)
            .map_err(|e| PrepareError::io(&idx, e))?
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        let mut tokens = Vec::new();
        dtype.decode_into(&bytes, &mut tokens);
        let docs = offsets.len().saturating_sub(1);
        let mut order: Vec<usize> = (0..docs).collect();
        order.shuffle(&mut crate::seeding::rng_from_words(&[
            TAG_HALF_SPLIT,
            crate::seeding::hash_str(domain),
        ]));
        let mut in_test = vec![false; docs];
        for &i in &order[docs / 2..] {
            in_test[i] = true;
        }
        let mut writers = [
            ShardWriter::create(&val_dir, domain, dtype).map_err(|e| PrepareError::io(&bin, e))?,
            ShardWriter::create(&test_dir, domain, dtype)
                .map_err(|e| PrepareError::io(&test_dir, e))?,
        ];
        for (i, &test) in in_test.iter().enumerate() {
            let doc = &tokens[offsets[i] as usize..offsets[i + 1] as usize];
            writers[test as usize]
                .push_document(doc)
                .map_err(|e| PrepareError::io(&bin, e))?;
        }
        for (half, writer) in halves.iter_mut().zip(writers) {
            let counts = writer.finish().map_err(|e| PrepareError::io(&bin, e))?;
            if counts.documents > 0 {
                half.insert(domain.clone(), counts);
            }
        }
        // An empty half (a domain with a single validation document) leaves no shard.
        for (half, dir) in halves.iter().zip([&val_dir, &test_dir]) {
            if !half.contains_key(domain) {
                let _ = std::fs::remove_file(shards::bin_path(dir, domain));
                let _ = std::fs::remove_file(shards::idx_path(dir, domain));
            }
        }
    }
    let [val, test] = halves;
    splits.insert(Split::Validation, val);
    splits.insert(Split::Test, test);
    Ok(splits)
}

struct Built {
    splits: BTreeMap<Split, BTreeMap<String, ShardCounts>>,
    ingestor: Ingestor,
    input_bytes: u64,
}

/// Reads, tokenizes and writes every shard (see the module docs for the threads).
fn build(
    config: &PrepareConfig,
    output: &Path,
    manifest: &Manifest,
    tok: &PreparedTokenizer,
    options: IngestOptions,
) -> Result<Built, PrepareError> {
    let files = &manifest.inputs;
    let total_bytes: u64 = files.iter().map(|f| f.bytes).sum();
    let consumed = Arc::new(AtomicU64::new(0));
    let bar = ProgressBar::new(total_bytes);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} (eta {eta}) {msg}",
        )
        .expect("valid template"),
    );

    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<Document>>(2);
    let batch_documents = config.batch_documents;
    let reader_consumed = consumed.clone();
    let mut writers: HashMap<(Split, String), ShardWriter> = HashMap::new();
    let (write_result, read_result) = std::thread::scope(|s| {
        let reader = s.spawn(move || -> Result<Ingestor, PrepareError> {
            let mut ingestor = Ingestor::new(options);
            let mut batch: Vec<Document> = Vec::new();
            let mut bytes = 0usize;
            let mut send = |doc: Option<Document>, batch: &mut Vec<Document>| {
                if let Some(doc) = doc {
                    bytes += doc.text.len();
                    batch.push(doc);
                    if batch.len() < batch_documents && bytes < BATCH_BYTES {
                        return Ok(());
                    }
                }
                bytes = 0;
                if batch.is_empty() {
                    return Ok(());
                }
                tx.send(std::mem::take(batch)).map_err(|_| SinkClosed)
            };
            for (i, file) in files.iter().enumerate() {
                let completed = ingestor.read_file(i, file, &reader_consumed, &mut |doc| {
                    send(Some(doc), &mut batch)
                })?;
                if !completed {
                    return Ok(ingestor);
                }
            }
            let _ = send(None, &mut batch);
            Ok(ingestor)
        });

        let mut docs_done = 0u64;
        let mut tokens_done = 0u64;
        let mut text_bytes = 0u64;
        let started = Instant::now();
        let mut encode_failures: Vec<(usize, u64, String)> = Vec::new();
        let mut write = || -> Result<(), PrepareError> {
            for batch in rx.iter() {
                let texts: Vec<&str> = batch.iter().map(|d| d.text.as_str()).collect();
                let (encoded, splits) = rayon::join(
                    || tok.encode_documents(&texts),
                    || {
                        batch
                            .iter()
                            .map(|d| {
                                d.split.unwrap_or_else(|| {
                                    hash_split(
                                        &d.text,
                                        config.validation_fraction,
                                        config.test_fraction,
                                    )
                                })
                            })
                            .collect::<Vec<_>>()
                    },
                );
                for ((doc, ids), split) in batch.iter().zip(encoded).zip(splits) {
                    text_bytes += doc.text.len() as u64;
                    let ids = match ids {
                        Ok(ids) => ids,
                        Err(e) => {
                            if config.on_error == OnError::Fail {
                                return Err(PrepareError::BadInput {
                                    location: format!(
                                        "{}:{}",
                                        files[doc.file].path.display(),
                                        doc.line
                                    ),
                                    kind: SkipKind::EncodeFailed,
                                    detail: format!("the tokenizer failed on the text ({e})"),
                                    advice: "check that data.prepare.tokenizer suits this \
                                             corpus, or set data.prepare.on_error = \"skip\"",
                                });
                            }
                            encode_failures.push((doc.file, doc.line, e));
                            continue;
                        }
                    };
                    if let Some(&bad) = ids.iter().find(|&&id| id as usize >= tok.vocab_size) {
                        return Err(PrepareError::Tokenizer {
                            path: tok.path.clone(),
                            message: format!(
                                "it produced id {bad}, outside its vocabulary of {}",
                                tok.vocab_size
                            ),
                        });
                    }
                    let key = (split, doc.domain.clone());
                    let writer = match writers.entry(key) {
                        std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
                        std::collections::hash_map::Entry::Vacant(v) => {
                            let dir = output.join(split.name());
                            std::fs::create_dir_all(&dir).map_err(|e| PrepareError::io(&dir, e))?;
                            let mut w = ShardWriter::create(&dir, &doc.domain, tok.dtype)
                                .map_err(|e| PrepareError::io(&dir, e))?;
                            if split == Split::Train && doc.quality.is_some() {
                                w = w
                                    .with_quality(&dir, &doc.domain)
                                    .map_err(|e| PrepareError::io(&dir, e))?;
                            }
                            v.insert(w)
                        }
                    };
                    writer
                        .push_document(&ids)
                        .map_err(|e| PrepareError::io(writer.bin_path(), e))?;
                    if let (Split::Train, Some(q)) = (split, doc.quality) {
                        writer
                            .push_quality(q)
                            .map_err(|e| PrepareError::io(writer.bin_path(), e))?;
                    }
                    docs_done += 1;
                    tokens_done += ids.len() as u64;
                }
                let secs = started.elapsed().as_secs_f64().max(1e-9);
                bar.set_position(consumed.load(Ordering::Relaxed));
                bar.set_message(format!(
                    "{docs_done} docs, {:.1} MB/s text, {:.0}k tokens/s",
                    text_bytes as f64 / 1e6 / secs,
                    tokens_done as f64 / 1e3 / secs
                ));
            }
            Ok(())
        };
        let write_result = write();
        // Closing the channel stops the reader if the writer gave up early.
        drop(rx);
        let read_result = reader.join().expect("the input reader thread panicked");
        (write_result.map(|()| encode_failures), read_result)
    });
    bar.finish_and_clear();
    let encode_failures = write_result?;
    let mut ingestor = read_result?;
    for (file, line, e) in encode_failures {
        ingestor.encode_failed(
            &files[file].path,
            line,
            format!("the tokenizer failed on the text ({e})"),
        )?;
    }

    let mut splits: BTreeMap<Split, BTreeMap<String, ShardCounts>> = BTreeMap::new();
    for ((split, domain), w) in writers {
        let path = w.bin_path().to_path_buf();
        let counts = w.finish().map_err(|e| PrepareError::io(&path, e))?;
        splits.entry(split).or_default().insert(domain, counts);
    }
    for split in splits.keys() {
        manifest::sync_dir(&output.join(split.name()));
    }
    Ok(Built {
        splits,
        ingestor,
        input_bytes: total_bytes,
    })
}

#[cfg(any(test, feature = "testutil"))]
#[doc(hidden)]
pub mod testutil;

#[cfg(test)]
mod tests;
