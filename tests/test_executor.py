"""mdpo.executor: notebook semantics, observation format, limits, hostile cells, isolation, pool.

Every hostile cell must end in a structured result within a bounded time, leave the host (this
process) alive, and leave the session usable (fresh worker where needed). Short timeouts keep the
file fast.
"""

import json
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from mdpo.executor import CellResult, ExecutorPool, Limits, Session, run_cells, sandbox_mode

NS = sandbox_mode() == "namespaces"
needs_ns = pytest.mark.skipif(not NS, reason="namespaces mode needs root and unshare")


@pytest.fixture
def sess():
    s = Session(timeout=2.0)
    yield s
    s.close()


@pytest.fixture(params=["auto", "fallback"])
def mode(request, monkeypatch):
    """The hostile cells run twice: in the mode this machine picks, and with namespaces forced off
    (MDPO_SANDBOX=rlimits, what a user without root gets), so the fallback is tested on a root machine too."""
    if request.param == "fallback":
        monkeypatch.setenv("MDPO_SANDBOX", "rlimits")
        assert sandbox_mode() == "rlimits"  # forced even as root: else this param would rerun namespaces
    return sandbox_mode()


@pytest.fixture
def hsess(mode):
    s = Session(timeout=2.0)
    yield s
    assert s.mode == mode  # the switch reached the worker, not just sandbox_mode()
    s.close()


def _procs_of_uid(uid: int) -> list[str]:
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/status") as f:
                uids = next(ln for ln in f if ln.startswith("Uid:")).split()[1:]
        except (OSError, StopIteration):
            continue
        if int(uids[0]) == uid:
            out.append(pid)
    return out


def _check_recovers(s: Session, restarted: bool) -> None:
    r = s.run("print('alive'); 40 + 2")
    assert (r.status, r.observation) == ("ok", "alive\n42")
    assert r.restarted is restarted


# ---------------------------------------------------------------- notebook semantics / API


def test_state_carries_and_final_expression(sess):
    assert sess.run("import math\nx = 3\ndef f(n):\n    return n * x").observation == ""
    r = sess.run("print('p')\nf(x) + math.factorial(3)")
    assert isinstance(r, CellResult)
    assert (r.status, r.observation, r.stdout, r.error) == ("ok", "p\n15", "p\n15", "")
    assert sess.run("None").observation == ""
    assert sess.run("print(None)").observation == "None"
    assert sess.run("x;").observation == ""  # Jupyter: a trailing ';' hides the value
    assert sess.run("x = 5\nx").observation == "5"
    assert sess.run("'a\\nb'").observation == "'a\\nb'"  # repr, byte-exact transport
    assert sess.run("print('a\\nb')").observation == "a\nb"
    assert sess.run("import sympy\nsympy.Rational(1, 3) + 1").observation == "4/3"
    assert sess.run("import sys\nsys.stderr.write('warn\\n'); print('out')").observation == "warn\nout"
    assert sess.run("input()").observation == "EOFError: EOF when reading a line"
    assert 0 < r.elapsed < 1


def test_run_cells_and_observation_formats():
    res = run_cells(["a = 1", "a +", "b", "print('x')\n1/0", "a"], timeout=2.0)
    assert [r.status for r in res] == ["ok", "error", "error", "error", "ok"]
    assert res[1].observation == "SyntaxError: invalid syntax"
    assert res[2].observation == "NameError: name 'b' is not defined"
    assert res[3].observation == "ZeroDivisionError: division by zero"  # paper: output dropped
    assert res[3].stdout == "x"
    assert res[4].observation == "1"

    full = run_cells(["def g():\n    return 1/0", "print('before')\ng()"], timeout=2.0, full_traceback=True)
    obs = full[1].observation
    assert obs.startswith("before\nTraceback (most recent call last):")
    assert '"<cell-2>", line 2' in obs and '"<cell-1>", line 2, in g' in obs and "return 1/0" in obs
    assert obs.endswith("ZeroDivisionError: division by zero")
    assert "executor.py" not in obs


def test_output_truncation_keeps_head_and_tail():
    r = run_cells(["print('A' * 300 + 'B' * 300)"], timeout=2.0, max_output_chars=100)[0]
    assert r.status == "ok"
    assert r.observation == "A" * 50 + "\n... [500 characters cut] ...\n" + "B" * 50
    # A huge print and a long print loop are cut while being written, not after.
    big, loop = run_cells(["print('x' * 10**8)", "for i in range(200000): print(i)"], timeout=5.0)
    assert big.status == "ok" and len(big.observation) < 2100
    assert "[99998000 characters cut]" in big.observation
    assert loop.status == "ok" and loop.observation.startswith("0\n1\n2\n")
    assert loop.observation.endswith("199998\n199999") and "characters cut]" in loop.observation
    assert loop.elapsed < 3


def test_fd_level_output_and_errors_in_messages():
    r = run_cells(["import os\nprint('py'); os.write(1, b'fd\\n'); None",
                   "raise ValueError('bad\\nvalue')"], timeout=2.0)
    assert r[0].observation == "py\nfd"
    assert r[1].observation == "ValueError: bad\nvalue"


def test_preloaded_modules_import_fast(sess):
    sess.run("1")
    r = sess.run("import math, sympy, numpy as np, fractions, itertools\n"
                 "x = sympy.Symbol('x')\nsympy.solve(x**2 - 2, x), int(np.arange(3).sum())")
    assert r.status == "ok" and r.observation == "([-sqrt(2), sqrt(2)], 3)"
    assert r.elapsed < 0.5


def test_session_start_is_fast():
    Session().start().close()  # the zygote is warm after this
    t = time.monotonic()
    with Session() as s:
        s.start()
        assert s.run("1 + 1").observation == "2"
    assert time.monotonic() - t < 1.0


def test_cwd_is_fresh_temp_dir_removed_on_close():
    s1, s2 = Session(timeout=2.0), Session(timeout=2.0)
    cwd1 = s1.run("import os\nopen('f.txt', 'w').write('hi')\nos.getcwd()").observation.strip("'")
    cwd2 = s2.run("import os\nos.getcwd()").observation.strip("'")
    assert cwd1 == s1.workdir and cwd2 == s2.workdir and cwd1 != cwd2
    assert s2.run("os.listdir('.')").observation == "[]"
    assert s1.run("open('f.txt').read()").observation == "'hi'"
    s1.close()
    s2.close()
    assert not os.path.exists(cwd1) and not os.path.exists(cwd2)
    assert s1.workdir is None


# ---------------------------------------------------------------- hostile cells


@pytest.mark.parametrize("code", [
    "while True:\n    pass",
    "import time\nwhile True:\n    time.sleep(0.05)",
    "import signal\nfor s in (signal.SIGALRM, signal.SIGTERM, signal.SIGINT, signal.SIGXCPU):\n"
    "    signal.signal(s, signal.SIG_IGN)\nwhile True:\n    pass",
    "import threading, time\nthreading.Thread(target=time.sleep, args=(100,), daemon=True).start()",
])
def test_timeouts(hsess, mode, code):
    sess = hsess
    sess.run("keep = 1")
    t = time.monotonic()
    r = sess.run(code, timeout=1.0)
    if mode == "rlimits" and "threading" in code:  # the fallback refuses new threads outright
        assert r.status == "error" and r.observation.startswith("PermissionError: starting threads")
        return
    assert (r.status, r.observation) == ("timeout", "Timeout Error")
    assert time.monotonic() - t < 2.5
    assert sess.run("keep").status == "error"  # the state went with the killed worker
    _check_recovers(sess, restarted=False)


def test_cpu_time_limit(mode):
    with Session(timeout=5.0, cpu_time=0.5) as s:
        s.run("1")
        r = s.run("while True:\n    pass")  # RLIMIT_CPU (SIGXCPU) fires before the wall clock
        assert (r.status, r.observation) == ("timeout", "Timeout Error") and r.elapsed < 3.5
        assert s.run("sum(range(10**6))").observation == "499999500000"  # budget is per cell


def test_threads_that_finish_are_fine(sess):
    r = sess.run("import threading\nt = threading.Thread(target=print, args=('from thread',))\n"
                 "t.start(); t.join(); 'main'")
    assert (r.status, r.observation) == ("ok", "from thread\n'main'")


def test_memory_bombs(mode):
    s = Session(timeout=5.0, memory_bytes=1 << 30)
    try:
        assert s.start().mode == mode
        s.run("keep = 1")
        r = s.run("x = bytearray(10**10)")
        assert (r.status, r.observation) == ("memory", "MemoryError")
        assert s.run("keep").observation == "NameError: name 'keep' is not defined"  # fresh worker
        r = s.run("chunks = []\nwhile True:\n    chunks.append(b' ' * 10**7)")
        assert r.status == "memory" and r.elapsed < 5
        r = s.run("import numpy as np\nnp.ones((10**6, 10**6))")
        assert r.status == "memory" and "Unable to allocate" in r.observation
        _check_recovers(s, restarted=True)
    finally:
        s.close()


def test_recursion(hsess):
    sess = hsess
    r = sess.run("def f(n):\n    return f(n + 1)\nf(0)")
    assert r.status == "error" and r.observation.startswith("RecursionError")
    r = sess.run("import sys\nsys.setrecursionlimit(10**8)\nf(0)")  # clamped: no 20 s heap crawl
    assert r.status == "error" and r.observation.startswith("RecursionError") and r.elapsed < 1.5
    r = sess.run("import functools\n@functools.lru_cache(None)\ndef g(n):\n"
                 "    return 0 if n == 0 else g(n - 1) + 1\ng(40000)")  # C recursion: big stack
    assert (r.status, r.observation) == ("ok", "40000")


def test_exits(hsess):
    sess = hsess
    sess.run("keep = 7")
    assert sess.run("import sys\nsys.exit(3)").observation == "SystemExit: 3"
    assert sess.run("exit()").observation == "SystemExit: None"
    assert sess.run("keep").observation == "7"  # SystemExit does not end the session
    r = sess.run("import os\nos._exit(0)")
    assert r.status == "crashed" and "exited with code 0" in r.observation
    assert "variables were lost" in r.observation
    _check_recovers(sess, restarted=True)


def test_segfault(hsess):
    sess = hsess
    r = sess.run("import ctypes\nctypes.string_at(0)")
    assert r.status == "crashed" and "Segmentation fault" in r.observation
    _check_recovers(sess, restarted=True)


def test_closing_stdout_and_stderr(hsess):
    sess = hsess
    r = sess.run("import sys, os\nsys.stdout.close(); sys.stderr.close(); os.close(1); os.close(2)")
    assert r.status == "ok"
    assert sess.run("print('back'); os.write(1, b'fd\\n'); None").observation == "back\nfd"
    r = sess.run("os.closerange(0, 1024)")  # the protocol pipes too: the worker cannot answer
    assert r.status == "crashed" and r.elapsed < 2
    _check_recovers(sess, restarted=True)


def test_kill_parent_and_others(hsess, mode):
    sess = hsess
    host = os.getpid()
    r = sess.run("import os, signal\nfor p in (os.getppid(), -1, 1):\n"
                 "    try:\n        os.kill(p, signal.SIGKILL)\n    except OSError as e:\n"
                 f"        print(type(e).__name__)\nos.kill({host}, signal.SIGKILL)")
    if mode == "namespaces":  # the host's pid does not exist in the worker's PID namespace
        assert (r.status, r.observation) == ("error", "ProcessLookupError: [Errno 3] No such process")
        assert r.stdout.startswith("PermissionError\n")  # getppid() is init (root): not the worker's to kill
    else:  # same PID space and uid as the host: only the Python-level guard stands in the way
        assert (r.status, r.observation) == ("error", "PermissionError: os.kill is disabled in the sandbox")
        assert r.stdout.startswith("PermissionError\nPermissionError\nPermissionError")
    os.kill(host, 0)  # still here
    _check_recovers(sess, restarted=False)


def test_file_size_and_open_files(hsess):
    sess = hsess
    r = sess.run("open('big', 'wb').write(b'0' * (32 << 20))")  # RLIMIT_FSIZE 16 MiB
    assert r.status == "error" and "File too large" in r.observation
    r = sess.run("fs = [open(f'f{i}', 'w') for i in range(100)]")  # RLIMIT_NOFILE 64
    assert r.status == "error" and "Too many open files" in r.observation
    assert sess.run("1").status == "ok"


@needs_ns  # rlimits mode has no disk quota (only RLIMIT_FSIZE per file): said in the README, not tested here
def test_private_tmpfs_is_the_disk_limit(sess):
    assert sess.run("1").status == "ok" and sess.mode == "namespaces"
    # The private tmpfs holds 64 MiB in all; each part stays under RLIMIT_FSIZE (16 MiB).
    r = sess.run("for i in range(6):\n    open(f'part{i}', 'wb').write(b'0' * (15 << 20))")
    assert r.status == "error" and "No space left on device" in r.observation
    assert sess.run("1").status == "ok"


# ---------------------------------------------------------------- isolation


def test_network_is_blocked(mode):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    try:
        r = run_cells([f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)"],
                      timeout=3.0)[0]
        assert r.status == "error" and r.elapsed < 2
        # A listening host port: "refused" would mean the connection reached the host's loopback.
        assert r.observation == {"namespaces": "OSError: [Errno 101] Network is unreachable",
                                 "rlimits": "PermissionError: network access is disabled in the sandbox"}[mode]
    finally:
        srv.close()


@needs_ns
def test_writes_outside_workdir_never_reach_the_host():
    marker = f"mdpo-exec-test-{os.getpid()}"
    # The package's own directory may be bound back read-only (the worker imports it), so only home
    # directories are asserted hidden.
    res = run_cells([
        f"open('/usr/{marker}', 'w')",
        f"open('/etc/{marker}', 'w')",
        f"open('/var/tmp/{marker}', 'w')",
        f"open('/tmp/{marker}', 'w').write('private tmpfs')",
        "import os\nsorted(os.listdir('/root')), sorted(os.listdir('/home')), 'PATH' in os.environ",
        "import shutil, json\nshutil.rmtree(os.path.dirname(json.__file__))",
        "open('/dev/null', 'w').write('ok')",
    ], timeout=2.0)
    assert [r.status for r in res] == ["error", "error", "error", "ok", "ok", "error", "ok"]
    assert all("Read-only file system" in r.observation for r in res[:3] + res[5:6])
    assert os.path.isfile(json.__file__)
    assert not os.path.exists(f"/tmp/{marker}") and not os.path.exists(f"/usr/{marker}")
    assert res[4].observation in ("([], [], True)", "(['.pyenv'], [], True)")


@needs_ns
def test_processes_are_bounded_and_do_not_outlive_the_cell(sess):
    uid = int(sess.run("import os, subprocess, time\nos.getuid()").observation)
    assert uid != 0
    r = sess.run("subprocess.run(['echo', 'from child']); subprocess.Popen(['setsid', 'sleep', '100'])\n"
                 "time.sleep(0.2); None")
    assert (r.status, r.observation) == ("ok", "from child")
    assert len(_procs_of_uid(uid)) == 1  # only the worker: the orphan was killed
    r = sess.run("kids = 0\ntry:\n    while True:\n        if os.fork() == 0:\n            time.sleep(100)\n"
                 "        kids += 1\nexcept OSError as e:\n    print(kids, e)")
    assert r.status == "ok" and r.observation.startswith("3 [Errno 11]")  # max_processes=4
    assert len(_procs_of_uid(uid)) == 1
    r = sess.run("while True:\n    try:\n        os.fork()\n    except OSError:\n        pass", timeout=1.0)
    assert r.status == "timeout"
    deadline = time.monotonic() + 2
    while _procs_of_uid(uid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _procs_of_uid(uid) == []  # the PID namespace took every descendant
    _check_recovers(sess, restarted=True)


def test_rlimits_fallback_guards():
    with Session(timeout=2.0, sandbox="rlimits") as s:
        assert s.mode == "rlimits"
        assert s.run("x = 2").status == "ok" and s.run("x * 3").observation == "6"
        for code in ("import socket\nsocket.socket()", "import os\nos.fork()",
                     "import subprocess\nsubprocess.run(['true'])", "import threading\nthreading.Thread().start()",
                     "open('/tmp/mdpo-exec-escape', 'w')", "import os\nos.remove('/etc/hostname')"):
            r = s.run(code)
            assert r.status == "error" and r.observation.startswith("PermissionError"), (code, r)
        assert s.run("open('inside.txt', 'w').write('ok')").observation == "2"
        assert s.run("while True: pass", timeout=1.0).status == "timeout"
        _check_recovers(s, restarted=True)


def test_sandbox_switch_and_announcement(monkeypatch, capsys):
    """MDPO_SANDBOX overrides "auto" only; the mode in use is printed once per process, and is the one the
    workers really get (announce_sandbox starts one)."""
    import mdpo.executor as ex

    monkeypatch.setenv("MDPO_SANDBOX", "rlimits")
    assert sandbox_mode() == "rlimits" and sandbox_mode(Limits(sandbox="namespaces")) == "namespaces"
    monkeypatch.setenv("MDPO_SANDBOX", "chroot")
    with pytest.raises(ValueError, match="MDPO_SANDBOX"):
        Session().start()  # a typo must not silently mean "auto"
    monkeypatch.delenv("MDPO_SANDBOX")
    monkeypatch.setattr(ex, "_ANNOUNCED", [])
    assert ex.announce_sandbox() == ex.announce_sandbox() == sandbox_mode()
    assert capsys.readouterr().err == f"executor sandbox: {ex.ISOLATION[sandbox_mode()]}\n"
    monkeypatch.setattr(ex, "_ANNOUNCED", [])
    monkeypatch.setenv("MDPO_SANDBOX", "rlimits")
    assert ex.announce_sandbox(show=False) == "rlimits"  # another rank: counts, prints nothing
    assert ex.announce_sandbox() == "rlimits" and capsys.readouterr().err == ""
    monkeypatch.setattr(ex, "_ANNOUNCED", [])
    ex.announce_sandbox()
    assert capsys.readouterr().err.startswith("executor sandbox: rlimits only (no root or no namespaces here)")


NOBODY = 65534
SYSTEM_PYTHON = "/usr/bin/python3"  # the venv's interpreter lives under /root (mode 0700): nobody cannot run it

NON_ROOT_SCRIPT = r"""
import json, os, sys
from mdpo.executor import Limits, Session, sandbox_mode
out = {"euid": os.geteuid(), "mode": sandbox_mode()}
try:
    Session(Limits(sandbox="namespaces")).start()
    out["namespaces"] = "started"
except RuntimeError as e:
    out["namespaces"] = str(e)
marker = sys.argv[1]
with Session(timeout=3.0) as s:
    cells = {
        "uid": "import os\nos.getuid()",
        "nproc": "import resource\nresource.getrlimit(resource.RLIMIT_NPROC)",
        "socket": "import socket\nsocket.socket()",
        "fork": "os.fork()",
        "write": f"open({marker!r}, 'w')",
        "bypass": f"import _io\n_io.open({marker!r} + '.bypass', 'w').write('x')",
        "read": "len(open('/etc/passwd').read()) > 0",
        "spin": "while True: pass",
    }
    out["worker_mode"] = s.mode if s.run("1").status == "ok" else None
    out["cells"] = {}
    for k, c in cells.items():
        r = s.run(c, timeout=1.0 if k == "spin" else 3.0)
        out["cells"][k] = [r.status, r.observation]
print(json.dumps(out))
"""


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv") or not os.access(SYSTEM_PYTHON, os.X_OK),
                    reason="needs root (to become another user), setpriv and a system python3")
def test_what_a_user_without_root_gets():
    """A real unprivileged user (uid 65534, no capabilities): "auto" is rlimits, namespaces cannot start,
    the worker runs as that user with RLIMIT_NPROC, the guards refuse sockets, fork and writes outside the
    working directory, and they are a seat belt only: writing through _io.open gets past them (the README says
    so). The zygote preloads numpy/sympy only if this interpreter has them; none of the cells needs them."""
    marker = f"/tmp/mdpo-nonroot-{os.getpid()}"
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "HOME": "/tmp"}
    try:
        p = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                            "--inh-caps=-all", SYSTEM_PYTHON, "-c", NON_ROOT_SCRIPT, marker],
                           capture_output=True, text=True, timeout=60, env=env, cwd="/")
        if p.returncode != 0 and "No module named" in p.stderr:
            pytest.skip(f"the system python3 cannot import mdpo.executor: {p.stderr.strip().splitlines()[-1]}")
        assert p.returncode == 0, p.stderr
        out = json.loads(p.stdout.strip().splitlines()[-1])
        assert out["euid"] == NOBODY and out["mode"] == "rlimits" and out["worker_mode"] == "rlimits"
        assert out["namespaces"].startswith("sandbox setup failed (namespaces): fail PermissionError")
        assert out["cells"] == {
            "uid": ["ok", str(NOBODY)],  # the user's own uid: no private one
            "nproc": ["ok", "(4, 4)"],  # max_processes, counted over all of that user's processes
            "socket": ["error", "PermissionError: network access is disabled in the sandbox"],
            "fork": ["error", "PermissionError: os.fork is disabled in the sandbox"],
            "write": ["error", f"PermissionError: writing outside the working directory: {marker!r}"],
            "bypass": ["ok", "1"],  # a seat belt, not a sandbox: the guards wrap the usual entry points only
            "read": ["ok", "True"],  # whatever the user may read, a cell may read
            "spin": ["timeout", "Timeout Error"],
        }
        assert open(marker + ".bypass").read() == "x" and not os.path.exists(marker)
    finally:
        for path in (marker, marker + ".bypass"):
            if os.path.exists(path):
                os.remove(path)


# ---------------------------------------------------------------- pool


def test_pool_separates_trajectories_and_isolates_stuck_ones():
    with ExecutorPool(max_workers=3, timeout=2.0) as pool:
        assert pool.run("a", "v = 'A'").status == "ok"
        assert pool.run("b", "v = 'B'").status == "ok"
        stuck = pool.submit("a", "while True: pass")
        time.sleep(0.1)
        t = time.monotonic()
        fast = [pool.submit("b", f"v + '{i}'") for i in range(3)]
        assert [f.result(timeout=5).observation for f in fast] == ["'B0'", "'B1'", "'B2'"]
        assert time.monotonic() - t < 1.0
        assert not stuck.done()
        assert stuck.result(timeout=5).status == "timeout"
        assert pool.run("a", "v").status == "error"  # a's worker was replaced
        pool.release("b").result(timeout=5)
        assert pool.run("b", "v").observation == "NameError: name 'v' is not defined"


def test_limits_defaults():
    lim = Limits()
    assert lim.timeout == 20.0 and lim.memory_bytes == 2 << 30 and not lim.full_traceback
    with pytest.raises(TypeError):
        Session(no_such_limit=1)
    assert threading.main_thread().is_alive()


def test_executor_and_sandbox_import_each_other_in_one_direction_only():
    """sandbox.py (run as a script by the zygote) imports nothing from mdpo; executor uses only its public names."""
    import ast
    from pathlib import Path

    import mdpo.sandbox

    src = Path(mdpo.sandbox.__file__)
    mods = [n.module if isinstance(n, ast.ImportFrom) else a.name for n in ast.walk(ast.parse(src.read_text()))
            if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names]
    assert not [m for m in mods if m and m.split(".")[0] == "mdpo"]
    tree = ast.parse((src.parent / "executor.py").read_text())
    used = [a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "mdpo.sandbox"
            for a in n.names]
    assert used and not [name for name in used if name.startswith("_")]
    assert Limits is mdpo.sandbox.Limits  # one definition, re-exported
