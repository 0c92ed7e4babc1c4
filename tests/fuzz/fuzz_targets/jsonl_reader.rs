//! The jsonl / jsonl.zst reader: any bytes, under both error policies, must not panic.
//! The first input byte picks plain or zstd (the rest is the file).
#![no_main]

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use mixlm_data::prepare::{resolve_inputs, IngestOptions, Ingestor, OnError};

fuzz_target!(|data: &[u8]| {
    let Some((&kind, body)) = data.split_first() else {
        return;
    };
    let name = if kind % 2 == 0 {
        "part.jsonl"
    } else {
        "part.jsonl.zst"
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, body).unwrap();
    let files = resolve_inputs(&[path.display().to_string()]).unwrap();
    for on_error in [OnError::Skip, OnError::Fail] {
        let consumed = Arc::new(AtomicU64::new(0));
        let _ = Ingestor::new(IngestOptions::slimpajama(on_error)).read_file(
            0,
            &files[0],
            &consumed,
            &mut |_| Ok(()),
        );
    }
});
