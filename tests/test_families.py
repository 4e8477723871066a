"""Every model family against transformers' own class of that family, with the same random weights.

The HF configs are written out here field by field from the family's documented switches (not produced by
mdpo.weights), so a wrong conversion in mdpo cannot hide a wrong architecture. The contract tests at the end
run over every registered family (mdpo.families.FAMILIES), so a new family is tested the day it is declared.
"""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mdpo.families import FAMILIES  # noqa: E402
from mdpo.model import KVCache, ModelConfig, build_model, rope_frequencies  # noqa: E402
from mdpo.weights import CheckpointError, config_from_hf, load_pretrained, save_pretrained  # noqa: E402

TINY = {"gemma": "tiny-gemma", "gemma2": "tiny-gemma2", "gemma3": "tiny-gemma3", "llama": "tiny-llama",
        "mistral": "tiny-mistral", "qwen2": "tiny-qwen2", "qwen3": "tiny-qwen3"}
NEW = ["tiny-llama", "tiny-mistral", "tiny-mistral-v0.1", "tiny-qwen2", "tiny-qwen3"]  # v0.1: every layer slides


def config(name: str) -> ModelConfig:
    return ModelConfig.from_name(name)


def random_model(name, seed=0, dtype=torch.float32, attn_impl="eager"):
    model = build_model(config(name), seed=seed, dtype=dtype, attn_impl=attn_impl)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # random norms and biases, so a (1 + w) vs w slip or a dropped bias shows
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (0 if model.config.spec.norm_offset else 1))
            elif n.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif n.endswith("proj.weight") or n in ("embed_tokens.weight", "lm_head.weight"):
                p.mul_(5.0)
    return model.eval()


def hf_reference(name: str, model):
    """The transformers model of `name`'s family holding `model`'s weights, its config spelled out here."""
    c = model.config
    common = dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                  num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
                  num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim, hidden_act="silu",
                  max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
                  tie_word_embeddings=c.tie_embeddings, attention_dropout=0.0, bos_token_id=1, eos_token_id=2,
                  pad_token_id=0)
    if name == "tiny-llama":
        cfg = transformers.LlamaConfig(rope_parameters=dict(rope_type="llama3", rope_theta=500_000.0, factor=8.0,
                                                            low_freq_factor=1.0, high_freq_factor=4.0,
                                                            original_max_position_embeddings=64), **common)
        cls = transformers.LlamaForCausalLM
    elif name.startswith("tiny-mistral"):
        cfg = transformers.MistralConfig(rope_parameters=dict(rope_type="default", rope_theta=c.rope_base),
                                         sliding_window=c.sliding_window, **common)
        cls = transformers.MistralForCausalLM
    elif name == "tiny-qwen2":
        cfg = transformers.Qwen2Config(rope_parameters=dict(rope_type="default", rope_theta=1_000_000.0),
                                       use_sliding_window=False, **common)
        cls = transformers.Qwen2ForCausalLM
    else:
        cfg = transformers.Qwen3Config(rope_parameters=dict(rope_type="default", rope_theta=1_000_000.0),
                                       use_sliding_window=False, attention_bias=False, **common)
        cls = transformers.Qwen3ForCausalLM
    cfg._attn_implementation = "eager"
    ref = cls(cfg).eval()
    state = {("" if k.startswith("lm_head.") else "model.") + k: v for k, v in model.state_dict().items()}
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    if c.tie_embeddings:
        ref.tie_weights()
        assert ref.lm_head.weight.data_ptr() == ref.model.embed_tokens.weight.data_ptr()
    return ref


@pytest.mark.parametrize("name", NEW)
def test_logits_match_transformers_fp32(name):
    model = random_model(name)
    ref = hf_reference(name, model)
    tokens = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(3))  # crosses the window
    with torch.no_grad():
        ours, theirs = model(tokens), ref(tokens).logits
    assert theirs.abs().max() > 1.0  # logits large enough that a wrong part would show
    assert (ours - theirs).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_sdpa_matches_eager(name):
    eager = random_model(name)
    sdpa = random_model(name, attn_impl="sdpa")
    tokens = torch.randint(0, 512, (2, 24))
    with torch.no_grad():
        assert (eager(tokens) - sdpa(tokens)).abs().max().item() <= 1e-4


def test_llama3_rope_frequencies_match_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = ModelConfig.from_name("llama-3.1-8b")
    hf = transformers.LlamaConfig(hidden_size=4096, num_attention_heads=32, head_dim=128, max_position_embeddings=131072,
                                  rope_parameters=dict(rope_type="llama3", rope_theta=500_000.0, factor=8.0,
                                                       low_freq_factor=1.0, high_freq_factor=4.0,
                                                       original_max_position_embeddings=8192))
    theirs, scale = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    ours = rope_frequencies(128, 500_000.0, cfg)
    assert scale == 1.0
    assert torch.allclose(ours, theirs.float(), rtol=1e-6, atol=0)
    # the three bands are all present: kept, interpolated, divided by the factor
    plain = rope_frequencies(128, 500_000.0)
    ratio = plain / ours
    assert (ratio == 1).any() and (ratio == 8).any() and ((ratio > 1) & (ratio < 8)).any()


@pytest.mark.parametrize("name", NEW)
def test_bf16_within_transformers_own_bf16_error(name):
    """bf16 logits: ours against fp32 transformers is within 2x of transformers' own bf16 against its fp32."""
    model = random_model(name)
    ref = hf_reference(name, model)
    tokens = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = ref(tokens).logits
        theirs = ref.to(torch.bfloat16)(tokens).logits.float()
        ours = model.to(torch.bfloat16)(tokens).float()
    e_theirs, e_ours = (theirs - want).abs().max().item(), (ours - want).abs().max().item()
    assert e_ours <= 2 * e_theirs + 1e-3, (e_ours, e_theirs)


@pytest.mark.parametrize("name", NEW)
def test_save_load_roundtrip_through_transformers(tmp_path, name):
    model = random_model(name, seed=5)
    save_pretrained(model, tmp_path / "ours")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32,
                                                            attn_implementation="eager").eval()
    assert type(ref).__name__ == model.config.spec.architecture
    tokens = torch.randint(0, 512, (1, 30))
    with torch.no_grad():
        assert (ref(tokens).logits - model(tokens)).abs().max().item() <= 1e-4
    back = load_pretrained(tmp_path / "ours", attn_impl="eager")
    assert back.config == model.config
    # transformers' own save (v5 names) loads back to the same config and weights
    ref.save_pretrained(tmp_path / "theirs")
    again = load_pretrained(tmp_path / "theirs", attn_impl="eager")
    assert again.config == model.config
    with torch.no_grad():
        assert torch.equal(again(tokens), model(tokens))
    keys = set(json.loads((tmp_path / "ours" / "config.json").read_text()))
    assert {"model_type", "tie_word_embeddings", "rope_theta"} <= keys


def test_untied_head_is_strict(tmp_path):
    model = random_model("tiny-llama")
    save_pretrained(model, tmp_path)
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "model.safetensors")
    assert "lm_head.weight" in tensors and not torch.equal(tensors["lm_head.weight"],
                                                           tensors["model.embed_tokens.weight"])
    del tensors["lm_head.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="missing tensor 'lm_head.weight'"):
        load_pretrained(tmp_path)


@pytest.mark.parametrize("d, match", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "unsupported rope scaling 'yarn'"),
    ({"hidden_act": "gelu"}, "unsupported activation 'gelu' for llama"),
    ({"mlp_bias": True}, "mlp_bias: true is not supported for llama"),
    ({"model_type": "phi3"}, "unknown model_type 'phi3'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope scaling 'llama3' lacks 'low_freq_factor'"),
])
def test_config_refusals_name_the_key(d, match):
    base = {"model_type": "llama", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "eos_token_id": 2}
    with pytest.raises(CheckpointError, match=match):
        config_from_hf({**base, **d}, "x/config.json")


def test_qwen_sparse_config_means_what_transformers_means():
    # Qwen2.5-7B-Instruct's config.json keys (values from the real file): sliding_window is written but
    # unused (use_sliding_window false), no head_dim (hidden / heads), bos 151643, eos 151645, untied.
    d = {"model_type": "qwen2", "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
         "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4, "rope_theta": 1000000.0,
         "sliding_window": 131072, "use_sliding_window": False, "max_window_layers": 28, "rms_norm_eps": 1e-6,
         "tie_word_embeddings": False, "bos_token_id": 151643, "eos_token_id": 151645,
         "max_position_embeddings": 32768, "hidden_act": "silu"}
    c = config_from_hf(d)
    assert c == ModelConfig.from_name("qwen2.5-7b", pad_id=151645)
    hf = transformers.Qwen2Config(**{k: v for k, v in d.items() if k != "model_type"})
    assert c.head_dim == hf.hidden_size // hf.num_attention_heads
    assert set(hf.layer_types) == {"full_attention"} and set(c.layer_types) == {"full"}


# --- the contract every registered family meets ---

@pytest.mark.parametrize("fam", list(FAMILIES))
def test_every_family_has_a_tiny_preset_and_declares_its_parts(fam):
    spec = FAMILIES[fam]
    assert ModelConfig.from_name(TINY[fam]).family == fam
    assert spec.tokenizer in ("sentencepiece", "bpe")
    assert getattr(transformers, spec.architecture)  # a class transformers has, so saved checkpoints load


@pytest.mark.parametrize("fam", list(FAMILIES))
def test_every_family_has_its_chat_format(fam):
    from mdpo.chat import FORMATS

    assert FAMILIES[fam].chat in FORMATS, f"{fam}: chat format {FAMILIES[fam].chat!r} is not in mdpo/chat.py"


@pytest.mark.parametrize("fam", list(FAMILIES))
def test_every_family_kv_cache_decode_equals_full_forward(fam):
    """Prefill + one token at a time through the KV cache gives the full forward's logits at every position."""
    model = random_model(TINY[fam], attn_impl="sdpa")
    tokens = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache(model.config, 2, 32)
        pos = torch.arange(24)[None].expand(2, -1)
        steps = [model(tokens[:, :10], positions=pos[:, :10], cache=cache)]
        for t in range(10, 24):
            steps.append(model(tokens[:, t:t + 1], positions=pos[:, t:t + 1], cache=cache))
    assert (torch.cat(steps, 1) - full).abs().max().item() <= 1e-4


@pytest.mark.parametrize("fam", list(FAMILIES))
def test_every_family_round_trips_through_its_hf_layout(tmp_path, fam):
    model = random_model(TINY[fam], seed=7)
    save_pretrained(model, tmp_path, max_shard_bytes=60_000)  # sharded
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    back = load_pretrained(tmp_path)
    assert back.config == model.config
    for (n, a), (m, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert n == m and torch.equal(a, b), n


def test_a_shallower_preset_keeps_its_family_pattern():
    assert ModelConfig.from_name("llama-3.2-1b", num_layers=4).layer_types == ["full"] * 4
    g3 = ModelConfig.from_name("gemma-3-270m", num_layers=7).layer_types
    assert g3 == ["sliding"] * 5 + ["full", "sliding"]
    with pytest.raises(ValueError, match="layer_types has 3 entries for 2 layers"):
        ModelConfig.from_name("tiny-mistral-v0.1", num_layers=2)  # an explicit pattern is not guessed

