"""Rollout-engine benchmarks on the CPU: the Sampler's host work per decode step, and multi-turn throughput,
each against earlier Samplers (git revisions; default the one before issue 11, and session 8's) in the same run.

    python benchmarks/bench_rollout.py [--baselines REV ...] [--repeats 3] [--threads 1]

1. Host overhead: the `tiny-gemma` preset (random weights), 256 rows (32 prompts x 8 samples, 8-token
   prompts), temperature 1, no tools, 128 new tokens, one thread. Per decode step: the sampler's wall time
   divided by its decode steps, minus the time of the model step it runs, alone, at the same shape (B = 256,
   one token, the mean attended length), with the net it ran (on the CPU the model's oneDNN-packed twin): the
   model's KVCache forward for samplers before session 8, the packed step over a dense paged pool after, under
   no_grad or inference_mode as the sampler runs it (model_step), timed as the mean of 128 back-to-back calls
   like the sampler's steps (mean_ms), attention masks made inside. What is left is the sampler's host work:
   scheduling, building the step's inputs, sampling, reading tokens back, recording them, detokenising and
   scanning rows' text.
2. Multi-turn: 64 rows, each a scripted trajectory of 3 tool calls (forced tokens through the `choose` hook,
   which still samples every token first; a stub tool answers at once with ~40 tokens), tokens/s.
3. KV memory (today's Sampler only): bytes the paged pool holds per live token, against the ideal (kv_memory).
A baseline is the Sampler source at a git revision, imported beside the current mdpo (its other modules are
today's). Each measurement is repeated --repeats times, interleaved, best kept; the spread is printed.
Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mdpo import synth  # noqa: E402
from mdpo.model import ModelConfig, KVCache, build_model  # noqa: E402
from mdpo.sampler import Request, SamplingParams  # noqa: E402
from mdpo.tokenizer import Tokenizer  # noqa: E402
from common import StubExecutor  # noqa: E402  (benchmarks/common.py)


def sampler_class(rev: str | None):
    """The Sampler class of mdpo/sampler.py at git revision `rev` (None: today's)."""
    if rev is None:
        from mdpo.sampler import Sampler
        return Sampler
    src = subprocess.run(["git", "show", f"{rev}:mdpo/sampler.py"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    name = f"sampler_{rev}"  # one module per revision: model_step() looks each class's module up
    path = Path(tempfile.mkdtemp()) / f"{name}.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # its dataclasses look their module up while being built
    spec.loader.exec_module(mod)
    return mod.Sampler


def mean_ms(fn, steps: int = 128, repeats: int = 3) -> float:
    """Mean time of `steps` back-to-back calls, best of `repeats` runs: measured the way a sampler's step is (its
    run's wall time over its steps, best of the runs), so the jitter of single calls is in both or in neither."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        best = min(best, (time.perf_counter() - t0) / steps)
    return best * 1e3


def forward_ms(model, rows: int, kv_len: int) -> float:
    """The model's decode forward + head alone at (rows, 1) attending kv_len slots (ms, mean_ms)."""
    cache = KVCache(model.config, rows, kv_len, model.embed_tokens.weight.dtype)
    tokens = torch.randint(3, model.config.vocab_size, (rows, 1))
    pos = torch.full((rows, 1), kv_len - 1)
    return mean_ms(lambda: model.head(model(tokens, positions=pos, cache=cache, return_hidden=True,
                                            kv_len=kv_len)[:, 0]).float())


def packed_forward_ms(model, rows: int, max_length: int, kv_len: int, inference: bool) -> float:
    """The packed step (mdpo.paged, what samplers from session 8 on run) + head alone, `rows` rows decoding one
    token each at position kv_len - 1 of a dense pool (ms, mean_ms), under inference_mode or no_grad."""
    with torch.inference_mode() if inference else torch.no_grad():
        return _packed_forward_ms(model, rows, max_length, kv_len)


def _packed_forward_ms(model, rows: int, max_length: int, kv_len: int) -> float:
    from mdpo.paged import Feeds, PagedKVCache
    from mdpo.sampler import step_logits
    kv = PagedKVCache(model.config, rows, max_length, max_length, None, model.embed_tokens.weight.dtype)
    tokens = torch.randint(3, model.config.vocab_size, (rows,)).numpy()
    view = kv.plan(Feeds(np.arange(rows), np.full(rows, kv_len - 1), np.ones(rows, dtype=np.int64), tokens))

    def step():
        view._masks.clear()  # the attention masks are made in each step's forward: part of the model step
        step_logits(model, view)
    return mean_ms(step)


def model_step(cls) -> str:
    """How a Sampler class runs the model: "kvcache" (the model's own KVCache forward, before session 8),
    "packed" (packed steps over a paged cache, under no_grad) or "packed_inference" (the same under
    inference_mode, session 9 on): the reference its host work is measured against."""
    if not hasattr(sys.modules[cls.__module__], "step_logits"):
        return "kvcache"
    return "packed_inference" if "inference_mode" in inspect.getsource(cls.generate) else "packed"


def host_overhead(classes, model, tok, new: int, repeats: int):
    prompts = [[2] + torch.randint(3, 512, (7,), generator=torch.Generator().manual_seed(i)).tolist()
               for i in range(32)]
    reqs = [Request(f"p{i}", p, n=8) for i, p in enumerate(prompts)]
    params = SamplingParams(temperature=1.0, max_new_tokens_per_turn=new)
    times = {name: [] for name in classes}
    steps = {}
    ref = {"kvcache": float("inf"), "packed": float("inf"), "packed_inference": float("inf")}
    for _ in range(repeats):
        for name, cls in classes.items():
            s = cls(model, tok, batch_size=256, max_length=8 + new + 8, seed=0)
            s.stop_ids = set()  # exactly `new` tokens a row
            list(s.generate(reqs[:1], SamplingParams(temperature=1.0, max_new_tokens_per_turn=2)))  # warm-up
            s.stats["decode_steps"] = 0
            t0 = time.perf_counter()
            list(s.generate(reqs, params))
            times[name].append(time.perf_counter() - t0)
            steps[name] = s.stats["decode_steps"]
        # The net the sampler ran (on the CPU its oneDNN-packed twin), timed between the runs: the VM drifts.
        with torch.no_grad():
            ref["kvcache"] = min(ref["kvcache"], forward_ms(s.net, 256, 8 + new // 2))
        for inference in (False, True):
            key = "packed_inference" if inference else "packed"
            ref[key] = min(ref[key], packed_forward_ms(s.net, 256, 8 + new + 8, 8 + new // 2, inference))
    out = {}
    for name, cls in classes.items():
        per_step = [t / steps[name] * 1e3 for t in times[name]]
        own = ref[model_step(cls)]  # host work: what the sampler adds to its own model step
        out[name] = {"step_ms": min(per_step), "step_ms_max": max(per_step), "model_step": model_step(cls),
                     "model_step_ms": own, "host_ms": min(per_step) - own, "references_ms": ref,
                     "decode_steps": steps[name]}
    return out


def multiturn(classes, model, tok, repeats: int, rows: int = 64, calls: int = 3):
    code = tok.encode("Let me compute.\n```python\nx = 12 * 50\nprint(x)\n```")
    script = code * calls + tok.encode("So \\boxed{600}.") + [tok.end_of_turn_id]
    obs = " ".join(str(i * 37 % 100) for i in range(30))
    prompts = [tok.encode(tok.render_chat([{"role": "user", "content": f"Question {i}: what is 12 * 50?"}]))
               for i in range(rows)]
    times = {name: [] for name in classes}
    tokens = {}
    for _ in range(repeats):
        for name, cls in classes.items():
            pos: dict = {}

            def choose(pid, sid, generated, pos=pos):
                i = pos.get(pid, 0)
                pos[pid] = i + 1
                return script[i] if i < len(script) else None

            s = cls(model, tok, batch_size=rows, max_length=1024, executor=StubExecutor(obs), choose=choose, seed=0)
            t0 = time.perf_counter()
            trajs = list(s.generate([Request(f"m{i}", p) for i, p in enumerate(prompts)],
                                    SamplingParams(temperature=1.0)))
            times[name].append(time.perf_counter() - t0)
            tokens[name] = sum(len(t.tokens) for t in trajs) - sum(map(len, prompts))
            assert all(t.num_turns == calls + 1 for t in trajs), [t.finish_reason for t in trajs][:4]
    return {name: {"tok_per_s": tokens[name] / min(times[name]), "tok_per_s_min": tokens[name] / max(times[name]),
                   "tokens": tokens[name]} for name in classes}


def kv_memory(tok, n: int = 8, prompt: int = 150, new: int = 700, block_size: int = 16):
    """KV bytes a paged pool holds per live token: N samples of one prompt on the KV shape of Gemma 3 270M (18
    layers, 15 of them sliding with a window of 512; 1 KV head of 256), against the ideal: every distinct live
    token once (the shared prompt once, each sample's own tokens), on sliding layers only the positions a query
    of the step can still see. Sampled each step from the sampler's own pool (a small body, the same KV shape:
    the accounting does not depend on the rest), and against a dense cache of the same rows."""
    cfg = ModelConfig.from_name("gemma-3-270m", vocab_size=512, hidden_size=64, intermediate_size=64, num_heads=1)
    model = build_model(cfg, seed=0).eval()
    s_cls = sampler_class(None)
    max_length = prompt + new + 1
    s = s_cls(model, tok, batch_size=n, max_length=max_length, block_size=block_size, seed=0, pack=False)
    s.stop_ids = set()
    kv, W = s.kv, cfg.sliding_window
    per_token = {id(g): s.kv.bytes_per_block(g) // block_size for g in kv.groups}
    ratios, ideals, own = [], [], []
    plan = kv.plan

    def measured_plan(feeds, **kw):  # the blocks held for this step's forward, after last step's trim
        view = plan(feeds, **kw)
        ends = (feeds.starts + feeds.lens).tolist()
        if len(ends) == n:
            ideal = 0
            for g in kv.groups:
                if g.window is None:
                    live = prompt + sum(e - prompt for e in ends)
                else:  # the positions this step's queries see: [end - W, end) per row; the prompt's part once
                    live = max(0, max(prompt - max(0, e - W) for e in ends)) + sum(min(W, max(0, e - prompt))
                                                                                  for e in ends)
                ideal += live * per_token[id(g)]
            ratios.append(kv.held_bytes() / ideal)
            ideals.append(ideal)
            own.append(min(ends) - prompt)
        return view

    kv.plan = measured_plan
    list(s.generate([Request("p", [2] + list(range(3, prompt + 2)), n=n)],
                    SamplingParams(temperature=1.0, max_new_tokens_per_turn=new)))
    dense_bytes = n * max_length * model.kv_bytes_per_token()
    ideal_end = ideals[-1]
    return {"rows": n, "prompt": prompt, "new": new, "block_size": block_size, "ratio_max": max(ratios),
            "ratio_mean": sum(ratios) / len(ratios),
            # once every sample has a block of its own tokens (before, a private block per sample is mostly empty)
            "ratio_max_after_first_block": max(r for r, o in zip(ratios, own) if o >= block_size), "ratio_end": ratios[-1], "steps": len(ratios),
            "dense_ratio_end": dense_bytes / ideal_end, "cow_copies": kv.stats["cow_copies"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--baselines", nargs="+", default=["25b1692", "2d1cbc2"],
                    help="git revisions of the Sampler to compare against (the first is the reference)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--new", type=int, default=128)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    texts = [f"{i} plus {i + 1} is {2 * i + 1}. ```python\nprint({i})\n``` Question {i}: what is 12 * 50?"
             for i in range(400)]
    tok = Tokenizer(synth.train_tokenizer(texts, vocab_size=512))
    model = build_model(ModelConfig.from_name("tiny-gemma"), seed=0).eval()
    classes = {rev: sampler_class(rev) for rev in args.baselines} | {"current": sampler_class(None)}
    host = host_overhead(classes, model, tok, args.new, args.repeats)
    multi = multiturn(classes, model, tok, args.repeats)
    kvm = kv_memory(tok)
    names = list(classes)
    ref = names[0]
    print("| measurement | " + " | ".join(names) + f" | x ({ref} / current) |")
    print("|---" * (len(names) + 2) + "|")
    cell = lambda d, k, kmax: f"{d[k]:.2f} ({d[k]:.2f}-{d[kmax]:.2f})"  # noqa: E731
    print("| decode step, 256 rows (ms; spread) | " + " | ".join(cell(host[n], "step_ms", "step_ms_max") for n in names)
          + f" | {host[ref]['step_ms'] / host['current']['step_ms']:.2f} |")
    print("| the model step alone, as the sampler runs it (ms) | " + " | ".join(
        f"{host[n]['model_step_ms']:.2f} ({host[n]['model_step']})" for n in names) + " | |")
    print("| host work per step: step - its own model step (ms) | " + " | ".join(f"{host[n]['host_ms']:.2f}" for n in names)
          + f" | {host[ref]['host_ms'] / host['current']['host_ms']:.2f} |")
    print("| multi-turn, 64 rows x 3 calls (tok/s; spread) | " + " | ".join(
        f"{multi[n]['tok_per_s']:.0f} ({multi[n]['tok_per_s_min']:.0f}-{multi[n]['tok_per_s']:.0f})" for n in names)
        + f" | {multi['current']['tok_per_s'] / multi[ref]['tok_per_s']:.2f} |")
    print(f"| KV held / ideal, {kvm['rows']} samples of a {kvm['prompt']}-token prompt, Gemma 3 KV shape, blocks of "
          f"{kvm['block_size']} (mean; end; max once each sample has a block) | " + " | " * (len(names) - 1)
          + f"{kvm['ratio_mean']:.3f}; {kvm['ratio_end']:.3f}; {kvm['ratio_max_after_first_block']:.3f} (dense: "
          f"{kvm['dense_ratio_end']:.2f} at the end) | |")
    print(json.dumps({"bench": "rollout", "threads": args.threads, "baselines": args.baselines, "host": host,
                      "multiturn": multi, "kv_memory": kvm}))


if __name__ == "__main__":
    main()
