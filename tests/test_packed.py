"""oneDNN-packed CPU inference twin: same logits as the model, shared tensors, staleness, Sampler use."""

import pytest
import torch
import torch.nn as nn

from mdpo.model import ModelConfig, KVCache, build_model
from mdpo.packed import PackedEmbedding, PackedLinear, can_pack, is_fresh, pack_for_cpu
from mdpo.sampler import Request, Sampler, SamplingParams


def tiny(name, dtype=torch.float32, seed=0):
    return build_model(ModelConfig.from_name(name), seed=seed, dtype=dtype).eval()


needs_bf16 = pytest.mark.skipif(not (torch.backends.mkldnn.is_available()
                                     and torch.ops.mkldnn._is_mkldnn_bf16_supported()),
                                reason="CPU without native bf16")


@pytest.mark.parametrize("name", ["tiny-gemma", "tiny-gemma2", "tiny-gemma3", "tiny-llama", "tiny-qwen2", "tiny-qwen3"])
def test_twin_logits_match_model_fp32(name):
    model = tiny(name)
    twin = pack_for_cpu(model, batch_size=2)
    tokens = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, got = model(tokens), twin(tokens)
    # Same math, different summation order inside oneDNN: fp32 rounding-level differences only.
    assert (got - ref).abs().max().item() < 1e-4 * ref.abs().max().item()
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


@needs_bf16
def test_twin_logits_match_model_bf16():
    model = tiny("tiny-gemma3", dtype=torch.bfloat16)
    twin = pack_for_cpu(model, batch_size=1)
    tokens = torch.randint(0, model.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref, got = model(tokens).float(), twin(tokens).float()
    # bf16 F.linear already runs on oneDNN: packing changes the layout, not the arithmetic.
    assert torch.equal(got, ref)


def test_twin_with_kv_cache_matches_uncached():
    model = tiny("tiny-gemma2")
    twin = pack_for_cpu(model, batch_size=1)
    tokens = torch.randint(0, model.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(3))
    cache = KVCache(model.config, 1, 32)
    with torch.no_grad():
        twin(tokens[:, :12], positions=torch.arange(12)[None], cache=cache)
        step = twin(tokens[:, 12:], positions=torch.arange(12, 20)[None], cache=cache)
        ref = model(tokens)[:, 12:]
    assert (step - ref).abs().max().item() < 1e-4 * ref.abs().max().item()


def test_twin_shares_tensors_and_leaves_model_alone():
    model = tiny("tiny-gemma3")
    twin = pack_for_cpu(model)
    ours, theirs = dict(model.named_parameters()), dict(twin.named_parameters())
    assert ours.keys() == theirs.keys()
    assert all(ours[k] is theirs[k] for k in ours)  # no second copy of the plain weights
    assert isinstance(model.layers[0].mlp.up_proj, nn.Linear)  # the model keeps its modules
    assert isinstance(twin.layers[0].mlp.up_proj, PackedLinear)
    assert isinstance(twin.embed_tokens, PackedEmbedding)
    n_linear = sum(isinstance(m, nn.Linear) for m in model.modules())
    assert n_linear == 7 * model.config.num_layers
    assert sum(isinstance(m, PackedLinear) for m in twin.modules()) == n_linear


def test_freshness_tracks_inplace_updates_and_moves():
    model = tiny("tiny-gemma")
    twin = pack_for_cpu(model)
    assert is_fresh(twin, model)
    with torch.no_grad():
        model.layers[1].self_attn.o_proj.weight.add_(0.1)  # what an optimizer step does
    assert not is_fresh(twin, model)
    twin = pack_for_cpu(model)
    assert is_fresh(twin, model)
    model.to(torch.float64)  # .to() replaces the parameter tensors
    assert not is_fresh(twin, model)


def test_can_pack():
    assert can_pack(torch.zeros(2, 2))
    assert not can_pack(torch.zeros(2, 2, dtype=torch.float16))
    assert not can_pack(torch.zeros(2, 2, device="meta"))
    with pytest.raises(ValueError, match="cannot pack"):
        pack_for_cpu(tiny("tiny-gemma").to(torch.float16))


def _requests():
    g = torch.Generator().manual_seed(4)
    return [Request(f"p{i}", [2] + torch.randint(300, 512, (L,), generator=g).tolist(), n=2)
            for i, L in enumerate([6, 15, 9])]


def test_sampler_packed_equals_unpacked_and_repacks_after_update(gemma3_dir):
    from mdpo.tokenizer import Tokenizer
    tok = Tokenizer.from_pretrained(gemma3_dir)
    model = tiny("tiny-gemma3", seed=5)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)  # peaked distributions: no near-ties between packed and plain arithmetic
    params = SamplingParams(temperature=1.0, max_new_tokens_per_turn=12)

    def run(pack):
        sampler = Sampler(model, tok, batch_size=3, max_length=48, seed=7, pack=pack)
        first = sorted((t.prompt_id, t.sample_id, t.tokens, t.logprobs) for t in sampler.generate(_requests(), params))
        return sampler, first

    packed, a = run(True)
    plain, b = run(False)
    assert plain.net is model and packed.net is not model
    assert [x[:3] for x in a] == [x[:3] for x in b]  # identical samples (same per-sample random streams)
    for (_, _, _, la), (_, _, _, lb) in zip(a, b):
        assert max(abs(x - y) for x, y in zip(la, lb)) < 1e-4
    with torch.no_grad():
        model.embed_tokens.weight.mul_(0.5)  # the weights change between two generate calls
    again = sorted((t.prompt_id, t.sample_id, t.tokens) for t in packed.generate(_requests(), params))
    fresh = sorted((t.prompt_id, t.sample_id, t.tokens) for t in Sampler(
        model, tok, batch_size=3, max_length=48, seed=7, pack=False).generate(_requests(), params))
    assert again == fresh
    assert again != [x[:3] for x in a]  # the change mattered, so a stale twin would have been caught


def test_should_pack_needs_room_for_the_copy(monkeypatch):
    import mdpo.packed as packed
    model = tiny("tiny-gemma")
    assert packed.available_memory_bytes() > 0
    monkeypatch.setattr(packed, "available_memory_bytes", lambda: 4 * model.weight_bytes())
    assert packed.should_pack(model)
    monkeypatch.setattr(packed, "available_memory_bytes", lambda: model.weight_bytes())
    assert not packed.should_pack(model)
    assert not packed.should_pack(tiny("tiny-gemma").to(torch.float16))
