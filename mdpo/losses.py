"""Preference and SFT losses: pure functions of per-sequence summed log-probs.

Every function takes (B,) tensors of summed masked log-probs (see mdpo.logprobs) and returns
`(losses, metrics)`: per-example losses (B,) that the trainer averages with the right global normaliser, and
a dict of detached scalar tensors for logging. Nothing here knows about models, masks or batches.

Notation: pi_c / pi_r are the policy's log-probs of the chosen (winning) and rejected (losing) trajectory,
ref_c / ref_r the reference's. With a multi-turn mask these sums run over the model's turns only, which
is what turns DPO into M-DPO (and KTO into M-KTO): the interpreter's tokens never enter the ratio.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mdpo.distributed import all_reduce_mean

DPO_TYPES = ("sigmoid", "ipo", "hinge")


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0, nll_coef: float = 0.0, chosen_tokens: torch.Tensor | None = None):
    """M-DPO (paper eq. 14) and its variants on per-sequence log-probs.

    h = (pi_c - ref_c) - (pi_r - ref_r), the difference of the two trajectories' log-ratios.
      sigmoid: -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h). eps = label_smoothing > 0 is
               conservative DPO (cDPO: the preference label is flipped with probability eps); eps = 0 is
               the paper's M-DPO.
      ipo:     (h - 1 / (2 beta))^2 (Azar et al. 2023, eq. 17). Pass length-averaged log-probs for TRL's
               length-normalised IPO.
      hinge:   max(0, 1 - beta h) (SLiC / RSO).
    nll_coef > 0 adds nll_coef * (-pi_c / chosen_tokens): the chosen trajectory's per-token NLL, the paper's
    "+ NLL" ablation (its code used a token mean, so chosen_tokens must be given).
    """
    if loss_type not in DPO_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; expected one of {DPO_TYPES}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    h = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        losses = torch.relu(1 - beta * h)
    metrics = {}
    if nll_coef:
        if chosen_tokens is None:
            raise ValueError("nll_coef > 0 needs chosen_tokens (the number of tokens in each chosen sum)")
        nll = -policy_chosen / chosen_tokens.clamp(min=1)
        losses = losses + nll_coef * nll
        metrics["nll"] = nll.detach().mean()
    rc, rr = beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
    metrics.update({
        "rewards/chosen": rc.mean(),
        "rewards/rejected": rr.mean(),
        "rewards/margin": (rc - rr).mean(),
        "rewards/accuracy": (rc > rr).float().mean(),
        "logps/chosen": policy_chosen.detach().mean(),
        "logps/rejected": policy_rejected.detach().mean(),
    })
    return losses, metrics


def kto_kl_estimate(policy_kl: torch.Tensor, ref_kl: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z0 (paper eq. 15): mean log-ratio on mismatched prompt/completion pairs.

    Averaged across data-parallel ranks when torch.distributed is initialised, detached (z0 is a baseline,
    not a path for gradients) and clamped at 0 (a KL divergence cannot be negative; the estimate can).
    """
    kl = all_reduce_mean((policy_kl.detach().double() - ref_kl.detach().double()).mean())
    return kl.clamp(min=0).float()


def kto_loss(policy: torch.Tensor, ref: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor | float,
             beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0):
    """M-KTO (paper eq. 15): desirable 1 - sigmoid(beta (r - z0)), undesirable 1 - sigmoid(beta (z0 - r)).

    r = policy - ref is each trajectory's log-ratio, z0 = kl from `kto_kl_estimate`, and `desirable` is a
    bool (B,) label (a correct final answer). Each loss is scaled by its class weight (lambda_D, lambda_U).
    """
    desirable = desirable.bool()
    kl = torch.as_tensor(kl, dtype=torch.float32, device=policy.device).detach()
    r = policy - ref
    losses = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (r - kl))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (kl - r))))
    rewards = beta * r.detach()
    # Class means as (sum, count): a micro-batch may hold one class only, and the trainer divides the global
    # sums by the global counts.
    metrics = {"kl": kl, "logps/policy": policy.detach().mean(),
               "rewards/chosen": (rewards[desirable].sum(), desirable.sum()),
               "rewards/rejected": (rewards[~desirable].sum(), (~desirable).sum())}
    return losses, metrics


def sft_loss(policy: torch.Tensor, tokens: torch.Tensor):
    """Masked NLL: per-example -sum log p over the model's tokens (SFT stage and the RAFT baseline).

    The trainer divides the summed losses by the global token count, which gives a token-level mean over
    the whole batch rather than a mean of per-sequence means.
    """
    losses = -policy
    # (sum, count) pairs: the trainer turns them into the global token mean and tokens per sequence.
    return losses, {"nll": (losses.detach().sum(), tokens.sum()), "tokens": (tokens.sum(), len(tokens))}


def simpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, chosen_tokens: torch.Tensor,
               rejected_tokens: torch.Tensor, beta: float = 2.0, gamma: float = 1.0):
    """SimPO (Meng et al. 2024, eq. 6): -log sigmoid(beta pi_c / |y_c| - beta pi_r / |y_r| - gamma).

    Reference-free: the implicit reward is the policy's length-normalised log-likelihood, and gamma is a
    target reward margin. Token counts are those of the masked (model) tokens.
    """
    rc = beta * policy_chosen / chosen_tokens
    rr = beta * policy_rejected / rejected_tokens
    losses = -F.logsigmoid(rc - rr - gamma)
    rc, rr = rc.detach(), rr.detach()
    return losses, {"rewards/chosen": rc.mean(), "rewards/rejected": rr.mean(), "rewards/margin": (rc - rr).mean(),
                    "rewards/accuracy": (rc > rr).float().mean(), "logps/chosen": policy_chosen.detach().mean(),
                    "logps/rejected": policy_rejected.detach().mean()}


# ---------------------------------------------------------------- policy gradient (online RL baselines)
ADVANTAGES = ("grpo", "drgrpo", "rloo")


def group_advantages(rewards: torch.Tensor, kind: str = "grpo", eps: float = 1e-4) -> torch.Tensor:
    """Advantages of one prompt's group of N sampled trajectories from their rewards (N,).

      grpo:   (r - mean) / (std + eps), std with Bessel's correction (Shao et al. 2024, DeepSeekMath, sec. 4.1.2:
              "outcome supervision" normalises each reward by the group's mean and standard deviation).
      drgrpo: r - mean (Liu et al. 2025, "Understanding R1-Zero-Like Training", eq. 3 / Dr. GRPO): dividing by
              the std weights prompts that are almost always right or wrong up, a question-level difficulty bias.
      rloo:   r_i - mean_{j != i} r_j = N / (N - 1) (r_i - mean) (Ahmadian et al. 2024, "Back to Basics", eq. 6):
              each sample's baseline is the other samples' mean, so it is independent of the sample itself.
    A group whose rewards are all equal gets zeros under all three (the caller skips it).
    """
    if kind not in ADVANTAGES:
        raise ValueError(f"unknown advantage {kind!r}; expected one of {ADVANTAGES}")
    r = rewards.double()
    n = r.numel()
    if n < 2:
        return torch.zeros_like(rewards, dtype=torch.float32)
    centred = r - r.mean()
    if kind == "grpo":
        out = centred / (r.std(unbiased=True) + eps)
    elif kind == "drgrpo":
        out = centred
    else:
        out = centred * n / (n - 1)
    return out.float()


def clipped_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                        clip_low: float = 0.2, clip_high: float = 0.2, ref_logp: torch.Tensor | None = None,
                        kl_coef: float = 0.0):
    """Per-token PPO clipped surrogate (Schulman et al. 2017, eq. 7) as GRPO uses it (DeepSeekMath, eq. 3).

    For token t of a sampled trajectory with advantage A (the trajectory's, broadcast to its tokens):
        ratio = exp(logp - old_logp)             old_logp: the sampling policy's log-prob, recorded by the sampler
        loss  = -min(ratio A, clip(ratio, 1 - clip_low, 1 + clip_high) A) + kl_coef k3
        k3    = exp(ref - logp) - (ref - logp) - 1   (Schulman's unbiased, non-negative estimator of KL(pi || ref),
                                                     DeepSeekMath eq. 4)
    Where the clip is active the loss is constant in logp: no gradient (the trust region). clip_high > clip_low is
    DAPO's "clip-higher" (Yu et al. 2025). Returns (losses (M,), stats): stats are detached per-token tensors.
    """
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high) * advantages
    losses = -torch.minimum(unclipped, clipped)
    stats = {"ratio": ratio.detach(), "clipped": (clipped < unclipped).detach()}
    if ref_logp is not None and kl_coef:
        d = ref_logp - logp
        k3 = torch.exp(d) - d - 1
        losses = losses + kl_coef * k3
        stats["kl"] = k3.detach()
    elif ref_logp is not None:
        d = (ref_logp - logp).detach()
        stats["kl"] = torch.exp(d) - d - 1
    return losses, stats
