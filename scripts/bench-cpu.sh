#!/usr/bin/env bash
# mixlm's CPU training throughput against PyTorch eager f32 on three shapes, alternating,
# several rounds, medians and ratios (scripts/bench_cpu.py). Builds the release binary
# and installs torch + transformers (CPU wheels from PyPI) into target/bench-venv once.
#   scripts/bench-cpu.sh                 # 3 rounds
#   scripts/bench-cpu.sh --rounds 5 --shapes cpu-tiny-50k
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
venv=target/bench-venv
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import torch, transformers' 2>/dev/null; then
  echo "== installing torch and transformers into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check torch transformers
fi
cargo build --quiet --release -p mixlm-cli
exec "$venv/bin/python" scripts/bench_cpu.py --mixlm target/release/mixlm --out target/bench-cpu.json "$@"
