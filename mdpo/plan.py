"""What a run needs in accelerator memory, before it starts: training and rollout, per GPU, with a verdict.

    python -m mdpo.plan CONFIG [section.key=value ...] [--gpus 1] [--gpu-gb 80] [--model NAME_OR_FOLDER]

Training (FSDP2 over `--gpus` ranks, bytes per rank) peaks at weights + optimizer states, which live all step,
plus the largest of five moments of one micro-batch step:
  forward          activations + the head's chunk of logits
  head backward    activations + the chunk + the head's (V, d) fp32 gradient, when the head trains
  blocks backward  activations + a recomputed block (checkpointing) and a block's working set
  backward end     every gradient + the embedding lookup's dense gradient, when the embedding trains
  optimizer step   every gradient + (AdamW unfused, as on the CPU) two temporaries of the largest tensor
with
  weights      fp32 masters of what trains, sharded (4 N_train / W); a frozen LoRA base in the compute dtype,
               sharded (b N_frozen / W); and, when FSDP casts or gathers, the unsharded compute-dtype copies it
               holds at once: the root unit (embedding, head) all step and two blocks (running, prefetched).
  gradients    fp32, sharded, of what trains, plus one block's unsharded ones in flight; gradients of earlier
               micro-batches are carried through every moment when a step accumulates several.
  optimizer    AdamW's two fp32 moments of what trains (8 N_train / W).
  activations  what autograd keeps for backward, *measured* by running one block of the real shape on a few
               probe tokens (saved tensors, counted once per storage; parameters, the block's input and the shared
               RoPE tables excluded; linear in tokens, plus a quadratic term for eager attention), times the
               layers; with activation checkpointing each block's input instead. Plus the embedding output, the
               final norm and the hidden states handed to the head.
  head         mdpo.logprobs' one (512, V) fp32 chunk of logits (in bf16 beside its bf16 product), and the
               head's fp32 gradient accumulator (bf16: beside each chunk's product and its fp32 cast).
Rollout (each rank runs its own sampler): the compute-dtype weights, the KV pool (rollout.kv_cache_gb, else
rollout.batch_size rows of rollout.max_length capped at 90% of what the weights leave) and how many rows of a
typical length (--typical-length) it admits.

Why measure the activations instead of a formula: what autograd saves depends on the code (fp32 norms, which
linears are frozen, the attention kernel), and a formula drifts from the code the day either changes; one block
on a few tokens is exact for today's code and costs a second. The whole estimate is checked against measured
peaks in benchmarks/bench_train.py (docs/memory.md).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mdpo.config import ConfigError, ExperimentConfig, load_config
from mdpo.model import ModelConfig, build_model
from mdpo.weights import CheckpointError, load_config as load_model_config, parse_dtype

GB = 2 ** 30
HEADROOM = 0.92  # the share of the card a plan may fill: the CUDA context, allocator caching and fragmentation
PROBE_TOKENS = 64  # one block on this many tokens (2 rows of 32): saved bytes are linear in tokens
CHUNK = 512  # mdpo.logprobs' default chunk of rows whose (chunk, V) fp32 logits exist at once


class PlanError(ValueError):
    """The plan cannot be made; the message says what to pass instead."""


@dataclass
class Plan:
    """Bytes per GPU of one training step and of rollout; `lines()` renders them.

    Training's peak is the weights and optimizer states (there all step long) plus the largest of the moments of
    the micro-batch step in `phases` (the module docstring)."""

    what: str
    gpu_bytes: int
    train: dict[str, int] = field(default_factory=dict)  # weights, optimizer, activations, head_*, gradients
    phases: dict[str, int] = field(default_factory=dict)  # moment of the step -> bytes beyond weights + optimizer
    rollout: dict[str, int] = field(default_factory=dict)  # weights, kv_pool
    rows: int = 0  # rows of typical length the KV pool admits
    typical: int = 700
    knobs: list[str] = field(default_factory=list)
    device: str = "GPU"
    checkpointing: bool = False  # training.activation_checkpointing of the plan

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)

    @property
    def train_total(self) -> int:
        return self.train["weights"] + self.train["optimizer"] + self.phases[self.peak_phase]

    @property
    def rollout_total(self) -> int:
        return sum(self.rollout.values())

    def fits(self, part: str) -> bool:
        return (self.train_total if part == "train" else self.rollout_total) <= HEADROOM * self.gpu_bytes

    def lines(self) -> list[str]:
        def gb(x):
            return f"{x / GB:.1f}"
        t = self.train
        verdict = "fits" if self.fits("train") else "does NOT fit"
        out = [f"plan: {self.what}",
               f"plan: training {gb(self.train_total)} GB per {self.device} = weights {gb(t['weights'])} + optimizer "
               f"{gb(t['optimizer'])} + {gb(self.phases[self.peak_phase])} at the peak ({self.peak_phase}): "
               f"{verdict} in {gb(self.gpu_bytes)} GB (budget {gb(HEADROOM * self.gpu_bytes)})",
               f"plan:   activations {gb(t['activations'])} (checkpointing {'off' if self.checkpointing else 'on'}: "
               f"{gb(t['activations_other'])}), head logits {gb(t['head_logits'])}, head gradient "
               f"{gb(t['head_gradient'])}, gradients {gb(t['gradients'])}; "
               + ", ".join(f"{k} {gb(v)}" for k, v in self.phases.items()),
               f"plan: rollout {gb(self.rollout_total)} GB = weights {gb(self.rollout['weights'])} + KV pool "
               f"{gb(self.rollout['kv_pool'])} ({self.rows} rows of {self.typical} tokens): "
               f"{'fits' if self.fits('rollout') else 'does NOT fit'}"]
        out += [f"plan: to fit, {k}" for k in self.knobs]
        return out


def model_config(cfg: ExperimentConfig, model: str | None = None) -> ModelConfig:
    """The architecture: `model` (a preset name or an HF folder), else model.name_or_path as a folder, a preset or a
    Hub id already in the local cache."""
    name = model or cfg.model.name_or_path
    if Path(name).is_dir():
        return load_model_config(name)
    try:
        return ModelConfig.from_name(name)
    except (KeyError, ValueError):
        pass
    try:  # a Hub id already downloaded: its config.json from the local cache, never the network
        from huggingface_hub import try_to_load_from_cache
        found = try_to_load_from_cache(name, "config.json")
        if isinstance(found, str):
            return load_model_config(Path(found).parent)
    except Exception:  # noqa: BLE001 - no hub extra, or not an id: the same advice below
        pass
    raise PlanError(f"model {name!r}: not a folder, a preset or a cached Hub model; pass --model with a preset "
                        "(e.g. gemma-7b, mistral-7b-v0.3) or a folder holding its config.json")


_SAVED: dict[str, tuple[float, float]] = {}


def saved_bytes(config: ModelConfig, dtype: torch.dtype, cfg: ExperimentConfig) -> tuple[float, float]:
    """(a, q): autograd keeps a L + q L^2 bytes for one block and one row of L tokens, measured on the CPU with one
    block of the real shape (random weights) at two probe lengths. q is 0 but for eager attention (Gemma 2's
    soft-cap), whose scores and probabilities are kept. Cached per shape and setting (the knobs replan)."""
    key = repr((config, dtype, cfg.model.attn_impl, cfg.lora))
    if key not in _SAVED:
        _SAVED[key] = _probe(config, dtype, cfg)
    return _SAVED[key]


def _probe(config: ModelConfig, dtype: torch.dtype, cfg: ExperimentConfig) -> tuple[float, float]:
    from dataclasses import replace

    from mdpo.lora import apply_lora

    # One block of the larger kind: a full-attention one (a sliding window longer than the probe changes nothing).
    kind = "full" if "full" in config.layer_types else "sliding"
    model = build_model(replace(config, num_layers=1, layer_types=[kind], vocab_size=8), dtype=dtype, seed=0,
                        attn_impl=cfg.model.attn_impl)
    if cfg.lora.enabled:
        apply_lora(model, cfg.lora, dtype, seed=0)
        for p in model.parameters():
            p.data = p.data.to(dtype)  # under FSDP2 the fp32 adapters run in the compute dtype too
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}
    shared: set[int] = set()

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in shared:
            seen[st.data_ptr()] = st.nbytes()
        return t

    ctx = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)

    def enter(_, args):
        # The block as it runs in the middle of a model: its input carries gradients (with a frozen base the
        # embedding output would not). Not the block's own: that input (the previous block's output, counted
        # there), the RoPE tables and masks every block shares, and the parameters.
        x = args[0].detach().requires_grad_(True)
        shared.clear()
        shared.update(params, {x.untyped_storage().data_ptr()},
                      {t.untyped_storage().data_ptr() for pair in args[1].values() for t in pair if t is not None},
                      {m.untyped_storage().data_ptr() for m in args[2].values() if m is not None})
        ctx.__enter__()
        return (x, *args[1:])

    def leave(*_):
        ctx.__exit__(None, None, None)

    model.layers[0].register_forward_pre_hook(enter)
    model.layers[0].register_forward_hook(leave)

    def measure(T: int) -> int:
        seen.clear()  # a storage saved by several ops is kept once
        model(torch.zeros(1, T, dtype=torch.long), return_hidden=True)
        return sum(seen.values())

    t1 = PROBE_TOKENS // 2
    s1, s2 = measure(t1), measure(2 * t1)
    q = max(0.0, (s2 - 2 * s1) / (2 * t1 * t1))
    return (s1 - q * t1 * t1) / t1, q


def plan(cfg: ExperimentConfig, gpus: int = 1, gpu_gb: float = 80.0, model: str | None = None,
         typical: int = 700, micro_batch: int | None = None, seq_len: int | None = None, knobs: bool = True,
         device_name: str = "GPU", fused_optimizer: bool = True) -> Plan:
    """The memory plan of `cfg` on `gpus` GPUs of `gpu_gb` GB each (see the module docstring); `knobs`: also say
    what would make a plan that does not fit fit; `fused_optimizer`: AdamW runs fused (train.py on CUDA), else
    tensor by tensor (on the CPU), with two temporaries the size of the tensor being updated."""
    c = model_config(cfg, model)
    dtype = parse_dtype(cfg.model.dtype)
    b, W = dtype.itemsize, gpus
    meta = build_model(c, device="meta", init=False)
    n_all = sum(p.numel() for p in meta.parameters())
    V, d = c.vocab_size, c.hidden_size
    embed = V * d
    head = 0 if c.tie_embeddings else embed
    lo = cfg.lora
    if lo.enabled:
        from mdpo.lora import apply_lora
        apply_lora(meta, lo, dtype, seed=0)
        head_trains, embed_trains = lo.train_embeddings or lo.train_head, lo.train_embeddings
    else:
        head_trains = embed_trains = True
    n_train = sum(p.numel() for p in meta.parameters() if p.requires_grad)
    n_frozen = sum(p.numel() for p in meta.parameters() if not p.requires_grad)
    block_all = sum(p.numel() for p in meta.layers[0].parameters())
    block_train = sum(p.numel() for p in meta.layers[0].parameters() if p.requires_grad)
    cast = b != 4 or W > 1  # FSDP2 then holds unsharded compute-dtype copies
    # Sharded fp32 masters of what trains, the frozen base sharded in the compute dtype, and under FSDP2 the
    # gathered copies: the root unit (embedding, head) all step and two blocks (one running, one prefetched).
    weights = 4 * n_train // W + b * n_frozen // W + (b * (embed + head + 2 * block_all) if cast else 0)
    optim = 8 * n_train // W  # AdamW's two fp32 moments
    # fp32 sharded gradients of what trains, plus one block's unsharded ones on their way to the reduce-scatter.
    grads = 4 * n_train // W + (b * block_train if cast else 0)

    # One micro-batch: a DPO pair is two sequences, an SFT / KTO example one.
    from mdpo.objectives import get_objective
    per_example = 2 if get_objective(cfg.loss).data == "pairs" else 1
    mb = micro_batch or cfg.training.micro_batch_size
    rows, L = per_example * mb, seq_len or cfg.rollout.max_length
    n = rows * L
    a, q = saved_bytes(c, dtype, cfg)
    block = int(rows * (a * L + q * L * L))  # one block's saved tensors for the micro-batch
    ckpt = cfg.training.activation_checkpointing
    # Blocks (each block's input only, with checkpointing), the embedding output and final norm's saved tensors
    # and the hidden states handed to the head.
    outside = n * d * (3 * b + 4)
    acts = c.num_layers * (n * d * b if ckpt else block) + outside
    acts_other = c.num_layers * (block if ckpt else n * d * b) + outside  # the other checkpointing setting
    # mdpo.logprobs: one chunk's fp32 logits at a time (in bf16, beside the bf16 product they are cast from).
    cv = min(CHUNK, n) * V
    head_logits = cv * (4 + (b if b != 4 else 0))
    # The head's gradient: a (V, d) fp32 accumulator; in bf16 each chunk's product is bf16, then cast to fp32.
    head_grad = (4 * (embed if c.tie_embeddings else head) + ((b + 4) * embed if b != 4 else 0)) if head_trains else 0
    steps = max(1, cfg.training.global_batch_size // (mb * W))
    carried = grads - (b * block_train if cast else 0) if steps > 1 else 0  # earlier micro-batches' gradients
    # The embedding lookup's dense gradient (compute dtype) lands at the end of backward when the embedding trains.
    lookup = (b if cast else 4) * embed if embed_trains else 0
    # While blocks run backward: a recomputed block (checkpointing) and a block's working set (~its saved tensors).
    work = block * (2 if ckpt else 1)
    # AdamW's step: every gradient, and unfused, sqrt(v) and its bias correction for the largest tensor at once.
    largest = max((p.numel() for p in meta.parameters() if p.requires_grad), default=0)
    update = grads + (0 if fused_optimizer else 8 * largest // W)
    phases = {"forward": carried + acts + head_logits,
              "head backward": carried + acts + head_logits + head_grad,
              "blocks backward": carried + acts + work + (4 * embed if head_trains else 0),
              "backward end": grads + lookup,
              "optimizer step": update}
    p = Plan(what="", gpu_bytes=int(gpu_gb * GB), typical=typical, device=device_name, checkpointing=ckpt,
             train={"weights": int(weights), "optimizer": int(optim), "activations": int(acts),
                    "head_logits": int(head_logits), "head_gradient": int(head_grad), "gradients": int(grads),
                    "activations_other": int(acts_other)},
             phases={k: int(v) for k, v in phases.items()})
    # Rollout: the sampler's own weights in the compute dtype, and its KV pool.
    kv_tok = 2 * c.num_layers * c.num_kv_heads * c.head_dim * b
    r = cfg.rollout
    left = max(0, int(HEADROOM * p.gpu_bytes) - b * n_all)
    pool = int(r.kv_cache_gb * GB) if r.kv_cache_gb is not None else min(r.batch_size * r.max_length * kv_tok,
                                                                          int(0.9 * left))
    p.rollout = {"weights": b * n_all, "kv_pool": pool}
    p.rows = pool // (kv_tok * typical)
    adapters = f"LoRA rank {lo.rank}: {n_train / 1e6:.1f}M trainable" if lo.enabled else "full fine-tuning"
    size = f"{n_all / 1e9:.2f}B" if n_all >= 1e9 else f"{n_all / 1e6:.1f}M"
    p.what = (f"{c.family} {size} parameters, {adapters}, {cfg.model.dtype}, {W} {device_name}"
              f"{'s' if W > 1 else ''} x {gpu_gb:.1f} GB, micro-batch {rows} x {L} tokens, activation checkpointing "
              f"{'on' if ckpt else 'off'}")
    if knobs and not p.fits("train"):
        p.knobs = _knobs(cfg, gpus, gpu_gb, model, typical, micro_batch, seq_len, device_name, fused_optimizer)
    if not p.fits("rollout"):
        p.knobs.append("rollout.kv_cache_gb lower or rollout.batch_size smaller (the KV pool)")
    return p


def _knobs(cfg, gpus, gpu_gb, model, typical, micro_batch, seq_len, device_name, fused) -> list[str]:
    """Each knob that changes the training plan, with the plan it gives: the same function on the changed config."""
    from dataclasses import replace

    def then(c, w=gpus, mb=micro_batch):
        q = plan(c, w, gpu_gb, model, typical, mb, seq_len, False, device_name, fused)
        return f"{q.train_total / GB:.1f} GB ({'fits' if q.fits('train') else 'still does not fit'})"

    out = []
    t = cfg.training
    if not t.activation_checkpointing:
        out.append("training.activation_checkpointing=true: " + then(
            replace(cfg, training=replace(t, activation_checkpointing=True))))
    if not cfg.lora.enabled:
        out.append(f"lora.enabled=true (no gradients or optimizer state for the base, the base in {cfg.model.dtype}): "
                   + then(replace(cfg, lora=replace(cfg.lora, enabled=True))))
    if (micro_batch or t.micro_batch_size) > 1:
        out.append("training.micro_batch_size=1: " + then(cfg, mb=1))
    for w in (2, 4, 8, 16, 32, 64):
        if w > gpus and plan(cfg, w, gpu_gb, model, typical, micro_batch, seq_len, False, device_name,
                             fused).fits("train"):
            out.append(f"more GPUs: {w} (FSDP2 shards the weights, gradients and optimizer states): " + then(cfg, w))
            break
    return out


def device_gb(device: torch.device) -> float:
    """Memory of one accelerator (CUDA), else of this machine (CPU training runs in RAM), in GB (GiB)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / GB
    try:
        with open("/proc/meminfo") as f:
            return int(f.readline().split()[1]) * 1024 / GB  # MemTotal, kB
    except (OSError, ValueError, IndexError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB


def announce(cfg: ExperimentConfig, world_size: int, device: torch.device, model: str | None = None) -> Plan | None:
    """The plan's lines on stderr at the start of a run (training, pipeline); a plan that cannot be made (a Hub id
    not downloaded yet) is said in one line and never stops the run."""
    try:
        cuda = device.type == "cuda"
        p = plan(cfg, world_size, device_gb(device), model, device_name="GPU" if cuda else "CPU", fused_optimizer=cuda)
    except (ConfigError, PlanError, CheckpointError, OSError, ValueError) as e:
        print(f"plan: not made ({e})", file=sys.stderr)
        return None
    print("\n".join(p.lines()), file=sys.stderr)
    return p


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mdpo.plan", description="Memory plan of an experiment, per GPU.")
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*", help="section.key=value")
    ap.add_argument("--gpus", type=int, default=1, help="world size (FSDP2 ranks)")
    ap.add_argument("--gpu-gb", type=float, default=80.0, help="memory of one GPU in GB (GiB)")
    ap.add_argument("--model", help="a preset name or folder, instead of model.name_or_path (e.g. an uncached Hub id)")
    ap.add_argument("--typical-length", type=int, default=700, help="tokens of a typical rollout row")
    args = ap.parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        p = plan(cfg, args.gpus, args.gpu_gb, args.model, args.typical_length)
    except (ConfigError, PlanError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(p.lines()))
    return 0 if p.fits("train") and p.fits("rollout") else 1


if __name__ == "__main__":
    sys.exit(main())
