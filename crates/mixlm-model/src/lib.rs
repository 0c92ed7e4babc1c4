//! Decoder-only transformers for mixlm, generic over the Burn backend.
//!
//! Two families share one [`ModelConfig`]: GPT-NeoX/Pythia (`neox`) and Llama
//! (`llama`). Weights are saved and loaded as safetensors under Hugging Face names
//! ([`hf`]), so checkpoints move freely between mixlm and transformers.

pub mod adamw;
pub mod attention;
pub mod config;
mod cpu;
pub mod gelu;
pub mod hf;
pub mod loss;
pub mod model;
pub mod norm;

/// Whether a Vulkan driver is installed (Linux ICD folders): the wgpu tests of this
/// workspace run on it (CI installs Mesa's lavapipe) and skip, saying why, without it.
pub fn vulkan_driver_installed() -> bool {
    let found = ["/usr/share/vulkan/icd.d", "/etc/vulkan/icd.d"]
        .iter()
        .any(|d| std::fs::read_dir(d).is_ok_and(|mut e| e.next().is_some()));
    if !found {
        eprintln!("skipped: no Vulkan driver (apt-get install mesa-vulkan-drivers libvulkan1)");
    }
    found
}

pub use attention::{AutodiffInner, ModelBackend, TrainBackend};
pub use config::{
    AttentionKernel, Compute, Family, ModelConfig, Precision, Shard, TrainingMemory, PRESETS,
};
pub use loss::token_nll;
pub use model::{Transformer, EVAL_CHUNK_VALUES};
