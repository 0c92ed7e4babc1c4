//! Test fixtures: a tiny byte-level BPE `tokenizer.json` and corpus files.

use serde_json::json;
use std::path::Path;

/// Ids of the test tokenizer: `<|endoftext|>` (0), the 256 bytes (1..=256), then the
/// merges `th` (257), `Ġth` (258), `er` (259).
pub const BASE_VOCAB: usize = 260;

/// GPT-2's byte -> printable character map (what ByteLevel pre-tokenizes into).
fn bytes_to_unicode() -> Vec<char> {
    let mut printable: Vec<u32> = (u32::from(b'!')..=u32::from(b'~'))
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut map = vec!['\0'; 256];
    for &b in &printable {
        map[b as usize] = char::from_u32(b).unwrap();
    }
    let mut next = 256u32;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            map[b as usize] = char::from_u32(next).unwrap();
            next += 1;
            printable.push(b);
        }
    }
    map
}

/// Writes a byte-level BPE tokenizer (lossless on any text) with `extra` unused
/// vocabulary entries after the base ids (to reach a `u32` vocabulary).
pub fn write_tokenizer(path: &Path, extra: usize) {
    let mut vocab = serde_json::Map::new();
    vocab.insert("<|endoftext|>".into(), json!(0));
    for (b, c) in bytes_to_unicode().into_iter().enumerate() {
        vocab.insert(c.to_string(), json!(b + 1));
    }
    vocab.insert("th".into(), json!(257));
    vocab.insert("Ġth".into(), json!(258));
    vocab.insert("er".into(), json!(259));
    for i in 0..extra {
        vocab.insert(format!("<extra_{i}>"), json!(BASE_VOCAB + i));
    }
    let byte_level = json!({
        "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true
    });
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [{
            "id": 0, "content": "<|endoftext|>", "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true
        }],
        "normalizer": null,
        "pre_tokenizer": byte_level,
        "post_processor": null,
        "decoder": byte_level,
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null,
            "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab,
            "merges": [["t", "h"], ["Ġ", "th"], ["e", "r"]]
        }
    });
    std::fs::write(path, serde_json::to_string_pretty(&tokenizer).unwrap()).unwrap();
}

/// One SlimPajama-style line (with an extra field, as real records have).
pub fn record(domain: &str, text: &str) -> String {
    json!({"text": text, "meta": {"redpajama_set_name": domain, "source": "test"}, "id": 1})
        .to_string()
}

/// `records` as `.jsonl` text.
pub fn jsonl(records: &[(&str, String)]) -> String {
    records.iter().map(|(d, t)| record(d, t) + "\n").collect()
}

/// Writes `content` to `path`, zstd-compressed (with a frame checksum, as the zstd
/// CLI does) when the name ends in `.zst`.
pub fn write_file(path: &Path, content: &[u8]) {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    if path.to_string_lossy().ends_with(".zst") {
        let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
        enc.include_checksum(true).unwrap();
        std::io::Write::write_all(&mut enc, content).unwrap();
        std::fs::write(path, enc.finish().unwrap()).unwrap();
    } else {
        std::fs::write(path, content).unwrap();
    }
}

/// Deterministic varied texts: words, punctuation, non-ASCII, newlines.
pub fn texts(n: usize, seed: u64) -> Vec<String> {
    const WORDS: &[&str] = &[
        "the",
        "other",
        "thing",
        "river",
        "über",
        "naïve",
        "東京",
        "emoji🙂",
        "x",
        "tab\there",
        "line\nbreak",
        "\"quoted\"",
        "back\\slash",
        "  spaced",
        "42",
        "Thermometer",
    ];
    (0..n)
        .map(|i| {
            let mut h = crate::seeding::hash_words(&[seed, i as u64]);
            let len = 1 + (h % 40) as usize;
            (0..len)
                .map(|_| {
                    h = crate::seeding::splitmix64(h);
                    WORDS[(h % WORDS.len() as u64) as usize]
                })
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

/// A parquet file (snappy, as Hugging Face writes them) holding `columns`, with row
/// groups of `row_group_rows` rows.
pub fn parquet_bytes(
    columns: Vec<(&str, arrow_array::ArrayRef)>,
    row_group_rows: usize,
) -> Vec<u8> {
    use parquet::arrow::ArrowWriter;
    use parquet::basic::Compression;
    use parquet::file::properties::WriterProperties;
    let batch = arrow_array::RecordBatch::try_from_iter(columns).unwrap();
    let props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_max_row_group_row_count(Some(row_group_rows))
        .build();
    let mut out = Vec::new();
    let mut writer = ArrowWriter::try_new(&mut out, batch.schema(), Some(props)).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
    out
}

/// SlimPajama-6B's layout: `text`, `meta` (a struct with `redpajama_set_name`) and
/// pandas' `__index_level_0__`. `None` domain: a null `meta`; `None` text: a null text.
pub fn slimpajama6b_parquet(
    rows: &[(Option<&str>, Option<&str>)],
    row_group_rows: usize,
) -> Vec<u8> {
    use arrow_array::{ArrayRef, Int64Array, StringArray, StructArray};
    use arrow_schema::{DataType, Field};
    use std::sync::Arc;
    let text: ArrayRef = Arc::new(StringArray::from_iter(rows.iter().map(|r| r.1)));
    let names: ArrayRef = Arc::new(StringArray::from_iter(rows.iter().map(|r| r.0)));
    let meta = StructArray::try_new(
        vec![Arc::new(Field::new(
            "redpajama_set_name",
            DataType::Utf8,
            true,
        ))]
        .into(),
        vec![names],
        Some(rows.iter().map(|r| r.0.is_some()).collect()),
    )
    .unwrap();
    let index: ArrayRef = Arc::new(Int64Array::from_iter_values(0..rows.len() as i64));
    parquet_bytes(
        vec![
            ("text", text),
            ("meta", Arc::new(meta) as ArrayRef),
            ("__index_level_0__", index),
        ],
        row_group_rows,
    )
}
