"""torch.distributed in one place: the process group, rank/world, and every collective mdpo issues.

NCCL reduces only CUDA tensors, gloo only CPU ones (for what mdpo sends). Trainer state that feeds a
collective (a table of reference log-probs, a step's packed metrics) is naturally built on the CPU, and a
gloo test would never notice that a NCCL run stops at its first collective. So no other module calls a
collective directly: each goes through the helpers below, which move the tensor to the device the group's
backend needs (`comm_device`) and back to where it came from.
"""

from __future__ import annotations

import contextlib
import os
import sys

import torch
import torch.distributed as dist


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group."""
    if initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def comm_device() -> torch.device:
    """The device a collective's tensors must live on for the current group's backend."""
    if initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce(x: torch.Tensor, op) -> torch.Tensor:
    """`op` over ranks in place (through the communication device when x lives elsewhere); x's own device."""
    if world()[1] == 1:
        return x
    dev = comm_device()
    y = x if x.device == dev else x.to(dev)
    dist.all_reduce(y, op=op)
    if y is not x:
        x.copy_(y)
    return x


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum `x` over ranks (in place when no copy was needed); returns the result on x's own device."""
    return _all_reduce(x, dist.ReduceOp.SUM)  # SUM: gloo has no AVG


def all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    """Elementwise maximum of `x` over ranks (in place when no copy was needed), on x's own device."""
    return _all_reduce(x, dist.ReduceOp.MAX)


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of `x` over ranks (a new tensor when world > 1)."""
    ws = world()[1]
    return x if ws == 1 else all_reduce_sum(x.clone()) / ws


def barrier() -> None:
    if world()[1] > 1:
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])  # NCCL needs to know its device
        else:
            dist.barrier()


def default_device() -> torch.device:
    """This rank's GPU (torchrun set it as current), else the CPU. On CUDA, fp32 matmuls that remain (the
    sampler's fp32 logits, an fp32 run) use TF32 tensor cores: 8x the plain fp32 rate on an H100."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@contextlib.contextmanager
def process_group():
    """The current process group, or for the duration a one-process group of its own.

    The trainer always runs its model under FSDP2, also alone: then one code path (and one set of numerics:
    mixed precision, sharded state, checkpoints) serves one process and many, and the stored reference
    log-probs come from the very forward that trains. fully_shard needs a group, so a single process makes a
    one-member group (an in-memory store: nothing listens on a port) and removes it afterwards.
    """
    if initialized():
        yield
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                            **({"device_id": default_device()} if backend == "nccl" else {}))
    try:
        yield
    finally:
        dist.destroy_process_group()


def init_distributed() -> None:
    """Join the torchrun process group when launched by torchrun (NCCL on GPUs, gloo on CPUs)."""
    if "WORLD_SIZE" in os.environ and not initialized():
        if torch.cuda.is_available():
            # Set before the group exists, so NCCL's communicator is bound to this rank's GPU.
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def run_cli(body, errors: tuple) -> int:
    """A CLI's body inside the torchrun process group: 0 on success, 2 and one line on `errors`."""
    init_distributed()
    try:
        body()
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if initialized():
            dist.destroy_process_group()
    return 0
