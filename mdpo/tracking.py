"""Experiment tracking (metrics.tracker): the scalars of metrics.jsonl and results.json, also sent elsewhere.

    none         only the JSON files (the default)
    tensorboard  event files in FOLDER/tensorboard/: `tensorboard --logdir runs/NAME` shows the pipeline's
                 per-iteration results and every training run (sft/, iter_t/train/) side by side
    wandb        one W&B run per training run and one for the pipeline, grouped by the experiment name, with the
                 resolved config; the local run folder is FOLDER/wandb/ unless $WANDB_DIR is set, and
                 WANDB_MODE=offline needs no network (`wandb sync` uploads it later)

The JSON files stay the record: trackers get a copy of the same numbers, from rank 0 only. Both backends are
optional extras, imported only when chosen; a missing one is a one-line ConfigError naming the extra.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from mdpo.config import ConfigError, ExperimentConfig, config_to_dict
from mdpo.distributed import world


class Tracker:
    """metrics.tracker none: logs nothing (also what ranks other than 0 get)."""

    def log(self, scalars: dict, step: int) -> None:
        """Log {name: number} at `step`."""

    def close(self) -> None:
        """Flush and release the backend."""


def missing(extra: str) -> ConfigError:
    return ConfigError(f"metrics.tracker {extra} needs the {extra} package: pip install 'mdpo[{extra}]'")


def check_tracker(cfg: ExperimentConfig) -> None:
    """Fail now, not hours into a run, when metrics.tracker's package is missing or too old (ConfigError)."""
    kind = cfg.metrics.tracker
    try:
        if kind == "tensorboard":
            import tensorboard  # noqa: F401  (torch.utils.tensorboard needs it)
        elif kind == "wandb":
            import wandb
    except ImportError:
        raise missing(kind) from None
    if kind == "wandb":
        version = tuple(int(x) for x in wandb.__version__.split(".")[:3] if x.isdigit())
        if version < (0, 19, 10):
            raise ConfigError(f"metrics.tracker wandb needs wandb >= 0.19.10 (wandb {wandb.__version__} "
                              f"installed): pip install -U 'mdpo[wandb]'")


class TensorBoardTracker(Tracker):
    def __init__(self, folder: Path, first_step: int = 0):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise missing("tensorboard") from None
        # A resumed trainer redoes the steps after its checkpoint, a rerun pipeline re-logs every iteration:
        # purge_step makes TensorBoard's reader drop earlier runs' events from that step on (as MetricsLog
        # drops its metrics.jsonl lines), so no step appears twice.
        self.writer = SummaryWriter(str(folder / "tensorboard"), purge_step=first_step)

    def log(self, scalars: dict, step: int) -> None:
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()  # a killed run keeps what it logged, like metrics.jsonl

    def close(self) -> None:
        self.writer.close()


class WandbTracker(Tracker):
    def __init__(self, cfg: ExperimentConfig, folder: Path, job: str):
        try:
            import wandb
        except ImportError:
            raise missing("wandb") from None
        folder.mkdir(parents=True, exist_ok=True)
        try:
            # create_new: the pipeline's run stays open while each training run has its own (wandb >= 0.19.10).
            self.run = wandb.init(project=cfg.metrics.project, group=cfg.name, name=f"{cfg.name}/{job}",
                                  job_type=job.split("/")[-1], config=config_to_dict(cfg),
                                  dir=os.environ.get("WANDB_DIR") or str(folder), reinit="create_new")
        except (TypeError, ValueError) as e:
            if "create_new" in str(e) or "reinit" in str(e):
                raise ConfigError(f"metrics.tracker wandb needs wandb >= 0.19.10 (wandb {wandb.__version__} "
                                  f"installed): pip install -U 'mdpo[wandb]'") from None
            raise

    def log(self, scalars: dict, step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


def open_tracker(cfg: ExperimentConfig, folder, job: str, first_step: int = 0) -> Tracker:
    """The tracker metrics.tracker names, writing under `folder`; `job` names the run ("pipeline", "iter_1/train").

    first_step: the first step this run logs (a resumed trainer's checkpoint step + 1); TensorBoard forgets
    earlier runs' events from that step on.
    """
    kind = cfg.metrics.tracker
    if kind == "none" or world()[0] != 0:
        return Tracker()
    if kind == "tensorboard":
        return TensorBoardTracker(Path(folder), first_step)
    if kind == "wandb":
        return WandbTracker(cfg, Path(folder), job)
    raise ConfigError(f"metrics.tracker: {kind!r} is not one of none, tensorboard, wandb")


def scalars(row: dict, prefix: str = "") -> dict:
    """The numeric leaves of a (nested) dict as {"a/b": float}; strings, booleans and lists are left out."""
    out = {}
    for k, v in row.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(scalars(v, name + "/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[name] = float(v)
    return out


def iteration_scalars(record: dict) -> dict:
    """One results.json record as scalars, plus the chosen checkpoint's held-out score (select/chosen_score)."""
    out = scalars(record)
    sel = record.get("select", {})
    if sel.get("chosen") in sel.get("scores", {}):
        out["select/chosen_score"] = float(sel["scores"][sel["chosen"]])
    return out


def job_of(folder) -> str:
    """A trainer's run name from its output folder: "iter_1/train" inside a pipeline run, else the folder's name."""
    folder = Path(folder)
    return f"{folder.parent.name}/{folder.name}" if folder.name == "train" else folder.name
