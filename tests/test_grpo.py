"""GRPO / Dr. GRPO / RLOO against hand-derived numbers: advantages of a known group, the clipped objective's value
and gradient at ratio 1 and outside the clip, the k3 KL, all-equal groups skipped, tool tokens out of the loss,
and the trainer's token path against a naive full-logits computation."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mdpo.config import LossConfig, load_config
from mdpo.losses import clipped_policy_loss, group_advantages
from mdpo.model import ModelConfig, build_model
from mdpo.objectives import GRPO, get_objective
from mdpo.train import Step, TrainError, batch_tensors, load_examples, train
from mdpo.trajectory import Role, Trajectory, write_trajectories
from mdpo.weights import save_pretrained

P, M, T, S = int(Role.PROMPT), int(Role.MODEL), int(Role.TOOL), int(Role.TEMPLATE)


def test_advantages_of_a_known_group():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0])
    # mean 1/2; Bessel std sqrt((4 x 1/4) / 3) = 1/sqrt(3)
    want = 0.5 / (1 / math.sqrt(3) + 1e-4)
    assert group_advantages(r, "grpo").tolist() == pytest.approx([want, -want, -want, want], abs=1e-6)
    assert group_advantages(r, "drgrpo").tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5], abs=1e-7)
    # leave-one-out: sample 0's baseline is the mean of (0, 0, 1) = 1/3, so 1 - 1/3 = 2/3; sample 1's: 2/3 -> -2/3
    assert group_advantages(r, "rloo").tolist() == pytest.approx([2 / 3, -2 / 3, -2 / 3, 2 / 3], abs=1e-6)
    r3 = torch.tensor([1.0, 0.0, 0.0])  # 1 of 3: LOO baselines 0, 1/2, 1/2
    assert group_advantages(r3, "rloo").tolist() == pytest.approx([1.0, -0.5, -0.5], abs=1e-6)
    for kind in ("grpo", "drgrpo", "rloo"):
        assert group_advantages(torch.ones(5), kind).abs().max() == 0  # all equal: no signal


def test_clipped_objective_value_and_gradient():
    # Three tokens: ratio 1 (A = 2), ratio 1.5 with A = +1 (clipped at 1.2: no gradient), ratio 1.5 with A = -1
    # (not clipped: the pessimistic bound is the unclipped one), ratio 0.5 with A = -1 (clipped at 0.8).
    old = torch.log(torch.tensor([0.3, 0.2, 0.2, 0.4]))
    logp = (old + torch.log(torch.tensor([1.0, 1.5, 1.5, 0.5]))).requires_grad_(True)
    adv = torch.tensor([2.0, 1.0, -1.0, -1.0])
    losses, st = clipped_policy_loss(logp, old, adv, 0.2, 0.2)
    assert losses.tolist() == pytest.approx([-2.0, -1.2, 1.5, 0.8], abs=1e-6)
    losses.sum().backward()
    # d/dlogp of -ratio A is -ratio A; a clipped token's loss is constant.
    assert logp.grad.tolist() == pytest.approx([-2.0, 0.0, 1.5, 0.0], abs=1e-6)
    assert st["clipped"].tolist() == [False, True, False, True]
    # clip-higher: [1 - 0.2, 1 + 0.6] leaves ratio 1.5 inside the range
    losses, st = clipped_policy_loss(logp.detach(), old, adv, 0.2, 0.6)
    assert losses[1].item() == pytest.approx(-1.5) and not st["clipped"][1]


def test_k3_kl_value_and_gradient():
    logp = torch.log(torch.tensor([0.5])).requires_grad_(True)
    ref = torch.log(torch.tensor([0.25]))
    losses, st = clipped_policy_loss(logp, logp.detach(), torch.zeros(1), 0.2, 0.2, ref, kl_coef=0.1)
    k3 = 0.5 - math.log(0.5) - 1  # exp(d) - d - 1 with d = log(0.25 / 0.5)
    assert st["kl"].item() == pytest.approx(k3, abs=1e-7)
    assert losses.item() == pytest.approx(0.1 * k3, abs=1e-7)
    losses.backward()
    # d k3 / d logp = -exp(d) + 1 = 1 - ref / p = 1/2
    assert logp.grad.item() == pytest.approx(0.1 * 0.5, abs=1e-7)


def traj(pid, sid, correct, n_model=3, lp=-1.0):
    tokens = [2, 7, 8, 9, 10, 11, 12, 13, 14, 15][: 3 + n_model + 3]
    roles = [P] * 3 + [M] * n_model + [T] * 3
    return Trajectory(pid, sid, tokens, roles, [0] * 3 + [1] * n_model + [1] * 3, logprobs=[lp] * len(tokens),
                      correct=correct)


def test_all_equal_groups_are_skipped_and_counted():
    obj = get_objective(LossConfig(type="grpo"))
    kept = [traj("a", i, c) for i, c in enumerate([True, True, True])] + \
           [traj("b", i, c) for i, c in enumerate([False, False])] + \
           [traj("c", i, c) for i, c in enumerate([True, False, False, True])] + [traj("d", 0, True)]
    rows = obj.build(kept, seed=0)
    assert sorted((t.prompt_id, t.sample_id) for t in rows) == [("c", 0), ("c", 1), ("c", 2), ("c", 3)]
    info = obj.build_info()
    assert (info["groups"], info["groups_trained"], info["groups_all_equal"], info["groups_of_one"]) == (4, 1, 2, 1)
    a = 0.5 / (1 / math.sqrt(3) + 1e-4)
    assert {t.sample_id: round(t.meta["advantage"], 5) for t in rows} == {0: round(a, 5), 1: round(-a, 5),
                                                                          2: round(-a, 5), 3: round(a, 5)}
    assert info["mean_reward"] == pytest.approx(6 / 10)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("grpo")
    model = build_model(ModelConfig.from_name("tiny-gemma3"), seed=0)
    save_pretrained(model, d / "init")
    return d, model


def scored(g, pid, sid, adv, model=None):
    """prompt | model | tool | template | model, with recorded log-probs (the model's own when given)."""
    n = [4, int(torch.randint(3, 7, (1,), generator=g)), 2, 3, int(torch.randint(2, 5, (1,), generator=g)), 2]
    roles = [P] * n[0] + [M] * n[1] + [S] * n[2] + [T] * n[3] + [S] * n[4] + [M] * n[5]
    turns = [0] * n[0] + [1] * (n[1] + n[2] + n[3]) + [2] * (n[4] + n[5])
    tokens = [2] + torch.randint(5, 512, (len(roles) - 1,), generator=g).tolist()
    lp = [0.0] * len(tokens)
    if model is not None:
        with torch.no_grad():
            full = torch.log_softmax(model(torch.tensor([tokens]))[0].float(), -1)
        lp = [0.0] + [full[i - 1, tokens[i]].item() for i in range(1, len(tokens))]
    return Trajectory(pid, sid, tokens, roles, turns, logprobs=lp, correct=adv > 0,
                      meta={"advantage": adv, "reward": float(adv > 0)})


@pytest.mark.parametrize("norm", ["sequence", "token"])
def test_token_path_equals_a_naive_full_logits_loss_and_ignores_tool_tokens(tiny, norm):
    """At ratio 1 the GRPO loss of a sequence is -A (per-sequence mean) or -A per token (token mean); its gradient
    equals that of the naive -A sum(logp over MODEL tokens) / normaliser, with no term for tool tokens."""
    d, model = tiny
    g = torch.Generator().manual_seed(1)
    seqs = [scored(g, f"q{i}", i, a, model) for i, a in enumerate([1.5, -0.5, 0.7])]
    cfg = load_config(_cfg_path(), ["loss.type=grpo", f"loss.token_norm={norm}", "model.dtype=float32"])
    obj = get_objective(cfg.loss)
    step = Step(cfg, obj, model, None, torch.device("cpu"))
    exs = [_example(t) for t in seqs]
    policy, _, counts, _, tok = step.logprobs(exs)
    from mdpo.objectives import Batch
    losses, metrics = obj.loss(Batch(policy, None, counts, exs, {}, tok))
    assert tok.policy.numel() == sum(sum(r == M for r in t.roles[1:]) for t in seqs)  # MODEL tokens only
    # The recorded log-probs are this model's: the ratio is 1 to fp32 rounding.
    assert float((tok.policy.detach() - tok.old).abs().max()) < 1e-5
    assert metrics["clip_fraction"][0].item() == 0
    norm_value = obj.normaliser(exs)
    loss = losses.sum() / norm_value
    model.zero_grad()
    loss.backward()
    ours = [p.grad.clone() for p in model.parameters()]
    # Naive: full log-softmax, MODEL-role targets only, -A times their sum, per-sequence or per-token normalised.
    model.zero_grad()
    naive = 0.0
    for t, ex in zip(seqs, exs):
        logits = model(torch.tensor([t.tokens]))[0].float()
        lp = torch.log_softmax(logits, -1)[:-1].gather(1, torch.tensor(t.tokens[1:])[:, None])[:, 0]
        m = torch.tensor([r == M for r in t.roles[1:]])
        s = -t.meta["advantage"] * lp[m].sum()
        naive = naive + (s / m.sum() if norm == "sequence" else s)
    naive = naive / norm_value  # the same gradient as the surrogate at ratio 1 (d ratio / d logp = ratio = 1)
    naive.backward()
    for a, b in zip(ours, [p.grad for p in model.parameters()]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # The surrogate's value at ratio 1: -A per token, averaged per sequence or over the batch's tokens.
    n = [sum(r == M for r in t.roles[1:]) for t in seqs]
    a = [t.meta["advantage"] for t in seqs]
    want = -sum(a) / 3 if norm == "sequence" else -sum(x * k for x, k in zip(a, n)) / sum(n)
    assert loss.item() == pytest.approx(want, abs=1e-5)


def _cfg_path():
    from pathlib import Path
    return Path(__file__).resolve().parent.parent / "experiments" / "demo.yaml"


def _example(t):
    from mdpo.objectives import Example
    return Example([t], tokens=sum(t.loss_mask("model")[1:]))


def test_drgrpo_sums_tokens_and_refuses_token_norm():
    obj = get_objective(LossConfig(type="drgrpo"))
    assert obj.token_norm == "none" and obj.advantage == "drgrpo"
    with pytest.raises(Exception, match="loss.token_norm: not used by loss.type 'drgrpo'"):
        get_objective(LossConfig(type="drgrpo", token_norm="token"))
    with pytest.raises(Exception, match="kl_coef"):
        load_config(_cfg_path(), ["loss.type=grpo", "loss.kl_coef=0.05"])  # needs reference.online
    cfg = load_config(_cfg_path(), ["loss.type=grpo", "loss.kl_coef=0.05", "reference.online=true"])
    assert get_objective(cfg.loss).reference


def test_training_a_scored_file_moves_the_policy_toward_positive_advantages(tiny, tmp_path):
    """End to end through mdpo.train: metrics carry reward, ratio (1 at the first step), clip fraction, the advantage
    and the first step's rollout/training mismatch; training raises the positive-advantage sequences' log-probs."""
    d, model = tiny
    g = torch.Generator().manual_seed(2)
    seqs = [scored(g, f"q{i // 2}", i % 2, 1.0 if i % 2 == 0 else -1.0, model) for i in range(8)]
    for t in seqs:
        t.model = str(d / "init")  # sampled by the model being trained: the first step checks the mismatch
    write_trajectories(tmp_path / "scored.jsonl", seqs)
    cfg = load_config(_cfg_path(), ["loss.type=grpo", f"model.name_or_path={d / 'init'}", "training.global_batch_size=8",
                                    "training.micro_batch_size=4", "training.epochs=2", "optimizer.lr=1e-2",
                                    "training.warmup_steps=0", "checkpoint.every=0", "metrics.log_every=1"])
    train(cfg, str(tmp_path / "scored.jsonl"), tmp_path / "out")
    m = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert m[0]["ratio/mean"] == pytest.approx(1.0, abs=1e-5) and m[0]["ratio/max"] == pytest.approx(1.0, abs=1e-5)
    assert m[0]["reward"] == 0.5 and m[0]["advantage/mean"] == 0.0 and m[0]["clip_fraction"] == 0.0
    assert m[0]["mismatch/mean_abs"] < 1e-5 and "mismatch/mean_abs" not in m[1]
    from mdpo.weights import load_pretrained
    after = load_pretrained(tmp_path / "out" / "final")
    ex, _ = load_examples(tmp_path / "scored.jsonl", GRPO(LossConfig(type="grpo")), "model", 512, None)

    def seq_lp(mdl):
        tokens, lm = batch_tensors([e.seqs[0] for e in ex], "model", "cpu")
        from mdpo.logprobs import sequence_logprobs
        with torch.no_grad():
            return sequence_logprobs(mdl, tokens, lm)[0]
    delta = seq_lp(after) - seq_lp(model)
    adv = torch.tensor([e.seqs[0].meta["advantage"] for e in ex])
    # The surrogate's direction: positive-advantage sequences gain log-prob against negative ones.
    assert (delta * adv).sum() > 0 and delta[adv > 0].mean() > delta[adv < 0].mean() + 1.0


def test_a_mismatched_rollout_is_refused_at_the_first_step(tiny, tmp_path):
    d, model = tiny
    g = torch.Generator().manual_seed(3)
    seqs = [scored(g, f"q{i // 2}", i % 2, 1.0 if i % 2 == 0 else -1.0, model) for i in range(4)]
    for t in seqs:
        t.model = str(d / "init")
        t.logprobs = [x - 0.01 if r == M else x for x, r in zip(t.logprobs, t.roles)]  # another model's numbers
    write_trajectories(tmp_path / "bad.jsonl", seqs)
    cfg = load_config(_cfg_path(), ["loss.type=grpo", f"model.name_or_path={d / 'init'}", "training.global_batch_size=4",
                                    "training.micro_batch_size=4", "checkpoint.every=0"])
    with pytest.raises(TrainError, match=r"differ from this model's forward by 0.01 per token .*limit 1e-05 in "
                                         r"float32"):
        train(cfg, str(tmp_path / "bad.jsonl"), tmp_path / "out")
    for t in seqs:
        t.model = "another/model"  # not this model's samples: nothing to compare, training goes on
    write_trajectories(tmp_path / "other.jsonl", seqs)
    train(cfg, str(tmp_path / "other.jsonl"), tmp_path / "out2")


def test_the_next_rollout_samples_the_trained_model_in_memory(tiny, tmp_path):
    """One process trains, then samples: the sampler gets the trained model object (no reload) exactly when the
    folder holds the files it was exported as (a copy, as the pipeline's policy folder, matches; rewritten files do
    not), and it equals the weights read back from disk (the pipeline test checks the rollout uses it)."""
    import shutil

    from mdpo import weights
    d, model = tiny
    g = torch.Generator().manual_seed(5)
    seqs = [scored(g, f"q{i // 2}", i % 2, 1.0 if i % 2 == 0 else -1.0, model) for i in range(4)]
    write_trajectories(tmp_path / "s.jsonl", seqs)
    cfg = load_config(_cfg_path(), ["loss.type=grpo", f"model.name_or_path={d / 'init'}", "training.global_batch_size=4",
                                    "training.micro_batch_size=4", "checkpoint.every=0", "optimizer.lr=1e-2"])
    train(cfg, str(tmp_path / "s.jsonl"), tmp_path / "out")
    final = tmp_path / "out" / "final"
    kept = weights.resident_model(final, torch.float32, "cpu")
    assert kept is not None and not kept.training
    disk = weights.load_pretrained(final)
    for (k, a), b in zip(kept.state_dict().items(), disk.state_dict().values()):
        assert torch.equal(a, b), k
    shutil.copytree(final, tmp_path / "policy")  # what the pipeline's selection stage does
    assert weights.resident_model(tmp_path / "policy", torch.float32, "cpu") is kept
    assert weights.resident_model(final, torch.bfloat16, "cpu") is None  # another dtype: read from disk
    (final / "config.json").write_text((final / "config.json").read_text() + " ")
    assert weights.resident_model(final, torch.float32, "cpu") is None  # the files changed
