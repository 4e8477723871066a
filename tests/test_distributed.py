"""Collectives: every one mdpo issues goes through mdpo.distributed, on the device its backend needs.

NCCL reduces only CUDA tensors; gloo, which these CPU tests use, would accept the CPU tensors that made a multi-GPU
run stop at its first collective. So the 2-rank test records each collective's tensor device and caller, and the
NCCL rule itself is checked with the backend reported as NCCL.
"""

import json
import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mdpo import distributed
from mdpo.config import load_config
from mdpo.model import ModelConfig, build_model
from mdpo.trajectory import Role, Trajectory
from mdpo.weights import save_pretrained

CONFIG = os.path.join(os.path.dirname(__file__), "..", "experiments", "gemma7b_mdpo.yaml")
P, M, T, S = int(Role.PROMPT), int(Role.MODEL), int(Role.TOOL), int(Role.TEMPLATE)


def _record(records, name, fn):
    def wrapper(tensor, *args, **kwargs):
        caller = traceback.extract_stack(limit=2)[0].filename
        records.append((name, str(tensor.device), str(distributed.comm_device()), os.path.basename(caller)))
        return fn(tensor, *args, **kwargs)
    return wrapper


def _worker(rank, port, cfg, data, out, result):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    records = []
    # Only dist.all_reduce / broadcast are wrapped: FSDP's own collectives (all-gather, reduce-scatter) run on
    # the parameters' device by construction.
    dist.all_reduce = _record(records, "all_reduce", dist.all_reduce)
    dist.broadcast = _record(records, "broadcast", dist.broadcast)
    try:
        from mdpo.train import train
        train(cfg, data, out)
    finally:
        dist.destroy_process_group()
    result[rank] = records


def test_two_rank_training_collectives_use_the_group_device(tmp_path):
    model = build_model(ModelConfig.from_name("tiny-gemma3"), seed=0)
    save_pretrained(model, tmp_path / "init")
    g = torch.Generator().manual_seed(0)
    with open(tmp_path / "kto.jsonl", "w") as f:
        for i in range(4):
            n = int(torch.randint(3, 7, (1,), generator=g))
            tokens = [2, 9, 10] + torch.randint(5, 500, (n + 4,), generator=g).tolist()
            roles = [P] * 3 + [M] * n + [S] * 2 + [M] * 2
            t = Trajectory(f"k{i}", 0, tokens, roles, [0] * 3 + [1] * (n + 4), correct=i % 2 == 0)
            f.write(t.to_json() + "\n")
    # M-KTO reaches every collective site of the trainer: reference log-probs, z0, the step's metrics.
    cfg = load_config(CONFIG, [f"model.name_or_path={tmp_path / 'init'}", "model.attn_impl=eager", "loss.type=mkto",
                               "training.global_batch_size=2", "training.micro_batch_size=1", "training.epochs=1",
                               "checkpoint.every=0", "training.activation_checkpointing=false",
                               "rollout.max_length=64"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = mp.Manager().dict()
    mp.spawn(_worker, args=(port, cfg, str(tmp_path / "kto.jsonl"), str(tmp_path / "out"), result), nprocs=2,
             join=True)
    for rank in (0, 1):
        records = result[rank]
        names = [r[0] for r in records]
        assert names.count("all_reduce") >= 1 + 2 * 2  # reference table, then z0 and metrics for 2 steps
        for name, device, wanted, caller in records:
            assert caller == "distributed.py", f"{name} issued from {caller}, not through mdpo.distributed"
            assert device == wanted == "cpu"
    assert len(json.loads((tmp_path / "out" / "summary.json").read_text())["last"]) > 0


def test_collectives_move_tensors_to_cuda_under_nccl(monkeypatch):
    """With the group's backend NCCL, a CPU tensor is moved to the current CUDA device before the collective
    (on a machine without CUDA the move itself is what fails, which shows it was attempted)."""
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda *a: "nccl")
    monkeypatch.setattr(dist, "get_world_size", lambda *a: 2)
    monkeypatch.setattr(dist, "get_rank", lambda *a: 0)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert distributed.comm_device() == torch.device("cuda", 0)
    seen = []
    monkeypatch.setattr(dist, "all_reduce", lambda t, op=None: seen.append(t.device))
    x = torch.ones(3, dtype=torch.float64)
    if torch.cuda.is_available():
        distributed.all_reduce_sum(x)
        assert seen == [torch.device("cuda", 0)] and x.device.type == "cpu"
    else:
        with pytest.raises((RuntimeError, AssertionError), match="CUDA|cuda"):
            distributed.all_reduce_sum(x)
        assert seen == []  # never handed a CPU tensor to NCCL
    monkeypatch.setattr(dist, "get_backend", lambda *a: "gloo")
    assert distributed.comm_device() == torch.device("cpu")
    distributed.all_reduce_sum(x)
    assert seen == [torch.device("cpu")]
