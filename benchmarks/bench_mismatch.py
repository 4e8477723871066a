"""Rollout / training mismatch: the sampler's recorded log-prob of each sampled token against the trainer's forward
of the same trajectory with the same weights, in fp32 and bf16.

    python benchmarks/bench_mismatch.py --model DIR --prompts FILE [--n 64] [--samples 4] [--out FILE.json]

A GRPO ratio exp(policy - old) is 1 at the first step only if both sides compute the same number. mdpo uses one
model code for both, but not one computation: the sampler decodes a token at a time against a paged KV cache
(packed or not, its fp32 logits, batch shapes of the step), the trainer runs the whole right-padded sequence at
once through mdpo.logprobs' chunked head. The difference is float rounding; this measures how large it is, per
model token (|policy - old|: mean, 99th percentile, max) and as the ratio's spread, which is what the trainer's
first-step check (mdpo.train, MISMATCH) is set from. Default model: the demo's SFT model (runs/demo/sft/final).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from common import emit  # benchmarks/common.py

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mdpo.datasets import load_problems  # noqa: E402
from mdpo.eval import sample_graded  # noqa: E402
from mdpo.sampler import SamplingParams  # noqa: E402
from mdpo.train import batch_tensors, recorded_logprobs  # noqa: E402
from mdpo.logprobs import masked_token_logprobs  # noqa: E402
from mdpo.weights import load_pretrained  # noqa: E402


def measure(model_dir: str, problems: list[dict], samples: int, dtype: torch.dtype) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        trajs = sample_graded(model_dir, problems, Path(tmp) / "r.jsonl", samples,
                              SamplingParams(temperature=1.0, max_new_tokens_per_turn=96, max_turns=4),
                              batch_size=64, seed=0, desc=f"sample {dtype}", dtype=dtype)
    model = load_pretrained(model_dir, dtype=dtype).eval()
    diffs = []
    with torch.no_grad():
        for s in range(0, len(trajs), 16):
            seqs = trajs[s:s + 16]
            tokens, lm = batch_tensors(seqs, "model", "cpu")
            lp, _, select = masked_token_logprobs(model, tokens, lm)
            diffs.append((lp - recorded_logprobs(seqs, select)).abs())  # as the trainer's first-step check
    d = torch.cat(diffs).double()
    ratio = torch.exp(d)
    return {"tokens": d.numel(), "trajectories": len(trajs), "mean_abs": d.mean().item(),
            "p99_abs": d.quantile(0.99).item(), "max_abs": d.max().item(), "ratio_max": ratio.max().item()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(ROOT / "runs" / "demo" / "sft" / "final"))
    ap.add_argument("--prompts", default=str(ROOT / "runs" / "demo" / "data" / "test.jsonl"))
    ap.add_argument("--n", type=int, default=64, help="prompts")
    ap.add_argument("--samples", type=int, default=4, help="samples per prompt")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    problems = load_problems(args.prompts)[: args.n]
    rows, results = [], {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        r = measure(args.model, problems, args.samples, dtype)
        results[name] = r
        rows.append([name, str(r["tokens"]), f"{r['mean_abs']:.2e}", f"{r['p99_abs']:.2e}", f"{r['max_abs']:.2e}",
                     f"{r['ratio_max']:.4f}"])
    cols = ["dtype", "model tokens", "mean |policy - old|", "p99", "max", "max ratio"]
    emit({"bench": "mismatch", "model": args.model, "results": results}, {"mismatch": (cols, rows)}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
