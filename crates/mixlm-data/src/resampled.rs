//! A prepared corpus seen through a SampleMix sampling plan: each training document
//! appears as many times as the plan says (0 drops it), in a seeded random order,
//! and windows are cut from that virtual stream. Validation and test are untouched.
//!
//! The plan is a folder with one `counts/<domain>.u32` file per domain (little-endian
//! `u32`, one per training document, in shard order), written by `mixlm samplemix`.
//! A domain's natural weight becomes the tokens the plan keeps, so `natural` mixing
//! over this source trains on exactly the domain distribution SampleMix arrived at.

use std::ops::Range;
use std::path::{Path, PathBuf};

use mixlm_mixing::DomainId;
use rand::seq::SliceRandom;

use crate::seeding::{hash_str, rng_from_words};
use crate::shards::{windows_in, ShardSource, WindowPermutation};
use crate::source::{document_at, Split, TokenSource};

/// Why a plan cannot be used with a corpus.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("{}: {source}; run mixlm samplemix to write the plan", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{}: {found} counts for the {expected} training documents of `{domain}`; the plan \
         was made for other data: rerun mixlm samplemix on this folder",
        path.display()
    )]
    Length {
        path: PathBuf,
        domain: String,
        found: usize,
        expected: usize,
    },
    #[error(
        "the plan keeps no training tokens of any domain: its budget is below one \
         document; run mixlm samplemix with a larger --budget"
    )]
    Empty,
}

/// The path of a domain's counts in a plan folder.
pub fn counts_path(plan: &Path, domain: &str) -> PathBuf {
    plan.join("counts").join(format!("{domain}.u32"))
}

/// Reads a domain's counts.
pub fn read_counts(path: &Path) -> Result<Vec<u32>, PlanError> {
    let bytes = std::fs::read(path).map_err(|source| PlanError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    if bytes.len() % 4 != 0 {
        return Err(PlanError::Read {
            path: path.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{} bytes is not a whole number of u32 counts", bytes.len()),
            ),
        });
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

/// Encodes counts as a plan file's bytes.
pub fn counts_bytes(counts: &[u32]) -> Vec<u8> {
    counts.iter().flat_map(|c| c.to_le_bytes()).collect()
}

/// One domain's virtual training stream.
struct Virtual {
    /// Training document of each virtual position, repeats included, shuffled.
    docs: Vec<u32>,
    /// Start of each virtual document in the virtual stream, plus the total.
    starts: Vec<u64>,
}

/// [`ShardSource`] with training documents repeated by a SampleMix plan.
pub struct ResampledSource {
    inner: ShardSource,
    plan: Vec<Virtual>,
    names: Vec<String>,
}

impl ResampledSource {
    /// Opens `plan` for `inner`; the order of repeated documents is drawn from `seed`.
    pub fn open(inner: ShardSource, plan: &Path, seed: u64) -> Result<Self, PlanError> {
        let names = inner.domain_names();
        let mut virtuals = Vec::with_capacity(names.len());
        for (d, name) in names.iter().enumerate() {
            let path = counts_path(plan, name);
            let counts = read_counts(&path)?;
            let offsets = inner.doc_offsets(DomainId(d), Split::Train);
            let expected = offsets.len().saturating_sub(1);
            if counts.len() != expected {
                return Err(PlanError::Length {
                    path,
                    domain: name.clone(),
                    found: counts.len(),
                    expected,
                });
            }
            let mut docs: Vec<u32> = counts
                .iter()
                .enumerate()
                .flat_map(|(i, &c)| std::iter::repeat_n(i as u32, c as usize))
                .collect();
            let mut rng = rng_from_words(&[seed, hash_str(name), hash_str("samplemix")]);
            docs.shuffle(&mut rng);
            let mut starts = Vec::with_capacity(docs.len() + 1);
            let mut at = 0u64;
            starts.push(0);
            for &doc in &docs {
                at += offsets[doc as usize + 1] - offsets[doc as usize];
                starts.push(at);
            }
            virtuals.push(Virtual { docs, starts });
        }
        if virtuals.iter().all(|v| v.docs.is_empty()) {
            return Err(PlanError::Empty);
        }
        Ok(Self {
            inner,
            plan: virtuals,
            names,
        })
    }

    /// Training tokens the plan keeps in each domain.
    pub fn kept_tokens(&self) -> Vec<u64> {
        self.plan
            .iter()
            .map(|v| *v.starts.last().unwrap_or(&0))
            .collect()
    }

    pub fn inner(&self) -> &ShardSource {
        &self.inner
    }

    /// Where training window `index` starts in its domain's virtual stream (`None`
    /// when the plan keeps too few tokens for one window).
    fn train_window_start(&self, domain: DomainId, index: u64, seq_len: usize) -> Option<u64> {
        let n = windows_in(self.kept_tokens()[domain.0], seq_len);
        if n == 0 {
            return None;
        }
        let perm = WindowPermutation::for_epoch(
            n,
            self.inner.seed(),
            &self.names[domain.0],
            Split::Train,
            index / n,
        );
        Some(perm.apply(index % n) * seq_len as u64)
    }

    /// Appends tokens `range` of a domain's virtual training stream.
    fn read_virtual(&self, domain: DomainId, range: Range<u64>, out: &mut Vec<u32>) {
        let v = &self.plan[domain.0];
        let offsets = self.inner.doc_offsets(domain, Split::Train);
        let mut at = range.start;
        let mut k = document_at(&v.starts, at);
        while at < range.end {
            let doc = v.docs[k] as usize;
            let within = at - v.starts[k];
            let end = range.end.min(v.starts[k + 1]);
            let from = offsets[doc] + within;
            self.inner
                .read_tokens(domain, Split::Train, from..from + (end - at), out);
            at = end;
            k += 1;
        }
    }
}

impl TokenSource for ResampledSource {
    fn domain_names(&self) -> Vec<String> {
        self.names.clone()
    }

    fn shard_name(&self, domain: DomainId, split: Split) -> String {
        self.inner.shard_name(domain, split)
    }

    fn vocab_size(&self) -> usize {
        self.inner.vocab_size()
    }

    fn eos_id(&self) -> u32 {
        self.inner.eos_id()
    }

    /// The tokens the plan keeps: SampleMix's domain distribution.
    fn natural_weights(&self) -> Vec<f64> {
        self.kept_tokens().iter().map(|&t| t as f64).collect()
    }

    fn num_windows(&self, domain: DomainId, split: Split, seq_len: usize) -> Option<u64> {
        match split {
            Split::Train => Some(windows_in(self.kept_tokens()[domain.0], seq_len)),
            _ => self.inner.num_windows(domain, split, seq_len),
        }
    }

    fn window_into(
        &self,
        domain: DomainId,
        split: Split,
        index: u64,
        seq_len: usize,
        out: &mut Vec<u32>,
    ) {
        if split != Split::Train {
            return self.inner.window_into(domain, split, index, seq_len, out);
        }
        let start = self
            .train_window_start(domain, index, seq_len)
            .unwrap_or_else(|| {
                panic!(
                    "the SampleMix plan keeps too few tokens of {} for one window of {} tokens",
                    self.names[domain.0],
                    seq_len + 1
                )
            });
        self.read_virtual(domain, start..start + seq_len as u64 + 1, out);
    }

    /// In training, the corpus documents (shard order) that the window's first and
    /// last tokens come from; those between them in the window are other documents
    /// of the plan's shuffled order, not the ids between the two.
    fn window_documents(
        &self,
        domain: DomainId,
        split: Split,
        index: u64,
        seq_len: usize,
    ) -> Option<[u64; 2]> {
        if split != Split::Train {
            return self.inner.window_documents(domain, split, index, seq_len);
        }
        let start = self.train_window_start(domain, index, seq_len)?;
        let v = &self.plan[domain.0];
        let doc = |token: u64| v.docs[document_at(&v.starts, token)] as u64;
        Some([doc(start), doc(start + seq_len as u64)])
    }

    fn stream_documents(&self, domain: DomainId, split: Split) -> Option<&[u64]> {
        self.inner.stream_documents(domain, split)
    }

    fn read_stream(&self, domain: DomainId, split: Split, range: Range<u64>, out: &mut Vec<u32>) {
        self.inner.read_stream(domain, split, range, out)
    }

    fn floor_loss(&self, _domain: DomainId, _seq_len: usize) -> Option<f64> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prepare::testutil::{jsonl, texts, write_file, write_tokenizer};
    use crate::{prepare, PrepareConfig};

    /// Two domains, all documents in train (plus one each in validation).
    fn corpus(dir: &Path) -> ShardSource {
        let tokenizer = dir.join("tokenizer.json");
        write_tokenizer(&tokenizer, 0);
        let t = texts(40, 5);
        let rows: Vec<(&str, String)> = t
            .iter()
            .enumerate()
            .map(|(i, x)| (if i % 2 == 0 { "a" } else { "b" }, x.repeat(1 + i % 3)))
            .collect();
        write_file(
            &dir.join("raw/train/x.jsonl"),
            jsonl(&rows[..36]).as_bytes(),
        );
        write_file(
            &dir.join("raw/validation/x.jsonl"),
            jsonl(&rows[36..]).as_bytes(),
        );
        prepare(&PrepareConfig {
            inputs: vec![dir.join("raw").display().to_string()],
            tokenizer,
            output: dir.join("shards"),
            ..PrepareConfig::default()
        })
        .unwrap();
        ShardSource::open(dir.join("shards"), 3).unwrap()
    }

    fn write_plan(plan: &Path, domain: &str, counts: &[u32]) {
        let path = counts_path(plan, domain);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, counts_bytes(counts)).unwrap();
    }

    /// The documents of a token stream (each ends with EOS).
    fn split_docs(stream: &[u32], eos: u32) -> Vec<Vec<u32>> {
        stream
            .split_inclusive(|&t| t == eos)
            .map(<[u32]>::to_vec)
            .collect()
    }

    #[test]
    fn the_plan_repeats_documents_and_sets_the_domain_weights() {
        let tmp = tempfile::tempdir().unwrap();
        let shards = corpus(tmp.path());
        let plan = tmp.path().join("plan");
        let counts_a: Vec<u32> = (0..18).map(|i| (i % 4) as u32).collect(); // 0, 1, 2, 3, ...
        let counts_b = vec![1u32; 18];
        write_plan(&plan, "a", &counts_a);
        write_plan(&plan, "b", &counts_b);
        let source = ResampledSource::open(shards, &plan, 11).unwrap();
        let shards = source.inner();
        let doc = |d: usize, i: usize| -> Vec<u32> {
            let o = shards.doc_offsets(DomainId(d), Split::Train);
            let mut out = Vec::new();
            shards.read_tokens(DomainId(d), Split::Train, o[i]..o[i + 1], &mut out);
            out
        };

        let len = |d: usize, i: usize| {
            let o = shards.doc_offsets(DomainId(d), Split::Train);
            o[i + 1] - o[i]
        };
        let kept_a: u64 = (0..18).map(|i| counts_a[i] as u64 * len(0, i)).sum();
        let kept_b: u64 = (0..18).map(|i| len(1, i)).sum();
        assert_eq!(source.kept_tokens(), vec![kept_a, kept_b]);
        assert_eq!(source.natural_weights(), vec![kept_a as f64, kept_b as f64]);

        // The virtual stream holds each document exactly `count` times.
        let mut stream = Vec::new();
        source.read_virtual(DomainId(0), 0..kept_a, &mut stream);
        let mut got = split_docs(&stream, source.eos_id());
        let mut want: Vec<Vec<u32>> = (0..18)
            .flat_map(|i| std::iter::repeat_n(doc(0, i), counts_a[i] as usize))
            .collect();
        got.sort();
        want.sort();
        assert_eq!(got, want);

        // Training windows are cut from that stream (permuted, as shards are);
        // validation is the corpus's own.
        let seq_len = 16;
        let n = source
            .num_windows(DomainId(0), Split::Train, seq_len)
            .unwrap();
        assert_eq!(n, (kept_a - 1) / seq_len as u64);
        let perm = WindowPermutation::for_epoch(n, 3, "a", Split::Train, 0);
        let mut starts: Vec<u64> = (0..n)
            .map(|i| {
                let w = source.window(DomainId(0), Split::Train, i, seq_len);
                let at = (perm.apply(i) * seq_len as u64) as usize;
                assert_eq!(w[..], stream[at..at + seq_len + 1], "window {i}");
                perm.apply(i)
            })
            .collect();
        starts.sort();
        assert_eq!(
            starts,
            (0..n).collect::<Vec<_>>(),
            "one epoch reads every window once"
        );

        // A window names the documents its first and last tokens come from (what a
        // fault report lists), found here by cutting the stream at its EOS tokens.
        let pieces = split_docs(&stream, source.eos_id());
        let mut bounds = vec![0usize];
        for p in &pieces {
            bounds.push(bounds.last().unwrap() + p.len());
        }
        let piece_at = |pos: usize| &pieces[bounds.partition_point(|&b| b <= pos) - 1];
        let mut straddling = 0;
        for i in 0..n {
            let [first, last] = source
                .window_documents(DomainId(0), Split::Train, i, seq_len)
                .unwrap();
            let at = (perm.apply(i) * seq_len as u64) as usize;
            assert_eq!(piece_at(at), &doc(0, first as usize), "window {i}");
            assert_eq!(piece_at(at + seq_len), &doc(0, last as usize), "window {i}");
            straddling += usize::from(piece_at(at) != piece_at(at + seq_len));
        }
        assert!(straddling > 0, "some windows span two documents");
        assert_eq!(
            source.window_documents(DomainId(1), Split::Validation, 0, 8),
            shards.window_documents(DomainId(1), Split::Validation, 0, 8)
        );
        assert_eq!(
            source.window(DomainId(1), Split::Validation, 0, 8),
            shards.window(DomainId(1), Split::Validation, 0, 8)
        );

        // Another seed, another order of the same documents.
        let other = ResampledSource::open(
            ShardSource::open(tmp.path().join("shards"), 3).unwrap(),
            &plan,
            12,
        )
        .unwrap();
        let mut s2 = Vec::new();
        other.read_virtual(DomainId(0), 0..kept_a, &mut s2);
        assert_ne!(s2, stream);
        let mut again = Vec::new();
        ResampledSource::open(
            ShardSource::open(tmp.path().join("shards"), 3).unwrap(),
            &plan,
            11,
        )
        .unwrap()
        .read_virtual(DomainId(0), 0..kept_a, &mut again);
        assert_eq!(again, stream);
    }

    #[test]
    fn plans_for_other_data_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let plan = tmp.path().join("plan");
        write_plan(&plan, "a", &[1; 5]);
        let e = ResampledSource::open(corpus(tmp.path()), &plan, 0)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("a.u32: 5 counts for the 18 training documents of `a`"),
            "{e}"
        );
        let refusal = || {
            ResampledSource::open(
                ShardSource::open(tmp.path().join("shards"), 0).unwrap(),
                &plan,
                0,
            )
            .err()
            .unwrap()
            .to_string()
        };
        write_plan(&plan, "a", &[1; 18]);
        let e = refusal();
        assert!(
            e.contains("b.u32") && e.contains("run mixlm samplemix"),
            "{e}"
        );
        write_plan(&plan, "b", &[0; 18]);
        write_plan(&plan, "a", &[0; 18]);
        let e = refusal();
        assert!(e.contains("keeps no training tokens"), "{e}");
    }
}
