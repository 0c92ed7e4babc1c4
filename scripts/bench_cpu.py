#!/usr/bin/env python3
"""mixlm's CPU training throughput against PyTorch eager, side by side (issue 28).

For each shape, alternately: mixlm's release binary (`--backend cpu`, f32) and Hugging
Face's GPTNeoXForCausalLM in PyTorch (eager, f32, AdamW and clipping, no
torch.compile), same model shape, batch and sequence length, over several rounds.
Reports each side's median tokens/s, their ratio, and mixlm's system time (from the
child's rusage): of the timed steps alone (the run minus the same run stopped one step
after its warm-up) against those steps' wall time and against their CPU time (user plus
system), and the whole process's against its CPU time.
The trainers and shapes are scripts/bench_gpu.py's (`run_mixlm`, `run_torch`).

    python3 scripts/bench_cpu.py --mixlm target/release/mixlm --rounds 3
    python3 scripts/bench_cpu.py --mixlm target/release/mixlm --baseline OLD_BINARY

With --baseline, an earlier build is timed in the same rounds (a change's speed-up).
"""
import argparse
import json
import os
import resource
import statistics
import sys
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_gpu  # noqa: E402

# name, bench_gpu preset, seq, batch, steps, warm-up steps
SHAPES = [
    ("demo", "tiny", 64, 16, 60, 10),
    ("tiny, GPT-NeoX vocab", "cpu-tiny-50k", 128, 8, 20, 5),
    ("small", "cpu-small", 256, 8, 10, 3),
]


def timed(run, preset):
    """One mixlm run: its bench_gpu result and the (user, system) CPU seconds it used."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    m = bench_gpu.run_mixlm(run, preset, "f32")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if "error" in m:
        sys.exit(f"{preset}: mixlm failed: {m['error']}")
    return m, (after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime)


def share(cpu):
    """System time over user plus system time."""
    user, system = cpu
    return system / max(user + system, 1e-9)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mixlm", required=True, help="a mixlm release binary")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--shapes", default=",".join(s[1] for s in SHAPES),
                   help="which of: " + ", ".join(s[1] for s in SHAPES))
    p.add_argument("--baseline", help="an earlier mixlm binary, timed in the same rounds")
    p.add_argument("--no-torch", dest="torch", action="store_false", help="mixlm only")
    p.add_argument("--out", default="bench-cpu.json")
    args = p.parse_args()
    import torch
    threads = torch.get_num_threads()
    wanted = args.shapes.split(",")
    results = {}
    for round_ in range(args.rounds):
        for name, preset, seq, batch, steps, warmup in SHAPES:
            if preset not in wanted:
                continue
            run = types.SimpleNamespace(
                mixlm=args.mixlm, steps=steps, warmup=warmup, batch=batch, seq=seq,
                device="cpu", backend="cpu", checkpointing="none", mixing="stratified",
                compile=False, nccl_mixlm=None)
            r = results.setdefault(preset, {"name": name, "seq": seq, "batch": batch,
                                            "mixlm": [], "torch": [], "baseline": [],
                                            "sys_share": [], "step_sys_share": [],
                                            "step_sys_wall": []})
            m, whole = timed(run, preset)
            r["mixlm"].append(m["tokens_per_s"])
            r["sys_share"].append(share(whole))
            # The same run stopped one step after its warm-up: the difference of the two
            # is the CPU time of the later steps alone, without start-up, evaluation and
            # the report.
            _, warm = timed(types.SimpleNamespace(**{**vars(run), "steps": warmup + 1}), preset)
            r["step_sys_share"].append(share((whole[0] - warm[0], whole[1] - warm[1])))
            # Those steps' wall time, at the measured rate.
            steps_wall = (steps - warmup - 1) * batch * seq / m["tokens_per_s"]
            r["step_sys_wall"].append((whole[1] - warm[1]) / steps_wall)
            line = f"round {round_ + 1} {name}: mixlm {m['tokens_per_s']:,.0f} tokens/s"
            if args.baseline:
                b = bench_gpu.run_mixlm(types.SimpleNamespace(**{**vars(run), "mixlm": args.baseline}),
                                        preset, "f32")
                if "error" in b:
                    sys.exit(f"{name}: baseline failed: {b['error']}")
                r["baseline"].append(b["tokens_per_s"])
                line += f", baseline {b['tokens_per_s']:,.0f}"
            if args.torch:
                t = bench_gpu.run_torch(run, preset, "f32")
                r["torch"].append(t["tokens_per_s"])
                line += f", PyTorch {t['tokens_per_s']:,.0f}"
            print(line, file=sys.stderr, flush=True)

    print(f"\nCPU, {os.cpu_count()} cores, PyTorch {torch.__version__} eager f32 with "
          f"{threads} threads; medians of {args.rounds} alternating rounds\n")
    base = " baseline tokens/s | mixlm / baseline |" if args.baseline else ""
    print("| shape (d_model, layers, heads, d_ff, vocab, seq, batch) | mixlm tokens/s |"
          f"{base} PyTorch tokens/s | ratio | mixlm system time: steps' wall / steps' CPU / whole run's CPU |")
    print("|---|---:|" + ("---:|---:|" if args.baseline else "") + "---:|---:|---:|")
    for preset, r in results.items():
        _, vocab, d, layers, heads, _, _, ff, _ = bench_gpu.PRESETS[preset]
        m = statistics.median(r["mixlm"])
        t = statistics.median(r["torch"]) if r["torch"] else None
        r.update(mixlm_median=m, torch_median=t, ratio=m / t if t else None)
        shape = f"{r['name']} ({d}, {layers}, {heads}, {ff}, {vocab}, {r['seq']}, {r['batch']})"
        b = statistics.median(r["baseline"]) if r["baseline"] else None
        r.update(baseline_median=b)
        cols = f" {b:,.0f} | {m / b:.2f} |" if b else ""
        print(f"| {shape} | {m:,.0f} |{cols} {'' if t is None else f'{t:,.0f}'} | "
              f"{'' if t is None else f'{m / t:.2f}'} | "
              f"{statistics.median(r['step_sys_wall']):.1%} / "
              f"{statistics.median(r['step_sys_share']):.1%} / {statistics.median(r['sys_share']):.1%} |")
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"\nwritten: {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
