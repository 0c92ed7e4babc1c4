//! Loader throughput: tokens/s of drawing mixture batches from prepared shards
//! (memory-mapped, warm page cache) and of the synthetic generator, both directly
//! and through the trainer's background [`Prefetcher`] (two batches requested ahead).
//!
//! `cargo bench -p mixlm-data --bench loader`. The shard benchmark prepares the
//! shared development corpus's StackExchange and C4 groups into
//! `target/bench-shards` once (or uses `MIXLM_BENCH_SHARDS=DIR`, any prepared folder);
//! it is skipped, saying why, when neither exists. Results go to benches/RESULTS.md.

use std::path::PathBuf;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use mixlm_data::{
    fetch_batch, Composition, MixtureSampler, Prefetcher, PrepareConfig, Proportions, ShardSource,
    Split, SyntheticConfig, SyntheticCorpus, TokenSource,
};

const BATCH: usize = 16;
const SEQ_LEN: usize = 2048;

fn shard_dir() -> Option<PathBuf> {
    if let Ok(dir) = std::env::var("MIXLM_BENCH_SHARDS") {
        return Some(PathBuf::from(dir));
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let shared = root.join("../shared/data");
    if !shared.join("corpus").exists() {
        eprintln!(
            "skipping shard loader bench: no MIXLM_BENCH_SHARDS and no {}",
            shared.display()
        );
        return None;
    }
    let out = root.join("target/bench-shards");
    let config = PrepareConfig {
        inputs: vec![
            format!(
                "{}/corpus/*/RedPajamaStackExchange.jsonl.zst",
                shared.display()
            ),
            format!("{}/corpus/*/RedPajamaC4.jsonl.zst", shared.display()),
        ],
        tokenizer: shared.join("tokenizers/gpt-neox-20b/tokenizer.json"),
        output: out.clone(),
        ..Default::default()
    };
    // The folder is a cache of the bench: rebuild it when the corpus was re-copied.
    if let Err(mixlm_data::PrepareError::Changed { .. }) = mixlm_data::prepare(&config) {
        let forced = PrepareConfig {
            force: true,
            ..config
        };
        mixlm_data::prepare(&forced).expect("prepare bench shards");
    }
    Some(out)
}

fn draw(c: &mut Criterion, name: &str, source: Arc<dyn TokenSource>) {
    let k = source.domain_names().len();
    let proportions = Proportions::uniform(k);
    let mut sampler = MixtureSampler::new(k, 0, Composition::Sample);
    let mut group = c.benchmark_group("loader");
    group.throughput(Throughput::Elements((BATCH * SEQ_LEN) as u64));
    group.bench_function(format!("{name} {BATCH}x{SEQ_LEN}"), |b| {
        b.iter(|| {
            let picks = sampler.next_batch(&proportions, BATCH);
            fetch_batch(source.as_ref(), Split::Train, &picks, SEQ_LEN)
        })
    });
    let sampler = MixtureSampler::new(k, 0, Composition::Sample);
    let mut prefetcher = Prefetcher::spawn(source, sampler, Split::Train, BATCH, SEQ_LEN);
    group.bench_function(format!("{name} {BATCH}x{SEQ_LEN} prefetched"), |b| {
        b.iter(|| {
            while prefetcher.pending() < 3 {
                prefetcher.request(&proportions, Composition::Sample);
            }
            prefetcher.take().windows
        })
    });
    group.finish();
}

fn loader(c: &mut Criterion) {
    if let Some(dir) = shard_dir() {
        let shards = ShardSource::open(&dir, 0).expect("open shards");
        draw(c, "shards", Arc::new(shards));
    }
    let synthetic = SyntheticCorpus::new(&SyntheticConfig::default()).unwrap();
    draw(c, "synthetic", Arc::new(synthetic));
}

criterion_group!(benches, loader);
criterion_main!(benches);
