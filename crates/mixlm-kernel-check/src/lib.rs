//! mixlm's CubeCL kernels compiled for CUDA on a machine without a GPU.
//!
//! Each kernel goes the way cubecl-cuda would take it on an A100 or H100: defined for
//! the device ([`target`]: a CubeCL runtime that is only properties), turned into CUDA
//! C++ by cubecl-cpp's CUDA dialect, compiled to PTX by NVRTC with cubecl-cuda's
//! options ([`nvrtc`]), and assembled by `ptxas -v` for its registers, spills and
//! stack ([`ptxas`]). [`occupancy`] turns those and the shared memory into the
//! fraction of an SM's warps that can be resident.
//!
//! Burn's own kernels exist only as launches: [`step`] "runs" a training step of
//! Burn's CUDA backend on the target, whose server records the CUDA source of every
//! kernel launched (autotuning launches each candidate once) instead of running it.
//!
//! What this does not verify: that the kernels compute the right numbers on a GPU
//! (the wgpu tests and `mixlm check-backend` on a device do), the driver's own
//! PTX-to-SASS compile at load time (which ptxas stands in for), and which autotune
//! candidate a device would pick.

pub mod nvrtc;
pub mod occupancy;
pub mod ptxas;
pub mod step;
pub mod target;
