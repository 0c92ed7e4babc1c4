//! Writing token shards: `<split>/<domain>.bin` (the domain's documents, each
//! followed by EOS, as flat little-endian tokens) and `<split>/<domain>.idx` (the
//! little-endian `u64` token offset where each document starts, then the total);
//! with `data.prepare.quality_keys`, also `train/<domain>.quality.f32` (each training
//! document's quality on 0..10, little-endian `f32`, in document order).
//!
//! Both files are written under temporary names (`*.tmp`) and renamed into place only
//! when complete and synced, so a shard file with its final name is never partial.

use super::tokenize::TokenDtype;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// Suffix of files being written.
pub const TMP_SUFFIX: &str = ".tmp";

/// Path of a domain's token file in `dir/<split>/`.
pub fn bin_path(split_dir: &Path, domain: &str) -> PathBuf {
    split_dir.join(format!("{domain}.bin"))
}

/// Path of a domain's document index in `dir/<split>/`.
pub fn idx_path(split_dir: &Path, domain: &str) -> PathBuf {
    split_dir.join(format!("{domain}.idx"))
}

/// Path of a domain's per-document quality scores in `dir/<split>/`.
pub fn quality_path(split_dir: &Path, domain: &str) -> PathBuf {
    split_dir.join(format!("{domain}.quality.f32"))
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(TMP_SUFFIX);
    PathBuf::from(s)
}

/// Documents and tokens (EOS included) of one `(split, domain)` shard.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardCounts {
    pub documents: u64,
    pub tokens: u64,
}

impl ShardCounts {
    /// Size of the `.bin` file.
    pub fn bin_bytes(&self, dtype: TokenDtype) -> u64 {
        self.tokens * dtype.bytes() as u64
    }

    /// Size of the `.idx` file: one offset per document plus the total.
    pub fn idx_bytes(&self) -> u64 {
        (self.documents + 1) * 8
    }
}

/// Streams documents of one `(split, domain)` into its shard files.
pub struct ShardWriter {
    bin_final: PathBuf,
    idx_final: PathBuf,
    bin_tmp: PathBuf,
    idx_tmp: PathBuf,
    bin: BufWriter<File>,
    idx: BufWriter<File>,
    /// The quality file's final name and writer, when documents carry a score.
    quality: Option<(PathBuf, BufWriter<File>)>,
    dtype: TokenDtype,
    counts: ShardCounts,
    scratch: Vec<u8>,
}

impl ShardWriter {
    /// Creates the temporary files of `split_dir/<domain>.{bin,idx}`.
    pub fn create(split_dir: &Path, domain: &str, dtype: TokenDtype) -> std::io::Result<Self> {
        let bin_final = bin_path(split_dir, domain);
        let idx_final = idx_path(split_dir, domain);
        let bin_tmp = tmp_path(&bin_final);
        let idx_tmp = tmp_path(&idx_final);
        let bin = BufWriter::with_capacity(1 << 20, File::create(&bin_tmp)?);
        let idx = BufWriter::with_capacity(1 << 16, File::create(&idx_tmp)?);
        Ok(Self {
            bin_final,
            idx_final,
            bin_tmp,
            idx_tmp,
            bin,
            idx,
            quality: None,
            dtype,
            counts: ShardCounts::default(),
            scratch: Vec::new(),
        })
    }

    /// Also writes `split_dir/<domain>.quality.f32`: every document then needs a
    /// [`ShardWriter::push_quality`].
    pub fn with_quality(mut self, split_dir: &Path, domain: &str) -> std::io::Result<Self> {
        let path = quality_path(split_dir, domain);
        let file = File::create(tmp_path(&path))?;
        self.quality = Some((path, BufWriter::with_capacity(1 << 16, file)));
        Ok(self)
    }

    /// The quality of the document just pushed.
    pub fn push_quality(&mut self, quality: f32) -> std::io::Result<()> {
        match &mut self.quality {
            Some((_, w)) => w.write_all(&quality.to_le_bytes()),
            None => Err(std::io::Error::other(
                "this shard was created without quality",
            )),
        }
    }

    /// Appends one document's tokens (EOS already appended by the caller).
    pub fn push_document(&mut self, tokens: &[u32]) -> std::io::Result<()> {
        self.idx.write_all(&self.counts.tokens.to_le_bytes())?;
        self.scratch.clear();
        self.dtype.encode_into(tokens, &mut self.scratch);
        self.bin.write_all(&self.scratch)?;
        self.counts.documents += 1;
        self.counts.tokens += tokens.len() as u64;
        Ok(())
    }

    pub fn counts(&self) -> ShardCounts {
        self.counts
    }

    /// The final name of the token file (for messages).
    pub fn bin_path(&self) -> &Path {
        &self.bin_final
    }

    /// Writes the closing index entry, syncs the files and renames them into place.
    pub fn finish(mut self) -> std::io::Result<ShardCounts> {
        self.idx.write_all(&self.counts.tokens.to_le_bytes())?;
        let quality = self.quality.map(|(path, w)| (w, tmp_path(&path), path));
        if let Some((w, _, _)) = &quality {
            let written = w.get_ref().metadata()?.len() + w.buffer().len() as u64;
            if written != self.counts.documents * 4 {
                return Err(std::io::Error::other(format!(
                    "{} quality values for {} documents",
                    written / 4,
                    self.counts.documents
                )));
            }
        }
        let files = [
            (self.bin, self.bin_tmp, self.bin_final),
            (self.idx, self.idx_tmp, self.idx_final),
        ];
        for (w, tmp, fin) in files.into_iter().chain(quality) {
            let file = w.into_inner().map_err(|e| e.into_error())?;
            file.sync_all()?;
            drop(file);
            std::fs::rename(&tmp, &fin)?;
        }
        Ok(self.counts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_tokens_and_offsets_only_on_finish() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = ShardWriter::create(dir.path(), "dom", TokenDtype::U16).unwrap();
        w.push_document(&[5, 6, 0]).unwrap();
        w.push_document(&[0]).unwrap();
        w.push_document(&[300, 0]).unwrap();
        assert!(
            !bin_path(dir.path(), "dom").exists(),
            "no final name before finish"
        );
        let counts = w.finish().unwrap();
        assert_eq!(
            counts,
            ShardCounts {
                documents: 3,
                tokens: 6
            }
        );
        let bin = std::fs::read(bin_path(dir.path(), "dom")).unwrap();
        assert_eq!(bin, [5, 0, 6, 0, 0, 0, 0, 0, 44, 1, 0, 0]);
        let idx = std::fs::read(idx_path(dir.path(), "dom")).unwrap();
        let offsets: Vec<u64> = idx
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(offsets, [0, 3, 4, 6]);
        assert_eq!(bin.len() as u64, counts.bin_bytes(TokenDtype::U16));
        assert_eq!(idx.len() as u64, counts.idx_bytes());
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n.to_string_lossy().ends_with(TMP_SUFFIX))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }
}
