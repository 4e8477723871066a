"""How decoding rows read the KV cache, on the CPU: one attention layer of a decode step whose rows have spread
lengths, as the sampler meets them mid-rollout (rows admitted at different times, prompts and answers of
different lengths).

    python benchmarks/bench_kv_read.py [--rows 32 64] [--repeats 3] [--threads 1] [--sampler]

One Gemma-2-9B attention layer (16 query heads, 8 KV heads, head_dim 256, softcap 50), max_length 2048, row
lengths uniform in [150, 2048] (seeded). Three reads of the same keys and values, through PagedKVCache.plan and
StepView.attend exactly as the sampler runs them:
  dense   the CPU default layout: one block per row, read as a slice up to the longest row;
  gather  paged (blocks of 16): each row's blocks up to the longest row's count, gathered, then SDPA;
  flex    paged: FlexAttention over the pool, visiting only each row's live blocks (compiled once, not timed).
Per read: the step's plan (host), the layer's attention (write the new keys, read, attend), the KV bytes it reads
against the live bytes, and its output's largest difference from dense. Each timing is the median of --calls
calls; the --repeats repeats are interleaved and the spread (min-max) printed.

--sampler adds the Sampler end to end on Gemma 3 270M's shape (random fp32 weights, 18 layers: 15 sliding with a
window of 512, 3 full): 8 prompts of 128 tokens x 4 samples = 32 rows, each prompt's samples with their own
budget of 64, 128, ..., 512 new tokens (rows end at staggered lengths), temperature 1; tokens/s with the dense
layout (the CPU default, which runs every slot to the end), paged + gather and paged + flex (flex's compiles done
in a warm-up), and how many rows' tokens equal dense's (random weights spread the probability over 262k ids,
so a rounding difference between the reads moves a draw now and then). Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mdpo.model import PRESETS  # noqa: E402
from mdpo.paged import Feeds, PagedKVCache  # noqa: E402

MAX_LENGTH, BS = 2048, 16


def setup(kind: str, config, lengths: np.ndarray, dtype, seed: int, device="cpu"):
    """A cache holding rows of `lengths` tokens (random keys and values), and one decode step's inputs (also
    benchmarks/gpu_check.py's)."""
    R = len(lengths)
    cache = PagedKVCache(config, R, MAX_LENGTH, MAX_LENGTH if kind == "dense" else BS, dtype=dtype, device=device,
                         attention="flex" if kind == "flex" else "gather")
    for r, n in enumerate(lengths.tolist()):
        assert cache.ensure(r, 0, int(n))
    H, H_kv, D = config.num_heads, config.num_kv_heads, config.head_dim
    g = torch.Generator(device=device).manual_seed(seed)  # drawn where they live: GBs for the GPU check's rows
    for r, n in enumerate(lengths.tolist()):  # the same keys and values at the same (row, position) in every layout
        kv = torch.randn(2, n, H_kv, D, generator=g, device=device).to(dtype)
        for grp in cache.groups:
            for j, b in enumerate(grp.tables[r]):
                a, e = j * cache.bs, min(n, (j + 1) * cache.bs)
                grp.k[0][b, : e - a], grp.v[0][b, : e - a] = kv[0, a:e], kv[1, a:e]
    q, k, v = (torch.randn(1, h, R, D, generator=g, device=device).to(dtype) for h in (H, H_kv, H_kv))
    feeds = Feeds(np.arange(R), lengths - 1, np.ones(R, dtype=np.int64), np.zeros(R, dtype=np.int64))
    return cache, feeds, (q, k, v)


def read_bytes(kind: str, lengths: np.ndarray, per_token: int) -> int:
    """KV bytes a read touches in the pool (the gather then copies them and SDPA reads the copy again)."""
    if kind == "dense":
        return len(lengths) * int(lengths.max()) * per_token
    if kind == "gather":
        return len(lengths) * int(-(-lengths.max() // BS)) * BS * per_token
    return int((-(-lengths // BS)).sum()) * BS * per_token


def median_ms(fn, calls: int) -> float:
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def sampler_rollout(threads: int) -> dict:
    """Part 2 (--sampler): the three reads end to end, one run each after a warm-up (see the module docstring)."""
    from mdpo import synth
    from mdpo.model import ModelConfig, build_model
    from mdpo.sampler import Request, Sampler, SamplingParams
    from mdpo.tokenizer import Tokenizer
    tok = Tokenizer(synth.train_tokenizer([f"{i} plus {i} is {2 * i}." for i in range(200)], vocab_size=512))
    model = build_model(ModelConfig.from_name("gemma-3-270m"), seed=0).eval()
    g = torch.Generator().manual_seed(0)
    reqs = [Request(f"p{i}", [2] + torch.randint(3, 512, (127,), generator=g).tolist(), n=4,
                    params=SamplingParams(temperature=1.0, max_new_tokens_per_turn=64 * (i + 1)))
            for i in range(8)]
    out, trajs = {}, {}
    for name, kw in (("dense", {}), ("gather", {"block_size": 16}), ("flex", {"block_size": 16, "attention": "flex"})):
        s = Sampler(model, tok, batch_size=32, max_length=128 + 512 + 8, seed=0, **kw)
        s.stop_ids = set()
        warm = [Request(r.prompt_id, r.tokens, n=4, params=SamplingParams(temperature=1.0, max_new_tokens_per_turn=8))
                for r in reqs]
        list(s.generate(warm))  # flex: compiles its row buckets here
        t0 = time.perf_counter()
        got = list(s.generate(reqs))
        dt = time.perf_counter() - t0
        trajs[name] = {(t.prompt_id, t.sample_id): t.tokens for t in got}
        new = sum(len(t.tokens) - 128 for t in got)
        out[name] = {"tok_per_s": round(new / dt, 1), "wall_s": round(dt, 1), "new_tokens": new}
    for name in ("gather", "flex"):
        same = sum(trajs[name][k] == v for k, v in trajs["dense"].items())
        out[name]["rows_as_dense"] = f"{same}/{len(trajs['dense'])}"
        out[name]["speed_vs_dense"] = round(out[name]["tok_per_s"] / out["dense"]["tok_per_s"], 2)
    print(f"\nthe Sampler end to end, Gemma 3 270M shape (fp32, random weights), 32 rows of 128 + 64..512 tokens, "
          f"{threads} thread(s)")
    print(f"{'read':7} {'tok/s':>8} {'wall s':>7} {'vs dense':>9} {'rows as dense':>14}")
    for name, r in out.items():
        print(f"{name:7} {r['tok_per_s']:8.1f} {r['wall_s']:7.1f} {r.get('speed_vs_dense', 1.0):8.2f}x "
              f"{r.get('rows_as_dense', ''):>14}")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sampler", action="store_true", help="also the Sampler end to end (a few minutes)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    config = dataclasses.replace(PRESETS["gemma-2-9b"], num_layers=1, layer_types=["full"])
    scale = config.query_pre_attn_scalar ** -0.5
    kinds = ("dense", "gather", "flex")
    rows_out = []
    print(f"one Gemma-2-9B attention layer, lengths uniform in [150, {MAX_LENGTH}], {args.threads} thread(s), "
          f"median of {args.calls} calls, best and spread of {args.repeats} interleaved repeats")
    print(f"{'dtype':9} {'rows':>4} {'read':7} {'plan ms':>8} {'attend ms':>10} {'spread':>13} {'read/live':>9} "
          f"{'vs dense':>9} {'max diff':>9}")
    with torch.inference_mode():
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            per_token = 2 * config.num_kv_heads * config.head_dim * dtype.itemsize
            for R in args.rows:
                lengths = np.random.default_rng(R).integers(150, MAX_LENGTH + 1, R)
                live = int(lengths.sum()) * per_token
                runs, outs = {}, {}
                for kind in kinds:
                    cache, feeds, (q, k, v) = setup(kind, config, lengths, dtype, seed=R)
                    view = cache.plan(feeds, pad_to=R if kind == "flex" else None)
                    # A step's masks are made at its first layer and shared by the others: a kept view times
                    # what every further layer costs.
                    attend = (lambda vw=view, qkv=(q, k, v): vw.attend(0, *qkv, scale, config.attn_softcap, None,
                                                                        "sdpa"))
                    outs[kind] = attend().float()  # flex compiles here
                    runs[kind] = (cache, feeds, attend, [], [])
                for _ in range(args.repeats):
                    for kind in kinds:
                        cache, feeds, attend, plans, att = runs[kind]
                        plans.append(median_ms(lambda: cache.plan(feeds, pad_to=R if kind == "flex" else None),
                                               args.calls))
                        att.append(median_ms(attend, args.calls))
                dense_ms = min(runs["dense"][4])
                for kind in kinds:
                    _, _, _, plans, att = runs[kind]
                    row = {"dtype": dtype_name, "rows": R, "read": kind, "plan_ms": round(min(plans), 3),
                           "attend_ms": round(min(att), 2), "attend_spread_ms": [round(min(att), 2),
                                                                                 round(max(att), 2)],
                           "read_over_live": round(read_bytes(kind, lengths, per_token) / live, 3),
                           "speed_vs_dense": round(dense_ms / min(att), 2),
                           "max_diff_vs_dense": float((outs[kind] - outs["dense"]).abs().max())}
                    rows_out.append(row)
                    print(f"{dtype_name:9} {R:4d} {kind:7} {row['plan_ms']:8.3f} {row['attend_ms']:10.2f} "
                          f"{row['attend_spread_ms'][0]:6.2f}-{row['attend_spread_ms'][1]:<6.2f} "
                          f"{row['read_over_live']:9.3f} {row['speed_vs_dense']:8.2f}x {row['max_diff_vs_dense']:9.1e}")
    sampler = sampler_rollout(args.threads) if args.sampler else None
    print(json.dumps({"bench": "kv_read", "threads": args.threads, "rows": rows_out, "sampler": sampler}))


if __name__ == "__main__":
    main()
