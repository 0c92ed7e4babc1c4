//! The [`TokenSource`] trait: the one seam through which the trainer reads tokens.

use mixlm_mixing::DomainId;
use serde::{Deserialize, Serialize};
use std::ops::Range;

/// Which stream of a domain a window comes from. Train, validation and test windows
/// are drawn from disjoint streams, so validation losses measure generalisation.
///
/// `Test` is held out for final reports: prepared corpora may have it (the dataset's
/// own `test/` folder, or a hash split); the trainer never reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    Train,
    Validation,
    Test,
}

impl Split {
    /// Every split, in tag order.
    pub const ALL: [Split; 3] = [Split::Train, Split::Validation, Split::Test];

    /// Stable integer tag of the split, used when hashing seeds (never change these:
    /// the synthetic corpus's pinned windows depend on them).
    pub fn tag(self) -> u64 {
        match self {
            Split::Train => 0,
            Split::Validation => 1,
            Split::Test => 2,
        }
    }

    /// The serde / folder name: `train`, `validation`, `test`.
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Validation => "validation",
            Split::Test => "test",
        }
    }
}

impl std::str::FromStr for Split {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Split::ALL
            .into_iter()
            .find(|x| x.name() == s)
            .ok_or_else(|| format!("unknown split `{s}`: use train, validation or test"))
    }
}

impl std::fmt::Display for Split {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The document holding stream position `position`, given each document's start
/// offset in the stream (as [`TokenSource::stream_documents`] lists them).
pub fn document_at(starts: &[u64], position: u64) -> usize {
    starts.partition_point(|&o| o <= position).saturating_sub(1)
}

/// A multi-domain corpus, addressed by `(domain, split, window index)`.
///
/// Random access by index (rather than an iterator) is what makes training resumable
/// and order-independent: the sampler only has to checkpoint one cursor per domain,
/// and any worker can fetch any window without replaying a stream.
///
/// Implemented by the synthetic corpus ([`crate::SyntheticCorpus`]) and by prepared
/// token shards ([`crate::ShardSource`], written by [`crate::prepare::prepare`]).
pub trait TokenSource: Send + Sync {
    /// Domain names; the position of a name is its [`DomainId`].
    fn domain_names(&self) -> Vec<String>;

    /// Size of the token id space: every id is in `0..vocab_size`.
    fn vocab_size(&self) -> usize;

    /// The end-of-document token that separates packed documents.
    fn eos_id(&self) -> u32;

    /// Relative size of each domain's training data (tokens); `natural` mixing uses it.
    fn natural_weights(&self) -> Vec<f64>;

    /// Number of distinct windows of `seq_len + 1` tokens in `(domain, split)`;
    /// `None` when unbounded (synthetic sources). A bounded source must still accept
    /// any index in [`TokenSource::window`], wrapping around (a new epoch).
    fn num_windows(&self, domain: DomainId, split: Split, seq_len: usize) -> Option<u64>;

    /// Window `index` of `seq_len + 1` consecutive tokens of `domain`
    /// (input = `[..seq_len]`, target = `[1..]`).
    ///
    /// Deterministic: the same arguments give the same tokens on any machine and in
    /// any order of calls.
    fn window(&self, domain: DomainId, split: Split, index: u64, seq_len: usize) -> Vec<u32> {
        let mut out = Vec::with_capacity(seq_len + 1);
        self.window_into(domain, split, index, seq_len, &mut out);
        out
    }

    /// Appends [`TokenSource::window`] to `out`: the one method a source implements,
    /// so batches fill one buffer without a temporary allocation per window.
    fn window_into(
        &self,
        domain: DomainId,
        split: Split,
        index: u64,
        seq_len: usize,
        out: &mut Vec<u32>,
    );

    /// Start offset of each document of `(domain, split)` read as one token stream
    /// (documents packed with EOS), plus a final entry equal to the stream's length;
    /// `None` for sources that only produce windows (synthetic). Evaluation scores
    /// streams with sliding windows and reports per-document means.
    fn stream_documents(&self, _domain: DomainId, _split: Split) -> Option<&[u64]> {
        None
    }

    /// Appends tokens `range` of the stream [`TokenSource::stream_documents`]
    /// describes; only called for sources that have one.
    fn read_stream(&self, domain: DomainId, split: Split, range: Range<u64>, out: &mut Vec<u32>) {
        let _ = (domain, split, range, out);
        unreachable!("read_stream on a source without streams")
    }

    /// The documents (numbered in the stream order of [`TokenSource::stream_documents`])
    /// whose tokens window `index` reads, first and last; `None` for sources without
    /// documents. Fault reports name the documents of a bad batch with it.
    fn window_documents(
        &self,
        _domain: DomainId,
        _split: Split,
        _index: u64,
        _seq_len: usize,
    ) -> Option<[u64; 2]> {
        None
    }

    /// Best achievable mean cross-entropy (nats/token) over the `seq_len` predictions
    /// of a window of this domain, when known (synthetic sources); `None` otherwise.
    fn floor_loss(&self, domain: DomainId, seq_len: usize) -> Option<f64>;

    /// Where a domain's split is stored, for error messages: the shard file of
    /// prepared data.
    fn shard_name(&self, domain: DomainId, split: Split) -> String {
        let name = self
            .domain_names()
            .get(domain.0)
            .cloned()
            .unwrap_or_default();
        format!("{name} / {split}")
    }
}

/// Checks every token of `split` (each domain's stream, where the source has streams)
/// against `vocab_size`, naming the shard and the first id beyond it: evaluation
/// splits are small next to training, so one pass over them before they are scored
/// is cheap. Sources without streams (synthetic) make their ids in range.
pub fn check_split_ids(
    source: &dyn TokenSource,
    split: Split,
    vocab_size: usize,
) -> Result<(), String> {
    const CHUNK: u64 = 1 << 20;
    let mut buf = Vec::with_capacity(CHUNK as usize);
    for d in 0..source.domain_names().len() {
        let domain = DomainId(d);
        let Some(&len) = source
            .stream_documents(domain, split)
            .and_then(|o| o.last())
        else {
            continue;
        };
        for start in (0..len).step_by(CHUNK as usize) {
            buf.clear();
            source.read_stream(domain, split, start..(start + CHUNK).min(len), &mut buf);
            if let Some(i) = buf.iter().position(|&t| t as usize >= vocab_size) {
                return Err(out_of_vocabulary(
                    source,
                    domain,
                    split,
                    buf[i],
                    &format!("at token {}", start + i as u64),
                    vocab_size,
                ));
            }
        }
    }
    Ok(())
}

fn out_of_vocabulary(
    source: &dyn TokenSource,
    domain: DomainId,
    split: Split,
    id: u32,
    place: &str,
    vocab_size: usize,
) -> String {
    format!(
        "{}: token id {id} ({place}) is not below the model's vocabulary size \
         {vocab_size}: the shard is damaged or made with another tokenizer; `mixlm doctor` \
         on the data folder checks every shard, and `mixlm prepare` with \
         data.prepare.force = true rebuilds it",
        source.shard_name(domain, split)
    )
}

/// The first token id of `windows` (row-major, `seq_len + 1` tokens per row, row `i`
/// read from `picks[i]`) that is not below `vocab_size`, with the shard it came from:
/// a damaged shard (ids beyond the vocabulary) must become an error naming the shard
/// before the model indexes its embedding with it. One comparison per token.
pub fn check_token_ids(
    source: &dyn TokenSource,
    split: Split,
    picks: &[(DomainId, u64)],
    windows: &[u32],
    vocab_size: usize,
) -> Result<(), String> {
    let row = windows.len() / picks.len().max(1);
    if windows.iter().all(|&t| (t as usize) < vocab_size) {
        return Ok(());
    }
    let (i, &id) = windows
        .iter()
        .enumerate()
        .find(|&(_, &t)| t as usize >= vocab_size)
        .expect("one is out of range");
    let (domain, window) = picks[i / row.max(1)];
    Err(out_of_vocabulary(
        source,
        domain,
        split,
        id,
        &format!("in window {window}"),
        vocab_size,
    ))
}
