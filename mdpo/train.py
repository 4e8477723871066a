"""Training for every objective (M-DPO, M-KTO, SimPO, SFT, RAFT, ...): one process, or many under torchrun with FSDP2.

    python -m mdpo.train CONFIG --data FILE.jsonl --out DIR [--resume] [section.key=value ...]
    torchrun --nproc_per_node 8 -m mdpo.train CONFIG --data FILE.jsonl --out DIR

loss.type names an objective (mdpo/objectives.py), which says what a line of FILE is (pairs, labelled
trajectories or sequences), whether it needs reference log-probs and what its loss is; nothing here depends on
which objective runs. Reference log-probs are computed once, before training, with the reference model and this
trainer's own forward (the reference is fixed within an iteration, so no reference model is held during
training), and stored in OUT/reference.jsonl under a key of everything they depend on.

One precision: model.dtype is the compute dtype of every forward here. The weights and the optimiser's state
stay fp32 (an update of lr x 1e-3 is below bf16's resolution for most weights); FSDP2 casts the gathered
weights to model.dtype for each block's forward and backward and reduces gradients in fp32. The model is under
FSDP2 also in a single process (a one-member group; in fp32 a single process runs the model unwrapped, which
computes the same numbers), so one process and many run the same numerics, and the
reference log-probs come from that same sharded, mixed-precision forward, in the micro-batches that step 1
will use: at step 1 every policy/reference log-ratio is exactly 0. Exports are written in model.dtype.

Each optimiser step takes training.global_batch_size examples in a seeded order; each rank takes every
world-th of them and runs them in micro-batches. Per-example losses are summed and divided by the objective's
global normaliser, and the ranks' gradients add up to that (see `train_step`), so the update is the same for
any number of processes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from mdpo.atomic import atomic_open, write_json_atomic
from mdpo import faults
from mdpo.checkpoint import (checkpoint_dirs, export, load_checkpoint, peak_memory_gb, remove_leftovers,
                             save_checkpoint)
from mdpo.config import ConfigError, ExperimentConfig, load_config, save_config
from mdpo.distributed import all_reduce_max, all_reduce_sum, barrier, default_device, process_group, run_cli, world
from mdpo.hub import HubError, resolve_model_ranks
from mdpo.logprobs import masked_token_logprobs, sequence_logprobs
from mdpo.lora import LoRAError, adapters_disabled, apply_lora
from mdpo.model import CausalLM
from mdpo.objectives import Batch, Example, Max, Objective, ObjectiveError, TokenBatch, get_objective
from mdpo.plan import announce
from mdpo.tracking import Tracker, check_tracker, job_of, open_tracker, scalars
from mdpo.trajectory import Trajectory, TrajectoryError, read_jsonl
from mdpo.weights import CheckpointError, folder_identity, keep_resident, load_pretrained, parse_dtype
from mdpo.weights import load_config as load_model_config


class TrainError(RuntimeError):
    """Training cannot go on; the message says why and what was kept."""


ADAPTERS_OFF = "adapters off"  # Step's reference model when it is the policy's base (mdpo/lora.py)


# ---------------------------------------------------------------- data
def load_examples(path, objective: Objective, mask: str, max_length: int, vocab_size: int | None):
    """Read the objective's training file; drop unusable examples and count why. Returns (examples, dropped).

    vocab_size: token ids must be below it (None: not checked). Every problem with the file (missing, not UTF-8
    JSONL, empty, a malformed line) is a TrainError naming the file and line."""
    examples, dropped = [], {"empty_mask": 0, "too_long": 0}
    for where, d in read_jsonl(path, TrainError, empty_ok=False):
        try:
            if objective.data == "pairs":
                if not isinstance(d, dict) or "chosen" not in d or "rejected" not in d:
                    raise TrainError(f"{where}: a pair needs 'chosen' and 'rejected'")
                seqs = [Trajectory.from_dict(d[k], where) for k in ("chosen", "rejected")]
            else:
                seqs = [Trajectory.from_dict(d, where)]
        except TrajectoryError as e:
            raise TrainError(str(e)) from None
        for t in seqs:
            if vocab_size is not None and t.tokens and max(t.tokens) >= vocab_size:
                raise TrainError(f"{where}: token id {max(t.tokens)} >= the model's vocabulary ({vocab_size}); "
                                 "was this data made with another tokenizer?")
        if objective.data == "scored" and ("advantage" not in seqs[0].meta or seqs[0].logprobs is None):
            raise TrainError(f"{where}: loss.type {objective.name} trains on scored rollouts: each trajectory needs "
                             "meta.advantage and the sampler's logprobs (the pipeline's data stage writes them)")
        if objective.data == "labelled" and seqs[0].correct is None:
            raise TrainError(f"{where}: loss.type {objective.name} needs each trajectory's 'correct' label "
                             "(desirable or not)")
        # Truncation policy: an example longer than max_length is dropped whole (cutting it would drop
        # its final answer, which is what made it chosen or rejected), and counted.
        if any(len(t.tokens) > max_length for t in seqs):
            dropped["too_long"] += 1
        elif any(not any(t.loss_mask(mask)[1:]) for t in seqs):
            dropped["empty_mask"] += 1  # nothing to train on: the loss would be a constant
        else:
            examples.append(Example(seqs, tokens=sum(seqs[0].loss_mask(mask)[1:])))
    try:
        objective.prepare(examples)
    except ObjectiveError as e:
        raise TrainError(f"{path}: {e}") from None
    return examples, dropped


def batch_tensors(seqs: list[Trajectory], mask: str, device, objective: Objective | None = None):
    """Right-padded (N, T) tokens and the (N, T) loss mask (float token weights if the objective has them)."""
    T = max(len(t.tokens) for t in seqs)
    tokens = torch.zeros(len(seqs), T, dtype=torch.long)
    masks = [t.loss_mask(mask) for t in seqs]
    weights = [objective.token_weights(t, m) for t, m in zip(seqs, masks)] if objective else [None] * len(seqs)
    weighted = any(w is not None for w in weights)
    loss_mask = torch.zeros(len(seqs), T, dtype=torch.float32 if weighted else torch.bool)
    for i, (t, m, w) in enumerate(zip(seqs, masks, weights)):
        tokens[i, : len(t.tokens)] = torch.tensor(t.tokens)
        loss_mask[i, : len(t.tokens)] = torch.tensor(w if w is not None else m, dtype=loss_mask.dtype)
    return tokens.to(device), loss_mask.to(device)


def recorded_logprobs(seqs: list[Trajectory], select: torch.Tensor) -> torch.Tensor:
    """The sampler's recorded log-probs of `seqs` at the tokens masked_token_logprobs selected, in its order (M,)."""
    old = torch.zeros(len(seqs), select.shape[1] + 1, dtype=torch.float32)
    for i, t in enumerate(seqs):
        old[i, : len(t.tokens)] = torch.tensor(t.logprobs, dtype=torch.float32)
    return old.to(select.device)[:, 1:][select]


# ---------------------------------------------------------------- reference log-probs
def model_identity(path) -> dict:
    """What identifies a checkpoint folder without reading its weights: path, config, weight files' size and time."""
    p = Path(path).resolve()
    config, files = folder_identity(p)
    return {"path": str(p), "config_sha256": hashlib.sha256(config).hexdigest(), "weights": [list(f) for f in files]}


def reference_key(cfg: ExperimentConfig, objective: Objective, data, reference: str, dtype: torch.dtype) -> dict:
    """Everything the stored reference log-probs depend on; a different key means they must be recomputed."""
    h = hashlib.sha256()
    with open(data, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    # The micro-batches (seed, batch sizes, world size) decide which rows share a padded forward.
    return {"data_sha256": h.hexdigest(), "reference": model_identity(reference), "mask": cfg.loss.mask,
            "dtype": str(dtype).removeprefix("torch."), "max_length": cfg.rollout.max_length,
            "batches": [cfg.training.seed, cfg.training.global_batch_size, cfg.training.micro_batch_size, world()[1]],
            **objective.reference_key()}


def first_epoch_groups(cfg: ExperimentConfig, n: int) -> list[list[int]]:
    """This rank's micro-batches of example indices as the first epoch will run them, then the examples that
    epoch leaves out (n mod the global batch). Computing reference log-probs in the same groups gives them
    the same padding, and so the same bits, as the policy's forward at the first step."""
    rank, ws = world()
    G, mb = cfg.training.global_batch_size, cfg.training.micro_batch_size
    order = data_orders(cfg, n)[0]
    full = n // G * G

    def groups(r):
        mine = [i for k in range(0, full, G) for i in order[k:k + G][r::ws]]
        rest = order[full:][r::ws]
        return [mine[s:s + mb] for s in range(0, len(mine), mb)] + [rest[s:s + mb] for s in range(0, len(rest), mb)]
    # Every rank must run as many forwards (each is a round of FSDP all-gathers): a rank with fewer leftovers
    # repeats its last group, which rewrites the same values.
    own, most = groups(rank), max(len(groups(r)) for r in range(ws))
    return own + own[-1:] * (most - len(own))


def _stale(old: dict | None, key: dict) -> str:
    if old is None:
        return "it has no key (written by an older mdpo)"
    diff = [k for k in sorted(set(old) | set(key)) if old.get(k) != key.get(k)]
    return "its " + ", ".join(diff) + " differ" if diff else ""


@torch.no_grad()
def reference_logprobs(model: CausalLM, objective: Objective, examples: list[Example], mask: str,
                       groups: list[list[int]], cache: Path, key: dict, device) -> None:
    """Fill each example's reference log-probs with `model`, cached in `cache` under `key`; this rank computes
    the examples of `groups`, one forward per group (first_epoch_groups), and the ranks' shares are summed.

    The file is a key line, then one line per example. A file whose key differs (other data, reference model,
    mask, dtype or objective) is recomputed, and that is said on stderr.
    """
    rank, ws = world()
    if cache.is_file():
        try:
            lines, why = [d for _, d in read_jsonl(cache, TrainError)], None
        except TrainError as e:  # a damaged cache is recomputed, not fatal
            lines, why = [], f"unreadable: {e}"
        old = lines[0].get("key") if lines and isinstance(lines[0], dict) else None
        why = why or _stale(old, key)
        if not why and len(lines) - 1 == len(examples):
            for ex, v in zip(examples, lines[1:]):
                ex.ref = v
            return
        if rank == 0:
            print(f"{cache}: stale reference log-probs ({why or 'row count differs'}); recomputing", file=sys.stderr)
    model.eval()
    width = len(objective.reference_sequences(examples[0]))
    out = torch.zeros(len(examples), width, dtype=torch.float64)
    for idx in tqdm(groups, desc="reference log-probs", disable=rank != 0):
        seqs = [t for i in idx for t in objective.reference_sequences(examples[i])]
        tokens, lm = batch_tensors(seqs, mask, device, objective)
        sums, _ = sequence_logprobs(model, tokens, lm)
        out[idx] = sums.double().view(len(idx), -1).cpu()
    if hasattr(model, "reshard"):
        # FSDP2 keeps the root unit's weights gathered after a forward without backward: put the sharded
        # parameters back before an optimiser is built over model.parameters().
        model.reshard()
    all_reduce_sum(out)
    for ex, v in zip(examples, out.tolist()):
        ex.ref = v
    if rank == 0:
        with atomic_open(cache) as f:
            faults.write(f, json.dumps({"key": key}) + "\n" + "".join(json.dumps(v) + "\n" for v in out.tolist()),
                         "reference.write")
    model.train()


# ---------------------------------------------------------------- optimisation
def lr_lambda(cfg: ExperimentConfig, total: int):
    warm, kind = cfg.training.warmup_steps, cfg.training.schedule

    def f(step):
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total - warm)
        if kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        if kind == "linear":
            return max(0.0, 1 - progress)
        return 1.0
    return f


def shard(model: CausalLM, dtype: torch.dtype):
    """FSDP2: each block is its own unit, the root (embedding, final norm and head, tied or not) another.
    Weights stay in their (fp32) dtype; below fp32, each unit's forward and backward run on weights cast to
    `dtype` and gradients are reduced in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    same = all(p.dtype == dtype for p in model.parameters())  # adapters: a frozen base in dtype, fp32 adapters
    if same and world()[1] == 1:
        # Alone and without a cast, FSDP2 would only add hooks (no communication, the same numbers): the
        # model runs as it is, at full speed (3x faster steps for the CPU demo's small model).
        return model
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    kw = {} if same else {"mp_policy": mp}
    for block in model.layers:
        fully_shard(block, **kw)
    fully_shard(model, **kw)
    return model


class Step:
    """One optimiser step's forward/backward over this rank's share of a global batch."""

    def __init__(self, cfg: ExperimentConfig, objective: Objective, model, ref_model, device):
        self.cfg, self.obj, self.model, self.ref_model, self.device = cfg, objective, model, ref_model, device
        # Token-level objectives, at the first step (before any update): how far the trainer's log-probs are from
        # those the sampler recorded for the trajectories this very model sampled (mdpo.train.MISMATCH).
        self.check_mismatch = False
        self.sampled_by = str(Path(cfg.model.name_or_path).resolve())

    def logprobs(self, examples: list[Example], k: int | None = None):
        """(policy, reference, counts, padded tokens) of the examples' trained sequences: the reference online
        from the frozen copy or from the stored values, in the same order. With k: (policy, reference) of each
        example's k-th reference sequence, without gradients, one micro-batch at a time."""
        if k is not None:
            mb = self.cfg.training.micro_batch_size
            with torch.no_grad():
                parts = [self._logprobs([self.obj.reference_sequences(ex)[k] for ex in examples[s:s + mb]],
                                        [[ex.ref[k]] if ex.ref else None for ex in examples[s:s + mb]])
                         for s in range(0, len(examples), mb)]
            return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        seqs = [t for ex in examples for t in self.obj.sequences(ex)]
        per = len(seqs) // len(examples)
        return self._logprobs(seqs, [ex.ref[:per] if ex.ref else None for ex in examples])

    def _token_logprobs(self, seqs: list[Trajectory]):
        """A token-level objective's micro-batch: per-token policy log-probs with the sampler's recorded ones (and
        the online reference's) at the same tokens, and the per-sequence sums and counts."""
        tokens, lm = batch_tensors(seqs, self.cfg.loss.mask, self.device, self.obj)
        lp, rows, select = masked_token_logprobs(self.model, tokens, lm)
        old = recorded_logprobs(seqs, select)
        ref = None
        if self.obj.reference:  # reference.online (mdpo.config): the frozen copy, or the base with adapters off
            with torch.no_grad():
                if self.ref_model is ADAPTERS_OFF:
                    with adapters_disabled(self.model):
                        ref = masked_token_logprobs(self.model, tokens, lm)[0]
                else:
                    ref = masked_token_logprobs(self.ref_model, tokens, lm)[0]
        n = tokens.shape[0]
        policy = torch.zeros(n, dtype=torch.float32, device=lp.device).index_add(0, rows, lp)
        ref_sums = None if ref is None else torch.zeros(n, device=lp.device).index_add(0, rows, ref)
        return policy, ref_sums, select.sum(-1), tokens.numel(), TokenBatch(lp, old, ref, rows)

    def _logprobs(self, seqs: list[Trajectory], stored: list):
        if self.obj.token_level:
            return self._token_logprobs(seqs)
        tokens, lm = batch_tensors(seqs, self.cfg.loss.mask, self.device, self.obj)
        policy, counts = sequence_logprobs(self.model, tokens, lm)
        ref = None
        if self.obj.reference and self.ref_model is ADAPTERS_OFF:
            with torch.no_grad(), adapters_disabled(self.model):  # the base: the reference, no second model held
                ref = sequence_logprobs(self.model, tokens, lm)[0]
        elif self.obj.reference and self.ref_model is not None:
            with torch.no_grad():
                ref = sequence_logprobs(self.ref_model, tokens, lm)[0]
        elif self.obj.reference:
            ref = torch.tensor([v for row in stored for v in row], device=self.device, dtype=torch.float32)
        return policy, ref, counts, tokens.numel(), None

    def __call__(self, batch: list[Example], mine: list[Example]) -> tuple[dict, int]:
        """Accumulate gradients for this rank's examples; returns the global metric sums and tokens seen."""
        ws = world()[1]
        norm = self.obj.normaliser(batch)  # the same on every rank, without communication
        state = self.obj.step_state(self.logprobs, mine)
        sums: dict[str, list[float]] = {}
        maxes: dict[str, float] = {}
        tokens_seen = 0
        mb = self.cfg.training.micro_batch_size
        for s in range(0, len(mine), mb):  # mine is never empty: G is a multiple of world x micro batch
            exs = mine[s:s + mb]
            policy, ref, counts, n, tok = self.logprobs(exs)
            tokens_seen += n
            if tok is not None and self.check_mismatch:
                own = torch.tensor([bool(t.model) and str(Path(t.model).resolve()) == self.sampled_by
                                    for ex in exs for t in self.obj.sequences(ex)], device=tok.rows.device)
                d = (tok.policy.detach() - tok.old).abs()[own[tok.rows]]
                acc = sums.setdefault("mismatch/mean_abs", [0.0, 0.0])
                acc[0] += float(d.sum())
                acc[1] += float(d.numel())
                top = float(d.max()) if d.numel() else 0.0
                maxes["mismatch/max_abs"] = max(maxes.get("mismatch/max_abs", 0.0), top)
            losses, metrics = self.obj.loss(Batch(policy, ref, counts, exs, state, tok))
            # FSDP averages gradients over ranks (gloo cannot sum with a pre-scale, so its divide factor
            # cannot be set to 1); multiplying by the world size turns that average back into the sum
            # of every rank's share of (sum of per-example losses) / (global normaliser).
            (losses.sum() * ws / norm).backward()
            metrics["loss"] = (losses.detach().sum(), norm / len(batch) * len(exs))
            for key, v in metrics.items():
                if isinstance(v, Max):  # a maximum over the global batch, reduced apart
                    maxes[key] = max(maxes.get(key, float("-inf")), float(v.value))
                    continue
                # A scalar is a mean over the micro-batch's examples; a pair is (sum, count) of a finer mean.
                total, count = v if isinstance(v, tuple) else (v * len(exs), len(exs))
                acc = sums.setdefault(key, [0.0, 0.0])
                acc[0] += float(total)
                acc[1] += float(count)
        keys = sorted(sums)
        packed = torch.tensor([x for k in keys for x in sums[k]] + [float(tokens_seen)], dtype=torch.float64)
        all_reduce_sum(packed)
        out = {k: packed[2 * i].item() / packed[2 * i + 1].item() if packed[2 * i + 1].item() else float("nan")
               for i, k in enumerate(keys)}
        if maxes:  # maxima over ranks: one all-reduce with MAX
            names = sorted(maxes)
            top = all_reduce_max(torch.tensor([maxes[k] for k in names], dtype=torch.float64))
            out.update({k: top[i].item() for i, k in enumerate(names)})
        return out, int(packed[-1].item())


class MetricsLog:
    """metrics.jsonl on rank 0: lines of steps after `start` (a killed run redoes them) are dropped on open.

    tracker: gets every line written, without its step key (metrics.tracker; see mdpo/tracking.py).
    """

    def __init__(self, path: Path, start: int, every: int, rank: int, tracker: Tracker | None = None):
        self.every, self.f, self.tracker = max(1, every), None, tracker or Tracker()
        if rank != 0:
            return
        kept = [ln for ln in path.read_text().splitlines(keepends=True)
                if ln.endswith("\n") and json.loads(ln)["step"] <= start] if path.is_file() else []
        with atomic_open(path) as f:
            f.writelines(kept)
        self.f = open(path, "a", encoding="utf-8")

    def write(self, row: dict, last: bool) -> None:
        if self.f and (row["step"] % self.every == 0 or last):
            faults.write(self.f, json.dumps(row) + "\n", "metrics.write")
            self.f.flush()
            self.tracker.log(scalars({k: v for k, v in row.items() if k != "step"}), row["step"])

    def close(self):
        if self.f:
            self.f.close()
        self.tracker.close()


# ---------------------------------------------------------------- orchestration
def train(cfg: ExperimentConfig, data: str, out, resume: bool = False, max_steps: int | None = None,
          reference: str | None = None, export_every: int = 0) -> dict:
    """Run training; returns the last step's metrics. Works with or without an initialised process group.

    reference: HF-layout folder of the reference model (default: the starting model, cfg.model.name_or_path).
    export_every: also export the weights to OUT/exports/step_N every that many steps (checkpoint selection).
    """
    with process_group():
        return _train(cfg, data, out, resume, max_steps, reference, export_every)


def _train(cfg, data, out, resume, max_steps, reference, export_every) -> dict:
    rank, ws = world()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise TrainError(f"{out}: is a file, not an output folder")
    device = default_device()
    torch.manual_seed(cfg.training.seed)
    random.seed(cfg.training.seed)
    objective = get_objective(cfg.loss)
    check_tracker(cfg)
    reference = reference or cfg.model.name_or_path
    dtype = parse_dtype(cfg.model.dtype)  # the compute dtype; the weights themselves are loaded in fp32
    # The data is read before the weights: a bad file fails in a moment, not after loading a 7B model. The
    # vocabulary size comes from the folder's config.json (load_pretrained reports a folder that has none).
    folder = Path(cfg.model.name_or_path)
    vocab = load_model_config(folder).vocab_size if (folder / "config.json").is_file() else None
    examples, dropped = load_examples(data, objective, cfg.loss.mask, cfg.rollout.max_length, vocab)
    if rank == 0:
        announce(cfg, ws, device)  # what this step will need per rank, before the weights load
    lo = cfg.lora
    # With adapters the base is frozen and only ever used in the compute dtype: loaded in it, it never exists in
    # fp32 (a 7B base: 17 GB in bf16 instead of 34), unless a full embedding / head trains from its fp32 values.
    frozen_dtype = dtype if lo.enabled and not (lo.train_embeddings or lo.train_head) else torch.float32
    model = load_pretrained(cfg.model.name_or_path, dtype=frozen_dtype, device=device, attn_impl=cfg.model.attn_impl)
    if lo.enabled:
        try:
            names = apply_lora(model, lo, dtype, cfg.training.seed)
        except LoRAError as e:
            raise TrainError(str(e)) from None
        if rank == 0:
            n = sum(p.numel() for p in model.parameters() if p.requires_grad)
            print(f"lora: rank {lo.rank}, alpha {lo.alpha:g} on {', '.join(lo.targets)}: {n:,} trainable parameters "
                  f"({100 * n / model.num_params():.2f}%, {len(names)} tensors)", file=sys.stderr)
    G = cfg.training.global_batch_size
    check_batch(cfg, len(examples), data, dropped)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        remove_leftovers(out, cfg.checkpoint.keep)  # a killed run's half-written checkpoints and exports
    barrier()
    shard(model, dtype)
    ref_model = setup_reference(cfg, objective, model, examples, data, reference, dtype, out, device)
    model.activation_checkpointing = cfg.training.activation_checkpointing
    model.train()
    steps_per_epoch = len(examples) // G
    total = max(1, int(cfg.training.epochs * steps_per_epoch))
    opt, sched = make_optimizer(cfg, model, total)
    start = 0
    ckpts = checkpoint_dirs(out)
    if resume and ckpts:
        start = load_checkpoint(ckpts[-1], model, opt, sched)
    orders = data_orders(cfg, len(examples))
    end = total if max_steps is None else min(total, max_steps)
    log = MetricsLog(out / "metrics.jsonl", start, cfg.metrics.log_every, rank,
                     open_tracker(cfg, out, job_of(out), start + 1))
    step_fn = Step(cfg, objective, model, ref_model, device)
    step_fn.check_mismatch = objective.token_level and start == 0
    lora = lo if lo.enabled else None
    last = {}
    bar = tqdm(range(start, end), initial=start, total=total, desc="train", disable=rank != 0)
    for step in bar:
        t0 = time.perf_counter()
        epoch, k = divmod(step, steps_per_epoch)
        batch = [examples[i] for i in orders[epoch][k * G:(k + 1) * G]]
        metrics, tokens_seen = step_fn(batch, batch[rank::ws])
        if not math.isfinite(metrics["loss"]):
            kept = checkpoint_dirs(out)
            raise TrainError(f"non-finite loss ({metrics['loss']}) at step {step}; stopped before the update; "
                             f"last good checkpoint: {kept[-1] if kept else 'none'}")
        if step_fn.check_mismatch:
            step_fn.check_mismatch = False
            check_mismatch(metrics, dtype, out)
        grad_norm = apply_update(cfg, model, opt, sched)
        dt = time.perf_counter() - t0
        last = dict(metrics, step=step + 1, lr=sched.get_last_lr()[0], grad_norm=grad_norm,
                    tokens_per_s=tokens_seen / dt, step_time_s=dt, peak_mem_gb=peak_memory_gb(device))
        if device.type == "cuda":
            # Model FLOPs utilisation against the H100's dense bf16 peak, from the padded batch's tokens.
            seq = max(len(t.tokens) for ex in batch for t in objective.sequences(ex))
            last["mfu"] = model.flops_per_token(seq) * tokens_seen / dt / ws / 989e12
        log.write(last, step + 1 == end)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}")
        if export_every and (step + 1) % export_every == 0 and step + 1 < total:
            export(model, out / "exports" / f"step_{step + 1}", cfg.model.name_or_path, dtype, lora)
        if cfg.checkpoint.every and (step + 1) % cfg.checkpoint.every == 0 and step + 1 < end:
            save_checkpoint(out, step + 1, model, opt, sched, cfg.checkpoint.keep)
    bar.close()
    log.close()
    if end == total:
        export(model, out / "final", cfg.model.name_or_path, dtype, lora)
        from torch.distributed.tensor import DTensor
        if ws == 1 and not lo.enabled and all(p.dtype == dtype and not isinstance(p, DTensor)
                                              for p in model.parameters()):
            # One process, the exported weights exactly: the next rollout here samples from this model in memory.
            model.activation_checkpointing = False
            model.zero_grad(set_to_none=True)
            keep_resident(out / "final", model.eval())
        if rank == 0:
            write_json_atomic(out / "summary.json", {"steps": total, "examples": len(examples), "dropped": dropped,
                                                     "last": last})
    barrier()  # rank 0 writes the exports: no rank returns before they are complete
    return last


# Largest mean |trainer - sampler| per-token log-prob at the first step, per compute dtype, before a token-level
# objective refuses to train. benchmarks/bench_mismatch.py on the demo's SFT model (256 rollouts, ~7.8k model
# tokens) measured a mean of 5.3e-7 in fp32 and 4.8e-4 in bf16 (docs/LOG.md): the limits are ~20x and ~40x that,
# so float rounding passes and a real mismatch (other weights, dtype or tokenizer; a sampler bug) does not.
MISMATCH = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def check_mismatch(metrics: dict, dtype: torch.dtype, out: Path) -> None:
    """Refuse to train on log-probs the trainer does not reproduce (the first step, before any update)."""
    mean, top = metrics.get("mismatch/mean_abs", float("nan")), metrics.get("mismatch/max_abs", 0.0)
    if math.isnan(mean):
        return  # no trajectory of this model in the batch (mixture sampling's previous model only)
    limit = MISMATCH.get(dtype, MISMATCH[torch.bfloat16])
    if mean > limit:
        raise TrainError(f"{out}: the sampler's recorded log-probs differ from this model's forward by {mean:.3g} per "
                         f"token on average (max {top:.3g}; limit {limit:g} in {str(dtype).split('.')[-1]}) at the "
                         "first step: were these rollouts sampled by this model, in this dtype, with this tokenizer?")


def make_optimizer(cfg: ExperimentConfig, model, total: int):
    """AdamW and its warmup + decay schedule over `total` steps."""
    o = cfg.optimizer
    # fused: one kernel for the whole update on CUDA, instead of a chain of elementwise ops over every tensor
    # (the fp32 update of a 2.5B model moves ~70 GB a step).
    # Only what trains: with adapters the frozen base has neither gradients nor optimizer state.
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay,
                            fused=next(model.parameters()).is_cuda)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, total))


def data_orders(cfg: ExperimentConfig, n: int) -> list[list[int]]:
    """One seeded permutation per epoch, so a resumed run sees exactly the same batches."""
    return [random.Random(cfg.training.seed + e).sample(range(n), n) for e in range(math.ceil(cfg.training.epochs) + 1)]


def apply_update(cfg: ExperimentConfig, model, opt, sched) -> float:
    """Clip, step the optimizer and the schedule, clear the gradients; returns the pre-clip global grad norm."""
    # grad_clip 0 = off: the norm is still computed (inf threshold) for the log.
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optimizer.grad_clip or float("inf"))
    if hasattr(grad_norm, "full_tensor"):
        grad_norm = grad_norm.full_tensor()
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return float(grad_norm)


def check_batch(cfg: ExperimentConfig, n: int, data, dropped: dict) -> None:
    G, ws, mb = cfg.training.global_batch_size, world()[1], cfg.training.micro_batch_size
    if G % (ws * mb):
        # Every rank must run the same number of micro-batches, or FSDP's collectives would wait forever.
        raise TrainError(f"training.global_batch_size {G} is not a multiple of world size {ws} x "
                         f"training.micro_batch_size {mb}")
    if n < G:
        raise TrainError(f"{data}: {n} usable examples, fewer than one global batch ({G}); dropped {dropped}")


def setup_reference(cfg, objective, model, examples, data, reference, dtype, out, device):
    """The frozen reference model (reference.online), or None after storing its log-probs in the examples."""
    if not objective.reference:
        return None
    same = Path(reference).resolve() == Path(cfg.model.name_or_path).resolve()
    adapted = cfg.lora.enabled and same
    if adapted and world()[0] == 0:
        which = "the SFT model" if cfg.reference.mode == "sft" else "the previous iteration's merged model"
        print(f"reference: {which} = the policy with its adapters off (no second model held)", file=sys.stderr)

    def load():  # loaded and sharded exactly as the policy is: the same forward
        return shard(load_pretrained(reference, dtype=torch.float32, device=device, attn_impl=cfg.model.attn_impl),
                     dtype)
    if cfg.reference.online:
        # The option the paper's code used: a frozen copy evaluated next to the policy at every step (with
        # adapters on the reference itself: the same policy with them switched off).
        return ADAPTERS_OFF if adapted else load().eval().requires_grad_(False)
    key = reference_key(cfg, objective, data, reference, dtype)
    with adapters_disabled(model):  # B = 0 at step 0, so on or off is the same number; off skips their matmuls
        reference_logprobs(model if same else load(), objective, examples, cfg.loss.mask,
                           first_epoch_groups(cfg, len(examples)), out / "reference.jsonl", key, device)
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mdpo.train", description="M-DPO / M-KTO / SFT training.")
    ap.add_argument("config", help="experiment YAML")
    ap.add_argument("overrides", nargs="*", help="section.key=value")
    ap.add_argument("--data", required=True, help="the objective's training JSONL (pairs or trajectories)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    ap.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (for testing)")
    args = ap.parse_intermixed_args(argv)  # overrides may come after the options

    def body():
        cfg = load_config(args.config, args.overrides)
        cfg.model.name_or_path = resolve_model_ranks(cfg.model.name_or_path)  # a Hub id becomes its local snapshot
        train(cfg, args.data, args.out, resume=args.resume, max_steps=args.max_steps)

    return run_cli(body, (ConfigError, TrainError, CheckpointError, HubError))


if __name__ == "__main__":
    sys.exit(main())
