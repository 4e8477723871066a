"""Sandboxed, stateful Python executor for the agent's ```python cells.

One persistent worker process per trajectory, with notebook semantics: variables, imports and
functions carry across that trajectory's cells, and a bare final expression's ``repr`` is shown
after the cell's output (unless it is ``None`` or the cell ends with ``;``), as in Jupyter.
The official M-DPO executor instead replayed every earlier cell in a fresh IPython shell without
any sandbox (it "destroyed the conda env"); see shared/reference/grading-executors.md section 3.

Observation text (``CellResult.observation``), paper defaults
-------------------------------------------------------------
* ``ok``: the cell's output (stdout and stderr, interleaved, then the final expression's value),
  stripped; ``""`` when there is none (the paper's driver substituted a placeholder string:
  that is the caller's choice). Longer than ``Limits.max_output_chars``: head and tail are kept
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
("auto" uses ``namespaces`` when it works here, else ``rlimits``).

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
``PermissionError``. They are bypassable (ctypes, ``posix`` internals): a seat belt, not a sandbox.

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

import ast
import collections
import concurrent.futures
import ctypes
import fcntl
import io
import itertools
import json
import os
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass, replace

__all__ = ["Limits", "CellResult", "Session", "ExecutorPool", "run_cells", "sandbox_mode"]

_THIS_FILE = os.path.abspath(__file__)
STATUSES = ("ok", "error", "timeout", "memory", "crashed")
TIMEOUT_OBSERVATION = "Timeout Error"


@dataclass(frozen=True)
class Limits:
    """Per-cell limits and observation options (the defaults follow the paper where it has one)."""

    timeout: float = 20.0  # wall-clock seconds per cell (paper: 20 s)
    cpu_time: float | None = None  # CPU seconds per cell (RLIMIT_CPU soft limit); None: timeout + 1
    memory_bytes: int = 2 * 1024**3  # address space per process (RLIMIT_AS)
    file_size_bytes: int = 16 * 1024**2  # largest file the worker may write (RLIMIT_FSIZE)
    disk_bytes: int = 64 * 1024**2  # private tmpfs for the working dir and /tmp (namespaces mode)
    max_processes: int = 4  # processes + threads of the worker's uid (RLIMIT_NPROC, namespaces mode)
    max_open_files: int = 64  # RLIMIT_NOFILE
    max_output_chars: int = 2000  # observation length; head and tail are kept around a marker
    recursion_limit: int = 100_000  # cap on sys.setrecursionlimit (C stack is raised to 256 MiB)
    full_traceback: bool = False  # errors show output + full traceback instead of the last line
    sandbox: str = "auto"  # "auto" | "namespaces" | "rlimits"


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
# Small shared helpers (host and worker)

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
_HDR = struct.Struct(">I")
_MAX_FRAME = 16 * 1024**2


def _ready(fds: list[int], timeout: float, write: bool = False) -> list[int]:
    """The fds of ``fds`` ready within ``timeout`` s (poll: select breaks above fd 1023)."""
    if timeout <= 0:
        return []
    p = select.poll()
    for fd in fds:
        p.register(fd, select.POLLOUT if write else select.POLLIN)
    return [fd for fd, _ in p.poll(timeout * 1000)]


def _send_frame(fd: int, obj, deadline: float | None = None) -> None:
    data = json.dumps(obj).encode()
    data = _HDR.pack(len(data)) + data
    view = memoryview(data)
    while view:
        if deadline is not None:
            left = deadline - time.monotonic()
            if not _ready([fd], left, write=True):
                raise TimeoutError("worker did not read its request")
        view = view[os.write(fd, view):]


def _read_exact(fd: int, n: int, deadline: float | None) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if not _ready([fd], left):
                raise TimeoutError
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def _recv_frame(fd: int, deadline: float | None = None):
    """Read one length-prefixed JSON frame; None on EOF or garbage (never unpickles)."""
    hdr = _read_exact(fd, 4, deadline)
    if hdr is None:
        return None
    (n,) = _HDR.unpack(hdr)
    if n > _MAX_FRAME:
        return None
    body = _read_exact(fd, n, deadline)
    try:
        return json.loads(body) if body is not None else None
    except ValueError:
        return None


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
    # Lone surrogates (print("\ud800")) would break tokenizers downstream.
    return _ANSI.sub("", text).encode("utf-8", "replace").decode("utf-8")


# --------------------------------------------------------------------------------------------
# Worker side (runs in the sandboxed process)


class _Capture(io.TextIOBase):
    """sys.stdout/sys.stderr of a cell: keeps the first and last ``keep`` chars, counts the rest."""

    def __init__(self, keep: int):
        self.keep, self.head, self.tail, self.cut = keep, [], "", 0
        self.head_len = 0
        self.buffer = self  # code that writes bytes to sys.stdout.buffer

    def write(self, s) -> int:
        if self.closed:
            raise ValueError("I/O operation on closed file.")
        if isinstance(s, (bytes, bytearray, memoryview)):
            s = bytes(s).decode("utf-8", "replace")
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        self._append(s)
        return len(s)

    def _append(self, s: str) -> None:
        if self.head_len < self.keep:
            part = s[: self.keep - self.head_len]
            self.head.append(part)
            self.head_len += len(part)
            s = s[len(part):]
        if len(s) >= self.keep:  # slice first: print("x" * 10**9) must not be copied
            self.cut += len(self.tail) + len(s) - self.keep
            self.tail = s[-self.keep:]
        elif s:
            self.tail += s
            if len(self.tail) > 2 * self.keep:
                self.cut += len(self.tail) - self.keep
                self.tail = self.tail[-self.keep:]

    def pieces(self) -> list:
        if self.cut:
            return ["".join(self.head), self.cut, self.tail]
        return ["".join(self.head), self.tail]

    def writable(self):
        return True

    def isatty(self):
        return False

    def fileno(self):
        return 1

    @property
    def encoding(self):
        return "utf-8"


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def _mount(libc, src, target, fstype, flags, data=None) -> None:
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    _check(libc.mount(enc(src), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
           f"mount {target}")


_HIDDEN = ("/root", "/home", "/work", "/mnt", "/srv")


def _setup_namespaces(req: dict) -> None:
    """In the monitor process (root): new namespaces, read-only view, hidden homes, private /tmp."""
    libc = _libc()
    _check(libc.unshare(0x00020000 | 0x40000000 | 0x20000000 | 0x08000000 | 0x04000000), "unshare")
    _mount(libc, None, "/", None, (1 << 14) | (1 << 18))  # MS_REC | MS_PRIVATE: nothing leaks out
    for line in open("/proc/self/mountinfo").read().splitlines():
        mp = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4])
        try:  # MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID (/dev keeps its device nodes)
            _mount(libc, None, mp, None, 32 | 4096 | 1 | 2)
        except OSError:
            pass
    # The interpreter may live under /root (mode 0700, e.g. pyenv): bind it back after hiding.
    keep = {os.path.realpath(p) for p in (sys.base_prefix, sys.prefix, sys.exec_prefix)}
    keep |= {os.path.realpath(p) for p in sys.path if "-packages" in p and os.path.isdir(p)}
    for hidden in _HIDDEN:
        if not os.path.isdir(hidden) or os.path.islink(hidden):
            continue
        inner = sorted(p for p in keep if p.startswith(hidden + "/"))
        inner = [p for p in inner if not any(p.startswith(q + "/") for q in inner)]
        fds = [os.open(p, os.O_RDONLY | os.O_DIRECTORY) for p in inner]
        _mount(libc, "tmpfs", hidden, "tmpfs", 2 | 4 | 8, "size=64k,mode=755")
        for p, fd in zip(inner, fds):
            os.makedirs(p, exist_ok=True)
            _mount(libc, f"/proc/self/fd/{fd}", p, None, 4096)
            _mount(libc, None, p, None, 32 | 4096 | 1 | 2)
            os.close(fd)
        _mount(libc, None, hidden, None, 32 | 1 | 2 | 4 | 8)
    work = req["workdir"]
    size = f"size={int(req['limits']['disk_bytes'])},mode=1777"
    _mount(libc, "tmpfs", "/tmp", "tmpfs", 2 | 4, size)  # the host put ``work`` under /tmp
    os.makedirs(work, exist_ok=True)
    os.chown(work, req["uid"], req["uid"])
    os.chmod(work, 0o700)


def _install_guards(workdir: str) -> None:
    """rlimits mode only: Python-level refusals (bypassable; see the module docstring)."""
    import _thread
    import builtins

    def refuse(what):
        def blocked(*a, **k):
            raise PermissionError(f"{what} is disabled in the sandbox")
        return blocked

    import _socket
    socket.socket = _socket.socket = refuse("network access")  # type: ignore[misc]
    socket.socketpair = socket.create_connection = refuse("network access")
    for name in ("fork", "forkpty", "system", "popen", "execv", "execve", "execvp", "execvpe",
                 "execl", "execle", "execlp", "execlpe", "spawnv", "spawnve", "spawnvp",
                 "spawnvpe", "spawnl", "spawnle", "posix_spawn", "posix_spawnp", "killpg"):
        if hasattr(os, name):
            setattr(os, name, refuse(f"os.{name}"))
    subprocess.Popen = refuse("subprocess")  # type: ignore[misc]
    _thread.start_new_thread = _thread.start_new = refuse("starting threads")
    threading.Thread.start = refuse("starting threads")  # type: ignore[method-assign]
    me, real_kill = os.getpid(), os.kill
    os.kill = lambda pid, sig: real_kill(pid, sig) if pid == me else refuse("os.kill")()
    root = os.path.realpath(workdir)

    def inside(path) -> bool:
        if isinstance(path, int):  # an fd that is already open
            return True
        try:
            p = os.path.realpath(os.fsdecode(path))
        except (TypeError, ValueError):
            return False
        return p == root or p.startswith(root + "/") or p == "/dev/null"

    def guard(fn, writes_if=None):
        def guarded(path, *a, **k):
            if writes_if is None or writes_if(*a, **k):
                if not inside(path):
                    raise PermissionError(f"writing outside the working directory: {path!r}")
            return fn(path, *a, **k)
        return guarded

    real_open = builtins.open
    wmode = lambda mode="r", *a, **k: any(c in str(mode) for c in "wax+")  # noqa: E731
    builtins.open = io.open = guard(real_open, wmode)
    wflags = lambda flags, *a, **k: flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC)  # noqa: E731
    os.open = guard(os.open, wflags)
    for name in ("remove", "unlink", "rmdir", "mkdir", "makedirs", "rename", "renames", "replace",
                 "truncate", "chmod", "chown", "link", "symlink", "utime"):
        setattr(os, name, guard(getattr(os, name)))
    shutil.rmtree = guard(shutil.rmtree)  # type: ignore[assignment]
    shutil.move = guard(shutil.move)


def _setup_worker(req: dict, fds: list[int], ns: bool) -> tuple[int, int]:
    """Turn this forked process into a worker; return the (request, response) fds."""
    lim = req["limits"]
    libc = _libc()
    os.setsid()
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError:
        pass
    # Move our three fds to 3/4/5 (5 = saved copy of the output file), /dev/null on stdin.
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]
    devnull = os.open("/dev/null", os.O_RDONLY)
    os.dup2(devnull, 0)
    for i, fd in enumerate(high):
        os.dup2(fd, 3 + i)
    os.dup2(5, 1)
    os.dup2(5, 2)
    os.closerange(6, 1 << 16)
    if ns:
        uid = req["uid"]
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
        _check(libc.prctl(38, 1, 0, 0, 0), "no_new_privs")
    _check(libc.prctl(1, signal.SIGKILL, 0, 0, 0), "pdeathsig")  # after setuid, which clears it
    import resource as R
    for res, val in ((R.RLIMIT_CORE, 0), (R.RLIMIT_FSIZE, lim["file_size_bytes"]),
                     (R.RLIMIT_NOFILE, lim["max_open_files"]),
                     (R.RLIMIT_STACK, 256 * 1024**2), (R.RLIMIT_AS, lim["memory_bytes"])):
        try:
            R.setrlimit(res, (val, val))
        except (ValueError, OSError):
            R.setrlimit(res, (min(val, R.getrlimit(res)[1]),) * 2)
    if ns or os.geteuid() != 0:
        R.setrlimit(R.RLIMIT_NPROC, (lim["max_processes"], lim["max_processes"]))
    os.chdir(req["workdir"])
    os.environ.clear()
    os.environ.update(_worker_env(req["workdir"], "/tmp" if ns else req["workdir"]))
    tempfile.tempdir = None
    if not ns:
        _install_guards(req["workdir"])
    return 3, 4


def _worker_env(workdir: str, tmp: str = "/tmp") -> dict:
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": tmp,
            "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONDONTWRITEBYTECODE": "1"}


def _exception_info(e: BaseException, full: bool) -> tuple[str, str]:
    """(last traceback line, full traceback without this file's frames)."""
    te = traceback.TracebackException(type(e), e, None)
    te.__notes__ = None
    lines = "".join(te.format_exception_only()).rstrip("\n").split("\n")
    name = te.exc_type.__qualname__ if te.exc_type else ""
    start = max((i for i, ln in enumerate(lines) if name and name in ln.split(":")[0]),
                default=len(lines) - 1)
    last = "\n".join(lines[start:]).strip()
    if not full:
        return last, ""
    tb = e.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == _THIS_FILE:
        tb = tb.tb_next
    return last, "".join(traceback.format_exception(type(e), e, tb))


def _run_cell(code: str, n: int, g: dict, lim: dict, me: int, ns: bool) -> dict:
    import linecache
    import warnings

    import resource as R

    for fd in (1, 2):  # user code may have closed or redirected them in an earlier cell
        try:
            os.dup2(5, fd)
        except OSError:
            pass
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a too-large write raises OSError instead
    signal.signal(signal.SIGXCPU, signal.SIG_DFL)
    # RLIMIT_CPU counts the process's whole life: move the soft limit to "used + budget". The
    # container lacks CAP_SYS_RESOURCE, so nobody can raise a hard limit again: it stays
    # unlimited and a cell could raise its soft limit; the host's wall clock is the real bound.
    used = sum(R.getrusage(R.RUSAGE_SELF)[:2])
    hard = R.getrlimit(R.RLIMIT_CPU)[1]
    soft = int(used + (lim["cpu_time"] or lim["timeout"] + 1)) + 1
    try:
        R.setrlimit(R.RLIMIT_CPU, (soft if hard == R.RLIM_INFINITY else min(soft, hard), hard))
    except (ValueError, OSError):
        pass
    cap = _Capture(int(lim["max_output_chars"]))
    sys.stdout = sys.stderr = cap
    sys.stdin = open(os.devnull)
    warnings.resetwarnings()
    warnings.simplefilter("ignore")  # paper: warnings.filterwarnings('ignore')
    name = f"<cell-{n}>"
    linecache.cache[name] = (len(code), None, code.splitlines(True), name)
    res = {"status": "ok", "error": "", "traceback": ""}
    try:
        try:
            tree = ast.parse(code, name)
            last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
            exec(compile(tree, name, "exec"), g)
            if last is not None:
                value = eval(compile(ast.Expression(last.value), name, "eval"), g)
                if value is not None and not code.rstrip().endswith(";"):
                    g["_"] = value
                    cap._append(repr(value) + "\n")
        finally:
            if os.getpid() != me:  # a fork() in user code: the child must never reach the loop
                os._exit(0)
    except BaseException as e:  # noqa: BLE001 - SystemExit, KeyboardInterrupt included
        res["status"] = "memory" if isinstance(e, MemoryError) else "error"
        try:
            res["error"], res["traceback"] = _exception_info(e, bool(lim["full_traceback"]))
        except BaseException as e2:  # noqa: BLE001 - e.g. a __str__ that raises
            res["error"] = f"{type(e).__name__} (unprintable: {type(e2).__name__})"
        del e
    for t in threading.enumerate():  # threads do not outlive their cell (see docstring)
        if t is not threading.main_thread():
            t.join()
    while len(os.listdir("/proc/self/task")) > 1:  # raw _thread threads too
        time.sleep(0.01)
    if ns:  # kill(-1) as the worker's private uid: every other process it started
        try:
            os.kill(-1, signal.SIGKILL)
        except OSError:
            pass
        for _ in range(200):
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    time.sleep(0.005)
            except ChildProcessError:
                break
    res["pieces"] = cap.pieces()
    if res["status"] == "memory":
        res["pieces"] = ["".join(cap.head)]  # keep the response small; the worker will be replaced
    return res


def _worker_loop(req: dict, cmd: int, resp: int, ns: bool) -> None:
    import types

    import resource as R
    sys.setrecursionlimit(1000)
    cap, real = int(req["limits"]["recursion_limit"]), sys.setrecursionlimit
    sys.setrecursionlimit = lambda n: real(max(50, min(int(n), cap)))  # heap frames fill RAM
    main = types.ModuleType("__main__")
    sys.modules["__main__"] = main
    g = main.__dict__
    g["__builtins__"] = __builtins__
    me = os.getpid()
    _send_frame(resp, {"ready": True})
    for n in itertools.count(1):
        msg = _recv_frame(cmd)
        if msg is None:
            os._exit(0)
        lim = dict(req["limits"], **msg.get("limits", {}))  # per-cell timeout / output size
        res = _run_cell(msg["code"], n, g, lim, me, ns)
        res["cpu"] = sum(R.getrusage(R.RUSAGE_SELF)[:2])
        _send_frame(resp, res)


def _monitor(req: dict, fds: list[int], zygote_sock: socket.socket) -> None:
    """Forked from the zygote (root): set up the sandbox and fork its init, which forks the worker.

    The worker is not PID 1 of its namespace (PID 1 ignores SIGXCPU and signals without a
    handler); init is root, reaps orphans, reports how the worker ended, and when it dies
    (host kill, worker exit) the kernel kills everything left in the namespace.
    """
    libc = _libc()
    _check(libc.prctl(1, signal.SIGKILL, 0, 0, 0), "pdeathsig")  # the zygote died: so do we
    zygote_sock.close()
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    os.setsid()
    cmd, resp, out, status = fds
    ns = req["mode"] == "namespaces"
    try:
        if ns:
            _setup_namespaces(req)
        init = os.fork()
    except BaseException as e:  # noqa: BLE001
        os.write(status, f"fail {type(e).__name__}: {e}\n".encode())
        os._exit(1)
    if init == 0:
        try:
            _check(libc.prctl(1, signal.SIGKILL, 0, 0, 0), "pdeathsig")
            if ns:  # PID 1 of the new namespace: a /proc that shows only this namespace
                _mount(libc, "proc", "/proc", "proc", 2 | 4 | 8)
            pid = os.fork()
            if pid == 0:
                try:
                    os.close(status)
                    _worker_loop(req, *_setup_worker(req, [cmd, resp, out], ns), ns)
                except BaseException as e:  # noqa: BLE001
                    try:
                        _send_frame(4, {"ready": False, "error": f"{type(e).__name__}: {e}"})
                    except BaseException:  # noqa: BLE001
                        pass
                os._exit(1)
            for fd in (cmd, resp, out):
                os.close(fd)
            os.write(status, f"worker {pid}\n".encode())
            while True:  # reap orphans until the worker itself ends
                done, st, ru = os.wait4(-1, 0)
                if done == pid:
                    break
            os.write(status, f"exit {st} {ru.ru_utime + ru.ru_stime:.3f}\n".encode())
        finally:
            os._exit(0)
    for fd in (cmd, resp, out):
        os.close(fd)
    os.write(status, f"pid {init}\n".encode())
    os.close(status)
    os.waitpid(init, 0)
    os._exit(0)


_PRELOAD = ("math", "cmath", "fractions", "decimal", "itertools", "functools", "collections",
            "statistics", "random", "re", "json", "heapq", "bisect", "string", "operator", "copy",
            "numpy", "sympy", "sympy.abc", "ast", "linecache", "types", "resource", "warnings")


def _zygote_main(fd: int) -> None:
    """Pre-warmed template process: imports once, then forks a monitor per worker request."""
    import gc
    import importlib

    for m in _PRELOAD:
        try:
            importlib.import_module(m)
        except ImportError:
            pass
    try:  # first calls load sympy's lazily imported machinery: pay that once, here
        import sympy
        x = sympy.Symbol("x")
        sympy.solve(x**2 - 1, x), sympy.simplify(sympy.sin(x) ** 2 + sympy.cos(x) ** 2)
        sympy.sympify("x**2 + 1/2"), sympy.integrate(x**2, x), sympy.factorint(1001)
        sympy.N(sympy.pi, 30), sympy.nsimplify(0.5), sympy.Matrix([[1, 2], [3, 4]]).det()
    except Exception:  # noqa: BLE001
        pass
    gc.collect()
    gc.freeze()  # forked workers then do not dirty the shared pages on their first collection
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # monitors are reaped automatically
    sock = socket.socket(fileno=fd)
    sock.sendall(b"ready")
    while True:
        try:
            msg, fds, _, _ = socket.recv_fds(sock, 1 << 16, 4)
        except OSError:
            break
        if not msg:
            break  # the host is gone: monitors die by pdeathsig, then their workers
        pid = -1
        try:
            if len(fds) == 4:
                pid = os.fork()
                if pid == 0:
                    try:
                        _monitor(json.loads(msg), fds, sock)
                    finally:
                        os._exit(1)
        except OSError:
            pass
        for f in fds:
            os.close(f)
        sock.sendall(json.dumps({"pid": pid}).encode())
    os._exit(0)


# --------------------------------------------------------------------------------------------
# Host side


class _Zygote:
    """The host's handle on the template process (one per host process, started lazily)."""

    _lock = threading.Lock()
    _inst: "_Zygote | None" = None

    def __init__(self):
        self.owner = os.getpid()
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = _worker_env("/")
        self.proc = subprocess.Popen([sys.executable, "-I", _THIS_FILE, "--zygote", str(child.fileno())],
                                     pass_fds=[child.fileno()], env=env, cwd="/", stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        child.close()
        self.sock = parent
        self.sock.settimeout(60)
        try:
            ok = self.sock.recv(16) == b"ready"
        except OSError:
            ok = False
        if not ok:
            self.proc.kill()
            raise RuntimeError("executor zygote failed to start")
        self.sock.settimeout(10)

    @classmethod
    def spawn(cls, req: dict, fds: list[int]) -> int:
        with cls._lock:
            for attempt in range(2):
                z = cls._inst
                if z is None or z.owner != os.getpid() or z.proc.poll() is not None:
                    cls._inst = z = cls()
                try:
                    socket.send_fds(z.sock, [json.dumps(req).encode()], fds)
                    return json.loads(z.sock.recv(1 << 16))["pid"]
                except (OSError, ValueError, KeyError):
                    z.proc.kill()  # broken or confused: start a new one
                    cls._inst = None
            raise RuntimeError("executor zygote does not answer")

    @classmethod
    def shutdown(cls) -> None:
        with cls._lock:
            if cls._inst is not None and cls._inst.owner == os.getpid():
                cls._inst.sock.close()
                try:
                    cls._inst.proc.wait(5)
                except subprocess.TimeoutExpired:
                    cls._inst.proc.kill()
            cls._inst = None


import atexit  # noqa: E402

atexit.register(_Zygote.shutdown)

_uids = itertools.count()
_MODE: dict[str, bool] = {}  # mode -> works on this machine (learned on first use)


def sandbox_mode(limits: Limits | None = None) -> str:
    """The sandbox mode a new Session would use here ("namespaces" or "rlimits")."""
    want = (limits or Limits()).sandbox
    if want != "auto":
        return want
    if os.geteuid() != 0 or not sys.platform.startswith("linux") or _MODE.get("namespaces") is False:
        return "rlimits"
    return "namespaces"


class _Worker:
    """One live sandboxed process: fds, pids, kill."""

    def __init__(self, limits: Limits, mode: str):
        self.mode = mode
        # namespaces: always under /tmp, which becomes the worker's private tmpfs
        tmp = "/tmp" if mode == "namespaces" and os.path.isdir("/tmp") else None
        self.workdir = tempfile.mkdtemp(prefix="mdpo-exec-", dir=tmp)
        uid = 200_000_000 + (os.getpid() % 1000) * 100_000 + next(_uids) % 100_000
        cmd_r, self.cmd = os.pipe()
        self.resp, resp_w = os.pipe()
        self.status, status_w = os.pipe()
        self.out = os.open(self.workdir, os.O_RDWR | os.O_TMPFILE, 0o600)
        fcntl.fcntl(self.out, fcntl.F_SETFL, os.O_APPEND)  # shared description: writers append
        for fd in (self.cmd, self.resp, self.status, self.out):
            os.set_inheritable(fd, False)
        self.pid = self.monitor = self.worker_pid = None
        self.exit: tuple[int, float] | None = None
        self._status_buf = b""
        self.gone = False  # EOF on the status pipe: init has exited (its pid may be reused)
        out_w = os.dup(self.out)
        try:
            req = {"mode": mode, "uid": uid, "workdir": self.workdir, "limits": asdict(limits)}
            self.monitor = _Zygote.spawn(req, [cmd_r, resp_w, out_w, status_w])
        finally:
            for fd in (cmd_r, resp_w, out_w, status_w):
                os.close(fd)
        deadline = time.monotonic() + 30
        # The monitor writes "pid <init>", init writes "worker <pid>": in either order.
        while self.pid is None or self.worker_pid is None:
            line = self._status_line(deadline) or "no answer"
            key, _, val = line.partition(" ")
            if key not in ("pid", "worker"):
                self.close()
                raise RuntimeError(f"sandbox setup failed ({mode}): {line}")
            if key == "pid":
                self.pid = int(val)  # init: killing it ends the worker (namespace / pdeathsig)
            else:
                self.worker_pid = int(val)
        try:
            hello = _recv_frame(self.resp, deadline)
        except TimeoutError:
            hello = None
        if not hello or not hello.get("ready"):
            self.close()
            raise RuntimeError(f"sandbox worker failed ({mode}): {hello and hello.get('error')}")

    def _status_line(self, deadline: float) -> str | None:
        while b"\n" not in self._status_buf:
            left = deadline - time.monotonic()
            if not _ready([self.status], left):
                return None
            chunk = os.read(self.status, 4096)
            if not chunk:
                self.gone = True
                return None
            self._status_buf += chunk
        line, self._status_buf = self._status_buf.split(b"\n", 1)
        return line.decode()

    def wait_exit(self, timeout: float) -> tuple[int, float] | None:
        """Wait for the monitor's report of how the worker ended: (wait status, CPU seconds)."""
        if self.exit is None:
            line = self._status_line(time.monotonic() + timeout)
            if line and line.startswith("exit "):
                _, st, cpu = line.split()
                self.exit = (int(st), float(cpu))
        return self.exit

    def kill(self) -> None:
        # SIGKILL cannot be caught or ignored; in namespaces mode it takes the whole PID namespace.
        targets = [(os.kill, self.pid)]
        if self.mode == "rlimits" and self.worker_pid:  # no PID namespace: its process group too
            targets.append((os.killpg, self.worker_pid))
        for kill, pid in targets:
            if pid and self.exit is None and not self.gone:
                try:
                    kill(pid, signal.SIGKILL)
                except OSError:
                    pass

    def output(self, keep: int) -> list:
        """The fd-level output of the current cell (head and tail only)."""
        try:
            size = os.fstat(self.out).st_size
            if size <= 8 * keep:
                return [os.pread(self.out, size, 0).decode("utf-8", "replace")]
            head = os.pread(self.out, 4 * keep, 0).decode("utf-8", "replace")[:keep]
            tail = os.pread(self.out, 4 * keep, size - 4 * keep).decode("utf-8", "replace")[-keep:]
            return [head, max(size - len(head) - len(tail), 1), tail]
        except OSError:
            return []

    def close(self) -> None:
        self.kill()
        if self.pid is not None and self.wait_exit(3.0) is None and not self.gone and (self.monitor or 0) > 0:
            try:  # init did not end: the monitor's death takes it along (pdeathsig)
                os.kill(self.monitor, signal.SIGKILL)
            except OSError:
                pass
        for fd in (self.cmd, self.resp, self.status, self.out):
            try:
                os.close(fd)
            except OSError:
                pass
        self.cmd = self.resp = self.status = self.out = -1
        shutil.rmtree(self.workdir, ignore_errors=True)


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            return f"{signal.strsignal(sig) or signal.Signals(sig).name} ({signal.Signals(sig).name})"
        except ValueError:
            return f"signal {sig}"
    return f"the process exited with code {os.WEXITSTATUS(status)}"


class Session:
    """One sandboxed worker with notebook semantics; ``run`` cells in order, then ``close``."""

    def __init__(self, limits: Limits | None = None, **overrides):
        self.limits = replace(limits or Limits(), **overrides)
        self._worker: _Worker | None = None
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

    def _ensure(self) -> _Worker:
        if self._closed:
            raise RuntimeError("session is closed")
        if self._worker is None:
            mode = sandbox_mode(self.limits)
            try:
                self._worker = _Worker(self.limits, mode)
                _MODE[mode] = True
            except RuntimeError:
                if self.limits.sandbox != "auto" or mode != "namespaces" or _MODE.get(mode):
                    raise
                _MODE[mode] = False  # this machine cannot: fall back for good
                self._worker = _Worker(self.limits, "rlimits")
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
                _send_frame(w.cmd, {"code": code, "limits": per_cell}, deadline)
                res = self._wait(w, deadline)
            except (OSError, TimeoutError):
                res = None
            elapsed = time.monotonic() - t0
            if isinstance(res, dict) and res.get("status") in ("ok", "error", "memory"):
                return self._finish(res, w, elapsed, restarted)
            return self._dead(w, res == "timeout", elapsed, restarted)

    def _wait(self, w: _Worker, deadline: float):
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return "timeout"
            ready = _ready([w.resp, w.status], left)
            if w.resp in ready:
                try:
                    return _recv_frame(w.resp, deadline + 1.0)
                except TimeoutError:
                    return "timeout"
            if w.status in ready:
                return None  # died without answering

    def _finish(self, res: dict, w: _Worker, elapsed: float, restarted: bool) -> CellResult:
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

    def _dead(self, w: _Worker, timed_out: bool, elapsed: float, restarted: bool) -> CellResult:
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
        reason = _describe(ex[0]) if ex else "the interpreter stopped answering"
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


if __name__ == "__main__" and sys.argv[1:2] == ["--zygote"]:
    _zygote_main(int(sys.argv[2]))
