"""CPU inference with weights packed once into oneDNN's blocked layout.

At decode shapes (a few rows against a large weight) torch's `F.linear` on this CPU class runs MKL's gemv at
about 10 GB/s: the (262144, 640) fp32 LM head of Gemma 3 270M takes 60 ms per token against a 23 ms
read-bandwidth bound, and at 8 rows 120-145 ms. The same weight reordered once for oneDNN (the transform that
torch.compile's CPU freezing pass applies to linears) takes 28 ms at 1 row and 29 ms at 8; bf16 18 vs 30 ms.
Measurements in docs/LOG.md.

`pack_for_cpu(model, batch_size)` returns a *twin* of the model: the same module tree and the same parameter
tensors, with every nn.Linear swapped for a PackedLinear and the tied LM head packed too. The model itself is
not touched, so training code never sees packed weights. The twin is for no-grad inference, and it is a
snapshot: `is_fresh(twin, model)` says whether it still matches the model's weights (an optimizer step bumps a
parameter's version counter; `.to()` replaces the tensors), and callers repack when it does not.

Cost: the packed copies hold the weights a second time (+1.07 GB for the 270M model in fp32), which is why
packing is a choice of the caller (the Sampler's `pack` argument) and only happens on CPU.
"""

from __future__ import annotations

import copy
import os

import torch
import torch.nn as nn
import torch.nn.functional as F


def can_pack(weight: torch.Tensor) -> bool:
    """Whether oneDNN packing applies: a CPU tensor in fp32, or bf16 on a CPU with native bf16 support."""
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if weight.dtype == torch.float32:
        return True
    return weight.dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def available_memory_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux), else free physical pages."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def should_pack(model: nn.Module) -> bool:
    """The default: pack where it applies and the second copy of the weights leaves half the free memory."""
    return can_pack(model.embed_tokens.weight) and model.weight_bytes() < available_memory_bytes() // 2


def _pack(weight: torch.Tensor, batch_size: int) -> torch.Tensor:
    # The batch-size hint picks oneDNN's blocking: packing for 1 row and running 8 is ~1.5x slower on the
    # (262144, 640) head than packing for 8.
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), batch_size)


def _linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    # (..., in) -> (..., out); the op flattens the leading dims itself and adds the bias in the same kernel.
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [None], "")


# Under torch.compile the packed linear is an opaque op: inductor's own lowering of _linear_pointwise only
# accepts weights it froze itself, while ours are inputs (so one compiled step serves every repack).
@torch.library.custom_op("mdpo::packed_linear", mutates_args=())
def _linear_op(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return _linear(x, packed, bias)


@_linear_op.register_fake
def _(x, packed, bias=None):
    return x.new_empty(*x.shape[:-1], packed.shape[0])


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., in) @ W^T (+ bias) with W packed by _pack. Eager calls the oneDNN op directly: the custom-op
    wrapper costs ~14 us a call, 1.8 ms of a 270M decode step."""
    return _linear_op(x, packed, bias) if torch.compiler.is_compiling() else _linear(x, packed, bias)


class PackedLinear(nn.Module):
    """An nn.Linear whose forward uses a oneDNN-packed copy of its weight (no autograd); Qwen2's q/k/v biases
    are the model's own tensors, added inside the same oneDNN call."""

    def __init__(self, linear: nn.Linear, batch_size: int):
        super().__init__()
        self.weight = linear.weight  # the model's own parameter (kept for freshness checks and state_dict)
        self.bias = linear.bias
        self.packed = _pack(linear.weight, batch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, self.packed, self.bias)


class PackedEmbedding(nn.Module):
    """The tied embedding: lookups read the model's weight, `attend` (the LM head) a packed copy of it."""

    def __init__(self, embedding: nn.Embedding, batch_size: int):
        super().__init__()
        self.weight = embedding.weight
        self.packed = _pack(embedding.weight, batch_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)

    def attend(self, hidden: torch.Tensor) -> torch.Tensor:
        return packed_linear(hidden, self.packed)


def pack_for_cpu(model: nn.Module, batch_size: int = 1) -> nn.Module:
    """A twin of a `model` sharing its tensors, with linears and the LM head packed for CPU inference.

    batch_size: the rows a decode step usually runs (the Sampler's slots); any row count works.
    """
    if not can_pack(model.embed_tokens.weight):
        raise ValueError(f"cannot pack a {model.embed_tokens.weight.dtype} model on "
                         f"{model.embed_tokens.weight.device} for oneDNN")
    # deepcopy with every tensor pre-registered in the memo copies the module tree but not one weight.
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    twin = copy.deepcopy(model, memo)
    for module in list(twin.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, PackedLinear(child, batch_size))
    if model.config.tie_embeddings:  # an untied head is an nn.Linear (lm_head), packed above
        twin.embed_tokens = PackedEmbedding(twin.embed_tokens, batch_size)
    twin.eval()
    twin._packed_from = {name: _signature(p) for name, p in model.named_parameters()}
    return twin


def _signature(p: torch.Tensor) -> tuple:
    # In-place updates (optimizer steps, copy_) bump _version; Module.to() swaps p.data, which keeps the
    # Parameter object but changes its storage and maybe its dtype.
    return id(p), p._version, p.data_ptr(), p.dtype


def is_fresh(twin: nn.Module, model: nn.Module) -> bool:
    """Whether `twin` (from pack_for_cpu(model)) still has the model's current weights."""
    return twin._packed_from == {name: _signature(p) for name, p in model.named_parameters()}
