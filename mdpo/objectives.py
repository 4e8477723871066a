"""Training objectives: one object per objective, the only place that knows what a loss trains on.

An objective declares
    data        what one line of its training file is: "pairs" ({"chosen", "rejected"} trajectories),
                "labelled" (one trajectory whose `correct` field is its label), "scored" (one trajectory with
                meta reward and advantage and the sampler's log-probs: GRPO) or "sequences" (one trajectory);
    reference   whether it needs reference log-probs (computed once before training, or online);
    options     the loss.* config keys it reads: a key it ignores, set away from its default, is a config
                error rather than a silently dropped option;
and implements
    build       the iteration's training rows from the filtered rollouts (the pipeline's data stage);
    loss        per-example losses (the trainer divides their sum by `normaliser`) and a metrics dict.
The trainer (mdpo/train.py) and the pipeline (mdpo/pipeline.py) dispatch on nothing else.

A new loss is one subclass here plus one entry in OBJECTIVES; SimPO and DiscountedMDPO below are that example.
Metric values are scalar tensors (means over the micro-batch's examples) or (sum, count) pairs for means over
a subset (M-KTO's class means) or over tokens; the trainer aggregates both exactly over the global batch. A
loss must return the same metric names on every call (ranks reduce them in one packed tensor).
"""

from __future__ import annotations

import abc
import dataclasses
import random
from dataclasses import dataclass, field
from typing import Any

import torch

from mdpo.data import build_kto, build_pairs, build_raft, write_pairs
from mdpo.losses import clipped_policy_loss, dpo_loss, group_advantages, kto_kl_estimate, kto_loss, sft_loss, simpo_loss
from mdpo.trajectory import Role, Trajectory, write_trajectories


@dataclass
class Example:
    """One training unit: its sequences (a pair's chosen and rejected, or one trajectory) and their reference."""

    seqs: list[Trajectory]
    ref: list[float] | None = None  # reference log-probs of `seqs`, in order
    tokens: int = 0  # trained tokens of the first sequence (the SFT normaliser)


@dataclass
class Batch:
    """What `Objective.loss` sees for one micro-batch, in the order of `Objective.sequences`."""

    policy: torch.Tensor  # (N,) the policy's summed log-probs of the trained sequences
    ref: torch.Tensor | None  # (N,) the reference's, or None for a reference-free objective
    counts: torch.Tensor  # (N,) tokens in each sum
    examples: list[Example]
    state: dict = field(default_factory=dict)  # from Objective.step_state (M-KTO's z0)
    tokens: "TokenBatch | None" = None  # token-level objectives (Objective.token_level): per-token values


@dataclass
class TokenBatch:
    """Per-token values of a micro-batch's trained tokens (mdpo.logprobs.masked_token_logprobs' order)."""

    policy: torch.Tensor  # (M,) the policy's log-probs, with gradients
    old: torch.Tensor  # (M,) the sampling policy's, as the sampler recorded them
    ref: torch.Tensor | None  # (M,) the reference's (reference.online), or None
    rows: torch.Tensor  # (M,) which sequence of the micro-batch each token belongs to


@dataclass
class Max:
    """A metric reduced by its maximum over the global batch instead of a mean."""

    value: torch.Tensor


class ObjectiveError(ValueError):
    """An objective's options or data do not fit it; mdpo.config reports it as a ConfigError naming the file."""


class Objective(abc.ABC):
    name = ""
    data = "pairs"
    reference = True
    iterative = True  # the pipeline can build its data from rollouts (`build`)
    token_level = False  # the loss needs per-token log-probs (Batch.tokens), not only per-sequence sums
    options: tuple[str, ...] = ()

    def __init__(self, cfg):  # the `loss` section (mdpo.config.LossConfig)
        self.cfg = cfg

    # ---- configuration
    def check(self) -> None:
        """Reject loss.* options this objective would ignore (set away from their defaults)."""
        default = type(self.cfg)()
        used = {"type", "mask", *self.options}
        for f in dataclasses.fields(self.cfg):
            if f.name not in used and getattr(self.cfg, f.name) != getattr(default, f.name):
                raise ObjectiveError(f"loss.{f.name}: not used by loss.type {self.name!r} (it reads "
                                  f"{', '.join('loss.' + o for o in sorted(used))}); remove it")

    def reference_key(self) -> dict:
        """What, beyond data, mask, model and dtype, the stored reference log-probs depend on."""
        return {"objective": self.name}

    # ---- data
    def branch_points(self, kept: list[Trajectory], seed: int) -> list[tuple[Trajectory, int]]:
        """(trajectory, cut) prefixes to sample continuations of before `build` (TurnDPO); none by default."""
        return []

    def build(self, kept: list[Trajectory], seed: int, branches: list[Trajectory] = ()) -> list:
        """This iteration's training rows from the filtered, graded rollouts (and continuations, `branches`,
        of `branch_points`' prefixes, filtered and graded alike)."""
        raise ObjectiveError(f"loss.type {self.name!r} is not an iterative method; use --stage sft for SFT")

    def write(self, path, rows: list) -> None:
        """Write `build`'s rows as this objective's training file, atomically."""
        if self.data == "pairs":
            write_pairs(path, rows)
        else:
            write_trajectories(path, rows)

    def prepare(self, examples: list[Example]) -> None:
        """Complete the examples once after loading (M-KTO adds its KL sequences)."""

    def sequences(self, ex: Example) -> list[Trajectory]:
        """The sequences a training step runs through the policy for `ex`."""
        return ex.seqs

    def reference_sequences(self, ex: Example) -> list[Trajectory]:
        """The sequences whose reference log-probs `ex` needs (stored in ex.ref in this order)."""
        return ex.seqs

    def token_weights(self, t: Trajectory, mask: list[bool]) -> list[float] | None:
        """Per-token weights of the summed log-probs, or None for the plain mask (weight 1 where trained)."""
        return None

    def build_info(self) -> dict:
        """What the last `build` counted beyond its rows (GRPO's skipped groups), for the data stage's record."""
        return {}

    # ---- the step
    def normaliser(self, examples: list[Example]) -> float:
        """Divisor of the global batch's summed per-example losses."""
        return float(len(examples))

    def step_state(self, logprobs, examples: list[Example]) -> dict:
        """Per-step state computed before the micro-batches; `logprobs(examples, k)` gives the policy's and the
        reference's summed log-probs of each example's k-th reference sequence."""
        return {}

    @abc.abstractmethod
    def loss(self, b: Batch) -> tuple[torch.Tensor, dict[str, Any]]:
        """Per-example losses (B,) and a metrics dict for one micro-batch."""


# ---------------------------------------------------------------- preference pairs
class MDPO(Objective):
    """M-DPO (paper eq. 14) and its variants: sigmoid (+cDPO smoothing), IPO, hinge; optional + NLL."""

    name = "mdpo"
    options = ("dpo_variant", "beta", "label_smoothing", "nll_coef", "average_logps", "pairs_per_prompt")

    def check(self) -> None:
        super().check()
        c = self.cfg
        if c.dpo_variant != "sigmoid" and c.label_smoothing:
            raise ObjectiveError(f"loss.label_smoothing: only the sigmoid DPO loss smooths labels, "
                              f"not dpo_variant {c.dpo_variant!r}; remove it")

    @property
    def average(self) -> bool:
        """Per-token average log-probs: on by default for IPO, whose target 1/(2 beta) is on that scale
        (Azar et al. 2023; TRL's IPO), off for the paper's summed M-DPO."""
        a = self.cfg.average_logps
        return self.cfg.dpo_variant == "ipo" if a is None else a

    def reference_key(self) -> dict:
        return super().reference_key() | self._weights_key()

    def _weights_key(self) -> dict:
        return {}

    def build(self, kept, seed, branches=()):
        return build_pairs(kept, self.cfg.pairs_per_prompt, seed)

    def loss(self, b: Batch):
        c = self.cfg
        pol, ref, n = b.policy, b.ref, b.counts.clamp(min=1).float()
        if self.average:
            pol, ref = pol / n, ref / n
        # Averaged log-probs are already per token: the NLL term divides by 1.
        return dpo_loss(pol[0::2], pol[1::2], ref[0::2], ref[1::2], beta=c.beta, loss_type=c.dpo_variant,
                        label_smoothing=c.label_smoothing, nll_coef=c.nll_coef,
                        chosen_tokens=torch.ones_like(n[0::2]) if self.average else n[0::2])


class DiscountedMDPO(MDPO):
    """Turn-discounted M-DPO: model turn k of a K-turn trajectory counts with weight turn_discount^(K - k).

    Every log-prob in the M-DPO ratio is weighted by its turn (read from the token's turn index), so the
    final answer's turn has weight 1 and earlier turns are discounted: credit shifts towards the turns
    closest to the outcome. turn_discount = 1 is M-DPO exactly.
    """

    name = "mdpo_discount"
    options = MDPO.options + ("turn_discount",)

    def _weights_key(self) -> dict:
        return {"turn_discount": self.cfg.turn_discount}

    def token_weights(self, t, mask):
        last = max((k for k, m in zip(t.turns, mask) if m), default=0)
        g = self.cfg.turn_discount
        return [g ** (last - k) if m else 0.0 for k, m in zip(t.turns, mask)]


class TurnDPO(MDPO):
    """Turn-level M-DPO: M-DPO's trajectory pairs plus pairs of continuations that share a prefix.

    Trajectory-level M-DPO gives every turn of the winner the same credit. Here, for each prompt whose kept
    rollouts are both right and wrong, one of them that made a tool call is cut where a later model turn begins
    (trajectory and turn drawn at random). The pipeline samples loss.branch_samples continuations of that
    prefix from the policy (mdpo.sampler replays the prefix's calls, so each continuation's interpreter starts
    from the state the original had there), grades and filters them like rollouts, and a right and a wrong
    continuation of one prefix make a pair (build_pairs over the branch id). The pair differs only after the
    cut, so the loss is eq. 14 with the log-probs summed over the continuation's model tokens only
    (token_weights): the shared prefix's terms would cancel in the log-ratio difference anyway, and leaving
    them out also keeps them out of the NLL term and its normaliser.
    """

    name = "turn_dpo"
    options = MDPO.options + ("branch_samples",)

    def check(self) -> None:
        super().check()
        if self.cfg.branch_samples < 2:
            raise ObjectiveError(f"loss.branch_samples: a pair needs two continuations of a prefix, "
                                 f"got {self.cfg.branch_samples}; use 2 or more")

    def branch_points(self, kept, seed):
        by_prompt: dict[str, list[Trajectory]] = {}
        for t in kept:
            by_prompt.setdefault(t.prompt_id, []).append(t)
        points = []
        for pid in sorted(by_prompt):
            group = by_prompt[pid]
            if len({bool(t.correct) for t in group}) < 2:
                continue  # one outcome only: continuations would most likely share it, no pair to learn from
            cuts = [(t, c) for t in group for c in turn_starts(t)]
            if cuts:
                rng = random.Random(f"{seed}/{pid}")
                points.append(cuts[rng.randrange(len(cuts))])
        return points

    def build(self, kept, seed, branches=()):
        return build_pairs(kept, self.cfg.pairs_per_prompt, seed) + \
            build_pairs(branches, self.cfg.pairs_per_prompt, seed)

    def token_weights(self, t, mask):
        cut = t.meta.get("branch")
        if cut is None:
            return None  # a trajectory-level pair: the plain mask
        return [1.0 if m and i >= cut else 0.0 for i, m in enumerate(mask)]


def turn_starts(t: Trajectory) -> list[int]:
    """Positions of the first model token of each model turn after the first: where a continuation can start
    (the prefix before it ends with the turn's header, and its earlier turns all made a tool call)."""
    starts, seen = [], set()
    for i, (role, turn) in enumerate(zip(t.roles, t.turns)):
        if role == Role.MODEL and turn not in seen:
            seen.add(turn)
            if turn > 1:
                starts.append(i)
    return starts


class SimPO(MDPO):
    """SimPO (Meng et al. 2024, eq. 6): reference-free, length-normalised pairwise loss with a margin.

    -log sigmoid(beta / |y_w| log pi(y_w) - beta / |y_l| log pi(y_l) - gamma), over the masked (model) tokens.
    """

    name = "simpo"
    reference = False
    options = ("beta", "simpo_gamma", "pairs_per_prompt")

    def check(self) -> None:
        Objective.check(self)

    def reference_key(self) -> dict:
        return Objective.reference_key(self)

    def loss(self, b: Batch):
        n = b.counts.clamp(min=1).float()
        return simpo_loss(b.policy[0::2], b.policy[1::2], n[0::2], n[1::2], beta=self.cfg.beta,
                          gamma=self.cfg.simpo_gamma)


# ---------------------------------------------------------------- labelled trajectories
class MKTO(Objective):
    """M-KTO (paper eq. 15): each trajectory against the reference point z0, from mismatched sequences."""

    name = "mkto"
    data = "labelled"
    options = ("beta", "desirable_weight", "undesirable_weight", "pairs_per_prompt")

    def build(self, kept, seed, branches=()):
        return build_kto(build_pairs(kept, self.cfg.pairs_per_prompt, seed), seed)

    def prepare(self, examples):
        """Give example i a KL sequence: its prompt followed by the completion of the next example (in file
        order, cyclically) whose prompt differs, roles and turns included, so its tool turns stay masked.

        z0 estimates KL(policy || reference) from completions that do not answer the prompt (KTO, sec. 4);
        another sample of the same prompt would answer it. The partner is fixed by file order, not by batch,
        so the reference log-probs can be computed once before training.
        """
        n = len(examples)
        for i, ex in enumerate(examples):
            a = ex.seqs[0]
            b = next((examples[(i + k) % n].seqs[0] for k in range(1, n)
                      if examples[(i + k) % n].seqs[0].prompt_id != a.prompt_id), None)
            if b is None:
                raise ObjectiveError(f"M-KTO needs trajectories of at least two prompts for its KL estimate; "
                                  f"all {n} are of prompt {a.prompt_id!r}")
            pa, pb = a.prompt_len, b.prompt_len
            ex.seqs.append(Trajectory(a.prompt_id, -1, a.tokens[:pa] + b.tokens[pb:], a.roles[:pa] + b.roles[pb:],
                                      a.turns[:pa] + b.turns[pb:], meta={"kl_partner": b.prompt_id}))

    def sequences(self, ex):
        return ex.seqs[:1]  # the KL sequence enters through z0 only

    def step_state(self, logprobs, examples):
        """z0 for this step: the global batch's mean policy-minus-reference log-ratio on the KL sequences,
        detached (a baseline, not a path for gradients) and clamped at 0 (a KL cannot be negative)."""
        with torch.no_grad():
            policy, ref = logprobs(examples, 1)
        # Every rank holds G / world examples, so the mean of the rank means is the global-batch mean.
        return {"kl": kto_kl_estimate(policy, ref)}

    def loss(self, b: Batch):
        desirable = torch.tensor([bool(ex.seqs[0].correct) for ex in b.examples], device=b.policy.device)
        c = self.cfg
        return kto_loss(b.policy, b.ref, desirable, b.state["kl"], beta=c.beta,
                        desirable_weight=c.desirable_weight, undesirable_weight=c.undesirable_weight)


# ---------------------------------------------------------------- sequences
class SFT(Objective):
    """Masked NLL over the model's tokens, a token mean over the global batch (the SFT stage)."""

    name = "sft"
    data = "sequences"
    reference = False
    iterative = False  # trains on given trajectories (sft.data), not on the policy's own rollouts

    def normaliser(self, examples):
        return float(sum(ex.tokens for ex in examples))

    def loss(self, b: Batch):
        return sft_loss(b.policy, b.counts)


class RAFT(SFT):
    """RAFT (paper section 5.4): SFT on at most pairs_per_prompt correct rollouts per prompt."""

    name = "raft"
    iterative = True
    options = ("pairs_per_prompt",)

    def build(self, kept, seed, branches=()):
        return build_raft(kept, self.cfg.pairs_per_prompt, seed)


# ---------------------------------------------------------------- online RL baselines
class GRPO(Objective):
    """GRPO (Shao et al. 2024, DeepSeekMath, eq. 3 with outcome rewards, sec. 4.1.2), multi-turn masked.

    Each prompt's sampled group (the iteration's rollouts of it) gets reward 1 for a correct final answer, else 0,
    and advantages from `mdpo.losses.group_advantages`; every model token of a trajectory carries its advantage
    into the PPO clipped surrogate against the log-probs the sampler recorded (`clipped_policy_loss`). Tool
    tokens are outside the mask exactly as for M-DPO, so the interpreter's output never enters a ratio. A group
    whose rewards are all equal has zero advantages and is left out (counted in `build_info`).

    loss.token_norm: "sequence" averages each sequence's token losses, then the sequences (GRPO as published);
    "token" averages over every trained token of the global batch (DAPO, Yu et al. 2025, sec. 3.3), so long
    trajectories weigh by their length. The recorded log-probs are the model's own distribution (the sampler's
    temperature and top-p shape the draw, not the ratio), so the ratio is exactly 1 at the first step.
    """

    name = "grpo"
    data = "scored"
    advantage = "grpo"
    token_level = True
    options = ("clip_low", "clip_high", "kl_coef", "token_norm")

    def __init__(self, cfg):
        super().__init__(cfg)
        self.reference = cfg.kl_coef > 0  # the k3 term reads the reference's per-token log-probs
        self._info: dict = {}

    @property
    def token_norm(self) -> str:
        return self.cfg.token_norm

    def check(self) -> None:
        super().check()
        c = self.cfg
        if not (0 <= c.clip_low < 1 and c.clip_high >= 0):
            raise ObjectiveError(f"loss.clip_low must be in [0, 1) and loss.clip_high >= 0, got {c.clip_low}, "
                                 f"{c.clip_high}")
        if c.kl_coef < 0:
            raise ObjectiveError(f"loss.kl_coef must be >= 0, got {c.kl_coef}")

    def build(self, kept, seed, branches=()):
        """Trajectories with meta["reward"] and meta["advantage"], the groups of one prompt in a row."""
        groups: dict[str, list[Trajectory]] = {}
        for t in kept:
            groups.setdefault(t.prompt_id, []).append(t)
        rows, equal, single = [], 0, 0
        for pid in sorted(groups):
            g = sorted(groups[pid], key=lambda t: t.sample_id)
            rewards = torch.tensor([1.0 if t.correct else 0.0 for t in g])
            if len(g) < 2:
                single += 1
                continue
            if bool((rewards == rewards[0]).all()):
                equal += 1  # no signal: every advantage is 0
                continue
            adv = group_advantages(rewards, self.advantage)
            for t, r, a in zip(g, rewards.tolist(), adv.tolist()):
                rows.append(dataclasses.replace(t, meta={**t.meta, "reward": r, "advantage": a}))
        random.Random(seed).shuffle(rows)
        advs = [t.meta["advantage"] for t in rows]
        self._info = {"groups": len(groups), "groups_trained": len(groups) - equal - single,
                      "groups_all_equal": equal, "groups_of_one": single,
                      "mean_reward": sum(bool(t.correct) for t in kept) / max(1, len(kept)),
                      "advantage": _quantiles(advs)}
        return rows

    def build_info(self) -> dict:
        return self._info

    def normaliser(self, examples):
        return float(sum(ex.tokens for ex in examples)) if self.token_norm == "token" else float(len(examples))

    def loss(self, b: Batch):
        tb = b.tokens
        adv = torch.tensor([ex.seqs[0].meta["advantage"] for ex in b.examples], device=tb.policy.device)
        c = self.cfg
        losses, st = clipped_policy_loss(tb.policy, tb.old, adv[tb.rows], c.clip_low, c.clip_high, tb.ref, c.kl_coef)
        n = len(b.examples)
        per = torch.zeros(n, dtype=torch.float32, device=losses.device).index_add(0, tb.rows, losses)
        if self.token_norm == "sequence":
            per = per / b.counts.clamp(min=1)  # a mean over each sequence's own tokens
        M = torch.tensor(float(tb.policy.numel()))
        rewards = torch.tensor([ex.seqs[0].meta["reward"] for ex in b.examples])
        metrics = {"reward": rewards.mean(), "advantage/mean": adv.detach().cpu().mean(),
                   "advantage/abs": adv.detach().cpu().abs().mean(),
                   "ratio/mean": (st["ratio"].sum().cpu(), M), "ratio/max": Max(st["ratio"].max().cpu()),
                   "clip_fraction": (st["clipped"].sum().float().cpu(), M),
                   "logps/old": (tb.old.detach().sum().cpu(), M), "logps/policy": (tb.policy.detach().sum().cpu(), M)}
        if "kl" in st:
            metrics["kl"] = (st["kl"].sum().cpu(), M)
        return per, metrics


class DrGRPO(GRPO):
    """Dr. GRPO (Liu et al. 2025, sec. 3.2): GRPO without the std scaling of advantages and without per-sequence
    length normalisation; each sequence's token losses are summed (the paper's constant divisor, a generation
    budget, only rescales the learning rate, so mdpo leaves it out)."""

    name = "drgrpo"
    advantage = "drgrpo"
    options = ("clip_low", "clip_high", "kl_coef")

    @property
    def token_norm(self) -> str:
        return "none"


class RLOO(GRPO):
    """RLOO (Ahmadian et al. 2024, sec. 3.2; Kool et al. 2019): each sample's baseline is the mean reward of the
    group's other samples; the rest is GRPO's clipped token-level update."""

    name = "rloo"
    advantage = "rloo"


def _quantiles(xs: list[float]) -> dict:
    """min / 10% / median / 90% / max and the mean of a list (the advantage distribution in data_stats.json)."""
    if not xs:
        return {}
    v = sorted(xs)

    def q(f):
        return v[min(len(v) - 1, int(round(f * (len(v) - 1))))]
    return {"min": v[0], "p10": q(0.1), "median": q(0.5), "p90": q(0.9), "max": v[-1], "mean": sum(v) / len(v),
            "n": len(v)}


OBJECTIVES: dict[str, type[Objective]] = {o.name: o for o in (MDPO, DiscountedMDPO, TurnDPO, SimPO, MKTO, SFT, RAFT,
                                                             GRPO, DrGRPO, RLOO)}


def get_objective(cfg) -> Objective:
    """The objective that loss.type names, with its options checked; ObjectiveError names the key."""
    if cfg.type not in OBJECTIVES:
        raise ObjectiveError(f"loss.type: must be one of {', '.join(map(repr, OBJECTIVES))}, got {cfg.type!r}")
    obj = OBJECTIVES[cfg.type](cfg)
    obj.check()
    return obj
