//! Decoder-only transformers for mixlm, generic over the Burn backend.
//!
//! Two families share one [`ModelConfig`]: GPT-NeoX/Pythia (`neox`) and Llama
//! (`llama`). Weights are saved and loaded as safetensors under Hugging Face names
//! ([`hf`]), so checkpoints move freely between mixlm and transformers.

pub mod attention;
pub mod config;
pub mod hf;
pub mod model;

pub use attention::{ModelBackend, TrainBackend};
pub use config::{Family, ModelConfig, Precision, TrainingMemory, PRESETS};
pub use model::{token_nll, Transformer};
