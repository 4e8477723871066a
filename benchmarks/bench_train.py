"""One M-DPO step (forward + backward): mdpo's model and chunked log-probs against transformers with naive
full-logits log-probs, on the real Gemma 3 270M shape and weights.

    python benchmarks/bench_train.py [--pairs 2] [--seqs 512 2048] [--reps 2]
    python benchmarks/bench_train.py --lora --seqs 512 --reps 3 [--out docs/results/bench_train_lora.json]

Batch: `pairs` (chosen, rejected) pairs of T tokens, the first quarter of each a prompt (masked), fp32, no
activation checkpointing on either side. Each (implementation, T) runs in its own process: tokens/s over
`reps` steps after a warm-up step, and the RSS high-water mark above the loaded model during one step (fixed
mmap threshold, as in bench_model.py). The naive side is skipped where its logits alone would not fit in RAM.
Prints a table, then one JSON line.

--lora: one M-DPO step (a pair of T tokens, forward + backward + AdamW) on Gemma 3 270M's shape with random weights,
full fine-tuning against LoRA rank 8 and 64 (the 7 projections), activation checkpointing off and on, each in its
own process: tokens/s (best of `reps` steps after a warm-up step, and the spread), the peak (RSS high-water mark
above the process before the model is built: weights, gradients, optimizer states, activations and the runtime's
own buffers) and mdpo.plan's estimate of the same step beside it (docs/memory.md).
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


def lora_worker(rank: int, T: int, reps: int, ckpt: bool) -> dict:
    """--lora's measurement in its own process: full fine-tuning (rank 0) or LoRA of `rank`, fp32. The plan's
    estimate of the same step is computed after the measurement, so its probe is not in the peak."""
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    from mdpo.config import load_config
    from mdpo.lora import apply_lora
    from mdpo.model import ModelConfig, build_model
    from mdpo.plan import plan

    over = ["model.dtype=float32", "training.micro_batch_size=1", "training.global_batch_size=1", f"rollout.max_length={T}",
            f"training.activation_checkpointing={'true' if ckpt else 'false'}"]
    if rank:
        over += ["lora.enabled=true", f"lora.rank={rank}", f"lora.alpha={2 * rank}"]
    cfg = load_config(ROOT / "experiments" / "gemma7b_mdpo.yaml", over)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(10, 200_000, (2, T), generator=g)
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[:, T // 4:] = True
    ref = torch.zeros(2)
    base = reset_peak()
    model = build_model(ModelConfig.from_name("gemma-3-270m"), seed=0)
    if rank:
        apply_lora(model, cfg.lora, torch.float32, seed=0)
    model.activation_checkpointing = ckpt
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step():
        lp = sequence_logprobs(model, tokens, mask)[0]
        losses, _ = dpo_loss(lp[0::2], lp[1::2], ref[0::2], ref[1::2], beta=0.1)
        losses.mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # the optimizer's states exist from here on
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = rss_mb("VmHWM") - base
    p = plan(cfg, gpus=1, model="gemma-3-270m", seq_len=T, fused_optimizer=False)  # AdamW unfused, as here
    return {"rank": rank, "T": T, "ckpt": ckpt, "tok_s": 2 * T / min(times),
            "spread": (max(times) - min(times)) / min(times), "peak_mb": peak, "plan_mb": p.train_total / 2 ** 20,
            "plan_peak_phase": p.peak_phase, "plan": {k: round(v / 2 ** 20) for k, v in p.train.items()}}


def lora_main(args):
    """Full fine-tuning vs LoRA rank 8 and 64, side by side in one run, and the plan against each measured peak."""
    from common import emit

    env = worker_env()
    rows, table = [], []
    for ckpt in (False, True):
        for T in args.seqs:
            full = None
            for rank in (0, 8, 64):
                cmd = [sys.executable, __file__, "--lora-worker", str(rank), str(T), str(int(ckpt)),
                       "--reps", str(args.reps)]
                p = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if p.returncode:
                    raise RuntimeError(p.stderr[-2000:])
                r = json.loads(p.stdout.strip().splitlines()[-1])
                full = full or r
                r.update(speed_vs_full=round(r["tok_s"] / full["tok_s"], 3),
                         memory_vs_full=round(r["peak_mb"] / full["peak_mb"], 3),
                         plan_over_peak=round(r["plan_mb"] / r["peak_mb"], 3))
                rows.append(r)
                name = "full" if not rank else f"LoRA r{rank}"
                table.append([f"{name}, T {T}, checkpointing {'on' if ckpt else 'off'}", f"{r['tok_s']:.0f}",
                              f"{100 * r['spread']:.0f}%", f"{r['speed_vs_full']:.2f}", f"{r['peak_mb']:.0f}",
                              f"{r['memory_vs_full']:.2f}", f"{r['plan_mb']:.0f}", f"{r['plan_over_peak']:.2f}",
                              r["plan_peak_phase"]])
                print(" | ".join(table[-1]), flush=True)
    cols = ["M-DPO step (1 pair x T, fp32)", "tok/s (best)", "spread", "vs full", "peak MB", "vs full", "plan MB",
            "plan / peak", "plan's peak moment"]
    emit({"bench": "train_lora", "model": "gemma-3-270m (random weights)", "reps": args.reps, "rows": rows},
         {"lora": (cols, table)}, args.out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lora", action="store_true", help="full fine-tuning vs LoRA r8 / r64, and the memory plan")
    ap.add_argument("--lora-worker", nargs=3)
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--seqs", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--naive-max-tokens", type=int, default=4096, help="largest batch the naive side runs at")
    ap.add_argument("--worker", nargs=2)
    ap.add_argument("--out", default=None, help="--lora: also write the JSON result here (docs/results/bench_train_lora.json)")
    args = ap.parse_args()
    if args.lora_worker:
        rank, T, ckpt = map(int, args.lora_worker)
        print(json.dumps(lora_worker(rank, T, args.reps, bool(ckpt))))
        return
    if args.lora:
        lora_main(args)
        return
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
