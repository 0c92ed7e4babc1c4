//! Per-domain perplexity of a split, the way papers report it.
//!
//! A domain's split is read as one token stream (documents packed with EOS, as
//! `prepare` stores them) and scored with sliding windows: every window holds
//! `seq_len` inputs; the first scores all its targets, each later one starts
//! `stride` tokens further and scores only the targets no earlier window scored, so
//! with `stride < seq_len` every token after the first window is predicted from at
//! least `seq_len - stride` tokens of context (Hugging Face's sliding-window
//! perplexity). The last window is shifted back to end at the stream's end, so all
//! windows have the same length and batch together.
//!
//! Two means are reported, labelled:
//! - **token-weighted**: `exp(sum of NLL / tokens)` over the whole split (the usual
//!   perplexity, and what the Aioli paper averages over groups);
//! - **sequence-mean**: `exp(mean over sequences of their mean NLL)`, where a
//!   sequence is a document for prepared shards and a window for sources that only
//!   produce windows (the synthetic corpus). Short documents weigh as much as long
//!   ones here.

use std::ops::Range;

use mixlm_data::{document_at, Split, TokenSource};
use mixlm_mixing::DomainId;
use serde::{Deserialize, Serialize};

use crate::model::LanguageModel;

/// The NLL of every target of a batch of windows: `([batch, len + 1] tokens, batch,
/// len) -> [batch, len]` NLLs, row-major (a model, or known values in tests).
pub type NllFn<'a> = dyn FnMut(&[u32], usize, usize) -> Vec<f32> + 'a;

/// How a split is scored.
#[derive(Debug, Clone, PartialEq)]
pub struct PerplexityOptions {
    /// Inputs per window.
    pub seq_len: usize,
    /// Tokens between window starts; `seq_len` for disjoint windows.
    pub stride: usize,
    /// Windows per forward pass.
    pub batch_size: usize,
    /// Only the first this many tokens of each domain's split (all when `None`);
    /// for sources without a stream, the number of windows is `max_tokens / seq_len`.
    pub max_tokens: Option<u64>,
}

/// One domain's perplexity on one split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DomainPerplexity {
    pub domain: String,
    /// Target tokens scored.
    pub tokens: u64,
    /// Sequences (documents, or windows) with at least one scored token.
    pub sequences: u64,
    /// Token-weighted mean NLL (nats/token) and its perplexity.
    pub token_loss: f64,
    pub token_ppl: f64,
    /// Mean over sequences of their mean NLL, and its perplexity.
    pub sequence_loss: f64,
    pub sequence_ppl: f64,
}

/// Every domain of one split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SplitPerplexity {
    pub split: String,
    pub domains: Vec<DomainPerplexity>,
    /// Mean over domains (with data) of the token-weighted perplexity: the Aioli
    /// paper's "average test perplexity per group".
    pub average_ppl: f64,
    /// The same for the sequence-mean perplexity.
    pub average_sequence_ppl: f64,
}

/// One window: inputs are stream tokens `[start, start + len)`, targets
/// `[start + 1, start + len]`; targets at stream positions `>= scored_from` count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub start: u64,
    pub scored_from: u64,
}

/// The sliding windows over a stream of `n` tokens with `len` inputs each (see the
/// module docs); every target position `1..n` is scored exactly once.
pub fn plan_windows(n: u64, len: usize, stride: usize) -> Vec<Window> {
    assert!(
        stride >= 1 && stride <= len,
        "stride must be in 1..=seq_len"
    );
    if n < 2 {
        return Vec::new();
    }
    let len = len as u64;
    let last_start = (n - 1).saturating_sub(len);
    let mut windows = vec![Window {
        start: 0,
        scored_from: 1,
    }];
    let mut scored_to = len.min(n - 1); // last scored target position
    while scored_to < n - 1 {
        let start = (windows.last().expect("one").start + stride as u64).min(last_start);
        windows.push(Window {
            start,
            scored_from: scored_to + 1,
        });
        scored_to = start + len;
    }
    windows
}

/// Per-token NLL sums of one stream, by document.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StreamScore {
    pub nll: f64,
    pub tokens: u64,
    /// `(sum of NLL, tokens)` of every document, in stream order (a document can
    /// have no scored token: the stream's first one-token document).
    pub documents: Vec<(f64, u64)>,
}

impl StreamScore {
    fn merge(&mut self, other: StreamScore) {
        self.nll += other.nll;
        self.tokens += other.tokens;
        self.documents.extend(other.documents);
    }
}

/// Scores a stream of `n` tokens whose documents start at `doc_offsets` (ascending,
/// first 0; a final entry `>= n` is allowed). `read(range, out)` appends stream tokens;
/// `nll(windows, batch, len)` returns the NLL of every target of a batch of windows
/// (`[batch, len + 1]` tokens in, `[batch, len]` NLLs out, row-major).
pub fn score_stream(
    n: u64,
    doc_offsets: &[u64],
    options: &PerplexityOptions,
    mut read: impl FnMut(Range<u64>, &mut Vec<u32>),
    mut nll: impl FnMut(&[u32], usize, usize) -> Vec<f32>,
) -> StreamScore {
    let mut score = StreamScore::default();
    if n < 2 {
        return score;
    }
    let len = options.seq_len.min((n - 1) as usize);
    let stride = options.stride.min(len);
    let windows = plan_windows(n, len, stride);
    // One entry per document starting inside the stream (not the closing offset).
    let starts = doc_offsets.partition_point(|&o| o < n).max(1);
    let mut docs: Vec<(f64, u64)> = vec![(0.0, 0); starts];
    let doc_of = |p: u64| document_at(doc_offsets, p);
    let mut buf = Vec::with_capacity(options.batch_size * (len + 1));
    for chunk in windows.chunks(options.batch_size.max(1)) {
        buf.clear();
        for w in chunk {
            read(w.start..w.start + len as u64 + 1, &mut buf);
        }
        let losses = nll(&buf, chunk.len(), len);
        assert_eq!(losses.len(), chunk.len() * len, "one NLL per target");
        for (w, row) in chunk.iter().zip(losses.chunks_exact(len)) {
            for (i, &l) in row.iter().enumerate() {
                let p = w.start + 1 + i as u64;
                if p < w.scored_from {
                    continue;
                }
                let d = &mut docs[doc_of(p)];
                d.0 += l as f64;
                d.1 += 1;
                score.nll += l as f64;
                score.tokens += 1;
            }
        }
    }
    score.documents = docs;
    score
}

/// Scores one domain's split of `source`. Sources with a stream (prepared shards)
/// are read as one stream with their documents; the others as independent windows.
pub fn score_domain(
    source: &dyn TokenSource,
    domain: DomainId,
    split: Split,
    options: &PerplexityOptions,
    nll: &mut NllFn<'_>,
) -> Result<StreamScore, String> {
    if let Some(offsets) = source.stream_documents(domain, split) {
        let total = offsets.last().copied().unwrap_or(0);
        let n = options.max_tokens.map_or(total, |m| total.min(m + 1));
        return Ok(score_stream(
            n,
            offsets,
            options,
            |r, out| source.read_stream(domain, split, r, out),
            nll,
        ));
    }
    if options.stride != options.seq_len {
        return Err(format!(
            "sliding windows (stride {} < seq_len {}) need a source with token streams \
             (prepared shards); this source only produces windows",
            options.stride, options.seq_len
        ));
    }
    let cap = options.max_tokens.map(|m| m / options.seq_len as u64);
    let windows = match (source.num_windows(domain, split, options.seq_len), cap) {
        (Some(n), Some(c)) => n.min(c),
        (Some(n), None) => n,
        (None, Some(c)) => c,
        (None, None) => return Err("an unbounded source needs max_tokens".into()),
    };
    // Each window is a stream (and a sequence) of its own.
    let mut score = StreamScore::default();
    let len = options.seq_len;
    let mut buf = Vec::new();
    let indices: Vec<u64> = (0..windows).collect();
    for chunk in indices.chunks(options.batch_size.max(1)) {
        buf.clear();
        for &i in chunk {
            source.window_into(domain, split, i, len, &mut buf);
        }
        let losses = nll(&buf, chunk.len(), len);
        for row in losses.chunks_exact(len) {
            let sum: f64 = row.iter().map(|&l| l as f64).sum();
            score.merge(StreamScore {
                nll: sum,
                tokens: len as u64,
                documents: vec![(sum, len as u64)],
            });
        }
    }
    Ok(score)
}

impl DomainPerplexity {
    pub fn from_score(domain: &str, s: &StreamScore) -> Self {
        let token_loss = s.nll / s.tokens.max(1) as f64;
        let scored: Vec<&(f64, u64)> = s.documents.iter().filter(|d| d.1 > 0).collect();
        let sequence_loss =
            scored.iter().map(|(l, t)| l / *t as f64).sum::<f64>() / scored.len().max(1) as f64;
        Self {
            domain: domain.into(),
            tokens: s.tokens,
            sequences: scored.len() as u64,
            token_loss,
            token_ppl: token_loss.exp(),
            sequence_loss,
            sequence_ppl: sequence_loss.exp(),
        }
    }
}

impl SplitPerplexity {
    /// Averages the domains that had data.
    pub fn new(split: &str, domains: Vec<DomainPerplexity>) -> Self {
        let with_data: Vec<&DomainPerplexity> = domains.iter().filter(|d| d.tokens > 0).collect();
        let mean = |f: fn(&DomainPerplexity) -> f64| {
            with_data.iter().map(|d| f(d)).sum::<f64>() / with_data.len().max(1) as f64
        };
        Self {
            split: split.into(),
            average_ppl: mean(|d| d.token_ppl),
            average_sequence_ppl: mean(|d| d.sequence_ppl),
            domains,
        }
    }
}

/// Perplexity of every domain of `split` under `model`.
pub fn split_perplexity(
    model: &dyn LanguageModel,
    source: &dyn TokenSource,
    split: Split,
    options: &PerplexityOptions,
) -> Result<SplitPerplexity, String> {
    let mut nll = |windows: &[u32], batch, len| model.nll(windows, batch, len);
    let domains = source
        .domain_names()
        .iter()
        .enumerate()
        .map(|(d, name)| {
            let s = score_domain(source, DomainId(d), split, options, &mut nll)?;
            Ok(DomainPerplexity::from_score(name, &s))
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok(SplitPerplexity::new(&split.to_string(), domains))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(seq_len: usize, stride: usize, batch: usize) -> PerplexityOptions {
        PerplexityOptions {
            seq_len,
            stride,
            batch_size: batch,
            max_tokens: None,
        }
    }

    /// Every target position of the stream is scored exactly once, whatever the
    /// stride, and every window has `len` inputs within the stream.
    #[test]
    fn windows_score_every_target_once() {
        for n in [2u64, 3, 9, 10, 11, 37] {
            for len in [1usize, 4, 8] {
                for stride in 1..=len {
                    let len = len.min((n - 1) as usize);
                    let stride = stride.min(len);
                    let w = plan_windows(n, len, stride);
                    let mut seen = vec![0u32; n as usize];
                    let mut prev_end = 0;
                    for x in &w {
                        assert!(x.start + (len as u64) < n, "{n} {len} {stride} {w:?}");
                        assert_eq!(x.scored_from, prev_end + 1);
                        for p in x.scored_from..=x.start + len as u64 {
                            seen[p as usize] += 1;
                        }
                        prev_end = x.start + len as u64;
                    }
                    assert_eq!(seen[0], 0);
                    assert!(
                        seen[1..].iter().all(|&c| c == 1),
                        "{n} {len} {stride} {w:?}"
                    );
                }
            }
        }
        // 10 tokens, 4 inputs, stride 2: starts 0, 2, 4, then the last shifted to 5.
        let w = plan_windows(10, 4, 2);
        let starts: Vec<u64> = w.iter().map(|w| w.start).collect();
        assert_eq!(starts, [0, 2, 4, 5]);
        assert_eq!(w[3].scored_from, 9);
    }

    /// A "model" whose NLL of predicting token `t` is `t / 10` whatever the context:
    /// token-weighted and sequence-mean perplexities against hand values, with two
    /// documents of different lengths.
    #[test]
    fn known_losses_give_hand_computed_perplexities() {
        // Stream: doc 0 = [5, 1, 2, 0] (4 tokens), doc 1 = [7, 3, 0] (3 tokens).
        let stream: Vec<u32> = vec![5, 1, 2, 0, 7, 3, 0];
        let offsets = [0u64, 4, 7];
        let read = |r: Range<u64>, out: &mut Vec<u32>| {
            out.extend_from_slice(&stream[r.start as usize..r.end as usize])
        };
        let nll = |w: &[u32], batch: usize, len: usize| {
            let mut out = Vec::new();
            for row in w.chunks_exact(len + 1).take(batch) {
                out.extend(row[1..].iter().map(|&t| t as f32 / 10.0));
            }
            out
        };
        for (len, stride, batch) in [(6, 6, 1), (3, 1, 2), (2, 2, 8), (4, 3, 3)] {
            let s = score_stream(7, &offsets, &opts(len, stride, batch), read, nll);
            // Targets: positions 1..7 = [1, 2, 0, 7, 3, 0] -> NLL 1.3 over 6 tokens.
            assert_eq!(s.tokens, 6, "{len} {stride}");
            assert!((s.nll - 1.3).abs() < 1e-6);
            // Doc 0 holds targets 1..4 ([1, 2, 0], mean 0.1); doc 1 targets 4..7
            // ([7, 3, 0], mean 1/3).
            assert_eq!(s.documents.len(), 2);
            let p = DomainPerplexity::from_score("d", &s);
            assert!((p.token_loss - 1.3 / 6.0).abs() < 1e-6);
            assert!((p.token_ppl - (1.3f64 / 6.0).exp()).abs() < 1e-6);
            let seq = (0.1 + 1.0 / 3.0) / 2.0;
            assert!((p.sequence_loss - seq).abs() < 1e-6, "{p:?}");
            assert!((p.sequence_ppl - seq.exp()).abs() < 1e-6);
        }
        let split = SplitPerplexity::new(
            "test",
            vec![
                DomainPerplexity::from_score(
                    "a",
                    &StreamScore {
                        nll: 2.0,
                        tokens: 2,
                        documents: vec![(2.0, 2)],
                    },
                ),
                DomainPerplexity::from_score("b", &StreamScore::default()),
                DomainPerplexity::from_score(
                    "c",
                    &StreamScore {
                        nll: 0.0,
                        tokens: 5,
                        documents: vec![(0.0, 5)],
                    },
                ),
            ],
        );
        // Domains without data are left out of the group average: (e + 1) / 2.
        assert!((split.average_ppl - (1f64.exp() + 1.0) / 2.0).abs() < 1e-12);
    }
}
