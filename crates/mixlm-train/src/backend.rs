//! Run-time backend choice: `--backend cpu|wgpu|cuda`. The trainer is generic over
//! the Burn backend; the concrete type is picked here, once, at the edge.

use anyhow::Result;
use burn::backend::autodiff::checkpoint::strategy::{
    BalancedCheckpointing, CheckpointStrategy, NoCheckpointing,
};
use mixlm_model::TrainBackend;

pub use crate::config::BackendKind;
use crate::config::{ActivationCheckpointing, RunConfig};
use crate::distributed::PeerPanic;
use crate::trainer::{train, train_data_parallel, TrainOptions, TrainOutcome};

/// Runs `work` on one of rayon's worker threads, as a CPU job on one device runs:
/// every parallel operation of the ndarray backend (and mixlm's CPU passes) then
/// starts on a worker that takes part in it, instead of being handed from this
/// thread to the pool and waited for, and between operations one worker spins instead
/// of two competing with this thread for two cores. The demo runs 1.2x as fast; at a
/// 50k vocabulary, where large operations dominate, it changes nothing measurable
/// (benches/RESULTS.md). Peers of a data-parallel run are threads of their own and
/// are left as they are.
#[cfg(not(feature = "nccl"))]
fn on_a_rayon_worker<T: Send>(work: impl FnOnce() -> T + Send) -> T {
    rayon::scope(|_| work())
}

/// Work that is generic over the backend: [`dispatch`] runs it on the concrete one
/// a [`BackendKind`] names (closures cannot be generic over a type, traits can).
pub trait OnBackend: Send {
    type Output: Send;
    fn run<B: TrainBackend>(self, device: &B::Device) -> Result<Self::Output>;

    /// The job on several devices (data-parallel training); one device by default.
    fn run_on<B: TrainBackend>(self, devices: &[B::Device]) -> Result<Self::Output>
    where
        Self: Sized,
    {
        self.run::<B>(&devices[0])
    }
}

/// Runs `job` on the chosen backend's default device.
pub fn dispatch<J: OnBackend>(kind: BackendKind, job: J) -> Result<J::Output> {
    dispatch_with::<NoCheckpointing, J>(kind, 1, job)
}

/// [`dispatch`] with an autodiff checkpointing strategy (for training), on `n`
/// devices: the default one when `n` is 1, else devices `0..n` of the backend (with
/// `cpu`, `n` handles on the one CPU).
fn dispatch_with<C: CheckpointStrategy, J: OnBackend>(
    kind: BackendKind,
    n: usize,
    job: J,
) -> Result<J::Output> {
    kind.check_compiled()?;
    match kind {
        BackendKind::Cpu => {
            #[cfg(not(feature = "nccl"))]
            {
                use burn::backend::{ndarray::NdArrayDevice, Autodiff, NdArray};
                let devices = vec![NdArrayDevice::Cpu; n];
                let run = || job.run_on::<Autodiff<NdArray<f32>, C>>(&devices);
                match n {
                    1 => on_a_rayon_worker(run),
                    // The peers are threads of their own, each handing its
                    // operations to the pool.
                    _ => run(),
                }
            }
            #[cfg(feature = "nccl")]
            unreachable!("checked above")
        }
        BackendKind::Wgpu => {
            #[cfg(feature = "wgpu")]
            {
                use burn::backend::{wgpu::WgpuDevice, Autodiff, Wgpu};
                let devices: Vec<WgpuDevice> = match n {
                    1 => vec![WgpuDevice::default()],
                    n => (0..n).map(WgpuDevice::DiscreteGpu).collect(),
                };
                job.run_on::<Autodiff<Wgpu, C>>(&devices)
            }
            #[cfg(not(feature = "wgpu"))]
            unreachable!("checked above")
        }
        BackendKind::Cuda => {
            #[cfg(feature = "cuda")]
            {
                use burn::backend::{cuda::CudaDevice, Autodiff, Cuda};
                let devices: Vec<CudaDevice> = (0..n).map(CudaDevice::new).collect();
                job.run_on::<Autodiff<Cuda, C>>(&devices)
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
        fn run_on<B: TrainBackend>(self, devices: &[B::Device]) -> Result<TrainOutcome> {
            train_data_parallel::<B>(self.0, devices, self.1)
        }
    }
    let n = config.distributed.devices;
    let run = || match config.run.activation_checkpointing {
        ActivationCheckpointing::None => {
            dispatch_with::<NoCheckpointing, _>(kind, n, Job(config, options))
        }
        ActivationCheckpointing::Balanced => {
            dispatch_with::<BalancedCheckpointing, _>(kind, n, Job(config, options))
        }
    };
    with_panic_advice(config, kind, run)
}

/// Burn's backends report an exhausted device memory (and a missing NCCL) by
/// panicking: turns those panics, of this thread or of a data-parallel peer, into an
/// error that says what to change.
fn with_panic_advice<T>(
    config: &RunConfig,
    kind: BackendKind,
    run: impl FnOnce() -> Result<T>,
) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)) {
        // Data-parallel peers' panics come back as errors (the others were stopped).
        Ok(Err(e)) => {
            let advice = e.chain().find_map(|cause| {
                let panic = cause.downcast_ref::<PeerPanic>()?;
                let advice = panic_advice(&panic.message, config, kind)?;
                Some(format!("peer {}: {advice}", panic.rank))
            });
            Err(advice.map_or(e, |advice| anyhow::anyhow!(advice)))
        }
        Ok(result) => result,
        Err(panic) => match panic_advice(crate::distributed::panic_message(&panic), config, kind) {
            Some(advice) => Err(anyhow::anyhow!(advice)),
            None => std::panic::resume_unwind(panic),
        },
    }
}

/// For a panic that reports exhausted device memory: what ran out and what to change.
pub fn out_of_memory_advice(
    message: &str,
    config: &RunConfig,
    kind: BackendKind,
) -> Option<String> {
    let m = message.to_lowercase();
    let oom = [
        "out of memory",
        "outofmemory",
        "out_of_memory",
        "failed to allocate",
    ]
    .iter()
    .any(|p| m.contains(p));
    if !oom {
        return None;
    }
    let r = &config.run;
    let checkpointing = match r.activation_checkpointing {
        ActivationCheckpointing::None => {
            ", or set run.activation_checkpointing = \"balanced\" (recomputes activations in \
             the backward pass)"
        }
        ActivationCheckpointing::Balanced => "",
    };
    Some(format!(
        "out of {} memory training preset {} with micro-batches of {} x {} tokens \
         (run.batch_size x run.seq_len): lower run.batch_size and raise run.grad_accum to \
         keep the batch{checkpointing}; `mixlm model-info {} --batch-size {} --seq-len {}` \
         estimates the memory. The device said: {}",
        kind.name(),
        config.model.preset,
        r.batch_size,
        r.seq_len,
        config.model.preset,
        r.batch_size,
        r.seq_len,
        message.lines().next().unwrap_or("").trim()
    ))
}

/// What to change for a panic mixlm recognises: [`out_of_memory_advice`] or
/// [`device_thread_advice`].
fn panic_advice(message: &str, config: &RunConfig, kind: BackendKind) -> Option<String> {
    out_of_memory_advice(message, config, kind)
        .or_else(|| device_thread_advice(message, config, kind))
}

/// CubeCL runs each device's work on a thread of its own (and Burn's `distributed`
/// engine its gradient pairing on another); when one of those panics, a missing
/// `libcuda.so` or `libnccl.so` say, the training thread only panics on the closed
/// channel ("RecvError"), and the cause is the other thread's panic, printed above.
/// NCCL is loaded as `libnccl.so`, a name PyTorch's pip wheel (`libnccl.so.2`) lacks.
pub fn device_thread_advice(
    message: &str,
    config: &RunConfig,
    kind: BackendKind,
) -> Option<String> {
    let nccl_missing = message.contains("\"nccl\" shared library");
    let thread_gone = [
        "RecvError",
        "Can receive callback",
        "Gradient sync server disconnected",
    ]
    .iter()
    .any(|p| message.contains(p));
    if !(nccl_missing || thread_gone) {
        return None;
    }
    let nccl = "mixlm's nccl build loads `libnccl.so` at run time: install NCCL, or where \
                only `libnccl.so.2` exists (as in PyTorch's nvidia-nccl wheel), link it as \
                `libnccl.so` in a folder on LD_LIBRARY_PATH; or train with communication = \
                \"collective\"";
    if nccl_missing {
        return Some(format!(
            "NCCL could not be loaded (distributed.communication = \"nccl\"). {nccl}"
        ));
    }
    let mut advice = format!(
        "the {} device stopped working: a thread of Burn's that drives it panicked, and its \
         own message above says why (a library that could not be loaded names itself \
         there: libcuda.so means no NVIDIA driver is installed or on LD_LIBRARY_PATH)",
        kind.name()
    );
    if config.distributed.nccl() {
        advice += &format!(". With distributed.communication = \"nccl\": {nccl}");
    }
    Some(advice)
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::bail;

    #[test]
    fn a_stopped_device_thread_or_missing_nccl_becomes_advice() {
        let cudarc = "Unable to dynamically load the \"nccl\" shared library - searched for \
                      library names: [\"libnccl.so\"]. Ensure that `LD_LIBRARY_PATH` ...";
        let config = RunConfig::embedded(&[]).unwrap();
        let advice = panic_advice(cudarc, &config, BackendKind::Cuda).unwrap();
        assert!(
            advice.starts_with("NCCL could not be loaded (distributed.communication = \"nccl\")")
                && advice.contains("link it as `libnccl.so`")
                && advice.ends_with("communication = \"collective\""),
            "{advice}"
        );
        // What the training thread says when CubeCL's device thread died.
        let peer = "called `Result::unwrap()` on an `Err` value: RecvError";
        let advice = panic_advice(peer, &config, BackendKind::Cuda).unwrap();
        assert!(
            advice.starts_with("the cuda device stopped working")
                && advice.contains("libcuda.so means no NVIDIA driver")
                && !advice.contains("nccl"),
            "{advice}"
        );
        let nccl = RunConfig::embedded(&[
            "run.backend=\"cuda\"".into(),
            "distributed.communication=\"nccl\"".into(),
        ])
        .unwrap();
        let advice =
            panic_advice("Can receive callback: RecvError", &nccl, BackendKind::Cuda).unwrap();
        assert!(advice.contains("link it as `libnccl.so`"), "{advice}");
        assert_eq!(
            panic_advice("index out of bounds", &config, BackendKind::Cpu),
            None
        );
    }

    #[test]
    fn out_of_memory_panics_become_advice() {
        let config = RunConfig::embedded(&["run.batch_size=8".into()]).unwrap();
        let cuda = "CUDA_ERROR_OUT_OF_MEMORY: out of memory\nbacktrace...";
        let advice = out_of_memory_advice(cuda, &config, BackendKind::Cuda).unwrap();
        assert!(
            advice.starts_with(
                "out of cuda memory training preset tiny with micro-batches of 8 x 64 tokens"
            ),
            "{advice}"
        );
        assert!(
            advice.contains("run.activation_checkpointing = \"balanced\""),
            "{advice}"
        );
        assert!(
            advice.contains("mixlm model-info tiny --batch-size 8 --seq-len 64"),
            "{advice}"
        );
        assert!(advice.ends_with("The device said: CUDA_ERROR_OUT_OF_MEMORY: out of memory"));
        let balanced =
            RunConfig::embedded(&["run.activation_checkpointing=\"balanced\"".into()]).unwrap();
        let advice = out_of_memory_advice("OutOfMemory", &balanced, BackendKind::Wgpu).unwrap();
        assert!(!advice.contains("activation_checkpointing"), "{advice}");
        assert_eq!(
            out_of_memory_advice("index out of bounds", &config, BackendKind::Cpu),
            None
        );
    }

    /// A data-parallel peer that runs out of memory gets the same advice as one
    /// device, naming the peer; other failures pass through as they were.
    #[test]
    fn a_peer_out_of_memory_gets_the_advice() {
        use crate::distributed::run_peers;
        use std::time::Duration;
        let _one_group = crate::distributed::ONE_GROUP.lock();
        let config = RunConfig::embedded(&[]).unwrap();
        let peers =
            |fail: fn() -> Result<()>| {
                with_panic_advice(&config, BackendKind::Cuda, || {
                    run_peers::<burn::backend::NdArray, _, _>(2, Duration::from_secs(60), |r, _| {
                        match r.rank {
                            1 => fail(),
                            _ => Ok(()),
                        }
                    })
                })
                .unwrap_err()
                .to_string()
            };
        let e = peers(|| panic!("CUDA_ERROR_OUT_OF_MEMORY: out of memory"));
        assert!(
            e.starts_with("peer 1: out of cuda memory training preset tiny"),
            "{e}"
        );
        assert!(e.ends_with("The device said: CUDA_ERROR_OUT_OF_MEMORY: out of memory"));
        let e = peers(|| panic!("index out of bounds"));
        assert_eq!(e, "data-parallel training stopped: peer 1 failed");
        let e = peers(|| bail!("out of memory, but not a panic"));
        assert_eq!(e, "data-parallel training stopped: peer 1 failed");
    }

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
