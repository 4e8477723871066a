"""Trainer: 1 process == 2 FSDP2 processes (gloo), kill + resume == uninterrupted, cross-world checkpoints,
bad input and non-finite losses."""

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from mdpo.config import load_config
from mdpo.config import LossConfig
from mdpo.model import ModelConfig, build_model
from mdpo.objectives import get_objective
from mdpo.train import TrainError, load_examples, train
from mdpo.trajectory import Role, Trajectory
from mdpo.weights import load_pretrained, save_pretrained

P, M, T, S = int(Role.PROMPT), int(Role.MODEL), int(Role.TOOL), int(Role.TEMPLATE)
CONFIG = os.path.join(os.path.dirname(__file__), "..", "experiments", "gemma7b_mdpo.yaml")


def make_traj(g, pid, sid, prompt):
    """prompt | model turn | tool turn | template | model turn, random ids and lengths."""
    parts = [(M, int(torch.randint(3, 8, (1,), generator=g))), (S, 2), (T, int(torch.randint(3, 6, (1,), generator=g))),
             (S, 2), (M, int(torch.randint(2, 6, (1,), generator=g)))]
    tokens, roles, turns = list(prompt), [P] * len(prompt), [0] * len(prompt)
    turn = 1
    for role, n in parts:
        tokens += torch.randint(5, 512, (n,), generator=g).tolist()
        roles += [role] * n
        turns += [turn] * n
        if role == T:
            turn += 1
    return Trajectory(pid, sid, tokens, roles, turns)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("train")
    model = build_model(ModelConfig.from_name("tiny-gemma3"), seed=0)
    save_pretrained(model, d / "init")
    g = torch.Generator().manual_seed(0)
    with open(d / "pairs.jsonl", "w") as f:
        for i in range(12):
            prompt = [2] + torch.randint(5, 512, (int(torch.randint(4, 10, (1,), generator=g)),), generator=g).tolist()
            pair = {"chosen": json.loads(make_traj(g, f"q{i}", 0, prompt).to_json()),
                    "rejected": json.loads(make_traj(g, f"q{i}", 1, prompt).to_json())}
            f.write(json.dumps(pair) + "\n")
    return d


def obj(name, **kw):
    return get_objective(LossConfig(type=name, **kw))


def cfg_for(setup, **extra):
    over = [f"model.name_or_path={setup / 'init'}", "model.attn_impl=eager", "training.global_batch_size=4",
            "training.micro_batch_size=1", "training.warmup_steps=1", "optimizer.lr=0.001", "training.epochs=1",
            "rollout.max_length=64", "checkpoint.every=1", "checkpoint.keep=3",
            "training.activation_checkpointing=false", "model.dtype=float32"]
    over += [f"{k.replace('__', '.')}={v}" for k, v in extra.items()]
    return load_config(CONFIG, over)


def weights(out):
    return load_file(out / "final" / "model.safetensors")


def _worker(rank, port, cfg, data, out, resume, max_steps):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        train(cfg, data, out, resume=resume, max_steps=max_steps)
    finally:
        torch.distributed.destroy_process_group()


def run2(cfg, data, out, resume=False, max_steps=None):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, cfg, str(data), str(out), resume, max_steps), nprocs=2, join=True)


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single(setup):
    out = setup / "single"
    train(cfg_for(setup), setup / "pairs.jsonl", out)
    return out


def test_single_process_trains(single, setup):
    m = metrics(single)
    assert [x["step"] for x in m] == [1, 2, 3]  # 12 pairs / global batch 4, one epoch
    # Step 1 starts at the reference, so the loss is ln 2 exactly (policy == reference).
    assert m[0]["loss"] == pytest.approx(0.6931471805599453, abs=1e-6)
    assert m[-1]["rewards/margin"] != 0.0
    init, final = load_file(setup / "init" / "model.safetensors"), weights(single)
    assert any(not torch.equal(init[k], final[k]) for k in init)
    summary = json.loads((single / "summary.json").read_text())
    assert summary["examples"] == 12 and summary["dropped"] == {"empty_mask": 0, "too_long": 0}


def test_two_fsdp_processes_match_one(single, setup):
    out = setup / "two"
    run2(cfg_for(setup), setup / "pairs.jsonl", out)
    for a, b in zip(metrics(single), metrics(out)):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-5
    w1, w2 = weights(single), weights(out)
    assert w1.keys() == w2.keys()
    for k in w1:
        assert (w1[k] - w2[k]).abs().max().item() < 1e-5, k


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2", "tiny-qwen3"])
def test_other_families_train_the_same_on_one_and_two_ranks(setup, tmp_path, name):
    """The untied head (Llama), q/k/v biases (Qwen2) and Llama-style q/k norms (Qwen3) under FSDP2: one rank
    and two ranks take the same steps."""
    save_pretrained(build_model(ModelConfig.from_name(name), seed=0), tmp_path / "init")
    cfg = cfg_for(setup, model__name_or_path=tmp_path / "init")
    train(cfg, setup / "pairs.jsonl", tmp_path / "one")
    run2(cfg, setup / "pairs.jsonl", tmp_path / "two")
    m1, m2 = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert m1[0]["loss"] == pytest.approx(0.6931471805599453, abs=1e-6) and len(m1) == len(m2) == 3
    for a, b in zip(m1, m2):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-5
    w0, w1, w2 = load_file(tmp_path / "init" / "model.safetensors"), weights(tmp_path / "one"), weights(tmp_path / "two")
    assert w1.keys() == w2.keys() == w0.keys()
    moved = max((w1[k] - w0[k]).abs().max().item() for k in w0)
    assert moved > 1e-3  # 3 AdamW steps of lr 1e-3
    for k in w1:
        # the two ranks' gradients differ in fp32 summation order only; AdamW divides by sqrt(v), so an entry
        # with a tiny gradient moves that noise up: measured 1.8e-5 (tiny-qwen3's embedding), 1% of a step's move
        assert (w1[k] - w2[k]).abs().max().item() < 0.02 * moved, k


def test_kill_and_resume_is_identical(single, setup):
    out = setup / "resumed"
    cfg = cfg_for(setup)
    train(cfg, setup / "pairs.jsonl", out, max_steps=2)  # "killed" after step 2 (checkpoint at step 1 only)
    assert not (out / "final").exists()
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step_1"]
    train(cfg, setup / "pairs.jsonl", out, resume=True)
    w1, w2 = weights(single), weights(out)
    for k in w1:
        assert torch.equal(w1[k], w2[k]), k


def test_checkpoint_moves_between_world_sizes(single, setup):
    out = setup / "two_then_one"
    run2(cfg_for(setup), setup / "pairs.jsonl", out, max_steps=2)
    train(cfg_for(setup), setup / "pairs.jsonl", out, resume=True)  # written by 2 ranks, loaded by 1
    w1, w2 = weights(single), weights(out)
    for k in w1:
        assert (w1[k] - w2[k]).abs().max().item() < 1e-5, k
    out = setup / "one_then_two"
    train(cfg_for(setup), setup / "pairs.jsonl", out, max_steps=2)
    run2(cfg_for(setup), setup / "pairs.jsonl", out, resume=True)  # written by 1, loaded by 2
    w2 = weights(out)
    for k in w1:
        assert (w1[k] - w2[k]).abs().max().item() < 1e-5, k


def test_non_finite_loss_stops_and_keeps_checkpoint(setup):
    out = setup / "nan"
    out.mkdir()
    from mdpo.train import reference_key

    cfg = cfg_for(setup)
    ref = [[0.0, 0.0]] * 12
    ref[5] = [float("nan"), 0.0]  # a corrupt reference value reaches the loss of the batch holding pair 5
    key = reference_key(cfg, obj("mdpo"), setup / "pairs.jsonl", str(setup / "init"), torch.float32)
    (out / "reference.jsonl").write_text(json.dumps({"key": key}) + "\n" + "".join(json.dumps(r) + "\n" for r in ref))
    with pytest.raises(TrainError, match=r"non-finite loss .* at step \d; stopped before the update"):
        train(cfg, setup / "pairs.jsonl", out)
    for ck in (out / "checkpoints").glob("step_*"):
        assert not ck.name.endswith(".tmp")


def test_bad_data(setup, tmp_path):
    bad = tmp_path / "bad.jsonl"
    lines = (setup / "pairs.jsonl").read_text().splitlines()
    bad.write_text(lines[0] + "\n" + lines[1][:50] + "\n")
    with pytest.raises(TrainError, match=r"bad.jsonl:2: invalid JSON"):
        load_examples(bad, obj("mdpo"), "model", 64, 512)
    with pytest.raises(TrainError, match=r"pairs.jsonl:1: token id \d+ >= the model's vocabulary \(100\)"):
        load_examples(setup / "pairs.jsonl", obj("mdpo"), "model", 64, 100)
    ex, dropped = load_examples(setup / "pairs.jsonl", obj("mdpo"), "model", 20, 512)
    assert dropped["too_long"] == 12 - len(ex) and dropped["too_long"] > 0
    # A pair whose chosen side has no model tokens has nothing to train on.
    d = json.loads(lines[0])
    d["chosen"]["roles"] = "P" * len(d["chosen"]["tokens"])
    bad.write_text(json.dumps(d) + "\n")
    assert load_examples(bad, obj("mdpo"), "model", 64, 512)[1]["empty_mask"] == 1


def test_mkto_one_and_two_processes(setup):
    g = torch.Generator().manual_seed(1)
    data = setup / "kto.jsonl"
    with open(data, "w") as f:
        for i in range(8):
            prompt = [2] + torch.randint(5, 512, (5,), generator=g).tolist()
            t = make_traj(g, f"k{i}", 0, prompt)
            t.correct = i % 3 != 0
            f.write(t.to_json() + "\n")
    cfg = cfg_for(setup, loss__type="mkto", training__global_batch_size=4, loss__undesirable_weight=1.5)
    train(cfg, data, setup / "kto1")
    m1 = metrics(setup / "kto1")
    # Step 1: policy == reference, so every log-ratio and z0 are 0 and each loss is w * (1 - sigmoid(0)).
    labels = [i % 3 != 0 for i in range(8)]
    import random as _r
    first = _r.Random(42).sample(range(8), 8)[:4]
    expected = sum(0.5 * (1.0 if labels[i] else 1.5) for i in first) / 4
    assert m1[0]["loss"] == pytest.approx(expected, abs=1e-6) and m1[0]["kl"] == 0.0
    run2(cfg, data, setup / "kto2")
    for a, b in zip(m1, metrics(setup / "kto2")):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["kl"] - b["kl"]) < 1e-5
    w1, w2 = weights(setup / "kto1"), weights(setup / "kto2")
    for k in w1:
        # Gradient norms agree to ~1e-6 relative; Adam divides each entry by its own magnitude, so summation-
        # order noise in near-zero entries reaches the weights at up to a few % of one step (lr 1e-3).
        assert (w1[k] - w2[k]).abs().max().item() < 5e-5, k
    unlabeled = setup / "kto_unlabeled.jsonl"
    d = json.loads(data.read_text().splitlines()[0])
    d["correct"] = None
    unlabeled.write_text(json.dumps(d) + "\n")
    with pytest.raises(TrainError, match=r"kto_unlabeled.jsonl:1: loss.type mkto needs each trajectory's 'correct' label"):
        load_examples(unlabeled, obj("mkto"), "model", 64, 512)


def test_online_reference_equals_precomputed(single, setup):
    out = setup / "online"
    train(cfg_for(setup, reference__online="true", optimizer__grad_clip=0), setup / "pairs.jsonl", out)
    assert not (out / "reference.jsonl").exists()
    base = setup / "noclip"
    train(cfg_for(setup, optimizer__grad_clip=0), setup / "pairs.jsonl", base)
    for a, b in zip(metrics(base), metrics(out)):
        assert abs(a["loss"] - b["loss"]) < 1e-6 and abs(a["rewards/margin"] - b["rewards/margin"]) < 1e-6
    w1, w2 = weights(base), weights(out)
    for k in w1:
        assert (w1[k] - w2[k]).abs().max().item() < 1e-6, k
    # Clipping at 1.0 changed the update: the single run clipped (its grad norms are above 1).
    assert metrics(single)[0]["grad_norm"] > 1.0
    assert any(not torch.equal(weights(single)[k], w1[k]) for k in w1)


def test_activation_checkpointing_changes_nothing_but_memory(single, setup):
    out = setup / "ac"
    train(cfg_for(setup, training__activation_checkpointing="true"), setup / "pairs.jsonl", out)
    for a, b in zip(metrics(single), metrics(out)):
        assert abs(a["loss"] - b["loss"]) < 1e-6 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-6
    w1, w2 = weights(single), weights(out)
    for k in w1:
        assert (w1[k] - w2[k]).abs().max().item() < 1e-6, k


def test_separate_reference_model_and_exports(setup, tmp_path):
    """reference= computes the stored reference log-probs with another model (the fixed-reference ablation), and
    export_every writes loadable HF folders during training."""
    from mdpo.logprobs import sequence_logprobs
    from mdpo.train import batch_tensors

    other = build_model(ModelConfig.from_name("tiny-gemma3"), seed=1)
    save_pretrained(other, tmp_path / "ref")
    out = tmp_path / "out"
    train(cfg_for(setup, checkpoint__every=0), setup / "pairs.jsonl", out, reference=str(tmp_path / "ref"),
          export_every=1)
    stored = [json.loads(x) for x in (out / "reference.jsonl").read_text().splitlines()[1:]]
    examples, _ = load_examples(setup / "pairs.jsonl", obj("mdpo"), "model", 64, 512)
    ref = load_pretrained(tmp_path / "ref", attn_impl="eager").eval()
    with torch.no_grad():
        for ex, got in zip(examples, stored):
            tokens, mask = batch_tensors(ex.seqs, "model", "cpu")
            want = sequence_logprobs(ref, tokens, mask)[0]
            assert got == pytest.approx(want.tolist(), abs=1e-4)
    assert sorted(p.name for p in (out / "exports").iterdir()) == ["step_1", "step_2"]  # 12 pairs / 4: 3 steps
    assert load_pretrained(out / "exports" / "step_2").config == ref.config


def test_sft_loss_is_the_token_mean_over_the_global_batch(setup, tmp_path):
    """SFT: the step's loss is (sum of token NLLs) / (tokens in the global batch), checked by hand at step 1."""

    data = tmp_path / "sft.jsonl"
    rows = [json.loads(x)["chosen"] for x in (setup / "pairs.jsonl").read_text().splitlines()]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "sft"
    cfg = cfg_for(setup, loss__type="sft", checkpoint__every=0, training__micro_batch_size=2)
    train(cfg, data, out, max_steps=1)
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    import random as _random
    batch = _random.Random(cfg.training.seed).sample(range(len(rows)), len(rows))[:4]
    model = load_pretrained(setup / "init", attn_impl="eager").eval()
    nll = tokens = 0.0
    with torch.no_grad():
        for i in batch:
            t = Trajectory.from_json(json.dumps(rows[i]))
            logp = torch.log_softmax(model(torch.tensor([t.tokens]))[0, :-1].float(), -1)
            m = torch.tensor(t.loss_mask("model")[1:])
            nll -= logp.gather(1, torch.tensor(t.tokens[1:])[:, None])[:, 0][m].sum().item()
            tokens += m.sum().item()
    assert first["loss"] == pytest.approx(nll / tokens, rel=1e-4)


def test_cli_exit_codes(setup, tmp_path, capsys):
    from mdpo.train import main

    base = [CONFIG, "--out", str(tmp_path / "o"), f"model.name_or_path={setup / 'init'}"]
    assert main(base + ["--data", str(tmp_path / "none.jsonl")]) == 2  # overrides after options are read
    err = capsys.readouterr().err.strip()
    assert err == f"error: {tmp_path / 'none.jsonl'}: file not found"
    assert main(base + ["--data", str(setup / "pairs.jsonl"), "loss.beta=oops"]) == 2
    assert "loss.beta" in capsys.readouterr().err


def test_a_run_starts_with_its_memory_plan(setup, tmp_path, capsys):
    """mdpo.train says, before the weights load, the plan mdpo.plan makes of the same config on this machine."""
    from mdpo.plan import device_gb, plan

    cfg = cfg_for(setup, checkpoint__every=0)
    train(cfg, setup / "pairs.jsonl", tmp_path / "p", max_steps=1)
    printed = [line for line in capsys.readouterr().err.splitlines() if line.startswith("plan:")]
    want = plan(cfg, 1, device_gb(torch.device("cpu")), device_name="CPU", fused_optimizer=False).lines()
    assert printed == want and want[0].startswith("plan: gemma3 ") and "1 CPU x" in want[0]
    assert "fits in" in want[1]


def test_every_loss_metric_reaches_metrics_jsonl(setup, tmp_path):
    """nll_coef > 0: the chosen side's per-token NLL is logged; at step 1 (policy == reference) it is the mean over
    the batch of -reference(chosen) / chosen tokens, from the stored reference log-probs."""
    import random as _random

    out = tmp_path / "nll"
    cfg = cfg_for(setup, loss__nll_coef=0.5, checkpoint__every=0, metrics__log_every=2)
    train(cfg, setup / "pairs.jsonl", out)
    m = metrics(out)
    assert [x["step"] for x in m] == [2, 3]  # every 2nd step and the last
    assert {"nll", "rewards/margin", "rewards/accuracy", "logps/chosen"} <= set(m[0])
    out1 = tmp_path / "nll1"
    train(cfg_for(setup, loss__nll_coef=0.5, checkpoint__every=0), setup / "pairs.jsonl", out1, max_steps=1)
    first = metrics(out1)[0]
    ref = [json.loads(x) for x in (out1 / "reference.jsonl").read_text().splitlines()[1:]]
    examples, _ = load_examples(setup / "pairs.jsonl", obj("mdpo"), "model", 64, 512)
    batch = _random.Random(cfg.training.seed).sample(range(12), 12)[:4]
    want = sum(-ref[i][0] / sum(examples[i].seqs[0].loss_mask("model")[1:]) for i in batch) / 4
    assert first["nll"] == pytest.approx(want, rel=1e-5)


def test_stored_reference_is_keyed(setup, tmp_path, capsys):
    """A reference.jsonl is reused only under the same data, reference model, mask, dtype and objective."""
    from mdpo.train import reference_key, reference_logprobs

    cfg = cfg_for(setup)
    o = obj("mdpo")
    model = load_pretrained(setup / "init", attn_impl="eager")
    cache = tmp_path / "reference.jsonl"

    def run(key, mask="model"):
        examples, _ = load_examples(setup / "pairs.jsonl", o, mask, 64, 512)
        groups = [list(range(s, min(s + 2, len(examples)))) for s in range(0, len(examples), 2)]
        reference_logprobs(model, o, examples, mask, groups, cache, key, "cpu")
        return [ex.ref for ex in examples]

    key = reference_key(cfg, o, setup / "pairs.jsonl", str(setup / "init"), torch.float32)
    fresh = run(key)
    lines = cache.read_text().splitlines()
    assert json.loads(lines[0]) == {"key": key} and len(lines) == 13
    # Same key: the stored values are used (marked so that reuse is visible).
    cache.write_text(lines[0] + "\n" + "".join(json.dumps([1.0, 2.0]) + "\n" for _ in range(12)))
    assert run(key) == [[1.0, 2.0]] * 12
    capsys.readouterr()
    # Another mask: recomputed, and said so.
    paper = dict(key, mask="paper")
    got = run(paper, mask="paper")
    assert got != [[1.0, 2.0]] * 12 and got != fresh
    assert "stale reference log-probs (its mask differ); recomputing" in capsys.readouterr().err
    # A file without a key (as older versions wrote it) with the right row count is recomputed too.
    cache.write_text("".join(json.dumps([1.0, 2.0]) + "\n" for _ in range(12)))
    assert [v for r in run(key) for v in r] == pytest.approx([v for r in fresh for v in r])
    assert "it has no key" in capsys.readouterr().err
    # The key changes with the data, the reference model's weights, the dtype and the objective's weights.
    other = tmp_path / "pairs.jsonl"
    other.write_text("".join((setup / "pairs.jsonl").read_text().splitlines(keepends=True)[:11]))
    assert reference_key(cfg, o, other, str(setup / "init"), torch.float32)["data_sha256"] != key["data_sha256"]
    assert reference_key(cfg, o, setup / "pairs.jsonl", str(setup / "init"), torch.bfloat16)["dtype"] == "bfloat16"
    k2 = reference_key(cfg, obj("mdpo_discount", turn_discount=0.5), setup / "pairs.jsonl", str(setup / "init"),
                       torch.float32)
    assert k2["objective"] == "mdpo_discount" and k2["turn_discount"] == 0.5
    save_pretrained(model, tmp_path / "copy")
    assert reference_key(cfg, o, setup / "pairs.jsonl", str(tmp_path / "copy"), torch.float32)["reference"] != \
        key["reference"]


def test_mkto_reference_point_equals_a_naive_recomputation(setup, tmp_path):
    """z0 at step 2 is the clamped mean over that global batch of log pi_1(KL seq) - log ref(KL seq), where the
    KL sequence is the example's prompt followed by another prompt's completion; recomputed here with full
    log-softmax sums from the exported step-1 weights and the starting model."""
    import random as _random


    g = torch.Generator().manual_seed(3)
    data = tmp_path / "kto.jsonl"
    with open(data, "w") as f:
        for i in range(8):
            t = make_traj(g, f"k{i // 2}", i % 2, [2] + torch.randint(5, 512, (5,), generator=g).tolist())
            t.correct = i % 2 == 0
            f.write(t.to_json() + "\n")
    out = tmp_path / "kto"
    cfg = cfg_for(setup, loss__type="mkto", checkpoint__every=0, optimizer__lr=0.01)
    train(cfg, data, out, max_steps=2, export_every=1)
    z0 = metrics(out)[1]["kl"]
    examples, _ = load_examples(data, obj("mkto"), "model", 64, 512)
    for ex in examples:  # partners are another prompt's completion
        assert ex.seqs[1].meta["kl_partner"] != ex.seqs[0].prompt_id

    def naive(model, t):
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([t.tokens]))[0, :-1].float(), -1)
        lp = logp.gather(1, torch.tensor(t.tokens[1:])[:, None])[:, 0]
        return lp[torch.tensor(t.loss_mask("model")[1:])].sum().item()

    pi1 = load_pretrained(out / "exports" / "step_1", attn_impl="eager").eval()
    ref = load_pretrained(setup / "init", attn_impl="eager").eval()
    batch = _random.Random(cfg.training.seed).sample(range(8), 8)[4:8]
    ratios = [naive(pi1, examples[i].seqs[1]) - naive(ref, examples[i].seqs[1]) for i in batch]
    assert any(abs(r) > 1e-3 for r in ratios)  # the policy moved, so z0 is informative
    assert z0 == pytest.approx(max(0.0, sum(ratios) / 4), abs=1e-4)


def test_bf16_reference_is_the_training_forward(setup, tmp_path):
    """model.dtype bfloat16 on the CPU: the weights train in fp32 under FSDP2 mixed precision (also in one process),
    and the stored reference log-probs come from that same forward in step 1's micro-batches (2 examples each, so
    rows are padded): at step 1 every log-ratio is exactly 0, in 1 process and in 2. The online reference gives the
    same run bit for bit. The export is bf16, and transformers' logits on it equal ours."""
    import math

    import transformers

    from mdpo.logprobs import sequence_logprobs

    cfg = cfg_for(setup, model__dtype="bfloat16", training__micro_batch_size=2, checkpoint__every=0,
                  optimizer__grad_clip=0)
    one, two, online = tmp_path / "one", tmp_path / "two", tmp_path / "online"
    train(cfg, setup / "pairs.jsonl", one)
    run2(cfg, setup / "pairs.jsonl", two)
    for out in (one, two):
        first = metrics(out)[0]
        assert first["rewards/chosen"] == 0.0 and first["rewards/rejected"] == 0.0, first
        assert first["loss"] == pytest.approx(math.log(2), abs=1e-7)
    # The same numbers without mixed precision are not exactly 0: the fp32 forward differs from the bf16 one.
    ref = [json.loads(x) for x in (one / "reference.jsonl").read_text().splitlines()[1:]]
    model = load_pretrained(setup / "init", attn_impl="eager")
    examples, _ = load_examples(setup / "pairs.jsonl", obj("mdpo"), "model", 64, 512)
    from mdpo.train import batch_tensors
    tokens, mask = batch_tensors(examples[0].seqs, "model", "cpu")
    with torch.no_grad():
        fp32 = sequence_logprobs(model, tokens, mask)[0].tolist()
    assert fp32 != pytest.approx(ref[0], abs=1e-4) and fp32 == pytest.approx(ref[0], abs=0.5)

    train(cfg_for(setup, model__dtype="bfloat16", training__micro_batch_size=2, checkpoint__every=0,
                  optimizer__grad_clip=0, reference__online="true"), setup / "pairs.jsonl", online)
    assert metrics(online) == [dict(m, step_time_s=o["step_time_s"], tokens_per_s=o["tokens_per_s"],
                                    peak_mem_gb=o["peak_mem_gb"]) for m, o in zip(metrics(one), metrics(online))]
    w1, w2 = weights(one), weights(online)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)

    assert {t.dtype for t in w1.values()} == {torch.bfloat16}
    assert json.loads((one / "final" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    ours = load_pretrained(one / "final", dtype=None, attn_impl="eager").eval()
    assert ours.embed_tokens.weight.dtype == torch.bfloat16
    hf = transformers.AutoModelForCausalLM.from_pretrained(one / "final", attn_implementation="eager").eval()
    assert hf.dtype == torch.bfloat16
    x = torch.tensor([examples[1].seqs[0].tokens])
    with torch.no_grad():
        assert torch.equal(ours(x), hf(x, use_cache=False).logits)


def test_reference_groups_are_step_ones_micro_batches_and_equal_in_number(setup, monkeypatch):
    """first_epoch_groups: each rank's groups are the micro-batches the first epoch runs on it, then its share of
    the leftover examples; every rank runs as many forwards (FSDP's all-gathers pair up), and together they
    cover every example."""
    import random as _r

    import mdpo.train as tr

    cfg = cfg_for(setup, training__global_batch_size=4, training__micro_batch_size=2)
    n = 11  # two global batches of 4, then 3 left over
    order = _r.Random(cfg.training.seed).sample(range(n), n)
    per_rank = {}
    for rank in range(2):
        monkeypatch.setattr(tr, "world", lambda rank=rank: (rank, 2))
        per_rank[rank] = tr.first_epoch_groups(cfg, n)
    assert per_rank[0][:2] == [order[0:4][0::2], order[4:8][0::2]]  # rank 0's micro-batch of each step
    assert per_rank[1][:2] == [order[0:4][1::2], order[4:8][1::2]]
    assert per_rank[0][2] == [order[8], order[10]] and per_rank[1][2] == [order[9]]
    assert len(per_rank[0]) == len(per_rank[1]) == 3
    assert sorted({i for g in per_rank[0] + per_rank[1] for i in g}) == list(range(n))
    cfg1 = cfg_for(setup, training__global_batch_size=4, training__micro_batch_size=1)
    monkeypatch.setattr(tr, "world", lambda: (1, 2))
    g1 = tr.first_epoch_groups(cfg1, n)  # rank 1 has 1 leftover, rank 0 has 2: rank 1 repeats its last group
    assert g1[-2:] == [[order[9]], [order[9]]] and len(g1) == 6
