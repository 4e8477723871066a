"""GGUF import for every generation, on GGUF files written here from random tiny models.

The real file (Gemma 3 270M) is covered by test_gemma3_270m.py; Gemma 1 and 2 GGUFs are not available
offline, so these tests write them with gguf's own writer, in llama.cpp's naming and with its 1 + w norm
storage, and check that the imported model computes the original's logits.
"""

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from mdpo.convert import BLOCK_NAMES, convert_gguf, main  # noqa: E402
from mdpo.model import CausalLM, ModelConfig, build_model  # noqa: E402
from mdpo.weights import CheckpointError, load_pretrained  # noqa: E402
from test_tokenizer import _tiny_vocab  # noqa: E402


def write_gguf(path, model: CausalLM, arch: str, norm_offset=1.0, extra_tensor=None):
    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_heads)
    w.add_head_count_kv(c.num_kv_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(c.rope_base)
    if c.sliding_window:
        w.add_sliding_window(c.sliding_window)
    if arch == "gemma2":
        w.add_float32("gemma2.attn_logit_softcapping", c.attn_softcap)
        w.add_float32("gemma2.final_logit_softcapping", c.final_softcap)
    tokens, scores, types = _tiny_vocab()
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    inverse = {v: k for k, v in BLOCK_NAMES[arch].items()}
    for name, p in model.state_dict().items():
        a = p.numpy().astype(np.float32)
        if name.endswith("norm.weight"):
            a = a + norm_offset  # llama.cpp stores Gemma norms as 1 + w
        if name == "embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "norm.weight":
            gname = "output_norm.weight"
        else:
            _, i, rest = name.split(".", 2)
            gname = f"blk.{i}.{inverse[rest.removesuffix('.weight')]}.weight"
        w.add_tensor(gname, a)
    if extra_tensor:
        w.add_tensor(extra_tensor, np.zeros(4, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def random_tiny(preset, seed=0, **overrides):
    model = build_model(ModelConfig.from_name(preset, **overrides), seed=seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.normal_(0, 0.5)
    return model.eval()


@pytest.mark.parametrize("preset,arch", [("tiny-gemma", "gemma"), ("tiny-gemma2", "gemma2"),
                                         ("tiny-gemma3", "gemma3")])
def test_converted_gguf_computes_the_original_logits(tmp_path, preset, arch):
    # Gemma 2 GGUFs carry no query scalar; the importer assumes head_dim (true for 2b and 9b).
    model = random_tiny(preset, **({"query_pre_attn_scalar": 16} if arch == "gemma2" else {}))
    if arch == "gemma3":
        # The GGUF has no local RoPE base or query scalar; the importer fills llama.cpp's Gemma 3 defaults,
        # so the source model must use them too (the tiny preset's scalar 16 = head_dim already does).
        assert model.config.rope_local_base == 10_000.0 and model.config.query_pre_attn_scalar == 16
    src = write_gguf(tmp_path / "m.gguf", model, arch)
    out = convert_gguf(src, tmp_path / "hf")
    back = load_pretrained(out)
    assert back.config == model.config
    tokens = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (back(tokens) - model(tokens)).abs().max().item() <= 1e-5
    assert (out / "tokenizer.model").is_file() and not (tmp_path / "hf.tmp").exists()


def test_norm_offset_is_undone(tmp_path):
    # Written without the +1, the import must give different logits: the offset really is subtracted.
    model = random_tiny("tiny-gemma3")
    out = convert_gguf(write_gguf(tmp_path / "m.gguf", model, "gemma3", norm_offset=0.0), tmp_path / "hf")
    back = load_pretrained(out)
    assert torch.allclose(back.norm.weight, model.norm.weight - 1.0)


def test_unexpected_gguf_tensor_is_an_error(tmp_path):
    src = write_gguf(tmp_path / "m.gguf", random_tiny("tiny-gemma"), "gemma", extra_tensor="blk.0.attn_bias")
    with pytest.raises(CheckpointError, match=r"m.gguf: unexpected GGUF tensor 'blk.0.attn_bias'"):
        convert_gguf(src, tmp_path / "hf")
    assert not (tmp_path / "hf").exists() and not (tmp_path / "hf.tmp").exists()


def test_cli_errors_exit_2(tmp_path, capsys):
    assert main(["--gguf", str(tmp_path / "missing.gguf"), "--out", str(tmp_path / "o")]) == 2
    assert "missing.gguf: file not found" in capsys.readouterr().err
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all" * 10)
    assert main(["--gguf", str(junk), "--out", str(tmp_path / "o")]) == 2
    assert "junk.gguf: not a readable GGUF file" in capsys.readouterr().err
    w = gguf.GGUFWriter(str(tmp_path / "llama.gguf"), "llama")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert main(["--gguf", str(tmp_path / "llama.gguf"), "--out", str(tmp_path / "o")]) == 2
    assert "general.architecture is 'llama'" in capsys.readouterr().err
    good = write_gguf(tmp_path / "m.gguf", random_tiny("tiny-gemma"), "gemma")
    assert main(["--gguf", str(good), "--out", str(tmp_path / "o"), "--dtype", "float64"]) == 2
    assert "unknown dtype 'float64'" in capsys.readouterr().err
    assert main(["--gguf", str(good), "--out", str(tmp_path / "o"), "--dtype", "bfloat16"]) == 0
    assert load_pretrained(tmp_path / "o", dtype=torch.bfloat16).config.family == "gemma"
