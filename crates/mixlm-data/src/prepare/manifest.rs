//! `manifest.json`: what a prepared folder holds and how it was made.
//!
//! It is written last, after every shard is complete, so its presence is the mark
//! of a finished prepare; a reader trusts nothing in a folder without it. It also
//! records everything that decides the shards' content (tokenizer hash, inputs with
//! sizes and modification times, options), which is how a re-run knows it has
//! nothing to do, or that the folder was made from something else.

use super::ingest::{InputFile, SkipReport};
use super::shards::ShardCounts;
use super::tokenize::TokenDtype;
use super::OnError;
use crate::source::Split;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

/// File name of the manifest inside the output folder.
pub const MANIFEST_FILE: &str = "manifest.json";

/// Version of the folder layout and manifest; readers refuse other versions.
pub const FORMAT_VERSION: u32 = 1;

/// How the hash split places a document (recorded in the manifest).
pub const HASH_SPLIT_RULE: &str = "u = first 8 bytes of SHA-256(text as UTF-8), big-endian, top 53 bits / 2^53; validation if u < validation_fraction, test if u < validation_fraction + test_fraction, else train";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenizerRecord {
    /// As given in `data.prepare.tokenizer`.
    pub path: String,
    /// Hex SHA-256 of the file.
    pub sha256: String,
    pub vocab_size: usize,
    pub eos_id: u32,
}

/// Where each document's split came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "snake_case")]
pub enum SplitMethod {
    /// The dataset's own splits: every input is under a `train`, `validation` (or
    /// `valid`/`val`) or `test` path component.
    Dataset,
    /// No input names a split: documents are placed by a hash of their text.
    Hash {
        validation_fraction: f64,
        test_fraction: f64,
        rule: String,
    },
}

/// Every option that changes what is written (so a change requires a rebuild).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestOptions {
    pub text_key: String,
    pub domain_key: String,
    pub rename: BTreeMap<String, String>,
    pub keep: Option<Vec<String>>,
    pub drop: Vec<String>,
    pub on_error: OnError,
    pub validation_fraction: f64,
    pub test_fraction: f64,
    #[serde(default)]
    pub test_from_validation: bool,
    /// As requested (`None`: the tokenizer's `<|endoftext|>`).
    pub eos_id: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_domain: Option<String>,
    /// Fields whose sum is each training document's quality (`train/*.quality.f32`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub quality_keys: Vec<String>,
    /// Set with `quality_keys`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quality_range: Option<[f64; 2]>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    /// `mixlm-data <version>`.
    pub created_by: String,
    pub tokenizer: TokenizerRecord,
    pub token_dtype: TokenDtype,
    /// Dotted path of the domain name in each record.
    pub domain_key: String,
    pub split_method: SplitMethod,
    pub options: ManifestOptions,
    pub inputs: Vec<InputFile>,
    /// Per split, per domain (sorted by name): documents and tokens (EOS included).
    pub splits: BTreeMap<Split, BTreeMap<String, ShardCounts>>,
    /// Bad input skipped under `on_error = "skip"`.
    pub skipped: SkipReport,
    /// Documents left out by `keep` / `drop`, per domain (after renaming).
    pub dropped_documents: BTreeMap<String, u64>,
}

fn short(hash: &str) -> &str {
    &hash[..hash.len().min(12)]
}

impl Manifest {
    /// What differs between how `self` was made and how `new` would be made, one
    /// line each; empty when a re-run would write the same shards.
    pub fn differences(&self, new: &Manifest) -> Vec<String> {
        let mut out = Vec::new();
        if self.format_version != new.format_version {
            out.push(format!(
                "format version {} -> {}",
                self.format_version, new.format_version
            ));
        }
        if self.tokenizer.sha256 != new.tokenizer.sha256 {
            out.push(format!(
                "tokenizer changed: {} had SHA-256 {}…, {} has {}… (data.prepare.tokenizer)",
                self.tokenizer.path,
                short(&self.tokenizer.sha256),
                new.tokenizer.path,
                short(&new.tokenizer.sha256)
            ));
        } else if self.tokenizer.eos_id != new.tokenizer.eos_id {
            out.push(format!(
                "EOS id {} -> {}",
                self.tokenizer.eos_id, new.tokenizer.eos_id
            ));
        }
        // The same file however it was named (relative to the folder the prepare ran
        // in, or absolute, as paths from a config file are): by its canonical path.
        let key = |f: &InputFile| super::normalize(&f.path);
        let same = |a: &InputFile, b: &InputFile| {
            (a.bytes, a.mtime_unix, a.mtime_nanos, a.split)
                == (b.bytes, b.mtime_unix, b.mtime_nanos, b.split)
        };
        let old_inputs: BTreeMap<_, _> = self.inputs.iter().map(|f| (key(f), f)).collect();
        let new_inputs: BTreeMap<_, _> = new.inputs.iter().map(|f| (key(f), f)).collect();
        for (path, f) in &new_inputs {
            match old_inputs.get(path) {
                None => out.push(format!("input added: {}", path.display())),
                Some(old) if !same(old, f) => out.push(format!(
                    "input changed: {} (size {} -> {} bytes, mtime {}.{:09} -> {}.{:09})",
                    path.display(),
                    old.bytes,
                    f.bytes,
                    old.mtime_unix,
                    old.mtime_nanos,
                    f.mtime_unix,
                    f.mtime_nanos
                )),
                Some(_) => {}
            }
        }
        for path in old_inputs.keys() {
            if !new_inputs.contains_key(path) {
                out.push(format!("input removed: {}", path.display()));
            }
        }
        if old_inputs.len() == new_inputs.len()
            && out.is_empty()
            && self.inputs.iter().map(key).ne(new.inputs.iter().map(key))
        {
            out.push(
                "inputs are listed in another order (documents would be stored in another order)"
                    .into(),
            );
        }
        // Compare every option through its serialised form, so a field added to
        // `ManifestOptions` is covered without another line here.
        let fields = |o: &ManifestOptions| match serde_json::to_value(o) {
            Ok(serde_json::Value::Object(map)) => map,
            _ => unreachable!("ManifestOptions serialises to an object"),
        };
        let (old, new) = (fields(&self.options), fields(&new.options));
        for (name, old_value) in &old {
            let new_value = new.get(name).unwrap_or(&serde_json::Value::Null);
            if old_value != new_value {
                out.push(format!(
                    "option data.prepare.{name} changed: {old_value} -> {new_value}"
                ));
            }
        }
        out
    }

    /// Domains of a split, sorted by name, with their counts.
    pub fn split(&self, split: Split) -> Option<&BTreeMap<String, ShardCounts>> {
        self.splits.get(&split)
    }

    /// Reads `dir/manifest.json`; `Ok(None)` when there is none.
    pub fn read(dir: &Path) -> Result<Option<Manifest>, ManifestReadError> {
        let path = dir.join(MANIFEST_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(ManifestReadError::Io(e)),
        };
        let manifest: Manifest =
            serde_json::from_slice(&bytes).map_err(|e| ManifestReadError::Parse(e.to_string()))?;
        if manifest.format_version != FORMAT_VERSION {
            return Err(ManifestReadError::Version(manifest.format_version));
        }
        Ok(Some(manifest))
    }

    /// Writes `dir/manifest.json` atomically (temporary file, sync, rename, then a
    /// sync of the folder so the rename itself is durable).
    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        let path = dir.join(MANIFEST_FILE);
        let tmp = dir.join(format!("{MANIFEST_FILE}.tmp"));
        let mut json = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        json.push(b'\n');
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&json)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, &path)?;
        sync_dir(dir);
        Ok(())
    }
}

/// Best-effort fsync of a folder (makes renames inside it durable on Unix).
pub(crate) fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Why an existing manifest could not be used.
#[derive(Debug)]
pub enum ManifestReadError {
    Io(std::io::Error),
    Parse(String),
    Version(u32),
}

impl std::fmt::Display for ManifestReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ManifestReadError::Io(e) => write!(f, "cannot read it: {e}"),
            ManifestReadError::Parse(e) => write!(f, "it does not parse: {e}"),
            ManifestReadError::Version(v) => write!(
                f,
                "it has format version {v}, this build reads version {FORMAT_VERSION}"
            ),
        }
    }
}
