"""Real kills: SIGKILL at deterministic points (mdpo/faults.py, MDPO_KILL_AT) while a file or folder is being
written, then a rerun that must end exactly where an uninterrupted run ends, with no temporary file left.

The killed runs are forked children of one driver subprocess (`python -c DRIVER`): the SIGKILL cannot reach
pytest, and torch is imported once per test rather than once per run. The driver runs no torch op before it
forks, so every child starts with fresh thread pools.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_train import make_traj  # noqa: E402  (tests/ is on sys.path under pytest)
from conftest import tiny_model_and_pairs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "experiments" / "gemma7b_mdpo.yaml"
TIMING = ("step_time_s", "tokens_per_s", "peak_mem_gb", "mfu")
KILLED = -signal.SIGKILL  # os.waitstatus_to_exitcode of a SIGKILLed child

# One job per forked child, in order: {"env": {...}, "call": "module:function", "args": [...], "kwargs": {...},
# "snapshot": DIR, "copy": {SRC: DST}}. Prints per job its exit code (negative: killed by that signal) and, after
# it, what DIR holds: {relative path: "dir" or the file's last character}; then copies SRC (file or folder) to DST.
DRIVER = r"""
import importlib, json, os, shutil, sys, time, traceback
from pathlib import Path

def snapshot(root):
    out = {}
    for p in sorted(Path(root).rglob("*")):
        if p.is_dir():
            out[str(p.relative_to(root))] = "dir"
        else:
            with open(p, "rb") as f:
                f.seek(max(0, p.stat().st_size - 1))
                out[str(p.relative_to(root))] = f.read().decode("latin-1")
    return out

jobs = json.loads(sys.argv[1])
for job in jobs:  # imported once, before any fork: importing runs no torch op (no thread pool to inherit)
    importlib.import_module(job["call"].split(":")[0])
for name in ("mdpo.config", "torch.distributed.checkpoint", "torch.distributed.checkpoint.state_dict"):
    importlib.import_module(name)  # the trainer's lazy imports: 1.5 s per child otherwise
codes, snaps = [], []
for job in jobs:
    t0 = time.time()
    pid = os.fork()
    if pid == 0:
        try:
            os.environ.pop("MDPO_KILL_AT", None)
            os.environ.update(job.get("env", {}))
            mod, fn = job["call"].split(":")
            if job.get("config"):
                from mdpo.config import load_config
                job["args"][0] = load_config(job["config"], job["overrides"])
            rc = getattr(importlib.import_module(mod), fn)(*job.get("args", []), **job.get("kwargs", {}))
            code = rc if isinstance(rc, int) else 0
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(code)
    codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
    snaps.append(snapshot(job["snapshot"]) if job.get("snapshot") else None)
    for src, dst in job.get("copy", {}).items():
        shutil.copytree(src, dst) if os.path.isdir(src) else shutil.copyfile(src, dst)
    print(f"job {len(codes)}: exit {codes[-1]} after {time.time() - t0:.1f} s", file=sys.stderr)
print("CODES", json.dumps([codes, snaps]))
"""


def drive(jobs: list[dict], timeout: float = 300) -> tuple[list[int], list[dict | None]]:
    """Run the jobs one after another in forked children of a driver subprocess; their exit codes and snapshots."""
    env = {k: v for k, v in os.environ.items() if k != "MDPO_KILL_AT"}
    env.update(PYTHONPATH=f"{ROOT}:{ROOT / 'tests'}", TQDM_DISABLE="1")
    r = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(jobs)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0 and "CODES" in r.stdout, r.stderr[-3000:]
    codes, snaps = json.loads(r.stdout.split("CODES", 1)[1])
    assert len(codes) == len(jobs), r.stderr[-3000:]
    print(r.stderr[-3000:])  # job timings (shown by pytest on failure)
    return codes, snaps


def within(snap: dict, folder: str) -> list[str]:
    """Names directly inside `folder` in a driver snapshot."""
    head = folder + "/"
    return sorted(k[len(head):] for k in snap if k.startswith(head) and "/" not in k[len(head):])


def temporaries(root: Path) -> list[Path]:
    """Orphans: .tmp folders (checkpoints, exports) and .NAME.*.tmp files (mdpo/atomic.py)."""
    return sorted(p for p in root.rglob("*") if p.name.endswith(".tmp") or ".tmp." in p.name)


def metric_rows(path: Path) -> list[dict]:
    """metrics.jsonl rows without wall-clock keys."""
    text = path.read_text()
    assert text.endswith("\n"), f"{path}: torn last line"
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in text.splitlines()]


# ---------------------------------------------------------------- the trainer
@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """A 2-layer Gemma (each run is mostly process work, not compute) and tests/test_train.py's 12 random pairs."""
    return tiny_model_and_pairs(tmp_path_factory.mktemp("kills"), make_traj)


def train_job(d: Path, out: Path, kill: str | None = None) -> dict:
    # 12 pairs / batch 4 x 2 epochs = 6 steps; a checkpoint (keep 2) and an export after every step but the last.
    over = [f"model.name_or_path={d / 'init'}", "model.attn_impl=sdpa", "training.global_batch_size=4",
            "training.micro_batch_size=4", "training.warmup_steps=1", "optimizer.lr=0.001", "training.epochs=2",
            "rollout.max_length=64", "checkpoint.every=1", "checkpoint.keep=2", "training.activation_checkpointing=false"]
    return {"call": "mdpo.train:train", "config": str(CONFIG), "overrides": over, "env": {"MDPO_KILL_AT": kill} if kill else {},
            "args": [None, str(d / "pairs.jsonl"), str(out)], "kwargs": {"resume": True, "export_every": 1}}


def test_trainer_killed_at_every_write_resumes_to_the_uninterrupted_result(pairs):
    """Kill the trainer in turn in the reference file, a metrics line, a checkpoint (mid-write, before its
    rename, before pruning) and an export (before its rename, with the old folder moved aside); each rerun resumes
    from the last committed checkpoint and the last one finishes. Everything equals an uninterrupted run. A run
    then started afresh (no resume) over that folder, whose checkpoints it overwrites, ends equal too."""
    base, out, resumed = pairs / "base", pairs / "killed", pairs / "resumed"
    chain = [  # (kill point, what the killed run must have left on disk: s maps relative paths to their last byte)
        ("reference.write:1", lambda s: "reference.jsonl" not in s and any(k.startswith(".reference.jsonl.") for k in s)),
        ("metrics.write:2", lambda s: s["metrics.jsonl"] != "\n" and within(s, "checkpoints") == ["step_1"]),
        ("checkpoint.save:2", lambda s: within(s, "checkpoints") == ["step_1", "step_2", "step_3.tmp"]
         and "checkpoints/step_3.tmp/trainer_state.pt" not in s),
        ("checkpoint.commit:1", lambda s: within(s, "checkpoints") == ["step_1", "step_2", "step_3.tmp"]
         and "checkpoints/step_3.tmp/trainer_state.pt" in s and "exports/step_3/config.json" in s),
        # Re-exporting step 3 (its checkpoint was not committed): killed while replacing the older folder, which
        # must be whole or absent, never half removed.
        ("export.swap:1", lambda s: "step_3.tmp" in within(s, "exports")
         and ("exports/step_3" not in s or {"config.json", "model.safetensors"} <= set(within(s, "exports/step_3")))),
        ("checkpoint.prune:2", lambda s: within(s, "checkpoints") == ["step_2", "step_3", "step_4"]),
        ("export.write:2", lambda s: "final.tmp/config.json" in s and "final" not in s),
    ]
    jobs = [train_job(pairs, base)] + [dict(train_job(pairs, out, kill), snapshot=str(out)) for kill, _ in chain]
    fresh = train_job(pairs, out)
    fresh["kwargs"]["resume"] = False
    codes, snaps = drive(jobs + [dict(train_job(pairs, out), copy={str(out): str(resumed)}), fresh])
    assert codes == [0] + [KILLED] * len(chain) + [0, 0], \
        list(zip(["base"] + [k for k, _ in chain] + ["rerun", "fresh"], codes))
    for (kill, left), snap in zip(chain, snaps[1:]):
        assert left(snap), f"after a kill at {kill}: {sorted(snap)}"

    names = lambda p: sorted(x.name for x in p.iterdir())  # noqa: E731
    for d in (out, resumed):
        assert temporaries(d) == []
        assert names(d / "checkpoints") == names(base / "checkpoints") == ["step_4", "step_5"]
        assert metric_rows(d / "metrics.jsonl") == metric_rows(base / "metrics.jsonl")
        a, b = load_file(base / "final" / "model.safetensors"), load_file(d / "final" / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), d
    out = resumed
    assert metric_rows(out / "metrics.jsonl") == metric_rows(base / "metrics.jsonl")
    assert [r["step"] for r in metric_rows(out / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    assert (out / "reference.jsonl").read_bytes() == (base / "reference.jsonl").read_bytes()
    for folder in ["final"] + [f"exports/step_{s}" for s in range(1, 6)]:
        a, b = load_file(base / folder / "model.safetensors"), load_file(out / folder / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), folder
    s1, s2 = (json.loads((p / "summary.json").read_text()) for p in (base, out))
    for s in (s1, s2):
        for k in TIMING:
            s["last"].pop(k, None)
    assert s1 == s2


def test_stale_temporaries_of_dead_writers_only_are_removed(tmp_path):
    """atomic_open removes the temporary file a killed writer of the same path left, not a live writer's."""
    from mdpo.atomic import _HOST, atomic_open

    dead = subprocess.Popen(["true"])
    dead.wait()  # reaped: its pid names no process
    stale = tmp_path / f".x.json.{_HOST}.{dead.pid}.abc.tmp"
    live = tmp_path / f".x.json.{_HOST}.{os.getppid()}.abc.tmp"  # pytest's parent: alive
    other = tmp_path / f".x.json.otherhost.{dead.pid}.abc.tmp"  # another node's writer on a shared filesystem
    for p in (stale, live, other):
        p.write_text("half")
    with atomic_open(tmp_path / "x.json") as f:
        f.write("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name, "x.json"])


# ---------------------------------------------------------------- sampling files and the pipeline
from test_pipeline import setup, write_config  # noqa: E402,F401  (setup: the tiny model with a tokenizer)


def rollout_set(path: Path) -> set:
    """A trajectory file as a set of (prompt_id, sample_id, tokens); a torn or duplicated line fails."""
    from mdpo.trajectory import read_trajectories

    text = path.read_text()
    assert text.endswith("\n"), f"{path}: torn last line"
    rows = [(t.prompt_id, t.sample_id, tuple(t.tokens)) for t in read_trajectories(path)]
    assert len(set(rows)) == len(rows), f"{path}: duplicated trajectories"
    return set(rows)


def eval_job(setup, out: Path, kill: str | None = None) -> dict:
    args = ["--model", str(setup / "init"), "--data", str(setup / "test.jsonl"), "--out", str(out), "--n", "2",
            "--temperature", "1.0", "--max-turns", "2", "--max-new-tokens", "24", "--max-length", "160",
            "--batch-size", "4", "--timeout", "5"]
    return {"call": "mdpo.eval:main", "args": [args], "env": {"MDPO_KILL_AT": kill} if kill else {},
            "snapshot": str(out)}


def test_rollout_file_killed_after_k_trajectories_resumes_to_the_same_set(setup):
    """`python -m mdpo.eval` killed while appending its 4th trajectory (half a line on disk): the rerun drops the
    torn line, draws only the missing samples, and the file equals an uninterrupted run's as a set."""
    base, out = setup / "kill_eval_base", setup / "kill_eval"
    codes, snaps = drive([eval_job(setup, base), eval_job(setup, out, "rollout.append:4"), eval_job(setup, out)])
    assert codes == [0, KILLED, 0]
    assert snaps[1]["trajectories.jsonl"] != "\n" and "metrics.json" not in snaps[1]  # torn mid-line
    assert rollout_set(out / "trajectories.jsonl") == rollout_set(base / "trajectories.jsonl")
    assert len(rollout_set(base / "trajectories.jsonl")) == 12  # 6 problems x 2 samples
    assert json.loads((out / "metrics.json").read_text()) == json.loads((base / "metrics.json").read_text())
    assert temporaries(out) == []


def _rank_sample(rank, port, config, path):
    import datetime

    import torch.distributed as dist

    from mdpo.config import load_config
    from mdpo.datasets import load_problems
    from mdpo.pipeline import rollout_params, sample

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    try:
        cfg = load_config(config)
        problems = load_problems(cfg.eval.sets[0], cfg.data.data_dir)
        sample(cfg.model.name_or_path, problems, Path(path), 2, rollout_params(cfg), cfg, "merge", 4, 7)
    finally:
        dist.destroy_process_group()


def two_ranks_sample(config: str, path: str) -> None:
    """pipeline.sample under 2 gloo ranks (forked), as torchrun would run it."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_rank_sample, args=(port, config, path), nprocs=2, join=True, start_method="fork")


def test_per_rank_merge_killed_resumes_to_the_same_file(setup):
    """Two ranks sample their shares into part files and rank 0 merges them. Killed mid-merge (half of rank 1's
    part in the merged file's temporary) and then after removing one part (the merged file is in place), the
    reruns end with the file of one process sampling everything, no part file and no temporary left."""
    config = str(write_config(setup))
    d = setup / "kill_merge"
    path = d / "rollout.jsonl"
    one = {"call": "test_kills:one_rank_sample", "args": [config, str(d / "one" / "rollout.jsonl")]}
    jobs = [one] + [{"call": "test_kills:two_ranks_sample", "args": [config, str(path)], "snapshot": str(d),
                     "env": {"MDPO_KILL_AT": kill} if kill else {}} for kill in ("merge.write:2", "merge.unlink:1", None)]
    codes, snaps = drive(jobs)
    assert codes[0] == 0 and codes[1] != 0 and codes[2] != 0 and codes[3] == 0, codes  # a rank's death fails the job
    first, second = snaps[1], snaps[2]
    assert {"rollout.rank0.jsonl", "rollout.rank1.jsonl"} <= set(first) and "rollout.jsonl" not in first
    assert any(k.startswith(".rollout.jsonl.") for k in first), sorted(first)  # the torn merge
    assert "rollout.jsonl" in second and "rollout.rank0.jsonl" not in second and "rollout.rank1.jsonl" in second
    assert rollout_set(path) == rollout_set(d / "one" / "rollout.jsonl")
    assert not list(d.glob("*.rank*.jsonl")) and temporaries(d) == []


def one_rank_sample(config: str, path: str) -> None:
    """pipeline.sample in one process (no process group): the reference for the merged file."""
    from mdpo.config import load_config
    from mdpo.datasets import load_problems
    from mdpo.pipeline import rollout_params, sample

    cfg = load_config(config)
    problems = load_problems(cfg.eval.sets[0], cfg.data.data_dir)
    sample(cfg.model.name_or_path, problems, Path(path), 2, rollout_params(cfg), cfg, "merge", 4, 7)


def test_pipeline_trainer_resumes_from_its_checkpoint(setup):
    """`python -m mdpo.pipeline --stage sft` with checkpoint.every=1, killed in the middle of training (half of
    step 4's metrics line written): the rerun resumes from step 3's checkpoint and ends with the weights and
    metrics of an uninterrupted run."""
    sft = setup / "kill_sft.jsonl"
    sft.write_text("".join((setup / "sft.jsonl").read_text().splitlines(keepends=True)[:24]))
    over = [f"sft.data={sft}", "sft.epochs=1", "sft.global_batch_size=4", "checkpoint.every=1", "checkpoint.keep=2"]
    job = lambda out, kill=None: {  # noqa: E731
        "call": "mdpo.pipeline:main", "args": [[str(write_config(setup)), "--out", str(out), "--stage", "sft", *over]],
        "env": {"MDPO_KILL_AT": kill} if kill else {}, "snapshot": str(out)}
    base, out = setup / "kill_sft_base", setup / "kill_sft"
    killed_metrics = setup / "kill_sft_metrics.jsonl"
    codes, snaps = drive([job(base), dict(job(out, "metrics.write:4"), copy={str(out / "sft" / "metrics.jsonl"):
                                                                             str(killed_metrics)}), job(out)])
    assert codes == [0, KILLED, 0]
    assert within(snaps[1], "sft/checkpoints") == ["step_2", "step_3"] and "sft/final" not in snaps[1]
    # Resumed, not restarted: steps 1-3's lines are the killed run's, wall-clock fields included.
    before = killed_metrics.read_text().splitlines(keepends=True)
    assert len(before) == 4 and not before[-1].endswith("\n")
    assert (out / "sft" / "metrics.jsonl").read_text().splitlines(keepends=True)[:3] == before[:3]
    assert metric_rows(out / "sft" / "metrics.jsonl") == metric_rows(base / "sft" / "metrics.jsonl")
    assert len(metric_rows(out / "sft" / "metrics.jsonl")) == 6
    a, b = (load_file(d / "sft" / "final" / "model.safetensors") for d in (base, out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "sft" in json.loads((out / "state.json").read_text())
    assert temporaries(out) == []
