"""metrics.tracker: TensorBoard and W&B (offline) get the same numbers as metrics.jsonl and results.json."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest
import torch

from mdpo.config import ConfigError, load_config
from mdpo.tracking import open_tracker, scalars
from mdpo.train import train
from mdpo.trajectory import Role, Trajectory
from conftest import tiny_model_and_pairs

CONFIG = Path(__file__).resolve().parents[1] / "experiments" / "gemma7b_mdpo.yaml"
P, M, T = int(Role.PROMPT), int(Role.MODEL), int(Role.TOOL)


def traj(g, pid: str, sid: int, prompt: list[int]) -> Trajectory:
    """prompt | model turn | tool turn | model turn, random ids."""
    tokens, roles, turns = list(prompt), [P] * len(prompt), [0] * len(prompt)
    for role, n, turn in ((M, 5, 1), (T, 3, 1), (M, 4, 2)):
        tokens += torch.randint(5, 512, (n,), generator=g).tolist()
        roles += [role] * n
        turns += [turn] * n
    return Trajectory(pid, sid, tokens, roles, turns)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A 2-layer Gemma and 12 random pairs: 3 training steps of 4 pairs, a second or two in all."""
    return tiny_model_and_pairs(tmp_path_factory.mktemp("tracking"), traj)


def config(setup, tracker: str):
    return load_config(CONFIG, [f"model.name_or_path={setup / 'init'}", "model.attn_impl=eager",
                                "training.global_batch_size=4", "training.micro_batch_size=4",
                                "training.warmup_steps=1", "rollout.max_length=64", "checkpoint.every=0",
                                "training.activation_checkpointing=false", f"metrics.tracker={tracker}"])


def metrics_lines(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def tensorboard_scalars(folder: Path) -> dict:
    """{tag: [(step, value)]} read back by TensorBoard's own event reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_trainer_logs_metrics_jsonl_to_tensorboard(setup, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    train(config(setup, "tensorboard"), str(setup / "pairs.jsonl"), out)
    rows = metrics_lines(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    logged = tensorboard_scalars(out / "tensorboard")
    # Every scalar of every metrics.jsonl line, at its step, and nothing else (float32 in the event file).
    assert set(logged) == set(rows[0]) - {"step"} and "rewards/margin" in logged and "logps/chosen" in logged
    for tag, points in logged.items():
        assert [s for s, _ in points] == [r["step"] for r in rows], tag
        assert [v for _, v in points] == pytest.approx([r[tag] for r in rows], rel=1e-6, abs=1e-30), tag


def test_tensorboard_forgets_steps_a_resumed_run_redoes(tmp_path):
    """A trainer resumed from step 2 logs steps 3.. again: the killed run's later events are dropped."""
    pytest.importorskip("tensorboard")
    cfg = load_config(CONFIG, ["metrics.tracker=tensorboard"])
    first = open_tracker(cfg, tmp_path, "train")
    for step in (1, 2, 3, 4):
        first.log({"loss": float(step)}, step)
    first.close()  # as if killed after step 4 with its last checkpoint at step 2
    second = open_tracker(cfg, tmp_path, "train", first_step=3)
    for step in (3, 4, 5):
        second.log({"loss": 10.0 * step}, step)
    second.close()
    assert tensorboard_scalars(tmp_path / "tensorboard")["loss"] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0), (5, 50.0)]


def wandb_records(path: Path):
    """The protobuf records of a W&B .wandb file (its LevelDB-style log: 7-byte header, 32 KiB blocks, each record
    a 7-byte header of checksum, length and type FULL / FIRST / MIDDLE / LAST)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, buf = path.read_bytes(), 7, 32768, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        buf += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            yield rec


def items(entries) -> dict:
    return {e.key or "/".join(e.nested_key): json.loads(e.value_json) for e in entries}


def test_trainer_logs_metrics_jsonl_to_wandb_offline(setup, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is not installed (pip install 'mdpo[wandb]')")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "iter_1" / "train"
    train(config(setup, "wandb"), str(setup / "pairs.jsonl"), out)
    rows = metrics_lines(out)
    runs = list((tmp_path / "wandb_dir" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    files = list(runs[0].glob("run-*.wandb"))
    assert len(files) == 1
    recs = list(wandb_records(files[0]))
    run = next(r.run for r in recs if r.WhichOneof("record_type") == "run")
    assert (run.project, run.run_group, run.display_name) == ("mdpo", "gemma7b_mdpo", "gemma7b_mdpo/iter_1/train")
    history = [items(r.history.item) for r in recs if r.WhichOneof("record_type") == "history"]
    assert [h["_step"] for h in history] == [r["step"] for r in rows]
    for h, r in zip(history, rows):
        assert {k: v for k, v in h.items() if not k.startswith("_")} == pytest.approx(
            {k: v for k, v in r.items() if k != "step"}, rel=1e-12)
    summary = {}
    for r in recs:
        if r.WhichOneof("record_type") == "summary":
            summary.update(items(r.summary.update))
    assert summary["loss"] == pytest.approx(rows[-1]["loss"]) and summary["_step"] == 3
    loss = items(run.config.update)["loss"]  # the resolved config travels with the run
    assert loss.get("value", loss)["beta"] == 0.1


def test_pipeline_logs_each_iteration_to_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from mdpo.pipeline import Pipeline

    p = Pipeline(load_config(CONFIG, ["metrics.tracker=tensorboard"]), tmp_path)
    it0 = {"eval": {"gsm8k": {"pass@1": 0.5, "problems": 8, "tools": {"error_rate": 0.25}}}}
    it1 = {"data": {"rollout": {"trajectories": 40, "correct": 10, "correct_share": 0.25, "coverage": 0.5,
                                "finish_reasons": {"end_of_turn": 40}},
                    "filters": {"input": 40, "no_tool_call": 3, "duplicate_first_turn": 7, "kept": 30},
                    "examples": 6},
           "train": {"loss": 0.69, "rewards/margin": 0.125, "step": 3},
           "select": {"scores": {"step_1": 0.25, "final": 0.75}, "chosen": "final", "heldout": 4},
           "eval": {"gsm8k": {"pass@1": 0.625, "problems": 8}}}
    p.record("iter_0", it0)
    p.record("iter_1", it1)
    p.tracker.close()
    logged = tensorboard_scalars(tmp_path / "tensorboard")
    expect = {"eval/gsm8k/pass@1": [(0, 0.5), (1, 0.625)], "eval/gsm8k/tools/error_rate": [(0, 0.25)],
              "data/rollout/correct_share": [(1, 0.25)], "data/rollout/finish_reasons/end_of_turn": [(1, 40.0)],
              "data/filters/no_tool_call": [(1, 3.0)], "data/filters/duplicate_first_turn": [(1, 7.0)],
              "data/filters/kept": [(1, 30.0)], "data/examples": [(1, 6.0)], "train/rewards/margin": [(1, 0.125)],
              "select/scores/step_1": [(1, 0.25)], "select/chosen_score": [(1, 0.75)]}
    for tag, points in expect.items():
        assert logged[tag] == [(s, pytest.approx(v)) for s, v in points], tag
    assert set(logged) == set(scalars(it0)) | set(scalars(it1)) | {"select/chosen_score"}
    assert json.loads((tmp_path / "results.json").read_text()) == {"iter_0": it0, "iter_1": it1}


def test_missing_extra_is_one_line_naming_it(tmp_path, monkeypatch):
    # A None entry in sys.modules makes the import fail as if the package were not installed.
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    monkeypatch.setitem(sys.modules, "wandb", None)
    for kind in ("tensorboard", "wandb"):
        with pytest.raises(ConfigError) as e:
            open_tracker(load_config(CONFIG, [f"metrics.tracker={kind}"]), tmp_path, "train")
        assert str(e.value) == f"metrics.tracker {kind} needs the {kind} package: pip install 'mdpo[{kind}]'"
    assert not list(tmp_path.iterdir())


def test_tracker_choice_is_checked_and_none_logs_nothing(tmp_path):
    with pytest.raises(ConfigError, match="metrics.tracker"):
        load_config(CONFIG, ["metrics.tracker=mlflow"])
    t = open_tracker(load_config(CONFIG), tmp_path, "train")
    t.log({"loss": 1.0}, 1)
    t.close()
    assert not list(tmp_path.iterdir())


def test_scalars_keeps_numeric_leaves():
    assert scalars({"a": 1, "b": {"c": 2.5, "d": "x", "e": True, "f": [1]}, "g": float("nan")}) == {"a": 1.0, "b/c": 2.5}
