//! Tokenizing documents with a Hugging Face `tokenizer.json`.

use super::PrepareError;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

/// The end-of-document token looked up when `data.prepare.eos_id` is not set.
pub const DEFAULT_EOS_TOKEN: &str = "<|endoftext|>";

/// How token ids are stored in the `.bin` shards (little-endian).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenDtype {
    U16,
    U32,
}

impl TokenDtype {
    /// `u16` when every id fits (`vocab_size <= 65536`), else `u32`: half the disk
    /// and page cache for GPT-2/NeoX-sized vocabularies.
    pub fn for_vocab(vocab_size: usize) -> Self {
        if vocab_size <= 1 << 16 {
            TokenDtype::U16
        } else {
            TokenDtype::U32
        }
    }

    /// Bytes per token.
    pub fn bytes(self) -> usize {
        match self {
            TokenDtype::U16 => 2,
            TokenDtype::U32 => 4,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            TokenDtype::U16 => "u16",
            TokenDtype::U32 => "u32",
        }
    }

    /// Appends `ids` to `out` as little-endian values of this width. The ids must
    /// fit (guaranteed by [`TokenDtype::for_vocab`] over the tokenizer's ids).
    pub fn encode_into(self, ids: &[u32], out: &mut Vec<u8>) {
        match self {
            TokenDtype::U16 => {
                out.reserve(ids.len() * 2);
                for &id in ids {
                    debug_assert!(id <= u32::from(u16::MAX));
                    out.extend_from_slice(&(id as u16).to_le_bytes());
                }
            }
            TokenDtype::U32 => {
                out.reserve(ids.len() * 4);
                for &id in ids {
                    out.extend_from_slice(&id.to_le_bytes());
                }
            }
        }
    }

    /// Appends the tokens stored in `bytes` (a whole number of tokens) to `out`.
    pub fn decode_into(self, bytes: &[u8], out: &mut Vec<u32>) {
        match self {
            TokenDtype::U16 => out.extend(
                bytes
                    .chunks_exact(2)
                    .map(|c| u32::from(u16::from_le_bytes([c[0], c[1]]))),
            ),
            TokenDtype::U32 => out.extend(
                bytes
                    .chunks_exact(4)
                    .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            ),
        }
    }
}

impl std::fmt::Display for TokenDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Hex SHA-256 of some bytes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// Size and hex SHA-256 of a file, streamed (checkpoints of large models do not fit
/// in memory twice).
pub fn sha256_file(path: &std::path::Path) -> std::io::Result<(u64, String)> {
    let mut hasher = Sha256::new();
    let bytes = std::io::copy(&mut std::fs::File::open(path)?, &mut hasher)?;
    Ok((bytes, hex(&hasher.finalize())))
}

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// A loaded tokenizer with what the manifest records about it.
pub struct PreparedTokenizer {
    tokenizer: Tokenizer,
    /// The file it was loaded from.
    pub path: PathBuf,
    /// Hex SHA-256 of the file's bytes: what identifies the tokenizer on a re-run.
    pub sha256: String,
    /// Number of ids, added tokens included (at least the largest id + 1).
    pub vocab_size: usize,
    /// The id appended after every document.
    pub eos_id: u32,
    pub dtype: TokenDtype,
}

impl std::fmt::Debug for PreparedTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreparedTokenizer")
            .field("path", &self.path)
            .field("sha256", &self.sha256)
            .field("vocab_size", &self.vocab_size)
            .field("eos_id", &self.eos_id)
            .field("dtype", &self.dtype)
            .finish()
    }
}

impl PreparedTokenizer {
    /// Loads `path`; `eos_id` overrides the default [`DEFAULT_EOS_TOKEN`] lookup.
    ///
    /// The bytes are read once and both hashed and parsed, so the hash is of exactly
    /// the tokenizer that is used.
    pub fn load(path: &Path, eos_id: Option<u32>) -> Result<Self, PrepareError> {
        let bytes = std::fs::read(path).map_err(|e| PrepareError::Tokenizer {
            path: path.to_path_buf(),
            message: format!("cannot read it ({e}); check data.prepare.tokenizer"),
        })?;
        let tokenizer = Tokenizer::from_bytes(&bytes).map_err(|e| PrepareError::Tokenizer {
            path: path.to_path_buf(),
            message: format!(
                "it is not a valid Hugging Face tokenizer.json ({e}); point \
                 data.prepare.tokenizer at the tokenizer.json of the model's repository"
            ),
        })?;
        let max_id = tokenizer.get_vocab(true).into_values().max();
        let vocab_size = tokenizer
            .get_vocab_size(true)
            .max(max_id.map_or(0, |m| m as usize + 1));
        if vocab_size == 0 {
            return Err(PrepareError::Tokenizer {
                path: path.to_path_buf(),
                message: "its vocabulary is empty".into(),
            });
        }
        if vocab_size > u32::MAX as usize {
            return Err(PrepareError::Tokenizer {
                path: path.to_path_buf(),
                message: format!("its vocabulary ({vocab_size} ids) does not fit u32"),
            });
        }
        let eos_id =
            match eos_id {
                Some(id) if (id as usize) < vocab_size => id,
                Some(id) => {
                    return Err(PrepareError::config(
                        "eos_id",
                        format!(
                            "{id} is not an id of the tokenizer {} ({vocab_size} ids)",
                            path.display()
                        ),
                    ))
                }
                None => tokenizer.token_to_id(DEFAULT_EOS_TOKEN).ok_or_else(|| {
                    PrepareError::Tokenizer {
                        path: path.to_path_buf(),
                        message: format!(
                        "it has no `{DEFAULT_EOS_TOKEN}` token; set data.prepare.eos_id to the \
                         id of its end-of-document token"
                    ),
                    }
                })?,
            };
        Ok(Self {
            tokenizer,
            path: path.to_path_buf(),
            sha256: sha256_hex(&bytes),
            vocab_size,
            eos_id,
            dtype: TokenDtype::for_vocab(vocab_size),
        })
    }

    /// The underlying Hugging Face tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The ids of one text, without special tokens (no BOS; EOS is not appended).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
        self.tokenizer
            .encode_fast(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| e.to_string())
    }

    /// Each text's ids followed by EOS, tokenized in parallel on the rayon pool; the
    /// results are in input order whatever the scheduling.
    pub fn encode_documents(&self, texts: &[&str]) -> Vec<Result<Vec<u32>, String>> {
        texts
            .par_iter()
            .map(|t| {
                let mut ids = self.encode(t)?;
                ids.push(self.eos_id);
                Ok(ids)
            })
            .collect()
    }

    /// The text of `ids` (special tokens such as EOS left out).
    pub fn decode(&self, ids: &[u32]) -> Result<String, String> {
        self.tokenizer.decode(ids, true).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prepare::testutil;

    #[test]
    fn dtype_choice_and_byte_layout() {
        assert_eq!(TokenDtype::for_vocab(50_277), TokenDtype::U16);
        assert_eq!(TokenDtype::for_vocab(65_536), TokenDtype::U16);
        assert_eq!(TokenDtype::for_vocab(65_537), TokenDtype::U32);
        let mut b = Vec::new();
        TokenDtype::U16.encode_into(&[1, 0x0203, 65_535], &mut b);
        assert_eq!(b, [1, 0, 3, 2, 255, 255]);
        let mut back = Vec::new();
        TokenDtype::U16.decode_into(&b, &mut back);
        assert_eq!(back, [1, 0x0203, 65_535]);
        let mut b = Vec::new();
        TokenDtype::U32.encode_into(&[0x0102_0304, 70_000], &mut b);
        assert_eq!(b[..4], [4, 3, 2, 1]);
        back.clear();
        TokenDtype::U32.decode_into(&b, &mut back);
        assert_eq!(back, [0x0102_0304, 70_000]);
        assert_eq!(TokenDtype::U16.bytes() * 3, 6);
        assert_eq!(serde_json::to_string(&TokenDtype::U32).unwrap(), "\"u32\"");
    }

    #[test]
    fn test_tokenizer_round_trips_and_hashes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        testutil::write_tokenizer(&path, 0);
        let t = PreparedTokenizer::load(&path, None).unwrap();
        assert_eq!(t.eos_id, 0);
        assert_eq!(t.vocab_size, testutil::BASE_VOCAB);
        assert_eq!(t.dtype, TokenDtype::U16);
        assert_eq!(t.sha256, sha256_hex(&std::fs::read(&path).unwrap()));
        assert_eq!(t.sha256.len(), 64);
        let text = "the other thing, ünïcödé\nnew line";
        let ids = t.encode(text).unwrap();
        // "th" merges: fewer ids than bytes.
        assert!(ids.len() < text.len(), "{ids:?}");
        assert_eq!(t.decode(&ids).unwrap(), text);
        let docs = t.encode_documents(&["a", "", "the"]);
        assert_eq!(
            docs[0].as_ref().unwrap(),
            &vec![t.encode("a").unwrap()[0], 0]
        );
        assert_eq!(docs[1].as_ref().unwrap(), &vec![0]);
        assert_eq!(
            docs[2].as_ref().unwrap().len(),
            t.encode("the").unwrap().len() + 1
        );

        let big = dir.path().join("big.json");
        testutil::write_tokenizer(&big, 70_000);
        let t = PreparedTokenizer::load(&big, Some(3)).unwrap();
        assert_eq!(t.vocab_size, testutil::BASE_VOCAB + 70_000);
        assert_eq!(t.dtype, TokenDtype::U32);
        assert_eq!(t.eos_id, 3);
    }

    #[test]
    fn load_errors_name_the_file_and_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("tok.json");
        std::fs::write(&bad, "{\"model\": 3}").unwrap();
        let e = PreparedTokenizer::load(&bad, None).unwrap_err().to_string();
        assert!(e.contains("tok.json") && e.contains("not a valid"), "{e}");
        let e = PreparedTokenizer::load(&dir.path().join("none.json"), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("none.json") && e.contains("cannot read"), "{e}");

        let good = dir.path().join("t.json");
        testutil::write_tokenizer(&good, 0);
        let e = PreparedTokenizer::load(&good, Some(100_000))
            .unwrap_err()
            .to_string();
        assert!(e.contains("data.prepare.eos_id"), "{e}");

        let no_eos = dir.path().join("noeos.json");
        let text = std::fs::read_to_string(&good)
            .unwrap()
            .replace("<|endoftext|>", "<|end|>");
        std::fs::write(&no_eos, text).unwrap();
        let e = PreparedTokenizer::load(&no_eos, None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("noeos.json") && e.contains("data.prepare.eos_id"),
            "{e}"
        );
        assert_eq!(PreparedTokenizer::load(&no_eos, Some(0)).unwrap().eos_id, 0);
    }
}
