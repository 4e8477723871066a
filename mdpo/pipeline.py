"""The online iterative pipeline, the paper's Algorithm 1, as one command: `make train EXP=name`.

    python -m mdpo.pipeline experiments/NAME.yaml [section.key=value ...] [--out DIR] [--stage sft]

For each iteration t = 1..T: roll out N trajectories per prompt from the policy (n_current) and from the previous
model (n_previous, the paper's mixture sampling), grade them, apply the filters, build M-DPO pairs (or the M-KTO
or RAFT set), train from the policy with reference log-probs of the policy (reference.mode previous) or of the
starting model (sft), export a checkpoint every training.eval_every steps, keep the one that is best on the
held-out prompts, and evaluate it on the test sets.

Everything lands in OUT (metrics.out_dir/NAME unless --out):

    config.yaml               the resolved config
    prompts.jsonl             the prompts with their role: heldout or iteration t (fixed by the first run)
    state.json                finished stages and the digest (rows, sha256) of every file they wrote
    sft/                      the SFT stage's trainer output, when sft.data is set (π0 = sft/final)
    iter_0/eval/SET.jsonl     test-set trajectories of π0
    iter_t/rollout.jsonl      graded trajectories of the policy; rollout_prev.jsonl: of the previous model
    iter_t/data.jsonl         pairs (mdpo), labelled trajectories (mkto) or correct ones (raft); data_stats.json
    iter_t/train/             trainer output (reference.jsonl, metrics.jsonl, exports/step_N, final)
    iter_t/select/            held-out trajectories of each candidate; selection.json: scores and the choice
    iter_t/policy/            the selected model: the next iteration's policy and reference
    iter_t/eval/SET.jsonl     test-set trajectories of the selected model
    results.json              one record per iteration (rollout accuracy, filter counts, pairs, training
                              metrics, selection, test accuracy); printed as a table at the end
    accuracy.png, training.png, filters.png   plots of results.json and the metrics.jsonl files (mdpo/plots.py),
                              redrawn after every iteration when matplotlib is installed
    tensorboard/, wandb/      metrics.tracker's copy of results.json (and iter_t/train/ holds the trainer's)

Faults: sampling stages append one finished trajectory at a time and resume where they stopped; the trainer
resumes from its last checkpoint; every other output is written to a temporary name and renamed. A rerun skips
finished stages after checking that their files still have the recorded row counts and checksums, and names the
file that does not. Under torchrun every rank samples its share of the prompts and the trainer runs FSDP2.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import fcntl
import hashlib
import json
import random
import shutil
import sys
import time
from pathlib import Path

from mdpo import faults
from mdpo.atomic import atomic_open, write_json_atomic
from mdpo.checkpoint import discard, replace_folder
from mdpo.config import ConfigError, ExperimentConfig, LossConfig, ReferenceConfig, load_config, save_config
from mdpo.data import DataError, apply_filters, file_digest, pair_stats, split_heldout, verify_file
from mdpo.distributed import barrier, default_device, run_cli, world
from mdpo.datasets import DATASETS, PROMPT_SETS, DatasetError, load_problems
from mdpo.eval import EvalError, compute_metrics, prefix_problem, sample_graded
from mdpo.executor import announce_sandbox
from mdpo.hub import HubError, resolve_model_ranks
from mdpo.sampler import SamplingParams
from mdpo.objectives import get_objective
from mdpo.plan import announce as announce_plan
from mdpo.plots import plot_run
from mdpo.tracking import check_tracker, iteration_scalars, open_tracker
from mdpo.train import TrainError, model_identity, train
from mdpo.textfile import describe_json, read_json
from mdpo.tokenizer import TokenizerError
from mdpo.trajectory import Trajectory, TrajectoryError, read_jsonl, read_trajectories
from mdpo.weights import CheckpointError, parse_dtype


class PipelineError(RuntimeError):
    """The pipeline cannot go on; the message names the stage and the file."""


# ---------------------------------------------------------------- stages and their record
class Stages:
    """state.json: which stages finished and what they wrote. A finished stage is checked, then skipped."""

    def __init__(self, out: Path):
        self.path = out / "state.json"
        self.state = read_record(self.path) if self.path.exists() else {}
        self.clock = time.monotonic()  # a stage's "seconds": from the previous stage's end (or start) to its own

    def done(self, name: str) -> dict | None:
        """The stage's record if it finished and its files are intact; raises DataError naming a bad file."""
        rec = self.state.get(name)
        if rec is None:
            self.clock = time.monotonic()  # the stage starts now (checks of earlier stages are not its time)
            return None
        for path, digest in rec["files"].items():
            p = self.path.parent / path
            if digest.get("dir"):
                if not (p / "config.json").is_file():
                    raise DataError(f"{p}: model folder of finished stage {name!r} is missing or incomplete")
            else:
                verify_file(p, digest)
        return rec

    def finish(self, name: str, files: list[Path], info: dict | None = None) -> dict:
        barrier()  # rank 0 may still be writing the stage's files
        root = self.path.parent
        # seconds: wall time of this run of the stage (a resumed stage counts only what was left of it).
        rec = {"files": {str(f.relative_to(root)): ({"dir": True} if f.is_dir() else file_digest(f)) for f in files},
               "info": info or {}, "seconds": round(time.monotonic() - self.clock, 2)}
        self.state[name] = rec
        if world()[0] == 0:
            write_json_atomic(self.path, self.state)
        barrier()
        self.clock = time.monotonic()
        return rec


# ---------------------------------------------------------------- prompts
def load_prompts(cfg: ExperimentConfig) -> list[dict]:
    """All training prompts of data.train; ids are prefixed with their dataset so they stay unique."""
    problems, skipped = [], []
    for spec in cfg.data.train:
        tag = Path(spec).stem if spec.endswith(".jsonl") else spec
        for p in load_problems(spec, cfg.data.data_dir, split="train", skipped=skipped):
            problems.append(dict(p, id=f"{tag}:{p['id']}"))
    if skipped and world()[0] == 0:
        print(f"left out {len(skipped)} prompts without a gold answer: {', '.join(skipped[:5])}"
              + (" ..." if len(skipped) > 5 else ""), file=sys.stderr)
    ids = [p["id"] for p in problems]
    if len(set(ids)) != len(ids):
        raise PipelineError(f"data.train {cfg.data.train}: duplicate problem ids")
    return problems


def split_prompts(cfg: ExperimentConfig, problems: list[dict]) -> list[dict]:
    """Give every prompt a split: "heldout" or "iter_t" (disjoint prompt sets per iteration, as in the paper)."""
    rng = random.Random(cfg.training.seed)
    if cfg.data.max_prompts is not None and len(problems) > cfg.data.max_prompts:
        problems = [problems[i] for i in sorted(rng.sample(range(len(problems)), cfg.data.max_prompts))]
    try:
        train_set, held = split_heldout(problems, cfg.data.heldout, cfg.training.seed)
    except ValueError as e:  # too few prompts for data.heldout, repeated ids
        raise PipelineError(f"data.train {cfg.data.train}, data.heldout {cfg.data.heldout}: {e}") from None
    order = rng.sample(range(len(train_set)), len(train_set))
    T = cfg.training.iterations
    per = cfg.data.prompts_per_iteration or len(train_set) // T
    if per < 1 or per * T > len(train_set):
        raise PipelineError(f"data: {len(train_set)} training prompts cannot make {T} iterations of {per}")
    out = [dict(p, split="heldout") for p in held]
    for t in range(T):
        out += [dict(train_set[i], split=f"iter_{t + 1}") for i in sorted(order[t * per:(t + 1) * per])]
    return out


def read_record(path: Path) -> dict:
    """A JSON object this pipeline wrote (state.json, results.json, ...); a damaged one is a PipelineError."""
    d = read_json(path, PipelineError)
    if not isinstance(d, dict):
        raise PipelineError(f"{path}: expected a JSON object, got {describe_json(d)}; it is not the pipeline's "
                            "record: remove it (or the run folder) and rerun")
    return d


def check_inputs(cfg: ExperimentConfig, out: Path) -> None:
    """Refuse, before any stage runs, input files that would fail only later: sft.data (read when the SFT stage
    trains, after the sandbox check) is parsed line by line as trajectories, and the eval.sets files (read when
    a model is evaluated, after SFT) are loaded; data.train files are read by the first stage anyway. Names of
    datasets are not fetched here."""
    if out.exists() and not out.is_dir():
        raise PipelineError(f"{out}: is a file, not an output folder")
    if cfg.sft.data and not (out / "sft" / "final" / "config.json").is_file():
        try:
            for where, d in read_jsonl(cfg.sft.data, PipelineError, objects=True, empty_ok=False):
                Trajectory.from_dict(d, where)
        except TrajectoryError as e:
            raise PipelineError(f"sft.data: {e}") from None
    for spec in cfg.eval.sets:
        if spec not in DATASETS and spec not in PROMPT_SETS and spec not in PROMPT_SETS.values():
            load_problems(spec, cfg.data.data_dir)  # a file: parsed whole now (a test set is small)


def write_jsonl(path: Path, rows: list[dict]):
    with atomic_open(path) as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


# ---------------------------------------------------------------- sampling across ranks
def share_key(model: str, problems: list[dict], n: int | range, params: SamplingParams, cfg: ExperimentConfig,
              seed: int) -> str:
    """What a sampling job's output depends on, hashed: the model (model_identity: path, config, weight files'
    size and time), the problems with their gold answers, the sample ids, the sampling parameters, the seed, the
    tool's settings and, for continuations, their prefixes. Equal keys: equal files (the sampler is exact)."""
    ids = list(range(n) if isinstance(n, int) else n)
    job = {"model": model_identity(model), "problems": [[p["id"], p["question"], p["gold"], p.get("prefix")]
                                                        for p in problems],
           # Greedy decoding draws nothing: its output does not depend on the seed.
           "ids": ids, "params": dataclasses.asdict(params), "seed": seed if params.temperature > 0 else None,
           "timeout": cfg.rollout.executor_timeout,
           "empty_output": cfg.rollout.empty_output, "compile": cfg.rollout.compile, "dtype": cfg.model.dtype}
    return hashlib.sha256(json.dumps(job, sort_keys=True).encode()).hexdigest()[:24]


def kv_options(cfg: ExperimentConfig) -> dict:
    """The sampler's KV-cache settings (they change speed and memory, never a trajectory: not in share_key)."""
    r = cfg.rollout
    return {"block_size": r.kv_block_size, "kv_cache_gb": r.kv_cache_gb, "prefill_chunk": r.prefill_chunk,
            "attention": r.kv_attention}


def sample(model: str, problems: list[dict], path: Path, n: int | range, params: SamplingParams, cfg: ExperimentConfig,
           desc: str, batch_size: int, seed: int, share: Path | None = None):
    """sample_graded on this rank's share of `problems`; the shares are then merged into `path` (rank 0).

    share: a folder of finished sampling jobs by share_key. A job already there is copied instead of sampled;
    a job sampled here is stored there. Runs that sample the same job (an ablation's variants all roll out the
    same SFT model on the same prompts in iteration 1) then pay for it once. A lock file makes a second run
    wait for the first instead of sampling the same job twice.
    """
    if share is not None and world()[1] == 1:
        share.mkdir(parents=True, exist_ok=True)
        stored = share / f"{share_key(model, problems, n, params, cfg, seed)}.jsonl"
        with open(share / f"{stored.stem}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also when this process dies
            if not stored.is_file():
                sample(model, problems, path, n, params, cfg, desc, batch_size, seed)
                with atomic_open(stored) as f:
                    f.write(path.read_text(encoding="utf-8"))
            else:
                with atomic_open(path) as f:
                    f.write(stored.read_text(encoding="utf-8"))
        return list(read_trajectories(path))
    rank, ws = world()
    if ws == 1:
        return sample_graded(model, problems, path, n, params, batch_size=batch_size, seed=seed,
                             timeout=cfg.rollout.executor_timeout, desc=desc, compile=cfg.rollout.compile,
                             empty_output=cfg.rollout.empty_output, dtype=parse_dtype(cfg.model.dtype), kv=kv_options(cfg))
    part = path.with_name(f"{path.stem}.rank{rank}.jsonl")
    # The same seed on every rank: a sample's randomness depends on (seed, prompt, sample id) only, so the
    # trajectories do not depend on the number of ranks.
    sample_graded(model, problems[rank::ws], part, n, params, batch_size=batch_size, seed=seed,
                  timeout=cfg.rollout.executor_timeout, desc=desc, compile=cfg.rollout.compile,
                  empty_output=cfg.rollout.empty_output, dtype=parse_dtype(cfg.model.dtype), kv=kv_options(cfg))
    barrier()
    if rank == 0:
        parts = [path.with_name(f"{path.stem}.rank{r}.jsonl") for r in range(ws)]
        with atomic_open(path) as f:
            for p in parts:
                faults.write(f, p.read_text(encoding="utf-8"), "merge.write")
        for p in parts:
            p.unlink()
            faults.maybe_kill("merge.unlink")
    barrier()
    return list(read_trajectories(path))


def rollout_params(cfg: ExperimentConfig) -> SamplingParams:
    r = cfg.rollout
    return SamplingParams(temperature=r.temperature, top_k=r.top_k, top_p=r.top_p,
                          max_new_tokens_per_turn=r.max_new_tokens_per_turn, max_turns=r.max_turns,
                          max_length=r.max_length)


def eval_params(cfg: ExperimentConfig) -> SamplingParams:
    e = cfg.eval
    return SamplingParams(temperature=e.temperature, max_new_tokens_per_turn=e.max_new_tokens_per_turn,
                          max_turns=e.max_turns, max_length=cfg.rollout.max_length)


def accuracy(trajectories) -> float:
    return sum(bool(t.correct) for t in trajectories) / max(1, len(trajectories))


# ---------------------------------------------------------------- the pipeline
class Pipeline:
    """Algorithm 1 for one config in `out`. share: a folder of sampling jobs shared with other runs (`sample`)."""

    def __init__(self, cfg: ExperimentConfig, out: Path, share: Path | None = None):
        self.cfg, self.out, self.share = cfg, out, share
        self.objective = get_objective(cfg.loss)
        check_tracker(cfg)
        self.rank = world()[0]
        if self.rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, out / "config.yaml")
        barrier()
        self.stages = Stages(out)
        self.results = read_record(out / "results.json") if (out / "results.json").exists() else {}
        self.tracker = None

    def record(self, key: str, value):
        """Store iteration `key`'s results in results.json, send them to metrics.tracker and redraw the plots."""
        self.results[key] = value
        if self.rank == 0:
            write_json_atomic(self.out / "results.json", self.results)
            # The tracker and the plots are views of results.json: neither must stop a long run.
            try:
                if self.tracker is None:  # opened on first use: constructing a Pipeline starts no W&B run
                    self.tracker = open_tracker(self.cfg, self.out, "pipeline")
                self.tracker.log(iteration_scalars(value), int(key.split("_")[1]))
            except Exception as e:
                print(f"metrics.tracker {self.cfg.metrics.tracker}: not logged: {type(e).__name__}: {e}",
                      file=sys.stderr)
            try:
                plot_run(self.out, self.cfg.rollout.temperature)
            except Exception as e:
                print(f"plots not drawn: {type(e).__name__}: {e}", file=sys.stderr)

    def prompts(self) -> list[dict]:
        path = self.out / "prompts.jsonl"
        if not self.stages.done("prompts"):
            rows = split_prompts(self.cfg, load_prompts(self.cfg))
            if self.rank == 0:
                write_jsonl(path, rows)
            barrier()
            self.stages.finish("prompts", [path])
        return [row for _, row in read_jsonl(path, PipelineError, objects=True)]

    def sft(self) -> str:
        """π0: the SFT stage's model when sft.data is set (training it first if needed), else model.name_or_path."""
        cfg = self.cfg
        if not cfg.sft.data:
            return cfg.model.name_or_path
        folder = self.out / "sft"
        if not self.stages.done("sft"):
            c = copy.deepcopy(cfg)
            c.loss = LossConfig(type="sft", mask="model")  # the iteration loss's options are not SFT's
            c.reference = ReferenceConfig()  # nor its reference (SFT has none): the saved config.yaml reloads
            c.optimizer.lr = cfg.sft.lr
            c.training.epochs, c.training.global_batch_size = cfg.sft.epochs, cfg.sft.global_batch_size
            c.training.micro_batch_size = min(cfg.training.micro_batch_size, cfg.sft.global_batch_size)
            c.training.warmup_steps = cfg.sft.warmup_steps
            train(c, cfg.sft.data, folder, resume=True)
            self.stages.finish("sft", [folder / "final"])
        return str(folder / "final")

    def evaluate(self, model: str, it: int) -> dict:
        """Test-set accuracy of `model`, recorded as iteration `it`'s."""
        cfg, name = self.cfg, f"eval_{it}"
        rec = self.stages.done(name)
        if rec:
            return rec["info"]
        info, files = {}, []
        for spec in cfg.eval.sets:
            problems = load_problems(spec, cfg.data.data_dir)[: cfg.eval.limit]
            tag = Path(spec).stem if spec.endswith(".jsonl") else spec
            path = self.out / f"iter_{it}" / "eval" / f"{tag}.jsonl"
            trajs = sample(model, problems, path, 1, eval_params(cfg), cfg, f"iter {it} eval {tag}",
                           cfg.eval.batch_size, cfg.training.seed, self.share)
            m = compute_metrics(trajs, problems, 1)
            info[tag] = {"pass@1": m.get("pass@1", 0.0), "problems": m["problems"], "tools": m.get("tools", {})}
            files.append(path)
        return self.stages.finish(name, files, info)["info"]

    def rollout(self, it: int, policy: str, previous: str | None, prompts: list[dict]) -> list:
        cfg, d = self.cfg, self.out / f"iter_{it}"
        n_prev = cfg.rollout.n_previous if previous else 0
        n_cur = cfg.rollout.n_current + (0 if previous else cfg.rollout.n_previous)
        # Sample ids are unique per prompt across both models: the previous model's follow the policy's.
        jobs = [("rollout", policy, range(n_cur), d / "rollout.jsonl", 0)]
        if n_prev:
            jobs.append(("rollout_prev", previous, range(n_cur, n_cur + n_prev), d / "rollout_prev.jsonl", 1))
        trajs = []
        for name, model, ids, path, salt in jobs:
            stage = f"{name}_{it}"
            if not self.stages.done(stage):
                sample(model, prompts, path, ids, rollout_params(cfg), cfg, f"iter {it} {name}",
                       cfg.rollout.batch_size, cfg.training.seed + 1000 * it + salt, self.share)
                self.stages.finish(stage, [path])
            # Files are in the order rows finished, which a resumed run changes: sort, so that the filters'
            # "first of duplicates" and the pair sampling see the same order every time.
            trajs += sorted(read_trajectories(path), key=lambda t: (t.prompt_id, t.sample_id))
        return trajs

    def branch(self, it: int, policy: str, kept: list, prompts: list[dict], seed: int) -> tuple[list, dict]:
        """Continuations of the objective's branch points, sampled from the policy, graded and filtered like
        rollouts (iter_t/branches.jsonl); none for an objective without branch points."""
        cfg, d = self.cfg, self.out / f"iter_{it}"
        points = self.objective.branch_points(kept, seed)
        if not points:
            return [], {}
        gold = {p["id"]: p["gold"] for p in prompts}
        jobs = [prefix_problem(t, cut, gold[t.prompt_id]) for t, cut in points]
        path, stage = d / "branches.jsonl", f"branch_{it}"
        if not self.stages.done(stage):
            sample(policy, jobs, path, cfg.loss.branch_samples, rollout_params(cfg), cfg, f"iter {it} branches",
                   cfg.rollout.batch_size, cfg.training.seed + 1000 * it + 2, self.share)
            self.stages.finish(stage, [path])
        trajs = sorted(read_trajectories(path), key=lambda t: (t.prompt_id, t.sample_id))
        kept_b, removed = apply_filters(trajs, cfg.filters, cfg.rollout.max_length)
        return kept_b, {"points": len(points), "continuations": pair_stats(trajs), "filters": removed,
                        "after_filters": pair_stats(kept_b)}

    def build_data(self, it: int, trajs: list, policy: str, prompts: list[dict]) -> tuple[Path, dict]:
        cfg, d = self.cfg, self.out / f"iter_{it}"
        path, stage = d / "data.jsonl", f"data_{it}"
        rec = self.stages.done(stage)
        if rec:
            return path, rec["info"]
        kept, removed = apply_filters(trajs, cfg.filters, cfg.rollout.max_length)
        seed = cfg.training.seed + it
        branches, branch_info = self.branch(it, policy, kept, prompts, seed)
        rows = self.objective.build(kept, seed, branches)
        if self.rank == 0:
            self.objective.write(path, rows)
        barrier()
        info = {"rollout": pair_stats(trajs), "filters": removed, "after_filters": pair_stats(kept),
                "examples": len(rows), **self.objective.build_info()}
        if branch_info:
            branch_info["pairs"] = sum(isinstance(r, tuple) and r[0].meta.get("branch") is not None for r in rows)
            info["branches"] = branch_info
        if self.rank == 0:
            write_json_atomic(d / "data_stats.json", info)
        return path, self.stages.finish(stage, [path], info)["info"]

    def train_iteration(self, it: int, policy: str, sft_model: str, data: Path) -> dict:
        cfg, d = self.cfg, self.out / f"iter_{it}"
        stage = f"train_{it}"
        rec = self.stages.done(stage)
        if rec:
            return rec["info"]
        c = copy.deepcopy(cfg)
        c.model.name_or_path = policy
        reference = policy if cfg.reference.mode == "previous" else sft_model
        export_every = cfg.training.eval_every if cfg.eval.select else 0
        summary = d / "train" / "summary.json"
        if summary.is_file() and (d / "train" / "final" / "config.json").is_file():
            last = read_record(summary).get("last", {})  # trained; killed before the stage was recorded
        else:
            last = train(c, str(data), d / "train", resume=True, reference=reference, export_every=export_every)
        return self.stages.finish(stage, [d / "train" / "final"], last)["info"]

    def select(self, it: int, heldout: list[dict]) -> dict:
        """Score every exported checkpoint and the final one on the held-out prompts; keep the best as policy."""
        cfg, d = self.cfg, self.out / f"iter_{it}"
        stage = f"select_{it}"
        rec = self.stages.done(stage)
        if rec:
            return rec["info"]
        exports = d / "train" / "exports"
        cands = sorted((p for p in exports.glob("step_*") if not p.name.endswith(".tmp")),
                       key=lambda p: int(p.name.split("_")[1])) if exports.is_dir() else []
        cands.append(d / "train" / "final")
        scores = {}
        problems = heldout[: cfg.eval.heldout_limit]
        if cfg.eval.select and len(cands) > 1:
            for c in cands:
                trajs = sample(str(c), problems, d / "select" / f"{c.name}.jsonl", 1, eval_params(cfg), cfg,
                               f"iter {it} select {c.name}", cfg.eval.batch_size, cfg.training.seed)
                scores[c.name] = accuracy(trajs)
            best = max(cands, key=lambda c: scores[c.name])  # ties: the earliest (closest to the reference)
        else:
            best = cands[-1]
        if self.rank == 0:
            tmp = d / "policy.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(best, tmp)
            replace_folder(tmp, d / "policy")
            for c in cands[:-1]:
                if c != best:
                    discard(c)  # unselected exports: a 7B one is 17 GB
        barrier()
        info = {"scores": scores, "chosen": best.name, "heldout": len(problems)}
        if self.rank == 0:
            write_json_atomic(d / "select" / "selection.json", info)
        return self.stages.finish(stage, [d / "policy"], info)["info"]

    def run(self) -> dict:
        cfg = self.cfg
        if not self.objective.iterative:  # refused before any stage runs, not at iteration 1's data
            raise PipelineError(f"loss.type {cfg.loss.type!r} is not an iterative method; use --stage sft for SFT")
        prompts = self.prompts()  # first: a bad data.train file is refused before anything else runs
        # Which isolation the rollouts' cells get, said once at the start (rank 0), not after the SFT stage.
        announce_sandbox(show=self.rank == 0)
        if self.rank == 0:  # the memory plan of an iteration's training and rollout on this device
            announce_plan(cfg, world()[1], default_device())
        heldout = [p for p in prompts if p["split"] == "heldout"]
        sft_model = self.sft()
        self.record("iter_0", {"eval": self.evaluate(sft_model, 0)})
        policy, previous = sft_model, cfg.rollout.first_previous
        for it in range(1, cfg.training.iterations + 1):
            mine = [p for p in prompts if p["split"] == f"iter_{it}"]
            trajs = self.rollout(it, policy, previous, mine)
            data, data_info = self.build_data(it, trajs, policy, mine)
            train_info = self.train_iteration(it, policy, sft_model, data)
            sel = self.select(it, heldout)
            new = str(self.out / f"iter_{it}" / "policy")
            rec = {"data": data_info, "train": train_info, "select": sel}
            if it % cfg.eval.every == 0 or it == cfg.training.iterations:  # eval.every: small online iterations
                rec["eval"] = self.evaluate(new, it)
            self.record(f"iter_{it}", rec)
            policy, previous = new, policy
        if self.tracker is not None:
            self.tracker.close()
            self.tracker = None
        if self.rank == 0:
            print(table(self.results, cfg))
        return self.results


def table(results: dict, cfg: ExperimentConfig) -> str:
    """Per-iteration summary: rollout accuracy, pairs, margins, chosen checkpoint, test accuracy."""
    sets = [Path(s).stem if s.endswith(".jsonl") else s for s in cfg.eval.sets]
    head = ["iter", "rollout acc", "coverage", "examples", "margin", "chosen"] + sets
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for key in sorted(results, key=lambda k: int(k.split("_")[1])):
        r = results[key]
        d = r.get("data", {})
        ro = d.get("rollout", {})
        cells = [key.split("_")[1],
                 f"{100 * ro['correct_share']:.1f}%" if ro else "-",
                 f"{100 * ro['coverage']:.1f}%" if ro else "-",
                 str(d.get("examples", "-")),
                 f"{r['train']['rewards/margin']:.3f}" if "rewards/margin" in r.get("train", {}) else "-",
                 r.get("select", {}).get("chosen", "-")]
        cells += [f"{100 * r['eval'][s]['pass@1']:.1f}%" if s in r.get("eval", {}) else "-" for s in sets]
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mdpo.pipeline", description="Online iterative M-DPO / M-KTO.")
    ap.add_argument("config", help="experiment YAML")
    ap.add_argument("overrides", nargs="*", help="section.key=value")
    ap.add_argument("--out", default=None, help="output folder (default: metrics.out_dir/NAME)")
    ap.add_argument("--stage", choices=("all", "sft"), default="all", help="sft: only the SFT stage")
    ap.add_argument("--share", default=None, metavar="DIR",
                    help="reuse sampling jobs that another run with the same --share already did (single process)")
    args = ap.parse_intermixed_args(argv)  # overrides may come after the options

    def body():
        cfg = load_config(args.config, args.overrides)
        out = Path(args.out or Path(cfg.metrics.out_dir) / cfg.name)
        check_inputs(cfg, out)  # bad input files fail now, before a model is fetched or loaded
        if args.share and Path(args.share).exists() and not Path(args.share).is_dir():
            raise PipelineError(f"--share {args.share}: is a file, not a folder")
        # Hub ids become local snapshot folders once, here; every stage then reads folders.
        cfg.model.name_or_path = resolve_model_ranks(cfg.model.name_or_path)
        if cfg.rollout.first_previous:
            cfg.rollout.first_previous = resolve_model_ranks(cfg.rollout.first_previous)
        p = Pipeline(cfg, out, Path(args.share) if args.share else None)
        if args.stage == "sft":
            if not cfg.sft.data:
                raise PipelineError(f"{args.config}: --stage sft needs sft.data (SFT trajectories JSONL)")
            print(p.sft())
        else:
            p.run()

    return run_cli(body, (ConfigError, TrainError, CheckpointError, PipelineError, DataError, EvalError,
                          DatasetError, HubError, TokenizerError))


if __name__ == "__main__":
    sys.exit(main())
