"""Process isolation for ``mdpo.executor``: the sandboxed worker and the machinery around it.

Namespace / mount / uid setup, rlimits, the Python-level guards of ``rlimits`` mode, the worker
loop and cell runner that run inside the sandbox, the per-worker monitor and init, the pre-warmed
zygote (started by re-executing this file with ``--zygote``), the host's handle on a live worker,
and the length-prefixed JSON frames they talk over. What is isolated, and how, is documented in
the ``mdpo.executor`` module docstring; the public API (``Session``, ``ExecutorPool`` ...) lives
there too. This file imports nothing from ``mdpo``: the zygote runs it as a script (``-I``).
"""

from __future__ import annotations

import ast
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
from dataclasses import asdict, dataclass

# The host side's public names, used by mdpo.executor. Nothing here imports mdpo.executor (no cycle):
# the limits live here because the worker receives them, and executor re-exports them.
__all__ = ["Limits", "Worker", "poll_ready", "send_frame", "recv_frame", "describe_exit"]

_THIS_FILE = os.path.abspath(__file__)


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


# --------------------------------------------------------------------------------------------
# Frames over pipes (host and worker)

_HDR = struct.Struct(">I")
_MAX_FRAME = 16 * 1024**2


def poll_ready(fds: list[int], timeout: float, write: bool = False) -> list[int]:
    """The fds of ``fds`` ready within ``timeout`` s (poll: select breaks above fd 1023)."""
    if timeout <= 0:
        return []
    p = select.poll()
    for fd in fds:
        p.register(fd, select.POLLOUT if write else select.POLLIN)
    return [fd for fd, _ in p.poll(timeout * 1000)]


def send_frame(fd: int, obj, deadline: float | None = None) -> None:
    data = json.dumps(obj).encode()
    data = _HDR.pack(len(data)) + data
    view = memoryview(data)
    while view:
        if deadline is not None:
            left = deadline - time.monotonic()
            if not poll_ready([fd], left, write=True):
                raise TimeoutError("worker did not read its request")
        view = view[os.write(fd, view):]


def _read_exact(fd: int, n: int, deadline: float | None) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if not poll_ready([fd], left):
                raise TimeoutError
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def recv_frame(fd: int, deadline: float | None = None):
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
    send_frame(resp, {"ready": True})
    for n in itertools.count(1):
        msg = recv_frame(cmd)
        if msg is None:
            os._exit(0)
        lim = dict(req["limits"], **msg.get("limits", {}))  # per-cell timeout / output size
        res = _run_cell(msg["code"], n, g, lim, me, ns)
        res["cpu"] = sum(R.getrusage(R.RUSAGE_SELF)[:2])
        send_frame(resp, res)


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
                        send_frame(4, {"ready": False, "error": f"{type(e).__name__}: {e}"})
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


class Worker:
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
            hello = recv_frame(self.resp, deadline)
        except TimeoutError:
            hello = None
        if not hello or not hello.get("ready"):
            self.close()
            raise RuntimeError(f"sandbox worker failed ({mode}): {hello and hello.get('error')}")

    def _status_line(self, deadline: float) -> str | None:
        while b"\n" not in self._status_buf:
            left = deadline - time.monotonic()
            if not poll_ready([self.status], left):
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


def describe_exit(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            return f"{signal.strsignal(sig) or signal.Signals(sig).name} ({signal.Signals(sig).name})"
        except ValueError:
            return f"signal {sig}"
    return f"the process exited with code {os.WEXITSTATUS(status)}"


if __name__ == "__main__" and sys.argv[1:2] == ["--zygote"]:
    _zygote_main(int(sys.argv[2]))
