//! The checkpoint loader: the input is split into the five checkpoint files (at 0xFF
//! 0xFE separators) and written with a manifest that matches them, so the checksum
//! check passes and the safetensors / JSON / TOML parsers see the bytes; loading must
//! give a checkpoint or an error, never a panic.
#![no_main]

use std::collections::BTreeMap;

use burn::backend::{Autodiff, NdArray};
use libfuzzer_sys::fuzz_target;
use mixlm_train::checkpoint::{
    load_checkpoint, FileDigest, Manifest, CHECKPOINT_FILES, CHECKPOINT_FORMAT,
};

fuzz_target!(|data: &[u8]| {
    let mut parts: Vec<&[u8]> = Vec::new();
    let mut rest = data;
    while parts.len() + 1 < CHECKPOINT_FILES.len() {
        match rest.windows(2).position(|w| w == [0xff, 0xfe]) {
            Some(i) => {
                parts.push(&rest[..i]);
                rest = &rest[i + 2..];
            }
            None => break,
        }
    }
    parts.push(rest);
    parts.resize(CHECKPOINT_FILES.len(), &[]);
    let dir = tempfile::tempdir().unwrap();
    let mut manifest = Manifest {
        format: CHECKPOINT_FORMAT,
        step: 1,
        files: BTreeMap::new(),
    };
    for (name, bytes) in CHECKPOINT_FILES.iter().zip(&parts) {
        std::fs::write(dir.path().join(name), bytes).unwrap();
        manifest
            .files
            .insert(name.to_string(), FileDigest::of(bytes));
    }
    std::fs::write(
        dir.path().join("manifest.json"),
        serde_json::to_vec(&manifest).unwrap(),
    )
    .unwrap();
    let _ = load_checkpoint::<Autodiff<NdArray<f32>>>(dir.path(), &Default::default());
});
