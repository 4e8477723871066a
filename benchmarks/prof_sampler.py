"""Where mdpo's sampler spends a decode: torch.profiler over one greedy generation, ops grouped by kind.

    python benchmarks/prof_sampler.py [--dtype bfloat16] [--batch 64] [--new 128] [--bf16-attention]
                                      [--out docs/results/prof_sampler_bf16.json]

Written to answer why bf16 at batch 8 / 64 trails vLLM CPU (benchmarks/bench_vllm.py): the same 270M, the same
48-token prompts and 128 greedy tokens a row. One untimed warm-up generation packs the weights and fills
caches; the profiled generation follows. --bf16-attention attends over the bf16 keys and values as read (the CPU
default before session 12) instead of casting them to fp32 first (PagedKVCache.upcast). Self CPU time per op is summed into groups (matmul, attention,
norm/elementwise, sampling/host, copy/cast, other) and the top ops are listed. Its last line is JSON.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sampler import MODEL_DIR  # noqa: E402
from bench_vllm import MdpoSide, make_prompts  # noqa: E402
from common import emit  # noqa: E402
from mdpo.tokenizer import Tokenizer  # noqa: E402
from mdpo.weights import load_pretrained  # noqa: E402

GROUPS = [  # (group, substrings of the op name), first match wins
    ("matmul", ("mkldnn", "linear", "addmm", "mm", "matmul", "bmm", "onednn")),
    ("attention", ("attention", "sdpa", "flash", "softmax")),
    ("copy / cast / index", ("copy_", "to", "index", "gather", "scatter", "cat", "clone", "contiguous", "narrow", "select", "slice", "view", "reshape", "expand", "empty", "zeros", "fill")),
    ("norm / elementwise", ("mul", "add", "rsqrt", "pow", "mean", "gelu", "tanh", "silu", "div", "sub", "neg", "where", "exp", "sum")),
    ("sampling / host", ("argmax", "topk", "sort", "item", "_local_scalar_dense", "multinomial", "max", "eq", "ne", "any", "nonzero")),
]


def group_of(name: str) -> str:
    low = name.lower()
    for g, keys in GROUPS:
        if any(k in low for k in keys):
            return g
    return "other"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--bf16-attention", action="store_true", help="PagedKVCache.upcast off")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.bf16_attention:
        import mdpo.paged as paged

        init = paged.PagedKVCache.__init__

        def no_upcast(self, *a, **k):
            init(self, *a, **k)
            self.upcast = False

        paged.PagedKVCache.__init__ = no_upcast
    tok = Tokenizer.from_pretrained(MODEL_DIR)
    prompts = make_prompts(tok, args.batch)
    model = load_pretrained(MODEL_DIR, dtype=getattr(torch, args.dtype)).eval()
    side = MdpoSide(model, tok, prompts, args.new)
    side.run(args.batch, warm=True)
    plain = side.run(args.batch)["seconds"]  # unprofiled, for the profiler's own overhead
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        side.run(args.batch)
        profiled = time.perf_counter() - t0
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total_us = sum(e.self_cpu_time_total for e in events)
    groups = defaultdict(float)
    for e in events:
        groups[group_of(e.key)] += e.self_cpu_time_total
    gtable = [[g, f"{us / 1e6:.2f}", f"{100 * us / total_us:.1f}%"] for g, us in sorted(groups.items(), key=lambda x: -x[1])]
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[: args.top]
    otable = [[e.key, e.count, f"{e.self_cpu_time_total / 1e6:.3f}", f"{100 * e.self_cpu_time_total / total_us:.1f}%",
               f"{e.self_cpu_time_total / max(e.count, 1):.0f}"] for e in top]
    tok_s = args.batch * args.new / plain
    result = {"bench": "prof_sampler", "dtype": args.dtype, "batch": args.batch, "new_tokens": args.new,
              "threads": args.threads, "bf16_attention": args.bf16_attention, "plain_s": round(plain, 3), "profiled_s": round(profiled, 3),
              "tok_s": round(tok_s, 1), "self_cpu_s": round(total_us / 1e6, 3),
              "groups": {g: round(us / 1e6, 3) for g, us in groups.items()},
              "top_ops": [{"op": e.key, "count": e.count, "self_cpu_s": round(e.self_cpu_time_total / 1e6, 4)} for e in top]}
    emit(result, {"groups": (["group", "self CPU s", "share"], gtable),
                  "ops": (["op", "calls", "self CPU s", "share", "us / call"], otable)}, out=args.out)


if __name__ == "__main__":
    main()
