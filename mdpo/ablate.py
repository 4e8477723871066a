"""The ablation bench: the paper's comparisons on the demo task, variants x seeds, with confidence intervals.

    make ablate [VARIANTS=mdpo,mkto] [SEEDS=3] [ARGS=--quick]
    python -m mdpo.ablate [--variants mdpo,mine] [--seeds 3] [--quick] [--out runs/ablate] [section.key=value ...]

1. The demo's data, tokenizer and initial model (mdpo.demo.prepare), then ONE SFT model, trained once and kept
   in OUT/base/: every variant and seed starts from it.
2. One pipeline run (mdpo.pipeline, experiments/demo.yaml) per variant and seed in OUT/runs/VARIANT/seedK/, with
   the variant's config overrides and training.seed = demo seed + K. Runs go `--workers` at a time, each in its
   own process on `--threads` threads (default 1: on this tiny model one thread samples faster than two, and a
   fixed thread count makes every run reproducible whatever the machine). The runs share OUT/share/: a sampling
   job that several runs make alike (the SFT model's evaluation, iteration 1's rollouts of a seed, the SFT
   model's half of iteration 2's mixture) is sampled once.
3. OUT/report.md: test accuracy after each iteration per variant (mean over seeds, 95% CI), the paired difference
   against M-DPO, and whether each of the paper's directions holds; OUT/ablation.png the same; OUT/results.jsonl
   every number (per run, per variant, per difference, per direction, stage times).

Kill it anywhere and rerun the same command: finished runs are skipped, a killed one resumes inside its pipeline.

A variant is a name plus config overrides (VARIANTS below). A fork tests its loss by adding its objective
(mdpo/objectives.py) and one entry here, then `make ablate VARIANTS=mdpo,mine SEEDS=3`.

Intervals: x[s, i] is 0/1 for test problem i under seed s. A mean (or a paired difference, x_variant - x_mdpo on
the same problem and seed) gets mean +- 1.96 sqrt(var_i(mean over seeds) / n_problems + var_s(mean over
problems) / n_seeds): the spread over test problems plus the spread over seeds (the second term is left out with
one seed). Both terms hold the residual variance once, so the interval is slightly conservative.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from mdpo.atomic import atomic_open, write_json_atomic
from mdpo.config import ConfigError, load_config
from mdpo.demo import EXPERIMENT, MODEL, SIZES, model_arch, parse_sizes, prepare
from mdpo.plots import pyplot, save
from mdpo.trajectory import read_trajectories

# Every sample of a group is scored (reward 0 for a wrong or malformed answer), none filtered out: M-DPO's filters
# pick clean pairs, but dropping a group's samples would bias its baseline.
RL = ["rollout.n_current=8", "rollout.n_previous=0", "training.iterations=12", "data.prompts_per_iteration=50",
      "eval.every=4", "eval.select=false", "training.epochs=1", "training.global_batch_size=32",
      "training.micro_batch_size=16", "filters.no_tool_call=false", "filters.long_answer=false",
      "filters.correct_after_error=false", "filters.duplicate_first_turn=false", "filters.overlong=false"]

# name: (what the row is, overrides of experiments/demo.yaml). The paper's rows (Tables 1-3) that fit the task.
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "mdpo": ("M-DPO (the recipe)", []),
    "mkto": ("M-KTO", ["loss.type=mkto"]),
    "dpo_nomask": ("DPO, no mask", ["loss.mask=completion"]),
    "kto_nomask": ("KTO, no mask", ["loss.type=mkto", "loss.mask=completion"]),
    "fixed_ref": ("M-DPO, fixed reference (SFT)", ["reference.mode=sft"]),
    # The paper's RAFT learning rate is 12.5x its M-DPO one (5e-6 against 4e-7); the same ratio here.
    "raft": ("RAFT (SFT on correct samples)", ["loss.type=raft", "optimizer.lr=2.5e-3"]),
    "mdpo_nll": ("M-DPO + NLL", ["loss.nll_coef=1.0"]),
    # The same 8 samples per prompt, all from the current policy: the mixture is the only difference.
    "onpolicy": ("on-policy sampling only", ["rollout.n_current=8", "rollout.n_previous=0"]),
    "turn_dpo": ("turn-level M-DPO", ["loss.type=turn_dpo"]),
    # Adapters on the 7 projections (rank 16, alpha 32); lr 1e-3 = 5x full M-DPO's, the best of 5e-4 / 1e-3 / 2e-3
    # (2e-3 fell to 15% at iteration 2; docs/LOG.md). With the tied embedding trained too: what full M-DPO moves.
    "lora": ("M-DPO, LoRA r16", ["lora.enabled=true", "lora.rank=16", "lora.alpha=32", "optimizer.lr=1.0e-3"]),
    "lora_embed": ("M-DPO, LoRA r16 + embedding", ["lora.enabled=true", "lora.rank=16", "lora.alpha=32",
                                                   "optimizer.lr=1.0e-3", "lora.train_embeddings=true"]),
    # Online RL at M-DPO's trajectory budget: 4 small on-policy iterations (50 prompts x 8 samples) for each of
    # M-DPO's (200 x 8), evaluated every 4th, a few optimizer steps each (budget_scale).
    # lr: M-DPO's 2e-4 (1e-3 reached 51.4% at the first budget point against 75.6%, seed 0; docs/LOG.md).
    **{name: (label, [f"loss.type={name}", *RL, "optimizer.lr=2.0e-4"]) for name, label in
       (("grpo", "GRPO"), ("drgrpo", "Dr. GRPO"), ("rloo", "RLOO"))},
}
BASELINE = "mdpo"
QUICK = (["mdpo", "dpo_nomask"], 2)  # --quick: M-DPO against one variant, 2 seeds

# The paper's directions: (claim, a, b, strict). "sft" is the shared SFT model (iteration 0). A direction holds
# when the paired difference a - b at the last iteration has its interval above 0 (strict) or not below 0.
DIRECTIONS = [
    ("M-DPO > SFT", "mdpo", "sft", True),
    ("masked > unmasked, DPO", "mdpo", "dpo_nomask", True),
    ("masked > unmasked, KTO", "mkto", "kto_nomask", True),
    ("reference updated each iteration > fixed", "mdpo", "fixed_ref", True),
    ("M-DPO >= M-KTO", "mdpo", "mkto", False),
    ("M-DPO > RAFT", "mdpo", "raft", True),
]


# ---------------------------------------------------------------- statistics
def interval(x: list[list[float]], z: float = 1.96, bounds=(0.0, 1.0)) -> tuple[float, float, float]:
    """Mean of x[s][i] (seeds x problems) and its 95% interval (module docstring), cut to `bounds` (an accuracy
    cannot leave [0, 1]; pass (-1, 1) for a difference)."""
    S, n = len(x), len(x[0])
    mean = sum(map(sum, x)) / (S * n)

    def var(v):
        m = sum(v) / len(v)
        return sum((a - m) ** 2 for a in v) / (len(v) - 1) if len(v) > 1 else 0.0

    per_problem = [sum(x[s][i] for s in range(S)) / S for i in range(n)]
    per_seed = [sum(row) / n for row in x]
    half = z * math.sqrt(var(per_problem) / n + (var(per_seed) / S if S > 1 else 0.0))
    return mean, max(bounds[0], mean - half), min(bounds[1], mean + half)


def verdict(lo: float, hi: float, strict: bool) -> str:
    if lo > 0:
        return "holds"
    if hi < 0:
        return "reversed"
    return "holds (no difference resolved)" if not strict else "not resolved (interval includes 0)"


# ---------------------------------------------------------------- runs
def run_dir(out: Path, variant: str, seed: int) -> Path:
    return out / "runs" / variant / f"seed{seed}"


def finished(folder: Path, iterations: int) -> bool:
    state = folder / "state.json"
    return state.is_file() and f"eval_{iterations}" in json.loads(state.read_text())


def base_overrides(out: Path, sft_model: Path) -> list[str]:
    """What every run shares: the demo's data and the one SFT model (no SFT stage of its own)."""
    d = out / "data"
    return [f"model.name_or_path={sft_model}", "sft.data=null", f"data.train=[{d / 'prompts.jsonl'}]",
            f"eval.sets=[{d / 'test.jsonl'}]"]


def train_sft(out: Path, overrides: list[str], threads: int) -> Path:
    """The shared SFT model (OUT/base/sft/final), trained once by the pipeline's SFT stage."""
    final = out / "base" / "sft" / "final"
    d = out / "data"
    args = [f"model.name_or_path={out / 'init'}", f"sft.data={d / 'sft.jsonl'}", f"data.train=[{d / 'prompts.jsonl'}]",
            f"eval.sets=[{d / 'test.jsonl'}]", *overrides]
    check_record(out / "base", args)
    if not (final / "config.json").is_file():
        cmd = [sys.executable, "-m", "mdpo.pipeline", str(EXPERIMENT), *args, "--stage", "sft", "--out",
               str(out / "base")]
        print(f"SFT stage (once, shared by every run): {out / 'base'}", flush=True)
        if subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS=str(threads))).returncode != 0:
            raise SystemExit("error: the SFT stage failed; its output is above (rerun to resume it)")
    return final


def check_record(folder: Path, overrides: list[str]) -> None:
    """A run folder remembers the overrides it was started with (ablate.json): a rerun with other ones would mix
    two experiments in one table, so it is an error, not a resume."""
    path = folder / "ablate.json"
    if path.is_file():
        old = json.loads(path.read_text())["overrides"]
        if old != overrides:
            changed = sorted(set(old) ^ set(overrides))
            raise ConfigError(f"{folder} was run with other overrides ({', '.join(changed)}): use another --out "
                              "or remove that folder")
    else:
        folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, {"overrides": overrides})


def launch(cmd: list[str], folder: Path, threads: int) -> subprocess.Popen:
    folder.mkdir(parents=True, exist_ok=True)
    log = open(folder / "log.txt", "ab")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def run_all(jobs: list[tuple[str, int]], out: Path, overrides: list[str], iterations: dict[str, int], workers: int,
            threads: int) -> list[str]:
    """Run the pipelines, `workers` at a time; returns the runs that failed (their log.txt says why)."""
    from tqdm import tqdm

    def args(variant, seed):
        return [*overrides, *VARIANTS[variant][1], f"training.seed={seed_value(seed)}"]

    for j in jobs:
        check_record(run_dir(out, *j), args(*j))
    todo = [j for j in jobs if not finished(run_dir(out, *j), iterations[j[0]])]
    running: dict[tuple[str, int], tuple[subprocess.Popen, float]] = {}
    failed = []

    def stop(*_):
        for p, _ in running.values():
            os.killpg(p.pid, signal.SIGTERM)
        raise SystemExit("interrupted: rerun the same command to resume")

    old = signal.signal(signal.SIGTERM, stop)
    try:
        with tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc="ablation runs", unit="run") as bar:
            while todo or running:
                while todo and len(running) < workers:
                    variant, seed = todo.pop(0)
                    folder = run_dir(out, variant, seed)
                    cmd = [sys.executable, "-m", "mdpo.pipeline", str(EXPERIMENT), *args(variant, seed),
                           "--out", str(folder), "--share", str(out / "share")]
                    running[(variant, seed)] = (launch(cmd, folder, threads), time.monotonic())
                time.sleep(1.0)
                for job, (p, t0) in list(running.items()):
                    if p.poll() is None:
                        continue
                    del running[job]
                    bar.update(1)
                    took = time.monotonic() - t0
                    if p.returncode != 0:
                        failed.append(f"{job[0]} seed {job[1]}")
                        tail = (run_dir(out, *job) / "log.txt").read_text(errors="replace").strip().splitlines()
                        bar.write(f"{job[0]} seed {job[1]}: FAILED ({tail[-1] if tail else 'no output'})")
                    else:
                        bar.write(f"{job[0]} seed {job[1]}: done in {took / 60:.1f} min")
    except KeyboardInterrupt:
        stop()
    finally:
        signal.signal(signal.SIGTERM, old)
    return failed


def budget_scale(name: str, cfg, base) -> int:
    """How many of a variant's iterations make one of M-DPO's: 1, or k when it samples the same trajectories in k
    smaller iterations (k x the iterations, 1/k the prompts each, evaluated every k-th): its columns then compare at
    equal numbers of trajectories sampled. Anything else would compare unequal budgets, so it is refused."""
    T, t = base.training.iterations, cfg.training.iterations
    if t == T:
        return 1
    k = t // T
    per, base_per = cfg.data.prompts_per_iteration, base.data.prompts_per_iteration
    samples = cfg.rollout.n_current + cfg.rollout.n_previous
    base_samples = base.rollout.n_current + base.rollout.n_previous
    if t % T or cfg.eval.every != k or per is None or base_per is None or per * k * samples != base_per * base_samples:
        raise ConfigError(f"variant {name}: training.iterations {t} against M-DPO's {T} must be k x as many "
                          f"iterations of 1/k the trajectories (data.prompts_per_iteration x samples per prompt) with "
                          f"eval.every k, so each column compares equal numbers of trajectories sampled")
    return k


def seed_value(k: int) -> int:
    """training.seed of seed number k: the demo's seed (42), then 43, 44, ..."""
    return 42 + k


# ---------------------------------------------------------------- the report
def graded(folder: Path, it: int) -> dict[str, bool]:
    path = folder / f"iter_{it}" / "eval" / "test.jsonl"
    return {t.prompt_id: bool(t.correct) for t in read_trajectories(path)}


def stage_seconds(folders: list[Path]) -> dict[str, float]:
    """Wall seconds per kind of stage (rollout, rollout_prev, train, select, eval, data, prompts), all runs."""
    total: dict[str, float] = {}
    for f in folders:
        state = json.loads((f / "state.json").read_text()) if (f / "state.json").is_file() else {}
        for name, rec in state.items():
            kind = name.rsplit("_", 1)[0] if name[-1].isdigit() else name
            total[kind] = total.get(kind, 0.0) + rec.get("seconds", 0.0)
    return total


def report(out: Path, variants: list[str], seeds: int, iterations: int, wall: float | None,
           scale: dict[str, int] | None = None, per_iteration: int | None = None) -> dict:
    """Tables, verdicts, results.jsonl and ablation.png from the finished runs.

    Column t is a budget point: M-DPO's iteration t, and iteration scale[v] x t of a variant that runs scale[v]
    smaller iterations for each of M-DPO's (an online-RL variant): the same trajectories sampled by then."""
    scale = scale or {}
    problems = None
    acc: dict[str, dict[int, list[list[float]]]] = {}  # variant -> iteration -> x[seed][problem]
    rows = []
    for v in variants:
        acc[v] = {}
        for s in range(seeds):
            folder = run_dir(out, v, s)
            for it in range(iterations + 1):
                g = graded(folder, it * scale.get(v, 1))
                problems = problems or sorted(g)
                if sorted(g) != problems:
                    raise SystemExit(f"error: {folder / f'iter_{it}'}: graded other test problems than the first run")
                acc[v].setdefault(it, []).append([float(g[p]) for p in problems])
                rows.append({"kind": "run", "variant": v, "seed": s, "training.seed": seed_value(s), "iteration": it,
                             "variant_iteration": it * scale.get(v, 1), "accuracy": sum(g.values()) / len(g),
                             "problems": len(g)})
    # Iteration 0 is the shared SFT model: the same file in every run (the shared sampling job).
    sft = acc[variants[0]][0]
    summary = {"variants": {}, "differences": {}, "directions": [], "seeds": seeds, "iterations": iterations,
               "problems": len(problems)}
    for v in variants:
        summary["variants"][v] = [list(interval(acc[v][it])) for it in range(iterations + 1)]
        rows += [{"kind": "variant", "variant": v, "iteration": it, "mean": m, "ci": [lo, hi], "seeds": seeds}
                 for it, (m, lo, hi) in enumerate(summary["variants"][v])]

    def diff(a, b, it):
        xa = acc[a][it] if a != "sft" else sft
        xb = acc[b][it] if b != "sft" else sft
        return interval([[p - q for p, q in zip(ra, rb)] for ra, rb in zip(xa, xb)], bounds=(-1.0, 1.0))

    if BASELINE in variants:
        for v in variants:
            if v != BASELINE:
                summary["differences"][v] = [list(diff(v, BASELINE, it)) for it in range(1, iterations + 1)]
                rows += [{"kind": "difference", "variant": v, "against": BASELINE, "iteration": it,
                          "mean": m, "ci": [lo, hi]} for it, (m, lo, hi) in
                         enumerate(summary["differences"][v], start=1)]
    for claim, a, b, strict in DIRECTIONS:
        if all(x == "sft" or x in variants for x in (a, b)):
            m, lo, hi = diff(a, b, iterations)
            d = {"claim": claim, "a": a, "b": b, "iteration": iterations, "difference": m, "ci": [lo, hi],
                 "verdict": verdict(lo, hi, strict)}
            summary["directions"].append(d)
            rows.append({"kind": "direction", **d})
    summary["scale"] = {v: scale.get(v, 1) for v in variants}
    summary["trajectories_per_iteration"] = per_iteration
    # What a run of each variant cost (its stages' seconds, mean over seeds): the wall-time side of a comparison.
    summary["minutes_per_run"] = {v: sum(stage_seconds([run_dir(out, v, s)]).values()) / 60 / seeds for v in variants}
    seconds = stage_seconds([run_dir(out, v, s) for v in variants for s in range(seeds)] + [out / "base"])
    summary["stage_seconds"] = seconds
    summary["wall_seconds"] = wall
    rows.append({"kind": "timing", "stage_seconds": seconds, "wall_seconds": wall})

    text = table(summary, variants)
    print(text)
    with atomic_open(out / "report.md") as f:
        f.write(text + "\n")
    with atomic_open(out / "results.jsonl") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    if plot(summary, variants, out / "ablation.png"):
        print(f"plot: {out / 'ablation.png'}")
    return summary


def pct(m, lo, hi, sign=False) -> str:
    f = "+.1f" if sign else ".1f"
    return f"{100 * m:{f}} [{100 * lo:{f}}, {100 * hi:{f}}]"


def table(summary: dict, variants: list[str]) -> str:
    T, S = summary["iterations"], summary["seeds"]
    head = ["variant", "SFT"] + [f"iteration {t}" for t in range(1, T + 1)] + [f"vs M-DPO, iteration {T}",
                                                                           "min / run"]
    lines = [f"Test accuracy (%) on {summary['problems']} problems, mean over {S} seed{'s' * (S > 1)} "
             f"[95% CI]; last column: paired difference against M-DPO (points).", "",
             "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for v in variants:
        cells = [VARIANTS[v][0] if v in VARIANTS else v]
        cells += [f"{100 * summary['variants'][v][0][0]:.1f}"]
        cells += [pct(*summary["variants"][v][t]) for t in range(1, T + 1)]
        d = summary["differences"].get(v)
        cells.append(pct(*d[-1], sign=True) if d else "-")
        cells.append(f"{summary.get('minutes_per_run', {}).get(v, 0.0):.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    scaled = {v: k for v, k in summary.get("scale", {}).items() if k > 1}
    if scaled:
        lines += ["", "Columns are equal numbers of trajectories sampled: iteration t of "
                  + ", ".join(VARIANTS[v][0] if v in VARIANTS else v for v in scaled)
                  + f" is after {' / '.join(str(k) for k in sorted(set(scaled.values())))} x t of its smaller iterations."]
    if summary["directions"]:
        lines += ["", f"The paper's directions at iteration {T}:", "", "| direction | difference (points) | verdict |",
                  "| --- | --- | --- |"]
        for d in summary["directions"]:
            lines.append(f"| {d['claim']} | {pct(d['difference'], *d['ci'], sign=True)} | {d['verdict']} |")
    secs = summary["stage_seconds"]
    if secs:
        total = sum(secs.values())
        parts = ", ".join(f"{k} {v / 60:.1f} min ({100 * v / total:.0f}%)"
                          for k, v in sorted(secs.items(), key=lambda kv: -kv[1]))
        lines += ["", f"Stage time summed over runs: {parts}."]
    if summary["wall_seconds"]:
        lines.append(f"Wall time of this invocation: {summary['wall_seconds'] / 60:.1f} min.")
    return "\n".join(lines)


def plot(summary: dict, variants: list[str], path: Path) -> bool:
    """Left: accuracy per iteration per variant (95% CI bars); right: difference against M-DPO at the last
    iteration per variant (a forest plot)."""
    plt = pyplot()
    if plt is None:
        return False
    T = summary["iterations"]
    diffs = [(v, summary["differences"][v][-1]) for v in variants if v in summary["differences"]]
    if diffs:
        fig, (a, b) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 2]})
    else:  # M-DPO alone: no differences to draw
        fig, a = plt.subplots(figsize=(8, 5))
    for k, v in enumerate(variants):
        m = [100 * x[0] for x in summary["variants"][v]]
        err = [[100 * (x[0] - x[1]) for x in summary["variants"][v]], [100 * (x[2] - x[0]) for x in summary["variants"][v]]]
        xs = [t + (k - (len(variants) - 1) / 2) * 0.04 for t in range(T + 1)]  # dodge overlapping bars
        a.errorbar(xs, m, yerr=err, marker="o", capsize=3, label=VARIANTS[v][0] if v in VARIANTS else v)
    per = summary.get("trajectories_per_iteration")
    if per and any(k > 1 for k in summary.get("scale", {}).values()):  # budget points: trajectories sampled
        a.set_xticks(range(T + 1), ["SFT"] + [f"{t * per:,}" for t in range(1, T + 1)])
        a.set_xlabel("trajectories sampled (M-DPO: one iteration each; online RL: its small iterations)")
    else:
        a.set_xticks(range(T + 1), ["SFT"] + [f"iter {t}" for t in range(1, T + 1)])
    a.set_ylabel("test accuracy (%)")
    a.set_title(f"accuracy, mean over {summary['seeds']} seeds (95% CI)")
    a.grid(alpha=0.3)
    a.legend(fontsize=8)
    if diffs:
        ys = list(range(len(diffs)))[::-1]
        for y, (v, (m, lo, hi)) in zip(ys, diffs):
            b.errorbar([100 * m], [y], xerr=[[100 * (m - lo)], [100 * (hi - m)]], fmt="o", capsize=4,
                       color="tab:red" if hi < 0 else "tab:green" if lo > 0 else "tab:gray")
        b.axvline(0, color="black", lw=0.8)
        b.set_yticks(ys, [VARIANTS[v][0] if v in VARIANTS else v for v, _ in diffs], fontsize=8)
        b.set_xlabel("points")
        at = f"{T * per:,} trajectories" if per and any(k > 1 for k in summary.get("scale", {}).values()) else \
            f"iteration {T}"
        b.set_title(f"variant - M-DPO at {at} (paired, 95% CI)")
        b.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    save(fig, path)
    return True


# ---------------------------------------------------------------- the command
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mdpo.ablate", description="Variants x seeds on the demo task.")
    ap.add_argument("overrides", nargs="*", help="section.key=value for every run (experiments/demo.yaml)")
    ap.add_argument("--out", default="runs/ablate")
    ap.add_argument("--variants", default=None, help=f"comma-separated names of {', '.join(VARIANTS)} (default all)")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per variant (default 3)")
    ap.add_argument("--quick", action="store_true", help=f"{' vs '.join(QUICK[0])}, {QUICK[1]} seeds")
    ap.add_argument("--workers", type=int, default=max(1, min(2, os.cpu_count() or 1)), help="runs at a time")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument("--size", action="append", default=[], metavar="KEY=N", help=f"replace the demo's SIZES {SIZES}")
    ap.add_argument("--arch", action="append", default=[], metavar="KEY=N", help=f"replace the demo's MODEL {MODEL}")
    ap.add_argument("--family", default=None, help="the demo model's family: gemma (default), llama, qwen2, ...")
    args = ap.parse_intermixed_args(argv)
    start = time.monotonic()
    try:
        variants = (args.variants.split(",") if args.variants else QUICK[0] if args.quick else list(VARIANTS))
        variants = [v.strip() for v in variants if v.strip()]
        unknown = [v for v in variants if v not in VARIANTS]
        if unknown:
            raise ConfigError(f"--variants: unknown {', '.join(unknown)}; known: {', '.join(VARIANTS)} "
                              "(a new one is an entry of VARIANTS in mdpo/ablate.py)")
        if BASELINE not in variants:
            variants.insert(0, BASELINE)  # every difference is against M-DPO
        seeds = args.seeds if args.seeds is not None else QUICK[1] if args.quick else 3
        if seeds < 1 or args.workers < 1 or args.threads < 1:
            raise ConfigError("--seeds, --workers and --threads must be >= 1")
        out = Path(args.out)
        # Every variant's config is checked before anything runs: a bad override fails in seconds, not hours.
        cfgs = {v: load_config(EXPERIMENT, [*args.overrides, *VARIANTS[v][1]]) for v in variants}
        iterations = cfgs[BASELINE].training.iterations
        scale = {v: budget_scale(v, c, cfgs[BASELINE]) for v, c in cfgs.items()}
        prepare(out, sizes=parse_sizes(args.size, SIZES, "--size"), model=model_arch(args.arch, args.family))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # M-DPO's seeds first: runs that start together are of different seeds, so none waits on a shared job.
    jobs = sorted(((v, s) for v in variants for s in range(seeds)),
                  key=lambda j: (j[0] != BASELINE, variants.index(j[0]), j[1]))
    try:
        sft_model = train_sft(out, args.overrides, max(args.threads, args.workers * args.threads))
        its = {v: c.training.iterations for v, c in cfgs.items()}
        failed = run_all(jobs, out, [*base_overrides(out, sft_model), *args.overrides], its, args.workers,
                         args.threads)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if failed:
        print(f"error: {len(failed)} runs failed ({', '.join(failed)}); their log.txt says why. Rerun to resume.",
              file=sys.stderr)
        return 1
    b = cfgs[BASELINE]
    per_iteration = (b.data.prompts_per_iteration or 0) * (b.rollout.n_current + b.rollout.n_previous) or None
    summary = report(out, variants, seeds, iterations, time.monotonic() - start, scale, per_iteration)
    print(json.dumps({"ablate": {v: summary["variants"][v][-1][0] for v in variants},
                      "directions": {d["claim"]: d["verdict"] for d in summary["directions"]},
                      "wall_minutes": round((time.monotonic() - start) / 60, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
