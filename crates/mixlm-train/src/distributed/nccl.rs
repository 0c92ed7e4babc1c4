//! Gradients all-reduced by Burn's `distributed` engine (NCCL) during the backward
//! pass, on CUDA builds with the `nccl` feature; the other builds refuse such a run.

#[cfg(not(feature = "nccl"))]
use anyhow::bail;
use anyhow::Result;
use burn::module::AutodiffModule;
#[cfg(feature = "nccl")]
use burn::module::{ModuleMapper, Param};
use burn::tensor::backend::AutodiffBackend;
#[cfg(feature = "nccl")]
use burn::tensor::Tensor;

/// Whether this build all-reduces gradients through NCCL during the backward pass
/// (the `nccl` feature): what `communication = "nccl"` needs.
pub const NCCL_BUILD: bool = cfg!(feature = "nccl");

/// Marks every parameter of `model` for Burn's `distributed` engine: a backward pass
/// through the marked model all-reduces (averages over the peers) each parameter's
/// gradient through NCCL as soon as it is complete, while the rest of the backward
/// runs. The mark lives on the parameter tensors: mark the model each step, after the
/// optimizer replaced them.
#[cfg(feature = "nccl")]
pub fn mark_for_all_reduce<AB: AutodiffBackend, M: AutodiffModule<AB>>(model: M) -> M {
    use burn::tensor::backend::distributed::DistributedParamId;
    struct Mark;
    impl<AB: AutodiffBackend> ModuleMapper<AB> for Mark {
        fn map_float<const D: usize>(
            &mut self,
            param: Param<Tensor<AB, D>>,
        ) -> Param<Tensor<AB, D>> {
            let id = DistributedParamId::from(param.id.val());
            param.map(|t| t.set_distributed(id))
        }
    }
    model.map(&mut Mark)
}

/// Without the `nccl` build there is no engine to mark parameters for
/// ([`GradSyncServer::start`] refuses such a run before any step).
#[cfg(not(feature = "nccl"))]
pub fn mark_for_all_reduce<AB: AutodiffBackend, M: AutodiffModule<AB>>(_model: M) -> M {
    unreachable!("communication = \"nccl\" is refused by builds without the nccl feature")
}

/// Burn's per-process server that pairs the peers' gradients for NCCL (the `nccl`
/// communication); stopped when dropped, so the next run starts a fresh one.
pub struct GradSyncServer<B: mixlm_model::AutodiffInner> {
    device: B::Device,
}

impl<B: mixlm_model::AutodiffInner> GradSyncServer<B> {
    /// Starts the server for one peer per device of `devices`.
    pub fn start(devices: &[B::Device]) -> Result<Self> {
        #[cfg(feature = "nccl")]
        {
            use burn::tensor::backend::distributed::{DistributedConfig, ReduceOperation};
            B::start_communication_server(
                devices,
                DistributedConfig {
                    all_reduce_op: ReduceOperation::Mean,
                },
            );
            Ok(Self {
                device: devices[0].clone(),
            })
        }
        #[cfg(not(feature = "nccl"))]
        {
            let _ = devices;
            bail!(
                "distributed.communication = \"nccl\" needs a mixlm built with the nccl \
                 feature (`cargo build --release -p mixlm-cli --features nccl`); this one was \
                 not. Use communication = \"collective\" with this binary"
            )
        }
    }
}

impl<B: mixlm_model::AutodiffInner> Drop for GradSyncServer<B> {
    fn drop(&mut self) {
        #[cfg(feature = "nccl")]
        B::close_communication_server(&self.device);
        #[cfg(not(feature = "nccl"))]
        let _ = &self.device;
    }
}
