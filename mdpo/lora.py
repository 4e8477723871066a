"""LoRA adapters (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", eq. 3): h = W x + (alpha / r) B A x.

Why: full fine-tuning of a 7B policy holds fp32 weights, gradients and two AdamW moments (~16 bytes a
parameter, ~112 GB for Gemma-7B); with LoRA the base is frozen and kept in the compute dtype (2 bytes a parameter
in bf16, no gradient, no optimizer state) and only A (r x in) and B (out x r) train. B starts at zero, so the
adapted model *is* the base at step 0, and the base with the adapters switched off is the reference model of
DPO for free: no second model is held (mdpo.train).

Adapters wrap the projections named in `lora.targets`. Every family mdpo supports shares one module tree
(mdpo/model.py), so the same seven names (attention q/k/v/o, MLP gate/up/down) work for all of them. The wrapped
module keeps `weight` and `bias` under their own names, so HF loading, FSDP2 and DCP see the base parameters
where they always were; the adapters add `<proj>.lora_A.weight` and `<proj>.lora_B.weight`, PEFT's names.

Rollout and evaluation never run adapters: exports are merged (W + (alpha / r) B A, computed in fp32, written in
the model's dtype), and beside each merged export the adapter is written in PEFT's format so that
`PeftModel.from_pretrained(base, export / "adapter")` gives the same logits (tests/test_lora.py).
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from mdpo.atomic import write_json_atomic

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_DIR = "adapter"  # inside each export folder: swapped into place with it, in one rename
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PEFT's key prefix in front of the transformers model's own names


class LoRALinear(nn.Module):
    """A frozen linear projection plus a trainable low-rank update. `enabled` False: the base projection alone."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # the same Parameter objects: names, sharding and loading are unchanged
        self.register_parameter("bias", base.bias)
        # Adapters are fp32 master weights whatever the base's dtype (under FSDP2 they are cast for compute).
        kw = {"device": base.weight.device, "dtype": torch.float32}
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, **kw)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, **kw)
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.enabled = True

    def reset_adapter(self, generator: torch.Generator | None = None) -> None:
        """A as nn.Linear (and PEFT) initialise it: kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in));
        B = 0, so the update starts at exactly zero."""
        bound = 1 / math.sqrt(self.in_features)
        a = torch.empty(self.lora_A.weight.shape).uniform_(-bound, bound, generator=generator)  # drawn on the CPU:
        with torch.no_grad():  # the same numbers on every device
            self.lora_A.weight.copy_(a)
            self.lora_B.weight.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if not self.enabled:
            return y
        a, b = self.lora_A.weight.to(x.dtype), self.lora_B.weight.to(x.dtype)  # no-ops under FSDP2's cast
        return y + F.linear(F.linear(self.dropout(x), a), b) * self.scaling

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, rank={self.rank}, alpha={self.alpha}"


class LoRAError(ValueError):
    """LoRA cannot be applied as configured; the message names the key."""


def apply_lora(model: nn.Module, lora, base_dtype: torch.dtype, seed: int) -> list[str]:
    """Freeze `model`, wrap its `lora.targets` projections in every block, and make the embeddings / untied head
    trainable if asked. The frozen base is cast to `base_dtype` (the compute dtype: its values are only ever used
    in it, so nothing is lost), trainable tensors stay fp32. Returns the trainable parameters' names.

    The adapters' initial values come from `seed` alone, so every rank of an FSDP job builds the same ones."""
    bad = [t for t in lora.targets if t not in TARGETS]
    if bad or not lora.targets:
        raise LoRAError(f"lora.targets: unknown projection {bad[0]!r}; choose from {', '.join(TARGETS)}" if bad
                        else f"lora.targets: empty; choose from {', '.join(TARGETS)}")
    tied = model.config.tie_embeddings
    if lora.train_head and tied and not lora.train_embeddings:
        raise LoRAError("lora.train_head: this model's head is its input embedding (tie_word_embeddings); "
                        "set lora.train_embeddings true to train both")
    model.requires_grad_(False)
    for p in model.parameters():
        p.data = p.data.to(base_dtype)
    g = torch.Generator(device="cpu").manual_seed(seed)
    for block in model.layers:
        for parent in (block.self_attn, block.mlp):
            for name in lora.targets:
                base = getattr(parent, name, None)
                if isinstance(base, nn.Linear):
                    wrapped = LoRALinear(base, lora.rank, lora.alpha, lora.dropout)
                    wrapped.reset_adapter(g)
                    setattr(parent, name, wrapped)
    trainable = [model.embed_tokens.weight] if lora.train_embeddings else []
    if lora.train_head and not tied:
        trainable.append(model.lm_head.weight)
    for p in trainable:
        p.data = p.data.float()
        p.requires_grad_(True)
    for _, m in lora_modules(model):
        m.lora_A.weight.requires_grad_(True)
        m.lora_B.weight.requires_grad_(True)
    return [n for n, p in model.named_parameters() if p.requires_grad]


def lora_modules(model: nn.Module):
    """(name, LoRALinear) of every adapted projection."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


@contextmanager
def adapters_disabled(model: nn.Module):
    """The base model: every adapter off inside the block (the reference forward), restored after."""
    mods = [m for _, m in lora_modules(model)]
    before = [m.enabled for m in mods]
    for m in mods:
        m.enabled = False
    try:
        yield model
    finally:
        for m, e in zip(mods, before):
            m.enabled = e


def merge_state_dict(sd: dict[str, torch.Tensor], lora) -> dict[str, torch.Tensor]:
    """A full state dict with adapters -> the plain model's: W + (alpha / r) B A per adapted projection, in fp32
    (then in W's dtype), and the lora_* entries dropped."""
    out = {k: v for k, v in sd.items() if ".lora_A." not in k and ".lora_B." not in k}
    scaling = lora.alpha / lora.rank
    for k in sd:
        if k.endswith(".lora_A.weight"):
            prefix = k[: -len(".lora_A.weight")]
            w = sd[prefix + ".weight"]
            delta = sd[prefix + ".lora_B.weight"].float() @ sd[k].float()
            out[prefix + ".weight"] = (w.float() + scaling * delta).to(w.dtype)
    return out


def adapter_tensors(sd: dict[str, torch.Tensor], lora, hf_name) -> dict[str, torch.Tensor]:
    """The tensors PEFT's adapter_model.safetensors holds: the adapters and any fully trained embedding / head,
    under PEFT's names (base_model.model. + the transformers name), in fp32."""
    keep = [k for k in sd if ".lora_A." in k or ".lora_B." in k]
    keep += ["embed_tokens.weight"] if lora.train_embeddings else []
    keep += ["lm_head.weight"] if lora.train_head and "lm_head.weight" in sd else []
    out = {PEFT_PREFIX + hf_name(k): sd[k].detach().to("cpu", torch.float32).contiguous() for k in keep}
    if lora.train_embeddings and "lm_head.weight" not in sd:
        # Tied: PEFT (ensure_weight_tying) stores the trained embedding a second time as the head, and reads both.
        out[PEFT_PREFIX + "lm_head.weight"] = out[PEFT_PREFIX + hf_name("embed_tokens.weight")].clone()
    return out


def adapter_config(lora, base: str, tied: bool, has_head: bool) -> dict:
    """PEFT's adapter_config.json for these adapters on the base `base` (the model training started from)."""
    modules = (["embed_tokens"] if lora.train_embeddings else []) + (["lm_head"] if lora.train_head and has_head
                                                                     else [])
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
            "r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
            "target_modules": sorted(lora.targets), "bias": "none", "fan_in_fan_out": False,
            "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
            "modules_to_save": modules or None,
            # A trained tied embedding is also the head: PEFT must keep the two tied as mdpo does.
            "ensure_weight_tying": bool(tied and lora.train_embeddings)}


def save_adapter(sd: dict[str, torch.Tensor], folder: Path, lora, base: str, tied: bool, hf_name) -> None:
    """Write `folder`/adapter_config.json and adapter_model.safetensors (PEFT's format), weights first."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = adapter_tensors(sd, lora, hf_name)
    tmp = folder / f".{ADAPTER_WEIGHTS}.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(folder / ADAPTER_WEIGHTS)
    write_json_atomic(folder / ADAPTER_CONFIG, adapter_config(lora, base, tied, "lm_head.weight" in sd))


def read_adapter_config(folder: Path) -> dict:
    return json.loads((Path(folder) / ADAPTER_CONFIG).read_text())
