//! Tokenization throughput of `mixlm prepare`: MB/s of text on one core (the
//! per-core figure) and through the parallel path `prepare` uses (all cores).
//!
//! `cargo bench -p mixlm-data --bench tokenize`. Uses the shared development corpus
//! (about 4 MB of text: the first documents of each domain's train file) and the
//! GPT-NeoX-20B tokenizer from `../shared/data`, or `MIXLM_BENCH_TOKENIZER=FILE` and
//! `MIXLM_BENCH_JSONL=FILE` (jsonl or jsonl.zst with a `text` field); it is skipped,
//! saying why, when neither is there. Results go to benches/RESULTS.md.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use mixlm_data::prepare::PreparedTokenizer;

/// Text per domain file taken into the sample.
const BYTES_PER_FILE: usize = 600_000;

fn texts_of(path: &Path, budget: usize) -> Vec<String> {
    let file = std::fs::File::open(path).expect("open bench corpus file");
    let reader: Box<dyn std::io::Read> = if path.to_string_lossy().ends_with(".zst") {
        Box::new(zstd::stream::read::Decoder::new(file).expect("zstd"))
    } else {
        Box::new(file)
    };
    let mut out = Vec::new();
    let mut bytes = 0;
    for line in BufReader::new(reader).lines() {
        let v: serde_json::Value = serde_json::from_str(&line.expect("read line")).expect("json");
        let text = v["text"].as_str().expect("text").to_string();
        bytes += text.len();
        out.push(text);
        if bytes >= budget {
            break;
        }
    }
    out
}

fn sample() -> Option<(PathBuf, Vec<String>)> {
    if let (Ok(tok), Ok(jsonl)) = (
        std::env::var("MIXLM_BENCH_TOKENIZER"),
        std::env::var("MIXLM_BENCH_JSONL"),
    ) {
        return Some((tok.into(), texts_of(Path::new(&jsonl), usize::MAX)));
    }
    let shared = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data");
    let corpus = shared.join("corpus/train");
    let Ok(entries) = std::fs::read_dir(&corpus) else {
        eprintln!(
            "skipping tokenize bench: no MIXLM_BENCH_TOKENIZER/MIXLM_BENCH_JSONL and no {}",
            corpus.display()
        );
        return None;
    };
    let mut files: Vec<PathBuf> = entries.map(|e| e.unwrap().path()).collect();
    files.sort();
    let texts = files
        .iter()
        .flat_map(|f| texts_of(f, BYTES_PER_FILE))
        .collect();
    Some((shared.join("tokenizers/gpt-neox-20b/tokenizer.json"), texts))
}

fn tokenize(c: &mut Criterion) {
    let Some((tokenizer, texts)) = sample() else {
        return;
    };
    let tok = PreparedTokenizer::load(&tokenizer, None).expect("load tokenizer");
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let bytes: usize = refs.iter().map(|t| t.len()).sum();
    let mut group = c.benchmark_group("tokenize");
    group.sample_size(10);
    group.throughput(Throughput::Bytes(bytes as u64));
    group.bench_function(format!("one core, {} docs", refs.len()), |b| {
        b.iter(|| {
            refs.iter()
                .map(|t| tok.encode(t).expect("encode").len())
                .sum::<usize>()
        })
    });
    group.bench_function(
        format!(
            "all {} cores (rayon), {} docs",
            rayon::current_num_threads(),
            refs.len()
        ),
        |b| b.iter(|| tok.encode_documents(&refs).len()),
    );
    group.finish();
}

criterion_group!(benches, tokenize);
criterion_main!(benches);
