//! A CUDA device that exists only as its properties: a CubeCL [`Runtime`] whose compiler
//! is cubecl-cuda's (`CppCompiler<CudaDialect<CudaWmmaCompiler>>`, the type
//! `cubecl_cuda::CudaCompiler` names without the `ptx-wmma` feature, which burn-cuda
//! leaves off) and whose server holds the properties cubecl-cuda would read from an
//! A100 (`sm_80`) or H100/H200 (`sm_90`). Kernels are defined and compiled through it
//! exactly as on the device; it cannot allocate or run anything.

use std::sync::Arc;

use cubecl::prelude::*;
use cubecl::server::{
    Binding, ComputeServer, CopyDescriptor, KernelArguments, ProfileError, ProfilingToken,
    ServerCommunication, ServerError, ServerUtilities,
};
use cubecl::CubeTask;
use cubecl_common::bytes::Bytes;
use cubecl_common::device::{Device, DeviceId, DeviceService, ServerUtilitiesHandle};
use cubecl_common::future::DynFut;
use cubecl_common::profile::{ProfileDuration, TimingMethod};
use cubecl_common::stream_id::StreamId;
use cubecl_cpp::cuda::mma::{contiguous_elements_cuda, CudaWmmaCompiler};
use cubecl_cpp::cuda::CudaDialect;
use cubecl_cpp::register_supported_types;
use cubecl_cpp::shared::{CompilationOptions, CppCompiler, CppSupportedFeatures};
use cubecl_ir::features::Plane;
use cubecl_ir::{
    ContiguousElements, DeviceProperties, HardwareProperties, MatrixLayout, MemoryDeviceProperties,
    MmaProperties, TargetProperties, VectorSize,
};
use cubecl_runtime::allocator::ContiguousMemoryLayoutPolicy;
use cubecl_runtime::logging::ServerLogger;
use cubecl_runtime::memory_management::{ManagedMemoryHandle, MemoryAllocationMode, MemoryUsage};
use cubecl_runtime::storage::{BytesResource, BytesStorage, ManagedResource};

use crate::occupancy::Sm;

/// The compiler cubecl-cuda uses (cubecl-cuda 0.10 `runtime.rs`, `CudaCompiler`).
pub type CudaCompiler = CppCompiler<CudaDialect<CudaWmmaCompiler>>;

/// A GPU generation the kernels are compiled for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Arch {
    /// Compute capability times ten: 80 (A100), 90 (H100, H200).
    pub version: u32,
}

impl Arch {
    pub const SM80: Arch = Arch { version: 80 };
    pub const SM90: Arch = Arch { version: 90 };

    /// What NVRTC is asked for. cubecl-cuda asks for the architecture-specific
    /// `sm_90a` from compute capability 9.0 on (`context.rs`, `compile_kernel`).
    pub fn nvrtc_name(self) -> String {
        match self.version >= 90 {
            true => format!("sm_{}a", self.version),
            false => format!("sm_{}", self.version),
        }
    }

    /// Shared memory one block may use (bytes, with the opt-in carve-out cubecl-cuda
    /// reads as the device's maximum): the SM's, as [`Sm`] gives it.
    pub fn max_shared_memory_per_block(self) -> usize {
        Sm::of(self).max_shared_memory_per_block as usize
    }

    /// The options cubecl-cuda compiles with on this architecture (cubecl-cuda 0.10
    /// `runtime.rs`, `create_client`): fast math always; grid constants from 7.0; the
    /// fast `tanh` from 7.5 with CUDA 12.8 or later; clusters and `elect.sync` from 9.0.
    pub fn compilation_options(self) -> CompilationOptions {
        let v = self.version;
        CompilationOptions {
            warp_size: 32,
            supports_features: CppSupportedFeatures {
                fast_math: true,
                grid_constants: v >= 70,
                fast_tanh: v >= 75,
                clusters: v >= 90,
                elect_sync: v >= 90,
            },
        }
    }

    /// The device properties kernels may consult when they are defined (the row block
    /// the attention kernels pick comes from `max_shared_memory_size`).
    fn properties(self) -> DeviceProperties {
        let hardware = HardwareProperties {
            load_width: 128,
            plane_size_min: 32,
            plane_size_max: 32,
            max_bindings: 1024,
            max_shared_memory_size: self.max_shared_memory_per_block(),
            max_cube_count: (i32::MAX as u32, u16::MAX as u32, u16::MAX as u32),
            max_units_per_cube: 1024,
            max_cube_dim: (1024, 1024, 64),
            num_streaming_multiprocessors: Some(if self.version >= 90 { 132 } else { 108 }),
            num_tensor_cores: Some(4),
            min_tensor_cores_dim: Some(8),
            num_cpu_cores: None,
            max_vector_size: VectorSize::MAX,
        };
        let memory = MemoryDeviceProperties {
            max_page_size: 20 << 30,
            alignment: 512,
        };
        let mut props =
            DeviceProperties::new(Default::default(), memory, hardware, TimingMethod::System);
        register_supported_types(&mut props);
        // Plane (warp) operations, with divergent control flow; plane sync from 7.0.
        props.features.plane.insert(Plane::Ops);
        props.features.plane.insert(Plane::NonUniformControlFlow);
        if self.version >= 70 {
            props.features.plane.insert(Plane::Sync);
        }
        props.features.memory_reinterpret = true;
        props.features.alignment = true;
        props
    }
}

impl Device for Arch {
    fn from_id(id: DeviceId) -> Self {
        Arch {
            version: id.index_id as u32,
        }
    }

    fn to_id(&self) -> DeviceId {
        DeviceId {
            type_id: 0,
            index_id: self.version as u16,
        }
    }
}

impl Default for Arch {
    fn default() -> Self {
        Arch::SM90
    }
}

/// The server of [`CudaTarget`]: its properties and nothing else.
#[derive(Debug)]
pub struct PropertiesOnly {
    utilities: Arc<ServerUtilities<Self>>,
}

impl DeviceService for PropertiesOnly {
    fn init(id: DeviceId) -> Self {
        let props = Arch::from_id(id).properties();
        let policy = ContiguousMemoryLayoutPolicy::new(props.memory.alignment as usize);
        let logger = Arc::new(ServerLogger::default());
        Self {
            utilities: Arc::new(ServerUtilities::new(props, logger, (), policy)),
        }
    }

    fn utilities(&self) -> ServerUtilitiesHandle {
        self.utilities.clone() as ServerUtilitiesHandle
    }
}

impl ServerCommunication for PropertiesOnly {
    const SERVER_COMM_ENABLED: bool = false;
}

const NO_DEVICE: &str = "the CUDA target of mixlm-kernel-check only compiles kernels";

impl ComputeServer for PropertiesOnly {
    type Kernel = Box<dyn CubeTask<CudaCompiler>>;
    type Info = ();
    type MemoryLayoutPolicy = ContiguousMemoryLayoutPolicy;
    type Storage = BytesStorage;

    fn initialize_memory(&mut self, _: ManagedMemoryHandle, _: u64, _: StreamId) {
        unimplemented!("{NO_DEVICE}")
    }
    fn logger(&self) -> Arc<ServerLogger> {
        self.utilities.logger.clone()
    }
    fn utilities(&self) -> Arc<ServerUtilities<Self>> {
        self.utilities.clone()
    }
    fn read(
        &mut self,
        _: Vec<CopyDescriptor>,
        _: StreamId,
    ) -> DynFut<Result<Vec<Bytes>, ServerError>> {
        unimplemented!("{NO_DEVICE}")
    }
    fn write(&mut self, _: Vec<(CopyDescriptor, Bytes)>, _: StreamId) {
        unimplemented!("{NO_DEVICE}")
    }
    fn sync(&mut self, _: StreamId) -> DynFut<Result<(), ServerError>> {
        unimplemented!("{NO_DEVICE}")
    }
    fn get_resource(
        &mut self,
        _: Binding,
        _: StreamId,
    ) -> Result<ManagedResource<BytesResource>, ServerError> {
        unimplemented!("{NO_DEVICE}")
    }
    unsafe fn launch(
        &mut self,
        _: Self::Kernel,
        _: CubeCount,
        _: KernelArguments,
        _: ExecutionMode,
        _: StreamId,
    ) {
        unimplemented!("{NO_DEVICE}")
    }
    fn flush(&mut self, _: StreamId) -> Result<(), ServerError> {
        Ok(())
    }
    fn memory_usage(&mut self, _: StreamId) -> Result<MemoryUsage, ServerError> {
        unimplemented!("{NO_DEVICE}")
    }
    fn memory_cleanup(&mut self, _: StreamId) {}
    fn start_profile(&mut self, _: StreamId) -> Result<ProfilingToken, ServerError> {
        unimplemented!("{NO_DEVICE}")
    }
    fn end_profile(
        &mut self,
        _: StreamId,
        _: ProfilingToken,
    ) -> Result<ProfileDuration, ProfileError> {
        unimplemented!("{NO_DEVICE}")
    }
    fn allocation_mode(&mut self, _: MemoryAllocationMode, _: StreamId) {}
}

/// The runtime of a CUDA device that is only compiled for.
#[derive(Debug, Clone)]
pub struct CudaTarget;

impl Runtime for CudaTarget {
    type Compiler = CudaCompiler;
    type Server = PropertiesOnly;
    type Device = Arch;

    fn client(device: &Self::Device) -> ComputeClient<Self> {
        ComputeClient::load(device)
    }
    fn name(_: &ComputeClient<Self>) -> &'static str {
        "cuda"
    }
    fn require_array_lengths() -> bool {
        true
    }
    fn max_cube_count() -> (u32, u32, u32) {
        (i32::MAX as u32, u16::MAX as u32, u16::MAX as u32)
    }
    fn can_read_tensor(_: &cubecl::zspace::Shape, _: &cubecl::zspace::Strides) -> bool {
        true
    }
    /// CUDA's matrix-fragment layout, as cubecl-cuda declares it (`runtime.rs`,
    /// `target_properties`); only kernels with tensor-core fragments read it.
    fn target_properties() -> TargetProperties {
        TargetProperties {
            mma: MmaProperties {
                register_size_bits: 32,
                const_plane_size: 32,
                register_layout_a: MatrixLayout::RowMajor,
                register_layout_b: MatrixLayout::ColMajor,
                register_layout_acc: MatrixLayout::RowMajor,
                register_duplication_a: 1,
                register_duplication_b: 1,
                register_duplication_acc: 1,
                contiguous_elements: ContiguousElements::new(contiguous_elements_cuda),
            },
        }
    }
    fn enumerate_devices(_: u16, _: &()) -> Vec<DeviceId> {
        Vec::new()
    }
}

/// A kernel's CUDA C++, as cubecl-cuda hands it to NVRTC.
#[derive(Debug, Clone)]
pub struct CudaSource {
    pub entrypoint: String,
    pub source: String,
    /// Shared memory the launch allocates (bytes): cubecl sizes it dynamically, so
    /// ptxas does not see it.
    pub shared_memory: usize,
}

/// Compiles `task` for `arch` as cubecl-cuda does (`compile_kernel`: the task's own
/// address type, `mode` as the launch chose it). The macro's `launch` runs kernels
/// checked, bounds checks included.
pub fn cuda_source(
    task: &dyn CubeTask<CudaCompiler>,
    arch: Arch,
    mode: ExecutionMode,
) -> anyhow::Result<CudaSource> {
    let compiled = task
        .compile(
            &mut Default::default(),
            &arch.compilation_options(),
            mode,
            task.address_type(),
        )
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let shared_memory = compiled.repr.as_ref().map_or(0, |r| r.shared_memory_size());
    Ok(CudaSource {
        entrypoint: compiled.entrypoint_name,
        source: compiled.source,
        shared_memory,
    })
}
