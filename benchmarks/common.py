"""Helpers shared by the benchmark scripts: peak-memory measurement of the current process on Linux, and a
tool stub that answers at once or after a delay."""

from __future__ import annotations

import concurrent.futures as cf
import gc
import os
import time
from types import SimpleNamespace

# A fixed mmap threshold makes glibc hand every large buffer back to the OS on free, so RSS follows the bytes
# actually live; with the default dynamic threshold, freed buffers up to 32 MB stay resident and a peak
# depends on allocation history rather than on the code measured. Set for the worker processes.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def worker_env() -> dict:
    return dict(os.environ, **MALLOC_ENV)


def rss_mb(field: str = "VmRSS") -> float:
    """A memory field of /proc/self/status in MB (VmRSS: now; VmHWM: the high-water mark)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> float:
    """Reset VmHWM to the current RSS (Linux >= 4.0) and return that RSS in MB: the baseline of a peak."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return rss_mb("VmRSS")


class StubExecutor:
    """A tool that answers every call with a fixed text, at once or after `delay_s` seconds (the interpreter's
    latency without its work, so rows pause on a call while the others decode): the sampler's work without the
    interpreter's (bench_sampler's part 3 measures that)."""

    def __init__(self, text, delay_s: float = 0.0):
        self.text, self.delay_s = text, delay_s
        self.pool = cf.ThreadPoolExecutor(max_workers=32) if delay_s > 0 else None

    def _answer(self):
        time.sleep(self.delay_s)
        return SimpleNamespace(observation=self.text)

    def submit(self, key, code):
        if self.pool is not None:
            return self.pool.submit(self._answer)
        f = cf.Future()
        f.set_result(SimpleNamespace(observation=self.text))
        return f

    def release(self, key):
        pass


def machine() -> str:
    """One line naming this machine: CPU model, cores, and torch's build, for a result file's meta."""
    import platform

    import torch
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{model}, {os.cpu_count()} cores{gpu}, torch {torch.__version__}"


def emit(result: dict, tables: dict, out=None, command: str | None = None) -> None:
    """Print each table as markdown, then the result as one JSON line; with `out`, also write it atomically.

    `tables` maps a name to (columns, rows): the tables a reader sees, kept in the result so that
    `make docs` (mdpo/docs.py) renders the very same table from the file into README.md and docs/."""
    import datetime
    import json
    import sys

    from mdpo.atomic import write_json_atomic
    from mdpo.docs import markdown_table

    result = dict(result)
    result["tables"] = {k: {"columns": list(c), "rows": [list(r) for r in rows]} for k, (c, rows) in tables.items()}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
    command = command or "python " + " ".join(a.replace(root, "") for a in sys.argv)  # no machine paths
    result["meta"] = {"command": command, "machine": machine(),
                      "date": datetime.date.today().isoformat()}
    for name, t in result["tables"].items():
        print(f"\n{name}:\n" + markdown_table(t["columns"], t["rows"]))
    print(json.dumps(result), flush=True)
    if out:
        write_json_atomic(out, result)
