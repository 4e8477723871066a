"""Atomic file writes: a reader sees the old file or the complete new one, never half of either."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_open(path, mode: str = "w", encoding: str | None = "utf-8"):
    """Open a temporary file beside `path`; on a clean exit fsync it and rename it over `path`.

    On an exception the temporary file is removed and `path` is left as it was. The temporary file sits in
    the same directory so the final os.replace is a rename within one filesystem.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path, obj) -> None:
    """json.dump(obj) to `path` atomically, indented, with a trailing newline."""
    with atomic_open(path) as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
