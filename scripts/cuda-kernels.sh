#!/usr/bin/env bash
# Compiles every CubeCL kernel of mixlm for CUDA (sm_80, sm_90) without a GPU and
# prints registers, spills, shared memory and H100/A100 occupancy per kernel
# (crates/mixlm-kernel-check). NVRTC, ptxas and the CUDA headers come from NVIDIA's
# PyPI wheels, installed once into target/cuda-tools. Exits non-zero when a kernel
# fails to compile or assemble. Options go to mixlm-kernel-check (--help), e.g.
#   scripts/cuda-kernels.sh --head-dim 128 --dtype bf16
#   scripts/cuda-kernels.sh --break-kernel forward     # shows a failure
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
tools=target/cuda-tools
# CUDA 13.0: the release of the lent GPU machines (nvcc 13.0, driver 580), whose
# driver JIT-compiles the PTX; a newer NVRTC writes PTX that driver refuses.
cuda_version="13.0.*"
# The C++ core libraries (CCCL: <nv/target>, which Burn's matmul kernels include
# through cooperative_groups) come in their own wheel.
if [ ! -x "$tools/bin/python" ] || ! "$tools/bin/python" -c \
  'import nvidia, os, sys; sys.exit(not os.path.isdir(nvidia.__path__[0] + "/cu13/include/cccl"))' 2>/dev/null; then
  echo "== installing NVRTC, ptxas and the CUDA headers (pip, $cuda_version) into $tools"
  python3 -m venv "$tools"
  "$tools/bin/pip" install --quiet --disable-pip-version-check \
    "nvidia-cuda-nvrtc==$cuda_version" "nvidia-cuda-nvcc==$cuda_version" \
    "nvidia-cuda-runtime==$cuda_version" "nvidia-cuda-cccl==$cuda_version"
fi
nvidia="$("$tools/bin/python" -c 'import nvidia, os; print(os.path.dirname(nvidia.__path__[0] + "/"))')"
cargo build --quiet -p mixlm-kernel-check
LD_LIBRARY_PATH="$nvidia/cu13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
  target/debug/mixlm-kernel-check --cuda "$nvidia" "$@"
