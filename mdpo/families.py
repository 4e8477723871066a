"""Model families: one declaration per family, the only place that says how a family differs.

A family is a decoder of the Llama shape (pre-norm blocks, rotary attention with GQA, a gated MLP) plus the
switches below. mdpo/model.py builds every family from one module tree and branches only on these switches;
mdpo/weights.py reads and writes each family's config.json from `hf`; mdpo/chat.py holds each `chat` format;
mdpo/tokenizer.py reads each `tokenizer` kind. Adding a family (say OLMo 2 or Phi-3) is one FAMILIES entry here,
one ChatFormat in mdpo/chat.py if its turns are new, and a module switch in mdpo/model.py only for a part no
family has yet (docs/forking.md walks through it).

How the families differ (each fact checked against transformers' modelling file, the tests' reference):

| switch        | Gemma 1        | Gemma 2            | Gemma 3        | Llama 3 / Mistral | Qwen2 / 2.5  | Qwen3        |
|---------------|----------------|--------------------|----------------|-------------------|--------------|--------------|
| norm_offset   | 1 + w, fp32    | 1 + w              | 1 + w          | w * x_hat         | w * x_hat    | w * x_hat    |
| embed_scale   | * sqrt(d)      | * sqrt(d)          | * sqrt(d)      | -                 | -            | -            |
| activation    | gelu (tanh)    | gelu (tanh)        | gelu (tanh)    | silu              | silu         | silu         |
| post_norms    | -              | yes                | yes            | -                 | -            | -            |
| qk_norm       | -              | -                  | yes            | -                 | -            | yes          |
| qkv_bias      | -              | -                  | -              | -                 | yes          | -            |
| layer pattern | all full       | alternate          | 5 sliding, 1   | all full (Mistral | full (sliding from max_window_layers |
|               |                |                    | full           | v0.1: all sliding)| when use_sliding_window)    |
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Family:
    """What one model family switches on, and how its Hugging Face config.json spells it."""

    name: str  # mdpo's name (ModelConfig.family, model.family=... on the command line)
    model_type: str  # config.json "model_type"
    architecture: str  # config.json "architectures"[0]: the transformers class that loads a saved checkpoint
    # --- architecture switches (mdpo/model.py) ---
    norm_offset: bool = False  # RMSNorm scales by (1 + w), zero-centred weights, all in fp32 (Gemma)
    embed_scale: bool = False  # input embeddings times sqrt(hidden), rounded to the weight dtype (Gemma)
    activation: str = "silu"  # gated MLP: "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
    post_norms: bool = False  # extra norms on each sublayer's output (Gemma 2 / 3)
    qk_norm: bool = False  # RMSNorm over head_dim on q and k before RoPE (Gemma 3, Qwen3)
    qkv_bias: bool = False  # biases on q, k, v (not o) projections (Qwen2)
    layer_pattern: str = "full"  # default layer types: "full", "alternate" (Gemma 2), "five_one" (Gemma 3)
    # --- the rest of mdpo ---
    chat: str = "gemma"  # mdpo/chat.py FORMATS key
    tokenizer: str = "sentencepiece"  # "sentencepiece" (tokenizer.model) or "bpe" (byte-level tokenizer.json)
    # config.json values transformers assumes when a key is absent (its config class defaults): read by
    # mdpo/weights.py so that a sparse config.json means what it means in transformers.
    hf_defaults: dict = field(default_factory=dict)
    # activation names config.json may give; anything else is refused at load
    hf_activations: tuple[str, ...] = ("silu",)


_GELU = ("gelu", "gelu_pytorch_tanh", "gelu_new", "gelu_fast")  # all run as tanh-GELU (see model.MLP)
_GEMMA = dict(norm_offset=True, embed_scale=True, activation="gelu_tanh", hf_activations=_GELU, chat="gemma",
              tokenizer="sentencepiece")

FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("gemma", "gemma", "GemmaForCausalLM", **_GEMMA,
           hf_defaults=dict(head_dim=256, rope_theta=10_000.0, tie_word_embeddings=True, bos_token_id=2,
                            eos_token_id=1, pad_token_id=0)),
    Family("gemma2", "gemma2", "Gemma2ForCausalLM", post_norms=True, layer_pattern="alternate", **_GEMMA,
           hf_defaults=dict(head_dim=256, rope_theta=10_000.0, tie_word_embeddings=True, sliding_window=4096,
                            query_pre_attn_scalar=256, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                            bos_token_id=2, eos_token_id=1, pad_token_id=0)),
    Family("gemma3", "gemma3_text", "Gemma3ForCausalLM", post_norms=True, qk_norm=True, layer_pattern="five_one",
           **_GEMMA,
           hf_defaults=dict(head_dim=256, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
                            tie_word_embeddings=True, sliding_window=4096, query_pre_attn_scalar=256,
                            bos_token_id=2, eos_token_id=1, pad_token_id=0)),
    Family("llama", "llama", "LlamaForCausalLM", chat="llama3", tokenizer="bpe",
           hf_defaults=dict(rope_theta=10_000.0, rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1,
                            eos_token_id=2, pad_token_id=None)),
    Family("mistral", "mistral", "MistralForCausalLM", chat="mistral", tokenizer="sentencepiece",
           hf_defaults=dict(rope_theta=10_000.0, rms_norm_eps=1e-6, tie_word_embeddings=False, sliding_window=4096,
                            bos_token_id=1, eos_token_id=2, pad_token_id=None)),
    Family("qwen2", "qwen2", "Qwen2ForCausalLM", qkv_bias=True, chat="chatml", tokenizer="bpe",
           hf_defaults=dict(rope_theta=10_000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
                            use_sliding_window=False, max_window_layers=28, bos_token_id=None, eos_token_id=None,
                            pad_token_id=None)),
    Family("qwen3", "qwen3", "Qwen3ForCausalLM", qk_norm=True, chat="chatml", tokenizer="bpe",
           hf_defaults=dict(head_dim=128, rope_theta=10_000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
                            use_sliding_window=False, max_window_layers=28, bos_token_id=None, eos_token_id=None,
                            pad_token_id=None)),
]}
BY_MODEL_TYPE = {f.model_type: f for f in FAMILIES.values()}


def family(name: str) -> Family:
    """The Family called `name`; a one-line error listing the known ones otherwise."""
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def default_layer_types(pattern: str, num_layers: int) -> list[str]:
    """'full' / 'sliding' per layer for a family's layer pattern."""
    if pattern == "full":
        return ["full"] * num_layers
    if pattern == "alternate":
        # Gemma 2 alternates, starting with a sliding layer: layers 0, 2, 4, ... are local.
        return ["sliding" if i % 2 == 0 else "full" for i in range(num_layers)]
    if pattern == "five_one":
        # Gemma 3: five local layers, then one global (layers 5, 11, 17, ... are global).
        return ["full" if (i + 1) % 6 == 0 else "sliding" for i in range(num_layers)]
    raise ValueError(f"unknown layer pattern {pattern!r}")
