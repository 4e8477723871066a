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
from mdpo.families import BY_MODEL_TYPE
from mdpo.model import CausalLM, ModelConfig

CONFIG_NAME = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
HF_PREFIX = "model."  # *ForCausalLM keeps the decoder under "model."; our module is that decoder (+ lm_head)
HF_LAYER_TYPES = {"full": "full_attention", "sliding": "sliding_attention"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked; the message names the file and, if any, the tensor."""


# --- config.json ---

def config_from_hf(d: dict, source: str = CONFIG_NAME) -> ModelConfig:
    """ModelConfig from an HF config dict of any family in mdpo/families.py; accepts the old (rope_theta,
    rope_scaling, ...) and new (transformers 5: rope_parameters) names. A key absent from the file means what it
    means in transformers (the family's hf_defaults); anything mdpo cannot run exactly is refused in one line."""
    model_type = d.get("model_type")
    if model_type == "gemma3":
        raise CheckpointError(f"{source}: model_type 'gemma3' is the multimodal Gemma 3; only the text-only "
                              "gemma3_text checkpoints (270m, 1b) are supported")
    if model_type not in BY_MODEL_TYPE:
        raise CheckpointError(f"{source}: unknown model_type {model_type!r}; mdpo has the families "
                              f"{sorted(BY_MODEL_TYPE)} (add one in mdpo/families.py, docs/forking.md)")
    fam = BY_MODEL_TYPE[model_type]
    defaults = fam.hf_defaults

    def need(key):
        if key not in d:
            raise CheckpointError(f"{source}: missing key {key!r}")
        return d[key]

    def get(key, default=None):
        return d[key] if key in d else defaults.get(key, default)

    act = d.get("hidden_activation") or d.get("hidden_act")
    if act is not None and act not in fam.hf_activations:
        raise CheckpointError(f"{source}: unsupported activation {act!r} for {model_type} "
                              f"(expected one of {list(fam.hf_activations)})")
    for key in ("attention_bias", "mlp_bias"):
        if d.get(key) and not (key == "attention_bias" and fam.qkv_bias):
            raise CheckpointError(f"{source}: {key}: true is not supported for {model_type}")

    # RoPE: old names rope_theta / rope_local_base_freq / rope_scaling; transformers v5 writes rope_parameters,
    # flat for most families and split into full_attention / sliding_attention for Gemma 3.
    rope = d.get("rope_parameters") or {}
    full = rope.get("full_attention", rope) if isinstance(rope, dict) else {}
    local = rope.get("sliding_attention", {}) if isinstance(rope, dict) else {}
    rope_base = float(full.get("rope_theta", get("rope_theta", 10_000.0)))
    rope_local_base = None
    if "rope_local_base_freq" in defaults:
        rope_local_base = float(local.get("rope_theta", get("rope_local_base_freq")))
    scaling = d.get("rope_scaling") or (full if full.get("rope_type", "default") != "default" else None)
    rope_kw = {}
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind == "linear":
            rope_kw = dict(rope_scaling_type="linear", rope_scaling_factor=float(scaling.get("factor", 1.0)))
        elif kind == "llama3":
            try:
                rope_kw = dict(rope_scaling_type="llama3", rope_scaling_factor=float(scaling["factor"]),
                               rope_low_freq_factor=float(scaling["low_freq_factor"]),
                               rope_high_freq_factor=float(scaling["high_freq_factor"]),
                               rope_original_max_positions=int(scaling["original_max_position_embeddings"]))
            except KeyError as e:
                raise CheckpointError(f"{source}: rope scaling 'llama3' lacks {e.args[0]!r}") from None
        elif kind != "default":
            raise CheckpointError(f"{source}: unsupported rope scaling {kind!r} (mdpo runs linear and llama3)")

    num_layers = need("num_hidden_layers")
    sliding_window = get("sliding_window")
    if fam.layer_pattern != "full" and sliding_window is None:
        sliding_window = d.get("sliding_window_size") or defaults.get("sliding_window")
    if "use_sliding_window" in defaults and not get("use_sliding_window"):
        sliding_window = None  # Qwen: the window is written out but only used with use_sliding_window
    layer_types = d.get("layer_types")
    if layer_types is not None:
        inverse = {v: k for k, v in HF_LAYER_TYPES.items()}
        unknown = sorted(set(layer_types) - set(inverse))
        if unknown:
            raise CheckpointError(f"{source}: unknown layer_types {unknown}")
        layer_types = [inverse[t] for t in layer_types]
        if sliding_window is None:  # Qwen writes sliding layer types it does not use without use_sliding_window
            layer_types = ["full"] * num_layers
    elif fam.layer_pattern == "five_one":
        pattern = d.get("sliding_window_pattern") or d.get("_sliding_window_pattern") or 6
        layer_types = ["full" if (i + 1) % pattern == 0 else "sliding" for i in range(num_layers)]
    elif fam.layer_pattern == "full" and sliding_window is not None:
        if "max_window_layers" in defaults:  # Qwen: layers from max_window_layers on slide
            first = get("max_window_layers")
            layer_types = ["sliding" if i >= first else "full" for i in range(num_layers)]
        else:  # Mistral v0.1: every layer slides
            layer_types = ["sliding"] * num_layers
    if layer_types is not None and "sliding" not in layer_types:
        sliding_window = None
    if fam.name == "gemma":
        sliding_window = None

    eos = get("eos_token_id", 1)
    pad = get("pad_token_id")
    bos = get("bos_token_id")
    eos = eos[0] if isinstance(eos, list) else eos
    if eos is None:
        raise CheckpointError(f"{source}: missing key 'eos_token_id' (the sampler stops on it)")
    heads = need("num_attention_heads")
    hidden = need("hidden_size")
    try:
        return ModelConfig(
            family=fam.name,
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_layers=num_layers,
            num_heads=heads,
            num_kv_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or defaults.get("head_dim") or hidden // heads,
            max_position_embeddings=d.get("max_position_embeddings", 8192),
            rms_norm_eps=float(get("rms_norm_eps", 1e-6)),
            rope_base=rope_base,
            rope_local_base=rope_local_base,
            query_pre_attn_scalar=get("query_pre_attn_scalar") if "query_pre_attn_scalar" in defaults else None,
            attn_softcap=get("attn_logit_softcapping"),
            final_softcap=get("final_logit_softcapping"),
            sliding_window=sliding_window,
            layer_types=layer_types,
            tie_embeddings=bool(get("tie_word_embeddings", True)),
            # Qwen ships no bos (its prompts start with a turn) and often no pad: eos stands in for either.
            bos_id=bos if bos is not None else eos,
            eos_id=eos,
            pad_id=pad if pad is not None else eos,
            **rope_kw,
        )
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{source}: {e}") from None


def config_to_hf(config: ModelConfig, dtype: torch.dtype = torch.float32) -> dict:
    """HF config.json dict for `config`, readable by transformers (v4 and v5 names) and vLLM."""
    c = config
    fam = c.spec
    act = "gelu_pytorch_tanh" if fam.activation == "gelu_tanh" else "silu"
    d = {
        "architectures": [fam.architecture],
        "model_type": fam.model_type,
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
        "hidden_act": act,
        "hidden_activation": act,
        "attention_bias": fam.qkv_bias,
        "tie_word_embeddings": c.tie_embeddings,
        "bos_token_id": c.bos_id,
        "eos_token_id": c.eos_id,
        "pad_token_id": c.pad_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if c.rope_scaling_factor != 1.0:
        d["rope_scaling"] = {"rope_type": "linear", "factor": c.rope_scaling_factor}
        if c.rope_scaling_type == "llama3":
            d["rope_scaling"] = {"rope_type": "llama3", "factor": c.rope_scaling_factor,
                                 "low_freq_factor": c.rope_low_freq_factor,
                                 "high_freq_factor": c.rope_high_freq_factor,
                                 "original_max_position_embeddings": c.rope_original_max_positions}
    if fam.name.startswith("gemma") and fam.name != "gemma":
        d.update(query_pre_attn_scalar=c.query_pre_attn_scalar, attn_logit_softcapping=c.attn_softcap,
                 final_logit_softcapping=c.final_softcap)
    sliding = [i for i, t in enumerate(c.layer_types) if t == "sliding"]
    if fam.layer_pattern != "full" or "use_sliding_window" in fam.hf_defaults:
        d.update(sliding_window=c.sliding_window, layer_types=[HF_LAYER_TYPES[t] for t in c.layer_types])
    elif fam.name == "mistral":
        # no layer_types: transformers reads a mistral config that has them as Ministral
        if sliding and len(sliding) != c.num_layers:
            raise ValueError(f"mistral slides on every layer or none; layer_types {c.layer_types} cannot be saved")
        d["sliding_window"] = c.sliding_window if sliding else None
    elif sliding and fam.name != "gemma":
        raise ValueError(f"{fam.model_type} has no sliding layers; layer_types {c.layer_types} cannot be saved")
    if "use_sliding_window" in fam.hf_defaults:
        if sliding and sliding != list(range(sliding[0], c.num_layers)):
            raise ValueError(f"{fam.model_type} slides from one layer on; layer_types {c.layer_types} cannot be saved")
        d.update(use_sliding_window=bool(sliding), max_window_layers=sliding[0] if sliding else c.num_layers)
    if "rope_local_base_freq" in fam.hf_defaults:
        d["rope_local_base_freq"] = c.rope_local_base
    return d


def read_json(path: Path) -> dict:
    """A JSON object file (config.json, the shard index); any problem is a one-line CheckpointError."""
    d = textfile.read_json(path, CheckpointError)
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {textfile.describe_json(d)}")
    return d


def load_config(path) -> ModelConfig:
    """ModelConfig from an HF-layout folder's config.json."""
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


def hf_name(name: str) -> str:
    """The checkpoint name of one of our parameters: the decoder's under "model.", the untied head as is."""
    return name if name.startswith("lm_head.") else HF_PREFIX + name


def load_state_dict_into(model: CausalLM, tensors, source: str = "checkpoint"):
    """Copy HF-named tensors into `model` strictly: each parameter exactly once, right shape, nothing extra.

    `tensors` yields (hf_name, tensor, file). A tied "lm_head.weight" is accepted only if it equals the
    embedding (some exporters write the tie out).
    """
    params = dict(model.named_parameters())
    tied = model.config.tie_embeddings
    seen = set()
    lm_head = None
    for name_in_file, t, f in tensors:
        if name_in_file == "lm_head.weight" and tied:
            lm_head = (t, f)
            continue
        name = name_in_file if name_in_file == "lm_head.weight" else (
            name_in_file[len(HF_PREFIX):] if name_in_file.startswith(HF_PREFIX) else None)
        if name not in params:
            raise CheckpointError(f"{f}: unexpected tensor {name_in_file!r}")
        p = params[name]
        if tuple(t.shape) != tuple(p.shape):
            raise CheckpointError(f"{f}: tensor {name_in_file!r} has shape {tuple(t.shape)}, expected {tuple(p.shape)}")
        with torch.no_grad():
            p.copy_(t.to(p.dtype))
        seen.add(name)
    missing = [hf_name(n) for n in params if n not in seen]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{source}: missing tensor {missing[0]!r}{more}")
    if lm_head is not None:
        t, f = lm_head
        if t.shape != model.embed_tokens.weight.shape or not torch.equal(
                t.to(model.embed_tokens.weight.dtype), model.embed_tokens.weight):
            raise CheckpointError(f"{f}: 'lm_head.weight' differs from the embedding, but config.json ties them "
                                  "(tie_word_embeddings)")


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


# The model a process has just trained (mdpo.train: one process, weights not sharded), kept so that the next rollout of
# the same weights in this process uses it instead of reading back what was just written (online RL's many small
# iterations). One at a time; matched by the folder's files, never by path alone (a copy of the folder matches).
_RESIDENT: list = []


def folder_identity(folder) -> tuple:
    """config.json's bytes and each *.safetensors file's name, size and modification time (copies keep them)."""
    p = Path(folder)
    config = (p / "config.json").read_bytes() if (p / "config.json").is_file() else b""
    return config, tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(p.glob("*.safetensors")))


def keep_resident(folder, model: CausalLM) -> None:
    """Remember `model` as the in-memory copy of the checkpoint just written to `folder` (replacing any other)."""
    _RESIDENT[:] = [(folder_identity(folder), model)]


def resident_model(folder, dtype: torch.dtype | None, device) -> CausalLM | None:
    """The kept model if `folder` holds the very files it was saved as, in `dtype` on `device`; else None."""
    if not _RESIDENT or dtype is None or not Path(folder).is_dir():
        return None
    ident, model = _RESIDENT[0]
    p = next(model.parameters())
    if ident != folder_identity(folder) or p.dtype != dtype or p.device != torch.device(device):
        return None
    return model


def load_pretrained(path, dtype: torch.dtype | None = torch.float32, device="cpu", attn_impl: str = "sdpa") -> CausalLM:
    """A model from an HF-layout folder, built on the meta device and filled strictly from safetensors.
    dtype None: the dtype the checkpoint was saved in."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory")
    config = load_config(path)
    dtype = dtype or checkpoint_dtype(path)
    with torch.device("meta"):
        model = CausalLM(config, attn_impl=attn_impl)
    model = model.to_empty(device=device).to(dtype)
    load_state_dict_into(model, iter_tensors(path), str(path))
    return model


def save_pretrained(model: CausalLM, path, max_shard_bytes: int = 5 * 2**30, dtype: torch.dtype | None = None,
                    tokenizer=None):
    """Write config.json and safetensors (sharded with an index above max_shard_bytes) into `path`, and the
    tokenizer's files when one is given: a folder transformers loads.

    Each file is written to a temporary name and renamed into place, config.json last, so a crash never
    leaves a folder that looks complete but is not.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    dtype = dtype or model.embed_tokens.weight.dtype
    tensors = {hf_name(n): p.detach().to("cpu", dtype).contiguous() for n, p in model.named_parameters()}

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
