//! Model hyperparameters, presets, parameter and FLOP counts.

use serde::{Deserialize, Serialize};

/// Architecture family. One config type covers both so that presets, checkpoints
/// and the trainer need no generic over the family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    /// GPT-NeoX / Pythia: LayerNorm with bias, fused QKV with bias, partial rotary,
    /// exact GELU MLP, (by default) parallel residual, untied output.
    Neox,
    /// Llama: RMSNorm, SwiGLU MLP, full RoPE, grouped-query attention, no biases.
    Llama,
}

/// Hyperparameters of a decoder-only transformer; the `[model]` TOML section.
/// Precision of the model's compute: matmuls, attention, rotary embedding and MLP
/// activations run in it, while parameters (the master weights), optimizer state,
/// norms, the residual stream, softmax and the loss stay f32 (what PyTorch's autocast
/// does). bf16 needs no loss scaling; f16 would, which mixlm does not do, so training
/// configs offer only `f32` and `bf16` (f16 serves evaluation and the tests of this
/// code path on devices without bf16).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    Bf16,
    F16,
}

impl Precision {
    /// The dtype compute runs in.
    pub fn dtype(self) -> burn::tensor::FloatDType {
        use burn::tensor::FloatDType;
        match self {
            Self::F32 => FloatDType::F32,
            Self::Bf16 => FloatDType::BF16,
            Self::F16 => FloatDType::F16,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::F16 => "f16",
        }
    }
}

/// Which attention implementation the model calls.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttentionKernel {
    /// [`crate::attention::causal_attention`]: tiled kernels on GPUs; under autodiff
    /// keeps only q, k, v, the output and a log-sum-exp per row, and recomputes the
    /// probabilities in the backward pass.
    #[default]
    Fused,
    /// Burn's own `attention` op; under autodiff it is Burn's fallback, which keeps
    /// the `[batch, heads, seq, seq]` score and probability matrices for the backward.
    Burn,
}

/// How the model computes (run settings, not part of the weights).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Compute {
    pub precision: Precision,
    pub attention: AttentionKernel,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub family: Family,
    /// Rows of the embedding and output matrices (Pythia pads 50,277 ids to 50,304).
    pub vocab_size: usize,
    pub d_model: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    /// Key/value heads (grouped-query attention); equals `n_heads` for multi-head.
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Hidden width of the MLP (per branch for SwiGLU).
    pub d_ff: usize,
    /// Fraction of each head's dimensions that get rotary embedding (Pythia: 0.25).
    pub rotary_pct: f64,
    pub rope_theta: f64,
    pub norm_eps: f64,
    /// NeoX only: `x + attn(ln1 x) + mlp(ln2 x)` instead of sequential residuals.
    pub parallel_residual: bool,
    /// Share the embedding matrix with the output projection.
    pub tie_embeddings: bool,
    /// Longest context the model is meant for (written to the HF config).
    pub max_seq_len: usize,
    /// Standard deviation of the normal initialisation of weight matrices.
    pub init_std: f64,
}

/// Names of the built-in presets, in the order `model-info` lists them.
pub const PRESETS: &[&str] = &[
    "tiny",
    "tiny-llama",
    "pythia-160m",
    "pythia-410m",
    "pythia-1b",
    "odm-1b",
    "samplemix-1b",
    "samplemix-8b",
];

/// A training memory estimate in bytes, by what holds it.
///
/// Calibrated on the CPU backend (pythia-160m, batch 4 x 256: 4.70 GB peak RSS measured
/// against 4.60 GB estimated; with balanced checkpointing 4.29 against 4.18): an
/// estimate of the order of magnitude, not a measurement of a GPU's allocator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrainingMemory {
    /// Weights, gradients, AdamW's two moments (16 bytes per parameter) and the
    /// updated weights while the optimizer step still holds the old ones (4 more);
    /// sharded over N peers, the moments and the update's temporaries are 1/N.
    pub state: u64,
    /// Activations kept for the backward pass (f32).
    pub activations: u64,
    /// Logits and their log-softmax over the vocabulary (f32).
    pub logits: u64,
}

impl TrainingMemory {
    pub fn total(&self) -> u64 {
        self.state + self.activations + self.logits
    }
}

/// `distributed.shard`: what the data-parallel peers split between them (ZeRO).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Shard {
    /// Every peer holds everything (plain data parallelism).
    #[default]
    None,
    /// ZeRO stage 1: each peer keeps and updates AdamW's moments of its slices only.
    Optimizer,
    /// ZeRO stage 2: also, each peer keeps only its slices of the averaged gradient
    /// (the all-reduce becomes a reduce-scatter).
    Gradients,
}

impl Shard {
    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Optimizer => "optimizer",
            Self::Gradients => "gradients",
        }
    }
}

impl std::str::FromStr for Shard {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Self::None),
            "optimizer" => Ok(Self::Optimizer),
            "gradients" => Ok(Self::Gradients),
            _ => Err(format!(
                "unknown shard `{s}`: use none, optimizer or gradients"
            )),
        }
    }
}

impl ModelConfig {
    fn neox(vocab: usize, d: usize, layers: usize, heads: usize) -> Self {
        Self {
            family: Family::Neox,
            vocab_size: vocab,
            d_model: d,
            n_layers: layers,
            n_heads: heads,
            n_kv_heads: heads,
            head_dim: d / heads,
            d_ff: 4 * d,
            rotary_pct: 0.25,
            rope_theta: 10_000.0,
            norm_eps: 1e-5,
            parallel_residual: true,
            tie_embeddings: false,
            max_seq_len: 2048,
            init_std: 0.02,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn llama(
        vocab: usize,
        d: usize,
        layers: usize,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        ffn: usize,
    ) -> Self {
        Self {
            family: Family::Llama,
            vocab_size: vocab,
            d_model: d,
            n_layers: layers,
            n_heads: heads,
            n_kv_heads: kv_heads,
            head_dim,
            d_ff: ffn,
            rotary_pct: 1.0,
            rope_theta: 10_000.0,
            norm_eps: 1e-5,
            parallel_residual: false,
            tie_embeddings: false,
            max_seq_len: 4096,
            init_std: 0.02,
        }
    }

    /// A built-in preset by name; see [`PRESETS`].
    ///
    /// Pythia shapes follow EleutherAI's configs (vocab padded to 50,304). `odm-1b` is
    /// the 1B GPT-NeoX-style model of the ODM paper (16 layers, d=2048, 16 heads).
    /// `samplemix-1b`/`-8b` are SampleMix's Llama-style shapes.
    pub fn preset(name: &str) -> Option<Self> {
        const PYTHIA_VOCAB: usize = 50_304;
        Some(match name {
            "tiny" => Self {
                max_seq_len: 256,
                ..Self::neox(128, 64, 2, 4)
            },
            "tiny-llama" => Self {
                max_seq_len: 256,
                ..Self::llama(128, 64, 2, 4, 2, 16, 172)
            },
            "pythia-160m" => Self::neox(PYTHIA_VOCAB, 768, 12, 12),
            "pythia-410m" => Self::neox(PYTHIA_VOCAB, 1024, 24, 16),
            "pythia-1b" => Self {
                head_dim: 256,
                ..Self::neox(PYTHIA_VOCAB, 2048, 16, 8)
            },
            "odm-1b" => Self::neox(PYTHIA_VOCAB, 2048, 16, 16),
            "samplemix-1b" => Self::llama(PYTHIA_VOCAB, 1664, 28, 13, 13, 128, 4480),
            "samplemix-8b" => Self::llama(PYTHIA_VOCAB, 4096, 32, 32, 8, 128, 14336),
            _ => return None,
        })
    }

    /// Checks shapes that the model code relies on; one message per problem.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("d_model", self.d_model),
            ("n_layers", self.n_layers),
            ("n_heads", self.n_heads),
            ("n_kv_heads", self.n_kv_heads),
            ("head_dim", self.head_dim),
            ("d_ff", self.d_ff),
            ("max_seq_len", self.max_seq_len),
        ];
        if let Some((key, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(format!("model.{key} must be > 0"));
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return Err(format!(
                "model.n_heads ({}) must be a multiple of model.n_kv_heads ({})",
                self.n_heads, self.n_kv_heads
            ));
        }
        if !(0.0..=1.0).contains(&self.rotary_pct) {
            return Err(format!(
                "model.rotary_pct = {} must be within 0..=1",
                self.rotary_pct
            ));
        }
        if !self.rotary_dims().is_multiple_of(2) {
            return Err(format!(
                "model.rotary_pct = {} gives {} rotary dims of head_dim {}; it must be even",
                self.rotary_pct,
                self.rotary_dims(),
                self.head_dim
            ));
        }
        if self.family == Family::Llama && self.parallel_residual {
            return Err(
                "model.parallel_residual is a NeoX option; set it to false for llama".into(),
            );
        }
        if !(self.norm_eps > 0.0 && self.init_std > 0.0 && self.rope_theta > 0.0) {
            return Err("model.norm_eps, model.init_std and model.rope_theta must be > 0".into());
        }
        Ok(())
    }

    /// Rotary dimensions per head (`int(head_dim * rotary_pct)`, as GPT-NeoX computes it).
    pub fn rotary_dims(&self) -> usize {
        (self.head_dim as f64 * self.rotary_pct) as usize
    }

    /// Width of the fused QKV projection's output.
    pub fn qkv_dim(&self) -> usize {
        (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
    }

    /// Exact number of parameters of the model this config builds.
    pub fn num_params(&self) -> u64 {
        let (d, v, f) = (
            self.d_model as u64,
            self.vocab_size as u64,
            self.d_ff as u64,
        );
        let attn_out = (self.n_heads * self.head_dim) as u64;
        let qkv = self.qkv_dim() as u64;
        let per_layer = match self.family {
            Family::Neox => {
                // 2 LayerNorms (weight+bias), fused QKV + dense with biases, 2-layer MLP with biases.
                4 * d + (d * qkv + qkv) + (attn_out * d + d) + (d * f + f) + (f * d + d)
            }
            Family::Llama => 2 * d + d * qkv + attn_out * d + 3 * d * f,
        };
        let final_norm = match self.family {
            Family::Neox => 2 * d,
            Family::Llama => d,
        };
        let embed = v * d;
        let head = if self.tie_embeddings { 0 } else { v * d };
        embed + head + self.n_layers as u64 * per_layer + final_norm
    }

    /// Parameters outside the embedding matrix (the `N` of the Chinchilla/Kaplan FLOP formulas).
    pub fn num_non_embedding_params(&self) -> u64 {
        self.num_params() - (self.vocab_size * self.d_model) as u64
    }

    /// Estimated device memory (bytes) of training with AdamW at `batch` x `seq_len`,
    /// computing as `compute` says, as this implementation stores things (see
    /// [`TrainingMemory`]).
    pub fn training_memory(
        &self,
        batch: usize,
        seq_len: usize,
        balanced: bool,
        compute: Compute,
    ) -> TrainingMemory {
        self.training_memory_per_peer(batch, seq_len, balanced, compute, 1, Shard::None)
    }

    /// [`Self::training_memory`] of one of `peers` data-parallel peers that split
    /// their state as `shard` says, with `batch` sequences per peer.
    ///
    /// Sharding divides AdamW's moments and the update's temporaries by the peer
    /// count. It does not divide the gradient: Burn's backward pass returns every
    /// parameter's gradient at once, so each peer holds a whole f32 gradient at the
    /// end of it, before the reduce-scatter (`gradients`) leaves it only its slice.
    /// Stage 2 thus saves the whole averaged gradient during the optimizer step,
    /// not the peak.
    pub fn training_memory_per_peer(
        &self,
        batch: usize,
        seq_len: usize,
        balanced: bool,
        compute: Compute,
        peers: usize,
        shard: Shard,
    ) -> TrainingMemory {
        let n = self.num_params();
        let split = |bytes: u64| match shard {
            Shard::None => bytes,
            Shard::Optimizer | Shard::Gradients => bytes.div_ceil(peers.max(1) as u64),
        };
        let (d, h) = (self.d_model as u64, self.n_heads as u64);
        let (t, tokens) = (seq_len as u64, (batch * seq_len) as u64);
        let half = compute.precision != Precision::F32;
        // Values kept per token and layer for the backward pass: the block's d-wide
        // tensors (residual input, norm outputs, QKV, rotated Q/K, attention output,
        // MLP input, the MLP's two 4d-wide tensors: 17 d in all). Balanced
        // checkpointing recomputes the memory-bound ones (norms, rotary, GELU) and
        // keeps about 10 d. In bf16 they are 2 bytes, except the 3 d of the residual
        // input and norm outputs, which stay f32.
        let wide = if balanced { 10 * d } else { 17 * d };
        let wide_bytes = if half { 2 * wide + 2 * 3 * d } else { 4 * wide };
        // Attention: the fused kernel keeps one f32 log-sum-exp per row and head; Burn's
        // fallback keeps the whole [h, t, t] scores and probabilities (the scores alone
        // under balanced checkpointing).
        let attention_bytes = match compute.attention {
            AttentionKernel::Fused => 4 * h,
            AttentionKernel::Burn => {
                (if half { 2 } else { 4 }) * (if balanced { 1 } else { 2 }) * h * t
            }
        };
        TrainingMemory {
            // f32 weights, gradients, two AdamW moments and the update's temporaries;
            // bf16 adds the weights' bf16 copies the matmuls keep for the backward.
            state: 8 * n + split(12 * n) + if half { 2 * n } else { 0 },
            activations: (wide_bytes + attention_bytes) * tokens * self.n_layers as u64,
            // f32 logits and their log-softmax (plus the bf16 logits in bf16).
            logits: (8 + if half { 2 } else { 0 }) * self.vocab_size as u64 * tokens,
        }
    }

    /// Forward FLOPs per token at context `seq_len`: 2 per multiply-add of every weight
    /// matrix (output projection included) plus the attention scores and weighted sum
    /// (`2 * 2 * n_layers * seq_len * n_heads * head_dim`, counting the full square as
    /// PaLM's MFU accounting does). Training costs 3x this (forward + backward).
    pub fn forward_flops_per_token(&self, seq_len: usize) -> u64 {
        let matmul_params = self.num_non_embedding_params()
            + if self.tie_embeddings {
                (self.vocab_size * self.d_model) as u64
            } else {
                0
            };
        let attn =
            4 * self.n_layers as u64 * seq_len as u64 * (self.n_heads * self.head_dim) as u64;
        2 * matmul_params + attn
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn training_memory_follows_its_formula() {
        let c = ModelConfig::preset("pythia-160m").unwrap();
        let burn = Compute {
            attention: AttentionKernel::Burn,
            ..Compute::default()
        };
        let m = c.training_memory(4, 256, false, burn);
        let tokens = 4 * 256;
        assert_eq!(m.state, 20 * c.num_params());
        assert_eq!(m.activations, 4 * (17 * 768 + 2 * 12 * 256) * tokens * 12);
        assert_eq!(m.logits, 8 * 50_304 * tokens);
        let b = c.training_memory(4, 256, true, burn);
        assert_eq!(b.activations, 4 * (10 * 768 + 12 * 256) * tokens * 12);
        assert_eq!((b.state, b.logits), (m.state, m.logits));
        // The calibration run (Burn's attention): 4.70 GB measured, 4.29 GB with
        // balanced checkpointing.
        let gb = |x: u64| x as f64 / 1e9;
        assert!((gb(m.total()) - 4.60).abs() < 0.02, "{}", gb(m.total()));
        assert!((gb(b.total()) - 4.18).abs() < 0.02, "{}", gb(b.total()));
        // Fused attention keeps no square: 8 x 2048 on pythia-1b.
        let big = ModelConfig::preset("pythia-1b").unwrap();
        let fallback = big.training_memory(8, 2048, false, burn);
        let fused = big.training_memory(8, 2048, false, Compute::default());
        assert!(fallback.activations > fallback.state);
        assert_eq!(fused.activations, (4 * 17 * 2048 + 4 * 8) * 8 * 2048 * 16);
        let bf16 = Compute {
            precision: Precision::Bf16,
            ..Compute::default()
        };
        let half = big.training_memory(8, 2048, false, bf16);
        assert_eq!(
            half.activations,
            (2 * 17 * 2048 + 2 * 3 * 2048 + 4 * 8) * 8 * 2048 * 16
        );
        assert_eq!(half.state, 22 * big.num_params());
    }

    /// Sharded over 8 peers, the moments and the update's temporaries (12 bytes per
    /// parameter) are an eighth; the weights, the bf16 copies and the whole gradient
    /// Burn's backward returns are not (samplemix-8b in bf16 at 1 x 2048).
    #[test]
    fn sharding_divides_the_moments_and_the_update() {
        let c = ModelConfig::preset("samplemix-8b").unwrap();
        let n = c.num_params();
        let bf16 = Compute {
            precision: Precision::Bf16,
            ..Compute::default()
        };
        let one = c.training_memory(1, 2048, true, bf16);
        assert_eq!(one.state, 22 * n);
        for shard in [Shard::Optimizer, Shard::Gradients] {
            let m = c.training_memory_per_peer(1, 2048, true, bf16, 8, shard);
            assert_eq!(m.state, 10 * n + (12 * n).div_ceil(8));
            assert_eq!((m.activations, m.logits), (one.activations, one.logits));
        }
        let none = c.training_memory_per_peer(1, 2048, true, bf16, 8, Shard::None);
        assert_eq!(none, one);
        assert_eq!("gradients".parse::<Shard>(), Ok(Shard::Gradients));
        assert!("zero3"
            .parse::<Shard>()
            .unwrap_err()
            .contains("none, optimizer or gradients"));
    }

    /// Parameter counts of the Hugging Face checkpoints (`sum(p.numel())` of
    /// `GPTNeoXForCausalLM.from_pretrained("EleutherAI/pythia-*")`).
    #[test]
    fn pythia_param_counts_match_hugging_face() {
        assert_eq!(
            ModelConfig::preset("pythia-160m").unwrap().num_params(),
            162_322_944
        );
        assert_eq!(
            ModelConfig::preset("pythia-410m").unwrap().num_params(),
            405_334_016
        );
        assert_eq!(
            ModelConfig::preset("pythia-1b").unwrap().num_params(),
            1_011_781_632
        );
    }

    #[test]
    fn every_preset_is_valid() {
        for name in PRESETS {
            ModelConfig::preset(name).unwrap().validate().unwrap();
        }
        assert!(ModelConfig::preset("pythia-7b").is_none());
    }

    #[test]
    fn validation_names_the_key() {
        let mut c = ModelConfig::preset("tiny-llama").unwrap();
        c.n_kv_heads = 3;
        assert_eq!(
            c.validate().unwrap_err(),
            "model.n_heads (4) must be a multiple of model.n_kv_heads (3)"
        );
        let mut c = ModelConfig::preset("tiny").unwrap();
        c.d_ff = 0;
        assert_eq!(c.validate().unwrap_err(), "model.d_ff must be > 0");
    }

    #[test]
    fn flops_count_matmuls_and_attention() {
        // pythia-1b at context 128: 2 * (N - V*d) + 4 * L * T * H * hd
        // = 2 * (1_011_781_632 - 103_022_592) + 4 * 16 * 128 * 2048.
        let c = ModelConfig::preset("pythia-1b").unwrap();
        assert_eq!(c.forward_flops_per_token(128), 1_817_518_080 + 16_777_216);
        // The 6N rule (N without the input embedding) holds within 1% at short context.
        let ratio = 3.0 * c.forward_flops_per_token(128) as f64
            / (6.0 * c.num_non_embedding_params() as f64);
        assert!((ratio - 1.0).abs() < 0.01, "{ratio}");
    }
}
