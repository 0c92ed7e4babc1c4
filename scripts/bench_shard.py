#!/usr/bin/env python3
"""Data-parallel CPU peers with each `distributed.shard` mode, side by side (issue 30).

Trains the same model, global batch and steps with `shard = none`, `optimizer` and
`gradients`, alternating the modes over several rounds, each as one `mixlm train`
process with `--devices N` ndarray peers. Reports each mode's median tokens/s (over
the steps after the warm-up), its ratio to `none`, the process's peak RSS and the
final loss (stage 1 must equal `none`'s to the bit; stage 2 within rounding).

    python3 scripts/bench_shard.py --mixlm target/release/mixlm --peers 2 --rounds 3
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ["none", "optimizer", "gradients"]


def run(args, mode):
    out = tempfile.mkdtemp(prefix="mixlm-shard-")
    sets = {
        "run.out_dir": json.dumps(out),
        "run.name": json.dumps(mode),
        "run.backend": json.dumps("cpu"),
        "run.steps": str(args.steps),
        "run.batch_size": str(args.batch),
        "run.seq_len": str(args.seq),
        "schedule.warmup_steps": str(args.warmup),
        "distributed.devices": str(args.peers),
        "distributed.shard": json.dumps(mode),
        "model.preset": json.dumps("tiny"),
        "model.vocab_size": str(args.vocab),
        "model.d_model": str(args.d_model),
        "model.n_layers": str(args.layers),
        "model.n_heads": "4",
        "model.n_kv_heads": "4",
        "model.head_dim": str(args.d_model // 4),
        "model.d_ff": str(4 * args.d_model),
    }
    cmd = ["/usr/bin/time", "-f", "%M", args.mixlm, "train", "--config",
           os.path.join(REPO, "configs/bench/throughput.toml"), "--quiet", "--overwrite"]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"{mode}: mixlm failed: {proc.stderr.strip().splitlines()[-3:]}")
    peak_kib = int(proc.stderr.strip().splitlines()[-1])
    records = [json.loads(l) for l in open(os.path.join(out, mode, "metrics.jsonl"))]
    steps = [r for r in records if r.get("kind") == "train"]
    first, last = steps[args.warmup - 1], steps[-1]
    tps = (last["tokens"] - first["tokens"]) / (last["elapsed_s"] - first["elapsed_s"])
    shutil.rmtree(out, ignore_errors=True)
    return {"tokens_per_s": tps, "peak_mb": peak_kib / 1024, "final_loss": last["loss"]}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mixlm", required=True, help="a mixlm release binary")
    p.add_argument("--peers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=4, help="sequences per peer and step")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--vocab", type=int, default=50304)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--out", default="bench-shard.json")
    args = p.parse_args()
    results = {m: [] for m in MODES}
    for round_ in range(args.rounds):
        for mode in MODES:
            r = run(args, mode)
            results[mode].append(r)
            print(f"round {round_ + 1} {mode}: {r['tokens_per_s']:,.0f} tokens/s, "
                  f"peak {r['peak_mb']:,.0f} MB, final loss {r['final_loss']!r}",
                  file=sys.stderr, flush=True)
    base = statistics.median(r["tokens_per_s"] for r in results["none"])
    print(f"\n{args.peers} CPU peers ({os.cpu_count()} cores), d_model {args.d_model}, "
          f"{args.layers} layers, vocab {args.vocab}, {args.peers} x {args.batch} x "
          f"{args.seq} tokens a step; medians of {args.rounds} alternating rounds\n")
    print("| distributed.shard | tokens/s | against none | peak RSS | final loss |")
    print("|---|---:|---:|---:|---:|")
    for mode in MODES:
        tps = statistics.median(r["tokens_per_s"] for r in results[mode])
        peak = statistics.median(r["peak_mb"] for r in results[mode])
        print(f"| {mode} | {tps:,.0f} | {tps / base:.2f} | {peak:,.0f} MB | "
              f"{results[mode][-1]['final_loss']:.6f} |")
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"\nwritten: {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
