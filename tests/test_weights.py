"""Checkpoint I/O: HF layout round trips (ours and transformers'), sharding, config names, strict errors."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from mdpo.model import ModelConfig, build_model
from mdpo.weights import CheckpointError, config_from_hf, config_to_hf, load_pretrained, save_pretrained

transformers = pytest.importorskip("transformers")

FAMILIES = ["tiny-gemma", "tiny-gemma2", "tiny-gemma3"]


def tiny(name, seed=0):
    model = build_model(ModelConfig.from_name(name), seed=seed, attn_impl="eager")
    with torch.no_grad():  # random norms, so a dropped or shifted norm changes the logits
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.normal_(0, 0.5)
    return model.eval()


@pytest.mark.parametrize("name", FAMILIES)
def test_save_then_transformers_and_mdpo_load_same_logits(tmp_path, name):
    model = tiny(name)
    save_pretrained(model, tmp_path)
    tokens = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(0))
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32,
                                                            attn_implementation="eager").eval()
    back = load_pretrained(tmp_path, attn_impl="eager").eval()
    assert back.config == model.config
    with torch.no_grad():
        ours = model(tokens)
        assert (ref(tokens).logits - ours).abs().max().item() <= 1e-4
        assert torch.equal(back(tokens), ours)
    # The layout is the HF one: "model."-prefixed names, no lm_head (tied), pt metadata.
    keys = set(load_file(tmp_path / "model.safetensors"))
    assert keys == {"model." + k for k in model.state_dict()}
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == {
        "tiny-gemma": "gemma", "tiny-gemma2": "gemma2", "tiny-gemma3": "gemma3_text"}[name]


def test_load_transformers_saved_checkpoint(tmp_path):
    # transformers writes its own config (v5 names: rope_parameters, dtype) and files; we must read them.
    model = tiny("tiny-gemma3", seed=1)
    save_pretrained(model, tmp_path / "a")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "a", dtype=torch.float32,
                                                            attn_implementation="eager")
    ref.save_pretrained(tmp_path / "b")
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())
    assert "rope_parameters" in cfg  # the new naming really is exercised
    back = load_pretrained(tmp_path / "b", attn_impl="eager")
    assert back.config == model.config
    tokens = torch.randint(0, 512, (1, 16))
    with torch.no_grad():
        assert torch.equal(back(tokens), model(tokens))


def test_sharded_save_and_load(tmp_path):
    model = tiny("tiny-gemma2", seed=2)
    save_pretrained(model, tmp_path, max_shard_bytes=100_000)
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 2 and not (tmp_path / "model.safetensors").exists()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    back = load_pretrained(tmp_path, attn_impl="eager")
    for (n, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), n
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32,
                                                            attn_implementation="eager")
    tokens = torch.randint(0, 512, (1, 12))
    with torch.no_grad():
        assert (ref(tokens).logits - model(tokens)).abs().max().item() <= 1e-4
    # Saving again unsharded removes the stale shards and index.
    save_pretrained(model, tmp_path)
    assert not list(tmp_path.glob("model-*.safetensors")) and not (tmp_path / "model.safetensors.index.json").exists()


def test_bf16_load_and_save(tmp_path):
    model = tiny("tiny-gemma3", seed=3)
    save_pretrained(model, tmp_path, dtype=torch.bfloat16)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    back = load_pretrained(tmp_path, dtype=torch.bfloat16)
    assert back.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(back.embed_tokens.weight, model.embed_tokens.weight.to(torch.bfloat16))
    up = load_pretrained(tmp_path, dtype=torch.float32)
    assert torch.equal(up.embed_tokens.weight, model.embed_tokens.weight.to(torch.bfloat16).float())


def test_old_and_new_config_names_agree():
    old = {"model_type": "gemma3_text", "vocab_size": 262144, "hidden_size": 640, "intermediate_size": 2048,
           "num_hidden_layers": 18, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
           "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
           "rope_scaling": None, "sliding_window": 512, "_sliding_window_pattern": 6,
           "query_pre_attn_scalar": 256, "hidden_activation": "gelu_pytorch_tanh"}
    new = dict(old)
    for k in ("rope_theta", "rope_local_base_freq", "rope_scaling", "_sliding_window_pattern"):
        del new[k]
    new["rope_parameters"] = {"full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                              "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}
    new["layer_types"] = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(18)]
    assert config_from_hf(old) == config_from_hf(new) == ModelConfig.from_name("gemma-3-270m")
    # Gemma 2's legacy window key, Gemma 1's "gelu", and a list of eos ids.
    g2 = {"model_type": "gemma2", "vocab_size": 256000, "hidden_size": 3584, "intermediate_size": 14336,
          "num_hidden_layers": 42, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256,
          "sliding_window_size": 4096, "query_pre_attn_scalar": 256, "eos_token_id": [1, 107]}
    assert config_from_hf(g2) == ModelConfig.from_name("gemma-2-9b")
    g1 = {"model_type": "gemma", "vocab_size": 256000, "hidden_size": 3072, "intermediate_size": 24576,
          "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 16, "head_dim": 256,
          "hidden_act": "gelu", "rope_theta": 10000.0}
    assert config_from_hf(g1) == ModelConfig.from_name("gemma-7b")
    linear = dict(old, rope_scaling={"rope_type": "linear", "factor": 8.0})
    assert config_from_hf(linear).rope_scaling_factor == 8.0
    for preset in ("gemma-2b", "gemma-2-2b", "gemma-3-1b", "tiny-gemma2"):
        cfg = ModelConfig.from_name(preset)
        assert config_from_hf(config_to_hf(cfg)) == cfg


def test_linear_rope_scaling_matches_transformers():
    cfg = ModelConfig.from_name("tiny-gemma3", rope_scaling_factor=8.0)
    model = build_model(cfg, seed=5, attn_impl="eager").eval()
    hf_cfg = transformers.Gemma3TextConfig(**{k: v for k, v in config_to_hf(cfg).items()
                                              if k not in ("architectures", "model_type", "torch_dtype")})
    hf_cfg._attn_implementation = "eager"
    ref = transformers.Gemma3ForCausalLM(hf_cfg).eval()
    ref.model.load_state_dict(model.state_dict(), strict=True)
    tokens = torch.randint(0, 512, (1, 30))
    with torch.no_grad():
        assert (ref(tokens).logits - model(tokens)).abs().max().item() <= 1e-4
        unscaled = build_model(ModelConfig.from_name("tiny-gemma3"), seed=5, attn_impl="eager")
        assert (unscaled(tokens) - model(tokens)).abs().max().item() > 1e-3  # the factor does something


# --- bad input: one clear error naming the file and tensor ---

@pytest.fixture
def saved(tmp_path):
    model = tiny("tiny-gemma")
    save_pretrained(model, tmp_path)
    return tmp_path


def _rewrite(folder, edit):
    f = folder / "model.safetensors"
    tensors = load_file(f)
    edit(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


def test_missing_tensor(saved):
    _rewrite(saved, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'model.layers.1.mlp.up_proj.weight'"):
        load_pretrained(saved)


def test_unexpected_tensor(saved):
    _rewrite(saved, lambda t: t.update({"model.layers.1.extra.weight": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match=r"model.safetensors: unexpected tensor 'model.layers.1.extra.weight'"):
        load_pretrained(saved)


def test_wrong_shape(saved):
    _rewrite(saved, lambda t: t.update({"model.norm.weight": torch.zeros(65)}))
    with pytest.raises(CheckpointError, match=r"'model.norm.weight' has shape \(65,\), expected \(64,\)"):
        load_pretrained(saved)


def test_untied_lm_head_is_rejected_and_tied_copy_accepted(saved):
    _rewrite(saved, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].clone()}))
    load_pretrained(saved)
    _rewrite(saved, lambda t: t.update({"lm_head.weight": torch.zeros_like(t["model.embed_tokens.weight"])}))
    with pytest.raises(CheckpointError, match="lm_head.weight' differs from the embedding"):
        load_pretrained(saved)


def test_unknown_model_type(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["model_type"] = "olmo2"
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config.json: unknown model_type 'olmo2'; mdpo has the families"):
        load_pretrained(saved)


def test_corrupt_and_truncated_safetensors(saved):
    f = saved / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model.safetensors: corrupt safetensors"):
        load_pretrained(saved)
    f.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match=r"model.safetensors: corrupt safetensors"):
        load_pretrained(saved)


def test_missing_files(tmp_path, saved):
    with pytest.raises(CheckpointError, match="not a directory"):
        load_pretrained(tmp_path / "nope")
    (saved / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors or model.safetensors.index.json"):
        load_pretrained(saved)
    (saved / "config.json").write_text("{\n  \"model_type\": \n}")
    with pytest.raises(CheckpointError, match=r"config.json: invalid JSON at line 3"):
        load_pretrained(saved)
    (saved / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config.json: file not found"):
        load_pretrained(saved)


def test_missing_shard(tmp_path):
    save_pretrained(tiny("tiny-gemma"), tmp_path, max_shard_bytes=50_000)
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"{shard.name}: shard listed in model.safetensors.index.json"):
        load_pretrained(tmp_path)
