//! `mixlm model-info`: parameters, FLOPs per token and training memory of the presets.

use anyhow::Result;
use mixlm_model::{ModelConfig, Precision, Shard, PRESETS};

#[derive(clap::Args)]
pub struct Args {
    /// Presets to describe (all when none is given).
    pub presets: Vec<String>,
    /// Context length for the attention FLOPs and the memory estimate.
    #[arg(long, default_value_t = 2048)]
    pub seq_len: usize,
    /// Sequences per micro-batch (per GPU) for the memory estimate.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Data-parallel GPUs the state is sharded over (with --shard).
    #[arg(long, default_value_t = 1)]
    pub devices: usize,
    /// What the GPUs split between them (`distributed.shard`): none, optimizer
    /// (ZeRO-1) or gradients (ZeRO-2).
    #[arg(long, default_value = "none")]
    pub shard: Shard,
}

pub fn run(args: Args) -> Result<()> {
    let Args {
        presets,
        seq_len,
        batch_size,
        devices,
        shard,
    } = args;
    if seq_len == 0 || batch_size == 0 || devices == 0 {
        anyhow::bail!("--seq-len, --batch-size and --devices must be at least 1 (a memory and FLOPs estimate of an empty batch means nothing)");
    }
    let names: Vec<String> = if presets.is_empty() {
        PRESETS.iter().map(|s| s.to_string()).collect()
    } else {
        presets
    };
    println!(
        "{:<14} {:>6} {:>15} {:>15} {:>14} {:>14} {:>10} {:>10} {:>10} {:>10}",
        "preset",
        "family",
        "params",
        "non-embedding",
        "fwd GFLOP/tok",
        "train GFLOP/tok",
        "f32 GiB",
        "balanced",
        "bf16 GiB",
        "bf16+bal."
    );
    for name in names {
        let c = ModelConfig::preset(&name).ok_or_else(|| {
            anyhow::anyhow!(
                "unknown preset `{name}`; choose one of: {}",
                PRESETS.join(", ")
            )
        })?;
        let fwd = c.forward_flops_per_token(seq_len) as f64 / 1e9;
        let gib = |balanced, precision| {
            let compute = mixlm_model::Compute {
                precision,
                ..Default::default()
            };
            c.training_memory_per_peer(batch_size, seq_len, balanced, compute, devices, shard)
                .total() as f64
                / (1u64 << 30) as f64
        };
        println!(
            "{:<14} {:>6} {:>15} {:>15} {:>14.3} {:>14.3} {:>10.1} {:>10.1} {:>10.1} {:>10.1}",
            name,
            format!("{:?}", c.family).to_lowercase(),
            group_digits(c.num_params()),
            group_digits(c.num_non_embedding_params()),
            fwd,
            3.0 * fwd,
            gib(false, Precision::F32),
            gib(true, Precision::F32),
            gib(false, Precision::Bf16),
            gib(true, Precision::Bf16)
        );
    }
    let per_gpu = match (devices, shard) {
        (1, _) | (_, Shard::None) => String::new(),
        _ => format!(
            ", per GPU of {devices} with distributed.shard = \"{}\"",
            shard.name()
        ),
    };
    println!(
        "(FLOPs at sequence length {seq_len}; training = 3x forward. Memory: estimated \
         training with AdamW and fused attention at batch {batch_size} x {seq_len}{per_gpu}: \
         f32 and bf16, each without and with run.activation_checkpointing = \"balanced\"; \
         see ModelConfig::training_memory_per_peer)"
    );
    Ok(())
}

/// 162322944 -> "162,322,944".
fn group_digits(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}
