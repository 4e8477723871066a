"""PNG plots of a run folder (mdpo/plots.py), from a synthetic run shaped like the demo's (README numbers)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from mdpo import plots

# The demo's measured table (README): test accuracy k / 500, rollout accuracy, pairs.
TEST = [118, 169, 199, 261]
ROLLOUT = [(285, 3200), (406, 3200), (506, 3200)]
FILTERS = [dict(input=3200, no_tool_call=410, long_answer=12, overlong=95, correct_after_error=31,
                duplicate_first_turn=880, kept=1772),
           dict(input=3200, no_tool_call=302, long_answer=9, overlong=71, correct_after_error=40,
                duplicate_first_turn=1010, kept=1768),
           dict(input=3200, no_tool_call=250, long_answer=5, overlong=60, correct_after_error=52,
                duplicate_first_turn=1120, kept=1713)]


def fake_run(root: Path, kto: bool = False, steps: int = 20) -> Path:
    """results.json and iter_t/train/metrics.jsonl of a 3-iteration run (M-DPO keys, or M-KTO's)."""
    results = {"iter_0": {"eval": {"test": {"pass@1": TEST[0] / 500, "problems": 500}}}}
    for it in (1, 2, 3):
        correct, n = ROLLOUT[it - 1]
        results[f"iter_{it}"] = {
            "data": {"rollout": {"trajectories": n, "correct": correct, "correct_share": correct / n},
                     "filters": FILTERS[it - 1], "examples": 150 + 20 * it},
            "train": {"loss": 0.6, "step": steps},
            "select": {"scores": {"step_10": 0.3, "final": 0.32}, "chosen": "final", "heldout": 200},
            "eval": {"test": {"pass@1": TEST[it] / 500, "problems": 500}}}
        rows = []
        for s in range(1, steps + 1):
            m = 0.01 * s * math.exp(-0.1 * it)
            if kto:
                rows.append({"step": s, "loss": 0.5, "kl": 0.01 * s, "logps/policy": -40.0 - 0.1 * s,
                             "rewards/chosen": m, "rewards/rejected": -m})
            else:
                rows.append({"step": s, "loss": 0.69 - m, "rewards/margin": m, "logps/chosen": -35.0 - 0.05 * s,
                             "logps/rejected": -42.0 - 0.3 * s - 2 * it})
        path = root / f"iter_{it}" / "train" / "metrics.jsonl"
        path.parent.mkdir(parents=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 99, "rewards/mar')  # a torn line
    (root / "results.json").write_text(json.dumps(results))
    return root


def image(path: Path):
    import matplotlib.image

    return matplotlib.image.imread(path)


def test_wilson_gives_the_demo_tables_intervals():
    # README: SFT 23.6% (118/500) 20.1 - 27.5; iteration 3 52.2% (261/500) 47.8 - 56.5.
    assert [round(100 * x, 1) for x in plots.wilson(118, 500)] == [20.1, 27.5]
    assert [round(100 * x, 1) for x in plots.wilson(261, 500)] == [47.8, 56.5]
    assert plots.wilson(0, 0) == (0.0, 0.0)
    lo, hi = plots.wilson(0, 10)
    assert lo == pytest.approx(0.0, abs=1e-12) and 0 < hi < 0.35  # no negative lower bound, unlike the normal one


def test_accuracy_series_reads_counts_from_results(tmp_path):
    results = json.loads((fake_run(tmp_path) / "results.json").read_text())
    series = plots.accuracy_series(results, temperature=1.0)
    assert series == {"test: test, greedy (n = 500)": [(i, k, 500) for i, k in enumerate(TEST)],
                      "rollouts: share correct (T = 1, n = 3200 trajectories)": [(i + 1, *r) for i, r in
                                                                                enumerate(ROLLOUT)]}


def test_run_folder_gets_three_pngs_written_atomically(tmp_path):
    pytest.importorskip("matplotlib")
    run = fake_run(tmp_path)
    written = plots.plot_run(run, temperature=1.0)
    assert written == [run / "accuracy.png", run / "training.png", run / "filters.png"]
    for p in written:
        img = image(p)
        assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 600, p
        assert img[..., :3].std() > 0.05, p  # something was drawn, not a blank canvas
    assert image(run / "training.png").shape[1] > 1.5 * image(run / "accuracy.png").shape[1]  # two panels
    assert sorted(p.name for p in run.iterdir()) == ["accuracy.png", "filters.png", "iter_1", "iter_2", "iter_3",
                                                     "results.json", "training.png"]  # no temporary files left
    # Redrawing (the pipeline does after every iteration) replaces the files in place.
    assert plots.plot_run(run) == written


def test_kto_metrics_draw_rewards_and_policy_logps(tmp_path):
    pytest.importorskip("matplotlib")
    run = fake_run(tmp_path, kto=True)
    assert (run / "training.png") in plots.plot_run(run)
    assert plots.plot_training([(1, [{"step": 1, "loss": 0.5}])], tmp_path / "none.png") is None  # nothing to draw
    assert not (tmp_path / "none.png").exists()


def test_partial_run_draws_what_exists(tmp_path):
    """After iteration 0 only the accuracy plot has data."""
    pytest.importorskip("matplotlib")
    (tmp_path / "results.json").write_text(json.dumps({"iter_0": {"eval": {"gsm8k": {"pass@1": 0.5, "problems": 8}}}}))
    assert plots.plot_run(tmp_path) == [tmp_path / "accuracy.png"]
    assert plots.plot_run(tmp_path / "missing") == []


def test_without_matplotlib_one_line_and_no_files(tmp_path, monkeypatch, capsys):
    run = fake_run(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    monkeypatch.setattr(plots, "_warned", False)
    assert plots.plot_run(run) == [] and plots.plot_run(run) == []
    err = capsys.readouterr().err
    assert err == "matplotlib not installed: no plots (pip install 'mdpo[plots]')\n"  # once per process
    assert not list(run.glob("*.png"))


def test_cli_redraws_a_run_folder(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run = fake_run(tmp_path)
    assert plots.main([str(run)]) == 0
    assert capsys.readouterr().out.split() == [str(run / n) for n in ("accuracy.png", "training.png", "filters.png")]
    assert plots.main([str(tmp_path / "nope")]) == 2
