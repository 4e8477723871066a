"""The hand-written Gemma against transformers' reference classes, with the same random weights.

The HF configs are written out here field by field (not produced by mdpo.weights), so a wrong conversion
in mdpo cannot hide a wrong architecture.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mdpo.model import CausalLM, ModelConfig, KVCache, build_model  # noqa: E402

FAMILIES = ["tiny-gemma", "tiny-gemma2", "tiny-gemma3"]


def hf_model(name: str, model: CausalLM):
    """The transformers model of the same architecture, holding `model`'s weights."""
    c = model.config
    common = dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                  num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
                  num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim,
                  max_position_embeddings=c.max_position_embeddings, rms_norm_eps=1e-6,
                  hidden_activation="gelu_pytorch_tanh", attention_dropout=0.0, pad_token_id=0)
    if name == "tiny-gemma":
        cfg = transformers.GemmaConfig(rope_theta=10_000.0, **common)
        cls = transformers.GemmaForCausalLM
    elif name == "tiny-gemma2":
        cfg = transformers.Gemma2Config(rope_theta=10_000.0, query_pre_attn_scalar=24, attn_logit_softcapping=50.0,
                                        final_logit_softcapping=30.0, sliding_window=8, **common)
        cls = transformers.Gemma2ForCausalLM
    else:
        cfg = transformers.Gemma3TextConfig(rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
                                            query_pre_attn_scalar=16, sliding_window=8, **common)
        cls = transformers.Gemma3ForCausalLM
    cfg._attn_implementation = "eager"
    ref = cls(cfg).eval()
    ref.model.load_state_dict(model.state_dict(), strict=True)
    ref.tie_weights()
    return ref


def random_model(name, seed=0, attn_impl="eager", dtype=torch.float32):
    model = build_model(ModelConfig.from_name(name), attn_impl=attn_impl, seed=seed, dtype=dtype)
    # Norm weights are zero after init_weights; make them random so a (1 + w) vs w slip shows.
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif n.endswith("proj.weight") or n == "embed_tokens.weight":
                p.mul_(5.0)  # larger activations, so soft-caps and attention patterns are exercised
    return model.eval()


def test_hf_config_layer_pattern_matches_ours():
    # The reference's own layer pattern (its defaults) must equal our family defaults.
    g2 = transformers.Gemma2Config(num_hidden_layers=6)
    assert [t[:4] for t in g2.layer_types] == [t[:4] for t in ModelConfig(family="gemma2", num_layers=6,
                                                                          sliding_window=8).layer_types]
    g3 = transformers.Gemma3TextConfig(num_hidden_layers=18)
    assert [t[:4] for t in g3.layer_types] == [t[:4] for t in ModelConfig.from_name("gemma-3-270m").layer_types]


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_logits_match_transformers(name, impl):
    model = random_model(name, attn_impl=impl)
    ref = hf_model(name, model)
    T = 3 * model.config.max_position_embeddings // 32  # 24 tokens: three times the sliding window of 8
    tokens = torch.randint(0, model.config.vocab_size, (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(tokens)
        theirs = ref(tokens).logits
    assert ours.shape == (2, T, model.config.vocab_size)
    assert theirs.abs().max() > 1.0  # not a degenerate comparison
    assert (ours - theirs).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", FAMILIES)
def test_ragged_batch_matches_transformers_and_single_rows(name):
    model = random_model(name, seed=3)
    ref = hf_model(name, model)
    lengths = [21, 9, 14]
    g = torch.Generator().manual_seed(2)
    rows = [torch.randint(5, model.config.vocab_size, (n,), generator=g) for n in lengths]
    batch = torch.zeros(len(rows), max(lengths), dtype=torch.long)  # right-padded with the pad id 0
    attn = torch.zeros_like(batch)
    for i, r in enumerate(rows):
        batch[i, : len(r)] = r
        attn[i, : len(r)] = 1
    with torch.no_grad():
        ours = model(batch)
        theirs = ref(batch, attention_mask=attn).logits
        for i, r in enumerate(rows):
            alone = model(r[None])[0]
            n = len(r)
            assert (ours[i, :n] - theirs[i, :n]).abs().max().item() <= 1e-4
            assert (ours[i, :n] - alone).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", FAMILIES)
def test_kv_cache_prefill_and_decode_match_full_forward(name):
    model = random_model(name, seed=4)
    V = model.config.vocab_size
    lengths = [5, 11]
    total = 26  # past the window of 8, so sliding layers must drop old cache slots
    g = torch.Generator().manual_seed(5)
    seqs = torch.randint(5, V, (2, total), generator=g)
    with torch.no_grad():
        full = model(seqs)
        cache = KVCache(model.config, batch_size=2, max_len=32)
        # Right-padded prefill of different lengths; the junk written past each row's length is
        # overwritten by that row's later decode steps.
        P = max(lengths)
        prefill = seqs[:, :P].clone()
        prefill[0, lengths[0]:] = 0
        logits = model(prefill, positions=torch.arange(P).expand(2, P), cache=cache)
        for i, n in enumerate(lengths):
            assert (logits[i, :n] - full[i, :n]).abs().max().item() <= 1e-5
        pos = torch.tensor(lengths)
        while int(pos.max()) < total:
            p = pos.clamp(max=total - 1)
            step = model(seqs.gather(1, p[:, None]), positions=p[:, None], cache=cache)[:, 0]
            for i in range(2):
                if pos[i] < total:
                    assert (step[i] - full[i, pos[i]]).abs().max().item() <= 1e-5, (i, int(pos[i]))
            pos = pos + 1


def test_return_hidden_and_head_compose_to_logits():
    """return_hidden is the final norm's output and the logits are 30 tanh(hidden E^T / 30), both written out
    here from the norm's input (a hook), not through model.head."""
    model = random_model("tiny-gemma2", seed=6)
    with torch.no_grad():
        model.norm.weight.fill_(15.0)  # scale 16: raw logits pass 30, so the soft-cap must act
    tokens = torch.randint(0, 512, (1, 12))
    seen = []
    model.norm.register_forward_hook(lambda mod, args, out: seen.append(args[0].detach()))
    with torch.no_grad():
        hidden = model(tokens, return_hidden=True)
        logits = model(tokens)
    x = seen[0].double()
    naive_hidden = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1.0 + model.norm.weight.double())
    raw = naive_hidden @ model.embed_tokens.weight.double().T
    assert hidden.shape == (1, 12, 64) and (hidden.double() - naive_hidden).abs().max().item() <= 1e-4
    assert raw.abs().max().item() > 40.0  # the cap is active, not a no-op on small logits
    assert (logits.double() - 30.0 * torch.tanh(raw / 30.0)).abs().max().item() <= 1e-4
    assert logits.abs().max().item() < 30.0


def test_meta_build_and_cost_accounting():
    cfg = ModelConfig.from_name("gemma-7b")
    with torch.device("meta"):
        model = CausalLM(cfg)
    n = model.num_params()
    # Hand count for gemma-7b: embedding + 28 * (attention + MLP + 2 norms) + final norm.
    d, ffn, hd = 3072, 24576, 16 * 256
    per_layer = d * hd * 2 + d * hd * 2 + 3 * d * ffn + 2 * d
    assert n == 256000 * d + 28 * per_layer + d == 8_537_680_896
    assert model.flops_per_token(2048) == 6 * n + 28 * 12 * 16 * 256 * 2048
    assert model.kv_bytes_per_token(torch.bfloat16) == 2 * 28 * 16 * 256 * 2
    g3 = CausalLM(ModelConfig.from_name("gemma-3-270m"), attn_impl="eager").to(torch.bfloat16)
    assert g3.num_params() == 268_098_176  # the published count of google/gemma-3-270m
    # 15 sliding layers see at most 512 keys, 3 global layers see the full context.
    assert g3.flops_per_token(4096) == 6 * 268_098_176 + 12 * 4 * 256 * (15 * 512 + 3 * 4096)
    assert g3.weight_bytes() == 2 * 268_098_176


def test_presets_and_errors():
    assert ModelConfig.from_name("gemma-1.1-7b-it") == ModelConfig.from_name("gemma-7b")
    g2 = ModelConfig.from_name("gemma-2-9b")
    assert g2.layer_types[:3] == ["sliding", "full", "sliding"] and g2.query_scale == 256 ** -0.5
    g3 = ModelConfig.from_name("gemma-3-1b")
    assert [i for i, t in enumerate(g3.layer_types) if t == "full"] == [5, 11, 17, 23]
    assert ModelConfig.from_name("gemma-2b").query_scale == 1 / 16
    with pytest.raises(ValueError, match="unknown model preset 'gemma-9'"):
        ModelConfig.from_name("gemma-9")
    with pytest.raises(ValueError, match="sliding layers need a sliding_window"):
        ModelConfig(family="gemma3", sliding_window=None, num_layers=6)
