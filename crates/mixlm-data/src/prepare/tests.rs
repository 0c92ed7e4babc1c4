//! End-to-end tests of `prepare` and `ShardSource` on generated corpora, plus the
//! real data in `shared/data` when it is there.

use super::testutil::{self, jsonl, write_file, write_tokenizer};
use super::*;
use crate::shards::{ShardSource, WindowPermutation};
use crate::source::TokenSource;
use mixlm_mixing::DomainId;
use std::path::{Path, PathBuf};
use tempfile::TempDir;

struct Fixture {
    dir: TempDir,
    tokenizer: PathBuf,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let tokenizer = dir.path().join("tokenizer.json");
        write_tokenizer(&tokenizer, 0);
        Self { dir, tokenizer }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn config(&self, inputs: &[&str], out: &str) -> PrepareConfig {
        PrepareConfig {
            inputs: inputs
                .iter()
                .map(|i| self.path(i).to_string_lossy().into_owned())
                .collect(),
            tokenizer: self.tokenizer.clone(),
            output: self.path(out),
            ..PrepareConfig::default()
        }
    }

    fn tok(&self) -> PreparedTokenizer {
        PreparedTokenizer::load(&self.tokenizer, None).unwrap()
    }
}

/// The expected stream of some texts: each one's ids followed by EOS.
fn stream(tok: &PreparedTokenizer, texts: &[&String]) -> Vec<u32> {
    texts
        .iter()
        .flat_map(|t| {
            let mut ids = tok.encode(t).unwrap();
            ids.push(tok.eos_id);
            ids
        })
        .collect()
}

fn counts(docs: u64, tokens: usize) -> ShardCounts {
    ShardCounts {
        documents: docs,
        tokens: tokens as u64,
    }
}

/// One input file of [`two_domain_files`]: its path, split and `(domain, text)` rows.
type CorpusFile = (&'static str, Split, Vec<(&'static str, String)>);

/// Two domains over train (a plain and a zstd file, domains interleaved) and
/// validation.
fn two_domain_files() -> Vec<CorpusFile> {
    let t = testutil::texts(60, 7);
    let rows = |range: std::ops::Range<usize>, beta_every: usize| {
        range
            .map(|i| {
                let d = if i % beta_every == 0 { "Beta" } else { "Alpha" };
                (d, t[i].clone())
            })
            .collect::<Vec<_>>()
    };
    // Files are read in path order: train/a.jsonl, train/b.jsonl.zst, validation/...
    vec![
        ("corpus/train/a.jsonl", Split::Train, rows(0..20, 3)),
        ("corpus/train/b.jsonl.zst", Split::Train, rows(20..45, 2)),
        (
            "corpus/validation/a.jsonl.zst",
            Split::Validation,
            rows(45..60, 4),
        ),
    ]
}

/// Writes [`two_domain_files`]; returns the texts per (split, domain) in stored order.
fn write_two_domain_corpus(fx: &Fixture) -> BTreeMap<(Split, &'static str), Vec<String>> {
    let mut expected: BTreeMap<(Split, &'static str), Vec<String>> = BTreeMap::new();
    for (rel, split, items) in two_domain_files() {
        let recs: Vec<(&str, String)> = items.iter().map(|(d, t)| (*d, t.clone())).collect();
        write_file(&fx.path(rel), jsonl(&recs).as_bytes());
        for (d, text) in items {
            expected.entry((split, d)).or_default().push(text);
        }
    }
    expected
}

/// Every shard file (`.bin`, `.idx`) of two prepared folders is byte-identical.
fn assert_same_shards(a: &Path, b: &Path) {
    let files = |root: &Path| -> Vec<PathBuf> {
        let mut out = Vec::new();
        for split in std::fs::read_dir(root).unwrap() {
            let split = split.unwrap().path();
            if split.is_dir() {
                for f in std::fs::read_dir(&split).unwrap() {
                    out.push(f.unwrap().path().strip_prefix(root).unwrap().to_path_buf());
                }
            }
        }
        out.sort();
        out
    };
    let (fa, fb) = (files(a), files(b));
    assert_eq!(fa, fb);
    assert!(!fa.is_empty());
    for rel in fa {
        assert_eq!(
            std::fs::read(a.join(&rel)).unwrap(),
            std::fs::read(b.join(&rel)).unwrap(),
            "{}",
            rel.display()
        );
    }
}

#[test]
fn prepare_counts_match_and_shards_round_trip() {
    let fx = Fixture::new();
    let expected = write_two_domain_corpus(&fx);
    let tok = fx.tok();
    let mut cfg = fx.config(&["corpus"], "out");
    cfg.batch_documents = 7; // several batches, and batches spanning files
    let summary = prepare(&cfg).unwrap();
    assert!(!summary.up_to_date);
    assert_eq!(summary.split_method, SplitMethod::Dataset);
    assert_eq!(summary.token_dtype, TokenDtype::U16);
    assert!(summary.skipped.is_empty());

    let m = Manifest::read(&cfg.output).unwrap().unwrap();
    assert_eq!(m.splits, summary.splits);
    assert_eq!(m.split_method, SplitMethod::Dataset);
    assert_eq!(m.tokenizer.sha256, tok.sha256);
    assert_eq!(m.tokenizer.eos_id, 0);
    assert_eq!(m.tokenizer.vocab_size, testutil::BASE_VOCAB);
    assert_eq!(m.inputs.len(), 3);
    assert_eq!(
        m.inputs.iter().map(|f| f.split).collect::<Vec<_>>(),
        [
            Some(Split::Train),
            Some(Split::Train),
            Some(Split::Validation)
        ]
    );
    // Manifest counts = hand counts.
    for ((split, domain), texts) in &expected {
        let refs: Vec<&String> = texts.iter().collect();
        assert_eq!(
            m.splits[split][*domain],
            counts(texts.len() as u64, stream(&tok, &refs).len()),
            "{split} / {domain}"
        );
    }
    assert_eq!(m.splits.len(), 2, "no test split");
    assert!(summary.table().contains("Alpha"));
    assert!(summary.table().contains("validation"));

    let src = ShardSource::open(&cfg.output, 5).unwrap();
    assert_eq!(src.domain_names(), ["Alpha", "Beta"]);
    assert_eq!(src.vocab_size(), testutil::BASE_VOCAB);
    assert_eq!(src.eos_id(), 0);
    assert_eq!(src.floor_loss(DomainId(0), 8), None);
    assert_eq!(
        src.natural_weights(),
        [
            m.splits[&Split::Train]["Alpha"].tokens as f64,
            m.splits[&Split::Train]["Beta"].tokens as f64
        ]
    );

    for (d, name) in ["Alpha", "Beta"].into_iter().enumerate() {
        let d = DomainId(d);
        for split in [Split::Train, Split::Validation] {
            let texts = &expected[&(split, name)];
            let refs: Vec<&String> = texts.iter().collect();
            let want = stream(&tok, &refs);
            // The .bin stream is the documents + EOS in input order.
            let mut all = Vec::new();
            src.read_tokens(d, split, 0..want.len() as u64, &mut all);
            assert_eq!(all, want, "{name} / {split}");
            // The index splits it into the documents, which decode to the texts.
            let off = src.doc_offsets(d, split);
            assert_eq!(off.len(), texts.len() + 1);
            assert_eq!(*off.last().unwrap(), want.len() as u64);
            for (k, text) in texts.iter().enumerate() {
                let doc = &all[off[k] as usize..off[k + 1] as usize];
                assert_eq!(*doc.last().unwrap(), 0, "each document ends with EOS");
                assert_eq!(&tok.decode(&doc[..doc.len() - 1]).unwrap(), text);
            }
            // Windows: epoch 0 visits every window once; putting them back in stream
            // order rebuilds the stream up to its last whole window.
            for seq_len in [1usize, 5, 16] {
                let n = src.num_windows(d, split, seq_len).unwrap();
                assert_eq!(n, (want.len() as u64 - 1) / seq_len as u64);
                let mut by_position = vec![None; n as usize];
                for i in 0..n {
                    let (epoch, w) = src.locate(d, split, i, seq_len);
                    assert_eq!(epoch, 0);
                    let win = src.window(d, split, i, seq_len);
                    assert_eq!(win.len(), seq_len + 1);
                    // The documents its first and last token belong to.
                    let [first, last] = src.window_documents(d, split, i, seq_len).unwrap();
                    let (start, end) = (w * seq_len as u64, w * seq_len as u64 + seq_len as u64);
                    let (first, last) = (first as usize, last as usize);
                    assert!(off[first] <= start && start < off[first + 1], "window {w}");
                    assert!(off[last] <= end && end < off[last + 1], "window {w}");
                    assert!(
                        by_position[w as usize].replace(win).is_none(),
                        "window {w} twice"
                    );
                }
                let mut rebuilt: Vec<u32> = Vec::new();
                for (w, win) in by_position.iter().enumerate() {
                    let win = win
                        .as_ref()
                        .unwrap_or_else(|| panic!("window {w} never read"));
                    if w == 0 {
                        rebuilt.extend_from_slice(win);
                    } else {
                        assert_eq!(*rebuilt.last().unwrap(), win[0], "windows share a token");
                        rebuilt.extend_from_slice(&win[1..]);
                    }
                }
                assert_eq!(rebuilt[..], want[..n as usize * seq_len + 1]);
                // Index n + k is epoch 1, a different order of the same windows.
                assert_eq!(src.epoch_of(d, split, n + 3, seq_len), 1);
                let p1 = WindowPermutation::for_epoch(n, 5, name, split, 1);
                let start = p1.apply(n.min(4) - 1) as usize * seq_len;
                assert_eq!(
                    src.window(d, split, n + n.min(4) - 1, seq_len),
                    want[start..start + seq_len + 1]
                );
            }
        }
    }
    // Another seed: other window order, same windows.
    let other = ShardSource::open(&cfg.output, 6).unwrap();
    let order = |s: &ShardSource| -> Vec<u64> {
        (0..20)
            .map(|i| s.locate(DomainId(0), Split::Train, i, 4).1)
            .collect()
    };
    assert_ne!(order(&src), order(&other));
    let batch = crate::fetch_batch(
        &src,
        Split::Train,
        &[(DomainId(1), 0), (DomainId(0), 99)],
        4,
    );
    assert_eq!(batch.len(), 10);
    assert!(src
        .check_seq_len(16, &[Split::Train, Split::Validation])
        .is_ok());
    let e = src
        .check_seq_len(100_000, &[Split::Validation])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("Alpha / validation") && e.contains("Beta / validation"),
        "{e}"
    );
    assert!(e.contains("use a shorter run.seq_len"), "{e}");
}

/// A split with no tokens gets advice that can help (a validation split), not a
/// shorter sequence length.
#[test]
fn an_empty_validation_split_is_not_told_to_shorten_the_sequences() {
    let fx = Fixture::new();
    write_two_domain_corpus(&fx);
    let mut cfg = fx.config(&["corpus/train"], "out");
    cfg.validation_fraction = 0.0;
    cfg.test_fraction = 0.0;
    prepare(&cfg).unwrap();
    let src = ShardSource::open(&cfg.output, 0).unwrap();
    let e = src
        .check_seq_len(16, &[Split::Train, Split::Validation])
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with(
            "no tokens in: Alpha / validation, Beta / validation; a shorter \
                       run.seq_len cannot help"
        ) && e.contains("data.prepare.validation_fraction > 0")
            && !e.contains("use a shorter"),
        "{e}"
    );
}

#[test]
fn output_does_not_depend_on_batching() {
    let fx = Fixture::new();
    write_two_domain_corpus(&fx);
    let mut a = fx.config(&["corpus"], "out1");
    a.batch_documents = 1;
    let mut b = fx.config(&["corpus"], "out2");
    b.batch_documents = 10_000;
    prepare(&a).unwrap();
    prepare(&b).unwrap();
    for rel in ["train/Alpha.bin", "train/Beta.idx", "validation/Alpha.bin"] {
        assert_eq!(
            std::fs::read(a.output.join(rel)).unwrap(),
            std::fs::read(b.output.join(rel)).unwrap(),
            "{rel}"
        );
    }
}

#[test]
fn hash_split_when_inputs_name_no_split() {
    let fx = Fixture::new();
    let texts = testutil::texts(400, 3);
    let recs: Vec<(&str, String)> = texts.iter().map(|t| ("D", t.clone())).collect();
    write_file(
        &fx.path("flat/part-0.jsonl.zst"),
        jsonl(&recs[..250]).as_bytes(),
    );
    write_file(
        &fx.path("flat/part-1.jsonl"),
        jsonl(&recs[250..]).as_bytes(),
    );
    let mut cfg = fx.config(&["flat"], "out");
    cfg.validation_fraction = 0.2;
    cfg.test_fraction = 0.1;
    let s = prepare(&cfg).unwrap();
    let SplitMethod::Hash {
        validation_fraction,
        test_fraction,
        rule,
    } = &s.split_method
    else {
        panic!("{:?}", s.split_method)
    };
    assert_eq!((*validation_fraction, *test_fraction), (0.2, 0.1));
    assert!(rule.contains("SHA-256"));
    let tok = fx.tok();
    for split in Split::ALL {
        let mine: Vec<&String> = texts
            .iter()
            .filter(|t| hash_split(t, 0.2, 0.1) == split)
            .collect();
        assert!(mine.len() > 20, "{split}: {}", mine.len());
        assert_eq!(
            s.splits[&split]["D"],
            counts(mine.len() as u64, stream(&tok, &mine).len()),
            "{split}"
        );
    }
    // The test split is a real split on disk.
    let src = ShardSource::open(&cfg.output, 0).unwrap();
    assert!(src.counts(DomainId(0), Split::Test).documents > 20);
}

#[test]
fn mixed_split_and_unsplit_inputs_are_refused() {
    let fx = Fixture::new();
    let recs = [("D", "a".to_string())];
    write_file(&fx.path("c/train/a.jsonl"), jsonl(&recs).as_bytes());
    write_file(&fx.path("c/extra/b.jsonl"), jsonl(&recs).as_bytes());
    let e = prepare(&fx.config(&["c"], "out")).unwrap_err().to_string();
    assert!(
        e.contains("data.prepare.inputs") && e.contains("b.jsonl"),
        "{e}"
    );
}

#[test]
fn rename_merges_and_keep_drop_filter() {
    let fx = Fixture::new();
    let t = testutil::texts(12, 1);
    let recs: Vec<(&str, String)> = ["RedPajamaArXiv", "RedPajamaBook", "RedPajamaC4", "X"]
        .iter()
        .cycle()
        .zip(&t)
        .map(|(d, t)| (*d, t.clone()))
        .collect();
    write_file(&fx.path("c/train/a.jsonl"), jsonl(&recs).as_bytes());
    let mut cfg = fx.config(&["c"], "out");
    cfg.rename = [
        ("RedPajamaArXiv", "papers"),
        ("RedPajamaBook", "papers"),
        ("RedPajamaC4", "web"),
    ]
    .into_iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    cfg.keep = Some(vec!["papers".into(), "web".into(), "code".into()]);
    cfg.drop = vec!["web".into()];
    let e = prepare(&cfg).unwrap_err().to_string();
    assert!(
        e.contains("data.prepare.drop") && e.contains("`web`"),
        "{e}"
    );
    cfg.keep = Some(vec!["papers".into(), "code".into()]);
    let s = prepare(&cfg).unwrap();
    let train = &s.splits[&Split::Train];
    assert_eq!(train.keys().collect::<Vec<_>>(), ["papers"]);
    assert_eq!(train["papers"].documents, 6);
    assert_eq!(
        s.dropped_documents,
        [("X".to_string(), 3), ("web".to_string(), 3)].into()
    );
    assert!(
        s.warnings.iter().any(|w| w.contains("`code`")),
        "{:?}",
        s.warnings
    );
    // Stored in input order: ArXiv and Book documents interleaved.
    let tok = fx.tok();
    let papers: Vec<&String> = t
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 4 < 2)
        .map(|(_, t)| t)
        .collect();
    let src = ShardSource::open(&cfg.output, 0).unwrap();
    let mut all = Vec::new();
    src.read_tokens(
        DomainId(0),
        Split::Train,
        0..train["papers"].tokens,
        &mut all,
    );
    assert_eq!(all, stream(&tok, &papers));
}

/// A corpus with 4 good documents in `train/good.jsonl` and one bad file.
fn bad_input_case(bad_name: &str, bad: &[u8], raw: bool) -> (Fixture, PrepareConfig) {
    let fx = Fixture::new();
    let good: Vec<(&str, String)> = testutil::texts(4, 9)
        .into_iter()
        .map(|t| ("D", t))
        .collect();
    write_file(&fx.path("c/train/good.jsonl"), jsonl(&good).as_bytes());
    let path = fx.path(&format!("c/train/{bad_name}"));
    if raw {
        std::fs::write(&path, bad).unwrap();
    } else {
        write_file(&path, bad);
    }
    let cfg = fx.config(&["c"], "out");
    (fx, cfg)
}

#[test]
fn every_kind_of_bad_input_fails_with_file_and_line_or_is_skipped_and_counted() {
    use arrow_array::{ArrayRef, BinaryArray, Int64Array, StringArray};
    use std::sync::Arc;
    let ok = |t: &str| testutil::record("D", t);
    let lines = |ls: &[String]| ls.join("\n").into_bytes();
    // A valid zstd file of 100 records (~500 kB of poorly compressible text, so
    // several zstd blocks), then cut short: the first blocks still decode.
    let many: Vec<String> = (0..100u64)
        .map(|i| {
            let words: Vec<String> = (0..300u64)
                .map(|k| format!("{:x}", crate::seeding::hash_words(&[i, k])))
                .collect();
            ok(&words.join(" "))
        })
        .collect();
    let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
    enc.include_checksum(true).unwrap();
    std::io::Write::write_all(&mut enc, &lines(&many)).unwrap();
    let full = enc.finish().unwrap();
    let truncated = full[..full.len() - 12].to_vec();

    struct Case {
        name: &'static str,
        content: Vec<u8>,
        raw: bool,
        kind: SkipKind,
        location: &'static str,
        good_docs_in_bad_file: Option<u64>,
    }
    let cases = vec![
        Case {
            name: "json.jsonl",
            content: lines(&[ok("a"), "{\"text\": \"unclosed".into(), ok("b")]),
            raw: false,
            kind: SkipKind::InvalidJson,
            location: "json.jsonl:2",
            good_docs_in_bad_file: Some(2),
        },
        Case {
            name: "nodomain.jsonl",
            content: lines(&[ok("a"), ok("b"), r#"{"text": "c", "meta": {}}"#.into()]),
            raw: false,
            kind: SkipKind::BadDomain,
            location: "nodomain.jsonl:3",
            good_docs_in_bad_file: Some(2),
        },
        Case {
            name: "numdomain.jsonl",
            content: lines(&[
                r#"{"text": "c", "meta": {"redpajama_set_name": 7}}"#.into(),
                ok("b"),
            ]),
            raw: false,
            kind: SkipKind::BadDomain,
            location: "numdomain.jsonl:1",
            good_docs_in_bad_file: Some(1),
        },
        Case {
            name: "notext.jsonl",
            content: lines(&[ok("a"), r#"{"meta": {"redpajama_set_name": "D"}}"#.into()]),
            raw: false,
            kind: SkipKind::BadText,
            location: "notext.jsonl:2",
            good_docs_in_bad_file: Some(1),
        },
        Case {
            name: "listtext.jsonl",
            content: lines(&[r#"{"text": ["a"], "meta": {"redpajama_set_name": "D"}}"#.into()]),
            raw: false,
            kind: SkipKind::BadText,
            location: "listtext.jsonl:1",
            good_docs_in_bad_file: Some(0),
        },
        Case {
            name: "utf8.jsonl.zst",
            content: [
                ok("a").as_bytes(),
                b"\n{\"text\": \"bad \xff\xfe byte\", \"meta\": {\"redpajama_set_name\": \"D\"}}\n",
                ok("c").as_bytes(),
            ]
            .concat(),
            raw: false,
            kind: SkipKind::InvalidUtf8,
            location: "utf8.jsonl.zst:2",
            good_docs_in_bad_file: Some(2),
        },
        Case {
            name: "truncated.jsonl.zst",
            content: truncated,
            raw: true,
            kind: SkipKind::CorruptCompression,
            location: "truncated.jsonl.zst:",
            good_docs_in_bad_file: None,
        },
        Case {
            name: "garbage.jsonl.zst",
            content: b"this is not zstd at all\n".repeat(10),
            raw: true,
            kind: SkipKind::CorruptCompression,
            location: "garbage.jsonl.zst:1",
            good_docs_in_bad_file: Some(0),
        },
        Case {
            name: "empty.jsonl",
            content: Vec::new(),
            raw: true,
            kind: SkipKind::EmptyFile,
            location: "empty.jsonl",
            good_docs_in_bad_file: Some(0),
        },
        Case {
            name: "empty.jsonl.zst",
            content: Vec::new(),
            raw: false, // a valid zstd frame of nothing
            kind: SkipKind::EmptyFile,
            location: "empty.jsonl.zst",
            good_docs_in_bad_file: Some(0),
        },
        Case {
            name: "nullmeta.parquet",
            content: testutil::slimpajama6b_parquet(
                &[
                    (Some("D"), Some("a")),
                    (None, Some("b")),
                    (Some("D"), Some("c")),
                ],
                2,
            ),
            raw: true,
            kind: SkipKind::BadDomain,
            location: "nullmeta.parquet row 2",
            good_docs_in_bad_file: Some(2),
        },
        Case {
            name: "nulltext.parquet",
            content: testutil::slimpajama6b_parquet(
                &[(Some("D"), None), (Some("D"), Some("c"))],
                8,
            ),
            raw: true,
            kind: SkipKind::BadText,
            location: "nulltext.parquet row 1",
            good_docs_in_bad_file: Some(1),
        },
        Case {
            name: "nometa.parquet",
            content: testutil::parquet_bytes(
                vec![(
                    "text",
                    Arc::new(StringArray::from(vec!["a", "b"])) as ArrayRef,
                )],
                8,
            ),
            raw: true,
            kind: SkipKind::BadDomain,
            location: "nometa.parquet",
            good_docs_in_bad_file: Some(0),
        },
        Case {
            name: "intdomain.parquet",
            content: testutil::parquet_bytes(
                vec![
                    ("text", Arc::new(StringArray::from(vec!["a"])) as ArrayRef),
                    ("meta", Arc::new(Int64Array::from(vec![3])) as ArrayRef),
                ],
                8,
            ),
            raw: true,
            kind: SkipKind::BadDomain,
            location: "intdomain.parquet",
            good_docs_in_bad_file: Some(0),
        },
        Case {
            name: "binary.parquet",
            content: testutil::parquet_bytes(
                vec![
                    (
                        "text",
                        Arc::new(BinaryArray::from(vec![&b"ok"[..], b"bad \xff byte", b"ok"]))
                            as ArrayRef,
                    ),
                    (
                        "meta",
                        Arc::new(StringArray::from(vec![r#"{"redpajama_set_name": "D"}"#; 3]))
                            as ArrayRef,
                    ),
                ],
                8,
            ),
            raw: true,
            kind: SkipKind::InvalidUtf8,
            location: "binary.parquet row 2",
            good_docs_in_bad_file: Some(2),
        },
        Case {
            name: "truncated.parquet",
            content: {
                let full = testutil::slimpajama6b_parquet(&[(Some("D"), Some("a"))], 8);
                full[..full.len() - 9].to_vec()
            },
            raw: true,
            kind: SkipKind::CorruptFile,
            location: "truncated.parquet",
            good_docs_in_bad_file: Some(0),
        },
        Case {
            name: "empty.parquet",
            content: testutil::slimpajama6b_parquet(&[], 8),
            raw: true,
            kind: SkipKind::EmptyFile,
            location: "empty.parquet",
            good_docs_in_bad_file: Some(0),
        },
        Case {
            name: "blank.jsonl",
            content: b"\n  \n\r\n".to_vec(),
            raw: true,
            kind: SkipKind::EmptyFile,
            location: "blank.jsonl",
            good_docs_in_bad_file: Some(0),
        },
    ];
    for case in cases {
        let (fx, mut cfg) = bad_input_case(case.name, &case.content, case.raw);
        // fail: an error naming the file (and line), the problem and the fix.
        let e = prepare(&cfg).unwrap_err();
        let msg = e.to_string();
        println!("{}: {msg}", case.name);
        assert!(
            matches!(e, PrepareError::BadInput { kind, .. } if kind == case.kind),
            "{msg}"
        );
        assert!(msg.contains(case.location), "{}: {msg}", case.name);
        assert!(msg.contains("on_error"), "{msg}");
        assert!(!cfg.output.join(MANIFEST_FILE).exists());
        let leftovers = std::fs::read_dir(cfg.output.join("train"))
            .map(|d| d.count())
            .unwrap_or(0);
        assert_eq!(leftovers, 0, "{}: partial shards left", case.name);
        // skip: counted, the rest prepared.
        cfg.on_error = OnError::Skip;
        let s = prepare(&cfg).unwrap();
        assert_eq!(
            s.skipped.count(case.kind),
            1,
            "{}: {:?}",
            case.name,
            s.skipped
        );
        assert_eq!(s.skipped.total(), 1, "{}", case.name);
        assert!(
            s.skipped.examples[0].contains(case.location),
            "{:?}",
            s.skipped.examples
        );
        let docs = s.splits[&Split::Train]["D"].documents;
        match case.good_docs_in_bad_file {
            Some(n) => assert_eq!(docs, 4 + n, "{}", case.name),
            // Truncated: only complete lines before the damage, never all 100.
            None => assert!(docs > 4 && docs < 4 + 100, "{}: {docs}", case.name),
        }
        let m = Manifest::read(&cfg.output).unwrap().unwrap();
        assert_eq!(m.skipped, s.skipped);
        assert!(s.table().contains(case.kind.name()), "{}", s.table());
        if case.kind == SkipKind::EmptyFile {
            assert!(
                s.warnings.iter().any(|w| w.contains("empty")),
                "{:?}",
                s.warnings
            );
        }
        drop(fx);
    }
}

#[test]
fn undecodable_domain_names_are_bad_records() {
    let (_fx, cfg) = bad_input_case(
        "x.jsonl",
        testutil::record("../escape", "t").as_bytes(),
        false,
    );
    let e = prepare(&cfg).unwrap_err().to_string();
    assert!(
        e.contains("x.jsonl:1") && e.contains("data.prepare.rename"),
        "{e}"
    );
}

fn mtimes(dir: &Path) -> BTreeMap<PathBuf, std::time::SystemTime> {
    let mut out = BTreeMap::new();
    for split in ["", "train", "validation"] {
        for e in std::fs::read_dir(dir.join(split)).unwrap() {
            let e = e.unwrap();
            // The lock file names each prepare's PID; the dataset's files are the rest.
            if e.file_type().unwrap().is_file() && e.file_name() != crate::lock::LOCK_FILE {
                out.insert(e.path(), e.metadata().unwrap().modified().unwrap());
            }
        }
    }
    out
}

#[test]
fn rerun_is_up_to_date_and_changes_are_refused_unless_forced() {
    let fx = Fixture::new();
    write_two_domain_corpus(&fx);
    let mut cfg = fx.config(&["corpus"], "out");
    let first = prepare(&cfg).unwrap();
    let before = mtimes(&cfg.output);
    assert!(before.len() >= 9, "{before:?}");
    std::thread::sleep(std::time::Duration::from_millis(20));

    let again = prepare(&cfg).unwrap();
    assert!(again.up_to_date);
    assert!(again.table().contains("up to date"));
    assert_eq!(again.splits, first.splits);
    assert_eq!(mtimes(&cfg.output), before, "nothing rewritten");

    // batch_documents does not change the output: still up to date.
    cfg.batch_documents = 3;
    assert!(prepare(&cfg).unwrap().up_to_date);

    // A changed tokenizer is refused, naming it.
    write_tokenizer(&fx.tokenizer, 5);
    let e = prepare(&cfg).unwrap_err().to_string();
    assert!(
        e.contains("tokenizer changed") && e.contains("tokenizer.json"),
        "{e}"
    );
    assert!(e.contains("data.prepare.force"), "{e}");
    assert_eq!(mtimes(&cfg.output), before, "a refusal writes nothing");
    cfg.force = true;
    let forced = prepare(&cfg).unwrap();
    assert!(!forced.up_to_date);
    let m = Manifest::read(&cfg.output).unwrap().unwrap();
    assert_eq!(m.tokenizer.vocab_size, testutil::BASE_VOCAB + 5);
    cfg.force = false;
    assert!(prepare(&cfg).unwrap().up_to_date);

    // A changed input and changed options are refused, naming them.
    let input = fx.path("corpus/train/a.jsonl");
    let mut content = std::fs::read(&input).unwrap();
    content.extend_from_slice((testutil::record("Alpha", "more") + "\n").as_bytes());
    std::fs::write(&input, content).unwrap();
    cfg.keep = Some(vec!["Alpha".into()]);
    let e = prepare(&cfg).unwrap_err().to_string();
    assert!(e.contains("input changed") && e.contains("a.jsonl"), "{e}");
    assert!(e.contains("data.prepare.keep"), "{e}");
    cfg.force = true;
    let s = prepare(&cfg).unwrap();
    // The old Beta shards are gone with the rebuild.
    assert_eq!(s.splits[&Split::Train].len(), 1);
    assert!(!cfg.output.join("train/Beta.bin").exists());
    // An added input.
    cfg.force = false;
    write_file(
        &fx.path("corpus/test/t.jsonl"),
        jsonl(&[("Alpha", "t".into())]).as_bytes(),
    );
    let e = prepare(&cfg).unwrap_err().to_string();
    assert!(e.contains("input added") && e.contains("t.jsonl"), "{e}");
}

/// Entries of `dir` (files and folders), sorted.
fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn a_failed_forced_rebuild_leaves_the_finished_dataset_as_it_was() {
    let fx = Fixture::new();
    write_two_domain_corpus(&fx);
    let mut cfg = fx.config(&["corpus"], "out");
    let first = prepare(&cfg).unwrap();
    let manifest = std::fs::read(cfg.output.join(MANIFEST_FILE)).unwrap();
    let before = mtimes(&cfg.output);
    let layout = entries(&cfg.output);
    // The rebuild fails on a bad record, after shards were written.
    let input = fx.path("corpus/train/a.jsonl");
    let mut content = std::fs::read(&input).unwrap();
    content.extend_from_slice(b"{\"text\": \"cut off\n");
    std::fs::write(&input, content).unwrap();
    cfg.force = true;
    let e = prepare(&cfg).unwrap_err();
    assert!(matches!(e, PrepareError::RebuildFailed { .. }), "{e:?}");
    let e = e.to_string();
    assert!(e.contains("a.jsonl:"), "names the bad line: {e}");
    assert!(
        e.contains("the dataset already there is intact and usable"),
        "{e}"
    );
    assert_eq!(entries(&cfg.output), layout, "no staging folder left");
    assert_eq!(mtimes(&cfg.output), before, "nothing rewritten");
    assert_eq!(
        std::fs::read(cfg.output.join(MANIFEST_FILE)).unwrap(),
        manifest
    );
    let source = ShardSource::open(&cfg.output, 0).unwrap();
    assert_eq!(source.manifest().splits, first.splits);

    // With the input fixed, the rebuild swaps the new dataset in and tidies up.
    write_two_domain_corpus(&fx);
    cfg.keep = Some(vec!["Alpha".into()]);
    let s = prepare(&cfg).unwrap();
    assert_eq!(s.splits[&Split::Train].len(), 1);
    assert_eq!(entries(&cfg.output), layout, "no staging folder left");
    assert!(!cfg.output.join("train/Beta.bin").exists());
    let m = Manifest::read(&cfg.output).unwrap().unwrap();
    assert_eq!(m.options.keep, Some(vec!["Alpha".to_string()]));
    assert!(shards_intact(&cfg.output, &m));

    // What a rebuild interrupted mid-swap leaves (no manifest, staging folders) is
    // rebuilt from scratch by the next prepare, without force.
    std::fs::create_dir_all(cfg.output.join(".building/train")).unwrap();
    std::fs::write(cfg.output.join(".building/train/Alpha.bin"), b"new").unwrap();
    std::fs::create_dir_all(cfg.output.join(".previous/train")).unwrap();
    std::fs::remove_file(cfg.output.join(MANIFEST_FILE)).unwrap();
    cfg.force = false;
    let s = prepare(&cfg).unwrap();
    assert!(!s.up_to_date);
    assert_eq!(entries(&cfg.output), layout);
    ShardSource::open(&cfg.output, 0).unwrap();
}

#[test]
fn interrupted_prepare_is_refused_by_the_loader_and_redone() {
    let fx = Fixture::new();
    write_two_domain_corpus(&fx);
    let cfg = fx.config(&["corpus"], "out");
    prepare(&cfg).unwrap();
    // An interruption leaves shards (and perhaps temporaries) but no manifest.
    std::fs::remove_file(cfg.output.join(MANIFEST_FILE)).unwrap();
    std::fs::write(cfg.output.join("train/Alpha.bin.tmp"), b"partial").unwrap();
    let e = ShardSource::open(&cfg.output, 0).unwrap_err().to_string();
    assert!(
        e.contains("no manifest.json: the prepare did not finish; rerun mixlm prepare"),
        "{e}"
    );
    // Rerunning prepares again (no force needed) and cleans up.
    let s = prepare(&cfg).unwrap();
    assert!(!s.up_to_date);
    assert!(!cfg.output.join("train/Alpha.bin.tmp").exists());
    ShardSource::open(&cfg.output, 0).unwrap();

    let e = ShardSource::open(fx.path("nowhere"), 0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("does not exist"), "{e}");
}

#[test]
fn damaged_shards_and_manifests_are_detected() {
    let fx = Fixture::new();
    write_two_domain_corpus(&fx);
    let cfg = fx.config(&["corpus"], "out");
    prepare(&cfg).unwrap();
    let bin = cfg.output.join("validation/Beta.bin");
    let len = std::fs::metadata(&bin).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&bin)
        .unwrap()
        .set_len(len - 2)
        .unwrap();
    let e = ShardSource::open(&cfg.output, 0).unwrap_err().to_string();
    assert!(e.contains("Beta.bin") && e.contains("manifest says"), "{e}");
    // prepare notices and rebuilds (same inputs: no force needed).
    let s = prepare(&cfg).unwrap();
    assert!(!s.up_to_date && !s.warnings.is_empty());
    ShardSource::open(&cfg.output, 0).unwrap();

    let idx = cfg.output.join("train/Alpha.idx");
    let mut bytes = std::fs::read(&idx).unwrap();
    bytes[0] = 1;
    std::fs::write(&idx, bytes).unwrap();
    let e = ShardSource::open(&cfg.output, 0).unwrap_err().to_string();
    assert!(e.contains("Alpha.idx") && e.contains("offset"), "{e}");

    std::fs::write(cfg.output.join(MANIFEST_FILE), b"{ not json").unwrap();
    let e = ShardSource::open(&cfg.output, 0).unwrap_err().to_string();
    assert!(
        e.contains("manifest.json") && e.contains("does not parse"),
        "{e}"
    );
    let e = prepare(&cfg).unwrap_err().to_string();
    assert!(e.contains("manifest.json") && e.contains("force"), "{e}");
}

#[test]
fn large_vocabularies_store_u32_tokens() {
    let fx = Fixture::new();
    write_tokenizer(&fx.tokenizer, 70_000);
    let texts = testutil::texts(10, 4);
    let recs: Vec<(&str, String)> = texts.iter().map(|t| ("D", t.clone())).collect();
    write_file(&fx.path("c/train/a.jsonl"), jsonl(&recs).as_bytes());
    let mut cfg = fx.config(&["c"], "out");
    cfg.eos_id = Some(testutil::BASE_VOCAB as u32 + 69_999);
    let s = prepare(&cfg).unwrap();
    assert_eq!(s.token_dtype, TokenDtype::U32);
    let src = ShardSource::open(&cfg.output, 0).unwrap();
    assert_eq!(src.token_dtype(), TokenDtype::U32);
    let c = src.counts(DomainId(0), Split::Train);
    assert_eq!(
        std::fs::metadata(cfg.output.join("train/D.bin"))
            .unwrap()
            .len(),
        c.tokens * 4
    );
    let mut all = Vec::new();
    src.read_tokens(DomainId(0), Split::Train, 0..c.tokens, &mut all);
    let tok = fx.tok();
    let mut want = Vec::new();
    for t in &texts {
        want.extend(tok.encode(t).unwrap());
        want.push(testutil::BASE_VOCAB as u32 + 69_999);
    }
    assert_eq!(all, want);
    assert_eq!(src.eos_id(), testutil::BASE_VOCAB as u32 + 69_999);
}

#[test]
fn config_is_validated_with_field_names() {
    let cfg: PrepareConfig = toml::from_str(
        r#"
        inputs = ["data"]
        tokenizer = "t.json"
        output = "out"
        keep = ["A"]
        on_error = "skip"
    "#,
    )
    .unwrap();
    assert_eq!(cfg.on_error, OnError::Skip);
    assert_eq!(cfg.domain_key, "meta.redpajama_set_name");
    assert_eq!(cfg.validation_fraction, 0.005);
    assert_eq!(cfg.batch_documents, 1024);
    cfg.validate().unwrap();
    let e = toml::from_str::<PrepareConfig>("inputs = []\nshuffle = true")
        .unwrap_err()
        .to_string();
    assert!(e.contains("shuffle"), "{e}");
    let e = toml::from_str::<PrepareConfig>("on_error = \"ignore\"")
        .unwrap_err()
        .to_string();
    assert!(e.contains("ignore"), "{e}");

    let bad = |f: &dyn Fn(&mut PrepareConfig), field: &str| {
        let mut c = cfg.clone();
        f(&mut c);
        let e = c.validate().unwrap_err().to_string();
        assert!(e.starts_with(&format!("data.prepare.{field}:")), "{e}");
    };
    bad(&|c| c.inputs.clear(), "inputs");
    bad(&|c| c.tokenizer = PathBuf::new(), "tokenizer");
    bad(&|c| c.output = PathBuf::new(), "output");
    bad(&|c| c.validation_fraction = 1.0, "validation_fraction");
    bad(&|c| c.test_fraction = -0.1, "test_fraction");
    bad(&|c| c.validation_fraction = f64::NAN, "validation_fraction");
    bad(&|c| c.quality_keys = vec!["meta..q".into()], "quality_keys");
    bad(&|c| c.quality_range = [5.0, 5.0], "quality_range");
    bad(&|c| c.quality_range = [0.0, f64::INFINITY], "quality_range");
    bad(
        &|c| {
            c.validation_fraction = 0.6;
            c.test_fraction = 0.4
        },
        "test_fraction",
    );
    bad(&|c| c.batch_documents = 0, "batch_documents");
    bad(&|c| c.domain_key = "meta..x".into(), "domain_key");
    bad(&|c| c.text_key = String::new(), "text_key");
    bad(&|c| c.keep = Some(vec![]), "keep");
    bad(&|c| c.drop = vec!["A".into()], "drop");
    bad(
        &|c| {
            c.rename.insert("A".into(), "a/b".into());
        },
        "rename",
    );

    // Checks that need the filesystem.
    let fx = Fixture::new();
    write_file(
        &fx.path("c/train/a.jsonl"),
        jsonl(&[("D", "x".into())]).as_bytes(),
    );
    let e = prepare(&fx.config(&["c"], "c/out"))
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("data.prepare.output:") && e.contains("inside"),
        "{e}"
    );
    let e = prepare(&fx.config(&["c/*.jsonl"], "out"))
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("data.prepare.inputs:"), "{e}");
    let mut c = fx.config(&["c"], "out");
    c.tokenizer = fx.path("missing.json");
    let e = prepare(&c).unwrap_err().to_string();
    assert!(e.contains("missing.json"), "{e}");
}

// ---- real data (shared/data), skipped with a printed reason when absent ----

fn shared_data() -> Option<PathBuf> {
    let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/data"));
    if dir.is_dir() {
        Some(dir)
    } else {
        println!("skipped: {} is absent", dir.display());
        None
    }
}

#[test]
fn real_gpt_neox_tokenizer() {
    let Some(data) = shared_data() else { return };
    let tok = PreparedTokenizer::load(&data.join("tokenizers/gpt-neox-20b/tokenizer.json"), None)
        .unwrap();
    assert_eq!(tok.encode("Hello world!").unwrap(), [12092, 1533, 2]);
    assert_eq!(tok.eos_id, 0);
    assert_eq!(tok.vocab_size, 50_277);
    assert_eq!(tok.dtype, TokenDtype::U16);
    let gpt2 = PreparedTokenizer::load(&data.join("tokenizers/gpt2/tokenizer.json"), None).unwrap();
    assert_eq!(gpt2.encode("Hello world!").unwrap(), [15496, 995, 0]);
    assert_eq!(gpt2.eos_id, 50_256);
}

#[test]
fn real_corpus_subset_keeps_the_dataset_splits() {
    let Some(data) = shared_data() else { return };
    let out = tempfile::tempdir().unwrap();
    let corpus = data.join("corpus");
    let cfg = PrepareConfig {
        inputs: vec![corpus
            .join("*/RedPajamaStackExchange.jsonl.zst")
            .to_string_lossy()
            .into_owned()],
        tokenizer: data.join("tokenizers/gpt-neox-20b/tokenizer.json"),
        output: out.path().join("se"),
        ..PrepareConfig::default()
    };
    let s = prepare(&cfg).unwrap();
    println!("{}", s.table());
    assert_eq!(s.split_method, SplitMethod::Dataset);
    assert!(
        s.skipped.is_empty() && s.warnings.is_empty(),
        "{}",
        s.table()
    );
    let m = Manifest::read(&cfg.output).unwrap().unwrap();
    let splits: Vec<_> = m
        .inputs
        .iter()
        .map(|f| {
            (
                f.path.parent().unwrap().file_name().unwrap().to_owned(),
                f.split,
            )
        })
        .collect();
    assert_eq!(
        splits,
        [
            ("train".into(), Some(Split::Train)),
            ("validation".into(), Some(Split::Validation))
        ]
    );
    assert_eq!(
        s.splits.keys().copied().collect::<Vec<_>>(),
        [Split::Train, Split::Validation]
    );
    let train = s.splits[&Split::Train]["RedPajamaStackExchange"];
    assert_eq!(train.documents, 4_077, "shared/data/README.md");
    assert!(
        (3_900_000..4_300_000).contains(&train.tokens),
        "README says about 4.1M: {}",
        train.tokens
    );

    // Validation: exact, against an independent decode + tokenize.
    let tok = PreparedTokenizer::load(&cfg.tokenizer, None).unwrap();
    let raw = zstd::decode_all(
        std::fs::File::open(corpus.join("validation/RedPajamaStackExchange.jsonl.zst")).unwrap(),
    )
    .unwrap();
    let texts: Vec<String> = String::from_utf8(raw)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            assert_eq!(v["meta"]["redpajama_set_name"], "RedPajamaStackExchange");
            v["text"].as_str().unwrap().to_string()
        })
        .collect();
    let refs: Vec<&String> = texts.iter().collect();
    let want = stream(&tok, &refs);
    let val = s.splits[&Split::Validation]["RedPajamaStackExchange"];
    assert_eq!(val, counts(texts.len() as u64, want.len()));
    let src = ShardSource::open(&cfg.output, 1).unwrap();
    assert_eq!(src.domain_names(), ["RedPajamaStackExchange"]);
    assert_eq!(src.vocab_size(), 50_277);
    let mut got = Vec::new();
    src.read_tokens(DomainId(0), Split::Validation, 0..val.tokens, &mut got);
    assert_eq!(got, want);
    let off = src.doc_offsets(DomainId(0), Split::Validation);
    let first = &got[off[0] as usize..off[1] as usize - 1];
    assert_eq!(tok.decode(first).unwrap(), texts[0]);
    let n = src.num_windows(DomainId(0), Split::Train, 2048).unwrap();
    assert_eq!(n, (train.tokens - 1) / 2048);
    let w = src.window(DomainId(0), Split::Train, 5, 2048);
    assert_eq!(w.len(), 2049);
    assert!(w.iter().all(|&t| (t as usize) < 50_277));
}

#[test]
fn real_redpajama_samples_ingest_with_extra_meta_fields() {
    let Some(data) = shared_data() else { return };
    let out = tempfile::tempdir().unwrap();
    let cfg = PrepareConfig {
        inputs: vec![data
            .join("redpajama-samples/real_redpajama_samples.jsonl")
            .to_string_lossy()
            .into_owned()],
        tokenizer: data.join("tokenizers/gpt-neox-20b/tokenizer.json"),
        output: out.path().join("samples"),
        validation_fraction: 0.1,
        test_fraction: 0.0,
        ..PrepareConfig::default()
    };
    let s = prepare(&cfg).unwrap();
    println!("{}", s.table());
    assert!(s.skipped.is_empty());
    assert!(matches!(s.split_method, SplitMethod::Hash { .. }));
    let mut docs: BTreeMap<&str, u64> = BTreeMap::new();
    for domains in s.splits.values() {
        for (d, c) in domains {
            *docs.entry(d.as_str()).or_default() += c.documents;
        }
    }
    assert_eq!(
        docs,
        [
            ("RedPajamaArXiv", 11),
            ("RedPajamaC4", 50),
            ("RedPajamaCommonCrawl", 30),
            ("RedPajamaStackExchange", 72)
        ]
        .into()
    );
    assert_eq!(
        s.split_total(Split::Train).documents + s.split_total(Split::Validation).documents,
        163
    );
    let src = ShardSource::open(&cfg.output, 0).unwrap();
    assert_eq!(src.domain_names().len(), 4);
}

/// Aioli's convention: each domain's validation documents are halved by a seeded
/// shuffle of their indices into validation and test; nothing is lost or duplicated.
#[test]
fn test_from_validation_halves_each_domain() {
    let fx = Fixture::new();
    let expected = write_two_domain_corpus(&fx);
    let tok = fx.tok();
    let mut cfg = fx.config(&["corpus"], "out");
    cfg.test_from_validation = true;
    prepare(&cfg).unwrap();
    let m = Manifest::read(&cfg.output).unwrap().unwrap();
    let src = ShardSource::open(&cfg.output, 0).unwrap();
    let docs_of = |split: Split, d: usize| -> Vec<Vec<u32>> {
        let offsets = src.doc_offsets(DomainId(d), split).to_vec();
        offsets
            .windows(2)
            .map(|w| {
                let mut out = Vec::new();
                src.read_tokens(DomainId(d), split, w[0]..w[1], &mut out);
                out
            })
            .collect()
    };
    for (d, domain) in src.domain_names().iter().enumerate() {
        let originals = &expected[&(Split::Validation, domain.as_str())];
        let n = originals.len() as u64;
        assert_eq!(
            m.splits[&Split::Validation][domain].documents,
            n / 2,
            "{domain}"
        );
        assert_eq!(
            m.splits[&Split::Test][domain].documents,
            n - n / 2,
            "{domain}"
        );
        let mut halves = docs_of(Split::Validation, d);
        halves.extend(docs_of(Split::Test, d));
        let mut want: Vec<Vec<u32>> = originals.iter().map(|t| stream(&tok, &[t])).collect();
        halves.sort();
        want.sort();
        assert_eq!(
            halves, want,
            "{domain}: the halves are a partition of the validation set"
        );
    }
    // Deterministic: a forced rebuild puts the same documents in each half.
    let read_all = |dir: &Path| -> Vec<Vec<u32>> {
        let src = ShardSource::open(dir, 0).unwrap();
        let mut out = Vec::new();
        for d in 0..src.domain_names().len() {
            let c = src.counts(DomainId(d), Split::Validation);
            src.read_tokens(DomainId(d), Split::Validation, 0..c.tokens, &mut out);
        }
        vec![out]
    };
    let before = read_all(&cfg.output);
    drop(src);
    cfg.force = true;
    prepare(&cfg).unwrap();
    assert_eq!(read_all(&cfg.output), before);
    // Turning the option off changes what is written, so it needs --force.
    cfg.force = false;
    cfg.test_from_validation = false;
    let e = prepare(&cfg).unwrap_err().to_string();
    assert!(
        e.contains("option data.prepare.test_from_validation changed: true -> false"),
        "{e}"
    );
}

/// SlimPajama-6B ships as `data/{split}-NNNNN-of-NNNNN-<hash>.parquet` with a `meta`
/// struct column; preparing it gives the same shards as the same rows in jsonl.
#[test]
fn parquet_in_slimpajama6b_layout_matches_jsonl() {
    let fx = Fixture::new();
    write_two_domain_corpus(&fx);
    let names = [
        "pq/data/train-00000-of-00002-ab2b35705f029d94.parquet",
        "pq/data/train-00001-of-00002-0c3f4a1b2d9e8f70.parquet",
        "pq/data/validation-00000-of-00001-7a1e8f0d3c2b4e59.parquet",
    ];
    for ((_, _, rows), name) in two_domain_files().into_iter().zip(names) {
        let rows: Vec<(Option<&str>, Option<&str>)> = rows
            .iter()
            .map(|(d, t)| (Some(*d), Some(t.as_str())))
            .collect();
        // Row groups of 4: a file spans several, as real ones do.
        write_file(&fx.path(name), &testutil::slimpajama6b_parquet(&rows, 4));
    }
    let jsonl_cfg = fx.config(&["corpus"], "from-jsonl");
    let parquet_cfg = fx.config(&["pq/data/*.parquet"], "from-parquet");
    let a = prepare(&jsonl_cfg).unwrap();
    let b = prepare(&parquet_cfg).unwrap();
    assert_eq!(b.split_method, SplitMethod::Dataset);
    assert_eq!(a.splits, b.splits);
    assert!(b.skipped.is_empty());
    assert_same_shards(&jsonl_cfg.output, &parquet_cfg.output);
    let m = Manifest::read(&parquet_cfg.output).unwrap().unwrap();
    assert_eq!(
        m.inputs.iter().map(|f| f.split).collect::<Vec<_>>(),
        [
            Some(Split::Train),
            Some(Split::Train),
            Some(Split::Validation)
        ]
    );
    // A folder is walked for parquet files too; the rerun is up to date.
    let mut by_folder = fx.config(&["pq"], "from-parquet");
    by_folder.inputs = vec![fx.path("pq/data").to_string_lossy().into_owned()];
    assert!(prepare(&by_folder).unwrap().up_to_date);
}

/// Other parquet layouts: `meta` as a JSON string column, a top-level
/// dictionary-encoded domain column, large-string text; more rows than one record
/// batch holds.
#[test]
fn parquet_json_meta_and_dictionary_domains() {
    use arrow_array::types::Int32Type;
    use arrow_array::{ArrayRef, DictionaryArray, LargeStringArray, StringArray};
    use std::sync::Arc;
    let fx = Fixture::new();
    let t = testutil::texts(2500, 3);
    let domain = |i: usize| ["Web", "Code", "Books"][i % 7 % 3];
    let mut jsonl_rows = Vec::new();
    for (i, text) in t.iter().enumerate() {
        jsonl_rows.push((domain(i), text.clone()));
    }
    write_file(&fx.path("j/train.jsonl"), jsonl(&jsonl_rows).as_bytes());

    let meta: ArrayRef =
        Arc::new(StringArray::from_iter_values((0..t.len()).map(|i| {
            serde_json::json!({"redpajama_set_name": domain(i)}).to_string()
        })));
    let text: ArrayRef = Arc::new(LargeStringArray::from_iter_values(t.iter()));
    write_file(
        &fx.path("p1/train.parquet"),
        &testutil::parquet_bytes(vec![("meta", meta), ("text", text.clone())], 700),
    );
    let source: DictionaryArray<Int32Type> = (0..t.len()).map(domain).collect();
    write_file(
        &fx.path("p2/train.parquet"),
        &testutil::parquet_bytes(
            vec![("content", text), ("source", Arc::new(source) as ArrayRef)],
            1000,
        ),
    );

    let from_jsonl = fx.config(&["j"], "oj");
    let from_json_meta = fx.config(&["p1"], "o1");
    let mut from_dict = fx.config(&["p2"], "o2");
    from_dict.domain_key = "source".into();
    from_dict.text_key = "content".into();
    let want = prepare(&from_jsonl).unwrap();
    assert_eq!(want.splits[&Split::Train].len(), 3);
    for cfg in [&from_json_meta, &from_dict] {
        let got = prepare(cfg).unwrap();
        assert!(got.skipped.is_empty(), "{:?}", got.skipped);
        assert_eq!(got.splits, want.splits);
        assert_same_shards(&from_jsonl.output, &cfg.output);
    }
}

/// Reads a little-endian `f32` file.
fn read_f32(path: &Path) -> Vec<f32> {
    std::fs::read(path)
        .unwrap()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

/// `quality_keys`: the sum of the fields, mapped from `quality_range` onto 0..10, is
/// stored per training document in shard order, from jsonl (nested, numbers or numeric
/// strings) and parquet (numeric columns) alike; bad values follow `on_error`.
#[test]
fn quality_fields_are_summed_mapped_and_stored_per_training_document() {
    use arrow_array::{ArrayRef, Float64Array, Int32Array, StringArray};
    use std::sync::Arc;
    let fx = Fixture::new();
    let t = testutil::texts(40, 5);
    let domain = |i: usize| if i.is_multiple_of(3) { "Code" } else { "Web" };
    let (a, b) = (|i: usize| (i % 11) as f64 * 0.5, |i: usize| (i % 4) as i32);
    let line = |i: usize| {
        // Every other `a` is a numeric string, as some exports write them.
        let a = if i.is_multiple_of(2) {
            serde_json::json!(a(i))
        } else {
            serde_json::json!(a(i).to_string())
        };
        serde_json::json!({"text": t[i], "meta": {"redpajama_set_name": domain(i),
            "judge": {"a": a, "b": b(i)}}})
        .to_string()
            + "\n"
    };
    let train: String = (0..30).map(line).collect();
    let validation: String = (30..40).map(line).collect();
    write_file(&fx.path("j/train/x.jsonl"), train.as_bytes());
    write_file(&fx.path("j/validation/x.jsonl"), validation.as_bytes());
    let mut cfg = fx.config(&["j"], "oj");
    cfg.quality_keys = vec!["meta.judge.a".into(), "meta.judge.b".into()];
    cfg.quality_range = [0.0, 8.0];
    prepare(&cfg).unwrap();
    let source = ShardSource::open(&cfg.output, 0).unwrap();
    for (d, name) in source.domain_names().iter().enumerate() {
        let want: Vec<f32> = (0..30)
            .filter(|&i| domain(i) == name)
            .map(|i| (10.0 * (a(i) + b(i) as f64) / 8.0) as f32)
            .collect();
        let path = source.quality_path(DomainId(d)).unwrap();
        assert_eq!(path, cfg.output.join(format!("train/{name}.quality.f32")));
        assert_eq!(read_f32(&path), want, "{name}");
        assert_eq!(
            want.len() as u64,
            source.counts(DomainId(d), Split::Train).documents
        );
    }
    assert!(!cfg.output.join("validation/Web.quality.f32").exists());
    assert!(prepare(&cfg).unwrap().up_to_date);
    // A lost quality file is noticed and rebuilt.
    std::fs::remove_file(cfg.output.join("train/Web.quality.f32")).unwrap();
    let again = prepare(&cfg).unwrap();
    assert!(!again.up_to_date);
    assert!(cfg.output.join("train/Web.quality.f32").exists());
    // Other keys are another corpus.
    cfg.quality_range = [0.0, 9.0];
    let e = prepare(&cfg).unwrap_err().to_string();
    assert!(e.contains("data.prepare.quality_range"), "{e}");
    cfg.quality_range = [0.0, 8.0];

    // The same records as parquet with numeric columns.
    let n = 30;
    let cols: Vec<(&str, ArrayRef)> = vec![
        (
            "text",
            Arc::new(StringArray::from_iter_values(t[..n].iter())),
        ),
        (
            "source",
            Arc::new(StringArray::from_iter_values((0..n).map(domain))),
        ),
        ("a", Arc::new(Float64Array::from_iter_values((0..n).map(a)))),
        ("b", Arc::new(Int32Array::from_iter_values((0..n).map(b)))),
    ];
    write_file(
        &fx.path("p/train.parquet"),
        &testutil::parquet_bytes(cols, 7),
    );
    let mut pq = fx.config(&["p"], "op");
    pq.domain_key = "source".into();
    pq.quality_keys = vec!["a".into(), "b".into()];
    pq.quality_range = [0.0, 8.0];
    prepare(&pq).unwrap();
    for name in ["Code", "Web"] {
        let f = format!("train/{name}.quality.f32");
        assert_eq!(
            read_f32(&pq.output.join(&f)),
            read_f32(&cfg.output.join(&f))
        );
    }
    let mut no_column = pq.clone();
    no_column.quality_keys = vec!["a".into(), "c".into()];
    no_column.output = fx.path("op2");
    let e = prepare(&no_column).unwrap_err().to_string();
    assert!(
        e.contains("no column `c`") && e.contains("quality_keys"),
        "{e}"
    );

    // A missing field and an out-of-range sum: errors naming the line and the key,
    // or skipped and counted, the quality file staying aligned with the shard.
    let mut bad = train.clone();
    bad += &(serde_json::json!({"text": "no b here", "meta": {"redpajama_set_name": "Web",
        "judge": {"a": 1}}})
    .to_string()
        + "\n");
    bad += &(serde_json::json!({"text": "too good", "meta": {"redpajama_set_name": "Web",
        "judge": {"a": 7, "b": 3}}})
    .to_string()
        + "\n");
    write_file(&fx.path("k/train/x.jsonl"), bad.as_bytes());
    let mut k = fx.config(&["k"], "ok");
    k.quality_keys = cfg.quality_keys.clone();
    k.quality_range = [0.0, 8.0];
    let e = prepare(&k).unwrap_err().to_string();
    assert!(
        e.contains("x.jsonl:31") && e.contains("`meta.judge.b`") && e.contains("is missing"),
        "{e}"
    );
    assert!(!k.output.join(MANIFEST_FILE).exists());
    k.on_error = OnError::Skip;
    let s = prepare(&k).unwrap();
    assert_eq!(s.skipped.count(SkipKind::BadQuality), 2);
    assert!(
        s.skipped.examples[1].contains("x.jsonl:32")
            && s.skipped.examples[1].contains("outside data.prepare.quality_range [0, 8]"),
        "{:?}",
        s.skipped.examples
    );
    assert_eq!(
        read_f32(&k.output.join("train/Web.quality.f32")),
        read_f32(&cfg.output.join("train/Web.quality.f32"))
    );

    // Without quality keys there is no quality file.
    let plain = fx.config(&["j"], "oplain");
    prepare(&plain).unwrap();
    assert!(ShardSource::open(&plain.output, 0)
        .unwrap()
        .quality_path(DomainId(0))
        .is_none());
}

/// A prepare into a folder another prepare holds is refused before it writes there,
/// naming the folder and the holder's PID; once released it prepares.
#[test]
fn a_prepare_into_a_folder_another_process_holds_is_refused() {
    let fx = Fixture::new();
    write_two_domain_corpus(&fx);
    let cfg = fx.config(&["corpus"], "out");
    std::fs::create_dir_all(&cfg.output).unwrap();
    let lock = cfg.output.join(crate::lock::LOCK_FILE);
    std::fs::write(&lock, "PID 4242, mixlm prepare\n").unwrap();
    // Another open file description, as another process's.
    let holder = std::fs::File::open(&lock).unwrap();
    holder.try_lock().unwrap();
    let e = prepare(&cfg).unwrap_err().to_string();
    assert!(
        e.starts_with(&format!(
            "{} is in use by another mixlm (PID 4242, mixlm prepare)",
            cfg.output.display()
        )) && e.contains("kill 4242"),
        "{e}"
    );
    assert_eq!(
        entries(&cfg.output),
        [crate::lock::LOCK_FILE],
        "nothing written"
    );
    drop(holder);
    prepare(&cfg).unwrap();
    assert!(cfg.output.join(MANIFEST_FILE).exists());
}
