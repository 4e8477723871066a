"""The embedded default: M-DPO improving a tiny math agent on 2 CPU cores, with nothing downloaded.

    python -m mdpo.demo [--out runs/demo] [section.key=value ...]      (make demo)

1. data: synthetic word problems whose answers need Python (mdpo.synth), a SentencePiece tokenizer trained on
   them, a randomly initialised tiny Gemma (Gemma 1 architecture), and imperfect teacher trajectories for SFT;
2. the pipeline of experiments/demo.yaml (mdpo.pipeline): SFT, then 3 iterations of M-DPO with the real
   sampler, interpreter, grader and trainer;
3. a table of greedy accuracy on the held-out test problems per iteration, with 95% confidence intervals, and the
   paired difference of the last iteration against SFT; runs/demo/accuracy.png if matplotlib is installed.

Every stage is resumable: kill it at any point and rerun the same command.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

from mdpo import synth
from mdpo.atomic import atomic_open, write_json_atomic
from mdpo.config import ConfigError, load_config
from mdpo.model import GemmaConfig, build_model
from mdpo.tokenizer import Tokenizer
from mdpo.trajectory import read_trajectories, write_trajectories

EXPERIMENT = Path(__file__).resolve().parents[1] / "experiments" / "demo.yaml"

# Sizes of the demo's data (problems) and its model; the training recipe lives in experiments/demo.yaml.
SIZES = {"sft": 12000, "prompts": 1500, "test": 500, "tokenizer_corpus": 3000}
MODEL = dict(family="gemma", hidden_size=128, intermediate_size=512, num_layers=4, num_heads=4, num_kv_heads=4,
             head_dim=32, max_position_embeddings=1024)


def write_problems(path: Path, problems: list[dict]):
    with atomic_open(path) as f:
        for p in problems:
            f.write(json.dumps({"idx": p["id"], "question": p["question"], "answer": p["gold"]}) + "\n")


def prepare(out: Path, seed: int = 0) -> None:
    """Synthetic data, tokenizer, initial model and SFT trajectories under out/ (skipped when already there)."""
    data, init = out / "data", out / "init"
    if (data / "done.json").is_file() and (init / "config.json").is_file():
        return
    data.mkdir(parents=True, exist_ok=True)
    sft_problems = synth.make_problems(SIZES["sft"], seed + 1, "sft")
    tok = Tokenizer(synth.train_tokenizer(synth.corpus(sft_problems[: SIZES["tokenizer_corpus"]], seed + 2)))
    write_trajectories(data / "sft.jsonl", synth.teacher_trajectories(tok, sft_problems, seed + 3))
    write_problems(data / "prompts.jsonl", synth.make_problems(SIZES["prompts"], seed + 4, "train"))
    write_problems(data / "test.jsonl", synth.make_problems(SIZES["test"], seed + 5, "test"))
    cfg = GemmaConfig(vocab_size=tok.vocab_size, **MODEL)
    tmp = out / "init.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    build_model(cfg, seed=seed).save_pretrained(tmp, tokenizer=tok)
    shutil.rmtree(init, ignore_errors=True)
    tmp.replace(init)
    write_json_atomic(data / "done.json", {"sizes": SIZES, "model": MODEL, "seed": seed})


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k / n."""
    if n == 0:
        return 0.0, 0.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def paired_difference(a: dict, b: dict, z: float = 1.96) -> tuple[float, float, float]:
    """Mean of b - a over the problems both graded (0/1 each), with a 95% normal interval of the paired mean."""
    ids = sorted(set(a) & set(b))
    d = [float(b[i]) - float(a[i]) for i in ids]
    n = len(d)
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / (n - 1)
    half = z * math.sqrt(var / n)
    return mean, mean - half, mean + half


def report(run: Path, iterations: int) -> dict:
    """Accuracy per iteration with 95% CIs, and last-iteration-minus-SFT with its paired CI."""
    graded = {}
    for it in range(iterations + 1):
        path = run / f"iter_{it}" / "eval" / "test.jsonl"
        graded[it] = {t.prompt_id: bool(t.correct) for t in read_trajectories(path)}
    results = json.loads((run / "results.json").read_text())
    rows, out = [], {"iterations": {}}
    lines = ["| model | test accuracy | 95% CI | rollout accuracy | pairs | reward margin |",
             "| --- | --- | --- | --- | --- | --- |"]
    for it, g in graded.items():
        k, n = sum(g.values()), len(g)
        lo, hi = wilson(k, n)
        r = results.get(f"iter_{it}", {})
        ro = r.get("data", {}).get("rollout", {})
        margin = r.get("train", {}).get("rewards/margin")
        name = "SFT" if it == 0 else f"M-DPO iteration {it}"
        lines.append(f"| {name} | {100 * k / n:.1f}% ({k}/{n}) | {100 * lo:.1f} - {100 * hi:.1f} | "
                     + (f"{100 * ro['correct_share']:.1f}% | " if ro else "- | ")
                     + f"{r.get('data', {}).get('examples', '-')} | "
                     + (f"{margin:.2f} |" if margin is not None else "- |"))
        out["iterations"][it] = {"accuracy": k / n, "ci": [lo, hi], "n": n, "rollout_accuracy": ro.get("correct_share"),
                                 "pairs": r.get("data", {}).get("examples"), "margin": margin}
        rows.append((it, k / n, lo, hi, margin))
    mean, lo, hi = paired_difference(graded[0], graded[iterations])
    lines.append(f"\nIteration {iterations} - SFT: {100 * mean:+.1f} points (95% CI {100 * lo:+.1f} to {100 * hi:+.1f}, "
                 f"paired over {len(graded[0])} problems)")
    out["gain"] = {"points": 100 * mean, "ci": [100 * lo, 100 * hi]}
    text = "\n".join(lines)
    print(text)
    with atomic_open(run.parent / "report.md") as f:
        f.write(text + "\n")
    plot(rows, run.parent / "accuracy.png")
    return out


def plot(rows, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot)")
        return
    its = [r[0] for r in rows]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
    ax[0].errorbar(its, [100 * r[1] for r in rows], yerr=[[100 * (r[1] - r[2]) for r in rows],
                                                          [100 * (r[3] - r[1]) for r in rows]], marker="o", capsize=4)
    ax[0].set(xlabel="iteration (0 = SFT)", ylabel="test accuracy (%)", xticks=its)
    m = [(r[0], r[4]) for r in rows if r[4] is not None]
    ax[1].plot([x for x, _ in m], [y for _, y in m], marker="o")
    ax[1].set(xlabel="iteration", ylabel="reward margin (last step)", xticks=its)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    tmp.replace(path)
    print(f"plot: {path}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mdpo.demo", description="M-DPO on a synthetic task, on a CPU.")
    ap.add_argument("overrides", nargs="*", help="section.key=value for experiments/demo.yaml")
    ap.add_argument("--out", default="runs/demo")
    args = ap.parse_intermixed_args(argv)  # overrides may come after the options
    import torch

    from mdpo.pipeline import Pipeline, PipelineError
    from mdpo.train import TrainError

    torch.set_num_threads(min(torch.get_num_threads(), 8))
    out = Path(args.out)
    try:
        cfg = load_config(EXPERIMENT, [f"model.name_or_path={out / 'init'}", f"sft.data={out / 'data' / 'sft.jsonl'}",
                                       f"data.train=[{out / 'data' / 'prompts.jsonl'}]",
                                       f"eval.sets=[{out / 'data' / 'test.jsonl'}]", *args.overrides])
        prepare(out)
        Pipeline(cfg, out / "run").run()
        summary = report(out / "run", cfg.training.iterations)
    except (ConfigError, PipelineError, TrainError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"demo": summary["gain"], "final_accuracy": summary["iterations"][cfg.training.iterations]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
