"""Deterministic kill points for the fault tests: MDPO_KILL_AT=POINT[:N] SIGKILLs this process at POINT's Nth hit.

A SIGKILL runs no handler, no `finally` and no atexit, so what it leaves on disk is what a power cut or an
OOM kill would leave. Points (N counts hits in this process, default 1):

    checkpoint.save     step_N.tmp holds the DCP shards but not yet trainer_state.pt (a checkpoint mid-write)
    checkpoint.commit   step_N.tmp is complete, not yet renamed to step_N
    checkpoint.prune    step_N committed, the checkpoints beyond checkpoint.keep not yet removed
    export.write        the export's .tmp folder is written, not yet renamed into place
    export.swap         an older folder of the same name moved aside, the new one not yet renamed in
    metrics.write       half of a metrics.jsonl line written (a torn append)
    reference.write     half of the reference log-prob file written into its temporary file
    merge.write         half of one rank's part written into the merged file's temporary file (one hit per part)
    merge.unlink        the merged file in place, one rank's part file removed, the others not yet
    rollout.append      half of a trajectory line appended to a sampling file (one hit per trajectory)
"""

from __future__ import annotations

import os
import signal

ENV = "MDPO_KILL_AT"
_hits: dict[str, int] = {}


def armed(point: str) -> bool:
    """Count a hit of `point`; True on the hit that MDPO_KILL_AT asks to be killed at."""
    spec = os.environ.get(ENV)
    if not spec:
        return False
    name, _, n = spec.partition(":")
    if name != point:
        return False
    _hits[point] = _hits.get(point, 0) + 1
    return _hits[point] == int(n or 1)


def kill() -> None:
    """SIGKILL this process now (no cleanup of any kind runs)."""
    os.kill(os.getpid(), signal.SIGKILL)


def maybe_kill(point: str) -> None:
    """SIGKILL this process if MDPO_KILL_AT names `point` and this is its Nth hit."""
    if armed(point):
        kill()


def write(f, text: str, point: str) -> None:
    """f.write(text); at an armed `point` only the first half reaches the disk before the SIGKILL (a torn write)."""
    if not armed(point):
        f.write(text)
        return
    f.write(text[: len(text) // 2])
    f.flush()
    os.fsync(f.fileno())
    kill()
