"""mdpo.plan: the states counted by hand, the measured activations against the whole model's, verdicts and the CLI.

The plan against a measured peak (RSS of a real training step) is benchmarks/bench_train.py --lora; here each part
is checked against an independent count: parameter bytes from the shapes, a block's saved tensors extrapolated
to every layer and another length against what the whole model's forward actually saves."""

from __future__ import annotations

import subprocess
from dataclasses import replace
import sys
from pathlib import Path

import pytest
import torch

from mdpo.config import load_config
from mdpo.lora import apply_lora
from mdpo.model import ModelConfig, build_model
from mdpo.plan import GB, main, plan, saved_bytes

ROOT = Path(__file__).resolve().parent.parent
EXP = ROOT / "experiments" / "gemma7b_mdpo.yaml"


def cfg_of(*over):
    return load_config(EXP, ["training.global_batch_size=1", *over])  # one micro-batch a step: no gradients carried


def hand_lora_params(c: ModelConfig, r: int) -> int:
    """rank r (in + out) per adapted projection, from the shapes."""
    d, q, kv, i = c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size
    shapes = [(d, q), (d, kv), (d, kv), (q, d), (d, i), (d, i), (i, d)]
    return c.num_layers * sum(r * (a + b) for a, b in shapes)


def hand_params(c: ModelConfig) -> tuple[int, int, int]:
    """(all, embedding, one block) parameters from the shapes (norm weights included)."""
    d, q, kv, i = c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size
    block = d * q + 2 * d * kv + q * d + 3 * d * i
    if c.family == "qwen2":
        block += q + 2 * kv  # q/k/v biases
    norms = 4 if c.post_norms else 2
    block += norms * d + (2 * c.head_dim if c.family in ("qwen3", "gemma3") else 0)  # per-head q/k norms
    embed = c.vocab_size * d
    return c.num_layers * block + embed * (1 if c.tie_embeddings else 2) + d, embed, block


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3", "tiny-qwen2"])
def test_full_fine_tuning_states_are_16_bytes_a_parameter_plus_the_head_accumulator(name):
    c = ModelConfig.from_name(name)
    n, embed, block = hand_params(c)
    assert n == build_model(c, device="meta", init=False).num_params()
    p = plan(cfg_of("model.dtype=float32"), gpus=1, model=name, seq_len=64)
    assert p.train["weights"] == 4 * n  # fp32 on one GPU: no compute-dtype copies
    assert p.train["gradients"] == 4 * n
    assert p.train["head_gradient"] == 4 * embed  # the chunked head's fp32 accumulator
    assert p.train["optimizer"] == 8 * n
    # The peak: weights and optimizer states plus the largest moment of the step; at the end of backward every
    # gradient and, the embedding being trained, the lookup's dense gradient beside the head's.
    assert p.train_total == 4 * n + 8 * n + max(p.phases.values())
    assert p.phases["backward end"] == 4 * n + 4 * embed
    # Unfused AdamW (the CPU's) holds two temporaries of the tensor it updates: the embedding is the largest.
    cpu = plan(cfg_of("model.dtype=float32"), gpus=1, model=name, seq_len=64, fused_optimizer=False)
    assert cpu.phases["optimizer step"] - p.phases["optimizer step"] == 8 * embed
    # bf16 on 2 GPUs: sharded fp32 states, plus the unsharded bf16 root (embedding, head) and two blocks.
    p2 = plan(cfg_of("model.dtype=bfloat16"), gpus=2, model=name, seq_len=64)
    head = 0 if c.tie_embeddings else embed
    assert p2.train["weights"] == 4 * n // 2 + 2 * (embed + head + 2 * block)
    assert p2.train["optimizer"] == 8 * n // 2
    assert p2.train["gradients"] == 4 * n // 2 + 2 * block  # + one block's unsharded gradients in flight


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma2", "tiny-mistral", "tiny-qwen3"])
def test_lora_trains_rank_times_in_plus_out_per_projection(name):
    c = ModelConfig.from_name(name)
    n, embed, block = hand_params(c)
    lo = hand_lora_params(c, 8)
    p = plan(cfg_of("model.dtype=float32", "lora.enabled=true", "lora.rank=8"), gpus=1, model=name, seq_len=64)
    assert p.train["optimizer"] == 8 * lo
    assert p.train["gradients"] == 4 * lo and p.train["head_gradient"] == 0  # nothing for the frozen base
    assert p.train["weights"] == 4 * lo + 4 * n  # the frozen base is in the compute dtype: fp32 here
    pb = plan(cfg_of("model.dtype=bfloat16", "lora.enabled=true", "lora.rank=8"), gpus=1, model=name, seq_len=64)
    head = 0 if c.tie_embeddings else embed
    assert pb.train["weights"] == 4 * lo + 2 * n + 2 * (embed + head + 2 * (block + hand_lora_params(c, 8)
                                                                          // c.num_layers))


def measured_layer_bytes(c: ModelConfig, dtype, cfg, rows: int, T: int) -> int:
    """What autograd saves inside the blocks of the whole model's forward on rows x T tokens (storages counted
    once, parameters and each block's input excluded as the probe excludes them)."""
    model = build_model(c, dtype=dtype, seed=0)
    if cfg.lora.enabled:
        apply_lora(model, cfg.lora, dtype, seed=0)
        for p in model.parameters():
            p.data = p.data.to(dtype)
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen, inputs, ctx = {}, set(), []

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr not in inputs:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    def enter(_, args):
        inputs.add(args[0].untyped_storage().data_ptr())
        ctx.append(torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t))
        ctx[-1].__enter__()

    def leave(*_):
        ctx.pop().__exit__(None, None, None)

    for layer in model.layers:
        layer.register_forward_pre_hook(enter)
        layer.register_forward_hook(leave)
    tokens = torch.randint(0, c.vocab_size, (rows, T), generator=torch.Generator().manual_seed(0))
    model(tokens, return_hidden=True)
    return sum(seen.values())


@pytest.mark.parametrize("name,lora", [("tiny-llama", False), ("tiny-llama", True), ("tiny-gemma2", False),
                                       ("tiny-qwen2", True)])
def test_one_block_probe_extrapolates_to_every_layer_and_length(name, lora):
    # Gemma 2's soft-capped attention is eager: scores and probabilities are saved, quadratic in length; the probe
    # runs at 32 and 64 tokens, the whole model here at 2 rows of 96 tokens.
    c = ModelConfig.from_name(name)
    # Every layer full attention: a tiny window (8 tokens) would save less than the full-attention probe measures
    # (the plan's one-block probe is the larger kind on purpose).
    c = replace(c, layer_types=["full"] * c.num_layers)
    cfg = cfg_of("model.dtype=float32", *(["lora.enabled=true", "lora.rank=4"] if lora else []))
    a, q = saved_bytes(c, torch.float32, cfg)
    assert (q > 0) == (c.attn_softcap is not None)
    want = measured_layer_bytes(c, torch.float32, cfg, rows=2, T=96)
    got = c.num_layers * 2 * (a * 96 + q * 96 * 96)
    assert abs(got - want) / want < 0.02, (got, want)


def test_activation_checkpointing_keeps_block_inputs_only():
    c = ModelConfig.from_name("gemma-3-270m")
    off = plan(cfg_of("model.dtype=float32", "training.micro_batch_size=1", "training.activation_checkpointing=false"),
               model="gemma-3-270m", seq_len=512)
    on = plan(cfg_of("model.dtype=float32", "training.micro_batch_size=1", "training.activation_checkpointing=true"),
              model="gemma-3-270m", seq_len=512)
    a, q = saved_bytes(c, torch.float32, cfg_of("model.dtype=float32"))
    block = int(2 * 512 * a)  # a pair: 2 rows
    # Without checkpointing every block's saved tensors; with it each block's input (fp32: 4 bytes a number) and,
    # in backward, one block recomputed beside its working set.
    assert off.train["activations"] - on.train["activations"] == c.num_layers * (block - 2 * 512 * c.hidden_size * 4)
    assert on.phases["blocks backward"] - on.train["activations"] == 2 * block + 4 * c.vocab_size * c.hidden_size
    assert on.train["activations"] < off.train["activations"] / 3


def test_verdicts_for_the_papers_recipe_on_one_and_eight_80gb_cards():
    def paper(*over):  # experiments/gemma7b_mdpo.yaml as it is: gradients carried over micro-batches
        return load_config(EXP, list(over))

    full = plan(paper(), gpus=1, gpu_gb=80, model="gemma-7b")
    assert not full.fits("train")
    assert full.train["weights"] + full.train["gradients"] + full.train["optimizer"] > 16 * 8.5e9 * 0.95
    assert full.peak_phase == "head backward"  # bf16: the (V, d) fp32 accumulator beside each chunk's product
    assert any("lora.enabled=true" in k for k in full.knobs)
    assert any(k.startswith("more GPUs: 4") and k.endswith("(fits)") for k in full.knobs), full.knobs
    eight = plan(paper(), gpus=8, gpu_gb=80, model="gemma-7b")
    assert eight.fits("train") and not eight.knobs
    lora = plan(paper("lora.enabled=true"), gpus=1, gpu_gb=80, model="gemma-7b")
    assert lora.fits("train") and lora.train_total < 40 * GB
    # The rollout's KV pool: rollout.batch_size rows of max_length, and rows of the typical length it admits.
    c = ModelConfig.from_name("gemma-7b")
    kv = 2 * c.num_layers * c.num_kv_heads * c.head_dim * 2
    ro, weights = paper().rollout, 2 * build_model(c, device="meta", init=False).num_params()
    assert lora.rollout["weights"] == weights
    assert lora.rollout["kv_pool"] == min(ro.batch_size * ro.max_length * kv, int(0.9 * (int(0.92 * 80 * GB) - weights)))
    assert lora.rows == lora.rollout["kv_pool"] // (kv * 700)


def test_cli_prints_the_plan_and_exits_by_verdict(capsys):
    assert main([str(EXP), "--model", "gemma-7b", "lora.enabled=true"]) == 0
    out = capsys.readouterr().out
    assert "plan: training" in out and "fits in 80.0 GB" in out and "LoRA rank 16" in out
    assert main([str(EXP), "--model", "gemma-7b"]) == 1
    out = capsys.readouterr().out
    assert "does NOT fit" in out and "plan: to fit, lora.enabled=true" in out


@pytest.mark.parametrize("args,needle", [
    (["--model", "no-such-model"], "model 'no-such-model': not a folder, a preset or a cached Hub model"),
    (["--model", "gemma-7b", "lora.rank=0"], "lora.rank"),
    (["--model", "gemma-7b", "nosuch.key=1"], "nosuch"),
])
def test_bad_input_is_one_line(args, needle):
    p = subprocess.run([sys.executable, "-m", "mdpo.plan", str(EXP), *args], capture_output=True, text=True,
                       cwd=ROOT)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in p.stderr, p.stderr
