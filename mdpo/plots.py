"""PNG plots of a pipeline run folder, drawn from its JSON files (the pipeline redraws them after each iteration).

    accuracy.png   test accuracy per iteration (0 = the starting model) with 95% Wilson intervals, one line per
                   eval set, and the rollout accuracy of each iteration's sampled trajectories
    training.png   reward margin and chosen / rejected log-probs over training steps, every iteration's
                   iter_t/train/metrics.jsonl end to end (M-KTO: its rewards and policy log-probs)
    filters.png    trajectories each filter removed, and those kept, per iteration (results.json data.filters)

    python -m mdpo.plots RUN_FOLDER      redraws them, e.g. for a run made before plots existed

matplotlib is optional (the `plots` extra; `make install` has it): without it the pipeline prints one line and
goes on. Files are written atomically with the Agg backend, so no display is needed.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from mdpo.atomic import atomic_open

_warned = False

# What training.png draws: (panel title, y label, metrics.jsonl keys); a panel with none of its keys is left out.
TRAINING_PANELS = [
    ("reward margin", "beta * (chosen - rejected log-ratio)", ["rewards/margin"]),
    ("rewards", "beta * log-ratio to the reference", ["rewards/chosen", "rewards/rejected"]),
    ("log-probs", "log-prob of the masked tokens (sum; online RL: a token's)", ["logps/chosen", "logps/rejected",
                                                                              "logps/policy"]),
    # Online RL (grpo / drgrpo / rloo): the batch's reward, how far the policy moved from the sampler, the clip.
    ("reward", "mean reward of the batch's samples", ["reward"]),
    ("policy / sampler ratio", "exp(policy - recorded log-prob) per token", ["ratio/mean", "ratio/max"]),
    ("clipped tokens", "fraction of model tokens outside the clip", ["clip_fraction"]),
    ("advantage", "per sequence", ["advantage/mean", "advantage/abs"]),
    ("KL", "estimate against the reference", ["kl"]),
]


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k / n."""
    if n == 0:
        return 0.0, 0.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None (with a one-line message, once) when it is not installed."""
    global _warned
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if not _warned:
            print("matplotlib not installed: no plots (pip install 'mdpo[plots]')", file=sys.stderr)
            _warned = True
        return None
    return plt


def save(fig, path: Path) -> Path:
    """Write `fig` as a PNG at `path` atomically and close it."""
    import matplotlib.pyplot as plt

    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)
    return path


def iterations(results: dict) -> list[tuple[int, dict]]:
    """results.json's records as (iteration, record), in order."""
    return sorted((int(k.split("_")[1]), v) for k, v in results.items() if k.startswith("iter_"))


def plot_accuracy(series: dict, path: Path, title: str = "accuracy per iteration (95% Wilson intervals)") -> Path | None:
    """series: {label: [(iteration, correct, total), ...]}; labels starting with "rollout" are drawn dashed."""
    plt = pyplot()
    series = {k: v for k, v in series.items() if v}
    if plt is None or not series:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4))
    its = sorted({p[0] for pts in series.values() for p in pts})
    for i, (label, pts) in enumerate(series.items()):
        x = [p[0] for p in pts]
        y = [100 * p[1] / p[2] if p[2] else 0.0 for p in pts]
        ci = [wilson(p[1], p[2]) for p in pts]
        err = [[yi - 100 * lo for yi, (lo, _) in zip(y, ci)], [100 * hi - yi for yi, (_, hi) in zip(y, ci)]]
        # A small sideways shift keeps overlapping error bars of different series apart.
        shift = 0.04 * (i - (len(series) - 1) / 2)
        ax.errorbar([xi + shift for xi in x], y, yerr=err, marker="o", capsize=4,
                    linestyle="--" if label.startswith("rollout") else "-", label=label)
    ax.set(xlabel="iteration (0 = starting model)", ylabel="accuracy (%)", xticks=its, title=title)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save(fig, path)


def accuracy_series(results: dict, temperature: float | None = None) -> dict:
    """results.json as plot_accuracy series: each eval set's pass@1, and the rollouts' share of correct answers."""
    series: dict[str, list] = {}
    for it, r in iterations(results):
        for name, e in r.get("eval", {}).items():
            n = e.get("problems", 0)
            series.setdefault(name, []).append((it, round(e.get("pass@1", 0.0) * n), n))
    # Labels name the sizes: with n this small or this large, the width of the bars is the first thing to read.
    series = {f"{name}: test, greedy (n = {pts[-1][2]})": pts for name, pts in series.items()}
    rollout = [(it, ro["correct"], ro["trajectories"]) for it, r in iterations(results)
               if (ro := r.get("data", {}).get("rollout")) and "correct" in ro]
    t = f"T = {temperature:g}, " if temperature is not None else ""
    if rollout:
        # Per-trajectory interval: samples of one prompt are correlated, so it is narrower than the truth.
        series[f"rollouts: share correct ({t}n = {rollout[-1][2]} trajectories)"] = rollout
    return series


def read_metrics(path: Path) -> list[dict]:
    """The complete lines of a metrics.jsonl (a line still being written is left out)."""
    if not path.is_file():
        return []
    return [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines(keepends=True) if ln.endswith("\n")]


def plot_training(runs: list[tuple[int, list[dict]]], path: Path) -> Path | None:
    """runs: [(iteration, metrics.jsonl rows)]; the iterations' steps are laid end to end, split by dotted lines."""
    plt = pyplot()
    runs = [(it, rows) for it, rows in runs if rows]
    panels = [(t, y, [k for k in keys if any(k in r for _, rows in runs for r in rows)])
              for t, y, keys in TRAINING_PANELS]
    panels = [p for p in panels if p[2]]
    if plt is None or not panels:
        return None
    if any(p[0] == "reward margin" for p in panels):
        panels = [p for p in panels if p[0] != "rewards"]  # the margin says it; keep two panels
    from matplotlib.ticker import MaxNLocator

    # Constrained layout keeps the legends below the axes inside the figure; inside, they would cover lines.
    cols = min(3, len(panels))  # more panels (online RL's) wrap onto further rows
    rows_ = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(5.5 * cols, 4.2 * rows_), squeeze=False, layout="constrained")
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    colours = {}
    for ax, (title, ylabel, keys) in zip(axes.flat, panels):
        offset = 0
        for n, (it, rows) in enumerate(runs):
            for key in keys:
                pts = [(offset + r["step"], r[key]) for r in rows if key in r]
                line = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 40 else None,
                               color=colours.get(key), label=key if key not in colours else None)[0]
                colours.setdefault(key, line.get_color())
            end = offset + max(r["step"] for r in rows)
            if n + 1 < len(runs):
                ax.axvline(end + 0.5, color="grey", linestyle=":", linewidth=1)
            if n % -(-len(runs) // 8) == 0:  # at most 8 labels: online RL runs many small iterations
                ax.text((offset + 1 + end) / 2, 1.0, f"iter {it}", transform=ax.get_xaxis_transform(),
                        ha="center", va="bottom", fontsize=8, color="grey")
            offset = end
        if title == "reward margin":
            ax.axhline(0, color="black", linewidth=0.6)
        ax.set(xlabel="training step (iterations end to end)", ylabel=ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title if len(keys) > 1 or title == "reward margin" else f"{title} ({keys[0]})", pad=14)
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=len(keys), frameon=False)
    return save(fig, path)


def plot_filters(results: dict, path: Path) -> Path | None:
    """Grouped bars: per filter (and kept), one bar per iteration, each labelled with its count."""
    plt = pyplot()
    rows = [(it, r["data"]["filters"]) for it, r in iterations(results) if "filters" in r.get("data", {})]
    if plt is None or not rows:
        return None
    names = [k for k in rows[0][1] if k not in ("input", "kept")] + ["kept"]
    fig, ax = plt.subplots(figsize=(max(6.5, 1.3 * len(names) + 1), 4))
    width = 0.8 / len(rows)
    for i, (it, f) in enumerate(rows):
        x = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(names))]
        bars = ax.bar(x, [f.get(n, 0) for n in names], width, label=f"iteration {it} (input {f.get('input', 0)})")
        ax.bar_label(bars, fontsize=7, padding=1)
    ax.set_xticks(range(len(names)), [n.replace("_", " ") for n in names], rotation=20, ha="right")
    ax.set(ylabel="trajectories", title="trajectories removed by each filter, and kept")
    ax.margins(y=0.12)  # room for the count labels above the tallest bar
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save(fig, path)


def plot_run(run, temperature: float | None = None) -> list[Path]:
    """Draw accuracy.png, training.png and filters.png in a pipeline run folder; returns the files written."""
    run = Path(run)
    if pyplot() is None or not (run / "results.json").is_file():
        return []
    results = json.loads((run / "results.json").read_text())
    its = [it for it, _ in iterations(results) if it > 0]
    done = [plot_accuracy(accuracy_series(results, temperature), run / "accuracy.png"),
            plot_training([(it, read_metrics(run / f"iter_{it}" / "train" / "metrics.jsonl")) for it in its],
                          run / "training.png"),
            plot_filters(results, run / "filters.png")]
    return [p for p in done if p]


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not (Path(args[0]) / "results.json").is_file():
        print("usage: python -m mdpo.plots RUN_FOLDER   (a pipeline output folder with results.json)", file=sys.stderr)
        return 2
    for p in plot_run(args[0]):
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
