"""mdpo.datasets: names, the data dir, real downloads from a local server, the MATH rebuild, one-line errors.

Every download goes to an http.server on 127.0.0.1 that serves ../shared/data (the layout the cache uses);
a guard fails any test that would open another URL. Nothing here touches the network.
"""

import functools
import hashlib
import io
import json
import os
import sys
import tarfile
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from mdpo import data as data_cli
from mdpo import datasets as ds

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not (SHARED / "gsm8k" / "test.jsonl").is_file(),
                                  reason="../shared/data (an offline copy of the layout) is not beside the checkout")

DATA = [
    {"question": "What is 2+3?", "answer": "2+3=<<2+3=5>>5\n#### 5"},
    {"question": "What is 1,000 + 234?", "answer": "#### 1,234"},
    {"problem": "Compute $\\frac{1}{2}+\\frac{1}{4}$.", "solution": "It is $\\boxed{\\frac34}$.", "level": "Level 2",
     "type": "Algebra"},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def no_partial_files(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if p.name.endswith(".part") or p.name.endswith(".tmp")]


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """No user cache, no inherited settings, and no URL other than the local server's can be opened."""
    for var in ("MDPO_DATA", "MDPO_OFFLINE", "MDPO_DATA_MIRROR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    real = ds._urlopen

    def guarded(url, timeout):
        assert url.startswith("http://127.0.0.1:"), f"a test tried to reach {url}"
        return real(url, timeout)

    monkeypatch.setattr(ds, "_urlopen", guarded)


class Handler(SimpleHTTPRequestHandler):
    """Serves `directory` (../shared/data), plus in-memory files; paths under /truncated/ stop half-way."""

    extra: dict = {}
    hits: list = []

    def do_GET(self):
        type(self).hits.append(self.path)
        path = self.path.removeprefix("/truncated")
        body = self.extra.get(path)
        if body is None and self.path.startswith("/truncated/"):
            body = (Path(self.directory) / path.lstrip("/")).read_bytes()
        if body is None:
            return super().do_GET()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))  # always the full length: a cut is detectable
        self.end_headers()
        self.wfile.write(body[: len(body) // 2] if self.path.startswith("/truncated/") else body)
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    if not SHARED.is_dir():
        pytest.skip("../shared/data is not beside the checkout")
    handler = functools.partial(Handler, directory=str(SHARED))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def pin(monkeypatch, rel, url, sha256=None):
    """Point one file's pinned source at `url` (its real size and digest unless `sha256` is given)."""
    src = ds.FILES[rel]
    monkeypatch.setitem(ds.FILES, rel, ds.Source((url,), src.size, sha256 or src.sha256))


# ---------------------------------------------------------------- reading, offline

def test_load_problems_formats(tmp_path):
    probs = ds.load_problems(str(write_jsonl(tmp_path / "d.jsonl", DATA)), "unused")
    assert [p["gold"] for p in probs] == ["5", "1234", "\\frac34"]
    assert probs[2]["level"] == "Level 2" and probs[2]["subject"] == "Algebra"
    with pytest.raises(ds.DatasetError, match=r"d2.jsonl:2: no 'question' or 'problem' field"):
        ds.load_problems(str(write_jsonl(tmp_path / "d2.jsonl", [DATA[0], {"q": 1}])), "x")
    with pytest.raises(ds.DatasetError, match="nothing.jsonl: data file not found"):
        ds.load_problems(str(tmp_path / "nothing.jsonl"), "x")


def test_parquet_rows_read_like_jsonl(tmp_path, monkeypatch):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    rows = [{"idx": 7, "type": "Algebra", "problem": "What is 1+1?", "solution": "It is $\\boxed{2}$."},
            {"idx": 8, "type": "gsm8k", "problem": "What is 2+2?", "solution": "2+2=4\n#### 4"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    probs = ds.load_problems(str(tmp_path / "p.parquet"))
    assert [(p["id"], p["gold"], p["subject"]) for p in probs] == [("7", "2", "Algebra"), ("8", "4", "gsm8k")]
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if the extra were not installed
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ds.DatasetError, match=r"p.parquet: reading Parquet needs pyarrow: "
                                              r"pip install 'mdpo\[parquet\]'"):
        ds.load_problems(str(tmp_path / "p.parquet"))


def test_prompt_set_from_a_local_folder(tmp_path, monkeypatch):
    folder = tmp_path / "data" / "RLHF4MATH" / "prompt_iter2"
    folder.mkdir(parents=True)
    write_jsonl(folder / "b.jsonl", DATA[2:])
    write_jsonl(folder / "a.jsonl", DATA[:2])
    (folder / ".cache").mkdir()
    write_jsonl(folder / ".cache" / "z.jsonl", [{"junk": 1}])  # hidden folders are not data
    monkeypatch.setenv("MDPO_OFFLINE", "1")
    probs = ds.load_problems("prompt_iter2", tmp_path / "data", split="train")
    assert [p["gold"] for p in probs] == ["5", "1234", "\\frac34"]
    assert [p["id"] for p in probs] == ["0", "1", "2"]  # ids run on across the files
    with pytest.raises(ds.DatasetError, match=r"prompt_iter3: no .parquet or .jsonl files and MDPO_OFFLINE is set"):
        ds.load_problems("prompt_iter3", tmp_path / "data", split="train")


@needs_shared
def test_real_datasets_load_offline(monkeypatch):
    monkeypatch.setenv("MDPO_OFFLINE", "1")  # a folder with the layout needs no network at all
    assert len(ds.load_problems("gsm8k", str(SHARED))) == 1319
    m500 = ds.load_problems("math500", str(SHARED))
    assert len(m500) == 500 and m500[0]["level"].startswith("Level ")
    assert len(ds.load_problems("math", str(SHARED))) == 5000
    skipped = []
    assert len(ds.load_problems("math", str(SHARED), split="train", skipped=skipped)) == 7498
    assert len(skipped) == 2  # two train solutions have no \boxed (SOURCES.md)
    monkeypatch.setenv("MDPO_DATA", str(SHARED))  # $MDPO_DATA when no data dir is given
    assert len(ds.load_problems("gsm8k", None, split="train")) == 7473


def test_data_root_order(tmp_path, monkeypatch):
    assert ds.data_root() == tmp_path / "xdg" / "mdpo" / "data"
    monkeypatch.setenv("MDPO_DATA", str(tmp_path / "env"))
    assert ds.data_root() == tmp_path / "env"
    assert ds.data_root(tmp_path / "flag") == tmp_path / "flag"


@needs_shared
def test_shared_files_have_the_pinned_digests():
    for rel, src in ds.FILES.items():
        data = (SHARED / rel).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (src.size, src.sha256), rel


# ---------------------------------------------------------------- downloads

def test_download_verify_rename(server, tmp_path, monkeypatch):
    pin(monkeypatch, "gsm8k/test.jsonl", f"{server}/gsm8k/test.jsonl")
    Handler.hits.clear()
    probs = ds.load_problems("gsm8k", tmp_path / "cache")
    assert len(probs) == 1319
    got = tmp_path / "cache" / "gsm8k" / "test.jsonl"
    assert got.read_bytes() == (SHARED / "gsm8k" / "test.jsonl").read_bytes()
    assert no_partial_files(tmp_path / "cache")
    ds.load_problems("gsm8k", tmp_path / "cache")
    assert Handler.hits == ["/gsm8k/test.jsonl"]  # fetched once, then read from the cache


def test_mirror_serves_the_layout(server, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MDPO_DATA_MIRROR", server)
    monkeypatch.setenv("MDPO_DATA", str(tmp_path / "cache"))
    assert data_cli.main(["fetch", "gsm8k", "math500", "math"]) == 0
    out = capsys.readouterr().out
    assert out.count("sha256 ok") == 5
    for rel in ds.FILES:
        assert (tmp_path / "cache" / rel).read_bytes() == (SHARED / rel).read_bytes()
    assert data_cli.main(["fetch", "gsm9k"]) == 2
    assert "unknown dataset 'gsm9k'" in capsys.readouterr().err


def test_truncated_download_leaves_nothing(server, tmp_path, monkeypatch):
    pin(monkeypatch, "gsm8k/test.jsonl", f"{server}/truncated/gsm8k/test.jsonl")
    with pytest.raises(ds.DatasetError, match=r"test.jsonl: download truncated \(374869 of 749738 bytes\); "
                                              r"the partial file was removed; rerun to retry"):
        ds.load_problems("gsm8k", tmp_path / "cache")
    assert not (tmp_path / "cache" / "gsm8k" / "test.jsonl").exists()
    assert no_partial_files(tmp_path / "cache")


def test_wrong_digest_leaves_nothing(server, tmp_path, monkeypatch):
    pin(monkeypatch, "gsm8k/train.jsonl", f"{server}/gsm8k/train.jsonl", sha256="0" * 64)
    with pytest.raises(ds.DatasetError, match=r"is not the pinned 0000000000000000\.\.\.; the file was removed"):
        ds.load_problems("gsm8k", tmp_path / "cache", split="train")
    assert not (tmp_path / "cache" / "gsm8k" / "train.jsonl").exists()
    assert no_partial_files(tmp_path / "cache")


def test_no_network_names_url_and_place(tmp_path, monkeypatch):
    import socket

    with socket.socket() as s:  # a port nothing listens on: connection refused, as with no network
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/test.jsonl"
    pin(monkeypatch, "math/prm800k_math_splits/test.jsonl", url)
    dest = tmp_path / "cache" / "math" / "prm800k_math_splits" / "test.jsonl"
    with pytest.raises(ds.DatasetError) as e:
        ds.load_problems("math500", tmp_path / "cache")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"cannot download {url} (")
    assert msg.endswith(f"download {url} by hand to {dest}, or set --data-dir / $MDPO_DATA to a folder that has "
                        f"math/prm800k_math_splits/test.jsonl")
    monkeypatch.setenv("MDPO_OFFLINE", "1")
    with pytest.raises(ds.DatasetError, match="not present and MDPO_OFFLINE is set: download"):
        ds.load_problems("math500", tmp_path / "cache")
    assert no_partial_files(tmp_path / "cache")


# ---------------------------------------------------------------- the Hendrycks MATH rebuild

@pytest.fixture(scope="module")
def math_release():
    """The per-problem JSON files of the Hendrycks release, recovered from ../shared/data's DERIVED JSONL.

    Written with 4-space indents like the release: the rebuild must not depend on how a file is formatted.
    """
    if not (SHARED / "math" / "hendrycks_math" / "train.jsonl").is_file():
        pytest.skip("../shared/data is not beside the checkout")
    files = {}
    for split in ds.HENDRYCKS_SPLITS:
        for line in (SHARED / ds.HENDRYCKS_DIR / f"{split}.jsonl").read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            files[row.pop("unique_id")] = json.dumps(row, indent=4, ensure_ascii=False).encode("utf-8")
    return files


def tarball(files: dict, prefix: str, mode: str) -> bytes:
    buf = io.BytesIO()
    kw = {"compresslevel": 1} if mode == "w:gz" else {}  # fast: the test is about the layout, not the ratio
    with tarfile.open(fileobj=buf, mode=mode, **kw) as tar:
        for name in sorted(files, reverse=True):  # not in the JSONL's order: the rebuild sorts
            info = tarfile.TarInfo(f"{prefix}/{name}")
            info.size = len(files[name])
            tar.addfile(info, io.BytesIO(files[name]))
    return buf.getvalue()


def test_math_rebuilt_from_a_served_archive(server, tmp_path, monkeypatch, math_release):
    github, berkeley = ds.HENDRYCKS_ARCHIVES
    gz = tarball(math_release, f"agents-{ds._AGENTS}/{github.root}", "w:gz")
    monkeypatch.setitem(Handler.extra, "/agents.tar.gz", gz)
    gone = f"{server}/missing/MATH.tar"  # 404: the next archive is tried
    monkeypatch.setattr(ds, "HENDRYCKS_ARCHIVES", (
        ds.Archive(gone, berkeley.filename, berkeley.root),
        ds.Archive(f"{server}/agents.tar.gz", github.filename, github.root)))
    probs = ds.load_problems("math", tmp_path / "cache")
    assert len(probs) == 5000
    for split in ds.HENDRYCKS_SPLITS:  # the same bytes as the DERIVED files: the digests were checked
        rel = f"{ds.HENDRYCKS_DIR}/{split}.jsonl"
        assert (tmp_path / "cache" / rel).read_bytes() == (SHARED / rel).read_bytes()
    assert sorted(p.name for p in (tmp_path / "cache" / "math").iterdir()) == ["hendrycks_math"]  # archive deleted
    assert no_partial_files(tmp_path / "cache")


def test_math_rebuilt_offline_from_an_archive_placed_by_hand(tmp_path, monkeypatch, math_release):
    monkeypatch.setenv("MDPO_OFFLINE", "1")
    root = tmp_path / "cache"
    with pytest.raises(ds.DatasetError, match=r"not present and MDPO_OFFLINE is set: download https://github.com/"
                                              r"aiwaves-cn/agents/archive/\w+\.tar\.gz by hand to "
                                              r".*/math/agents-\w+\.tar\.gz"):
        ds.load_problems("math", root, split="train", skipped=[])
    (root / "math").mkdir(parents=True)
    # The original release's layout: MATH/train/<subject>/<n>.json in a plain tar.
    (root / "math" / "MATH.tar").write_bytes(tarball(math_release, "MATH", "w"))
    assert len(ds.load_problems("math", root, split="train", skipped=[])) == 7498
    rel = f"{ds.HENDRYCKS_DIR}/train.jsonl"
    assert (root / rel).read_bytes() == (SHARED / rel).read_bytes()


def test_math_rebuild_with_a_wrong_digest_writes_nothing(tmp_path, math_release):
    changed = dict(math_release)
    first = next(k for k in changed if k.startswith("test/"))
    changed[first] = changed[first].replace(b"Level", b"level", 1)
    (tmp_path / "math").mkdir()
    (tmp_path / "math" / "MATH.tar").write_bytes(tarball(changed, "MATH", "w"))
    with pytest.raises(ds.DatasetError, match=r"MATH.tar: the test split rebuilt from it \(5000 problems\) has sha256 "
                                              r"\w+\.\.\., not the pinned 1b833f0f8869d7cb\.\.\.; nothing was written"):
        ds.load_problems("math", tmp_path)
    assert not (tmp_path / ds.HENDRYCKS_DIR).exists() or not list((tmp_path / ds.HENDRYCKS_DIR).iterdir())


def test_existing_data_cli_still_parses():
    with pytest.raises(SystemExit) as e:  # the trajectory converter keeps its flags
        data_cli.main(["--tokenizer", "x", "--out", "y"])
    assert e.value.code == 2


def test_unwritable_data_dir_is_one_line(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root can write anywhere")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(ds.DatasetError, match="cannot be written there .*: set --data-dir / \\$MDPO_DATA"):
            ds.load_problems("gsm8k", ro)
    finally:
        ro.chmod(0o700)
