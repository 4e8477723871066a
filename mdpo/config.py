"""Experiment config: dataclass sections are the schema, YAML files are instances.

Defaults are the paper's Gemma-1.1-7B M-DPO recipe (Xiong et al. 2024), so a YAML
only needs to state what differs -- though shipped experiments state everything.
Loading is strict: a typo in a config should fail loudly, not silently train the
default recipe.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from mdpo.atomic import atomic_open
from mdpo.lora import TARGETS as LORA_TARGETS
from mdpo.objectives import ObjectiveError, get_objective
from mdpo.paged import KV_READS
from mdpo.textfile import read_text

__all__ = [
    "ConfigError", "CHOICES", "ModelConfig", "DataConfig", "RolloutConfig", "FilterConfig",
    "LossConfig", "ReferenceConfig", "OptimizerConfig", "TrainingConfig", "SftConfig", "EvalConfig", "CheckpointConfig",
    "MetricsConfig", "ExperimentConfig", "load_config", "apply_overrides", "config_to_dict",
    "save_config",
]


class ConfigError(ValueError):
    """A config file or override is invalid; the message is one line naming where and what."""


# Allowed values of the enumerated string fields, in one place (checked on load and override).
CHOICES: dict[str, tuple[str, ...]] = {
    "model.dtype": ("float32", "bfloat16"),
    "model.attn_impl": ("sdpa", "eager"),
    "loss.dpo_variant": ("sigmoid", "ipo", "hinge"),
    "loss.mask": ("model", "paper", "completion"),  # see mdpo/trajectory.py
    "loss.token_norm": ("sequence", "token"),  # grpo / rloo: see mdpo/objectives.py
    "reference.mode": ("previous", "sft"),
    "training.schedule": ("cosine", "linear", "constant"),
    "metrics.tracker": ("none", "tensorboard", "wandb"),  # see mdpo/tracking.py
    "rollout.kv_attention": KV_READS,  # see mdpo/paged.py
}


@dataclass
class ModelConfig:
    name_or_path: str = "RLHF4MATH/Gemma-7B-it-SFT3epoch"  # Hub id or HF-layout folder (a preset name: random weights)
    dtype: str = "bfloat16"  # one of CHOICES["model.dtype"]
    attn_impl: str = "sdpa"  # one of CHOICES["model.attn_impl"]


@dataclass
class DataConfig:
    train: list[str] = field(default_factory=lambda: ["gsm8k", "math"])  # dataset names or JSONL paths
    data_dir: str | None = None  # where named datasets live; None: $MDPO_DATA, else ~/.cache/mdpo/data (fetched there)
    heldout: float = 1000  # prompts kept out of training to pick each iteration's checkpoint (< 1: a fraction)
    max_prompts: int | None = None  # cap on training prompts (None = all)
    prompts_per_iteration: int | None = None  # None: the prompts are split into `iterations` disjoint sets


@dataclass
class RolloutConfig:
    n_current: int = 20  # samples per prompt from the current model (mixture sampling)
    n_previous: int = 10  # samples per prompt from the previous iteration's model
    temperature: float = 1.0  # sampling temperature
    top_p: float = 1.0  # nucleus sampling threshold (1.0 = off)
    top_k: int = 0  # top-k sampling (0 = off)
    max_new_tokens_per_turn: int = 512  # generation budget of one model turn
    max_turns: int = 6  # model turns per trajectory (tool calls + final answer)
    max_length: int = 2048  # total trajectory length in tokens, prompt included
    batch_size: int = 128  # rows decoded together (the paged KV pool admits what fits)
    executor_timeout: float = 20.0  # seconds per python tool call
    empty_output: str = "Result is not defined"  # shown for a cell that prints nothing (the paper's text; mdpo.tools)
    compile: bool = False  # torch.compile the sampler's decode step (rollouts and evals; ~1 min compile per process)
    kv_block_size: int | None = None  # KV cache block size (mdpo.paged); None: 16 on CUDA, dense on CPU; >= max_length: dense
    kv_cache_gb: float | None = None  # paged KV pool size; None: batch_size rows of max_length, at most 90% of free GPU memory
    kv_attention: str = "gather"  # one of CHOICES["rollout.kv_attention"]: how decoding rows read a paged pool
    #                               (gather: padded to the longest row; flex: only live blocks, compiled)
    prefill_chunk: int = 512  # most tokens one row feeds in a sampler step (longer prompts/observations go in chunks)
    first_previous: str | None = None  # iteration 1's "previous model" for the n_previous samples (the paper: its
    #                                    1-epoch SFT checkpoint); None = iteration 1 draws all samples from the policy


@dataclass
class FilterConfig:
    no_tool_call: bool = True  # drop trajectories that never call the tool
    long_answer: bool = True  # drop answers longer than max_answer_chars
    correct_after_error: bool = True  # drop correct answers reached despite a tool error
    duplicate_first_turn: bool = True  # drop trajectories whose first model turn duplicates another of the same prompt and label
    overlong: bool = True  # drop trajectories truncated at max_length / max_turns / max_new_tokens
    max_answer_chars: int = 20  # threshold of the long_answer filter


@dataclass
class LossConfig:
    type: str = "mdpo"  # a name in mdpo.objectives.OBJECTIVES: mdpo, mdpo_discount, turn_dpo, simpo, mkto, sft, raft, grpo, drgrpo, rloo
    dpo_variant: str = "sigmoid"  # one of CHOICES["loss.dpo_variant"]
    beta: float = 0.1  # KL-regularisation strength (SimPO: reward scale)
    label_smoothing: float = 0.0  # conservative-DPO smoothing of the sigmoid loss
    nll_coef: float = 0.0  # weight of an NLL term on the chosen trajectory
    average_logps: bool | None = None  # DPO on per-token average log-probs; null: on for ipo, off otherwise
    simpo_gamma: float = 1.0  # SimPO's target reward margin
    turn_discount: float = 1.0  # mdpo_discount: model turn k of K weighs turn_discount^(K - k)
    branch_samples: int = 4  # turn_dpo: continuations sampled from each branch point (a prefix cut at a turn)
    mask: str = "model"  # one of CHOICES["loss.mask"]: model = only model turns (M-DPO); completion = whole completion incl. tool output (single-turn baseline)
    desirable_weight: float = 1.0  # M-KTO weight of correct trajectories
    undesirable_weight: float = 1.0  # M-KTO weight of wrong trajectories
    pairs_per_prompt: int = 1  # preference pairs built per prompt
    clip_low: float = 0.2  # grpo / drgrpo / rloo: the ratio is clipped to [1 - clip_low, 1 + clip_high]
    clip_high: float = 0.2  # above clip_low: DAPO's clip-higher
    kl_coef: float = 0.0  # grpo / drgrpo / rloo: weight of the k3 KL to the reference (> 0 needs reference.online)
    token_norm: str = "sequence"  # grpo / rloo, one of CHOICES["loss.token_norm"]: mean over each sequence's tokens, or over the batch's tokens


@dataclass
class ReferenceConfig:
    mode: str = "previous"  # one of CHOICES["reference.mode"]: previous iteration's model, or the fixed SFT model
    online: bool = False  # hold a frozen reference model during training instead of precomputing its log-probs


@dataclass
class LoraConfig:
    enabled: bool = False  # train low-rank adapters on a frozen base (mdpo/lora.py) instead of every weight
    rank: int = 16  # r: adapter rank
    alpha: float = 32.0  # the update is scaled by alpha / rank
    dropout: float = 0.0  # dropout on the adapters' input
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))  # projections adapted (names of every family)
    train_embeddings: bool = False  # also train the input embedding fully (with a tied head: the head too)
    train_head: bool = False  # also train an untied LM head fully


@dataclass
class OptimizerConfig:
    lr: float = 4e-7  # peak learning rate (AdamW)
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW betas
    eps: float = 1e-8  # AdamW epsilon
    grad_clip: float = 1.0  # max global grad norm (0 = off)


@dataclass
class TrainingConfig:
    iterations: int = 3  # online iterations (rollout -> pairs -> train)
    epochs: float = 1.0  # passes over each iteration's preference data
    global_batch_size: int = 32  # pairs per optimizer step
    micro_batch_size: int = 1  # pairs per forward pass (grad accumulation makes up the rest)
    warmup_steps: int = 40  # linear warmup steps
    schedule: str = "cosine"  # one of CHOICES["training.schedule"]
    seed: int = 42  # global RNG seed
    activation_checkpointing: bool = True  # recompute activations to save memory
    eval_every: int = 50  # steps between held-out evaluations


@dataclass
class SftConfig:
    data: str | None = None  # SFT trajectories JSONL; set: the pipeline trains π0 from model.name_or_path first
    lr: float = 1e-5  # peak learning rate of the SFT stage
    epochs: float = 3.0  # passes over the SFT data (the paper: 3 epochs)
    global_batch_size: int = 64  # trajectories per optimizer step
    warmup_steps: int = 100  # linear warmup steps


@dataclass
class EvalConfig:
    sets: list[str] = field(default_factory=lambda: ["gsm8k", "math"])  # test sets after each iteration
    limit: int | None = None  # first N problems of each test set (None = all)
    heldout_limit: int | None = None  # held-out prompts used for checkpoint selection (None = all)
    temperature: float = 0.0  # 0 = greedy (the paper's protocol)
    max_turns: int = 6  # model turns per answer
    max_new_tokens_per_turn: int = 512  # generation budget of one model turn
    batch_size: int = 64  # trajectories decoded together
    select: bool = True  # pick the best of the checkpoints exported every training.eval_every steps
    every: int = 1  # evaluate after every N-th iteration and the last (many small online-RL iterations)


@dataclass
class CheckpointConfig:
    every: int = 100  # steps between checkpoints
    keep: int = 2  # most recent checkpoints kept on disk


@dataclass
class MetricsConfig:
    log_every: int = 1  # steps between metrics.jsonl lines (the last step is always logged)
    out_dir: str = "runs"  # outputs go under out_dir/<experiment name>
    tracker: str = "none"  # one of CHOICES["metrics.tracker"]: also log metrics.jsonl / results.json scalars there
    project: str = "mdpo"  # the W&B project of metrics.tracker wandb (runs are grouped by experiment name)


@dataclass
class ExperimentConfig:
    name: str = "experiment"  # run name; load_config defaults it to the YAML file's stem
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    filters: FilterConfig = field(default_factory=FilterConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    sft: SftConfig = field(default_factory=SftConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)


# ---------------------------------------------------------------- schema tables
_SECTIONS: dict[str, type] = {
    name: hint for name, hint in typing.get_type_hints(ExperimentConfig).items() if name != "name"
}
_FIELDS: dict[str, dict[str, Any]] = {s: typing.get_type_hints(cls) for s, cls in _SECTIONS.items()}
_ALL_KEYS: list[str] = ["name"] + [f"{s}.{k}" for s, fs in _FIELDS.items() for k in fs]


# ---------------------------------------------------------------- YAML dialect
class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `4e-7` as a float and rejects duplicate keys.

    PyYAML follows YAML 1.1, where a float needs a dot, so `lr: 4e-7` would load as
    the string '4e-7' -- exactly how people write learning rates. Duplicate keys
    are rejected because PyYAML silently keeps the last one.
    """

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, typing.Hashable):
                continue  # SafeLoader's own check reports unhashable keys
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def _yaml_error(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f"line {mark.line + 1}: " if mark is not None else ""
    what = getattr(exc, "problem", None) or str(exc)
    return " ".join(f"{where}invalid YAML: {what}".split())  # keep it one line


# ---------------------------------------------------------------- validation
class _Mismatch(Exception):
    def __init__(self, key: str, msg: str):
        super().__init__(f"{key}: {msg}")
        self.key = key


def _type_name(tp: Any) -> str:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if typing.get_origin(tp) is list:
        return f"list[{_type_name(args[0])}]"
    return tp.__name__


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return `value` checked against (and, int->float, converted to) type `tp`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):  # only Optional[X] occurs in the schema
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        try:
            return _coerce(value, inner, key)
        except _Mismatch as exc:
            if exc.key != key or key in CHOICES:  # keep element-level / choice errors as they are
                raise
            raise _Mismatch(key, f"expected {_type_name(tp)}, got {_describe(value)}") from None
    if origin is list:
        if not isinstance(value, list):
            raise _Mismatch(key, f"expected {_type_name(tp)}, got {_describe(value)}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    # bool is an int subclass in Python; `true` for a step count is always a mistake.
    ok = {
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
    }.get(tp, isinstance(value, tp))
    if not ok:
        raise _Mismatch(key, f"expected {_type_name(tp)}, got {_describe(value)}")
    if key in CHOICES and value not in CHOICES[key]:
        allowed = ", ".join(repr(c) for c in CHOICES[key])
        raise _Mismatch(key, f"must be one of {allowed}, got {value!r}")
    return float(value) if tp is float else value


def _did_you_mean(key: str) -> str:
    bare = key.rsplit(".", 1)[-1]
    # A right key in the wrong section is a likelier mistake than a typo.
    guesses = [k for k in _ALL_KEYS if k.rsplit(".", 1)[-1] == bare and k != key]
    guesses = guesses or difflib.get_close_matches(key, _ALL_KEYS, n=1, cutoff=0.6)
    return f" (did you mean {guesses[0]!r}?)" if guesses else ""


def _unknown_section(section: str, key: str) -> str:
    close = [s for s in _SECTIONS if section and s.startswith(section)]  # e.g. 'opt'
    close = close or difflib.get_close_matches(section, list(_SECTIONS), n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else _did_you_mean(key)
    return f"unknown section {section!r}{hint}"


def _set(cfg: ExperimentConfig, key: str, value: Any, where: str) -> None:
    """Validate `value` for dotted `key` and store it in `cfg`; errors name `where`."""
    parts = key.split(".")
    try:
        if parts == ["name"]:
            cfg.name = _coerce(value, str, key)
            return
        if len(parts) == 1:
            hint = " (write section.key)" if key in _SECTIONS else _did_you_mean(key)
            raise _Mismatch("", f"unknown key {key!r}{hint}")
        section, rest = parts[0], ".".join(parts[1:])
        if section not in _SECTIONS:
            raise _Mismatch("", _unknown_section(section, key))
        if rest not in _FIELDS[section]:
            raise _Mismatch("", f"unknown key {key!r}{_did_you_mean(key)}")
        setattr(getattr(cfg, section), rest, _coerce(value, _FIELDS[section][rest], key))
    except _Mismatch as exc:
        raise ConfigError(f"{where}: {str(exc).removeprefix(': ')}") from None


# ---------------------------------------------------------------- public API
def apply_overrides(cfg: ExperimentConfig, overrides: Sequence[str] = (), source: str = "config") -> ExperimentConfig:
    """Return a copy of `cfg` with `section.key=value` overrides (values parsed as YAML) applied, then check that
    loss.type names an objective that reads every loss option set (errors name `source`)."""
    cfg = dataclasses.replace(cfg)  # shallow; sections are re-copied below
    for name in _SECTIONS:
        setattr(cfg, name, dataclasses.replace(getattr(cfg, name)))
    for text in overrides:
        where = f"override {text!r}"
        key, eq, raw = text.partition("=")
        if not eq:
            raise ConfigError(f"{where}: expected section.key=value")
        try:
            value = yaml.load(raw, Loader=_Loader)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{where}: {_yaml_error(exc)}") from None
        _set(cfg, key.strip(), value, where)
    try:
        objective = get_objective(cfg.loss)
    except ObjectiveError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    problem = _contradiction(cfg, objective)
    if problem:
        raise ConfigError(f"{source}: {problem}")
    return cfg


def _contradiction(cfg: ExperimentConfig, objective) -> str | None:
    """The first pair (or set) of keys whose values contradict each other, as a message naming each; None if none.

    These would otherwise surface only when the object that uses them is built (the sampler, hours into a run)
    or never (an option silently ignored). A value equal to its default counts as unset where a check is about
    an option that would be ignored, as for loss.* (mdpo.objectives): defaults never contradict each other.
    """
    r, t, d, e, default = cfg.rollout, cfg.training, cfg.data, cfg.eval, ExperimentConfig()
    flex = r.kv_attention == "flex"
    if flex and r.compile:
        return ("rollout.compile true and rollout.kv_attention 'flex' do not go together: flex compiles its own "
                "kernel inside the eager decode step; set rollout.compile false or rollout.kv_attention 'gather'")
    if r.kv_block_size is not None and r.kv_block_size < 1:
        return f"rollout.kv_block_size must be >= 1 (or null), got {r.kv_block_size}"
    block = 16 if r.kv_block_size is None else r.kv_block_size  # flex: None means 16 on every device
    if flex and not 2 <= block < r.max_length:
        which = f"rollout.kv_block_size {r.kv_block_size}" if r.kv_block_size is not None else \
            "rollout.kv_block_size null (16 with flex)"
        return (f"rollout.kv_attention 'flex' reads a paged KV pool: {which} must be >= 2 and < rollout.max_length "
                f"{r.max_length} (a block of max_length or more is the dense layout)")
    if r.kv_cache_gb is not None and r.kv_block_size is not None and r.kv_block_size >= r.max_length:
        return (f"rollout.kv_cache_gb {r.kv_cache_gb} sizes a paged pool, but rollout.kv_block_size {r.kv_block_size} "
                f">= rollout.max_length {r.max_length} is the dense layout, which ignores it; drop one of them")
    for key, budget in (("rollout.max_new_tokens_per_turn", r.max_new_tokens_per_turn),
                        ("eval.max_new_tokens_per_turn", e.max_new_tokens_per_turn)):
        section, name = key.split(".")
        if budget != getattr(getattr(default, section), name) and budget >= r.max_length:
            return (f"{key} {budget} >= rollout.max_length {r.max_length}: one turn could never use its budget "
                    f"(max_length counts the prompt and every turn); lower {key} or raise rollout.max_length")
    if cfg.eval.every < 1:
        return f"eval.every must be >= 1 (evaluate after every N-th iteration), got {cfg.eval.every}"
    if t.global_batch_size % t.micro_batch_size:
        return (f"training.global_batch_size {t.global_batch_size} is not a multiple of training.micro_batch_size "
                f"{t.micro_batch_size} (each optimizer step is a whole number of micro-batches)")
    if cfg.sft.data:
        mb = min(t.micro_batch_size, cfg.sft.global_batch_size)  # as the pipeline's SFT stage runs it
        if cfg.sft.global_batch_size % mb:
            return (f"sft.global_batch_size {cfg.sft.global_batch_size} is not a multiple of "
                    f"training.micro_batch_size {t.micro_batch_size} (the SFT stage's micro-batches)")
    if r.first_previous and r.n_previous == 0:
        return (f"rollout.first_previous {r.first_previous!r} is set but rollout.n_previous is 0: no sample would "
                "come from it; set rollout.n_previous or drop rollout.first_previous")
    if objective.token_level and objective.reference and not cfg.reference.online:
        return (f"loss.kl_coef {cfg.loss.kl_coef} needs the reference's per-token log-probs, which are not stored: "
                "set reference.online true (with LoRA it holds no second model) or loss.kl_coef 0")
    if not objective.reference:
        if cfg.reference.online:
            return (f"reference.online true, but loss.type {cfg.loss.type!r} uses no reference model; "
                    "drop reference.online")
        if cfg.reference.mode != default.reference.mode:
            return (f"reference.mode {cfg.reference.mode!r}, but loss.type {cfg.loss.type!r} uses no reference "
                    "model; drop reference.mode")
    lo, dlo = cfg.lora, default.lora
    if not lo.enabled:
        set_ = [f"lora.{k}" for k in ("rank", "alpha", "dropout", "targets", "train_embeddings", "train_head")
                if getattr(lo, k) != getattr(dlo, k)]
        if set_:
            return f"{set_[0]} is set but lora.enabled is false; set lora.enabled true or drop {set_[0]}"
    if lo.rank < 1:
        return f"lora.rank must be >= 1, got {lo.rank}"
    if lo.alpha <= 0:
        return f"lora.alpha must be > 0, got {lo.alpha}"
    if not 0 <= lo.dropout < 1:
        return f"lora.dropout must be in [0, 1), got {lo.dropout}"
    unknown = [x for x in lo.targets if x not in LORA_TARGETS] or ([] if lo.targets else ["(none)"])
    if unknown:
        return f"lora.targets: unknown projection {unknown[0]!r}; choose from {', '.join(LORA_TARGETS)}"
    if not cfg.filters.long_answer and cfg.filters.max_answer_chars != default.filters.max_answer_chars:
        return (f"filters.max_answer_chars {cfg.filters.max_answer_chars} is the threshold of filters.long_answer, "
                "which is false; drop one of them")
    if d.heldout <= 0 or (d.heldout >= 1 and not float(d.heldout).is_integer()):
        return f"data.heldout must be a fraction in (0, 1) or a whole count >= 1, got {d.heldout}"
    if d.max_prompts is not None:
        held = d.heldout if d.heldout >= 1 else max(1, round(d.heldout * d.max_prompts))
        left = d.max_prompts - int(held)
        if left < 1 and d.heldout != default.data.heldout:  # the default with a small cap: the pipeline's error
            return (f"data.heldout {d.heldout} leaves none of data.max_prompts {d.max_prompts} prompts for training")
        if d.prompts_per_iteration is not None and d.prompts_per_iteration * t.iterations > left:
            return (f"data.prompts_per_iteration {d.prompts_per_iteration} x training.iterations {t.iterations} "
                    f"needs more prompts than data.max_prompts {d.max_prompts} leaves after data.heldout "
                    f"{d.heldout} ({left})")
    return None


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Load a YAML experiment strictly, then apply `overrides`; raises ConfigError."""
    path = Path(path)
    text = read_text(path, ConfigError, "YAML")  # missing, a directory, binary, not UTF-8: one line
    try:
        raw = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: {_yaml_error(exc)}") from None
    if raw is None:
        raise ConfigError(f"{path}: empty config: an experiment YAML is a mapping of sections (model:, data:, ...)")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {_describe(raw)}")
    cfg = ExperimentConfig(name=path.stem)
    for section, body in raw.items():
        if section not in _SECTIONS:
            if isinstance(body, dict):  # a mapping is a (misspelt) section, not a key
                raise ConfigError(f"{path}: {_unknown_section(str(section), str(section))}")
            _set(cfg, str(section), body, str(path))  # sets name, or reports the unknown key
            continue
        if body is None:  # `loss:` with nothing under it means all defaults
            continue
        if not isinstance(body, dict):
            raise ConfigError(f"{path}: {section}: expected a mapping, got {_describe(body)}")
        for key, value in body.items():
            _set(cfg, f"{section}.{key}", value, str(path))
    return apply_overrides(cfg, overrides, source=str(path))


def config_to_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    """The config as plain nested dicts/lists (name first, then sections in schema order)."""
    return dataclasses.asdict(cfg)


def save_config(cfg: ExperimentConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML atomically (temp file + fsync + os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "# Resolved config written by mdpo.config.save_config.\n"
    text += yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None)
    with atomic_open(path) as f:
        f.write(text)
