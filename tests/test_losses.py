"""Losses against hand-derived numbers, finite differences, and TRL's published formulas written out here."""

import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from mdpo.losses import dpo_loss, kto_kl_estimate, kto_loss, sft_loss


def t(*xs):
    return torch.tensor(xs, dtype=torch.float64, requires_grad=True)


def test_dpo_is_ln2_when_policy_equals_reference():
    pc, pr = t(-10.0, -3.0), t(-12.0, -8.0)
    losses, m = dpo_loss(pc, pr, pc.detach().clone(), pr.detach().clone(), beta=0.1)
    assert torch.allclose(losses, torch.full((2,), math.log(2), dtype=torch.float64))
    losses.sum().backward()
    # d/dpi_c -log sigmoid(beta h) at h = 0 is -beta * sigmoid(0) = -beta / 2.
    assert torch.allclose(pc.grad, torch.full((2,), -0.05, dtype=torch.float64))
    assert torch.allclose(pr.grad, torch.full((2,), 0.05, dtype=torch.float64))
    assert m["rewards/accuracy"].item() == 0.0 and m["rewards/margin"].item() == 0.0


def test_dpo_hand_values_for_each_variant():
    # log-ratios: chosen -10 - (-11) = 1, rejected -12 - (-11) = -1, so h = 2 and beta h = 0.2.
    args = (t(-10.0), t(-12.0), torch.tensor([-11.0], dtype=torch.float64), torch.tensor([-11.0], dtype=torch.float64))
    sig, m = dpo_loss(*args, beta=0.1)
    assert sig.item() == pytest.approx(math.log(1 + math.exp(-0.2)), abs=1e-12)  # 0.598139...
    assert m["rewards/chosen"].item() == pytest.approx(0.1) and m["rewards/rejected"].item() == pytest.approx(-0.1)
    assert m["rewards/accuracy"].item() == 1.0 and m["rewards/margin"].item() == pytest.approx(0.2)
    ipo, _ = dpo_loss(*args, beta=0.1, loss_type="ipo")
    assert ipo.item() == pytest.approx((2 - 1 / 0.2) ** 2)  # 9
    hinge, _ = dpo_loss(*args, beta=0.1, loss_type="hinge")
    assert hinge.item() == pytest.approx(0.8)
    hinge_sat, _ = dpo_loss(*args, beta=1.0, loss_type="hinge")
    assert hinge_sat.item() == 0.0  # 1 - 2 < 0


def test_label_smoothing_matches_trl_formula():
    # TRL's "sigmoid" loss with label_smoothing (cDPO), written out independently:
    # -F.logsigmoid(beta * logits) * (1 - ls) - F.logsigmoid(-beta * logits) * ls
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(6, generator=g, dtype=torch.float64) * 5 for _ in range(4))
    beta, ls = 0.3, 0.1
    logits = (pc - pr) - (rc - rr)
    expected = [-(1 - ls) * math.log(1 / (1 + math.exp(-beta * x))) - ls * math.log(1 / (1 + math.exp(beta * x)))
                for x in logits.tolist()]
    losses, _ = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=ls)
    assert losses.tolist() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_dpo_gradients_by_finite_differences(loss_type):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 4, generator=g, dtype=torch.float64) * 3
    x.requires_grad_()

    def f(v):
        losses, _ = dpo_loss(v[0], v[1], v[2], v[3], beta=0.2, loss_type=loss_type, label_smoothing=0.05
                             if loss_type == "sigmoid" else 0.0)
        return losses.sum()

    assert torch.autograd.gradcheck(f, (x,))


def test_nll_term_is_token_mean_of_chosen():
    pc, pr = t(-20.0), t(-30.0)
    base, _ = dpo_loss(pc, pr, torch.tensor([-20.0]).double(), torch.tensor([-30.0]).double())
    with_nll, m = dpo_loss(pc, pr, torch.tensor([-20.0]).double(), torch.tensor([-30.0]).double(), nll_coef=1.0,
                           chosen_tokens=torch.tensor([8]))
    assert (with_nll - base).item() == pytest.approx(20.0 / 8)
    assert m["nll"].item() == pytest.approx(2.5)
    with pytest.raises(ValueError, match="chosen_tokens"):
        dpo_loss(pc, pr, pc, pr, nll_coef=1.0)
    with pytest.raises(ValueError, match="unknown DPO loss_type 'kto'"):
        dpo_loss(pc, pr, pc, pr, loss_type="kto")


def test_kto_hand_values_and_weights():
    policy, ref = t(-9.0, -9.0, -12.0), torch.tensor([-10.0, -10.0, -10.0], dtype=torch.float64)
    desirable = torch.tensor([True, False, False])
    # r = 1, 1, -2; z0 = 0.5; beta = 0.1
    losses, m = kto_loss(policy, ref, desirable, kl=0.5, beta=0.1, desirable_weight=2.0, undesirable_weight=0.5)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = [2.0 * (1 - sig(0.1 * (1 - 0.5))), 0.5 * (1 - sig(0.1 * (0.5 - 1))), 0.5 * (1 - sig(0.1 * (0.5 + 2)))]
    assert losses.tolist() == pytest.approx(expected, abs=1e-7)
    # Class means as (sum, count), so that the trainer can average them over the global batch.
    assert [float(x) for x in m["rewards/chosen"]] == pytest.approx([0.1, 1])
    assert [float(x) for x in m["rewards/rejected"]] == pytest.approx([0.1 - 0.2, 2])
    losses.sum().backward()
    # d/dpolicy of w (1 - sigmoid(beta (r - z0))) = -w beta s (1 - s) for desirable rows.
    s = sig(0.05)
    assert policy.grad[0].item() == pytest.approx(-2.0 * 0.1 * s * (1 - s))


def test_kto_kl_estimate_is_detached_mean_clamped():
    p = torch.tensor([-5.0, -7.0], requires_grad=True)
    kl = kto_kl_estimate(p, torch.tensor([-6.0, -6.5]))
    assert kl.item() == pytest.approx((1.0 - 0.5) / 2) and not kl.requires_grad
    assert kto_kl_estimate(torch.tensor([-9.0]), torch.tensor([-6.0])).item() == 0.0


def _kl_worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        local = [torch.tensor([1.0, 3.0]), torch.tensor([6.0])][rank]  # rank means 2.0 and 6.0
        out[rank] = kto_kl_estimate(local, torch.zeros_like(local)).item()
    finally:
        torch.distributed.destroy_process_group()


def test_kto_kl_estimate_averages_across_ranks():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_kl_worker, args=(port, out), nprocs=2, join=True)
    assert dict(out) == {0: 4.0, 1: 4.0}  # mean of the rank means


def test_sft_loss():
    policy = t(-6.0, -2.0)
    losses, m = sft_loss(policy, torch.tensor([3, 1]))
    assert losses.tolist() == [6.0, 2.0] and [float(x) for x in m["nll"]] == [8.0, 4.0]  # (sum, tokens)
    assert [float(x) for x in m["tokens"]] == [4.0, 2.0]  # (tokens, sequences)
