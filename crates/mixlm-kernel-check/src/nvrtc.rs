//! CUDA C++ to PTX with NVRTC, as cubecl-cuda calls it (`context.rs`,
//! `compile_kernel`): the architecture, the toolkit's include folders and `-lineinfo`,
//! nothing else. NVRTC is loaded at run time (cudarc); it needs no driver and no GPU.

use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use cudarc::nvrtc::result as nvrtc;

use crate::target::Arch;

/// Where the CUDA headers and `ptxas` are: a CUDA toolkit (`/usr/local/cuda`), or the
/// `nvidia` folder of a pip install of NVIDIA's wheels (`nvidia-cuda-nvrtc`,
/// `nvidia-cuda-nvcc`, `nvidia-cuda-runtime`), whose headers and tools sit in one
/// subfolder per package (CUDA 12: `cuda_runtime/include`, `cuda_nvcc/bin`) or in
/// `cu13/` (CUDA 13).
#[derive(Debug, Clone)]
pub struct Toolkit {
    pub include: Vec<PathBuf>,
    pub ptxas: PathBuf,
}

impl Toolkit {
    /// The toolkit under `root`, or a message saying what is missing there.
    pub fn find(root: &Path) -> Result<Toolkit> {
        let candidates = [
            (root.join("include"), root.join("bin/ptxas")),
            (root.join("cu13/include"), root.join("cu13/bin/ptxas")),
            (
                root.join("cuda_runtime/include"),
                root.join("cuda_nvcc/bin/ptxas"),
            ),
        ];
        for (include, ptxas) in candidates {
            if include.join("cuda_runtime.h").is_file() && ptxas.is_file() {
                // cubecl-cuda adds `include/cccl` when it exists (CUDA 13 moved the
                // C++ core libraries there).
                let cccl = include.join("cccl");
                let mut include = vec![include];
                if cccl.is_dir() {
                    include.push(cccl);
                }
                return Ok(Toolkit { include, ptxas });
            }
        }
        bail!(
            "{}: no CUDA headers (include/cuda_runtime.h) and ptxas (bin/ptxas) there; give a \
             CUDA toolkit folder or the `nvidia` folder of `pip install nvidia-cuda-nvrtc \
             nvidia-cuda-nvcc nvidia-cuda-runtime` (scripts/cuda-kernels.sh installs them)",
            root.display()
        )
    }
}

/// Whether libnvrtc can be loaded (from the library path).
pub fn available() -> bool {
    // SAFETY: only tries to open the library.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// NVRTC's version, `(major, minor)`.
pub fn version() -> Result<(i32, i32)> {
    let (mut major, mut minor) = (0, 0);
    // SAFETY: two out-pointers to live integers.
    unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| anyhow::anyhow!("nvrtcVersion: {e:?}"))?;
    Ok((major, minor))
}

/// The options cubecl-cuda passes for `arch`.
pub fn options(arch: Arch, toolkit: &Toolkit) -> Vec<String> {
    let mut options = vec![format!("--gpu-architecture={}", arch.nvrtc_name())];
    options.extend(
        toolkit
            .include
            .iter()
            .map(|dir| format!("--include-path={}", dir.display())),
    );
    options.push("-lineinfo".into());
    options
}

/// `source` compiled to PTX for `arch`; on failure, NVRTC's log.
pub fn compile(source: &str, name: &str, arch: Arch, toolkit: &Toolkit) -> Result<String> {
    if !available() {
        bail!(
            "libnvrtc cannot be loaded: put the folder holding libnvrtc.so on LD_LIBRARY_PATH \
             (scripts/cuda-kernels.sh does)"
        );
    }
    let src = CString::new(source).context("the kernel source holds a NUL byte")?;
    let file = CString::new(format!("{name}.cu"))?;
    let program = nvrtc::create_program(&src, Some(&file))
        .map_err(|e| anyhow::anyhow!("nvrtcCreateProgram: {e:?}"))?;
    // SAFETY: `program` was created above and is destroyed once, at the end.
    unsafe {
        let compiled = nvrtc::compile_program(program, &options(arch, toolkit));
        let log = c_text(nvrtc::get_program_log(program));
        let ptx = compiled.map(|_| c_text(nvrtc::get_ptx(program)));
        let _ = nvrtc::destroy_program(program);
        match ptx {
            Ok(ptx) => Ok(ptx),
            Err(e) => bail!("NVRTC failed ({e:?}) for {}:\n{log}", arch.nvrtc_name()),
        }
    }
}

fn c_text(bytes: Result<Vec<std::ffi::c_char>, cudarc::nvrtc::result::NvrtcError>) -> String {
    bytes
        .ok()
        .and_then(|b| {
            let bytes: Vec<u8> = b.into_iter().map(|c| c as u8).collect();
            CStr::from_bytes_until_nul(&bytes)
                .ok()
                .map(|s| s.to_string_lossy().into_owned())
        })
        .unwrap_or_default()
}
