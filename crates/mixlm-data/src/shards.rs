//! [`ShardSource`]: a [`TokenSource`] over a folder written by
//! [`crate::prepare::prepare`], memory-mapped, with seeded epoch-wise window order.
//!
//! ## Windows
//!
//! A `(domain, split)` shard is one token stream (documents, each followed by EOS).
//! For a sequence length `s` it has `n = (tokens - 1) / s` windows; window `w` is
//! tokens `[w*s, w*s + s + 1)`, so consecutive windows share one token (the last
//! target of one is the first input of the next) and every token but the stream's
//! tail (under `s` tokens) is predicted exactly once per epoch.
//!
//! Index `i` of [`TokenSource::window`] is in epoch `e = i / n` and is window
//! `P_e(i mod n)`, where `P_e` is a pseudo-random permutation of `0..n` keyed by
//! `(seed, domain name, split, e)` ([`WindowPermutation`]): the sampler's sequential
//! cursors see each window once per epoch, in a different order each epoch, with no
//! shuffle table in memory. Keying by the domain *name* keeps a domain's order when
//! other domains are added or removed.

use crate::prepare::manifest::{Manifest, ManifestReadError, MANIFEST_FILE};
use crate::prepare::shards::{bin_path, idx_path, ShardCounts};
use crate::prepare::TokenDtype;
use crate::seeding::{hash_str, hash_words, splitmix64};
use crate::source::{document_at, Split, TokenSource};
use memmap2::Mmap;
use mixlm_mixing::DomainId;
use std::fs::File;
use std::path::{Path, PathBuf};

const TAG_SHARD_ORDER: u64 = 0x7368_6172_6473; // "shards"

/// Feistel rounds of [`WindowPermutation`]; 6 rounds of a good round function make
/// orders that pass as random for shuffling (Luby-Rackoff needs 4 for a secure PRP).
const FEISTEL_ROUNDS: u64 = 6;

/// Why a prepared folder cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    #[error("{}: the folder does not exist; run mixlm prepare first", dir.display())]
    NoFolder { dir: PathBuf },
    #[error("{}: no manifest.json: the prepare did not finish; rerun mixlm prepare", dir.display())]
    NoManifest { dir: PathBuf },
    #[error("{}: {problem}; rerun mixlm prepare with data.prepare.force = true", path.display())]
    BadManifest { path: PathBuf, problem: String },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{}: {actual} bytes, but the manifest says {expected}; the folder changed after \
         prepare: rerun mixlm prepare with data.prepare.force = true",
        path.display()
    )]
    SizeMismatch {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    #[error("{}: {problem}; rerun mixlm prepare with data.prepare.force = true", path.display())]
    BadIndex { path: PathBuf, problem: String },
    #[error("{}: the train split has no domains", dir.display())]
    NoTrainDomains { dir: PathBuf },
    #[error(
        "sequence length {seq_len} leaves no window in: {}; use a shorter run.seq_len or \
         prepare more data",
        shards.join(", ")
    )]
    TooShort { seq_len: usize, shards: Vec<String> },
    /// A split with no tokens at all, which no sequence length can help.
    #[error(
        "no tokens in: {}; a shorter run.seq_len cannot help. Prepare the data with a \
         validation split (data.prepare.validation_fraction > 0, or a dataset with a \
         validation folder; test_fraction or test_from_validation for a test split) and \
         `mixlm prepare --force`; a domain without training data can be left out with \
         data.prepare.drop",
        shards.join(", ")
    )]
    EmptySplit { shards: Vec<String> },
}

/// A seeded pseudo-random permutation of `0..n` in O(1) memory and O(1) expected
/// time per element.
///
/// A Feistel network over `b` bits, `2^b` the next power of two `>= n`, permutes
/// `0..2^b`; alternating rounds swap the high `ceil(b/2)` and low `floor(b/2)` bits
/// (an unbalanced network, which is a bijection for any split), each round XORing
/// the high part with a SplitMix64 hash of `(key, round, low part)`. Values `>= n`
/// are mapped again until they land in range ("cycle walking": following the cycle
/// of the `2^b` permutation that contains `i` stays a bijection on `0..n`). Since
/// `2^b < 2n`, that takes under two evaluations on average.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowPermutation {
    n: u64,
    bits: u32,
    key: u64,
}

fn low_mask(bits: u32) -> u64 {
    if bits >= 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    }
}

impl WindowPermutation {
    pub fn new(n: u64, key: u64) -> Self {
        let bits = if n <= 1 {
            0
        } else {
            64 - (n - 1).leading_zeros()
        };
        Self { n, bits, key }
    }

    /// The permutation of a `(seed, domain, split)`'s windows in `epoch`.
    pub fn for_epoch(n: u64, seed: u64, domain: &str, split: Split, epoch: u64) -> Self {
        Self::new(
            n,
            hash_words(&[TAG_SHARD_ORDER, seed, hash_str(domain), split.tag(), epoch]),
        )
    }

    pub fn len(&self) -> u64 {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    fn feistel(&self, mut x: u64) -> u64 {
        let mut hi_bits = self.bits.div_ceil(2);
        let mut lo_bits = self.bits - hi_bits;
        for round in 0..FEISTEL_ROUNDS {
            let lo = x & low_mask(lo_bits);
            let hi = x >> lo_bits;
            let f = splitmix64(self.key ^ splitmix64(lo.wrapping_add(round << 58)));
            x = (lo << hi_bits) | ((hi ^ f) & low_mask(hi_bits));
            std::mem::swap(&mut hi_bits, &mut lo_bits);
        }
        x
    }

    /// The image of `i` (`i < n`).
    pub fn apply(&self, i: u64) -> u64 {
        assert!(i < self.n, "index {i} out of a permutation of {}", self.n);
        let mut x = i;
        loop {
            x = self.feistel(x);
            if x < self.n {
                return x;
            }
        }
    }
}

/// Number of windows of `seq_len + 1` tokens (sharing one token) in a stream.
pub fn windows_in(tokens: u64, seq_len: usize) -> u64 {
    if tokens == 0 || seq_len == 0 {
        0
    } else {
        (tokens - 1) / seq_len as u64
    }
}

/// A memory-mapped file (or nothing, for an empty one: zero-length maps fail).
#[derive(Debug)]
struct Mapped(Option<Mmap>);

impl Mapped {
    fn open(path: &Path, expected: u64) -> Result<Self, ShardError> {
        let io = |e| ShardError::Io {
            path: path.to_path_buf(),
            source: e,
        };
        let file = File::open(path).map_err(io)?;
        let actual = file.metadata().map_err(io)?.len();
        if actual != expected {
            return Err(ShardError::SizeMismatch {
                path: path.to_path_buf(),
                expected,
                actual,
            });
        }
        if actual == 0 {
            return Ok(Mapped(None));
        }
        // SAFETY: shard files are never modified in place: prepare writes new files
        // under temporary names and renames them over old ones (the mapping keeps the
        // old inode), and it deletes the manifest before touching a folder. Something
        // outside mixlm truncating a mapped file would be undefined behaviour (SIGBUS).
        let map = unsafe { Mmap::map(&file) }.map_err(io)?;
        Ok(Mapped(Some(map)))
    }

    fn bytes(&self) -> &[u8] {
        self.0.as_deref().unwrap_or(&[])
    }
}

/// One `(split, domain)` shard.
#[derive(Debug)]
struct Shard {
    counts: ShardCounts,
    bin: Mapped,
    idx: Mapped,
}

impl Shard {
    fn open(
        split_dir: &Path,
        domain: &str,
        counts: ShardCounts,
        dtype: TokenDtype,
    ) -> Result<Self, ShardError> {
        let bin = Mapped::open(&bin_path(split_dir, domain), counts.bin_bytes(dtype))?;
        let idx_file = idx_path(split_dir, domain);
        let idx = Mapped::open(&idx_file, counts.idx_bytes())?;
        let shard = Shard { counts, bin, idx };
        let offsets = shard.offsets();
        let bad = |problem: String| ShardError::BadIndex {
            path: idx_file.clone(),
            problem,
        };
        if offsets.first() != Some(&0) {
            return Err(bad("the first document offset is not 0".into()));
        }
        if offsets.last() != Some(&counts.tokens) {
            return Err(bad(format!(
                "the final offset {:?} is not the token count {}",
                offsets.last(),
                counts.tokens
            )));
        }
        Ok(shard)
    }

    /// The document start offsets plus the total, as `u64`s.
    fn offsets(&self) -> &[u64] {
        let bytes = self.idx.bytes();
        // SAFETY: a mapping is page-aligned (so 8-aligned) and its length, checked
        // against the manifest, is a multiple of 8; every bit pattern is a valid u64.
        // The file is little-endian, which is the native order on this target.
        #[cfg(target_endian = "little")]
        {
            let (head, body, tail) = unsafe { bytes.align_to::<u64>() };
            assert!(head.is_empty() && tail.is_empty(), "misaligned index map");
            body
        }
        #[cfg(not(target_endian = "little"))]
        compile_error!("prepared shards are little-endian; big-endian targets are not supported");
    }
}

/// Prepared token shards as a [`TokenSource`].
///
/// Domains are the train split's, sorted by name; a domain's position in that order
/// is its [`DomainId`]. (Validation and test shards of domains without train data
/// are not addressable.)
#[derive(Debug)]
pub struct ShardSource {
    dir: PathBuf,
    seed: u64,
    manifest: Manifest,
    domains: Vec<String>,
    /// `shards[domain][split.tag()]`.
    shards: Vec<[Option<Shard>; 3]>,
}

impl ShardSource {
    /// Opens a prepared folder: reads `manifest.json`, checks every shard's size
    /// against it and memory-maps the shards (nothing is read into memory).
    ///
    /// `seed` keys the per-epoch window order.
    pub fn open(dir: impl AsRef<Path>, seed: u64) -> Result<Self, ShardError> {
        Self::open_with(dir.as_ref(), seed, false)
    }

    /// Opens a folder for evaluation only: its domains are those of any split, so
    /// a folder without training data (a held-out set) opens too.
    pub fn open_for_eval(dir: impl AsRef<Path>) -> Result<Self, ShardError> {
        Self::open_with(dir.as_ref(), 0, true)
    }

    fn open_with(dir: &Path, seed: u64, any_split: bool) -> Result<Self, ShardError> {
        let dir = dir.to_path_buf();
        if !dir.is_dir() {
            return Err(ShardError::NoFolder { dir });
        }
        let manifest_path = dir.join(MANIFEST_FILE);
        let manifest = match Manifest::read(&dir) {
            Ok(Some(m)) => m,
            Ok(None) => return Err(ShardError::NoManifest { dir }),
            Err(ManifestReadError::Io(e)) => {
                return Err(ShardError::Io {
                    path: manifest_path,
                    source: e,
                })
            }
            Err(e) => {
                return Err(ShardError::BadManifest {
                    path: manifest_path,
                    problem: e.to_string(),
                })
            }
        };
        let splits: &[Split] = if any_split {
            &Split::ALL
        } else {
            &[Split::Train]
        };
        let domains: Vec<String> = splits
            .iter()
            .filter_map(|&s| manifest.split(s))
            .flat_map(|d| d.keys().cloned())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        if domains.is_empty() {
            return Err(ShardError::NoTrainDomains { dir });
        }
        let mut shards = Vec::with_capacity(domains.len());
        for name in &domains {
            let mut per_split: [Option<Shard>; 3] = [None, None, None];
            for split in Split::ALL {
                if let Some(&counts) = manifest.split(split).and_then(|d| d.get(name)) {
                    let split_dir = dir.join(split.name());
                    per_split[split.tag() as usize] =
                        Some(Shard::open(&split_dir, name, counts, manifest.token_dtype)?);
                }
            }
            shards.push(per_split);
        }
        Ok(Self {
            dir,
            seed,
            manifest,
            domains,
            shards,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn token_dtype(&self) -> TokenDtype {
        self.manifest.token_dtype
    }

    /// Where the training documents' quality from `data.prepare.quality_keys` is
    /// (`f32` on 0..10, one per document); `None` when the corpus was prepared
    /// without quality keys.
    pub fn quality_path(&self, domain: DomainId) -> Option<PathBuf> {
        (!self.manifest.options.quality_keys.is_empty()).then(|| {
            crate::prepare::shards::quality_path(
                &self.dir.join(Split::Train.name()),
                &self.domains[domain.0],
            )
        })
    }

    fn shard(&self, domain: DomainId, split: Split) -> Option<&Shard> {
        self.shards[domain.0][split.tag() as usize].as_ref()
    }

    /// Documents and tokens (EOS included) of a shard; zero when the domain has no
    /// data in that split.
    pub fn counts(&self, domain: DomainId, split: Split) -> ShardCounts {
        self.shard(domain, split)
            .map(|s| s.counts)
            .unwrap_or_default()
    }

    /// Start offset (in tokens) of each document of the stream, plus a final entry
    /// equal to the token count; empty when the domain has no data in that split.
    /// Document `k` is tokens `[off[k], off[k + 1])`, its last token being EOS.
    pub fn doc_offsets(&self, domain: DomainId, split: Split) -> &[u64] {
        self.shard(domain, split).map_or(&[], |s| s.offsets())
    }

    /// Appends tokens `range` of a `(domain, split)` stream to `out`.
    pub fn read_tokens(
        &self,
        domain: DomainId,
        split: Split,
        range: std::ops::Range<u64>,
        out: &mut Vec<u32>,
    ) {
        let shard = self.shard(domain, split);
        let tokens = shard.map_or(0, |s| s.counts.tokens);
        assert!(
            range.start <= range.end && range.end <= tokens,
            "tokens {range:?} out of the {tokens} of {} / {split}",
            self.domains[domain.0]
        );
        let Some(shard) = shard else { return };
        let w = self.manifest.token_dtype.bytes();
        let bytes = &shard.bin.bytes()[range.start as usize * w..range.end as usize * w];
        self.manifest.token_dtype.decode_into(bytes, out);
    }

    /// Windows per epoch of a shard at `seq_len` (0 when too short or absent).
    pub fn windows(&self, domain: DomainId, split: Split, seq_len: usize) -> u64 {
        windows_in(self.counts(domain, split).tokens, seq_len)
    }

    fn windows_or_panic(&self, domain: DomainId, split: Split, seq_len: usize) -> u64 {
        let n = self.windows(domain, split, seq_len);
        assert!(
            n > 0,
            "{} / {split} has {} tokens: no window of {} tokens (call ShardSource::check_seq_len first)",
            self.domains[domain.0],
            self.counts(domain, split).tokens,
            seq_len + 1
        );
        n
    }

    /// The epoch index `index` falls in (`index / n`): how many times the domain's
    /// windows have been fully read before it. Panics when there are no windows.
    pub fn epoch_of(&self, domain: DomainId, split: Split, index: u64, seq_len: usize) -> u64 {
        index / self.windows_or_panic(domain, split, seq_len)
    }

    /// `(epoch, window)` of `index`: the window (in stream order) it reads.
    pub fn locate(&self, domain: DomainId, split: Split, index: u64, seq_len: usize) -> (u64, u64) {
        let n = self.windows_or_panic(domain, split, seq_len);
        let epoch = index / n;
        let perm =
            WindowPermutation::for_epoch(n, self.seed, &self.domains[domain.0], split, epoch);
        (epoch, perm.apply(index % n))
    }

    /// Token offset in the stream where `index`'s window starts.
    pub fn window_start(&self, domain: DomainId, split: Split, index: u64, seq_len: usize) -> u64 {
        self.locate(domain, split, index, seq_len).1 * seq_len as u64
    }

    /// Every `(domain, split)` among `splits` that has no window at `seq_len`
    /// (so [`TokenSource::window`] would panic): call before training.
    pub fn check_seq_len(&self, seq_len: usize, splits: &[Split]) -> Result<(), ShardError> {
        let (mut short, mut empty) = (Vec::new(), Vec::new());
        for (d, name) in self.domains.iter().enumerate() {
            for &split in splits {
                let c = self.counts(DomainId(d), split);
                if c.tokens == 0 {
                    empty.push(format!("{name} / {split}"));
                } else if windows_in(c.tokens, seq_len) == 0 {
                    short.push(format!("{name} / {split} ({} tokens)", c.tokens));
                }
            }
        }
        if !empty.is_empty() {
            Err(ShardError::EmptySplit { shards: empty })
        } else if short.is_empty() {
            Ok(())
        } else {
            Err(ShardError::TooShort {
                seq_len,
                shards: short,
            })
        }
    }
}

impl TokenSource for ShardSource {
    fn domain_names(&self) -> Vec<String> {
        self.domains.clone()
    }

    fn shard_name(&self, domain: DomainId, split: Split) -> String {
        let name = self.domains.get(domain.0).map_or("?", String::as_str);
        crate::prepare::shards::bin_path(&self.dir.join(split.name()), name)
            .display()
            .to_string()
    }

    fn vocab_size(&self) -> usize {
        self.manifest.tokenizer.vocab_size
    }

    fn eos_id(&self) -> u32 {
        self.manifest.tokenizer.eos_id
    }

    /// Train tokens per domain.
    fn natural_weights(&self) -> Vec<f64> {
        (0..self.domains.len())
            .map(|d| self.counts(DomainId(d), Split::Train).tokens as f64)
            .collect()
    }

    fn num_windows(&self, domain: DomainId, split: Split, seq_len: usize) -> Option<u64> {
        Some(self.windows(domain, split, seq_len))
    }

    fn window_into(
        &self,
        domain: DomainId,
        split: Split,
        index: u64,
        seq_len: usize,
        out: &mut Vec<u32>,
    ) {
        let start = self.window_start(domain, split, index, seq_len);
        self.read_tokens(domain, split, start..start + seq_len as u64 + 1, out);
    }

    fn floor_loss(&self, _domain: DomainId, _seq_len: usize) -> Option<f64> {
        None
    }

    fn stream_documents(&self, domain: DomainId, split: Split) -> Option<&[u64]> {
        Some(self.doc_offsets(domain, split))
    }

    fn window_documents(
        &self,
        domain: DomainId,
        split: Split,
        index: u64,
        seq_len: usize,
    ) -> Option<[u64; 2]> {
        let offsets = self.doc_offsets(domain, split);
        let start = self.window_start(domain, split, index, seq_len);
        let last = start + seq_len as u64; // the window's last token
        Some([document_at(offsets, start), document_at(offsets, last)].map(|d| d as u64))
    }

    fn read_stream(
        &self,
        domain: DomainId,
        split: Split,
        range: std::ops::Range<u64>,
        out: &mut Vec<u32>,
    ) {
        self.read_tokens(domain, split, range, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_is_a_seeded_bijection_that_changes_per_epoch() {
        for n in [1u64, 2, 3, 7, 64, 1000, 1025] {
            let perm = |seed, epoch| -> Vec<u64> {
                let p = WindowPermutation::for_epoch(n, seed, "dom", Split::Train, epoch);
                (0..n).map(|i| p.apply(i)).collect()
            };
            let p0 = perm(1, 0);
            let mut sorted = p0.clone();
            sorted.sort_unstable();
            assert_eq!(
                sorted,
                (0..n).collect::<Vec<_>>(),
                "n = {n}: not a bijection"
            );
            assert_eq!(p0, perm(1, 0), "n = {n}: not deterministic");
            for epoch in 1..4 {
                let mut s = perm(1, epoch);
                let differs = s != p0;
                s.sort_unstable();
                assert_eq!(s, (0..n).collect::<Vec<_>>());
                if n >= 7 {
                    assert!(differs, "n = {n}: epoch {epoch} repeats epoch 0");
                }
            }
            if n >= 7 {
                assert_ne!(p0, perm(2, 0), "n = {n}: the seed does not matter");
                assert_ne!(p0, (0..n).collect::<Vec<_>>(), "n = {n}: identity");
            }
            if n == 2 {
                // Only two orders exist; over 16 epochs both must occur.
                let orders: std::collections::BTreeSet<_> = (0..16).map(|e| perm(1, e)).collect();
                assert_eq!(orders.len(), 2);
            }
        }
        assert!(WindowPermutation::new(0, 1).is_empty());
    }

    #[test]
    fn permutation_looks_uniform() {
        // Where element 0 lands over many keys: roughly uniform over 0..n.
        let n = 10u64;
        let trials = 20_000;
        let mut hits = vec![0u32; n as usize];
        for key in 0..trials {
            hits[WindowPermutation::new(n, key).apply(0) as usize] += 1;
        }
        let expected = trials as f64 / n as f64;
        for (i, &h) in hits.iter().enumerate() {
            assert!(
                (h as f64 - expected).abs() < 5.0 * expected.sqrt(),
                "position {i}: {h} hits, {expected} expected ({hits:?})"
            );
        }
        // Large n: values stay in range and the map is far from sequential.
        let p = WindowPermutation::new(1 << 40, 9);
        let firsts: Vec<u64> = (0..8).map(|i| p.apply(i)).collect();
        assert!(firsts.iter().all(|&x| x < 1 << 40));
        assert!(firsts.windows(2).any(|w| w[1].abs_diff(w[0]) > 1 << 20));
    }

    #[test]
    fn window_counts() {
        assert_eq!(windows_in(0, 4), 0);
        assert_eq!(windows_in(4, 4), 0);
        assert_eq!(windows_in(5, 4), 1);
        assert_eq!(windows_in(9, 4), 2);
        assert_eq!(windows_in(12, 4), 2);
        assert_eq!(windows_in(5, 0), 0);
    }
}
