#!/usr/bin/env python3
"""Training throughput of mixlm against a PyTorch reference, side by side, in one run.

For each preset it measures, on the same device, same model shape, batch and
sequence length:

  mixlm    a prebuilt `mixlm` binary (`cargo build --release --features cuda`)
           training on the built-in synthetic corpus (`configs/bench/throughput.toml`),
           tokens/s from its metrics.jsonl between the warm-up and the last step;
           peak GPU memory by polling nvidia-smi.
  pytorch  the reference a researcher would otherwise use: Hugging Face
           GPTNeoXForCausalLM / LlamaForCausalLM built from the same shape, SDPA
           (flash) attention, bf16 autocast (or f32), torch.compile, fused AdamW
           with the same hyperparameters, random tokens; peak memory from
           torch.cuda.max_memory_allocated.

MFU uses 6 * (matmul parameters) + 12 * layers * d_model * seq flops per token
(PaLM's count, forward + backward) against the bf16 matmul peak measured here
(an 8192^3 bf16 matmul), so both sides share one yardstick.

It needs no network and no Rust: Python 3 with torch and transformers, and the
binary. Results: a markdown table on stdout and JSON in --out.

    python3 scripts/bench_gpu.py --mixlm dist/mixlm --presets pythia-160m,pythia-1b
    # what one device through the data-parallel path costs (issue 10's < 1% bar):
    python3 scripts/bench_gpu.py --mixlm dist/mixlm --presets pythia-160m \
        --mixlm-precisions bf16 --precisions bf16 --collective --steps 60 --warmup 20
    # the same through NCCL during backward (a second binary, built with --features nccl):
    python3 scripts/bench_gpu.py --mixlm dist/mixlm --nccl-mixlm dist/mixlm-nccl \
        --presets pythia-160m --mixlm-precisions bf16 --precisions bf16 --collective
    # check the device first (mixlm check-backend), then measure:
    python3 scripts/bench_gpu.py --mixlm dist/mixlm --check --presets pythia-160m
    # CPU smoke test of the script itself (tiny model, a few steps):
    python3 scripts/bench_gpu.py --mixlm target/release/mixlm --device cpu \
        --presets tiny --seq 64 --batch 4 --steps 6 --warmup 2
"""

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

# The shapes of mixlm's presets (crates/mixlm-model/src/config.rs).
PRESETS = {
    # family, vocab, d_model, layers, heads, kv_heads, head_dim, d_ff, rotary_pct
    "tiny": ("neox", 128, 64, 2, 4, 4, 16, 256, 0.25),
    "pythia-160m": ("neox", 50304, 768, 12, 12, 12, 64, 3072, 0.25),
    "pythia-410m": ("neox", 50304, 1024, 24, 16, 16, 64, 4096, 0.25),
    "pythia-1b": ("neox", 50304, 2048, 16, 8, 8, 256, 8192, 0.25),
    "odm-1b": ("neox", 50304, 2048, 16, 16, 16, 128, 8192, 0.25),
    "samplemix-1b": ("llama", 50304, 1664, 28, 13, 13, 128, 4480, 1.0),
    "samplemix-8b": ("llama", 50304, 4096, 32, 32, 8, 128, 14336, 1.0),
    # CPU shapes (scripts/bench-cpu.sh): the tiny preset with GPT-NeoX's vocabulary,
    # and a small model; mixlm runs them as the tiny preset with every size overridden.
    "cpu-tiny-50k": ("neox", 50304, 64, 2, 4, 4, 16, 256, 0.25),
    "cpu-small": ("neox", 50304, 256, 4, 4, 4, 64, 1024, 0.25),
}

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def flops_per_token(preset, seq):
    """PaLM's training flops per token: 6 N (matmul weights) + 12 L d T (attention)."""
    fam, vocab, d, layers, heads, kv, hd, ff, _ = PRESETS[preset]
    attn = d * (heads + 2 * kv) * hd + heads * hd * d
    mlp = (3 if fam == "llama" else 2) * d * ff
    n = layers * (attn + mlp) + vocab * d  # the output projection; the input embedding is a lookup
    return 6 * n + 12 * layers * heads * hd * seq


class GpuMemoryPoller:
    """Peak GPU memory used (MiB) while it runs, minus what was used before."""

    def __init__(self, device):
        self.enabled = device == "cuda" and shutil.which("nvidia-smi") is not None
        self.base = self._used() if self.enabled else 0
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _used(self):
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
            capture_output=True, text=True, check=False,
        ).stdout.strip().splitlines()
        return int(out[0]) if out else 0

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._used())
            time.sleep(0.2)

    def __enter__(self):
        if self.enabled:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self.enabled:
            self._thread.join()

    def peak_gib(self):
        return (self.peak - self.base) / 1024 if self.enabled else None


def run_mixlm(args, preset, precision, attention="fused", path="plain", autotune=None):
    """Trains with the mixlm binary; tokens/s over the steps after the warm-up.

    path: "plain", or through the data-parallel machinery with one peer, to measure
    its cost against the plain path: "collective" (`distributed.always_collective`,
    gradients through burn-collective) or "nccl" (the --nccl-mixlm binary,
    `distributed.communication = "nccl"`, gradients through NCCL during backward).
    autotune: CubeCL's autotune level for the run (CUBECL_AUTOTUNE_LEVEL: minimal,
    balanced (its default), extensive, full)."""
    out = tempfile.mkdtemp(prefix="mixlm-bench-")
    sets = {
        "run.out_dir": json.dumps(out),
        "run.name": json.dumps(preset),
        "run.steps": str(args.steps),
        "run.batch_size": str(args.batch),
        "run.seq_len": str(args.seq),
        "schedule.warmup_steps": str(args.warmup),
        "run.backend": json.dumps(args.backend),
        "run.activation_checkpointing": json.dumps(args.checkpointing),
        "mixing.method": json.dumps(args.mixing),
    }
    fam, vocab, d, layers, heads, kv, hd, ff, rot = PRESETS[preset]
    if preset.startswith("cpu-"):
        # Not a mixlm preset: the family's tiny preset with every size set.
        sets["model.preset"] = json.dumps("tiny" if fam == "neox" else "tiny-llama")
        sets.update({"model.d_model": str(d), "model.n_layers": str(layers),
                     "model.n_heads": str(heads), "model.n_kv_heads": str(kv),
                     "model.head_dim": str(hd), "model.d_ff": str(ff),
                     "model.rotary_pct": str(rot)})
    else:
        sets["model.preset"] = json.dumps(preset)
    sets["model.vocab_size"] = str(vocab)
    sets["run.precision"] = json.dumps(precision)
    sets["run.attention"] = json.dumps(attention)
    binary = args.mixlm
    if path == "collective":
        sets["distributed.always_collective"] = "true"
    elif path == "nccl":
        sets["distributed.communication"] = json.dumps("nccl")
        binary = args.nccl_mixlm
    cmd = [binary, "train", "--config", os.path.join(REPO, "configs/bench/throughput.toml"), "--quiet", "--overwrite"]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    with GpuMemoryPoller(args.device) as mem:
        started = time.time()
        env = dict(os.environ, **({"CUBECL_AUTOTUNE_LEVEL": autotune} if autotune else {}))
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
        wall = time.time() - started
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}
    lines = [json.loads(l) for l in open(os.path.join(out, preset, "metrics.jsonl"))]
    steps = [l for l in lines if l.get("kind") == "train"]
    first, last = steps[args.warmup - 1], steps[-1]
    tps = (last["tokens"] - first["tokens"]) / (last["elapsed_s"] - first["elapsed_s"])
    # Where the timed steps' wall-clock went (the trainer's per-step breakdown).
    parts = ("data", "model", "mixing", "other")
    split = {k: sum(l["time_s"][k] for l in steps[args.warmup:]) for k in parts}
    shutil.rmtree(out, ignore_errors=True)
    return {"tokens_per_s": tps, "peak_gib": mem.peak_gib(), "wall_s": wall,
            "final_loss": last["loss"], "time_split_s": split,
            "outside_model": 1 - split["model"] / max(sum(split.values()), 1e-12)}


def use_pip_nccl():
    """Lets the nccl build find NCCL: it loads `libnccl.so` at run time (cudarc), and
    with PyTorch from pip NCCL is the nvidia-nccl wheel's `libnccl.so.2`, outside the
    loader's path and under another name. Links it as libnccl.so in a temporary
    folder put first on LD_LIBRARY_PATH (children of this script inherit it)."""
    try:
        import nvidia.nccl
    except ImportError:
        return
    for root in getattr(nvidia.nccl, "__path__", []):
        found = sorted(glob.glob(os.path.join(root, "lib", "libnccl.so*")))
        if found:
            folder = tempfile.mkdtemp(prefix="mixlm-nccl-")
            os.symlink(found[0], os.path.join(folder, "libnccl.so"))
            old = os.environ.get("LD_LIBRARY_PATH", "")
            os.environ["LD_LIBRARY_PATH"] = folder + (":" + old if old else "")
            print(f"NCCL for the nccl build: {found[0]}", file=sys.stderr)
            return


def run_torch(args, preset, precision):
    """The PyTorch reference trainer on random tokens."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

    fam, vocab, d, layers, heads, kv, hd, ff, rot = PRESETS[preset]
    device = torch.device(args.device)
    torch.manual_seed(0)
    if fam == "neox":
        config = GPTNeoXConfig(
            vocab_size=vocab, hidden_size=d, num_hidden_layers=layers,
            num_attention_heads=heads, intermediate_size=ff, rotary_pct=rot,
            max_position_embeddings=max(2048, args.seq), use_parallel_residual=True,
            tie_word_embeddings=False, attn_implementation="sdpa",
        )
        if hd * heads != d:
            return {"error": [f"{preset}: head_dim {hd} x {heads} heads != d_model {d}; "
                              "GPTNeoX in transformers ties them"]}
        model = GPTNeoXForCausalLM(config)
    else:
        config = LlamaConfig(
            vocab_size=vocab, hidden_size=d, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=kv, head_dim=hd,
            intermediate_size=ff, max_position_embeddings=max(2048, args.seq),
            tie_word_embeddings=False, attn_implementation="sdpa",
        )
        model = LlamaForCausalLM(config)
    model.to(device).train()
    if args.checkpointing != "none":
        model.gradient_checkpointing_enable()
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), eps=1e-8,
                            weight_decay=0.1, fused=fused)
    step_fn = model
    if args.compile and device.type == "cuda":
        step_fn = torch.compile(model)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    gen = torch.Generator(device="cpu").manual_seed(0)

    def step():
        x = torch.randint(0, vocab, (args.batch, args.seq + 1), generator=gen).to(device)
        with torch.autocast(device.type, dtype=dtype, enabled=precision == "bf16"):
            loss = step_fn(input_ids=x[:, :-1], labels=x[:, 1:]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup):
        step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    started = time.time()
    for _ in range(args.steps - args.warmup):
        loss = step()
    loss = float(loss)  # waits for the last step
    sync()
    secs = time.time() - started
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    del model, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"tokens_per_s": (args.steps - args.warmup) * args.batch * args.seq / secs,
            "peak_gib": peak, "final_loss": loss}


def matmul_peak(device):
    """Measured bf16 matmul throughput (flop/s): the MFU yardstick."""
    import torch
    if device != "cuda":
        return None
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    reps = 20
    t = time.time()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.time() - t)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mixlm", required=True, help="a mixlm release binary")
    p.add_argument("--presets", default="pythia-160m,pythia-1b")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=30, help="steps per run, warm-up included")
    p.add_argument("--warmup", type=int, default=10, help="steps left out of the timing")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--backend", default=None, help="mixlm backend (default: cuda, or cpu with --device cpu)")
    p.add_argument("--precisions", default="bf16,f32", help="PyTorch precisions to run")
    p.add_argument("--mixlm-precisions", default="bf16,f32")
    p.add_argument("--mixlm-attention", default="fused",
                   help="mixlm attention kernels to run: fused, burn (Burn's op), or both")
    p.add_argument("--checkpointing", default="none", choices=["none", "balanced"])
    p.add_argument("--mixing", default="stratified",
                   help="mixlm's mixing method (odm: the scheduler's cost shows against stratified)")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--collective", action="store_true",
                   help="also run each mixlm configuration through the data-parallel path "
                        "with one peer, and print its cost against the plain path")
    p.add_argument("--nccl-mixlm", default=None,
                   help="a mixlm built with --features nccl: with --collective, also measure the "
                        "path whose gradients go through NCCL during backward; with --check, "
                        "also run its check-backend")
    p.add_argument("--autotune", default="",
                   help="also run mixlm (fused attention) with these CubeCL autotune levels, "
                        "e.g. minimal,extensive (balanced, the default, is the plain run)")
    p.add_argument("--check", action="store_true",
                   help="first run `mixlm check-backend` (kernels against Burn's attention, a few "
                        "steps against the CPU) for each --mixlm-precisions, and print its findings")
    p.add_argument("--out", default="bench-gpu.json")
    args = p.parse_args()
    args.backend = args.backend or args.device
    use_pip_nccl()
    if not 1 <= args.warmup < args.steps:
        p.error("--warmup must be at least 1 and below --steps")

    checks = []
    if args.check:
        binaries = [args.mixlm] + ([args.nccl_mixlm] if args.nccl_mixlm else [])
        for binary in binaries:
            for prec in args.mixlm_precisions.split(","):
                cmd = [binary, "check-backend", "--backend", args.backend, "--precision", prec]
                print(" ".join(cmd), file=sys.stderr, flush=True)
                proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
                print(proc.stdout + proc.stderr[-2000:], flush=True)
                checks.append({"binary": binary, "precision": prec,
                               "passed": proc.returncode == 0,
                               "findings": proc.stdout.splitlines()})
    peak = matmul_peak(args.device)
    device_name = "cpu"
    if args.device == "cuda":
        import torch
        device_name = torch.cuda.get_device_name(0)
    rows = []
    for preset in args.presets.split(","):
        if preset not in PRESETS:
            p.error(f"unknown preset {preset}: one of {', '.join(PRESETS)}")
        fpt = flops_per_token(preset, args.seq)
        runs = [(f"mixlm/{attn}", prec, lambda a, pr, pc, attn=attn: run_mixlm(a, pr, pc, attn))
                for attn in args.mixlm_attention.split(",")
                for prec in args.mixlm_precisions.split(",")]
        if args.collective:
            paths = ["collective"] + (["nccl"] if args.nccl_mixlm else [])
            runs += [(f"mixlm/{attn}/{path}", prec,
                      lambda a, pr, pc, attn=attn, path=path: run_mixlm(a, pr, pc, attn, path))
                     for path in paths
                     for attn in args.mixlm_attention.split(",")
                     for prec in args.mixlm_precisions.split(",")]
        runs += [(f"mixlm/fused/autotune={level}", prec,
                  lambda a, pr, pc, level=level: run_mixlm(a, pr, pc, "fused", autotune=level))
                 for level in filter(None, args.autotune.split(","))
                 for prec in args.mixlm_precisions.split(",")]
        runs += [("pytorch", prec, run_torch) for prec in args.precisions.split(",")]
        for who, prec, fn in runs:
            print(f"{preset}: {who} {prec} ...", file=sys.stderr, flush=True)
            r = fn(args, preset, prec)
            r.update(preset=preset, trainer=who, precision=prec)
            if "tokens_per_s" in r and peak:
                r["mfu"] = r["tokens_per_s"] * fpt / peak
            rows.append(r)

    print(f"\n{device_name}; seq {args.seq}, batch {args.batch}, {args.steps} steps "
          f"({args.warmup} warm-up); bf16 matmul peak "
          f"{peak / 1e12:.0f} TFLOP/s\n" if peak else
          f"\n{device_name}; seq {args.seq}, batch {args.batch}, {args.steps} steps\n")
    print("| preset | trainer | precision | tokens/s | MFU | peak GiB | vs PyTorch bf16 | step time outside the model |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        ref = next((x for x in rows if x["preset"] == r["preset"] and x["trainer"] == "pytorch"
                    and x["precision"] == "bf16" and "tokens_per_s" in x), None)
        if "error" in r:
            print(f"| {r['preset']} | {r['trainer']} | {r['precision']} | failed: "
                  f"{' '.join(r['error'])} | | | | |")
            continue
        fmt = lambda v, f: "" if v is None else format(v, f)
        ratio = r["tokens_per_s"] / ref["tokens_per_s"] if ref else None
        print(f"| {r['preset']} | {r['trainer']} | {r['precision']} | {r['tokens_per_s']:,.0f} | "
              f"{fmt(r.get('mfu'), '.1%')} | {fmt(r.get('peak_gib'), '.1f')} | {fmt(ratio, '.2f')} | "
              f"{fmt(r.get('outside_model'), '.1%')} |")
    for r in rows:
        base, _, path = r["trainer"].rpartition("/")
        if path not in ("collective", "nccl") or "tokens_per_s" not in r:
            continue
        plain = next((x for x in rows if x["preset"] == r["preset"] and x["precision"] == r["precision"]
                      and x["trainer"] == base and "tokens_per_s" in x), None)
        if plain:
            cost = 1 - r["tokens_per_s"] / plain["tokens_per_s"]
            r["collective_cost"] = cost
            print(f"{r['preset']} {r['trainer']} {r['precision']}: the {path} path costs "
                  f"{cost:.2%} of the plain path's tokens/s")
    with open(args.out, "w") as f:
        json.dump({"device": device_name, "args": vars(args), "matmul_peak": peak, "rows": rows,
                   "checks": checks}, f, indent=2)
    print(f"\nwritten: {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
