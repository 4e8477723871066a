"""One M-DPO step (forward + backward): mdpo's model and chunked log-probs against transformers with naive
full-logits log-probs, on the real Gemma 3 270M shape and weights.

    python benchmarks/bench_train.py [--pairs 2] [--seqs 512 2048] [--reps 2]

Batch: `pairs` (chosen, rejected) pairs of T tokens, the first quarter of each a prompt (masked), fp32, no
activation checkpointing on either side. Each (implementation, T) runs in its own process: tokens/s over
`reps` steps after a warm-up step, and the RSS high-water mark above the loaded model during one step (fixed
mmap threshold, as in bench_model.py). The naive side is skipped where its logits alone would not fit in RAM.
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
from common import reset_peak, rss_mb, worker_env  # benchmarks/common.py

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
MODEL_DIR = ROOT / "runs" / "gemma-3-270m"

from mdpo.logprobs import sequence_logprobs  # noqa: E402
from mdpo.losses import dpo_loss  # noqa: E402
from mdpo.weights import load_pretrained




def worker(impl: str, pairs: int, T: int, reps: int) -> dict:
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(10, 200_000, (2 * pairs, T), generator=g)  # rows: c0, r0, c1, r1, ...
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[:, T // 4:] = True
    ref = torch.zeros(2 * pairs)
    if impl == "mdpo":
        model = load_pretrained(MODEL_DIR)

        def logps():
            return sequence_logprobs(model, tokens, mask)[0]
    else:
        import transformers
        model = transformers.AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)

        def logps():
            logits = model(tokens, use_cache=False).logits[:, :-1].float()
            lp = torch.log_softmax(logits, -1).gather(2, tokens[:, 1:, None])[..., 0]
            return (lp * mask[:, 1:]).sum(-1)
    model.train()

    def step():
        lp = logps()
        losses, _ = dpo_loss(lp[0::2], lp[1::2], ref[0::2], ref[1::2], beta=0.1)
        losses.mean().backward()
        model.zero_grad(set_to_none=True)

    step()
    base = reset_peak()
    t0 = time.perf_counter()
    for _ in range(reps):
        step()
    dt = (time.perf_counter() - t0) / reps
    return {"impl": impl, "T": T, "tok_s": 2 * pairs * T / dt, "peak_mb": rss_mb("VmHWM") - base}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--seqs", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--naive-max-tokens", type=int, default=4096, help="largest batch the naive side runs at")
    ap.add_argument("--worker", nargs=2)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.pairs, int(args.worker[1]), args.reps)))
        return
    if not (MODEL_DIR / "config.json").exists():
        from mdpo.convert import convert_gguf, pypi_gemma3_270m
        convert_gguf(pypi_gemma3_270m(), MODEL_DIR)
    env = worker_env()
    rows = []
    print("| batch | mdpo tok/s | HF naive tok/s | speed ratio | mdpo peak MB | HF naive peak MB | memory ratio |")
    print("|---|---|---|---|---|---|---|")
    for T in args.seqs:
        res = {}
        for impl in ("transformers", "mdpo"):
            if impl == "transformers" and 2 * args.pairs * T > args.naive_max_tokens:
                continue
            cmd = [sys.executable, __file__, "--worker", impl, str(T), "--pairs", str(args.pairs),
                   "--reps", str(args.reps)]
            p = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if p.returncode:
                raise RuntimeError(p.stderr[-2000:])
            res[impl] = json.loads(p.stdout.strip().splitlines()[-1])
        m, h = res["mdpo"], res.get("transformers")
        row = {"pairs": args.pairs, "T": T, "mdpo_tok_s": round(m["tok_s"], 1), "mdpo_peak_mb": round(m["peak_mb"])}
        if h:
            row.update(hf_tok_s=round(h["tok_s"], 1), hf_peak_mb=round(h["peak_mb"]),
                       speed_ratio=round(m["tok_s"] / h["tok_s"], 3), memory_ratio=round(m["peak_mb"] / h["peak_mb"], 3))
        rows.append(row)
        print(f"| {args.pairs} pairs x {T} | {row['mdpo_tok_s']} | {row.get('hf_tok_s', 'does not fit')} | "
              f"{row.get('speed_ratio', '-')} | {row['mdpo_peak_mb']} | {row.get('hf_peak_mb', '-')} | "
              f"{row.get('memory_ratio', '-')} |", flush=True)
    print(json.dumps({"bench": "train", "model": "gemma-3-270m", "rows": rows}))


if __name__ == "__main__":
    main()
