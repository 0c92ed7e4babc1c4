//! One training step of Burn's CUDA backend, "run" on the [`CudaTarget`] recorder: the
//! tiny presets' forward, loss, backward and mixlm's AdamW update on
//! `Autodiff<Fusion<CubeBackend<_, f32, i32, u8>>>`, the type `burn::backend::Cuda`
//! names, with the model computing in the run's precision. Every kernel it launches
//! (Burn's autotuned matmul candidates, fusion's element-wise and reduction kernels,
//! mixlm's attention) is recorded, to be compiled by NVRTC and ptxas.

use anyhow::{Context, Result};
use burn::backend::Autodiff;
use burn::module::AutodiffModule;
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::backend::DeviceOps;
use burn_cubecl::CubeBackend;
use burn_fusion::Fusion;
use mixlm_model::{ModelConfig, Precision};
use mixlm_train::config::OptimizerSection;
use mixlm_train::optim::AdamW;

use crate::target::{take_launched, Arch, CudaTarget, Launched};

impl DeviceOps for Arch {}

/// Burn's CUDA backend (`burn::backend::Cuda`) over the recorder.
pub type Inner = Fusion<CubeBackend<CudaTarget, f32, i32, u8>>;
/// What the trainer steps on CUDA.
pub type Train = Autodiff<Inner>;

/// Makes autotuning keep its results in `dir` (emptied first), so that the process
/// tunes, and so records, every candidate again instead of reading an earlier run's
/// choices. Call before the first client; once per process.
pub fn fresh_autotune(dir: &std::path::Path) {
    use cubecl_runtime::config::cache::CacheConfig;
    use cubecl_runtime::config::{CubeClRuntimeConfig, RuntimeConfig};
    let _ = std::fs::remove_dir_all(dir);
    let mut config = CubeClRuntimeConfig::default();
    config.autotune.cache = CacheConfig::File(dir.to_path_buf());
    CubeClRuntimeConfig::set(config);
}

/// The shape of the recorded step: `batch` sequences of `seq_len` tokens through
/// `preset` with its vocabulary set to `vocab`.
#[derive(Debug, Clone)]
pub struct StepShape {
    pub preset: String,
    pub vocab: usize,
    pub batch: usize,
    pub seq_len: usize,
}

/// The distinct kernels one training step of `shape` launches on `arch`, computing in
/// `precision`, in launch order. Autotuning launches every candidate it times.
pub fn training_step_kernels(
    arch: Arch,
    shape: &StepShape,
    precision: Precision,
) -> Result<Vec<Launched>> {
    let mut config = ModelConfig::preset(&shape.preset)
        .with_context(|| format!("no preset {}", shape.preset))?;
    config.vocab_size = shape.vocab;
    let device = arch;
    // Anything an earlier caller launched on this thread's targets is not this step's.
    drop(take_launched());
    let model = config.init::<Train>(&device).with_precision(precision);
    let tokens = Tensor::<Train, 2, Int>::zeros([shape.batch, shape.seq_len + 1], &device);
    let inputs = tokens.clone().slice([0..shape.batch, 0..shape.seq_len]);
    let targets = tokens.slice([0..shape.batch, 1..shape.seq_len + 1]);
    let loss = model.token_losses(inputs, targets).mean();
    let grads = GradientsParams::from_grads(loss.backward(), &model);
    let mut optimizer = AdamW::<Inner>::new(OptimizerSection::default());
    let (model, _) = optimizer.step(6e-4, model, grads);
    // Fusion runs what it queued when something is read: read a weight of the update.
    let _ = model.valid().embed.weight.val().into_data();
    <Train as Backend>::sync(&device).context("the recorded step")?;
    Ok(take_launched())
}
