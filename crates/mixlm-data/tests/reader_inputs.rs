//! The jsonl / jsonl.zst reader on arbitrary bytes: whatever a file holds (binary
//! garbage, broken JSON, wrong types, torn or corrupt zstd frames), reading it never
//! panics; under `on_error = "skip"` it always completes and accounts for each bad
//! record, under `"fail"` it stops with an error naming the file. The same entry point
//! is a cargo-fuzz target (`tests/fuzz`, `scripts/fuzz.sh`) for coverage-guided runs.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use mixlm_data::prepare::{resolve_inputs, IngestOptions, Ingestor, OnError};
use mixlm_data::PrepareError;
use proptest::prelude::*;

/// Reads `bytes` as a file named `name`; returns (documents, skipped) or the error.
fn read(name: &str, bytes: &[u8], skip: bool) -> Result<(u64, u64), PrepareError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, bytes).unwrap();
    let files = resolve_inputs(&[path.display().to_string()]).unwrap();
    let on_error = if skip { OnError::Skip } else { OnError::Fail };
    let mut ingestor = Ingestor::new(IngestOptions::slimpajama(on_error));
    let mut docs = 0u64;
    let consumed = Arc::new(AtomicU64::new(0));
    ingestor.read_file(0, &files[0], &consumed, &mut |_doc| {
        docs += 1;
        Ok(())
    })?;
    Ok((docs, ingestor.report.total()))
}

fn record(domain: &str, text: &str) -> String {
    serde_json::json!({"text": text, "meta": {"redpajama_set_name": domain}}).to_string()
}

/// Lines that are valid records, broken JSON, wrong types, or binary.
fn line() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => ("[a-z ]{0,40}", "[A-Za-z]{1,12}").prop_map(|(t, d)| record(&d, &t).into_bytes()),
        1 => Just(br#"{"text": 3, "meta": {"redpajama_set_name": "A"}}"#.to_vec()),
        1 => Just(br#"{"text": "x", "meta": {}}"#.to_vec()),
        1 => Just(br#"{"text": "x", "meta": {"redpajama_set_name": ""}}"#.to_vec()),
        1 => Just(br#"{"text": "x""#.to_vec()),
        1 => Just(b"[1, 2, 3]".to_vec()),
        1 => proptest::collection::vec(any::<u8>(), 0..60),
    ]
}

fn jsonl() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(line(), 0..12).prop_map(|lines| {
        let mut out = Vec::new();
        for l in lines {
            out.extend(l.into_iter().filter(|&b| b != b'\n'));
            out.push(b'\n');
        }
        out
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn jsonl_reader_never_panics(bytes in jsonl(), raw in proptest::collection::vec(any::<u8>(), 0..200)) {
        for data in [&bytes, &raw] {
            let (docs, skipped) = read("part.jsonl", data, true).unwrap();
            let lines = data.split(|&b| b == b'\n').filter(|l| !l.is_empty()).count() as u64;
            prop_assert!(docs + skipped <= lines.max(1), "{docs} + {skipped} > {lines}");
            if let Err(e) = read("part.jsonl", data, false) {
                prop_assert!(e.to_string().contains("part.jsonl"), "{e}");
            }
        }
    }

    #[test]
    fn zst_reader_never_panics(bytes in jsonl(), cut in any::<prop::sample::Index>(), flip in any::<prop::sample::Index>()) {
        let compressed = zstd::encode_all(&bytes[..], 3).unwrap();
        let whole = read("part.jsonl.zst", &compressed, true).unwrap();
        prop_assert_eq!(whole, read("part.jsonl", &bytes, true).unwrap(), "zstd reads as plain");
        // Truncated and bit-flipped frames.
        let truncated = &compressed[..cut.index(compressed.len() + 1)];
        let mut flipped = compressed.clone();
        let i = flip.index(flipped.len());
        flipped[i] ^= 0x10;
        for data in [truncated, &flipped[..]] {
            read("part.jsonl.zst", data, true).unwrap();
            if let Err(e) = read("part.jsonl.zst", data, false) {
                prop_assert!(e.to_string().contains("part.jsonl.zst"), "{e}");
            }
        }
    }
}
