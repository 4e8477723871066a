"""Objectives: option checks, IPO averaging, SimPO and turn-weighted M-DPO against hand-derived values, M-KTO's
KL partners, and the trainer's weighted log-probs against a naive full-softmax sum."""

import math

import pytest
import torch

from mdpo.config import LossConfig
from mdpo.logprobs import sequence_logprobs
from mdpo.model import ModelConfig, build_model
from mdpo.objectives import OBJECTIVES, Batch, Example, ObjectiveError, get_objective
from mdpo.train import batch_tensors
from mdpo.trajectory import Role, Trajectory

P, M, T, S = int(Role.PROMPT), int(Role.MODEL), int(Role.TOOL), int(Role.TEMPLATE)


def obj(name, **kw):
    return get_objective(LossConfig(type=name, **kw))


def f64(*v):
    return torch.tensor(v, dtype=torch.float64)


def test_ignored_options_are_config_errors():
    with pytest.raises(ObjectiveError, match=r"loss.label_smoothing: only the sigmoid DPO loss smooths labels, not "
                                          r"dpo_variant 'ipo'"):
        obj("mdpo", dpo_variant="ipo", label_smoothing=0.1)
    with pytest.raises(ObjectiveError, match=r"not dpo_variant 'hinge'"):
        obj("mdpo", dpo_variant="hinge", label_smoothing=0.1)
    with pytest.raises(ObjectiveError, match=r"loss.nll_coef: not used by loss.type 'mkto'"):
        obj("mkto", nll_coef=0.5)
    with pytest.raises(ObjectiveError, match=r"loss.desirable_weight: not used by loss.type 'mdpo'"):
        obj("mdpo", desirable_weight=2.0)
    with pytest.raises(ObjectiveError, match=r"loss.turn_discount: not used by loss.type 'simpo'"):
        obj("simpo", turn_discount=0.5)
    with pytest.raises(ObjectiveError, match=r"loss.beta: not used by loss.type 'sft'"):
        obj("sft", beta=0.5)
    with pytest.raises(ObjectiveError, match=r"loss.type: must be one of 'mdpo', 'mdpo_discount', 'turn_dpo', 'simpo', 'mkto'"):
        obj("dpo")
    # Options an objective reads are accepted.
    obj("mdpo", label_smoothing=0.1, nll_coef=1.0)
    obj("mdpo_discount", turn_discount=0.5)
    assert set(OBJECTIVES) == {"mdpo", "mdpo_discount", "turn_dpo", "simpo", "mkto", "sft", "raft", "grpo", "drgrpo", "rloo"}


def test_ipo_averages_log_probs_per_token_by_default():
    # chosen: policy -10, reference -12 over 5 tokens; rejected: policy -20, reference -18 over 10 tokens.
    b = Batch(f64(-10.0, -20.0), f64(-12.0, -18.0), torch.tensor([5, 10]), [])
    losses, _ = obj("mdpo", dpo_variant="ipo").loss(b)
    # Averages: h = (-2 + 2.4) - (-2 + 1.8) = 0.6; target 1 / (2 beta) = 5.
    assert losses.item() == pytest.approx((0.6 - 5) ** 2)
    losses, _ = obj("mdpo", dpo_variant="ipo", average_logps=False).loss(b)
    assert losses.item() == pytest.approx((4.0 - 5) ** 2)  # sums: h = 2 + 2
    losses, _ = obj("mdpo").loss(b)  # sigmoid M-DPO stays on sums (the paper)
    assert losses.item() == pytest.approx(math.log1p(math.exp(-0.1 * 4.0)))
    losses, _ = obj("mdpo", average_logps=True).loss(b)
    assert losses.item() == pytest.approx(math.log1p(math.exp(-0.1 * 0.6)))
    # + NLL on averaged log-probs: the chosen side's per-token NLL, 10 / 5.
    losses, m = obj("mdpo", dpo_variant="ipo", nll_coef=0.5).loss(b)
    assert losses.item() == pytest.approx((0.6 - 5) ** 2 + 0.5 * 2.0) and m["nll"].item() == pytest.approx(2.0)


def test_simpo_is_reference_free_and_length_normalised():
    o = obj("simpo", beta=2.0, simpo_gamma=1.0)
    assert not o.reference
    b = Batch(f64(-10.0, -20.0).requires_grad_(), None, torch.tensor([5, 10]), [])
    losses, m = o.loss(b)
    # beta * (-10 / 5) - beta * (-20 / 10) - gamma = -1: loss = log(1 + e^1).
    assert losses.item() == pytest.approx(math.log1p(math.e))
    assert m["rewards/margin"].item() == pytest.approx(0.0)
    losses.sum().backward()
    s = 1 / (1 + math.exp(1.0))  # sigmoid(-1)
    # d loss / d pi_c = -(1 - sigmoid(-1)) * beta / 5; d / d pi_r = +(1 - sigmoid(-1)) * beta / 10.
    assert b.policy.grad.tolist() == pytest.approx([-(1 - s) * 2 / 5, (1 - s) * 2 / 10])


def traj(pid, sid, parts, g):
    """prompt, then (role, turn, n) runs of random tokens."""
    tokens, roles, turns = [2, 7, 8], [P] * 3, [0] * 3
    for role, turn, n in parts:
        tokens += torch.randint(5, 200, (n,), generator=g).tolist()
        roles += [role] * n
        turns += [turn] * n
    return Trajectory(pid, sid, tokens, roles, turns)


def test_turn_weights_follow_the_token_turns():
    g = torch.Generator().manual_seed(0)
    # Three model turns (the third ends the trajectory), two tool turns and their templates.
    t = traj("a", 0, [(M, 1, 4), (S, 1, 2), (T, 1, 3), (S, 1, 2), (M, 2, 2), (S, 2, 2), (T, 2, 2), (S, 2, 2),
                      (M, 3, 3)], g)
    o = obj("mdpo_discount", turn_discount=0.5)
    w = o.token_weights(t, t.loss_mask("model"))
    want = [0.0] * 3 + [0.25] * 4 + [0.0] * 7 + [0.5] * 2 + [0.0] * 6 + [1.0] * 3
    assert w == want
    # Under the paper's mask the templates count too, each with its turn's weight.
    wp = o.token_weights(t, t.loss_mask("paper"))
    assert wp[7:9] == [0.25, 0.25] and wp[9:12] == [0.0] * 3
    assert obj("mdpo").token_weights(t, t.loss_mask("model")) is None
    assert obj("mdpo_discount").token_weights(t, t.loss_mask("model")) == [float(x) for x in t.loss_mask("model")]


def test_turn_weighted_sums_equal_a_naive_sum():
    g = torch.Generator().manual_seed(1)
    model = build_model(ModelConfig.from_name("tiny-gemma2"), seed=0).eval()
    seqs = [traj("a", 0, [(M, 1, 4), (S, 1, 2), (T, 1, 3), (S, 1, 2), (M, 2, 5)], g),
            traj("a", 1, [(M, 1, 6), (S, 1, 2), (T, 1, 2), (S, 1, 2), (M, 2, 2), (S, 2, 2), (T, 2, 1), (S, 2, 2),
                          (M, 3, 3)], g)]
    o = obj("mdpo_discount", turn_discount=0.7)
    tokens, w = batch_tensors(seqs, "model", "cpu", o)
    with torch.no_grad():
        sums, counts = sequence_logprobs(model, tokens, w)
        for i, t in enumerate(seqs):
            logp = torch.log_softmax(model(torch.tensor([t.tokens]))[0, :-1].float(), -1)
            lp = logp.gather(1, torch.tensor(t.tokens[1:])[:, None])[:, 0]
            K = max(k for k, r in zip(t.turns, t.roles) if r == M)
            naive = sum(0.7 ** (K - t.turns[j]) * lp[j - 1].item() for j in range(1, len(t.tokens)) if t.roles[j] == M)
            assert sums[i].item() == pytest.approx(naive, rel=1e-5)
            assert counts[i].item() == sum(r == M for r in t.roles[1:])
    # turn_discount 1: the plain M-DPO sums.
    tokens, m = batch_tensors(seqs, "model", "cpu", obj("mdpo_discount"))
    tokens2, m2 = batch_tensors(seqs, "model", "cpu", obj("mdpo"))
    with torch.no_grad():
        assert torch.equal(sequence_logprobs(model, tokens, m)[0], sequence_logprobs(model, tokens2, m2)[0])


def test_kto_kl_partner_is_another_prompts_completion():
    g = torch.Generator().manual_seed(2)
    # File order a, a, b, b, c: the old (i + 1) partner of the first "a" was the other "a".
    seqs = [traj(p, i, [(M, 1, 3 + i), (S, 1, 2), (T, 1, 2), (S, 1, 2), (M, 2, 2)], g)
            for i, p in enumerate("aabbc")]
    examples = [Example([t]) for t in seqs]
    obj("mkto").prepare(examples)
    partners = [ex.seqs[1].meta["kl_partner"] for ex in examples]
    assert partners == ["b", "b", "c", "c", "a"]
    for ex, j in zip(examples, [2, 2, 4, 4, 0]):
        a, b, kl = ex.seqs[0], seqs[j], ex.seqs[1]
        n = a.prompt_len
        assert kl.prompt_id == a.prompt_id and kl.tokens[:n] == a.tokens[:n]
        assert kl.tokens[n:] == b.tokens[b.prompt_len:] and kl.roles[n:] == b.roles[b.prompt_len:]
        assert kl.turns[n:] == b.turns[b.prompt_len:]
    with pytest.raises(ObjectiveError, match="at least two prompts"):
        obj("mkto").prepare([Example([seqs[0]]), Example([seqs[1]])])
