#!/usr/bin/env bash
# Runs on the GPU machine (CUDA, PyTorch, no Rust, no network), from the repository
# root, with .gpu/ from scripts/gpu-bundle.sh carried along. One call does what a GPU
# session needs first, in order of importance, each step logged to $OUT (or ./gpu-out):
#
#   0. a quick bf16 check-backend that ends the session within about a minute when
#      the CUDA path is broken
#   1. mixlm check-backend --backend cuda, f32 and bf16 (kernels, training vs the
#      CPU, the data-parallel paths); the nccl binary's check (the NCCL path)
#   2. the benchmark against PyTorch with the data-parallel paths' cost
#      (scripts/bench_gpu.py --collective), pythia-160m then pythia-1b
#
# Usage: scripts/gpu-session.sh [--quick] [--bench-only] [extra bench_gpu.py options]
#   --quick: check-backend --quick and pythia-160m only (when device time is short)
#   --bench-only: skip the checks (a second call, e.g. with --presets pythia-1b;
#                 later bench_gpu.py options override earlier ones)
# A device call lasts at most 10 minutes: the whole sequence may need two or three
# (first --quick, then --bench-only --presets pythia-1b, ...).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out="${OUT:-gpu-out}"
mkdir -p "$out" /tmp/mixlm-bin
quick=""
bench_only=""
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick=1; shift ;;
    --bench-only) bench_only=1; shift ;;
    *) break ;;
  esac
done

for name in mixlm mixlm-nccl; do
  if [ -f ".gpu/$name.xz" ]; then
    # xz, or Python's lzma where xz is not installed.
    { xz -dc ".gpu/$name.xz" 2>/dev/null || python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), sys.stdout.buffer)' ".gpu/$name.xz"; } \
      > "/tmp/mixlm-bin/$name" && chmod +x "/tmp/mixlm-bin/$name"
  fi
done
[ -x /tmp/mixlm-bin/mixlm ] || { echo "no .gpu/mixlm.xz: run scripts/gpu-bundle.sh first and carry .gpu" >&2; exit 2; }
nccl=()
[ -x /tmp/mixlm-bin/mixlm-nccl ] && nccl=(--nccl-mixlm /tmp/mixlm-bin/mixlm-nccl)

{
  echo "commit $(cat .gpu/COMMIT 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  date -u
} | tee "$out/device.txt"

export PYTHONUNBUFFERED=1
presets="pythia-160m,pythia-1b"
check=()
if [ -n "$quick" ]; then presets="pythia-160m"; check=(--quick); fi

# 0. Fail fast: a broken CUDA path (no CUDA toolkit for NVRTC, a kernel the driver
#    refuses, training that disagrees with the CPU) ends the session here, within
#    about a minute, instead of minutes into the benchmark.
if [ -z "$bench_only" ]; then
  echo "CUDA_PATH=${CUDA_PATH:-unset}; nvcc: $(command -v nvcc || echo none); /usr/local/cuda: $([ -d /usr/local/cuda ] && echo yes || echo no)" \
    | tee "$out/check-quick.txt"
  if ! timeout 100 /tmp/mixlm-bin/mixlm check-backend --backend cuda --precision bf16 --quick \
      2>&1 | tee -a "$out/check-quick.txt"; then
    echo "FAILED: the quick CUDA check (bf16) failed or ran past 100 s; see $out/check-quick.txt." >&2
    echo "cubecl-cuda compiles kernels with NVRTC and needs CUDA's headers: CUDA_PATH, /usr/local/cuda or /opt/cuda." >&2
    exit 1
  fi
fi

# 1. The checks (bench_gpu.py's --check runs them, and the nccl binary's with it, but
#    with --quick the long shapes are skipped, so they are run here directly).
for prec in f32 bf16; do
  [ -n "$bench_only" ] && break
  /tmp/mixlm-bin/mixlm check-backend --backend cuda --precision "$prec" "${check[@]}" \
    2>&1 | tee "$out/check-cuda-$prec.txt"
done
if [ ${#nccl[@]} -gt 0 ] && [ -z "$bench_only" ]; then
  python3 - <<'EOF'
import os, sys
sys.path.insert(0, "scripts")
import bench_gpu
bench_gpu.use_pip_nccl()
print(os.environ.get("LD_LIBRARY_PATH", ""), file=open("/tmp/mixlm-bin/ld_library_path", "w"))
EOF
  LD_LIBRARY_PATH="$(cat /tmp/mixlm-bin/ld_library_path)" /tmp/mixlm-bin/mixlm-nccl \
    check-backend --backend cuda --precision bf16 --quick 2>&1 | tee "$out/check-nccl-bf16.txt"
fi

# 2. The benchmark, with the data-parallel paths' cost.
python3 scripts/bench_gpu.py --mixlm /tmp/mixlm-bin/mixlm "${nccl[@]}" --presets "$presets" \
  --collective --out "$out/bench-gpu.json" "$@" 2>&1 | tee "$out/bench.txt"
