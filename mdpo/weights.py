"""Checkpoint I/O in the Hugging Face layout: config.json + (sharded) safetensors.

Loading is strict: every parameter must come from the checkpoint with the right shape, and every tensor in
the checkpoint must be used. Anything else is a `CheckpointError` naming the file and tensor. Saving writes
the same layout, so a model trained here loads in transformers (and vLLM) with the same logits.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mdpo import textfile
from mdpo.atomic import write_json_atomic
from mdpo.model import Gemma, GemmaConfig

CONFIG_NAME = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
HF_PREFIX = "model."  # Gemma*ForCausalLM keeps the decoder under "model."; our module is that decoder
ARCHITECTURES = {"gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM"}
MODEL_TYPES = {"gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3"}
HF_LAYER_TYPES = {"full": "full_attention", "sliding": "sliding_attention"}
GELU_NAMES = {"gelu", "gelu_pytorch_tanh", "gelu_new", "gelu_fast"}  # all run as tanh-GELU (see MLP)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked; the message names the file and, if any, the tensor."""


# --- config.json ---

def config_from_hf(d: dict, source: str = CONFIG_NAME) -> GemmaConfig:
    """GemmaConfig from an HF config dict; accepts the old (rope_theta, ...) and new (rope_parameters) names."""
    model_type = d.get("model_type")
    if model_type == "gemma3":
        raise CheckpointError(f"{source}: model_type 'gemma3' is the multimodal Gemma 3; only the text-only "
                              "gemma3_text checkpoints (270m, 1b) are supported")
    if model_type not in MODEL_TYPES:
        raise CheckpointError(f"{source}: unknown model_type {model_type!r}; expected one of {sorted(MODEL_TYPES)}")
    family = MODEL_TYPES[model_type]

    def need(key):
        if key not in d:
            raise CheckpointError(f"{source}: missing key {key!r}")
        return d[key]

    act = d.get("hidden_activation") or d.get("hidden_act")
    if act is not None and act not in GELU_NAMES:
        raise CheckpointError(f"{source}: unsupported activation {act!r}")

    # RoPE: old names rope_theta / rope_local_base_freq / rope_scaling; transformers v5 writes rope_parameters,
    # flat for Gemma 1/2 and split into full_attention / sliding_attention for Gemma 3.
    rope = d.get("rope_parameters") or {}
    full = rope.get("full_attention", rope) if isinstance(rope, dict) else {}
    local = rope.get("sliding_attention", {}) if isinstance(rope, dict) else {}
    default_base = 1_000_000.0 if family == "gemma3" else 10_000.0
    rope_base = float(full.get("rope_theta", d.get("rope_theta", default_base)))
    rope_local_base = None
    if family == "gemma3":
        rope_local_base = float(local.get("rope_theta", d.get("rope_local_base_freq", 10_000.0)))
    scaling = d.get("rope_scaling") or (full if full.get("rope_type", "default") != "default" else None)
    factor = 1.0
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind not in ("linear", "default"):
            raise CheckpointError(f"{source}: unsupported rope scaling {kind!r} (only linear)")
        factor = float(scaling.get("factor", 1.0)) if kind == "linear" else 1.0

    sliding_window = d.get("sliding_window") or d.get("sliding_window_size")
    layer_types = d.get("layer_types")
    num_layers = need("num_hidden_layers")
    if layer_types is not None:
        inverse = {v: k for k, v in HF_LAYER_TYPES.items()}
        unknown = sorted(set(layer_types) - set(inverse))
        if unknown:
            raise CheckpointError(f"{source}: unknown layer_types {unknown}")
        layer_types = [inverse[t] for t in layer_types]
    elif family == "gemma3":
        pattern = d.get("sliding_window_pattern") or d.get("_sliding_window_pattern") or 6
        layer_types = ["full" if (i + 1) % pattern == 0 else "sliding" for i in range(num_layers)]
    if family == "gemma":
        sliding_window = None
    elif sliding_window is None:
        sliding_window = 4096

    eos = d.get("eos_token_id", 1)
    defaults_g2 = family == "gemma2"
    try:
        return GemmaConfig(
            family=family,
            vocab_size=need("vocab_size"),
            hidden_size=need("hidden_size"),
            intermediate_size=need("intermediate_size"),
            num_layers=num_layers,
            num_heads=need("num_attention_heads"),
            num_kv_heads=d.get("num_key_value_heads", d["num_attention_heads"]),
            head_dim=d.get("head_dim", 256),
            max_position_embeddings=d.get("max_position_embeddings", 8192),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_base=rope_base,
            rope_local_base=rope_local_base,
            rope_scaling_factor=factor,
            query_pre_attn_scalar=None if family == "gemma" else d.get("query_pre_attn_scalar", 256),
            attn_softcap=d.get("attn_logit_softcapping", 50.0 if defaults_g2 else None),
            final_softcap=d.get("final_logit_softcapping", 30.0 if defaults_g2 else None),
            sliding_window=sliding_window,
            layer_types=layer_types,
            bos_id=d.get("bos_token_id", 2),
            eos_id=eos[0] if isinstance(eos, list) else eos,
            pad_id=d.get("pad_token_id", 0),
        )
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{source}: {e}") from None


def config_to_hf(config: GemmaConfig, dtype: torch.dtype = torch.float32) -> dict:
    """HF config.json dict for `config`, readable by transformers (v4 and v5 names) and vLLM."""
    c = config
    model_type = {v: k for k, v in MODEL_TYPES.items()}[c.family]
    d = {
        "architectures": [ARCHITECTURES[c.family]],
        "model_type": model_type,
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "max_position_embeddings": c.max_position_embeddings,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_base,
        # Both spellings: Gemma 1 configs used hidden_act, later ones hidden_activation.
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_activation": "gelu_pytorch_tanh",
        "attention_bias": False,
        "tie_word_embeddings": True,
        "bos_token_id": c.bos_id,
        "eos_token_id": c.eos_id,
        "pad_token_id": c.pad_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if c.family != "gemma":
        d.update(query_pre_attn_scalar=c.query_pre_attn_scalar, attn_logit_softcapping=c.attn_softcap,
                 final_logit_softcapping=c.final_softcap, sliding_window=c.sliding_window,
                 layer_types=[HF_LAYER_TYPES[t] for t in c.layer_types])
    if c.family == "gemma3":
        d["rope_local_base_freq"] = c.rope_local_base
        d["rope_scaling"] = None if c.rope_scaling_factor == 1.0 else {
            "rope_type": "linear", "factor": c.rope_scaling_factor}
    return d


def read_json(path: Path) -> dict:
    """A JSON object file (config.json, the shard index); any problem is a one-line CheckpointError."""
    d = textfile.read_json(path, CheckpointError)
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {textfile.describe_json(d)}")
    return d


def load_config(path) -> GemmaConfig:
    """GemmaConfig from an HF-layout folder's config.json."""
    file = Path(path) / CONFIG_NAME
    return config_from_hf(read_json(file), str(file))


# --- safetensors ---

def checkpoint_files(path: Path) -> dict[str, Path]:
    """Tensor name -> file, for a single model.safetensors or a sharded set with its index.json."""
    index = path / INDEX_FILE
    single = path / SINGLE_FILE
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no 'weight_map'")
        files = {}
        for name, fname in weight_map.items():
            f = path / fname
            if not f.is_file():
                raise CheckpointError(f"{f}: shard listed in {INDEX_FILE} for {name!r} not found")
            files[name] = f
        return files
    if single.is_file():
        return {name: single for name in _safetensor_keys(single)}
    raise CheckpointError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}")


def _safetensor_keys(file: Path) -> list[str]:
    try:
        with safe_open(file, framework="pt") as f:
            return list(f.keys())
    except Exception as e:  # safetensors raises its own error types for bad headers and short files
        raise CheckpointError(f"{file}: corrupt safetensors file ({e})") from None


def iter_tensors(path: Path):
    """Yield (name, tensor, file) for every tensor of the checkpoint at `path`, one file open at a time."""
    files = checkpoint_files(path)
    by_file: dict[Path, list[str]] = {}
    for name, f in files.items():
        by_file.setdefault(f, []).append(name)
    for f, names in by_file.items():
        try:
            with safe_open(f, framework="pt") as handle:
                present = set(handle.keys())
                for name in names:
                    if name not in present:
                        raise CheckpointError(f"{f}: tensor {name!r} listed in {INDEX_FILE} is not in the file")
                    yield name, handle.get_tensor(name), f
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{f}: corrupt safetensors file ({e})") from None


def load_state_dict_into(model: Gemma, tensors, source: str = "checkpoint"):
    """Copy HF-named tensors into `model` strictly: each parameter exactly once, right shape, nothing extra.

    `tensors` yields (hf_name, tensor, file). A tied "lm_head.weight" is accepted only if it equals the
    embedding (some exporters write the tie out).
    """
    params = dict(model.named_parameters())
    seen = set()
    lm_head = None
    for hf_name, t, f in tensors:
        if hf_name == "lm_head.weight":
            lm_head = (t, f)
            continue
        name = hf_name[len(HF_PREFIX):] if hf_name.startswith(HF_PREFIX) else None
        if name not in params:
            raise CheckpointError(f"{f}: unexpected tensor {hf_name!r}")
        p = params[name]
        if tuple(t.shape) != tuple(p.shape):
            raise CheckpointError(f"{f}: tensor {hf_name!r} has shape {tuple(t.shape)}, expected {tuple(p.shape)}")
        with torch.no_grad():
            p.copy_(t.to(p.dtype))
        seen.add(name)
    missing = [HF_PREFIX + n for n in params if n not in seen]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{source}: missing tensor {missing[0]!r}{more}")
    if lm_head is not None:
        t, f = lm_head
        if t.shape != model.embed_tokens.weight.shape or not torch.equal(
                t.to(model.embed_tokens.weight.dtype), model.embed_tokens.weight):
            raise CheckpointError(f"{f}: 'lm_head.weight' differs from the embedding; Gemma ties them")


def checkpoint_dtype(path) -> torch.dtype:
    """The dtype a checkpoint folder was saved in: config.json's dtype (transformers 5) or torch_dtype, else
    that of its first tensor."""
    path = Path(path)
    d = read_json(path / CONFIG_NAME)
    name = d.get("dtype") or d.get("torch_dtype")
    if isinstance(name, str) and name.removeprefix("torch.") in DTYPES:
        return DTYPES[name.removeprefix("torch.")]
    name, file = next(iter(checkpoint_files(path).items()))
    with safe_open(file, framework="pt") as f:
        stored = f.get_slice(name).get_dtype()  # the header's name, e.g. "BF16": no tensor is read
    found = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}.get(stored)
    if found is None:
        raise CheckpointError(f"{file}: tensor {name!r} is {stored}; expected F32, BF16 or F16")
    return found


def load_pretrained(path, dtype: torch.dtype | None = torch.float32, device="cpu", attn_impl: str = "sdpa") -> Gemma:
    """Gemma from an HF-layout folder, built on the meta device and filled strictly from safetensors.
    dtype None: the dtype the checkpoint was saved in."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory")
    config = load_config(path)
    dtype = dtype or checkpoint_dtype(path)
    with torch.device("meta"):
        model = Gemma(config, attn_impl=attn_impl)
    model = model.to_empty(device=device).to(dtype)
    load_state_dict_into(model, iter_tensors(path), str(path))
    return model


def save_pretrained(model: Gemma, path, max_shard_bytes: int = 5 * 2**30, dtype: torch.dtype | None = None,
                    tokenizer=None):
    """Write config.json and safetensors (sharded with an index above max_shard_bytes) into `path`, and the
    tokenizer's files when one is given: a folder transformers loads.

    Each file is written to a temporary name and renamed into place, config.json last, so a crash never
    leaves a folder that looks complete but is not.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    dtype = dtype or model.embed_tokens.weight.dtype
    tensors = {HF_PREFIX + n: p.detach().to("cpu", dtype).contiguous() for n, p in model.named_parameters()}

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes

    if len(shards) == 1:
        names = [SINGLE_FILE]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    # Remove the old config first: until the new one lands, the folder is visibly incomplete.
    (path / CONFIG_NAME).unlink(missing_ok=True)
    for old in list(path.glob("model*.safetensors")) + [path / INDEX_FILE]:
        if old.name not in names:
            old.unlink(missing_ok=True)
    for shard, name in zip(shards, names):
        tmp = path / f".{name}.tmp"
        save_file(shard, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, path / name)
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total},
                 "weight_map": {n: names[i] for i, shard in enumerate(shards) for n in shard}}
        write_json_atomic(path / INDEX_FILE, index)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    write_json_atomic(path / CONFIG_NAME, config_to_hf(model.config, dtype))  # last: the folder is complete


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[name]
