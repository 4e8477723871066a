"""Sandboxed, stateful Python executor for the agent's ```python cells.

One persistent worker process per trajectory, with notebook semantics: variables, imports and
functions carry across that trajectory's cells, and a bare final expression's ``repr`` is shown
after the cell's output (unless it is ``None`` or the cell ends with ``;``), as in Jupyter.
The official M-DPO executor instead replayed every earlier cell in a fresh IPython shell without
any sandbox (it "destroyed the conda env"); see shared/reference/grading-executors.md section 3.

Observation text (``CellResult.observation``), paper defaults
-------------------------------------------------------------
These are the interpreter's raw results. What the model is shown is
``mdpo.tools.observation_text`` of them (the one place that removes ANSI escapes and control
characters and puts the paper's placeholder, ``mdpo.tools.EMPTY_OUTPUT``, in place of an empty
output), applied by ``mdpo.tools.PythonTool`` in rollouts and by ``mdpo.data`` to SFT data.

* ``ok``: the cell's output (stdout and stderr, interleaved, then the final expression's value),
  stripped; ``""`` when there is none. Longer than ``Limits.max_output_chars``: head and tail are kept
  around a ``... [N characters cut] ...`` line (cut while written, so huge prints cost no memory).
* ``error`` / ``memory`` (an exception; ``memory`` is a ``MemoryError``): only the last traceback
  line, e.g. ``NameError: name 'x' is not defined``. ``Limits(full_traceback=True)`` shows the
  output followed by the whole traceback (executor frames removed).
* ``timeout``: ``Timeout Error``.
* ``crashed`` (the process died: segfault, ``os._exit``, closed protocol pipe ...):
  ``Crashed: <reason>. The interpreter was restarted and all variables were lost.``
After ``timeout``, ``memory`` and ``crashed`` the worker is killed and the next cell of the
session starts in a fresh one (``CellResult.restarted`` is then true).

What is isolated
----------------
Processes: host -> *zygote* (started once per host process; math, cmath, fractions, decimal,
itertools, numpy, sympy ... imported and exercised, so ``import sympy`` in a cell is free) ->
per worker a root *monitor* -> *init* -> the *worker*. Two modes, picked by ``Limits.sandbox``
("auto" uses ``namespaces`` when it works here, else ``rlimits``; the environment variable
``MDPO_SANDBOX=rlimits`` or ``=namespaces`` overrides "auto", e.g. to try the fallback as root).
``announce_sandbox`` prints the mode in use once per process (mdpo.eval and the pipeline call it).

``namespaces`` (needs root; measured on this project's 2-core VM: ~25 ms to start a worker from
the warm zygote, ~0.25 ms per trivial cell):

* new network, PID, mount, IPC and UTS namespaces (``unshare`` through ctypes). Network: only an
  unconfigured loopback, so ``connect`` fails at once with ``Network is unreachable`` (host
  services on 127.0.0.1 and abstract Unix sockets are out of reach). PID: init is PID 1 and root;
  the worker sees only its own namespace, so it cannot signal the host, the zygote or another
  trajectory (``getppid()`` is init, which it may not signal), and when init dies the kernel
  kills every process left in the namespace (fork bombs, ``setsid`` orphans). The worker is not
  PID 1 itself because PID 1 ignores SIGXCPU and signals it has no handler for (measured);
* a mount view of its own: every mount re-mounted read-only, ``/root``, ``/home``, ``/work``,
  ``/mnt`` and ``/srv`` hidden behind empty tmpfs (the interpreter and site-packages are bound
  back read-only: pyenv lives in ``/root``, mode 0700), a fresh ``/proc``, and a private tmpfs of
  ``Limits.disk_bytes`` on ``/tmp`` holding the working directory. Writes outside it fail with
  ``Read-only file system``; nothing the worker writes reaches the real disk;
* a private unprivileged uid per worker (no capabilities, ``no_new_privs`` so setuid binaries do
  not help). That makes ``RLIMIT_NPROC`` effective; it bounds the worker's processes *and
  threads* (``Limits.max_processes``). As root it does nothing (measured: 5 forks under NPROC=2).

``rlimits`` (fallback without root or namespaces): same process structure and uid as the host,
plus Python-level guards: sockets, ``fork``/``exec``/``subprocess``/``os.system``, new threads,
``os.kill`` of other processes and writes/deletions outside the working directory raise
``PermissionError``. They are bypassable (ctypes, ``posix`` internals, ``_io.open``): a seat belt, not a
sandbox. A cell reads whatever the user may read, there is no disk quota (``RLIMIT_FSIZE`` bounds each
file only), and for a non-root user ``RLIMIT_NPROC`` counts all of that user's processes (as root it is not
set). tests/test_executor.py runs the hostile cells in this mode too, and as a real unprivileged user.

Both modes: ``RLIMIT_AS`` (``memory_bytes``), ``RLIMIT_FSIZE`` (also caps fd-level output),
``RLIMIT_NOFILE``, ``RLIMIT_CORE`` = 0, a 256 MiB stack with a capped ``sys.setrecursionlimit``
(Python 3.11 frames live on the heap: an uncapped infinite recursion crawls through the address
space for ~20 s), an allow-listed environment (no tokens, ``OMP_NUM_THREADS=1``,
``CUDA_VISIBLE_DEVICES=""``), stdin on ``/dev/null``, ``oom_score_adj`` 1000 (the kernel's OOM
killer picks a worker before the host), a fresh working directory per worker (removed by
``close``), and a host-side wall-clock timeout that SIGKILLs init (signal tampering inside cannot
stop it). ``RLIMIT_CPU``: before each cell the worker moves its soft limit to "CPU used + budget"
(SIGXCPU -> ``timeout``). This container lacks CAP_SYS_RESOURCE, so even root cannot raise a hard
limit again: the hard limit stays unlimited and a cell could raise its own soft limit; the wall
clock is the real bound. Code and results travel over pipes of their own, so closing or
redirecting stdout/stderr cannot break the protocol; fd-level output (``os.write(1, ...)``,
subprocesses) goes to an unlinked host-owned file and is shown after the Python-level output.
Threads and child processes do not outlive a cell: the worker waits for its threads (one that
never ends turns the cell into a timeout) and SIGKILLs its leftover processes.

Not isolated: CPU share (no cgroup; the cores are shared with the host), the total memory of
many workers (``RLIMIT_AS`` is per process, so up to ``max_processes`` x ``memory_bytes`` per
worker; only cgroup v1 is mounted here and is not used), reading world-readable files outside
the hidden directories (``/etc``, ``/usr``, ``/sys``), user namespaces the worker may create
itself (no seccomp filter), and kernel exploits. A cell can break its own worker (e.g.
``json.dumps = None``): that is reported as ``crashed`` for that trajectory only.
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, replace

from mdpo.sandbox import Limits, Worker, describe_exit, poll_ready, recv_frame, send_frame

__all__ = ["Limits", "CellResult", "Session", "ExecutorPool", "run_cells", "sandbox_mode", "announce_sandbox"]

STATUSES = ("ok", "error", "timeout", "memory", "crashed")
TIMEOUT_OBSERVATION = "Timeout Error"


@dataclass
class CellResult:
    """The outcome of one cell. ``status`` is one of ``STATUSES``."""

    status: str
    observation: str
    stdout: str = ""  # captured output (head/tail-cut), whatever the status
    error: str = ""  # last traceback line / crash reason
    traceback: str = ""  # full traceback without executor frames
    elapsed: float = 0.0  # wall-clock seconds, host side
    restarted: bool = False  # this cell ran in a fresh worker: earlier state was lost


# --------------------------------------------------------------------------------------------
# Observation text (host side)

def _render(pieces: list, max_chars: int) -> str:
    """Join text pieces (str, or int = that many hidden chars); keep head and tail around a marker."""
    pieces = [p for p in pieces if p != "" and p != 0]
    while pieces and isinstance(pieces[0], str) and not pieces[0].strip():
        pieces.pop(0)
    while pieces and isinstance(pieces[-1], str) and not pieces[-1].strip():
        pieces.pop()
    if pieces and isinstance(pieces[0], str):
        pieces[0] = pieces[0].lstrip()
    if pieces and isinstance(pieces[-1], str):
        pieces[-1] = pieces[-1].rstrip()
    total = sum(p if isinstance(p, int) else len(p) for p in pieces)
    if total <= max_chars and all(isinstance(p, str) for p in pieces):
        return "".join(pieces)
    half = max(max_chars // 2, 1)
    head, n = [], 0
    for p in pieces:  # the head stops at the first hidden piece
        if isinstance(p, int) or n >= half:
            break
        head.append(p[: half - n])
        n += len(head[-1])
    tail, m = [], 0
    for p in reversed(pieces):
        if isinstance(p, int) or m >= half:
            break
        tail.append(p[len(p) - min(len(p), half - m):])
        m += len(tail[-1])
    cut = total - n - m
    return "".join(head) + f"\n... [{cut} characters cut] ...\n" + "".join(reversed(tail))


def _clean(text: str) -> str:
    # Lone surrogates (print("\ud800")) would break JSON and tokenizers downstream. Escapes and control
    # characters are removed later, where the model's view is made (mdpo.tools.observation_text).
    return text.encode("utf-8", "replace").decode("utf-8")


# --------------------------------------------------------------------------------------------
# Sessions and the pool (host side; the sandbox itself is mdpo/sandbox.py)

_MODE: dict[str, bool] = {}  # mode -> works on this machine (learned on first use)
MODES = ("auto", "namespaces", "rlimits")
# MDPO_SANDBOX=rlimits forces the fallback wherever Limits.sandbox is "auto" (every pool the pipeline and
# mdpo.eval build): a root machine can then run anything exactly as a user without namespaces would.
SANDBOX_ENV = "MDPO_SANDBOX"


def sandbox_mode(limits: Limits | None = None) -> str:
    """The sandbox mode a new Session would use here ("namespaces" or "rlimits")."""
    want = (limits or Limits()).sandbox
    if want == "auto":
        want = os.environ.get(SANDBOX_ENV, "").strip() or "auto"
    if want not in MODES:
        raise ValueError(f"sandbox mode must be one of {MODES} (Limits.sandbox or ${SANDBOX_ENV}), got {want!r}")
    if want != "auto":
        return want
    if os.geteuid() != 0 or not sys.platform.startswith("linux") or _MODE.get("namespaces") is False:
        return "rlimits"
    return "namespaces"


class Session:
    """One sandboxed worker with notebook semantics; ``run`` cells in order, then ``close``."""

    def __init__(self, limits: Limits | None = None, **overrides):
        self.limits = replace(limits or Limits(), **overrides)
        self._worker: Worker | None = None
        self._lock = threading.Lock()
        self._lost = False  # the previous worker died: the next cell reports restarted=True
        self._closed = False
        self.cells = 0

    @property
    def workdir(self) -> str | None:
        """The current worker's working directory (None before the first cell or after close)."""
        return self._worker.workdir if self._worker else None

    @property
    def mode(self) -> str:
        return self._worker.mode if self._worker else sandbox_mode(self.limits)

    def start(self) -> "Session":
        """Start the worker now (otherwise the first ``run`` does)."""
        with self._lock:
            self._ensure()
        return self

    def _ensure(self) -> Worker:
        if self._closed:
            raise RuntimeError("session is closed")
        if self._worker is None:
            mode = sandbox_mode(self.limits)
            try:
                self._worker = Worker(self.limits, mode)
                _MODE[mode] = True
            except RuntimeError:
                if self.limits.sandbox != "auto" or mode != "namespaces" or _MODE.get(mode):
                    raise
                _MODE[mode] = False  # this machine cannot: fall back for good
                self._worker = Worker(self.limits, "rlimits")
        return self._worker

    def _drop(self) -> None:
        if self._worker is not None:
            self._worker.close()
            self._worker = None
        self._lost = True

    def run(self, code: str, timeout: float | None = None) -> CellResult:
        """Run one cell; never raises for anything the cell does."""
        with self._lock:
            t0 = time.monotonic()
            timeout = self.limits.timeout if timeout is None else timeout
            restarted = self._lost and self._worker is None
            w = self._ensure()
            self._lost = False
            self.cells += 1
            keep = self.limits.max_output_chars
            try:
                os.ftruncate(w.out, 0)
                deadline = time.monotonic() + timeout
                per_cell = {"max_output_chars": keep, "timeout": timeout}
                send_frame(w.cmd, {"code": code, "limits": per_cell}, deadline)
                res = self._wait(w, deadline)
            except (OSError, TimeoutError):
                res = None
            elapsed = time.monotonic() - t0
            if isinstance(res, dict) and res.get("status") in ("ok", "error", "memory"):
                return self._finish(res, w, elapsed, restarted)
            return self._dead(w, res == "timeout", elapsed, restarted)

    def _wait(self, w: Worker, deadline: float):
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return "timeout"
            ready = poll_ready([w.resp, w.status], left)
            if w.resp in ready:
                try:
                    return recv_frame(w.resp, deadline + 1.0)
                except TimeoutError:
                    return "timeout"
            if w.status in ready:
                return None  # died without answering

    def _finish(self, res: dict, w: Worker, elapsed: float, restarted: bool) -> CellResult:
        keep = self.limits.max_output_chars
        pieces = [p for p in res.get("pieces", []) if isinstance(p, (str, int))]
        output = _clean(_render(pieces + w.output(keep), keep))
        status = res["status"]
        error = _clean(str(res.get("error", ""))[: 4 * keep])
        tb = _clean(str(res.get("traceback", "")))
        if status == "ok":
            obs = output
        elif self.limits.full_traceback:
            obs = _render([output + "\n" + tb], keep).strip()
        else:
            obs = _render([error], keep)
        if status == "memory":  # the memory may still be held by globals: start afresh
            self._drop()
        return CellResult(status, obs, output, error, tb, elapsed, restarted)

    def _dead(self, w: Worker, timed_out: bool, elapsed: float, restarted: bool) -> CellResult:
        keep = self.limits.max_output_chars
        # A worker that died on its own: init reports how within milliseconds. One that sent
        # garbage is still alive: the kill below ends it and there is no exit status.
        ex = None if timed_out else w.wait_exit(1.0)
        w.kill()
        ex = ex or w.wait_exit(2.0)
        output = _clean(_render(w.output(keep), keep))
        if timed_out or (ex and os.WIFSIGNALED(ex[0]) and os.WTERMSIG(ex[0]) == signal.SIGXCPU):
            self._drop()
            return CellResult("timeout", TIMEOUT_OBSERVATION, output, TIMEOUT_OBSERVATION, "",
                              elapsed, restarted)
        reason = describe_exit(ex[0]) if ex else "the interpreter stopped answering"
        self._drop()
        obs = f"Crashed: {reason}. The interpreter was restarted and all variables were lost."
        return CellResult("crashed", obs, output, reason, "", elapsed, restarted)

    def close(self) -> None:
        """Kill the worker and remove its working directory (idempotent)."""
        with self._lock:
            if self._worker is not None:
                self._worker.close()
                self._worker = None
            self._closed = True

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            if self._worker is not None:
                self._worker.close()
        except Exception:  # noqa: BLE001
            pass


_ANNOUNCED: list[str] = []  # the mode already announced by this process (at most one entry)

ISOLATION = {
    "namespaces": "namespaces (own network, PID, mount, IPC and UTS namespaces; read-only file system, homes "
                  "hidden, private /tmp; private uid; rlimits)",
    "rlimits": "rlimits only (no root or no namespaces here): same uid and file system as this process, "
               "rlimits plus Python-level guards that code can bypass (ctypes); not a security boundary",
}


def announce_sandbox(limits: Limits | None = None, show: bool = True) -> str:
    """The mode a Session really gets here, printed to stderr by the first call in this process.

    It starts one worker to find out, since "auto" falls back only when namespaces fail; that also starts
    the zygote, so a machine that cannot run the executor at all fails here, before any training. A call
    with show=False (a rank other than 0) still counts as the announcement, so later calls stay quiet.
    """
    if not _ANNOUNCED:
        with Session(limits) as s:
            s.start()
            mode = s.mode
        if show:
            print(f"executor sandbox: {ISOLATION[mode]}", file=sys.stderr, flush=True)
        _ANNOUNCED.append(mode)
    return _ANNOUNCED[0]


def run_cells(cells: list[str], timeout: float = 20.0, **limits) -> list[CellResult]:
    """Run ``cells`` in order in one fresh sandboxed session; one result per cell."""
    with Session(Limits(timeout=timeout, **limits)) as s:
        return [s.run(c) for c in cells]


class ExecutorPool:
    """Sessions for many trajectories, run concurrently; a trajectory's cells run in order.

    A stuck cell holds one of ``max_workers`` threads for at most its timeout: with at least as
    many threads as concurrently active trajectories it never delays another trajectory.
    """

    def __init__(self, max_workers: int = 8, limits: Limits | None = None, **overrides):
        self.limits = replace(limits or Limits(), **overrides)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers, thread_name_prefix="executor")
        self._lock = threading.Lock()
        self._sessions: dict = {}
        self._queues: dict = collections.defaultdict(collections.deque)
        self._active: set = set()  # trajectories whose queue is being drained by a pool thread

    def submit(self, traj_id, code: str) -> "concurrent.futures.Future[CellResult]":
        """Queue a cell for ``traj_id`` (its session is created on first use)."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._enqueue(traj_id, (code, fut))
        return fut

    def run(self, traj_id, code: str) -> CellResult:
        """``submit(...).result()``."""
        return self.submit(traj_id, code).result()

    def release(self, traj_id) -> "concurrent.futures.Future[None]":
        """Close ``traj_id``'s session after its queued cells; a later submit starts a new one."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._enqueue(traj_id, (None, fut))
        return fut

    def _enqueue(self, traj_id, item) -> None:
        with self._lock:
            self._queues[traj_id].append(item)
            if traj_id in self._active:
                return
            self._active.add(traj_id)
        self._pool.submit(self._drain, traj_id)

    def _drain(self, traj_id) -> None:
        while True:
            with self._lock:
                q = self._queues[traj_id]
                if not q:
                    self._active.discard(traj_id)
                    del self._queues[traj_id]
                    return
                code, fut = q.popleft()
                sess = self._sessions.get(traj_id)
                if code is None:
                    self._sessions.pop(traj_id, None)
                elif sess is None:
                    sess = self._sessions[traj_id] = Session(self.limits)
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                if code is None:
                    if sess is not None:
                        sess.close()
                    fut.set_result(None)
                else:
                    fut.set_result(sess.run(code))
            except BaseException as e:  # noqa: BLE001 - e.g. the sandbox could not start
                fut.set_exception(e)

    def shutdown(self) -> None:
        """Wait for queued cells, then close every session."""
        self._pool.shutdown(wait=True)
        with self._lock:
            sessions, self._sessions = list(self._sessions.values()), {}
        for s in sessions:
            s.close()

    def __enter__(self) -> "ExecutorPool":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
