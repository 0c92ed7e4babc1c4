#!/usr/bin/env bash
# Coverage-guided fuzzing of the inputs users hand mixlm: the jsonl/zst reader, the run
# config parser and the checkpoint loader (targets in tests/fuzz/fuzz_targets).
#
#   scripts/fuzz.sh            # every target for 60 s each
#   scripts/fuzz.sh 600        # ...for 10 minutes each
#   scripts/fuzz.sh 60 config_parser
#
# Needs a nightly toolchain (libFuzzer's sanitizer flags) and installs cargo-fuzz if
# missing. SANITIZER=none (default: address) builds faster and still finds every
# panic; the targets' code paths have no unsafe code of mixlm's own (the memory-mapped
# shards are not among them). Seeds come from tests/fuzz/seeds/<target>; crashes are written to
# tests/fuzz/artifacts/<target>/ and the script exits non-zero if any target found one.
set -euo pipefail
cd "$(dirname "$0")/../tests/fuzz"
seconds="${1:-60}"
shift || true
targets=("${@:-jsonl_reader config_parser checkpoint_loader}")
read -r -a targets <<< "${targets[*]}"

if ! rustup run nightly rustc --version >/dev/null 2>&1; then
  echo "fuzz.sh: needs a nightly toolchain: rustup toolchain install nightly" >&2
  exit 2
fi
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz

status=0
for target in "${targets[@]}"; do
  corpus="corpus/$target"
  mkdir -p "$corpus"
  if [ -d "seeds/$target" ]; then cp -n seeds/"$target"/* "$corpus"/ 2>/dev/null || true; fi
  echo "== fuzzing $target for ${seconds}s"
  if ! cargo +nightly fuzz run --sanitizer "${SANITIZER:-address}" --fuzz-dir . "$target" "$corpus" -- \
      -max_total_time="$seconds" -rss_limit_mb=4096; then
    echo "fuzz.sh: $target found a crash (see artifacts/$target)" >&2
    status=1
  fi
done
exit $status
