//! A CUDA device that exists only as its properties and a recorder: a CubeCL
//! [`Runtime`] whose compiler is cubecl-cuda's (`CppCompiler<CudaDialect<CudaWmmaCompiler>>`,
//! the type `cubecl_cuda::CudaCompiler` names without the `ptx-wmma` feature, which
//! burn-cuda leaves off) and whose server holds the properties cubecl-cuda would read
//! from an A100 (`sm_80`) or H100/H200 (`sm_90`). Kernels are defined and compiled
//! through it exactly as on the device; it allocates and runs nothing, and records
//! every kernel launched on it ([`take_launched`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use cubecl::prelude::*;
use cubecl::server::{
    Binding, ComputeServer, CopyDescriptor, KernelArguments, ProfileError, ProfilingToken,
    ServerCommunication, ServerError, ServerUtilities,
};
use cubecl::CubeTask;
use cubecl_common::backtrace::BackTrace;
use cubecl_common::bytes::Bytes;
use cubecl_common::device::{Device, DeviceId, DeviceService, ServerUtilitiesHandle};
use cubecl_common::future::DynFut;
use cubecl_common::profile::{ProfileDuration, TimingMethod};
use cubecl_common::stream_id::StreamId;
use cubecl_cpp::cuda::arch::CudaArchitecture;
use cubecl_cpp::cuda::mma::{contiguous_elements_cuda, CudaWmmaCompiler};
use cubecl_cpp::cuda::CudaDialect;
use cubecl_cpp::register_supported_types;
use cubecl_cpp::shared::{
    register_mma_features, register_scaled_mma_features, register_wmma_features,
    CompilationOptions, CppCompiler, CppSupportedFeatures, DialectWmmaCompiler,
};
use cubecl_ir::features::{AtomicUsage, Plane, Tma, TypeUsage};
use cubecl_ir::{
    BarrierLevel, ContiguousElements, DeviceProperties, ElemType, FloatKind, HardwareProperties,
    MatrixLayout, MemoryDeviceProperties, MmaProperties, OpaqueType, SemanticType,
    TargetProperties, Type, VectorSize,
};
use cubecl_runtime::allocator::PitchedMemoryLayoutPolicy;
use cubecl_runtime::id::KernelId;
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

    /// The properties cubecl-cuda 0.10 reads from an A100 or H100 (`runtime.rs`,
    /// `DeviceService::init`), as it sets them for compute capability 8.0 and 9.0:
    /// the kernels choose tile shapes, tensor-core instructions, `cp.async` and TMA from
    /// these, so Burn's matmul picks the candidates it would on the device.
    fn properties(self) -> DeviceProperties {
        let v = self.version;
        let cuda_arch = CudaArchitecture { version: v };
        let wmma = CudaWmmaCompiler::supported_wmma_combinations(&cuda_arch);
        let mma = CudaWmmaCompiler::supported_mma_combinations(&cuda_arch);
        let scaled_mma = CudaWmmaCompiler::supported_scaled_mma_combinations(&cuda_arch);
        let hardware = HardwareProperties {
            load_width: 128,
            plane_size_min: 32,
            plane_size_max: 32,
            max_bindings: 1024,
            max_shared_memory_size: self.max_shared_memory_per_block(),
            max_cube_count: (i32::MAX as u32, u16::MAX as u32, u16::MAX as u32),
            max_units_per_cube: 1024,
            max_cube_dim: (1024, 1024, 64),
            num_streaming_multiprocessors: Some(if v >= 90 { 132 } else { 108 }),
            num_tensor_cores: Some(4),
            min_tensor_cores_dim: (!wmma.is_empty()).then_some(8),
            num_cpu_cores: None,
            max_vector_size: VectorSize::MAX,
        };
        // cubecl-cuda: a quarter of the device's memory (80 GB) per page.
        let memory = MemoryDeviceProperties {
            max_page_size: 20 << 30,
            alignment: 512,
        };
        let mut props =
            DeviceProperties::new(Default::default(), memory, hardware, TimingMethod::System);
        register_supported_types(&mut props);
        props.register_type_usage(ElemType::Float(FloatKind::TF32), TypeUsage::Conversion);
        let atomic = |elem: FloatKind, vector: usize| {
            Type::new(StorageType::Atomic(ElemType::Float(elem))).with_vector_size(vector)
        };
        props.register_atomic_type_usage(
            atomic(FloatKind::F64, 1),
            AtomicUsage::Add | AtomicUsage::LoadStore,
        );
        for vector in [1, 2] {
            props.register_atomic_type_usage(
                atomic(FloatKind::F16, vector),
                AtomicUsage::Add | AtomicUsage::LoadStore,
            );
        }
        props.register_semantic_type(SemanticType::Pipeline);
        props.register_type_usage(OpaqueType::Barrier(BarrierLevel::Unit), TypeUsage::Buffer);
        props.register_type_usage(OpaqueType::Barrier(BarrierLevel::Cube), TypeUsage::Buffer);
        props.features.plane.insert(Plane::Sync);
        for half in [FloatKind::F16, FloatKind::BF16] {
            props
                .features
                .matmul
                .ldmatrix
                .insert(ElemType::Float(half).into());
        }
        props.features.copy_async = true;
        if v >= 89 {
            for fp8 in [FloatKind::E4M3, FloatKind::E5M2] {
                props.register_type_usage(
                    ElemType::Float(fp8),
                    TypeUsage::Conversion | TypeUsage::Buffer,
                );
            }
        }
        if v >= 90 {
            props.features.tma.insert(Tma::Base);
            props.register_semantic_type(SemanticType::TensorMap);
            props.features.cube_cluster = true;
            for half in [FloatKind::F16, FloatKind::BF16] {
                props
                    .features
                    .matmul
                    .stmatrix
                    .insert(ElemType::Float(half).into());
            }
            for vector in [2, 4] {
                props.register_atomic_type_usage(
                    atomic(FloatKind::F32, vector),
                    AtomicUsage::LoadStore | AtomicUsage::Add,
                );
            }
        }
        props.features.memory_reinterpret = true;
        props.features.alignment = true;
        props.features.plane.insert(Plane::Ops);
        props.features.plane.insert(Plane::NonUniformControlFlow);
        register_wmma_features(wmma, &mut props);
        register_mma_features(mma, &mut props);
        register_scaled_mma_features(scaled_mma, &mut props);
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

/// A kernel some launch on [`CudaTarget`] asked for, compiled to CUDA C++ at the launch
/// as cubecl-cuda compiles it there: Burn's own kernels (matmul candidates, fused
/// element-wise and reductions) exist only as such launches.
pub struct Launched {
    /// The kernel's Rust type.
    pub name: &'static str,
    pub mode: ExecutionMode,
    /// The source, or why there is none: the compiler's error, or the panic message
    /// of the kernel's expansion (on a device the runner catches that panic and the
    /// launch does nothing).
    pub source: Result<CudaSource, String>,
}

/// Every distinct kernel launched on any [`CudaTarget`] since the last [`take_launched`],
/// in launch order.
static LAUNCHED: Mutex<Vec<(KernelId, Launched)>> = Mutex::new(Vec::new());

/// The distinct kernels launched since the last call, in launch order.
pub fn take_launched() -> Vec<Launched> {
    let mut launched = LAUNCHED.lock().unwrap_or_else(|e| e.into_inner());
    std::mem::take(&mut *launched)
        .into_iter()
        .map(|(_, l)| l)
        .collect()
}

/// The text of a panic's payload.
pub fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "a panic without a message".into())
}

/// The server of [`CudaTarget`]: the device's properties, and a recorder where a
/// device would run things. Memory is never allocated (reads give zeros of the
/// requested size), a launch records its kernel instead of running it, and a profile
/// measures the host's clock, so that autotuning runs every candidate once and keeps
/// whichever came first. What comes out of a "run" is therefore meaningless; what
/// it launched is what the same program launches on the device.
#[derive(Debug)]
pub struct Recorder {
    arch: Arch,
    utilities: Arc<ServerUtilities<Self>>,
    profiles: HashMap<u64, Instant>,
    next_profile: u64,
}

impl DeviceService for Recorder {
    fn init(id: DeviceId) -> Self {
        let arch = Arch::from_id(id);
        let props = arch.properties();
        let policy = PitchedMemoryLayoutPolicy::new(props.memory.alignment as usize);
        let logger = Arc::new(ServerLogger::default());
        Self {
            arch,
            utilities: Arc::new(ServerUtilities::new(props, logger, (), policy)),
            profiles: HashMap::new(),
            next_profile: 0,
        }
    }

    fn utilities(&self) -> ServerUtilitiesHandle {
        self.utilities.clone() as ServerUtilitiesHandle
    }
}

impl ServerCommunication for Recorder {
    const SERVER_COMM_ENABLED: bool = false;
}

impl ComputeServer for Recorder {
    type Kernel = Box<dyn CubeTask<CudaCompiler>>;
    type Info = ();
    type MemoryLayoutPolicy = PitchedMemoryLayoutPolicy;
    type Storage = BytesStorage;

    fn initialize_memory(&mut self, _: ManagedMemoryHandle, _: u64, _: StreamId) {}
    fn logger(&self) -> Arc<ServerLogger> {
        self.utilities.logger.clone()
    }
    fn utilities(&self) -> Arc<ServerUtilities<Self>> {
        self.utilities.clone()
    }
    fn read(
        &mut self,
        descriptors: Vec<CopyDescriptor>,
        _: StreamId,
    ) -> DynFut<Result<Vec<Bytes>, ServerError>> {
        let zeros = descriptors
            .iter()
            .map(|d| {
                Bytes::from_bytes_vec(vec![0; d.shape.iter().product::<usize>() * d.elem_size])
            })
            .collect();
        Box::pin(async move { Ok(zeros) })
    }
    fn write(&mut self, _: Vec<(CopyDescriptor, Bytes)>, _: StreamId) {}
    fn sync(&mut self, _: StreamId) -> DynFut<Result<(), ServerError>> {
        Box::pin(async { Ok(()) })
    }
    fn get_resource(
        &mut self,
        _: Binding,
        _: StreamId,
    ) -> Result<ManagedResource<BytesResource>, ServerError> {
        Err(ServerError::Generic {
            reason: "the CUDA target of mixlm-kernel-check holds no memory".into(),
            backtrace: BackTrace::capture(),
        })
    }
    unsafe fn launch(
        &mut self,
        kernel: Self::Kernel,
        _: CubeCount,
        _: KernelArguments,
        mode: ExecutionMode,
        _: StreamId,
    ) {
        let id = kernel.id();
        if LAUNCHED
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|(seen, _)| *seen == id)
        {
            return;
        }
        // Compiled here, as cubecl-cuda does at a launch; a panic in the kernel's
        // expansion is recorded and then goes on, to whoever catches it on a device.
        let compiled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            cuda_source(kernel.as_ref(), self.arch, mode)
        }));
        let (source, panic) = match compiled {
            Ok(source) => (source.map_err(|e| format!("{e:#}")), None),
            Err(payload) => (
                Err(format!("expansion panicked: {}", panic_text(&*payload))),
                Some(payload),
            ),
        };
        let name = kernel.name();
        LAUNCHED
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((id, Launched { name, mode, source }));
        if let Some(payload) = panic {
            std::panic::resume_unwind(payload);
        }
    }
    fn flush(&mut self, _: StreamId) -> Result<(), ServerError> {
        Ok(())
    }
    fn memory_usage(&mut self, _: StreamId) -> Result<MemoryUsage, ServerError> {
        Ok(MemoryUsage {
            number_allocs: 0,
            bytes_in_use: 0,
            bytes_padding: 0,
            bytes_reserved: 0,
        })
    }
    fn memory_cleanup(&mut self, _: StreamId) {}
    fn start_profile(&mut self, _: StreamId) -> Result<ProfilingToken, ServerError> {
        self.next_profile += 1;
        self.profiles.insert(self.next_profile, Instant::now());
        Ok(ProfilingToken {
            id: self.next_profile,
        })
    }
    fn end_profile(
        &mut self,
        _: StreamId,
        token: ProfilingToken,
    ) -> Result<ProfileDuration, ProfileError> {
        let start = self.profiles.remove(&token.id).unwrap_or_else(Instant::now);
        Ok(ProfileDuration::new_system_time(start, Instant::now()))
    }
    fn allocation_mode(&mut self, _: MemoryAllocationMode, _: StreamId) {}
}

/// The runtime of a CUDA device that is only compiled for.
#[derive(Debug, Clone)]
pub struct CudaTarget;

impl Runtime for CudaTarget {
    type Compiler = CudaCompiler;
    type Server = Recorder;
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
    fn can_read_tensor(shape: &cubecl::zspace::Shape, strides: &cubecl::zspace::Strides) -> bool {
        cubecl::zspace::striding::has_pitched_row_major_strides(shape, strides)
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
    /// Units (threads) per cube (block).
    pub block: u32,
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
        block: compiled.cube_dim.num_elems(),
    })
}
