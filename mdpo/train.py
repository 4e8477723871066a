"""Preference (M-DPO, M-KTO) and SFT training: one process, or many under torchrun with FSDP2.

    python -m mdpo.train CONFIG --data PAIRS.jsonl --out DIR [--resume] [section.key=value ...]
    torchrun --nproc_per_node 8 -m mdpo.train CONFIG --data PAIRS.jsonl --out DIR

Data: for loss.type mdpo, one JSON object per line {"chosen": trajectory, "rejected": trajectory} (the
trajectory records of mdpo.trajectory); for mkto, one trajectory per line whose `correct` field labels it
desirable or not; for sft, one trajectory per line. Reference log-probs are computed
once, before training, with the starting model and this trainer's own forward (the reference is fixed within
an iteration, so no reference model is held during training); they are stored in OUT/reference.jsonl.

Each optimiser step takes training.global_batch_size examples in a seeded order; each rank takes every
world-th of them and runs them in micro-batches. Per-example losses are summed and divided by the global
batch size, and the ranks' gradients add up to that (see the backward call), so the update is the same for
any number of processes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from mdpo.config import ConfigError, ExperimentConfig, load_config, save_config
from mdpo.logprobs import sequence_logprobs
from mdpo.losses import dpo_loss, kto_kl_estimate, kto_loss, sft_loss
from mdpo.model import Gemma
from mdpo.trajectory import Trajectory, TrajectoryError, read_jsonl
from mdpo.atomic import atomic_open, write_json_atomic
from mdpo.weights import CheckpointError


class TrainError(RuntimeError):
    """Training cannot go on; the message says why and what was kept."""


@dataclass
class Example:
    """One training unit: a (chosen, rejected) pair for DPO, or one trajectory for SFT."""

    seqs: list[Trajectory]
    ref: list[float] | None = None
    tokens: int = 0  # trained tokens of the first sequence (the SFT loss's normaliser)


def load_examples(path, kind: str, mask: str, max_length: int, vocab_size: int) -> tuple[list[Example], dict]:
    """Read pairs (mdpo) or trajectories (sft); drop unusable ones and count why."""
    examples, dropped = [], {"empty_mask": 0, "too_long": 0}
    for where, d in read_jsonl(path, TrainError):
        try:
            if kind == "mdpo":
                if not isinstance(d, dict) or "chosen" not in d or "rejected" not in d:
                    raise TrainError(f"{where}: a pair needs 'chosen' and 'rejected'")
                seqs = [Trajectory.from_dict(d[k], where) for k in ("chosen", "rejected")]
            else:
                seqs = [Trajectory.from_dict(d, where)]
        except TrajectoryError as e:
            raise TrainError(str(e)) from None
        for t in seqs:
            if t.tokens and max(t.tokens) >= vocab_size:
                raise TrainError(f"{where}: token id {max(t.tokens)} >= the model's vocabulary ({vocab_size}); "
                                 "was this data made with another tokenizer?")
        if kind == "mkto" and seqs[0].correct is None:
            raise TrainError(f"{where}: M-KTO needs each trajectory's 'correct' label (desirable or not)")
        # Truncation policy: an example longer than max_length is dropped whole (cutting it would drop
        # its final answer, which is what made it chosen or rejected), and counted.
        if any(len(t.tokens) > max_length for t in seqs):
            dropped["too_long"] += 1
        elif any(not any(t.loss_mask(mask)[1:]) for t in seqs):
            dropped["empty_mask"] += 1  # nothing to train on: the loss would be a constant
        else:
            examples.append(Example(seqs, tokens=sum(seqs[0].loss_mask(mask)[1:])))
    if kind == "mkto":
        add_kl_sequences(examples)
    return examples, dropped


def add_kl_sequences(examples: list[Example]):
    """Give each KTO example its mismatched sequence for the KL estimate z0 (paper eq. 15, as in KTO).

    Example i's prompt is followed by example (i + 1)'s completion, roles included (so its tool turns stay
    masked). The partner is fixed by file order, not by batch, so the reference log-probs can be computed
    once before training.
    """
    n = len(examples)
    for i, ex in enumerate(examples):
        a, b = ex.seqs[0], examples[(i + 1) % n].seqs[0]
        pa, pb = a.prompt_len, b.prompt_len
        ex.seqs.append(Trajectory(a.prompt_id, -1, a.tokens[:pa] + b.tokens[pb:], a.roles[:pa] + b.roles[pb:],
                                  a.turns[:pa] + b.turns[pb:]))


def batch_tensors(seqs: list[Trajectory], mask: str, device):
    """Right-padded (N, T) tokens and the (N, T) loss mask."""
    T = max(len(t.tokens) for t in seqs)
    tokens = torch.zeros(len(seqs), T, dtype=torch.long)
    loss_mask = torch.zeros(len(seqs), T, dtype=torch.bool)
    for i, t in enumerate(seqs):
        tokens[i, : len(t.tokens)] = torch.tensor(t.tokens)
        loss_mask[i, : len(t.tokens)] = torch.tensor(t.loss_mask(mask))
    return tokens.to(device), loss_mask.to(device)


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if world()[1] > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)  # SUM: gloo has no AVG
    return x


@torch.no_grad()
def reference_logprobs(model: Gemma, examples: list[Example], mask: str, micro: int, cache: Path, device):
    """Fill each example's reference log-probs with the starting model; cached in `cache` (one line each)."""
    rank, ws = world()
    if cache.is_file():
        vals = [json.loads(line) for line in cache.read_text().splitlines() if line.strip()]
        if len(vals) == len(examples):
            for ex, v in zip(examples, vals):
                ex.ref = v
            return
    model.eval()
    out = torch.zeros(len(examples), len(examples[0].seqs), dtype=torch.float64)
    mine = list(range(rank, len(examples), ws))
    for s in tqdm(range(0, len(mine), micro), desc="reference log-probs", disable=rank != 0):
        idx = mine[s:s + micro]
        seqs = [t for i in idx for t in examples[i].seqs]
        tokens, lm = batch_tensors(seqs, mask, device)
        sums, _ = sequence_logprobs(model, tokens, lm)
        out[idx] = sums.double().view(len(idx), -1).cpu()
    all_reduce_sum(out)
    for ex, v in zip(examples, out.tolist()):
        ex.ref = v
    if rank == 0:
        with atomic_open(cache) as f:
            f.write("".join(json.dumps(v) + "\n" for v in out.tolist()))
    model.train()


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


def shard(model: Gemma):
    """FSDP2: each block is its own unit, the root (embedding, shared with the head, and final norm) another."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = None
    if model.embed_tokens.weight.is_cuda:
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    kw = {"mp_policy": mp} if mp else {}
    for block in model.layers:
        fully_shard(block, **kw)
    fully_shard(model, **kw)
    return model


def checkpoint_dirs(out: Path) -> list[Path]:
    ckpts = [p for p in (out / "checkpoints").glob("step_*") if p.is_dir() and not p.name.endswith(".tmp")]
    return sorted(ckpts, key=lambda p: int(p.name.split("_")[1]))


def save_checkpoint(out: Path, step: int, model, opt, sched, keep: int):
    """torch.distributed.checkpoint into step_N.tmp, renamed to step_N when every rank has written."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    rank, _ = world()
    final = out / "checkpoints" / f"step_{step}"
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    if world()[1] > 1:
        dist.barrier()
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp))
    if world()[1] > 1:
        dist.barrier()
    if rank == 0:
        torch.save({"step": step, "scheduler": sched.state_dict(), "rng": torch.get_rng_state(),
                    "py_rng": random.getstate()}, tmp / "trainer_state.pt")
        os.replace(tmp, final)  # the rename is the commit point: a kill before it leaves the old one
        for old in checkpoint_dirs(out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    if world()[1] > 1:
        dist.barrier()


def load_checkpoint(path: Path, model, opt, sched) -> int:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    extra = torch.load(path / "trainer_state.pt", weights_only=False)
    sched.load_state_dict(extra["scheduler"])
    torch.set_rng_state(extra["rng"])
    random.setstate(extra["py_rng"])
    return extra["step"]


def export(model, folder: Path, source: str):
    """The weights as an HF-layout folder (+ the source's tokenizer), written beside and renamed into place."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if world()[0] != 0:
        return
    with torch.device("meta"):
        plain = Gemma(model.config)
    plain = plain.to_empty(device="cpu")
    plain.load_state_dict(sd, strict=True)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tok = None
    if (Path(source) / "tokenizer.model").is_file():
        from mdpo.tokenizer import Tokenizer
        tok = Tokenizer.from_pretrained(source)
    plain.save_pretrained(tmp, tokenizer=tok)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)  # a folder under its final name is always complete


def train(cfg: ExperimentConfig, data: str, out, resume: bool = False, max_steps: int | None = None,
          reference: str | None = None, export_every: int = 0) -> dict:
    """Run training; returns the last step's metrics. Works with or without an initialised process group.

    reference: HF-layout folder of the reference model (default: the starting model, cfg.model.name_or_path).
    export_every: also export the weights to OUT/exports/step_N every that many steps (checkpoint selection).
    """
    rank, ws = world()
    out = Path(out)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    torch.manual_seed(cfg.training.seed)
    random.seed(cfg.training.seed)
    kind = "sft" if cfg.loss.type == "raft" else cfg.loss.type  # RAFT is SFT on correct rollouts
    reference = reference or cfg.model.name_or_path
    model = Gemma.from_pretrained(cfg.model.name_or_path, dtype=torch.float32, device=device,
                                  attn_impl=cfg.model.attn_impl)
    examples, dropped = load_examples(data, kind, cfg.loss.mask, cfg.rollout.max_length, model.config.vocab_size)
    G = cfg.training.global_batch_size
    if G % (ws * cfg.training.micro_batch_size):
        # Every rank must run the same number of micro-batches, or FSDP's collectives would wait forever.
        raise TrainError(f"training.global_batch_size {G} is not a multiple of world size {ws} x "
                         f"training.micro_batch_size {cfg.training.micro_batch_size}")
    if len(examples) < G:
        raise TrainError(f"{data}: {len(examples)} usable examples, fewer than one global batch ({G}); "
                         f"dropped {dropped}")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    if ws > 1:
        dist.barrier()
    ref_model = None
    if kind in ("mdpo", "mkto") and cfg.reference.online:
        # The option the paper's code used: a frozen copy evaluated next to the policy at every step.
        ref_model = Gemma.from_pretrained(reference, dtype=torch.float32, device=device,
                                          attn_impl=cfg.model.attn_impl).eval().requires_grad_(False)
        if ws > 1:
            shard(ref_model)
    elif kind in ("mdpo", "mkto"):
        ref = model
        if Path(reference).resolve() != Path(cfg.model.name_or_path).resolve():
            ref = Gemma.from_pretrained(reference, dtype=torch.float32, device=device, attn_impl=cfg.model.attn_impl)
        reference_logprobs(ref, examples, cfg.loss.mask, cfg.training.micro_batch_size, out / "reference.jsonl",
                           device)
        del ref
    if ws > 1:
        shard(model)
    model.activation_checkpointing = cfg.training.activation_checkpointing
    model.train()
    o = cfg.optimizer
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    steps_per_epoch = len(examples) // G
    total = max(1, int(cfg.training.epochs * steps_per_epoch))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, total))
    start = 0
    ckpts = checkpoint_dirs(out)
    if resume and ckpts:
        start = load_checkpoint(ckpts[-1], model, opt, sched)
    # Data order: one seeded permutation per epoch, so a resumed run sees exactly the same batches.
    orders = [random.Random(cfg.training.seed + e).sample(range(len(examples)), len(examples))
              for e in range(math.ceil(cfg.training.epochs) + 1)]
    end = total if max_steps is None else min(total, max_steps)
    metrics_f = None
    if rank == 0:
        # Keep the lines of the steps before `start` only: a killed run may have logged steps it must redo.
        path = out / "metrics.jsonl"
        kept = [ln for ln in path.read_text().splitlines(keepends=True)
                if ln.endswith("\n") and json.loads(ln)["step"] <= start] if path.is_file() else []
        with atomic_open(path) as f:
            f.writelines(kept)
        metrics_f = open(path, "a", encoding="utf-8")
    last = {}
    bar = tqdm(range(start, end), initial=start, total=total, desc="train", disable=rank != 0)
    for step in bar:
        t0 = time.perf_counter()
        epoch, k = divmod(step, steps_per_epoch)
        batch = orders[epoch][k * G:(k + 1) * G]
        mine = batch[rank::ws]
        # Normaliser of the summed per-example losses: the global batch size, or for SFT its number of trained
        # tokens (a token-level mean over the whole batch, the same on every rank without communication).
        norm = G if kind != "sft" else sum(examples[i].tokens for i in batch)
        sums = {}
        tokens_seen = 0
        mb = cfg.training.micro_batch_size
        if kind == "mkto":
            kl = kto_reference_point(model, ref_model, examples, mine, cfg.loss.mask, mb, device)
        for s in range(0, len(mine), mb):  # mine is never empty: G is a multiple of world x micro batch
            idx = mine[s:s + mb]
            # DPO: chosen, rejected of each pair (interleaved); KTO: the trajectory only (its KL partner was
            # used above); SFT: the trajectory.
            seqs = [t for i in idx for t in (examples[i].seqs if kind == "mdpo" else examples[i].seqs[:1])]
            tokens, lm = batch_tensors(seqs, cfg.loss.mask, device)
            lp, counts = sequence_logprobs(model, tokens, lm)
            tokens_seen += tokens.numel()
            if kind != "sft":
                # Reference log-probs in the same (flat) order as lp: online from the frozen copy, or stored.
                if ref_model is not None:
                    with torch.no_grad():
                        ref = sequence_logprobs(ref_model, tokens, lm)[0]
                else:
                    per = len(seqs) // len(idx)
                    ref = torch.tensor([examples[i].ref[k] for i in idx for k in range(per)], device=device,
                                       dtype=torch.float32)
            if kind == "mdpo":
                losses, m = dpo_loss(lp[0::2], lp[1::2], ref[0::2], ref[1::2], beta=cfg.loss.beta,
                                     loss_type=cfg.loss.dpo_variant, label_smoothing=cfg.loss.label_smoothing,
                                     nll_coef=cfg.loss.nll_coef, chosen_tokens=counts[0::2])
            elif kind == "mkto":
                desirable = torch.tensor([bool(examples[i].seqs[0].correct) for i in idx], device=device)
                losses, m = kto_loss(lp, ref, desirable, kl, beta=cfg.loss.beta,
                                     desirable_weight=cfg.loss.desirable_weight,
                                     undesirable_weight=cfg.loss.undesirable_weight)
                m = {k: v for k, v in m.items() if k in ("kl", "logps/policy")}  # class means can be empty
            else:
                losses, m = sft_loss(lp, counts)
            # FSDP averages gradients over ranks (gloo cannot sum with a pre-scale, so its divide factor
            # cannot be set to 1); multiplying by the world size turns that average back into the sum
            # of every rank's share of (sum of per-example losses) / (global batch size).
            (losses.sum() * ws / norm).backward()
            for key, v in m.items():
                sums[key] = sums.get(key, 0.0) + float(v) * len(idx)
            sums["loss"] = sums.get("loss", 0.0) + float(losses.detach().sum())
        packed = torch.tensor([sums.get(k, 0.0) for k in sorted(METRIC_KEYS[kind])] + [float(tokens_seen)],
                              dtype=torch.float64)
        all_reduce_sum(packed)
        loss = packed[sorted(METRIC_KEYS[kind]).index("loss")].item() / norm
        if not math.isfinite(loss):
            kept = checkpoint_dirs(out)
            raise TrainError(f"non-finite loss ({loss}) at step {step}; stopped before the update; last good "
                             f"checkpoint: {kept[-1] if kept else 'none'}")
        # grad_clip 0 = off: the norm is still computed (inf threshold) for the log.
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optimizer.grad_clip or float("inf"))
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        last = {k: packed[i].item() / G for i, k in enumerate(sorted(METRIC_KEYS[kind]))}
        last["loss"] = loss
        last.update(step=step + 1, lr=sched.get_last_lr()[0], grad_norm=float(grad_norm),
                    tokens_per_s=packed[-1].item() / dt, step_time_s=dt, peak_mem_gb=peak_memory_gb(device))
        if device.type == "cuda":
            # Model FLOPs utilisation against the H100's dense bf16 peak, from the padded batch's tokens.
            flops = model.flops_per_token(tokens.shape[1]) * packed[-1].item() / dt / ws  # per GPU
            last["mfu"] = flops / 989e12
        if rank == 0:
            metrics_f.write(json.dumps(last) + "\n")
            metrics_f.flush()
            bar.set_postfix(loss=f"{loss:.4f}")
        if export_every and (step + 1) % export_every == 0 and step + 1 < total:
            export(model, out / "exports" / f"step_{step + 1}", cfg.model.name_or_path)
        if cfg.checkpoint.every and (step + 1) % cfg.checkpoint.every == 0 and step + 1 < end:
            save_checkpoint(out, step + 1, model, opt, sched, cfg.checkpoint.keep)
    bar.close()
    if metrics_f:
        metrics_f.close()
    if end == total:
        export(model, out / "final", cfg.model.name_or_path)
        if rank == 0:
            write_json_atomic(out / "summary.json", {"steps": total, "examples": len(examples), "dropped": dropped,
                                                     "last": last})
    if ws > 1:
        dist.barrier()  # rank 0 writes the exports: no rank returns before they are complete
    return last


@torch.no_grad()
def kto_reference_point(model, ref_model, examples, mine, mask, mb, device) -> torch.Tensor:
    """z0 for this step: mean policy-minus-reference log-ratio of the KL sequences of the global batch."""
    policy, ref = [], []
    for s in range(0, len(mine), mb):
        idx = mine[s:s + mb]
        tokens, lm = batch_tensors([examples[i].seqs[1] for i in idx], mask, device)
        policy.append(sequence_logprobs(model, tokens, lm)[0])
        if ref_model is not None:
            ref.append(sequence_logprobs(ref_model, tokens, lm)[0])
        else:
            ref.append(torch.tensor([examples[i].ref[1] for i in idx], device=device))
    # Every rank holds G / world examples, so the mean of the rank means is the global-batch mean.
    return kto_kl_estimate(torch.cat(policy), torch.cat(ref))


def peak_memory_gb(device) -> float:
    """Peak accelerator memory allocated, or on the CPU the process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


METRIC_KEYS = {
    "mdpo": {"loss", "rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy", "logps/chosen",
             "logps/rejected"},
    "sft": {"loss", "nll"},
    "mkto": {"loss", "kl", "logps/policy"},
}


def init_distributed() -> None:
    """Join the torchrun process group when launched by torchrun (NCCL on GPUs, gloo on CPUs)."""
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))


def run_cli(body, errors: tuple) -> int:
    """A CLI's body inside the torchrun process group: 0 on success, 2 and one line on `errors`."""
    init_distributed()
    try:
        body()
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mdpo.train", description="M-DPO / M-KTO / SFT training.")
    ap.add_argument("config", help="experiment YAML")
    ap.add_argument("overrides", nargs="*", help="section.key=value")
    ap.add_argument("--data", required=True, help="pairs JSONL (mdpo) or trajectories JSONL (sft)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    ap.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (for testing)")
    args = ap.parse_intermixed_args(argv)  # overrides may come after the options
    return run_cli(lambda: train(load_config(args.config, args.overrides), args.data, args.out, resume=args.resume,
                                 max_steps=args.max_steps), (ConfigError, TrainError, CheckpointError))


if __name__ == "__main__":
    sys.exit(main())
