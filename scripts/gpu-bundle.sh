#!/usr/bin/env bash
# Builds what a GPU machine without Rust needs, here: two release binaries, stripped
# and xz-compressed into .gpu/ (git-ignored), small enough to travel with the working
# tree (the device tool carries at most 64 MiB; a stripped binary is ~90 MB, ~20 MB
# compressed).
#
#   .gpu/mixlm.xz        --features cuda   (cpu, wgpu and cuda backends)
#   .gpu/mixlm-nccl.xz   --features nccl   (wgpu and cuda; gradients through NCCL
#                                           during backward; no cpu backend)
#
# Then, on the GPU machine, from the repository root (see scripts/gpu-session.sh):
#   scripts/gpu-session.sh            # unpack, check-backend, benchmark, logs in $OUT
#
# Usage: scripts/gpu-bundle.sh [--only cuda|nccl]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

only="${2:-}"
[ "${1:-}" = "--only" ] || only=""
mkdir -p .gpu
for variant in cuda nccl; do
  [ -n "$only" ] && [ "$only" != "$variant" ] && continue
  name=mixlm
  [ "$variant" = nccl ] && name=mixlm-nccl
  echo "== building $name (--features $variant)" >&2
  cargo build --release --quiet -p mixlm-cli --features "$variant"
  strip -o ".gpu/$name" target/release/mixlm
  xz -T0 -6 -f ".gpu/$name"
  echo "   .gpu/$name.xz: $(du -h ".gpu/$name.xz" | cut -f1) ($(git rev-parse --short HEAD)$(git diff --quiet || echo +changes))" >&2
done
git rev-parse HEAD > .gpu/COMMIT
du -ch .gpu/*.xz | tail -1 >&2
