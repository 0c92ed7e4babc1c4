//! Run-time backend choice: `--backend cpu|wgpu|cuda`. The trainer is generic over
//! the Burn backend; the concrete type is picked here, once, at the edge.

use std::str::FromStr;

use anyhow::{bail, Result};
use burn::backend::autodiff::checkpoint::strategy::{
    BalancedCheckpointing, CheckpointStrategy, NoCheckpointing,
};
use mixlm_model::TrainBackend;

use crate::config::{ActivationCheckpointing, RunConfig};
use crate::trainer::{train, TrainOptions, TrainOutcome};

/// A compute backend mixlm can train on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    /// Burn's ndarray backend: CPU, deterministic; for tests and small runs.
    Cpu,
    /// WebGPU through wgpu (Vulkan, Metal, DX12; Mesa's lavapipe on CPU-only machines).
    Wgpu,
    /// NVIDIA CUDA through CubeCL.
    Cuda,
}

impl FromStr for BackendKind {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cpu" | "ndarray" => Ok(Self::Cpu),
            "wgpu" => Ok(Self::Wgpu),
            "cuda" => Ok(Self::Cuda),
            other => bail!("unknown backend `{other}`: choose cpu, wgpu or cuda"),
        }
    }
}

impl BackendKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Cpu => "cpu",
            Self::Wgpu => "wgpu",
            Self::Cuda => "cuda",
        }
    }

    /// Whether this binary was built with the backend.
    pub fn compiled(self) -> bool {
        match self {
            Self::Cpu => true,
            Self::Wgpu => cfg!(feature = "wgpu"),
            Self::Cuda => cfg!(feature = "cuda"),
        }
    }

    /// The one-line error for a backend this binary lacks.
    pub fn check_compiled(self) -> Result<()> {
        if !self.compiled() {
            bail!(
                "backend `{0}` is not compiled into this mixlm binary; rebuild with `cargo build --release --features {0}`",
                self.name()
            );
        }
        Ok(())
    }
}

/// Work that is generic over the backend: [`dispatch`] runs it on the concrete one
/// a [`BackendKind`] names (closures cannot be generic over a type, traits can).
pub trait OnBackend {
    type Output;
    fn run<B: TrainBackend>(self, device: &B::Device) -> Result<Self::Output>;
}

/// Runs `job` on the chosen backend's default device.
pub fn dispatch<J: OnBackend>(kind: BackendKind, job: J) -> Result<J::Output> {
    dispatch_with::<NoCheckpointing, J>(kind, job)
}

/// [`dispatch`] with an autodiff checkpointing strategy (for training).
fn dispatch_with<C: CheckpointStrategy, J: OnBackend>(
    kind: BackendKind,
    job: J,
) -> Result<J::Output> {
    kind.check_compiled()?;
    match kind {
        BackendKind::Cpu => {
            use burn::backend::{ndarray::NdArrayDevice, Autodiff, NdArray};
            job.run::<Autodiff<NdArray<f32>, C>>(&NdArrayDevice::Cpu)
        }
        BackendKind::Wgpu => {
            #[cfg(feature = "wgpu")]
            {
                use burn::backend::{wgpu::WgpuDevice, Autodiff, Wgpu};
                job.run::<Autodiff<Wgpu, C>>(&WgpuDevice::default())
            }
            #[cfg(not(feature = "wgpu"))]
            unreachable!("checked above")
        }
        BackendKind::Cuda => {
            #[cfg(feature = "cuda")]
            {
                use burn::backend::{cuda::CudaDevice, Autodiff, Cuda};
                job.run::<Autodiff<Cuda, C>>(&CudaDevice::default())
            }
            #[cfg(not(feature = "cuda"))]
            unreachable!("checked above")
        }
    }
}

/// Trains on the chosen backend's default device.
pub fn train_on(
    kind: BackendKind,
    config: &RunConfig,
    options: &TrainOptions,
) -> Result<TrainOutcome> {
    struct Job<'a>(&'a RunConfig, &'a TrainOptions);
    impl OnBackend for Job<'_> {
        type Output = TrainOutcome;
        fn run<B: TrainBackend>(self, device: &B::Device) -> Result<TrainOutcome> {
            train::<B>(self.0, device, self.1)
        }
    }
    match config.run.activation_checkpointing {
        ActivationCheckpointing::None => dispatch(kind, Job(config, options)),
        ActivationCheckpointing::Balanced => {
            dispatch_with::<BalancedCheckpointing, _>(kind, Job(config, options))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_backend_is_one_line() {
        let e = "tpu".parse::<BackendKind>().unwrap_err().to_string();
        assert_eq!(e, "unknown backend `tpu`: choose cpu, wgpu or cuda");
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn missing_backend_names_the_feature() {
        let e = BackendKind::Cuda.check_compiled().unwrap_err().to_string();
        assert_eq!(
            e,
            "backend `cuda` is not compiled into this mixlm binary; rebuild with `cargo build --release --features cuda`"
        );
    }
}
