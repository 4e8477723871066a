"""Trainer state on disk: DCP checkpoints committed by rename, HF-layout exports, and peak memory.

A checkpoint is written into step_N.tmp by every rank and renamed to step_N by rank 0 once all have written:
the rename is the commit point, so a kill at any moment leaves the previous checkpoint intact. Exports are
the full (unsharded) weights as an HF-layout folder, written beside their final name and renamed into place.
Folders being written or removed end in .tmp; remove_leftovers clears those a killed run left.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import torch

from mdpo.distributed import barrier, world
from mdpo.faults import maybe_kill
from mdpo.lora import ADAPTER_DIR, has_lora, merge_state_dict, save_adapter
from mdpo.model import CausalLM
from mdpo.weights import hf_name, save_pretrained


def checkpoint_dirs(out: Path) -> list[Path]:
    ckpts = [p for p in (out / "checkpoints").glob("step_*") if p.is_dir() and not p.name.endswith(".tmp")]
    return sorted(ckpts, key=lambda p: int(p.name.split("_")[1]))


def discard(folder: Path) -> None:
    """Remove a folder: renamed to NAME.old.tmp first, so a kill mid-removal never leaves a partial NAME."""
    aside = folder.with_name(folder.name + ".old.tmp")
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(folder, aside)
    shutil.rmtree(aside, ignore_errors=True)


def replace_folder(tmp: Path, folder: Path, kill_point: str | None = None) -> None:
    """Put the complete folder `tmp` in place of `folder`. The old one is moved aside first and removed after, not
    removed in place: a kill during rmtree would leave a partial folder under the final name."""
    aside = folder.with_name(folder.name + ".old.tmp")
    if folder.exists():
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(folder, aside)
        if kill_point:
            maybe_kill(kill_point)
    os.replace(tmp, folder)  # a folder under its final name is always complete
    shutil.rmtree(aside, ignore_errors=True)


def remove_leftovers(out: Path, keep: int) -> None:
    """Clear what a killed trainer left in `out`: .tmp folders (checkpoints, exports, final) and the checkpoints
    beyond `keep` that it had committed a newer one for but not yet removed. Rank 0, before anything is written."""
    for tmp in [*(out / "checkpoints").glob("*.tmp"), *(out / "exports").glob("*.tmp"), *out.glob("final*.tmp")]:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in checkpoint_dirs(out)[:-keep]:
        discard(old)


def save_checkpoint(out: Path, step: int, model, opt, sched, keep: int):
    """torch.distributed.checkpoint into step_N.tmp, renamed to step_N when every rank has written."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    rank, _ = world()
    final = out / "checkpoints" / f"step_{step}"
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    msd, osd = get_state_dict(model, opt, options=_options(model))
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp))
    maybe_kill("checkpoint.save")
    barrier()
    if rank == 0:
        torch.save({"step": step, "scheduler": sched.state_dict(), "rng": torch.get_rng_state(),
                    "py_rng": random.getstate()}, tmp / "trainer_state.pt")
        maybe_kill("checkpoint.commit")
        if final.exists():
            discard(final)  # a run restarted without --resume: os.replace cannot rename onto a non-empty folder
        os.replace(tmp, final)  # the rename is the commit point: a kill before it leaves the old one
        maybe_kill("checkpoint.prune")
        for old in checkpoint_dirs(out)[:-keep]:
            discard(old)
    barrier()


def load_checkpoint(path: Path, model, opt, sched) -> int:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, opt, options=_options(model))
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=str(path))
    result = set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"],
                            options=_options(model, loading=True))
    # Loading only what trains is not strict by itself: the keys it did not set must be exactly the frozen base.
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    unset = {k for k in result.missing_keys if k not in frozen} if result else set()
    if result and (unset or result.unexpected_keys):
        raise RuntimeError(f"{path}: checkpoint does not fit the model: not set {sorted(unset)[:5]}, unexpected "
                           f"{sorted(result.unexpected_keys)[:5]}")
    extra = torch.load(path / "trainer_state.pt", weights_only=False)
    sched.load_state_dict(extra["scheduler"])
    torch.set_rng_state(extra["rng"])
    random.setstate(extra["py_rng"])
    return extra["step"]


def _options(model, loading: bool = False):
    """With adapters, a checkpoint holds only what trains: the frozen base is reloaded from its folder on resume
    (a 7B base would otherwise be rewritten into every checkpoint). Loading it then leaves the base's keys unset,
    which strict loading refuses; load_checkpoint checks instead that exactly those were left."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    if not has_lora(model):
        return None
    return StateDictOptions(ignore_frozen_params=True, strict=not loading)


def export(model, folder: Path, source: str, dtype: torch.dtype | None = None, lora=None):
    """The weights as an HF-layout folder (+ the source's tokenizer) in `dtype` (default: the weights' own),
    written beside and renamed into place. With adapters (`lora`, the config section), the weights are merged
    and the adapter goes beside them in PEFT's format, in `folder`/adapter (its base: `source`)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if world()[0] != 0:
        return
    with torch.device("meta"):
        plain = CausalLM(model.config)
    plain = plain.to_empty(device="cpu")
    adapted = has_lora(model)
    if adapted and lora is None:
        raise ValueError("export of a model with adapters needs its lora config")
    plain.load_state_dict(merge_state_dict(sd, lora) if adapted else sd, strict=True)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tok = None
    if any((Path(source) / f).is_file() for f in ("tokenizer.model", "tokenizer.json")):
        from mdpo.tokenizer import load_tokenizer
        tok = load_tokenizer(source)
    save_pretrained(plain, tmp, tokenizer=tok, dtype=dtype)
    if adapted:
        save_adapter(sd, tmp / ADAPTER_DIR, lora, str(source), model.config.tie_embeddings, hf_name)
    maybe_kill("export.write")
    replace_folder(tmp, folder, "export.swap")


def peak_memory_gb(device) -> float:
    """Peak accelerator memory allocated, or on the CPU the process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    return float("nan")
