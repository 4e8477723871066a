"""Models and prompt sets by Hugging Face Hub id ("org/name"), through the optional huggingface_hub package.

    resolve_model("RLHF4MATH/Gemma-7B-it-SFT3epoch")  # -> the snapshot folder in the Hub cache
    resolve_model("runs/x/iter_1/policy")             # an existing folder is returned as it is

An existing folder always wins over an id of the same spelling, so every local run works with no network and
without huggingface_hub. Ids are fetched once into the Hub's own cache ($HF_HUB_CACHE, ~/.cache/huggingface),
and only the files mdpo reads (mdpo/weights.py, mdpo/tokenizer.py). HF_HUB_OFFLINE=1 resolves ids from that
cache alone. Every failure is a HubError with one line that says what to do.
"""

from __future__ import annotations

import re
from pathlib import Path

EXTRA = "pip install 'mdpo[hub]'"  # the setup.py extra that installs huggingface_hub

# Exactly what mdpo.weights (config.json, single or sharded safetensors) and mdpo's tokenizers (tokenizer.model;
# tokenizer.json for byte-level BPE; tokenizer_config.json for special and added tokens) read from a model folder,
# as snapshot_download patterns. Not "*": Hub model repos also carry .bin / .pth / .gguf copies of the same
# weights, often tens of GB.
MODEL_FILES = ["config.json", "model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json",
               "tokenizer.model", "tokenizer.json", "tokenizer_config.json"]
DATA_FILES = ["*.parquet", "*.jsonl"]  # prompt sets on the Hub (RLHF4MATH/prompt_iter*) are Parquet

# An id as the Hub spells it: one slash, no leading "." or "/", nothing a path would need beyond that.
_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")


class HubError(ValueError):
    """A Hub id could not be resolved; the message is one line that says what to do."""


def is_hub_id(name: str) -> bool:
    """True when `name` is spelled like a Hub repo id ("org/name") and is not an existing path."""
    return bool(_ID.fullmatch(str(name))) and not Path(name).expanduser().exists()


def _hub():
    try:
        import huggingface_hub
    except ImportError:
        return None
    return huggingface_hub


def snapshot(repo_id: str, patterns: list[str], repo_type: str = "model", revision: str | None = None) -> Path:
    """The local snapshot folder of `repo_id` holding the files matching `patterns`, downloaded if needed."""
    hub = _hub()
    what = "dataset" if repo_type == "dataset" else "model"
    if hub is None:
        raise HubError(f"{repo_id!r} is a Hugging Face Hub {what} id and huggingface_hub is not installed: {EXTRA} "
                       f"(or pass a local folder)")
    from huggingface_hub import constants, errors

    page = f"https://huggingface.co/{'datasets/' if repo_type == 'dataset' else ''}{repo_id}"
    try:
        return Path(hub.snapshot_download(repo_id, repo_type=repo_type, revision=revision,
                                          allow_patterns=patterns))
    except errors.GatedRepoError:
        raise HubError(f"{page} is gated: accept its licence on that page, then `hf auth login` "
                       f"(or set HF_TOKEN)") from None
    except errors.RepositoryNotFoundError:
        raise HubError(f"{repo_id!r}: no such local folder, and no Hub {what} {page} (check the spelling; for a "
                       f"private repo `hf auth login`)") from None
    except errors.RevisionNotFoundError:
        raise HubError(f"{page}: no revision {revision!r}") from None
    except errors.LocalEntryNotFoundError:
        # Offline (HF_HUB_OFFLINE=1) or the Hub unreachable, and the id is not (completely) in the Hub cache.
        opt = " --repo-type dataset" if repo_type == "dataset" else ""
        raise HubError(f"{repo_id!r}: no such local folder, and the Hub {what} is not in the Hugging Face cache "
                       f"({constants.HF_HUB_CACHE}) while the Hub is unreachable or HF_HUB_OFFLINE is set: "
                       f"run once online (`hf download {repo_id}{opt}`) or pass a local folder") from None
    except (errors.HfHubHTTPError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HubError(f"{page}: download failed ({first}); rerun to resume, or pass a local folder") from None


def resolve_model(name_or_path, revision: str | None = None) -> str:
    """A local model folder for `name_or_path`: the folder itself, or a Hub id's snapshot folder.

    Anything that is neither an existing path nor spelled like a Hub id (a preset name such as "tiny-gemma3",
    a missing absolute path) is returned unchanged, so the loader reports it as before.
    """
    name = str(name_or_path)
    if not is_hub_id(name):
        return name
    folder = snapshot(name, MODEL_FILES, revision=revision)
    has_weights = (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file()
    if not (folder / "config.json").is_file() or not has_weights:
        raise HubError(f"https://huggingface.co/{name} has no config.json and safetensors weights (mdpo loads "
                       f"only safetensors): convert it to a local folder and pass that")
    return str(folder)


def resolve_model_ranks(name_or_path) -> str:
    """resolve_model under torchrun: rank 0 first (it downloads), then the other ranks (from the cache), so N
    processes do not fetch the same snapshot at once. Without a process group, resolve_model."""
    from mdpo.distributed import barrier, world

    first = world()[0] == 0
    if not first:
        barrier()
    try:
        return resolve_model(name_or_path)
    finally:
        if first:
            barrier()

