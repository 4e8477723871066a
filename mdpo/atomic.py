"""Atomic file writes: a reader sees the old file or the complete new one, never half of either."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import socket
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_open(path, mode: str = "w", encoding: str | None = "utf-8"):
    """Open a temporary file beside `path`; on a clean exit fsync it and rename it over `path`.

    On an exception the temporary file is removed and `path` is left as it was. The temporary file sits in
    the same directory so the final os.replace is a rename within one filesystem. A killed writer's temporary
    file of the same `path` is removed first: a rerun that rewrites the file leaves no orphan behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{_HOST}.{os.getpid()}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


_HOST = socket.gethostname()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def remove_stale_temporaries(path) -> list[Path]:
    """Remove the temporary files of `path` that a killed writer left (a SIGKILL skips atomic_open's cleanup).

    A temporary file is named .NAME.HOST.PID.RANDOM.tmp: only those of this host whose process is gone are
    removed, so a concurrent writer of the same file (another rank, another node on a shared filesystem) keeps
    its own. Returns the removed paths.
    """
    path = Path(path)
    head = f".{path.name}."
    gone = []
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        host_pid = tmp.name[len(head):-len(".tmp")].rpartition(".")[0]  # drop mkstemp's random part
        host, _, pid = host_pid.rpartition(".")
        if host == _HOST and pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)
            gone.append(tmp)
    return gone


def write_json_atomic(path, obj) -> None:
    """json.dump(obj) to `path` atomically, indented, with a trailing newline."""
    with atomic_open(path) as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
