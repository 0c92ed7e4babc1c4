#!/usr/bin/env bash
# Download SlimPajama for mixlm (needs internet and `pip install -U huggingface_hub`).
#
#   scripts/download-slimpajama.sh --627b-chunks 2 --out data/raw/slimpajama-627b
#   scripts/download-slimpajama.sh --6b --out data/raw/slimpajama-6b
#
# --627b-chunks N  files example_train_0..N-1 of each of the 10 train chunks of
#                  cerebras/SlimPajama-627B (jsonl.zst, ~235 MB each), plus the
#                  validation/ and test/ holdout chunk 1; the folders keep the dataset's
#                  own split names, which `mixlm prepare` uses as splits.
# --6b             DKYoon/SlimPajama-6B (parquet: data/{train,validation,test}-*.parquet;
#                  `mixlm prepare` takes the split from each file name).
# Then: mixlm prepare --input OUT --tokenizer tokenizer.json --output data/slimpajama
set -euo pipefail

out="data/raw/slimpajama"
chunks=0
six_b=0
while [ $# -gt 0 ]; do
  case "$1" in
    --627b-chunks) chunks="$2"; shift 2 ;;
    --6b) six_b=1; shift ;;
    --out) out="$2"; shift 2 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [ "$chunks" = 0 ] && [ "$six_b" = 0 ]; then
  echo "nothing to download: give --627b-chunks N and/or --6b (see --help)" >&2
  exit 2
fi

if command -v hf >/dev/null; then dl=(hf download)
elif command -v huggingface-cli >/dev/null; then dl=(huggingface-cli download)
else echo "needs the Hugging Face CLI: pip install -U huggingface_hub" >&2; exit 1
fi

mkdir -p "$out"
if [ "$chunks" -gt 0 ]; then
  include=()
  for c in $(seq 1 10); do
    for i in $(seq 0 $((chunks - 1))); do include+=(--include "train/chunk$c/example_train_$i.jsonl.zst"); done
  done
  include+=(--include "validation/chunk1/*" --include "test/chunk1/*")
  "${dl[@]}" cerebras/SlimPajama-627B --repo-type dataset --local-dir "$out" "${include[@]}"
fi
if [ "$six_b" = 1 ]; then
  "${dl[@]}" DKYoon/SlimPajama-6B --repo-type dataset --local-dir "$out/slimpajama-6b"
fi
echo "downloaded to $out; next: mixlm prepare --input $out --tokenizer TOKENIZER.json --output data/slimpajama"
