#!/usr/bin/env bash
# Side-by-side training throughput: mixlm against a PyTorch reference (torch.compile,
# SDPA flash attention, bf16 autocast, fused AdamW) on the same GPU, model shape,
# batch and sequence length. Runs on a GPU machine with Python 3, torch and
# transformers; needs no Rust and no network, only a prebuilt binary:
#
#   cargo build --release --features cuda && cp target/release/mixlm dist/   # elsewhere
#   scripts/bench-gpu.sh --mixlm dist/mixlm                     # pythia-160m and pythia-1b, seq 2048
#   scripts/bench-gpu.sh --mixlm dist/mixlm --presets pythia-160m --mixing odm
#
# Every option of scripts/bench_gpu.py passes through (--help lists them). Record
# the table it prints in benches/RESULTS.md with the date, device and commit.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec python3 "$here/bench_gpu.py" "$@"
