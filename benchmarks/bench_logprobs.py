"""Chunked masked log-probs (mdpo.logprobs) against the naive full-logits computation.

    python benchmarks/bench_logprobs.py [--batch 4] [--seqs 512 1024 2048] [--vocab 256000] [--hidden 640]

Work: per-sequence sums of log p(token) over every position, forward and backward, from final hidden states
(B, T, d) and a tied (V, d) head, fp32. Naive = logits for all B x T positions, log_softmax, gather, sum.
Each (method, T) runs in its own process; peak = RSS high-water mark above the inputs' baseline, with a
fixed mmap threshold so freed buffers leave RSS (see bench_model.py). At 4 x 2048 the naive logits alone are
8.4 GB and its peak exceeds this machine's 24 GB, so naive runs only up to --naive-max tokens.
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mdpo.logprobs import token_logprobs  # noqa: E402




def worker(method: str, B: int, T: int, V: int, d: int, chunk: int) -> dict:
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(B, T, d, generator=g) * 0.5).requires_grad_()
    w = (torch.randn(V, d, generator=g) * 0.05).requires_grad_()
    targets = torch.randint(0, V, (B, T), generator=g)

    def run():
        if method == "naive":
            logits = h @ w.T  # (B, T, V)
            lp = torch.log_softmax(logits.float(), -1).gather(2, targets[..., None])[..., 0]
            sums = lp.sum(-1)
        else:
            sums = token_logprobs(h.reshape(B * T, d), w, targets.reshape(-1), None, chunk).view(B, T).sum(-1)
        sums.sum().backward()
        h.grad = w.grad = None
        return sums.detach()

    base = reset_peak()
    t0 = time.perf_counter()
    out = run()
    dt = time.perf_counter() - t0
    return {"method": method, "B": B, "T": T, "seconds": dt, "peak_mb": rss_mb("VmHWM") - base,
            "checksum": float(out.sum())}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seqs", type=int, nargs="+", default=[512, 1024, 2048])
    ap.add_argument("--vocab", type=int, default=256_000)
    ap.add_argument("--hidden", type=int, default=640)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--naive-max", type=int, default=4096, help="largest B*T the naive method is run at")
    ap.add_argument("--worker", nargs=2)
    args = ap.parse_args()
    if args.worker:
        method, T = args.worker
        print(json.dumps(worker(method, args.batch, int(T), args.vocab, args.hidden, args.chunk)))
        return
    env = worker_env()
    rows = []
    print("| B x T | naive s | chunked s | time ratio | naive peak MB | chunked peak MB | memory ratio |")
    print("|---|---|---|---|---|---|---|")
    for T in args.seqs:
        res = {}
        for method in ("naive", "chunked"):
            if method == "naive" and args.batch * T > args.naive_max:
                continue
            cmd = [sys.executable, __file__, "--worker", method, str(T), "--batch", str(args.batch),
                   "--vocab", str(args.vocab), "--hidden", str(args.hidden), "--chunk", str(args.chunk)]
            p = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if p.returncode:
                raise RuntimeError(p.stderr[-2000:])
            res[method] = json.loads(p.stdout.strip().splitlines()[-1])
        c, n = res["chunked"], res.get("naive")
        row = {"B": args.batch, "T": T, "chunked_s": round(c["seconds"], 2), "chunked_peak_mb": round(c["peak_mb"])}
        if n:
            assert abs(n["checksum"] - c["checksum"]) <= 1e-3 * abs(n["checksum"]), (n, c)
            row.update(naive_s=round(n["seconds"], 2), naive_peak_mb=round(n["peak_mb"]),
                       time_ratio=round(c["seconds"] / n["seconds"], 3),
                       memory_ratio=round(c["peak_mb"] / n["peak_mb"], 3))
        rows.append(row)
        print(f"| {args.batch} x {T} | {row.get('naive_s', '-')} | {row['chunked_s']} | {row.get('time_ratio', '-')} | "
              f"{row.get('naive_peak_mb', 'does not fit')} | {row['chunked_peak_mb']} | {row.get('memory_ratio', '-')} |",
              flush=True)
    print(json.dumps({"bench": "logprobs", "vocab": args.vocab, "hidden": args.hidden, "chunk": args.chunk,
                      "rows": rows}))


if __name__ == "__main__":
    main()
