"""The decoder of every model family (Gemma 1 / 2 / 3, Llama 3, Mistral, Qwen2 / 2.5, Qwen3) in pure PyTorch.

One module tree for all of them; `ModelConfig.family` names a declaration in mdpo/families.py, whose switches
turn on the parts that differ (and only those branch). Parameter names mirror the Hugging Face checkpoints
(minus the leading "model." of the decoder; an untied head is "lm_head"), so weight loading is a one-line
rename checked strictly (see mdpo/weights.py).

The model is pure: no tokenizer, no sampling, no no_grad. `forward` takes explicit positions, which
define both RoPE and the attention mask, and an optional preallocated KV cache.

Every detail below that changes logits is commented where it happens; sources are the transformers
reference classes (which the tests match to 1e-4), google/gemma_pytorch and meta-llama/llama3.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from mdpo.families import FAMILIES, Family, default_layer_types, family

LAYER_TYPES = ("full", "sliding")
ATTN_IMPLS = ("sdpa", "eager")
ROPE_SCALINGS = ("linear", "llama3")


@dataclass
class ModelConfig:
    """Architecture of one model. Presets: `ModelConfig.from_name("gemma-7b")`, `("qwen2.5-7b")`, ..."""

    family: str = "gemma3"  # a mdpo/families.py name: gemma (Gemma 1), gemma2, gemma3, llama, mistral, qwen2, qwen3
    vocab_size: int = 262144
    hidden_size: int = 640
    intermediate_size: int = 2048
    num_layers: int = 18
    num_heads: int = 4
    num_kv_heads: int = 1
    head_dim: int = 256
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_base: float = 10_000.0  # RoPE base of full-attention layers
    rope_local_base: float | None = None  # RoPE base of sliding layers (Gemma 3: 1e4); None = rope_base
    rope_scaling_factor: float = 1.0  # position scaling of full layers (Gemma 3 4b+: linear 8; Llama 3.1: llama3 8)
    rope_scaling_type: str = "linear"  # "linear" (all frequencies / factor) or "llama3" (by wavelength, below)
    rope_low_freq_factor: float = 1.0  # llama3: wavelengths above original / low are divided by the factor,
    rope_high_freq_factor: float = 4.0  # those below original / high are kept, the band between is interpolated
    rope_original_max_positions: int = 8192  # llama3: the context the frequencies were trained for
    query_pre_attn_scalar: float | None = None  # scores scale = this ** -0.5; None = head_dim (Gemma 1)
    attn_softcap: float | None = None  # Gemma 2: 50, tanh cap on attention scores
    final_softcap: float | None = None  # Gemma 2: 30, tanh cap on the logits
    sliding_window: int | None = None  # keys k with 0 <= q - k < sliding_window on sliding layers
    layer_types: list[str] | None = None  # "full" / "sliding" per layer; None = the family's pattern
    tie_embeddings: bool = True  # the LM head is the input embedding (Gemma, small Llama / Qwen); else lm_head
    bos_id: int = 2
    eos_id: int = 1
    pad_id: int = 0

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"unknown model family {self.family!r}; known: {', '.join(FAMILIES)}")
        if self.layer_types is None:
            self.layer_types = default_layer_types(self.spec.layer_pattern, self.num_layers)
        self.layer_types = list(self.layer_types)
        if len(self.layer_types) != self.num_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
        bad = set(self.layer_types) - set(LAYER_TYPES)
        if bad:
            raise ValueError(f"unknown layer types {sorted(bad)}; expected {LAYER_TYPES}")
        if "sliding" in self.layer_types and not self.sliding_window:
            raise ValueError("sliding layers need a sliding_window")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.rope_scaling_type not in ROPE_SCALINGS:
            raise ValueError(f"unknown rope_scaling_type {self.rope_scaling_type!r}; expected one of {ROPE_SCALINGS}")

    @property
    def spec(self) -> Family:
        """The family's declaration (mdpo/families.py): the architecture switches read it."""
        return family(self.family)

    # Gemma 2 and 3 wrap both sublayers in an extra norm on their output (and rename the pre-FFN norm).
    @property
    def post_norms(self) -> bool:
        return self.spec.post_norms

    # Gemma 3 replaces Gemma 2's attention soft-cap with RMSNorm on q and k; Qwen3 adds the same norms.
    @property
    def qk_norm(self) -> bool:
        return self.spec.qk_norm

    @property
    def query_scale(self) -> float:
        # Gemma 1 scales by head_dim**-0.5; Gemma 2/3 by query_pre_attn_scalar**-0.5 (gemma-2-9b shipped
        # with 224 and was corrected to 256 = head_dim; gemma-2-27b really uses hidden/heads = 144).
        return float(self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @classmethod
    def from_name(cls, name: str, **overrides) -> "ModelConfig":
        """A named preset (see PRESETS), optionally with fields replaced."""
        key = PRESET_ALIASES.get(name, name)
        if key not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}")
        preset = PRESETS[key]
        if "num_layers" in overrides and "layer_types" not in overrides and preset.layer_types == \
                default_layer_types(preset.spec.layer_pattern, preset.num_layers):
            overrides["layer_types"] = None  # the family's pattern at the new depth
        return replace(preset, **overrides)

    def to_dict(self) -> dict:
        return asdict(self)


def _g1(**kw) -> ModelConfig:
    return ModelConfig(family="gemma", vocab_size=256000, max_position_embeddings=8192, **kw)


def _g2(**kw) -> ModelConfig:
    return ModelConfig(family="gemma2", vocab_size=256000, max_position_embeddings=8192, query_pre_attn_scalar=256,
                       attn_softcap=50.0, final_softcap=30.0, sliding_window=4096, **kw)


def _g3(**kw) -> ModelConfig:
    return ModelConfig(family="gemma3", vocab_size=262144, max_position_embeddings=32768, query_pre_attn_scalar=256,
                       rope_base=1_000_000.0, rope_local_base=10_000.0, sliding_window=512, **kw)


def _llama(**kw) -> ModelConfig:
    # Llama 3.1 / 3.2: 128k vocabulary, theta 5e5, llama3 RoPE scaling from an 8k original context
    kw = dict(dict(family="llama", vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5, head_dim=128,
                   rope_base=500_000.0, rope_scaling_type="llama3", rope_scaling_factor=8.0,
                   tie_embeddings=False, bos_id=128000, eos_id=128009, pad_id=128004), **kw)
    return ModelConfig(**kw)


def _qwen(**kw) -> ModelConfig:
    # Qwen2.5 / Qwen3: theta 1e6, 151k vocabulary (+ padding rows), small sizes tie the head
    kw = dict(dict(family="qwen2", vocab_size=151936, max_position_embeddings=32768, head_dim=128,
                   rope_base=1_000_000.0, tie_embeddings=True, bos_id=151643, eos_id=151645, pad_id=151643), **kw)
    return ModelConfig(**kw)


PRESETS: dict[str, ModelConfig] = {
    "gemma-2b": _g1(hidden_size=2048, intermediate_size=16384, num_layers=18, num_heads=8, num_kv_heads=1),
    "gemma-7b": _g1(hidden_size=3072, intermediate_size=24576, num_layers=28, num_heads=16, num_kv_heads=16),
    "gemma-2-2b": _g2(hidden_size=2304, intermediate_size=9216, num_layers=26, num_heads=8, num_kv_heads=4),
    "gemma-2-9b": _g2(hidden_size=3584, intermediate_size=14336, num_layers=42, num_heads=16, num_kv_heads=8),
    "gemma-3-270m": _g3(hidden_size=640, intermediate_size=2048, num_layers=18, num_heads=4, num_kv_heads=1),
    "gemma-3-1b": _g3(hidden_size=1152, intermediate_size=6912, num_layers=26, num_heads=4, num_kv_heads=1),
    # Tiny configs for tests: same flags as their generation, small enough for a CPU in milliseconds,
    # with windows short enough that test prompts cross them.
    "tiny-gemma": ModelConfig(family="gemma", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=3,
                              num_heads=4, num_kv_heads=1, head_dim=16, max_position_embeddings=256),
    "tiny-gemma2": ModelConfig(family="gemma2", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=4,
                               num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=256,
                               query_pre_attn_scalar=24, attn_softcap=50.0, final_softcap=30.0, sliding_window=8),
    "tiny-gemma3": ModelConfig(family="gemma3", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=6,
                               num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=256,
                               query_pre_attn_scalar=16, rope_base=1_000_000.0, rope_local_base=10_000.0,
                               sliding_window=8),
    # Llama-shaped families: shapes of the real checkpoints (reference/families.md; benchmarks, plans) and tiny
    # ones for tests, each with the family's quirks on (an untied head, q/k/v biases, q/k norms, llama3 RoPE).
    "llama-3.1-8b": _llama(hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8),
    "llama-3.2-1b": _llama(hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32, num_kv_heads=8,
                           head_dim=64, rope_scaling_factor=32.0, tie_embeddings=True),
    "mistral-7b-v0.3": ModelConfig(family="mistral", vocab_size=32768, hidden_size=4096, intermediate_size=14336,
                                   num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                                   max_position_embeddings=32768, rms_norm_eps=1e-5, rope_base=1_000_000.0,
                                   tie_embeddings=False, bos_id=1, eos_id=2, pad_id=0),
    "qwen2.5-7b": _qwen(hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28, num_kv_heads=4,
                        vocab_size=152064, tie_embeddings=False),
    "qwen2.5-0.5b": _qwen(hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14, num_kv_heads=2,
                          head_dim=64),
    "qwen3-0.6b": _qwen(family="qwen3", hidden_size=1024, intermediate_size=3072, num_layers=28, num_heads=16,
                        num_kv_heads=8, max_position_embeddings=40960),
    "tiny-llama": ModelConfig(family="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=3,
                              num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-5,
                              rope_base=500_000.0, rope_scaling_type="llama3", rope_scaling_factor=8.0,
                              rope_original_max_positions=64, tie_embeddings=False, bos_id=1, eos_id=2, pad_id=0),
    "tiny-mistral": ModelConfig(family="mistral", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=3,
                                num_heads=4, num_kv_heads=1, head_dim=16, max_position_embeddings=256,
                                rms_norm_eps=1e-5, rope_base=1_000_000.0, tie_embeddings=False, bos_id=1, eos_id=2,
                                pad_id=0),
    "tiny-mistral-v0.1": ModelConfig(family="mistral", vocab_size=512, hidden_size=64, intermediate_size=128,
                                     num_layers=3, num_heads=4, num_kv_heads=1, head_dim=16, max_position_embeddings=256,
                                     rms_norm_eps=1e-5, rope_base=10_000.0, sliding_window=8,
                                     layer_types=["sliding"] * 3, tie_embeddings=False, bos_id=1, eos_id=2, pad_id=0),
    "tiny-qwen2": ModelConfig(family="qwen2", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=3,
                              num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=256,
                              rope_base=1_000_000.0, tie_embeddings=True, bos_id=1, eos_id=2, pad_id=0),
    "tiny-qwen3": ModelConfig(family="qwen3", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=3,
                              num_heads=4, num_kv_heads=2, head_dim=32, max_position_embeddings=256,
                              rope_base=1_000_000.0, tie_embeddings=False, bos_id=1, eos_id=2, pad_id=0),
}
PRESET_ALIASES = {"gemma-1.1-7b-it": "gemma-7b", "gemma-1.1-2b-it": "gemma-2b", "gemma-2-9b-it": "gemma-2-9b",
                  "gemma-2-2b-it": "gemma-2-2b", "gemma-3-1b-it": "gemma-3-1b", "llama-3.1-8b-instruct": "llama-3.1-8b",
                  "mistral-7b-instruct-v0.3": "mistral-7b-v0.3", "qwen2.5-7b-instruct": "qwen2.5-7b",
                  "qwen2.5-math-7b": "qwen2.5-7b"}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, offset: bool):
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            # Gemma's weights are zero-centred (scale = 1 + w), and the whole thing, multiply included, runs in
            # fp32 with one cast at the end (transformers PR 29402: casting first changes bf16 logits).
            return (xf * (1.0 + self.weight.float())).type_as(x)
        # Llama / Mistral / Qwen: the normalised x is cast back to the input dtype first, then scaled by w in
        # the weight's dtype.
        return self.weight * xf.to(x.dtype)


def rope_frequencies(head_dim: int, base: float, config: "ModelConfig | None" = None, device=None) -> torch.Tensor:
    """Inverse frequencies (head_dim / 2,) in fp32, with the config's RoPE scaling of full-attention layers."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / (base ** exponent)
    if config is None or config.rope_scaling_factor == 1.0:
        return inv_freq
    factor = config.rope_scaling_factor
    if config.rope_scaling_type == "linear":
        return inv_freq / factor  # linear scaling divides every frequency (= scales positions down)
    # llama3 (Llama 3.1's release): frequencies whose wavelength exceeds original / low_freq_factor are divided by
    # the factor, those shorter than original / high_freq_factor are kept, and the band between blends the two
    # linearly in original / wavelength.
    low, high, orig = config.rope_low_freq_factor, config.rope_high_freq_factor, config.rope_original_max_positions
    wavelen = 2 * torch.pi / inv_freq
    scaled = torch.where(wavelen > orig / low, inv_freq / factor, inv_freq)
    smooth = (orig / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    between = (wavelen >= orig / high) & (wavelen <= orig / low)
    return torch.where(between, blended, scaled)


def rope_tables(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """cos/sin tables (B, T, head_dim) for integer positions (B, T), computed in fp32 then cast to dtype."""
    # Angles in fp32: in bf16, positions past 256 lose their low bits and neighbouring tokens collide.
    angles = positions[..., None].float() * inv_freq  # (B, T, D/2)
    angles = torch.cat([angles, angles], dim=-1)  # (B, T, D): half-split layout, not interleaved pairs
    # Like transformers, the tables are cast to the activation dtype and the rotation runs in that dtype
    # (gemma_pytorch rotates in fp32 instead; identical in fp32, slightly different in bf16).
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, D) by tables (B, T, D), half-split ("rotate_half") convention."""
    cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, D), broadcast over heads
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos + rotated * sin


def attention_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask (B, 1, Tq, Tk): 0 where a query may attend (0 <= q - k, and q - k < window on sliding
    layers), -inf elsewhere.

    q_pos is (B, Tq); k_pos is (B, Tk) or (Tk,). Positions, not indices, decide visibility, so right-padded
    rows and cache slots beyond a row's length are hidden by causality alone. Additive rather than boolean
    because CPU SDPA runs about 3x faster with a float mask than with a boolean one (measured, torch 2.13).
    """
    if k_pos.dim() == 1:
        k_pos = k_pos[None]
    delta = q_pos[:, :, None] - k_pos[:, None, :]  # (B, Tq, Tk)
    visible = delta >= 0
    if window is not None:
        # Window semantics: W keys including the token itself (q - k < W). W + 1 here changes logits
        # from position W on.
        visible = visible & (delta < window)
    mask = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
    return mask.masked_fill_(~visible, float("-inf"))[:, None]


class KVCache:
    """Preallocated keys and values, one (B, H_kv, max_len, D) pair per layer.

    A token at position p is stored in slot p of its row, so rows of different lengths share one cache
    and positions are the same ones the trainer uses for the same token sequence.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, dtype=torch.float32, device=None):
        shape = (batch_size, config.num_kv_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.max_len = max_len
        self.rows: torch.Tensor | None = None  # set on views from select(): the cache rows a forward uses

    def select(self, rows: torch.Tensor) -> "KVCache":
        """A view of this cache for a forward over only `rows` (R,) of the batch (e.g. one row's prefill)."""
        view = copy.copy(self)
        view.rows = rows
        return view

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, kv_len: int):
        """Write k, v (B, H_kv, T, D) at slots `positions` (B, T); return slots [0, kv_len) of this layer."""
        if self.rows is None:
            index = positions[:, None, :, None].expand_as(k)  # (B, H_kv, T, D)
            self.k[layer].scatter_(2, index, k)
            self.v[layer].scatter_(2, index, v)
            return self.k[layer][:, :, :kv_len], self.v[layer][:, :, :kv_len]
        # Advanced indices on dims 0 and 2 put their broadcast shape (R, T) first: values are (R, T, H_kv, D).
        self.k[layer][self.rows[:, None], :, positions] = k.transpose(1, 2)
        self.v[layer][self.rows[:, None], :, positions] = v.transpose(1, 2)
        return self.k[layer][self.rows, :, :kv_len], self.v[layer][self.rows, :, :kv_len]

    def copy_prefix(self, src: int, dst: torch.Tensor, length: int):
        """Copy slots [0, length) of row src into rows dst: N samples of one prompt share one prefill."""
        for k, v in zip(self.k, self.v):
            k[dst, :, :length] = k[src, :, :length]
            v[dst, :, :length] = v[src, :, :length]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        c = config
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.scale = c.query_scale
        self.softcap = c.attn_softcap
        self.window = c.sliding_window if c.layer_types[layer_idx] == "sliding" else None
        bias = c.spec.qkv_bias  # Qwen2 biases q, k and v (never o)
        self.q_proj = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=bias)
        self.k_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=bias)
        self.v_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=bias)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=False)
        if c.qk_norm:
            # One weight of size head_dim shared by all heads, applied before RoPE (Gemma 3, Qwen3).
            self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps, c.spec.norm_offset)
            self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps, c.spec.norm_offset)

    def forward(self, x, cos, sin, mask, positions, cache: KVCache | None, kv_len: int, impl: str):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if getattr(cache, "paged", False):
            # A packed step over a paged cache (mdpo.paged.StepView): it writes k, v into its blocks and runs the
            # attention of each row over that row's blocks (the step's rows have different lengths).
            out = cache.attend(self.layer_idx, q, k, v, self.scale, self.softcap, self.window, impl)
            return self.o_proj(out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v, positions, kv_len)  # (B, Hkv, S, D)
        if impl == "sdpa" and self.softcap is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale,
                                                 enable_gqa=self.num_heads != self.num_kv_heads)
        else:
            # Explicit path: fused SDPA kernels cannot apply Gemma 2's tanh soft-cap.
            out = eager_attention(q, k, v, mask, self.scale, self.softcap)
        out = out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)  # (B, T, H*D)
        return self.o_proj(out)


def eager_attention(q, k, v, mask, scale: float, softcap: float | None):
    """Reference attention: scores in the activation dtype, softmax in fp32 (as transformers' eager)."""
    n_rep = q.shape[1] // k.shape[1]
    if n_rep > 1:  # GQA / MQA: query head h reads kv head h // n_rep
        k = k.repeat_interleave(n_rep, dim=1)
        v = v.repeat_interleave(n_rep, dim=1)
    scores = (q @ k.transpose(-1, -2)) * scale  # (B, H, Tq, Tk); scaled after the matmul, as the reference
    if softcap is not None:
        # Gemma 2: the cap applies to the scaled scores and *before* the mask.
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return probs @ v


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gelu = config.spec.activation == "gelu_tanh"
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        if self.gelu:
            # Gemma: GeGLU with the tanh approximation of GELU in every generation. Gemma 1 configs say "gelu",
            # but the model was trained with tanh-GELU (gemma_pytorch; transformers rewrites "gelu" the same way).
            return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU (Llama, Mistral, Qwen)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        c = config
        self.sliding = c.layer_types[layer_idx] == "sliding"
        self.post_norms = c.post_norms
        off = c.spec.norm_offset
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, off)
        self.self_attn = Attention(c, layer_idx)
        # Gemma 1 checkpoints call the pre-FFN norm "post_attention_layernorm"; Gemma 2/3 use that name for
        # a real post-attention norm and add pre_/post_feedforward_layernorm. Names follow the checkpoints.
        # (Llama, Mistral and Qwen name theirs as Gemma 1 does.)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, off)
        if c.post_norms:
            self.pre_feedforward_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, off)
            self.post_feedforward_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, off)
        self.mlp = MLP(c)

    def forward(self, x, rope, masks, positions, cache, kv_len, impl):
        cos, sin = rope[self.sliding]
        attn = self.self_attn(self.input_layernorm(x), cos, sin, masks[self.sliding], positions, cache, kv_len, impl)
        if self.post_norms:
            x = x + self.post_attention_layernorm(attn)
            x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        else:
            x = x + attn
            x = x + self.mlp(self.post_attention_layernorm(x))
        return x


class Embedding(nn.Embedding):
    """Token embedding that can also be the LM head (a tied output projection: Gemma, small Llama / Qwen)."""

    def attend(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits (..., V) = hidden (..., d) @ E^T (no sqrt(d) scale here: that is for the input side only)."""
        return F.linear(hidden, self.weight)


class CausalLM(nn.Module):
    """A causal LM of any family in mdpo/families.py. `model(tokens)` -> logits (B, T, V)."""

    def __init__(self, config: ModelConfig, attn_impl: str = "sdpa"):
        super().__init__()
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}")
        self.config = config
        self.attn_impl = attn_impl
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.spec.norm_offset)
        if not config.tie_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.activation_checkpointing = False  # per-block recomputation when training (set by the trainer)

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None):
        """Initialise in place (after `to_empty` from the meta device).

        Linear and embedding weights ~ N(0, 0.02) (transformers' initializer_range); biases 0; norm weights a
        unit scale: 0 where norms multiply by (1 + w) (Gemma), else 1.
        """
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(0.0 if self.config.spec.norm_offset else 1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.normal_(0.0, std, generator=generator)

    @property
    def head_weight(self) -> torch.Tensor:
        """The (V, hidden) weight of the LM head: the embedding when tied, else lm_head's."""
        return self.embed_tokens.weight if self.config.tie_embeddings else self.lm_head.weight

    def _inv_freq(self, sliding: bool, device) -> torch.Tensor:
        # Full layers: rope_base with the config's scaling. Sliding layers: the same, unless the family gives them
        # a base of their own (Gemma 3's local 10k), which is unscaled.
        c = self.config
        if sliding and c.rope_local_base is not None:
            return rope_frequencies(c.head_dim, c.rope_local_base, None, device)
        return rope_frequencies(c.head_dim, c.rope_base, c, device)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None, cache: KVCache | None = None,
                return_hidden: bool = False, kv_len: int | None = None) -> torch.Tensor:
        """Logits (B, T, V), or final-norm hidden states (B, T, hidden) if return_hidden.

        Args:
            tokens: (B, T) token ids; batches of different lengths are right-padded.
            positions: (B, T) position of each token; defaults to 0..T-1. With a cache, positions are also the
                cache slots written, and every slot at an earlier position of the row is attended.
            cache: a KVCache to write this call's keys/values into and read earlier ones from.
            kv_len: with a cache, how many slots to attend (at least max(positions) + 1). Callers that know it
                pass it, which saves a host sync and keeps the call traceable by torch.compile.
        """
        # The decoder runs in its own frame so its RoPE tables and masks are freed before the (large) logits
        # are allocated.
        hidden = self._decode(tokens, positions, cache, kv_len)
        return hidden if return_hidden else self.head(hidden)

    def _decode(self, tokens, positions, cache, kv_len):
        B, T = tokens.shape
        plain_causal = positions is None  # positions 0..T-1 in every row, no cache
        if positions is None:
            if cache is not None:
                raise ValueError("forward with a KV cache needs explicit positions")
            positions = torch.arange(T, device=tokens.device)[None]  # (1, T): tables and masks broadcast over B
        x = self.embed_tokens(tokens)
        if self.config.spec.embed_scale:
            # Gemma: scale by sqrt(hidden) *rounded to the weight dtype* (in bf16, sqrt(3072) = 55.43 becomes
            # 55.5); the checkpoints were trained with the rounded value.
            x = x * torch.tensor(self.config.hidden_size ** 0.5, dtype=x.dtype)

        c = self.config
        if getattr(cache, "paged", False):  # the paged step masks by itself
            kv_len, k_pos = None, None
        elif cache is not None:
            if kv_len is None:
                kv_len = int(positions.max()) + 1  # attend over cache slots [0, kv_len): one host sync
            if kv_len > cache.max_len:
                raise ValueError(f"position {kv_len - 1} does not fit a KV cache of length {cache.max_len}")
            k_pos = torch.arange(kv_len, device=tokens.device)
        else:
            kv_len, k_pos = T, positions
        # Tables and masks are built once per call and shared by all layers of each kind (index: sliding?).
        rope = {
            False: rope_tables(positions, self._inv_freq(False, x.device), x.dtype),
            True: rope_tables(positions, self._inv_freq(True, x.device), x.dtype),
        }
        # With plain 0..T-1 positions the full-attention mask is just causal, and so is the sliding one while
        # T <= window: SDPA's is_causal path then needs no mask tensor at all (None below) and runs faster.
        fused = self.attn_impl == "sdpa" and c.attn_softcap is None
        masks = {}
        for sliding in (False, True):
            window = c.sliding_window if sliding else None
            if k_pos is None or (plain_causal and fused and (window is None or T <= window)):
                masks[sliding] = None
            else:
                masks[sliding] = attention_mask(positions, k_pos, window, x.dtype)
        for layer in self.layers:
            if self.activation_checkpointing and torch.is_grad_enabled():
                # Recompute each block in backward instead of keeping its activations (trades ~1/3 more
                # compute for memory that no longer grows with depth).
                x = checkpoint(layer, x, rope, masks, positions, cache, kv_len, self.attn_impl, use_reentrant=False)
            else:
                x = layer(x, rope, masks, positions, cache, kv_len, self.attn_impl)
        return self.norm(x)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits from final hidden states: the tied embedding or lm_head, then Gemma 2's final soft-cap."""
        logits = self.embed_tokens.attend(hidden) if self.config.tie_embeddings else self.lm_head(hidden)
        if self.config.final_softcap is not None:
            cap = self.config.final_softcap
            logits = torch.tanh(logits / cap) * cap
        return logits

    # --- cost accounting (benchmarks report MFU and bandwidth use from these) ---

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs (forward + backward) per token at context seq_len.

        6 per parameter-multiply (the embedding lookup is free: a tied embedding counts once, as the LM head
        matmul; an untied one not at all),
        plus 12 * heads * head_dim * context per layer for QK^T and PV, with the context of a sliding layer
        capped at its window. The causal half is not subtracted (nanochat / PaLM convention).
        """
        c = self.config
        attn = 0
        for kind in c.layer_types:
            ctx = min(seq_len, c.sliding_window) if kind == "sliding" else seq_len
            attn += 12 * c.num_heads * c.head_dim * ctx
        lookup = 0 if self.config.tie_embeddings else self.embed_tokens.weight.numel()
        return 6 * (self.num_params() - lookup) + attn

    def kv_bytes_per_token(self, dtype: torch.dtype | None = None) -> int:
        c = self.config
        elem = (dtype or self.embed_tokens.weight.dtype).itemsize
        return 2 * c.num_layers * c.num_kv_heads * c.head_dim * elem


def build_model(config: ModelConfig, device="cpu", dtype: torch.dtype = torch.float32, attn_impl: str = "sdpa",
                init: bool = True, seed: int | None = None) -> CausalLM:
    """Construct on the meta device (no allocation), materialise on `device`, then init_weights()."""
    with torch.device("meta"):
        model = CausalLM(config, attn_impl=attn_impl)
    model = model.to_empty(device=device).to(dtype)
    if init:
        gen = None
        if seed is not None:
            gen = torch.Generator(device=device).manual_seed(seed)
        model.init_weights(generator=gen)
    return model
