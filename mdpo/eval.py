"""Evaluate a model as a tool-using math agent on GSM8K / MATH / MATH-500 or a JSONL file.

    python -m mdpo.eval --model DIR --data gsm8k --limit 100 --out runs/eval/gsm8k [--n 4 --temperature 0.7]
    python -m mdpo.eval --model RLHF4MATH/Gemma-7B-it-SFT3epoch --data math500 --out runs/eval/m500

--model is a folder or a Hugging Face Hub id (mdpo.hub); --data a dataset name, fetched into the data dir on
first use (mdpo.datasets), or a file.

Each problem is rendered with the model's chat template (no system prompt, as in the paper), sampled with
the interpreter in the loop, graded (mdpo.grader), and written as one trajectory per line to
OUT/trajectories.jsonl as soon as it finishes; rerunning with the same --out skips what is already there.
OUT/metrics.json holds pass@1 (and pass@k / maj@k when n > 1), MATH accuracy per level and subject, and
tool-use statistics. Bad flags or files exit with status 2 and one line naming the problem.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter, defaultdict
from pathlib import Path

import torch
from tqdm import tqdm

from mdpo import faults
from mdpo.atomic import atomic_open, write_json_atomic
from mdpo.config import CHOICES
from mdpo.datasets import DatasetError, load_problems
from mdpo.distributed import default_device
from mdpo.grader import extract_answer, is_equiv
from mdpo.hub import HubError, resolve_model
from mdpo.textfile import read_lines
from mdpo.tokenizer import TokenizerError
from mdpo.trajectory import Role, Trajectory, TrajectoryError
from mdpo.weights import DTYPES, CheckpointError, load_pretrained, parse_dtype, resident_model


class EvalError(ValueError):
    """Bad input to the evaluation: the message names the flag, file or line."""


def final_turn_text(t: Trajectory, tokenizer) -> str:
    """Text of the last model turn, the part the answer is extracted from.

    After the last allowed tool call that turn is the injected "Reach max function call limit." (TEMPLATE
    tokens), which holds no answer, so such a trajectory grades as wrong, as in the paper.
    """
    last = max(t.turns, default=0)
    model_ids = [tok for tok, turn, r in zip(t.tokens, t.turns, t.roles) if turn == last and r == Role.MODEL]
    if model_ids:
        return tokenizer.decode([i for i in model_ids if i not in tokenizer.stop_ids])
    template = [tok for tok, turn, r in zip(t.tokens, t.turns, t.roles) if turn == last and r == Role.TEMPLATE]
    return tokenizer.decode(template, skip_special_tokens=True)


def grade_trajectory(t: Trajectory, gold: str, tokenizer) -> None:
    """Set t.answer and t.correct. A trajectory that began writing the user's (the tool's) turn itself
    (mdpo.sampler.MALFORMED_ENDINGS) is wrong whatever it answered: it invented its own observation."""
    from mdpo.sampler import MALFORMED_ENDINGS

    t.answer = extract_answer(final_turn_text(t, tokenizer))
    t.correct = t.answer is not None and t.finish_reason not in MALFORMED_ENDINGS and is_equiv(t.answer, gold)


def majority(answers: list[str | None]) -> str | None:
    """The most common answer, clustering equivalent answers (first one of a cluster represents it)."""
    reps: list[str] = []
    counts: Counter = Counter()
    for a in answers:
        if a is None:
            continue
        for r in reps:
            if a == r or is_equiv(a, r):
                counts[r] += 1
                break
        else:
            reps.append(a)
            counts[a] += 1
    return counts.most_common(1)[0][0] if counts else None


def compute_metrics(trajectories: list[Trajectory], problems: list[dict], n: int) -> dict:
    """pass@1, pass@n, maj@n, per level and subject, tool statistics."""
    by_id = defaultdict(list)
    for t in trajectories:
        by_id[t.prompt_id].append(t)
    info = {p["id"]: p for p in problems}
    per_problem = []
    for pid, ts in by_id.items():
        p = info[pid]
        maj = majority([t.answer for t in ts])
        per_problem.append({"level": p["level"], "subject": p["subject"],
                            "pass1": sum(bool(t.correct) for t in ts) / len(ts),
                            "passn": any(t.correct for t in ts),
                            "majn": maj is not None and is_equiv(maj, p["gold"])})
    m = {"problems": len(per_problem), "samples": len(trajectories), "n": n}
    if not per_problem:
        return m
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    m["pass@1"] = mean([x["pass1"] for x in per_problem])
    if n > 1:
        m[f"pass@{n}"] = mean([float(x["passn"]) for x in per_problem])
        m[f"maj@{n}"] = mean([float(x["majn"]) for x in per_problem])
    for key in ("level", "subject"):
        groups = defaultdict(list)
        for x in per_problem:
            if x[key] is not None:
                groups[x[key]].append(x["pass1"])
        if groups:
            m[f"by_{key}"] = {k: {"pass@1": mean(v), "problems": len(v)} for k, v in sorted(groups.items())}
    status = Counter(s for t in trajectories for s in t.meta.get("tool_status", []))
    calls = sum(status.values())
    m["tools"] = {
        "mean_turns": mean([t.num_turns for t in trajectories]),
        "calls_per_trajectory": calls / len(trajectories),
        "trajectories_with_code": mean([float(bool(t.meta.get("tool_status"))) for t in trajectories]),
        "error_rate": status["error"] / calls if calls else 0.0,
        "timeout_rate": status["timeout"] / calls if calls else 0.0,
        "status_counts": dict(status),
    }
    m["finish_reasons"] = dict(Counter(t.finish_reason for t in trajectories))
    return m


def read_done(path: Path) -> list[Trajectory]:
    """Trajectories already written by an earlier run; a torn last line (a killed run) is dropped."""
    if not path.exists():
        return []
    # Split on "\n" only (read_lines): a JSON string may hold U+2028, which str.splitlines would cut at.
    lines = [line for _, line in read_lines(path, EvalError, "JSONL")]
    done = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if i == len(lines) and not line.endswith("\n"):
            break  # torn by a kill mid-write: that sample is simply redone
        try:
            done.append(Trajectory.from_json(line, f"{path}:{i}"))
        except TrajectoryError as e:
            raise EvalError(str(e)) from None
    if lines and not lines[-1].endswith("\n"):
        with atomic_open(path) as f:  # drop the torn line so appends stay line-aligned; never half-rewritten
            f.writelines(lines[:-1])
    return done


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m mdpo.eval", description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="HF-layout folder with tokenizer.model, or a Hugging Face Hub id")
    ap.add_argument("--data", default="gsm8k", help="gsm8k, math, math500, or a JSONL / Parquet path")
    ap.add_argument("--data-dir", default=None,
                    help="where gsm8k/ and math/ live (default: $MDPO_DATA, else ~/.cache/mdpo/data; missing files "
                         "are downloaded there)")
    ap.add_argument("--limit", type=int, default=None, help="first N problems only")
    ap.add_argument("--n", type=int, default=1, help="samples per problem")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--max-turns", type=int, default=6)
    ap.add_argument("--max-new-tokens", type=int, default=512, help="per model turn")
    ap.add_argument("--max-length", type=int, default=2048, help="per trajectory")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--timeout", type=float, default=20.0, help="interpreter wall-clock limit per cell (s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                    help="compute dtype (default: the dtype the checkpoint was saved in)")
    ap.add_argument("--out", required=True, help="output folder (resumable)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the decode step (~1 min, then faster)")
    ap.add_argument("--kv-block-size", type=int, default=None,
                    help="KV cache block size (default: 16 on CUDA, dense on CPU; >= --max-length: dense)")
    ap.add_argument("--kv-cache-gb", type=float, default=None,
                    help="paged KV pool size (default: --batch-size rows of --max-length, at most 90%% of free GPU memory)")
    ap.add_argument("--kv-attention", default="gather", choices=CHOICES["rollout.kv_attention"],
                    help="how decoding rows read a paged pool: padded gather, or FlexAttention over live blocks only")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        for flag in ("limit", "n", "max_turns", "max_new_tokens", "max_length", "batch_size"):
            v = getattr(args, flag)
            if v is not None and v < 1:
                raise EvalError(f"--{flag.replace('_', '-')} must be >= 1, got {v}")
        if args.temperature < 0 or not 0 < args.top_p <= 1:
            raise EvalError("--temperature must be >= 0 and --top-p in (0, 1]")
        if args.kv_block_size is not None and args.kv_block_size < 1:
            raise EvalError(f"--kv-block-size must be >= 1, got {args.kv_block_size}")
        if args.kv_attention == "flex":  # what the sampler would refuse after loading the model
            if args.compile:
                raise EvalError("--compile and --kv-attention flex do not go together (flex compiles its own kernel)")
            block = 16 if args.kv_block_size is None else args.kv_block_size
            if not 2 <= block < args.max_length:
                raise EvalError(f"--kv-attention flex reads a paged KV pool: --kv-block-size {block} must be >= 2 "
                                f"and < --max-length {args.max_length}")
        return run(args)
    except (EvalError, DatasetError, HubError, CheckpointError, TokenizerError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def prefix_problem(t: Trajectory, cut: int, gold: str) -> dict:
    """A sampling job for continuations of t.tokens[:cut] (a cut where a model turn begins): a problem whose
    id names the branch point, with the prefix's tokens, roles, turns and the tool calls it made (replayed by
    the sampler) and statuses. Its continuations carry meta["branch"] = cut and meta["source"] = t's prompt."""
    calls = t.meta.get("calls")
    made = len({turn for role, turn in zip(t.roles[:cut], t.turns[:cut]) if role == Role.TOOL})
    if calls is None or len(calls) < made:
        raise EvalError(f"trajectory {t.prompt_id}/{t.sample_id}: no record of the {made} tool calls before "
                        f"position {cut} (meta['calls'], written by mdpo.sampler): resample it to branch from it")
    return {"id": f"{t.prompt_id}>{t.sample_id}@{cut}", "question": None, "gold": gold,
            "prefix": {"tokens": t.tokens[:cut], "roles": t.roles[:cut], "turns": t.turns[:cut],
                       "calls": calls[:made], "tool_status": t.meta.get("tool_status", [])[:made],
                       "source": t.prompt_id, "parent": t.sample_id}}


def sample_graded(model_path, problems: list[dict], path, n: int | range, params, batch_size: int = 8, seed: int = 0,
                  timeout: float = 20.0, dtype: torch.dtype | None = None, desc: str = "sample",
                  compile: bool = False, empty_output: str | None = None, kv: dict | None = None) -> list[Trajectory]:
    """`n` graded trajectories per problem, appended to the JSONL `path` one by one as they finish.

    A problem with a "prefix" (prefix_problem) is a continuation job: its samples start from that prefix.

    empty_output: what the model is shown when a cell prints nothing (None: mdpo.tools.EMPTY_OUTPUT, the paper's).

    dtype: the model's compute dtype (the pipeline passes model.dtype); None: the dtype the checkpoint was saved in.

    kv: the Sampler's KV-cache options (block_size, kv_cache_gb, prefill_chunk, attention); its plan is printed once.

    n: a count (sample ids 0..n-1) or a range of sample ids, so that two models' samples of one prompt can
    carry distinct ids.

    Samples already in `path` (an earlier, interrupted run) are kept and only the missing ones are drawn, under
    their original sample ids, so a resumed run neither loses nor duplicates work. Returns all trajectories.
    """
    from mdpo.executor import ExecutorPool, announce_sandbox
    from mdpo.tools import PythonTool
    from mdpo.sampler import Request, Sampler
    from mdpo.tokenizer import load_tokenizer

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    done = read_done(path)
    ids = {p["id"] for p in problems}
    sample_ids = range(n) if isinstance(n, int) else n
    done = [t for t in done if t.prompt_id in ids and t.sample_id in sample_ids]
    finished = {(t.prompt_id, t.sample_id) for t in done}
    todo = [(p, [s for s in sample_ids if (p["id"], s) not in finished]) for p in problems]
    todo = [(p, missing) for p, missing in todo if missing]
    if not todo:
        return done
    # Under torchrun each rank samples on its own GPU (the trainer set the current device); else the CPU.
    device = default_device()
    # The weights this process has just trained, when these are they (mdpo.weights.keep_resident): no reload.
    model = resident_model(model_path, dtype, device) or load_pretrained(model_path, dtype=dtype, device=device)
    model.eval()
    tok = load_tokenizer(model_path)

    def request(p, missing):
        pre = p.get("prefix")
        if pre is None:
            return Request(p["id"], tok.encode(tok.render_chat([{"role": "user", "content": p["question"]}])),
                           n=len(missing), sample_ids=missing)
        return Request(p["id"], list(pre["tokens"]), n=len(missing), sample_ids=missing, roles=pre["roles"],
                       turns=pre["turns"], replay=pre["calls"],
                       meta={"branch": len(pre["tokens"]), "source": pre["source"], "parent": pre["parent"],
                             "tool_status": pre["tool_status"]})

    requests = [request(p, missing) for p, missing in todo]
    gold = {p["id"]: p["gold"] for p in problems}
    results = list(done)
    announce_sandbox()  # which isolation the cells get, printed once per process (the pipeline's run did it first)
    with ExecutorPool(max_workers=batch_size, timeout=timeout) as pool, \
            open(path, "a", encoding="utf-8") as f, \
            tqdm(total=sum(len(m) for _, m in todo), desc=desc, unit="traj") as bar:
        # The paper's tool: the sandboxed interpreter (mdpo.tools makes what the model is shown of its output).
        sampler = Sampler(model, tok, batch_size=batch_size, max_length=params.max_length,
                          tool=PythonTool(pool, empty_output=empty_output),
                          seed=seed, model_name=str(model_path), compile=compile, **(kv or {}))
        tqdm.write(sampler.memory_plan())
        for t in sampler.generate(requests, params):
            grade_trajectory(t, gold[t.prompt_id], tok)
            faults.write(f, t.to_json() + "\n", "rollout.append")
            f.flush()
            os.fsync(f.fileno())  # a finished trajectory survives a kill
            results.append(t)
            bar.update(1)
            bar.set_postfix(acc=f"{sum(bool(x.correct) for x in results) / len(results):.3f}")
    return results


def run(args) -> int:
    from mdpo.sampler import SamplingParams

    model = resolve_model(args.model)  # before the data: a bad --model fails fast, without a download
    if not Path(model).is_dir():
        raise EvalError(f"--model {args.model}: no such folder")
    problems = load_problems(args.data, args.data_dir)[: args.limit]
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise EvalError(f"--out {out}: is a file, not a folder")
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p,
                            max_new_tokens_per_turn=args.max_new_tokens, max_turns=args.max_turns,
                            max_length=args.max_length)
    results = sample_graded(model, problems, out / "trajectories.jsonl", args.n, params,
                            batch_size=args.batch_size, seed=args.seed, timeout=args.timeout,
                            dtype=args.dtype and parse_dtype(args.dtype), desc=f"eval {args.data}", compile=args.compile,
                            kv={"block_size": args.kv_block_size, "kv_cache_gb": args.kv_cache_gb,
                                "attention": args.kv_attention})
    metrics = compute_metrics(results, problems, args.n)
    metrics.update(model=str(args.model), data=args.data, temperature=args.temperature, max_turns=args.max_turns)
    write_json_atomic(out / "metrics.json", metrics)
    print(f"{args.data}: {metrics['problems']} problems, {metrics['samples']} samples")
    for k in dict.fromkeys(("pass@1", f"pass@{args.n}", f"maj@{args.n}")):  # n = 1: pass@1 once
        if k in metrics:
            print(f"  {k:8s} {100 * metrics[k]:.1f}%")
    for key in ("by_level", "by_subject"):
        for name, v in metrics.get(key, {}).items():
            print(f"  {name:28s} {100 * v['pass@1']:.1f}% ({v['problems']})")
    if "tools" in metrics:
        tl = metrics["tools"]
        print(f"  tools: {tl['calls_per_trajectory']:.2f} calls/trajectory, mean turns {tl['mean_turns']:.2f}, "
              f"errors {100 * tl['error_rate']:.1f}%, timeouts {100 * tl['timeout_rate']:.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
