//! Reading raw documents: resolving the input list into files, decoding `.jsonl` /
//! `.jsonl.zst` line by line (`.parquet`: [`super::parquet_input`]), extracting `(domain, text)` from each record, mapping
//! domains (rename / keep / drop) and deciding each document's split.
//!
//! Everything here streams: one line is in memory at a time (plus the batch the
//! caller accumulates), whatever the size of a file.

use super::{OnError, PrepareError};
use crate::source::Split;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// How many `file:line: problem` examples a [`SkipReport`] keeps.
pub const MAX_EXAMPLES: usize = 10;

/// One input file, as found when the input list was resolved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputFile {
    /// The path as resolved from `data.prepare.inputs` (not canonicalised, so it
    /// reads like what the user wrote).
    pub path: PathBuf,
    /// Size on disk; with the modification time, what decides "unchanged" on a re-run.
    pub bytes: u64,
    /// Modification time, whole seconds since the Unix epoch.
    pub mtime_unix: i64,
    /// Sub-second part of the modification time, so a same-size rewrite within one
    /// second is still noticed where the filesystem records it.
    pub mtime_nanos: u32,
    /// The dataset's own split, from a `train` / `validation` / `valid` / `val` /
    /// `test` path component ([`split_from_path`]); `None`: split by text hash.
    pub split: Option<Split>,
}

impl InputFile {
    fn stat(path: PathBuf) -> Result<Self, PrepareError> {
        let meta = std::fs::metadata(&path).map_err(|e| PrepareError::io(&path, e))?;
        let (mtime_unix, mtime_nanos) = match meta.modified() {
            Ok(t) => match t.duration_since(std::time::UNIX_EPOCH) {
                Ok(d) => (d.as_secs() as i64, d.subsec_nanos()),
                Err(e) => (
                    -(e.duration().as_secs() as i64),
                    e.duration().subsec_nanos(),
                ),
            },
            Err(_) => (0, 0),
        };
        let split = split_from_path(&path);
        Ok(Self {
            path,
            bytes: meta.len(),
            mtime_unix,
            mtime_nanos,
            split,
        })
    }

    /// Whether the file is zstd-compressed (its name ends in `.zst`).
    pub fn is_zstd(&self) -> bool {
        has_suffix(&self.path, ".zst")
    }

    /// Whether the file is parquet (its name ends in `.parquet`); anything else is
    /// read as JSON lines.
    pub fn is_parquet(&self) -> bool {
        is_parquet(&self.path)
    }
}

fn has_suffix(path: &Path, suffix: &str) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.ends_with(suffix))
}

fn is_parquet(path: &Path) -> bool {
    has_suffix(path, ".parquet")
}

/// Whether a file found while walking a folder is a corpus file.
fn is_corpus_file(path: &Path) -> bool {
    has_suffix(path, ".jsonl") || has_suffix(path, ".jsonl.zst") || is_parquet(path)
}

/// `train-00000-of-00048-ab2b35705f029d94` -> `train`: the split part of a Hugging
/// Face shard name (`{split}-{index}-of-{count}[-{hash}]`), or the stem unchanged.
fn hf_shard_split(stem: &str) -> &str {
    let Some((head, rest)) = stem.split_once('-') else {
        return stem;
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let mut parts = rest.splitn(4, '-');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(index), Some("of"), Some(count)) if digits(index) && digits(count) => head,
        _ => stem,
    }
}

/// A file name without its corpus extension (`.jsonl.zst`, `.jsonl`, `.parquet`);
/// other names unchanged.
pub fn corpus_stem(name: &str) -> &str {
    [".jsonl.zst", ".jsonl", ".parquet"]
        .iter()
        .find_map(|ext| name.strip_suffix(ext))
        .unwrap_or(name)
}

/// The split a path names, if any: the component nearest the file among the folder
/// names and the file's stem (`.jsonl` / `.jsonl.zst` / `.parquet` removed, and a
/// Hugging Face shard suffix `-00000-of-00048-<hash>` too) that is, ignoring ASCII
/// case, `train`, `validation` / `valid` / `val`, or `test`.
///
/// This is how a corpus brings its own splits (SlimPajama-627B: `train/`,
/// `validation/`, `test/`; SlimPajama-6B: `data/train-00000-of-00048-….parquet`;
/// other sets: `train.jsonl`, `val.jsonl`). The whole path is looked at, so a folder
/// named `test` above the corpus would mark every file as test data: the manifest
/// lists each input's split so this is visible.
pub fn split_from_path(path: &Path) -> Option<Split> {
    let mut found = None;
    for c in path.components() {
        let Component::Normal(name) = c else { continue };
        let Some(name) = name.to_str() else { continue };
        let name = corpus_stem(name);
        let split = match hf_shard_split(name).to_ascii_lowercase().as_str() {
            "train" => Some(Split::Train),
            "validation" | "valid" | "val" => Some(Split::Validation),
            "test" => Some(Split::Test),
            _ => None,
        };
        if split.is_some() {
            found = split;
        }
    }
    found
}

fn has_glob_chars(s: &str) -> bool {
    s.contains(['*', '?', '['])
}

/// Every `*.jsonl` / `*.jsonl.zst` / `*.parquet` file under `dir`, recursively, sorted by path.
fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), PrepareError> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| PrepareError::io(dir, e))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .map_err(|e| PrepareError::io(dir, e))?;
    entries.sort();
    for path in entries {
        // `metadata` follows symlinks, so linked files and folders are read too.
        let meta = std::fs::metadata(&path).map_err(|e| PrepareError::io(&path, e))?;
        if meta.is_dir() {
            walk(&path, out)?;
        } else if meta.is_file() && is_corpus_file(&path) {
            out.push(path);
        }
    }
    Ok(())
}

/// Resolves `data.prepare.inputs` into files, in input order; each folder is walked
/// recursively for `*.jsonl`, `*.jsonl.zst` and `*.parquet` (sorted by path, for determinism), each
/// glob pattern expands in sorted order, and a file named directly is taken whatever
/// its extension (`.zst` means zstd). A file reached twice is read once.
pub fn resolve_inputs(inputs: &[String]) -> Result<Vec<InputFile>, PrepareError> {
    let mut paths = Vec::new();
    for input in inputs {
        let path = Path::new(input);
        let before = paths.len();
        if path.is_dir() {
            walk(path, &mut paths)?;
            if paths.len() == before {
                return Err(PrepareError::config(
                    "inputs",
                    format!("folder `{input}` has no *.jsonl, *.jsonl.zst or *.parquet files"),
                ));
            }
        } else if path.is_file() {
            paths.push(path.to_path_buf());
        } else if has_glob_chars(input) {
            let matches = glob::glob(input).map_err(|e| {
                PrepareError::config("inputs", format!("`{input}` is not a valid glob: {e}"))
            })?;
            for m in matches {
                let m = m.map_err(|e| {
                    let path = e.path().to_path_buf();
                    PrepareError::io(&path, e.into())
                })?;
                if m.is_dir() {
                    walk(&m, &mut paths)?;
                } else if m.is_file() {
                    paths.push(m);
                }
            }
            if paths.len() == before {
                return Err(PrepareError::config(
                    "inputs",
                    format!("pattern `{input}` matches no files"),
                ));
            }
        } else {
            return Err(PrepareError::config(
                "inputs",
                format!("`{input}` does not exist (it is not a file, a folder or a glob pattern)"),
            ));
        }
    }
    let mut seen = HashSet::new();
    let mut files = Vec::with_capacity(paths.len());
    for path in paths {
        let key = std::fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
        if seen.insert(key) {
            files.push(InputFile::stat(path)?);
        }
    }
    Ok(files)
}

/// What was wrong with a skipped record or file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SkipKind {
    /// The line is not valid JSON.
    InvalidJson,
    /// The line has bytes that are not UTF-8.
    InvalidUtf8,
    /// No domain at `data.prepare.domain_key`, not a string, or not usable as a
    /// shard file name.
    BadDomain,
    /// No text at `data.prepare.text_key`, or not a string.
    BadText,
    /// A `data.prepare.quality_keys` field missing, not a number, or a sum outside
    /// `data.prepare.quality_range`.
    BadQuality,
    /// A `.zst` stream that is truncated or corrupt; the complete lines before the
    /// damage are kept (under `skip`).
    CorruptCompression,
    /// A `.parquet` file that cannot be read (no valid footer, a damaged page, an
    /// unsupported codec); the rows decoded before the damage are kept (under `skip`).
    CorruptFile,
    /// A file with no records.
    EmptyFile,
    /// The tokenizer failed on the text.
    EncodeFailed,
}

impl SkipKind {
    pub fn name(self) -> &'static str {
        match self {
            SkipKind::InvalidJson => "invalid_json",
            SkipKind::InvalidUtf8 => "invalid_utf8",
            SkipKind::BadDomain => "bad_domain",
            SkipKind::BadText => "bad_text",
            SkipKind::BadQuality => "bad_quality",
            SkipKind::CorruptCompression => "corrupt_compression",
            SkipKind::CorruptFile => "corrupt_file",
            SkipKind::EmptyFile => "empty_file",
            SkipKind::EncodeFailed => "encode_failed",
        }
    }

    /// What to do about it (appended to the error under `on_error = "fail"`).
    fn advice(self) -> &'static str {
        match self {
            SkipKind::CorruptCompression => {
                "re-download or recompress the file, or set data.prepare.on_error = \"skip\" \
                 to keep the complete lines before the damage"
            }
            SkipKind::CorruptFile => {
                "re-download or rewrite the file, or set data.prepare.on_error = \"skip\" to \
                 keep the rows before the damage"
            }
            SkipKind::EmptyFile => {
                "remove it from data.prepare.inputs, or set data.prepare.on_error = \"skip\" \
                 to count it as a warning"
            }
            SkipKind::BadDomain => {
                "fix the record, check data.prepare.domain_key, or set data.prepare.on_error = \
                 \"skip\" to skip such records (they are counted in the manifest)"
            }
            SkipKind::BadText => {
                "fix the record, check data.prepare.text_key, or set data.prepare.on_error = \
                 \"skip\" to skip such records (they are counted in the manifest)"
            }
            SkipKind::BadQuality => {
                "fix the record, check data.prepare.quality_keys and quality_range, or set \
                 data.prepare.on_error = \"skip\" to skip such records (they are counted in the \
                 manifest)"
            }
            _ => {
                "fix or remove the line, or set data.prepare.on_error = \"skip\" to skip bad \
                 records (they are counted in the manifest)"
            }
        }
    }
}

impl std::fmt::Display for SkipKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Bad input met under `on_error = "skip"`: how many of each kind, and the first
/// [`MAX_EXAMPLES`] as `file:line: problem`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkipReport {
    pub counts: BTreeMap<SkipKind, u64>,
    pub examples: Vec<String>,
}

impl SkipReport {
    /// Total skipped records and files.
    pub fn total(&self) -> u64 {
        self.counts.values().sum()
    }

    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }

    pub fn count(&self, kind: SkipKind) -> u64 {
        self.counts.get(&kind).copied().unwrap_or(0)
    }

    pub(crate) fn add(&mut self, kind: SkipKind, location: String, detail: &str) {
        *self.counts.entry(kind).or_insert(0) += 1;
        if self.examples.len() < MAX_EXAMPLES {
            self.examples.push(format!("{location}: {detail}"));
        }
    }
}

/// A document ready for tokenizing.
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    pub text: String,
    /// The domain after renaming.
    pub domain: String,
    /// The record's quality on 0..10 (`data.prepare.quality_keys`), if asked for.
    pub quality: Option<f32>,
    /// The input's own split; `None`: decided by [`hash_split`].
    pub split: Option<Split>,
    /// Index of the file in the resolved inputs, and the 1-based line, for messages.
    pub file: usize,
    pub line: u64,
}

/// The record-level settings of ingest, from `PrepareConfig`.
#[derive(Debug, Clone)]
pub struct IngestOptions {
    /// JSON pointer (`/meta/redpajama_set_name`) built from the dotted key.
    domain_pointer: String,
    pub(super) domain_key: String,
    text_pointer: String,
    pub(super) text_key: String,
    rename: BTreeMap<String, String>,
    keep: Option<BTreeSet<String>>,
    drop: BTreeSet<String>,
    on_error: OnError,
    /// The domain of records without one.
    pub(super) default_domain: Option<String>,
    /// The quality fields, if documents carry a score.
    pub(super) quality: Option<QualityFields>,
}

/// The numeric fields whose sum is a document's quality, and the range of that sum
/// mapped onto 0..10 (`data.prepare.quality_keys` / `quality_range`).
#[derive(Debug, Clone)]
pub(super) struct QualityFields {
    pub(super) keys: Vec<String>,
    pub(super) pointers: Vec<String>,
    pub(super) range: [f64; 2],
}

impl QualityFields {
    /// The sum of the fields' values mapped from `range` onto 0..10, or the problem.
    pub(super) fn score(
        &self,
        mut value: impl FnMut(usize) -> Result<f64, String>,
    ) -> Result<f32, (SkipKind, String)> {
        let mut sum = 0.0;
        for i in 0..self.keys.len() {
            sum += value(i).map_err(|why| {
                (
                    SkipKind::BadQuality,
                    format!(
                        "the quality `{}` (data.prepare.quality_keys) {why}",
                        self.keys[i]
                    ),
                )
            })?;
        }
        let [lo, hi] = self.range;
        // A sum of decimals may miss an end by a rounding error.
        let slack = 1e-9 * (hi - lo);
        if !(lo - slack..=hi + slack).contains(&sum) {
            return Err((
                SkipKind::BadQuality,
                format!(
                    "the quality {} = {sum} is outside data.prepare.quality_range [{lo}, {hi}]",
                    self.keys.join(" + ")
                ),
            ));
        }
        Ok((10.0 * ((sum - lo) / (hi - lo)).clamp(0.0, 1.0)) as f32)
    }
}

/// A JSON value as a quality number: a number, or a string holding one.
pub(super) fn json_number(v: Option<&serde_json::Value>) -> Result<f64, String> {
    let n = match v {
        None => return Err("is missing".into()),
        Some(serde_json::Value::Number(n)) => n.as_f64(),
        Some(serde_json::Value::String(s)) => s.trim().parse::<f64>().ok(),
        Some(other) => return Err(format!("is {}, not a number", describe(other))),
    };
    match n {
        Some(x) if x.is_finite() => Ok(x),
        _ => Err(format!("is {}, not a finite number", v.expect("present"))),
    }
}

/// What one record holds: its raw domain, text, and quality if asked for.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Record {
    pub(super) domain: String,
    pub(super) text: String,
    pub(super) quality: Option<f32>,
}

impl IngestOptions {
    pub fn new(
        text_key: &str,
        domain_key: &str,
        rename: &BTreeMap<String, String>,
        keep: Option<&[String]>,
        drop: &[String],
        on_error: OnError,
    ) -> Self {
        Self {
            domain_pointer: json_pointer(domain_key),
            domain_key: domain_key.to_string(),
            text_pointer: json_pointer(text_key),
            text_key: text_key.to_string(),
            rename: rename.clone(),
            keep: keep.map(|k| k.iter().cloned().collect()),
            drop: drop.iter().cloned().collect(),
            on_error,
            default_domain: None,
            quality: None,
        }
    }

    /// SlimPajama's layout (`text`, `meta.redpajama_set_name`), no renames or filters.
    pub fn slimpajama(on_error: OnError) -> Self {
        Self::new(
            "text",
            "meta.redpajama_set_name",
            &BTreeMap::new(),
            None,
            &[],
            on_error,
        )
    }

    /// Documents carry the sum of these numeric fields, mapped from `range` onto 0..10
    /// (no keys: no quality).
    pub fn with_quality(mut self, keys: &[String], range: [f64; 2]) -> Self {
        self.quality = (!keys.is_empty()).then(|| QualityFields {
            keys: keys.to_vec(),
            pointers: keys.iter().map(|k| json_pointer(k)).collect(),
            range,
        });
        self
    }

    /// Records without a domain field go to `domain` instead of being bad input.
    pub fn with_default_domain(mut self, domain: Option<String>) -> Self {
        self.default_domain = domain;
        self
    }
}

/// `a.b.c` -> `/a/b/c`, escaping `~` and `/` inside a segment as RFC 6901 requires.
pub(super) fn json_pointer(dotted: &str) -> String {
    dotted
        .split('.')
        .map(|seg| format!("/{}", seg.replace('~', "~0").replace('/', "~1")))
        .collect()
}

/// Why a domain name cannot name a shard file, if it cannot.
pub fn domain_name_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("it is empty")
    } else if name.starts_with('.') {
        Some("it starts with `.`")
    } else if name.contains(['/', '\\', '\0']) {
        Some("it contains `/`, `\\` or a NUL byte")
    } else if name.len() > 200 {
        Some("it is longer than 200 bytes")
    } else {
        None
    }
}

pub(super) fn describe(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// Counts bytes read from the underlying file, for the progress bar.
struct CountingReader<R> {
    inner: R,
    count: Arc<AtomicU64>,
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// Reads files into [`Document`]s, applying the error policy and the domain mapping,
/// and keeps the tallies that end up in the manifest.
#[derive(Debug)]
pub struct Ingestor {
    pub(super) options: IngestOptions,
    /// Bad input met under `skip`.
    pub report: SkipReport,
    /// Documents left out by `keep` / `drop`, by domain (after renaming).
    pub dropped: BTreeMap<String, u64>,
    /// Every domain met (after renaming, kept or not), to warn about `keep` names
    /// that never occurred.
    pub seen_domains: BTreeSet<String>,
    /// Domain names already checked by [`domain_name_problem`].
    valid_names: HashSet<String>,
}

/// The sink returned an error: stop reading (the error itself is the sink's).
pub struct SinkClosed;

impl Ingestor {
    pub fn new(options: IngestOptions) -> Self {
        Self {
            options,
            report: SkipReport::default(),
            dropped: BTreeMap::new(),
            seen_domains: BTreeSet::new(),
            valid_names: HashSet::new(),
        }
    }

    /// Under `fail`, the error; under `skip`, counts it and carries on.
    pub(super) fn problem(
        &mut self,
        file: &Path,
        line: Option<u64>,
        kind: SkipKind,
        detail: String,
    ) -> Result<(), PrepareError> {
        match self.options.on_error {
            OnError::Fail => Err(PrepareError::BadInput {
                location: location(file, line),
                kind,
                detail,
                advice: kind.advice(),
            }),
            OnError::Skip => {
                self.report.add(kind, location(file, line), &detail);
                Ok(())
            }
        }
    }

    /// Records a document the tokenizer could not encode (the policy applies).
    pub(crate) fn encode_failed(
        &mut self,
        file: &Path,
        line: u64,
        detail: String,
    ) -> Result<(), PrepareError> {
        self.problem(file, Some(line), SkipKind::EncodeFailed, detail)
    }

    /// Extracts the record from one line, or says what is wrong with it.
    fn parse_line(&self, line: &[u8]) -> Result<Record, (SkipKind, String)> {
        let s = std::str::from_utf8(line).map_err(|e| {
            (
                SkipKind::InvalidUtf8,
                format!(
                    "the line is not valid UTF-8 (bad byte at offset {})",
                    e.valid_up_to()
                ),
            )
        })?;
        let mut v: serde_json::Value = serde_json::from_str(s).map_err(|e| {
            (
                SkipKind::InvalidJson,
                format!("the line is not valid JSON ({e})"),
            )
        })?;
        if !v.is_object() {
            return Err((
                SkipKind::InvalidJson,
                format!("the line is {}, not a JSON object", describe(&v)),
            ));
        }
        let domain = match (
            v.pointer(&self.options.domain_pointer),
            &self.options.default_domain,
        ) {
            (Some(serde_json::Value::String(d)), _) | (None, Some(d)) => d.clone(),
            (other, _) => {
                let found = other.map(describe);
                return Err(field_problem(&self.options, SkipKind::BadDomain, found));
            }
        };
        let text = match v.pointer_mut(&self.options.text_pointer).map(|t| t.take()) {
            Some(serde_json::Value::String(t)) => t,
            other => {
                let found = other.as_ref().map(describe);
                return Err(field_problem(&self.options, SkipKind::BadText, found));
            }
        };
        let quality = match &self.options.quality {
            None => None,
            Some(q) => Some(q.score(|i| json_number(v.pointer(&q.pointers[i])))?),
        };
        Ok(Record {
            domain,
            text,
            quality,
        })
    }

    /// Renames, then applies `drop` and `keep`: the domain to store the document
    /// under, `Ok(None)` when it is dropped, `Err` when the name cannot name a file.
    pub(super) fn map_domain(&mut self, raw: String) -> Result<Option<String>, String> {
        let name = match self.options.rename.get(&raw) {
            Some(new) => new.clone(),
            None => raw,
        };
        if !self.valid_names.contains(&name) {
            if let Some(why) = domain_name_problem(&name) {
                return Err(format!(
                    "domain `{name}` cannot name a shard file ({why}); map it to another name \
                     with data.prepare.rename"
                ));
            }
            self.valid_names.insert(name.clone());
            self.seen_domains.insert(name.clone());
        }
        let dropped = self.options.drop.contains(&name)
            || self
                .options
                .keep
                .as_ref()
                .is_some_and(|k| !k.contains(&name));
        if dropped {
            *self.dropped.entry(name).or_insert(0) += 1;
            Ok(None)
        } else {
            Ok(Some(name))
        }
    }

    /// Streams one file's documents into `sink`, in line (row) order.
    ///
    /// `consumed` is advanced by the bytes read from disk (compressed bytes for
    /// `.zst`). Returns `Ok(false)` when the sink refused a document (`SinkClosed`:
    /// the consumer has stopped, with its own error), `Ok(true)` otherwise.
    /// Hands one parsed record (or its problem) to `sink` as a
    /// [`Document`] after renaming and checking its domain; problems are reported
    /// (or skipped and counted) against `line` of `file`. `Ok(false)`: the sink
    /// closed, stop reading.
    pub(super) fn emit(
        &mut self,
        index: usize,
        file: &InputFile,
        line: u64,
        record: Result<Record, (SkipKind, String)>,
        sink: &mut dyn FnMut(Document) -> Result<(), SinkClosed>,
    ) -> Result<bool, PrepareError> {
        let Record {
            domain: raw_domain,
            text,
            quality,
        } = match record {
            Ok(r) => r,
            Err((kind, detail)) => {
                self.problem(&file.path, Some(line), kind, detail)?;
                return Ok(true);
            }
        };
        let domain = match self.map_domain(raw_domain) {
            Ok(Some(d)) => d,
            Ok(None) => return Ok(true),
            Err(detail) => {
                self.problem(&file.path, Some(line), SkipKind::BadDomain, detail)?;
                return Ok(true);
            }
        };
        let doc = Document {
            text,
            domain,
            quality,
            split: file.split,
            file: index,
            line,
        };
        Ok(sink(doc).is_ok())
    }

    /// Reads one input file (jsonl, jsonl.zst or parquet) and hands each document to
    /// `sink`; bad records follow `on_error`. `index` is the file's number in the
    /// manifest, `consumed` counts the bytes read (for progress). `Ok(false)`: the
    /// sink closed. Public so the reader can be fuzzed on its own.
    pub fn read_file(
        &mut self,
        index: usize,
        file: &InputFile,
        consumed: &Arc<AtomicU64>,
        sink: &mut dyn FnMut(Document) -> Result<(), SinkClosed>,
    ) -> Result<bool, PrepareError> {
        let path = &file.path;
        let empty_detail = "the file is empty (no records)".to_string();
        if file.bytes == 0 {
            self.problem(path, None, SkipKind::EmptyFile, empty_detail)?;
            return Ok(true);
        }
        if file.is_parquet() {
            return self.read_parquet(index, file, consumed, sink);
        }
        let raw = File::open(path).map_err(|e| PrepareError::io(path, e))?;
        let counting = CountingReader {
            inner: raw,
            count: consumed.clone(),
        };
        let mut reader: Box<dyn BufRead> = if file.is_zstd() {
            let decoder = zstd::stream::read::Decoder::new(counting)
                .map_err(|e| PrepareError::io(path, e))?;
            Box::new(BufReader::with_capacity(1 << 20, decoder))
        } else {
            Box::new(BufReader::with_capacity(1 << 20, counting))
        };
        let mut buf = Vec::with_capacity(1 << 16);
        let mut line_no = 0u64;
        let mut records = 0u64;
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if file.is_zstd() => {
                    // A partial line read before the damage is discarded with `buf`.
                    self.problem(
                        path,
                        Some(line_no + 1),
                        SkipKind::CorruptCompression,
                        format!(
                            "the zstd stream is truncated or corrupt ({e}); {line_no} complete \
                             lines were read before it"
                        ),
                    )?;
                    return Ok(true);
                }
                Err(e) => return Err(PrepareError::io(path, e)),
            }
            line_no += 1;
            let mut line = &buf[..];
            while let [rest @ .., b'\n' | b'\r'] = line {
                line = rest;
            }
            if line.iter().all(u8::is_ascii_whitespace) {
                // Blank lines carry no record (editors and `cat` leave them).
                continue;
            }
            records += 1;
            let record = self.parse_line(line);
            if !self.emit(index, file, line_no, record, sink)? {
                return Ok(false);
            }
        }
        if records == 0 {
            self.problem(path, None, SkipKind::EmptyFile, empty_detail)?;
        }
        Ok(true)
    }
}

/// `file:line`, or `file row N` for parquet (rows, not lines, number its records).
fn location(file: &Path, line: Option<u64>) -> String {
    match line {
        Some(l) if is_parquet(file) => format!("{} row {l}", file.display()),
        Some(l) => format!("{}:{l}", file.display()),
        None => file.display().to_string(),
    }
}

/// The message for a missing (`found: None`) or non-string (`found`: what it is)
/// domain or text, worded the same for JSON lines and parquet.
pub(super) fn field_problem(
    options: &IngestOptions,
    kind: SkipKind,
    found: Option<&str>,
) -> (SkipKind, String) {
    let (what, key, setting) = match kind {
        SkipKind::BadDomain => ("domain", &options.domain_key, "domain_key"),
        _ => ("text", &options.text_key, "text_key"),
    };
    let detail = match found {
        Some(found) => {
            format!("the {what} `{key}` (data.prepare.{setting}) is {found}, not a string")
        }
        None => format!("the record has no `{key}` (data.prepare.{setting})"),
    };
    (kind, detail)
}

/// The hash split's position of a text in `[0, 1)`: the first 8 bytes of the
/// SHA-256 of its UTF-8 bytes, read as a big-endian `u64`, divided by 2^64.
///
/// A function of the text alone, so a document lands in the same split whatever
/// file, order or machine it comes from, and exact duplicates never straddle splits.
pub fn hash_unit(text: &str) -> f64 {
    let digest = Sha256::digest(text.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    // Top 53 bits, so the division is exact and the result is < 1.
    (u64::from_be_bytes(first) >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// The split of a text under the hash split: validation when
/// `u < validation_fraction`, test when `u < validation_fraction + test_fraction`,
/// train otherwise, with `u = hash_unit(text)`.
pub fn hash_split(text: &str, validation_fraction: f64, test_fraction: f64) -> Split {
    let u = hash_unit(text);
    if u < validation_fraction {
        Split::Validation
    } else if u < validation_fraction + test_fraction {
        Split::Test
    } else {
        Split::Train
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(on_error: OnError) -> IngestOptions {
        IngestOptions::slimpajama(on_error)
    }

    #[test]
    fn split_names_in_paths() {
        let s = |p: &str| split_from_path(Path::new(p));
        assert_eq!(s("corpus/train/a.jsonl.zst"), Some(Split::Train));
        assert_eq!(
            s("corpus/validation/chunk1/a.jsonl"),
            Some(Split::Validation)
        );
        assert_eq!(s("x/VAL/a.jsonl"), Some(Split::Validation));
        assert_eq!(s("x/valid/a.jsonl"), Some(Split::Validation));
        assert_eq!(s("/data/test/a.jsonl"), Some(Split::Test));
        assert_eq!(s("data/val.jsonl"), Some(Split::Validation));
        assert_eq!(s("data/train.jsonl.zst"), Some(Split::Train));
        // Nearest component wins.
        assert_eq!(s("test/corpus/train/a.jsonl"), Some(Split::Train));
        assert_eq!(s("data/training/a.jsonl"), None);
        // Hugging Face shard names (SlimPajama-6B).
        let hf = "data/train-00000-of-00048-ab2b35705f029d94.parquet";
        assert_eq!(s(hf), Some(Split::Train));
        assert_eq!(
            s("data/validation-00000-of-00001-7a1e.parquet"),
            Some(Split::Validation)
        );
        assert_eq!(s("data/test-00003-of-00004.parquet"), Some(Split::Test));
        assert_eq!(s("data/train.parquet"), Some(Split::Train));
        assert_eq!(s("data/train-extra-of-00001.parquet"), None);
        assert_eq!(s("data/train-00000-of-x.parquet"), None);
        assert_eq!(s("data/example_train_0.jsonl"), None);
    }

    #[test]
    fn json_pointer_escapes() {
        assert_eq!(
            json_pointer("meta.redpajama_set_name"),
            "/meta/redpajama_set_name"
        );
        assert_eq!(json_pointer("a/b.c~d"), "/a~1b/c~0d");
    }

    #[test]
    fn parse_line_extracts_and_diagnoses() {
        let ing = Ingestor::new(opts(OnError::Fail));
        let ok = br#"{"text":"hi","meta":{"redpajama_set_name":"A","x":1},"id":3}"#;
        let r = ing.parse_line(ok).unwrap();
        assert_eq!(
            (r.domain.as_str(), r.text.as_str(), r.quality),
            ("A", "hi", None)
        );
        let kind = |l: &[u8]| ing.parse_line(l).unwrap_err().0;
        assert_eq!(kind(b"{\"text\": "), SkipKind::InvalidJson);
        assert_eq!(kind(b"[1,2]"), SkipKind::InvalidJson);
        assert_eq!(kind(b"{\"text\":\"\xff\"}"), SkipKind::InvalidUtf8);
        assert_eq!(kind(br#"{"text":"a"}"#), SkipKind::BadDomain);
        assert_eq!(
            kind(br#"{"text":"a","meta":{"redpajama_set_name":5}}"#),
            SkipKind::BadDomain
        );
        assert_eq!(
            kind(br#"{"meta":{"redpajama_set_name":"A"}}"#),
            SkipKind::BadText
        );
        assert_eq!(
            kind(br#"{"text":null,"meta":{"redpajama_set_name":"A"}}"#),
            SkipKind::BadText
        );
    }

    #[test]
    fn domain_mapping_renames_merges_keeps_and_drops() {
        let rename: BTreeMap<String, String> = [("A", "x"), ("B", "x"), ("C", "c")]
            .into_iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        let keep = vec!["x".to_string(), "c".to_string(), "D".to_string()];
        let drop = vec!["c".to_string()];
        let mut ing = Ingestor::new(IngestOptions::new(
            "text",
            "d",
            &rename,
            Some(&keep),
            &drop,
            OnError::Fail,
        ));
        assert_eq!(ing.map_domain("A".into()).unwrap(), Some("x".into()));
        assert_eq!(ing.map_domain("B".into()).unwrap(), Some("x".into()));
        assert_eq!(ing.map_domain("C".into()).unwrap(), None);
        assert_eq!(ing.map_domain("E".into()).unwrap(), None);
        assert_eq!(ing.map_domain("D".into()).unwrap(), Some("D".into()));
        assert!(ing.map_domain("../etc".into()).is_err());
        assert_eq!(ing.dropped.get("c"), Some(&1));
        assert_eq!(ing.dropped.get("E"), Some(&1));
    }

    #[test]
    fn hash_split_is_stable_and_proportional() {
        // Pinned: SHA-256("hello") starts 2cf24dba5fb0a30e.
        let u = hash_unit("hello");
        assert!((u - 0x2cf2_4dba_5fb0_a30eu64 as f64 / 2f64.powi(64)).abs() < 1e-15);
        let n = 20_000;
        let mut counts = [0usize; 3];
        for i in 0..n {
            counts[hash_split(&format!("doc {i}"), 0.1, 0.05).tag() as usize] += 1;
        }
        let frac = |c: usize| c as f64 / n as f64;
        assert!((frac(counts[1]) - 0.1).abs() < 0.01, "{counts:?}");
        assert!((frac(counts[2]) - 0.05).abs() < 0.01, "{counts:?}");
        assert_eq!(hash_split("hello", 0.0, 0.0), Split::Train);
    }

    #[test]
    fn resolve_walks_folders_sorted_and_dedups() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("train/sub")).unwrap();
        std::fs::create_dir_all(root.join("validation")).unwrap();
        for p in [
            "train/b.jsonl",
            "train/a.jsonl.zst",
            "train/sub/c.jsonl",
            "train/notes.txt",
            "validation/a.jsonl",
        ] {
            std::fs::write(root.join(p), "x").unwrap();
        }
        let r = |inputs: &[String]| {
            resolve_inputs(inputs)
                .unwrap()
                .into_iter()
                .map(|f| {
                    let rel = f.path.strip_prefix(root).unwrap().to_path_buf();
                    (rel.to_string_lossy().into_owned(), f.split)
                })
                .collect::<Vec<_>>()
        };
        let root_s = root.to_string_lossy().into_owned();
        assert_eq!(
            r(std::slice::from_ref(&root_s)),
            vec![
                ("train/a.jsonl.zst".into(), Some(Split::Train)),
                ("train/b.jsonl".into(), Some(Split::Train)),
                ("train/sub/c.jsonl".into(), Some(Split::Train)),
                ("validation/a.jsonl".into(), Some(Split::Validation)),
            ]
        );
        // A glob, then a file already matched: read once.
        let files = r(&[
            format!("{root_s}/*/a.jsonl*"),
            format!("{root_s}/train/a.jsonl.zst"),
        ]);
        assert_eq!(
            files,
            vec![
                ("train/a.jsonl.zst".into(), Some(Split::Train)),
                ("validation/a.jsonl".into(), Some(Split::Validation)),
            ]
        );
        let err = resolve_inputs(&[format!("{root_s}/nope/*.jsonl")]).unwrap_err();
        assert!(err.to_string().contains("matches no files"), "{err}");
        let err = resolve_inputs(&[format!("{root_s}/missing.jsonl")]).unwrap_err();
        assert!(err.to_string().contains("data.prepare.inputs"), "{err}");
    }
}
