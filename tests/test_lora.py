"""LoRA (mdpo/lora.py) against independent references: a naive W x + (alpha / r) B A x, PEFT loading mdpo's adapter
onto transformers' base model, and the trainer's own invariants (frozen base, 1 == 2 FSDP ranks, resume)."""

import json
import math

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from mdpo.config import ConfigError, LoraConfig, load_config
from mdpo.lora import LoRALinear, TARGETS, adapters_disabled, apply_lora, lora_modules, merge_state_dict
from mdpo.model import ModelConfig, build_model
from mdpo.train import TrainError, train
from mdpo.weights import load_pretrained, save_pretrained

from test_train import CONFIG, cfg_for, metrics, run2, setup  # noqa: F401  (setup: the shared pairs fixture)

FAMILIES = ["tiny-gemma3", "tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-mistral", "tiny-gemma2"]


def lora_cfg(**kw):
    return LoraConfig(enabled=True, **kw)


def test_forward_is_base_plus_scaled_low_rank_update():
    g = torch.Generator().manual_seed(0)
    base = nn.Linear(12, 10, bias=True)
    layer = LoRALinear(base, rank=3, alpha=6.0, dropout=0.0)
    with torch.no_grad():
        layer.lora_B.weight.normal_(generator=g)  # B = 0 at init: give it values so the update shows
    x = torch.randn(4, 7, 12, generator=g)
    W, b, A, B = base.weight, base.bias, layer.lora_A.weight, layer.lora_B.weight
    naive = torch.einsum("oi,bti->bto", W, x) + b + (6.0 / 3) * torch.einsum("or,ri,bti->bto", B, A, x)
    torch.testing.assert_close(layer(x), naive, rtol=1e-5, atol=1e-5)
    layer.enabled = False
    assert torch.equal(layer(x), base(x))
    # Initialised as PEFT does: A ~ U(-1/sqrt(in), 1/sqrt(in)), B = 0, so the update starts at exactly zero.
    fresh = LoRALinear(nn.Linear(400, 10), rank=8, alpha=16.0, dropout=0.0)
    fresh.reset_adapter(torch.Generator().manual_seed(1))
    bound = 1 / math.sqrt(400)
    assert fresh.lora_A.weight.abs().max() <= bound and fresh.lora_A.weight.abs().max() > 0.9 * bound
    assert torch.count_nonzero(fresh.lora_B.weight) == 0


def test_frozen_weights_get_no_gradient():
    """After backward through an adapted model, every frozen tensor's .grad is None and every adapter's is set."""
    model = build_model(ModelConfig.from_name("tiny-llama"), seed=0)
    apply_lora(model, LoraConfig(enabled=True, rank=2, alpha=4.0), torch.float32, seed=0)
    for _, m in lora_modules(model):
        with torch.no_grad():
            m.lora_B.weight.normal_()  # B = 0 would leave A's gradient exactly zero
    model(torch.randint(0, 512, (2, 9))).float().logsumexp(-1).sum().backward()
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name


@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_is_adapted_in_its_seven_projections(name):
    model = build_model(ModelConfig.from_name(name), seed=0)
    x = torch.randint(3, 100, (2, 9))
    with torch.no_grad():
        before = model(x)
    names = apply_lora(model, lora_cfg(rank=4), torch.float32, seed=0)
    mods = lora_modules(model)
    assert len(mods) == 7 * model.config.num_layers
    assert {n.rsplit(".", 1)[1] for n, _ in mods} == set(TARGETS)
    assert len(names) == 2 * len(mods) and all(".lora_" in n for n in names)
    with torch.no_grad():
        assert torch.equal(model(x), before)  # B = 0: the adapted model is the base, bit for bit
    # Frozen base: after a backward only the adapters have gradients (B's first: A's is 0 x B = 0 at B = 0).
    model(x).float().logsumexp(-1).sum().backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (".lora_" in n), n
    assert all(m.lora_B.weight.grad.abs().sum() > 0 for _, m in mods)


def test_targets_embeddings_head_and_dtypes():
    model = build_model(ModelConfig.from_name("tiny-llama"), seed=0)  # untied head
    names = apply_lora(model, lora_cfg(rank=2, targets=["q_proj", "down_proj"], train_embeddings=True,
                                       train_head=True), torch.bfloat16, seed=0)
    assert "embed_tokens.weight" in names and "lm_head.weight" in names
    assert len([n for n in names if ".lora_" in n]) == 2 * 2 * model.config.num_layers
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    # Frozen base in the compute dtype, everything that trains in fp32 (master weights).
    assert {dtypes[n] for n in names} == {torch.float32}
    assert {d for n, d in dtypes.items() if n not in names} == {torch.bfloat16}
    tied = build_model(ModelConfig.from_name("tiny-gemma3"), seed=0)
    with pytest.raises(ValueError, match="lora.train_head: .*tie_word_embeddings.*lora.train_embeddings"):
        apply_lora(tied, lora_cfg(train_head=True), torch.float32, seed=0)


def test_same_seed_same_adapters_on_every_rank():
    a, b = (build_model(ModelConfig.from_name("tiny-qwen2"), seed=0) for _ in range(2))
    apply_lora(a, lora_cfg(), torch.float32, seed=7)
    apply_lora(b, lora_cfg(), torch.float32, seed=7)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_merge_equals_the_adapted_forward():
    model = build_model(ModelConfig.from_name("tiny-qwen3"), seed=0)
    lo = lora_cfg(rank=4, alpha=8.0)
    apply_lora(model, lo, torch.float32, seed=0)
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_B.weight.normal_(0, 0.05)
    x = torch.randint(3, 100, (2, 11))
    plain = build_model(ModelConfig.from_name("tiny-qwen3"), seed=1)
    plain.load_state_dict(merge_state_dict(model.state_dict(), lo), strict=True)
    with torch.no_grad():
        adapted, merged = model(x), plain(x)
        torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)
        with adapters_disabled(model):
            off = model(x)
    base = build_model(ModelConfig.from_name("tiny-qwen3"), seed=0)
    with torch.no_grad():
        assert torch.equal(off, base(x))
    assert all(m.enabled for _, m in lora_modules(model))  # restored after the block


def test_config_section_is_strict():
    over = ["lora.enabled=true", "lora.rank=8", "lora.targets=[q_proj, up_proj]"]
    cfg = load_config(CONFIG, over)
    assert cfg.lora.rank == 8 and cfg.lora.targets == ["q_proj", "up_proj"]
    assert load_config(CONFIG).lora.enabled is False  # off by default: the paper's YAMLs are unchanged
    for bad, msg in [(["lora.rank=8"], "lora.rank is set but lora.enabled is false"),
                     (["lora.enabled=true", "lora.targets=[wq]"], "lora.targets: unknown projection 'wq'"),
                     (["lora.enabled=true", "lora.targets=[]"], "lora.targets: unknown projection"),
                     (["lora.enabled=true", "lora.rank=0"], "lora.rank must be >= 1"),
                     (["lora.enabled=true", "lora.dropout=1.0"], r"lora.dropout must be in \[0, 1\)")]:
        with pytest.raises(ConfigError, match=msg):
            load_config(CONFIG, bad)


# ---------------------------------------------------------------- through the trainer
def lora_run(setup, **extra):
    kw = dict(lora__enabled="true", lora__rank=4, lora__alpha=8, optimizer__lr=0.01)
    kw.update(extra)
    return cfg_for(setup, **kw)


@pytest.fixture(scope="module")
def lora_single(setup):  # noqa: F811
    out = setup / "lora_single"
    train(lora_run(setup), setup / "pairs.jsonl", out)
    return out


def test_trainer_updates_only_the_adapters(lora_single, setup):  # noqa: F811
    m = metrics(lora_single)
    assert len(m) == 3 and m[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # reference = base = policy at step 1
    assert m[-1]["loss"] != pytest.approx(math.log(2), abs=1e-3)
    # The checkpoint holds what trains and its AdamW moments, never the frozen base.
    import torch.distributed.checkpoint as dcp

    stored = dcp.FileSystemReader(str(lora_single / "checkpoints" / "step_1")).read_metadata().state_dict_metadata
    model_keys = [k for k in stored if k.startswith("model.")]
    moments = [k for k in stored if k.startswith("optim.state.") and k.endswith(".exp_avg")]
    assert len(model_keys) == len(moments) == 2 * 7 * 6 and all(".lora_" in k for k in model_keys + moments)
    init = load_file(setup / "init" / "model.safetensors")
    # The export is merged: every adapted projection moved, nothing else did.
    final = load_file(lora_single / "final" / "model.safetensors")
    assert final.keys() == init.keys()
    for k in init:
        moved = not torch.equal(init[k], final[k])
        assert moved == any(k.endswith(f"{t}.weight") for t in TARGETS), k


def peft_logits(base_folder, adapter_folder, x):
    peft = pytest.importorskip("peft")
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(base_folder, attn_implementation="eager",
                                                           dtype=torch.float32).eval()
    model = peft.PeftModel.from_pretrained(hf, adapter_folder).eval()
    with torch.no_grad():
        return model(x, use_cache=False).logits


@pytest.mark.parametrize("name,extra", [("tiny-gemma3", {}), ("tiny-llama", {"lora__train_head": "true"}),
                                        ("tiny-gemma3", {"lora__train_embeddings": "true"}),
                                        ("tiny-qwen2", {"lora__dropout": 0.1})])
def test_peft_loads_the_adapter_with_equal_logits(setup, tmp_path, name, extra):  # noqa: F811
    save_pretrained(build_model(ModelConfig.from_name(name), seed=0), tmp_path / "init")
    out = tmp_path / "out"
    train(lora_run(setup, model__name_or_path=tmp_path / "init", **extra), setup / "pairs.jsonl", out)
    conf = json.loads((out / "final" / "adapter" / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and conf["r"] == 4 and conf["lora_alpha"] == 8
    x = torch.randint(3, 500, (2, 13), generator=torch.Generator().manual_seed(0))
    ours = load_pretrained(out / "final", attn_impl="eager").eval()
    with torch.no_grad():
        merged = ours(x)
        base = load_pretrained(tmp_path / "init", attn_impl="eager").eval()(x)
    theirs = peft_logits(tmp_path / "init", out / "final" / "adapter", x)
    assert (merged - base).abs().max() > 1e-3  # the adapter changed the model
    torch.testing.assert_close(theirs, merged, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_two_fsdp_ranks_match_one_with_adapters(setup, tmp_path, dtype):  # noqa: F811
    """Activation checkpointing, micro-batches of 2: the FSDP2 job and the single process take the same steps;
    step 1's log-ratio is exactly 0 in both."""
    cfg = lora_run(setup, model__dtype=dtype, training__activation_checkpointing="true",
                   training__micro_batch_size=2, checkpoint__every=0)
    train(cfg, setup / "pairs.jsonl", tmp_path / "one")
    run2(cfg, setup / "pairs.jsonl", tmp_path / "two")
    m1, m2 = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert len(m1) == len(m2) == 3
    for m in (m1[0], m2[0]):
        assert m["rewards/chosen"] == 0.0 and m["rewards/rejected"] == 0.0
    assert m1[0]["loss"] == m2[0]["loss"]
    a1 = load_file(tmp_path / "one" / "final" / "adapter" / "adapter_model.safetensors")
    a2 = load_file(tmp_path / "two" / "final" / "adapter" / "adapter_model.safetensors")
    assert a1.keys() == a2.keys() and len(a1) == 2 * 7 * 6  # A and B, 7 projections, 6 layers
    # Compared in each projection's update (alpha / r) B A, not entry by entry: AdamW's per-entry normalisation
    # turns the summation-order noise of an entry with a near-zero gradient into up to a whole step in A or B.
    rel = []
    for k in a1:
        if k.endswith("lora_A.weight"):
            kb = k.replace("lora_A", "lora_B")
            d1, d2 = a1[kb] @ a1[k], a2[kb] @ a2[k]
            assert d1.norm() > 0
            rel.append(((d1 - d2).norm() / d1.norm()).item())
    if dtype == "float32":
        # The ranks differ in fp32 summation order only: measured max 1.7e-5 over the 42 updates.
        assert max(rel) < 1e-3
        for a, b in zip(m1, m2):
            assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-5
    else:
        # bf16: one process pads examples (0, 1), (2, 3) together, two ranks (0, 2) and (1, 3), and bf16 matmuls of
        # other shapes round differently; lr 1e-2 for 3 steps turns that into measured max 5.9% in an update and
        # 2.8e-4 in the loss. The fp32 row above is the exactness check; this one says bf16 stays that close.
        assert max(rel) < 0.15
        for a, b in zip(m1[1:], m2[1:]):
            assert abs(a["loss"] - b["loss"]) < 2e-3
        assert {t.dtype for t in load_file(tmp_path / "one" / "final" / "model.safetensors").values()} == \
            {torch.bfloat16}


def test_kill_mid_iteration_resumes_bit_identically(lora_single, setup, tmp_path):  # noqa: F811
    cfg = lora_run(setup)
    out = tmp_path / "resumed"
    train(cfg, setup / "pairs.jsonl", out, max_steps=2)  # "killed" after step 2; checkpoint at step 1
    assert not (out / "final").exists()
    train(cfg, setup / "pairs.jsonl", out, resume=True)
    for f in ("model.safetensors", "adapter/adapter_model.safetensors"):
        w1, w2 = load_file(lora_single / "final" / f), load_file(out / "final" / f)
        assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1), f
    assert metrics(out)[-1]["loss"] == metrics(lora_single)[-1]["loss"]


def test_online_reference_is_the_policy_with_adapters_off(lora_single, setup, tmp_path, monkeypatch):  # noqa: F811
    """reference.online with adapters: no second model is loaded, and the run equals the precomputed one."""
    import mdpo.train as tr

    loads = []
    real = tr.load_pretrained
    monkeypatch.setattr(tr, "load_pretrained", lambda *a, **k: loads.append(a) or real(*a, **k))
    out = tmp_path / "online"
    train(lora_run(setup, reference__online="true"), setup / "pairs.jsonl", out)
    assert len(loads) == 1  # the policy only
    strip = ("step_time_s", "tokens_per_s", "peak_mem_gb")
    assert [{k: v for k, v in m.items() if k not in strip} for m in metrics(out)] == \
        [{k: v for k, v in m.items() if k not in strip} for m in metrics(lora_single)]


def test_bad_lora_setting_is_one_line(setup, tmp_path):  # noqa: F811
    with pytest.raises(TrainError, match="lora.train_head: .*tied|tie_word_embeddings"):
        train(lora_run(setup, lora__train_head="true"), setup / "pairs.jsonl", tmp_path / "x")


def test_sft_with_adapters_learns_and_only_adapters_move(setup, tmp_path):  # noqa: F811
    """The SFT objective (the pipeline's first stage) with adapters: the NLL falls, and the merged export equals
    the base plus the naive (alpha / r) B A of the saved adapter."""
    data = tmp_path / "sft.jsonl"
    rows = [json.loads(x)["chosen"] for x in (setup / "pairs.jsonl").read_text().splitlines()]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows * 2))
    out = tmp_path / "sft"
    train(lora_run(setup, loss__type="sft", checkpoint__every=0, training__epochs=2, optimizer__lr=0.02),
          data, out)
    m = metrics(out)
    assert len(m) == 12 and m[-1]["loss"] < m[0]["loss"] - 0.1
    base, merged = load_file(setup / "init" / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    ad = load_file(out / "final" / "adapter" / "adapter_model.safetensors")
    for k, w in base.items():
        a = ad.get("base_model." + "model." + k.replace(".weight", ".lora_A.weight"))
        if a is None:
            assert torch.equal(merged[k], w), k
        else:
            b = ad["base_model.model." + k.replace(".weight", ".lora_B.weight")]
            torch.testing.assert_close(merged[k], w + (8 / 4) * b @ a, rtol=0, atol=1e-6)


def test_mkto_with_adapters_starts_at_the_base_and_moves_only_adapters(setup, tmp_path):  # noqa: F811
    """M-KTO with adapters: step 1's reference (and its KL sequences' z0) is the base with adapters off, so every
    log-ratio and z0 are 0 and each loss is w (1 - sigmoid(0)); afterwards only the 7 projections changed."""
    import random as _r

    from test_train import make_traj

    g = torch.Generator().manual_seed(4)
    data = tmp_path / "kto.jsonl"
    labels = [i % 3 != 0 for i in range(8)]
    with open(data, "w") as f:
        for i in range(8):
            t = make_traj(g, f"k{i}", 0, [2] + torch.randint(5, 512, (5,), generator=g).tolist())
            t.correct = labels[i]
            f.write(t.to_json() + "\n")
    out = tmp_path / "kto"
    train(lora_run(setup, loss__type="mkto", training__global_batch_size=4, loss__undesirable_weight=1.5,
                   checkpoint__every=0), data, out)
    m = metrics(out)
    first = _r.Random(42).sample(range(8), 8)[:4]
    assert m[0]["loss"] == pytest.approx(sum(0.5 * (1.0 if labels[i] else 1.5) for i in first) / 4, abs=1e-6)
    assert m[0]["kl"] == 0.0 and m[-1]["loss"] != pytest.approx(m[0]["loss"], abs=1e-4)
    base, merged = load_file(setup / "init" / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed and all(k.split(".")[-2].endswith("_proj") for k in changed), changed
