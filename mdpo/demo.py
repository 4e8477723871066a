"""The embedded default: M-DPO improving a tiny math agent on 2 CPU cores, with nothing downloaded.

    python -m mdpo.demo [--out runs/demo] [section.key=value ...]      (make demo)
    python -m mdpo.demo --out DIR --size sft=200 --arch num_layers=1 ...  (smaller data / model: SIZES, MODEL)

1. data: synthetic word problems whose answers need Python (mdpo.synth), a SentencePiece tokenizer trained on
   them, a randomly initialised tiny Gemma (Gemma 1 architecture), and imperfect teacher trajectories for SFT;
2. the pipeline of experiments/demo.yaml (mdpo.pipeline): SFT, then 3 iterations of M-DPO with the real
   sampler, interpreter, grader and trainer;
3. a table of greedy accuracy on the held-out test problems per iteration, with 95% confidence intervals, and the
   paired difference of the last iteration against SFT; with matplotlib (installed by `make install`),
   runs/demo/accuracy.png and the pipeline's plots in runs/demo/run/ (mdpo/plots.py).

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
from mdpo.model import ModelConfig, build_model
from mdpo.plots import accuracy_series, plot_accuracy, wilson
from mdpo.tokenizer import Tokenizer
from mdpo.trajectory import read_trajectories, write_trajectories
from mdpo.weights import save_pretrained

EXPERIMENT = Path(__file__).resolve().parents[1] / "experiments" / "demo.yaml"

# Sizes of the demo's data (problems) and its model; the training recipe lives in experiments/demo.yaml.
SIZES = {"sft": 12000, "prompts": 1500, "test": 500, "tokenizer_corpus": 3000}
MODEL = dict(family="gemma", hidden_size=128, intermediate_size=512, num_layers=4, num_heads=4, num_kv_heads=4,
             head_dim=32, max_position_embeddings=1024)


def write_problems(path: Path, problems: list[dict]):
    with atomic_open(path) as f:
        for p in problems:
            f.write(json.dumps({"idx": p["id"], "question": p["question"], "answer": p["gold"]}) + "\n")


def prepare(out: Path, seed: int = 0, sizes: dict | None = None, model: dict | None = None) -> None:
    """Synthetic data, tokenizer, initial model and SFT trajectories under out/ (skipped when already there).

    sizes / model: entries replacing SIZES / MODEL (the tests run the demo at a tiny size); the defaults are
    the demo's.
    """
    sizes, model = {**SIZES, **(sizes or {})}, {**MODEL, **(model or {})}
    data, init = out / "data", out / "init"
    record = {"sizes": sizes, "model": model, "seed": seed}
    if (data / "done.json").is_file() and (init / "config.json").is_file():
        # A resumed demo must not mix data of one size with a run of another.
        done = json.loads((data / "done.json").read_text())
        if done != record:
            raise ConfigError(f"{data} was prepared with {done}, not {record}: use another --out")
        return
    data.mkdir(parents=True, exist_ok=True)
    sft_problems = synth.make_problems(sizes["sft"], seed + 1, "sft")
    tok = Tokenizer(synth.train_tokenizer(synth.corpus(sft_problems[: sizes["tokenizer_corpus"]], seed + 2)))
    write_trajectories(data / "sft.jsonl", synth.teacher_trajectories(tok, sft_problems, seed + 3))
    write_problems(data / "prompts.jsonl", synth.make_problems(sizes["prompts"], seed + 4, "train"))
    write_problems(data / "test.jsonl", synth.make_problems(sizes["test"], seed + 5, "test"))
    cfg = ModelConfig(vocab_size=tok.vocab_size, **model)
    tmp = out / "init.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_pretrained(build_model(cfg, seed=seed), tmp, tokenizer=tok)
    shutil.rmtree(init, ignore_errors=True)
    tmp.replace(init)
    write_json_atomic(data / "done.json", record)


def parse_sizes(items: list[str], defaults: dict, flag: str) -> dict:
    """--size / --arch KEY=INT entries, checked against the keys of `defaults`."""
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or key not in defaults or not value.strip().lstrip("-").isdigit():
            raise ConfigError(f"{flag} {item!r}: expected KEY=INT with KEY one of {', '.join(defaults)}")
        out[key] = int(value)
    return out


def model_arch(arch: list[str], family: str | None) -> dict:
    """--arch KEY=INT entries and --family NAME as replacements of MODEL: the demo's tiny model in another
    family's architecture (mdpo/families.py). The synthetic task keeps its own tokenizer and chat format."""
    from mdpo.families import FAMILIES

    out = parse_sizes(arch, MODEL, "--arch")
    if family is not None:
        if family not in FAMILIES:
            raise ConfigError(f"--family {family!r}: expected one of {', '.join(FAMILIES)}")
        out["family"] = family
    return out


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
    out = {"iterations": {}}
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
    mean, lo, hi = paired_difference(graded[0], graded[iterations])
    lines.append(f"\nIteration {iterations} - SFT: {100 * mean:+.1f} points (95% CI {100 * lo:+.1f} to {100 * hi:+.1f}, "
                 f"paired over {len(graded[0])} problems)")
    out["gain"] = {"points": 100 * mean, "ci": [100 * lo, 100 * hi]}
    text = "\n".join(lines)
    print(text)
    with atomic_open(run.parent / "report.md") as f:
        f.write(text + "\n")
    # The same figure as the pipeline's run/accuracy.png (mdpo/plots.py), beside report.md; training.png and
    # filters.png stay in run/.
    if plot_accuracy(accuracy_series(results), run.parent / "accuracy.png",
                     "demo: accuracy per iteration (0 = SFT; 95% Wilson intervals)"):
        print(f"plots: {run.parent / 'accuracy.png'}, and accuracy / training / filters .png in {run}")
    return out


def demo_config(out: Path, overrides=()):
    """experiments/demo.yaml with the demo's paths under `out` filled in, then `overrides`."""
    return load_config(EXPERIMENT, [f"model.name_or_path={out / 'init'}", f"sft.data={out / 'data' / 'sft.jsonl'}",
                                    f"data.train=[{out / 'data' / 'prompts.jsonl'}]",
                                    f"eval.sets=[{out / 'data' / 'test.jsonl'}]", *overrides])


def is_default_run(out: Path) -> bool:
    """Whether out/ holds a finished demo of the default sizes, model and config (what README.md reports)."""
    from mdpo.config import config_to_dict

    try:
        done = json.loads((out / "data" / "done.json").read_text())
        saved = load_config(out / "run" / "config.yaml")
    except (OSError, ValueError, ConfigError):
        return False
    # The demo's paths are written as given on its command line (relative or not): compare the rest.
    fresh = config_to_dict(demo_config(Path(saved.model.name_or_path).parent))
    return (done == {"sizes": SIZES, "model": MODEL, "seed": 0} and (out / "report.md").is_file()
            and {**config_to_dict(saved), "name": fresh["name"]} == fresh)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mdpo.demo", description="M-DPO on a synthetic task, on a CPU.")
    ap.add_argument("overrides", nargs="*", help="section.key=value for experiments/demo.yaml")
    ap.add_argument("--out", default="runs/demo")
    # Smaller data or model than the demo's (tests, a quick look); the defaults are SIZES and MODEL above.
    ap.add_argument("--size", action="append", default=[], metavar="KEY=N", help=f"replace SIZES[KEY] {SIZES}")
    ap.add_argument("--arch", action="append", default=[], metavar="KEY=N", help=f"replace MODEL[KEY] {MODEL}")
    ap.add_argument("--family", default=None, help="the tiny model's family: gemma (default), llama, qwen2, ...")
    args = ap.parse_intermixed_args(argv)  # overrides may come after the options
    import torch

    from mdpo.pipeline import Pipeline, PipelineError
    from mdpo.train import TrainError

    torch.set_num_threads(min(torch.get_num_threads(), 8))
    out = Path(args.out)
    try:
        cfg = demo_config(out, args.overrides)
        prepare(out, sizes=parse_sizes(args.size, SIZES, "--size"), model=model_arch(args.arch, args.family))
        Pipeline(cfg, out / "run").run()
        summary = report(out / "run", cfg.training.iterations)
    except (ConfigError, PipelineError, TrainError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"demo": summary["gain"], "final_accuracy": summary["iterations"][cfg.training.iterations]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
