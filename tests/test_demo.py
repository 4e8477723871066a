"""mdpo.demo (make demo) at a tiny size: data preparation, the pipeline of experiments/demo.yaml, the report, resume.

The real demo takes 8 minutes; here the data and model are shrunk through --size / --arch and the run stops
after the SFT stage and its evaluation (training.iterations=0): a model this small and this briefly trained
answers nothing right, so an M-DPO iteration would have no pairs. The M-DPO iterations run through the same
Pipeline in tests/test_pipeline.py; the report of a 2-iteration run is checked below on hand-made files.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from mdpo import demo
from mdpo.docs import markers
from mdpo.trajectory import Trajectory, read_trajectories, write_trajectories

TINY_SIZES = {"sft": 40, "prompts": 8, "test": 6, "tokenizer_corpus": 40}
TINY_MODEL = {"hidden_size": 32, "intermediate_size": 64, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1,
              "head_dim": 16, "max_position_embeddings": 512}
OVERRIDES = ["training.iterations=0", "data.heldout=2", "sft.epochs=1", "sft.global_batch_size=8",
             "training.micro_batch_size=8", "eval.max_new_tokens_per_turn=16", "eval.max_turns=2", "eval.batch_size=8",
             "checkpoint.every=0"]


def tiny_args(out, sizes=TINY_SIZES) -> list[str]:
    return (["--out", str(out)] + [f"--size={k}={v}" for k, v in sizes.items()]
            + [f"--arch={k}={v}" for k, v in TINY_MODEL.items()] + OVERRIDES)


def test_demo_stages_at_a_tiny_size(tmp_path, capsys):
    defaults = (dict(demo.SIZES), dict(demo.MODEL))
    out = tmp_path / "demo"
    assert demo.main(tiny_args(out)) == 0
    assert (dict(demo.SIZES), dict(demo.MODEL)) == defaults  # the flags change this run only
    assert defaults[0] == {"sft": 12000, "prompts": 1500, "test": 500, "tokenizer_corpus": 3000}
    # 1. data: the sizes asked for, the model built with them, the record that guards a resume
    data = out / "data"
    assert json.loads((data / "done.json").read_text()) == {"sizes": TINY_SIZES,
                                                           "model": {**demo.MODEL, **TINY_MODEL}, "seed": 0}
    rows = [len((data / f).read_text().splitlines()) for f in ("sft.jsonl", "prompts.jsonl", "test.jsonl")]
    assert rows == [40, 8, 6]  # one teacher trajectory per SFT problem
    init = json.loads((out / "init" / "config.json").read_text())
    assert (init["hidden_size"], init["num_hidden_layers"]) == (32, 1)
    # 2. the pipeline ran experiments/demo.yaml with the demo's paths filled in and the overrides on top
    cfg = (out / "run" / "config.yaml").read_text()
    assert str(out / "init") in cfg and str(data / "sft.jsonl") in cfg and "lr: 0.003" in cfg  # sft.lr of demo.yaml
    assert (out / "run" / "sft" / "final" / "config.json").is_file()
    graded = list(read_trajectories(out / "run" / "iter_0" / "eval" / "test.jsonl"))
    gold = {json.loads(x)["idx"]: json.loads(x)["answer"] for x in (data / "test.jsonl").read_text().splitlines()}
    assert sorted(t.prompt_id for t in graded) == sorted(gold)
    k = sum(t.correct is True for t in graded)
    # 3. the report: the table row and the final JSON line, against a hand count of the graded file
    stdout = capsys.readouterr().out
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["final_accuracy"]["accuracy"] == k / 6 and summary["final_accuracy"]["n"] == 6
    assert summary["demo"] == {"points": 0.0, "ci": [0.0, 0.0]}  # iteration 0 against itself
    report = (out / "report.md").read_text()
    assert f"| SFT | {100 * k / 6:.1f}% ({k}/6) |" in report and report.strip() in stdout
    assert_readme_shape(report)
    # Resume: a rerun redoes nothing and prints the same report.
    # (results.json and config.yaml are rewritten, with the same content, by every Pipeline run.)
    written = [p for p in out.rglob("*") if p.suffix in (".jsonl", ".safetensors", ".model")]
    before = {p: p.stat().st_mtime_ns for p in written}
    results = (out / "run" / "results.json").read_text()
    assert demo.main(tiny_args(out)) == 0
    assert {p: p.stat().st_mtime_ns for p in written} == before and len(written) >= 7
    assert (out / "run" / "results.json").read_text() == results and (out / "report.md").read_text() == report
    capsys.readouterr()
    # Data of another size is not mixed into a run: a clear error, exit status 2.
    assert demo.main(tiny_args(out, {**TINY_SIZES, "test": 7})) == 2
    assert "was prepared with" in capsys.readouterr().err
    assert demo.main(["--out", str(tmp_path / "x"), "--size", "layers=2"]) == 2
    assert "--size 'layers=2': expected KEY=INT" in capsys.readouterr().err


@pytest.mark.parametrize("family, model_type", [("llama", "llama"), ("qwen3", "qwen3")])
def test_demo_runs_on_another_family(tmp_path, capsys, family, model_type):
    """The demo pipeline (data, SFT, evaluation through the sampler and the interpreter, the report) on the tiny
    model in another family's architecture; the task keeps its tokenizer and chat format. (An M-DPO iteration
    at this size has no correct samples, so no pairs; test_train's FSDP test trains these families on pairs.)"""
    out = tmp_path / family
    assert demo.main(tiny_args(out) + ["--family", family]) == 0
    init = json.loads((out / "init" / "config.json").read_text())
    assert init["model_type"] == model_type and init["hidden_act"] == "silu"
    final = json.loads((out / "run" / "sft" / "final" / "config.json").read_text())
    assert final["model_type"] == model_type
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["final_accuracy"]["n"] == 6
    assert not demo.is_default_run(out)
    assert demo.main(tiny_args(tmp_path / "bad") + ["--family", "olmo"]) == 2
    assert "--family 'olmo': expected one of gemma" in capsys.readouterr().err


def shape(report: str) -> dict:
    """What must agree between README's demo table and a fresh report: the header, each row's cell count and
    how its cells are written (digits masked), and the gain line's form."""
    rows = [line for line in report.splitlines() if line.startswith("| ") and not line.startswith("| ---")]
    mask = lambda t: re.sub(r"[+-]?\d+", "#", t)
    return {"header": rows[0], "labels": [r.split(" | ")[0] for r in rows[1:]],
            "cells": {mask(r.split(" | ")[0]): mask(r) for r in rows[1:]},
            "gain": mask(next(line for line in report.splitlines() if line.startswith("Iteration ")))}


def assert_readme_shape(fresh: str):
    """README.md's demo table (generated from docs/results/demo.md) has the shape a fresh run prints, with one
    row per iteration of experiments/demo.yaml; tests/test_docs.py checks it equals its source file."""
    readme = Path(demo.__file__).resolve().parents[1] / "README.md"
    table = next(body for src, _, body, _ in markers(readme.read_text()) if src == "docs/results/demo.md")
    want, got = shape(fresh), shape(table)
    iterations = demo.demo_config(Path("runs/demo")).training.iterations
    assert got["header"] == want["header"]
    assert got["labels"] == ["| SFT"] + [f"| M-DPO iteration {i}" for i in range(1, iterations + 1)]
    assert got["cells"]["| SFT"] == want["cells"]["| SFT"]  # the fresh run has the SFT row only (iterations=0)
    assert got["gain"] == want["gain"]


def test_report_against_hand_counts(tmp_path, capsys):
    """A 2-iteration run's files made by hand: accuracies, Wilson intervals and the paired gain computed here."""
    run = tmp_path / "demo" / "run"
    marks = {0: [1, 0, 0, 1, 0], 1: [1, 0, 1, 1, 0], 2: [1, 1, 0, 1, 1]}  # problem i right (1) or not
    for it, row in marks.items():
        ts = [Trajectory(f"q{i}", 0, [2, 5], [0, 1], [0, 1], correct=bool(c)) for i, c in enumerate(row)]
        if it == 2:
            ts.reverse()  # pairing is by problem id, not by line
        (run / f"iter_{it}" / "eval").mkdir(parents=True)
        write_trajectories(run / f"iter_{it}" / "eval" / "test.jsonl", ts)
    results = {"iter_0": {"eval": {"test": {"pass@1": 0.4, "problems": 5}}}}
    for it, (share, pairs, margin) in {1: (0.125, 3, 0.25), 2: (0.25, 4, 0.5)}.items():
        results[f"iter_{it}"] = {"data": {"rollout": {"correct_share": share, "correct": int(8 * share),
                                                      "trajectories": 8}, "examples": pairs},
                                 "train": {"rewards/margin": margin},
                                 "eval": {"test": {"pass@1": sum(marks[it]) / 5, "problems": 5}}}
    (run / "results.json").write_text(json.dumps(results))
    summary = demo.report(run, 2)
    lines = (run.parent / "report.md").read_text().splitlines()
    # Wilson 95%: 2/5 -> 11.8-76.9, 3/5 -> 23.1-88.2, 4/5 -> 37.6-96.4 (closed form, z = 1.96).
    assert lines[2:5] == ["| SFT | 40.0% (2/5) | 11.8 - 76.9 | - | - | - |",
                          "| M-DPO iteration 1 | 60.0% (3/5) | 23.1 - 88.2 | 12.5% | 3 | 0.25 |",
                          "| M-DPO iteration 2 | 80.0% (4/5) | 37.6 - 96.4 | 25.0% | 4 | 0.50 |"]
    # Paired differences 0,1,0,0,1: mean 0.4, sample variance 0.3, half-width 1.96 * sqrt(0.3 / 5) = 0.4801.
    assert lines[-1] == "Iteration 2 - SFT: +40.0 points (95% CI -8.0 to +88.0, paired over 5 problems)"
    assert summary["gain"]["points"] == pytest.approx(40.0)
    assert summary["gain"]["ci"] == pytest.approx([-8.00999, 88.00999], abs=1e-4)
    assert summary["iterations"][2]["pairs"] == 4 and summary["iterations"][1]["rollout_accuracy"] == 0.125
    # Rows after the first iteration are written as README's are (its M-DPO rows against this report's).
    readme = shape(next(body for src, _, body, _ in markers((Path(demo.__file__).resolve().parents[1]
                                                              / "README.md").read_text())
                        if src == "docs/results/demo.md"))
    assert shape("\n".join(lines))["cells"]["| M-DPO iteration #"] == readme["cells"]["| M-DPO iteration #"]
