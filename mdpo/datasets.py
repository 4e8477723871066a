"""Problem sets by name: where each file lives, how a missing one is fetched and verified, how rows are read.

    load_problems("gsm8k", split="train")       # <data dir>/gsm8k/train.jsonl, downloaded on first use
    load_problems("prompt_iter1", split="train") # RLHF4MATH/prompt_iter1 (Parquet on the Hugging Face Hub)
    load_problems("my_prompts.jsonl")           # any JSONL or Parquet file

The data dir is `--data-dir` / `data.data_dir` when given, else $MDPO_DATA, else $XDG_CACHE_HOME/mdpo/data
(~/.cache/mdpo/data). Its layout is the one of the project's shared data folder (gsm8k/train.jsonl,
math/hendrycks_math/test.jsonl, math/prm800k_math_splits/test.jsonl), so a folder that already holds the
files works with no network at all. A missing file is downloaded over HTTPS with the standard library from a
pinned URL (a commit, never a branch), into a temporary file that is checked against the pinned size and
sha256 and only then renamed into place: a reader never sees a partial file, and a bad download is removed.

The Hendrycks MATH splits are published only as one JSON file per problem, so they are rebuilt from an
archive of those files into the same JSONL, deterministically, and the result must have the pinned sha256.
Set MDPO_DATA_MIRROR=URL to fetch every file from URL/<layout path> instead (a local copy of the layout) and
MDPO_OFFLINE=1 to never download. Every failure is a DatasetError with one line that says what to do.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import json
import os
import re
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from mdpo.atomic import atomic_open
from mdpo.grader import gold_gsm8k, gold_math
from mdpo.textfile import read_jsonl

DATASETS = {  # name -> test split, relative to the data dir
    "gsm8k": "gsm8k/test.jsonl",
    "math": "math/hendrycks_math/test.jsonl",
    "math500": "math/prm800k_math_splits/test.jsonl",
}
TRAIN_DATASETS = {  # the same names in data.train mean the training splits
    "gsm8k": "gsm8k/train.jsonl",
    "math": "math/hendrycks_math/train.jsonl",
}
# The paper's augmented prompt sets, one per iteration: Parquet files on the Hugging Face Hub only (no pinned
# URL or digest exists outside the Hub, which checks its own files). A folder <data dir>/RLHF4MATH/prompt_iterK
# holding their .parquet / .jsonl files is used first, so they too work offline once placed there.
PROMPT_SETS = {f"prompt_iter{k}": f"RLHF4MATH/prompt_iter{k}" for k in (1, 2, 3)}

PARQUET_EXTRA = "pip install 'mdpo[parquet]'"


@dataclass(frozen=True)
class Source:
    """A file of the layout: pinned download URLs (tried in order), its size and sha256 (../shared/data/SOURCES.md)."""

    urls: tuple[str, ...]
    size: int
    sha256: str


_GSM8K = "https://raw.githubusercontent.com/openai/grade-school-math/3101c7d5072418e28b9008a6636bde82a006892c/" \
         "grade_school_math/data/"
# MATH-500 as OpenAI published it (prm800k math_splits/test.jsonl, Git LFS there); this raw copy is byte-identical.
_MATH500 = "https://raw.githubusercontent.com/ZubinGou/math-evaluation-harness/" \
           "db77bc6bb2a17c90ed2d63e88ebd8c40a82858c5/data/math_oai/test.jsonl"
FILES = {
    "gsm8k/train.jsonl": Source((_GSM8K + "train.jsonl",), 4166206,
                                "17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465"),
    "gsm8k/test.jsonl": Source((_GSM8K + "test.jsonl",), 749738,
                               "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14"),
    "math/prm800k_math_splits/test.jsonl": Source((_MATH500,), 446564,
                                                  "35dc41080a3680858b27fa7e0533d2d547825316fc5dafe5d316f4ccc5a06132"),
    # Rebuilt from an archive (HENDRYCKS_ARCHIVES): no direct URL.
    "math/hendrycks_math/train.jsonl": Source((), 6849298,
                                              "00aa30008a611172529ab775ed6f3af9efd32974625b19181c3ebfc724134e52"),
    "math/hendrycks_math/test.jsonl": Source((), 4298696,
                                             "1b833f0f8869d7cb975debfe04f0697bd23455c388045ba9159e5046d37df5fa"),
}


@dataclass(frozen=True)
class Archive:
    """A tarball holding the Hendrycks MATH release as <root>/<split>/<subject>/<n>.json files."""

    url: str
    filename: str  # its name under <data dir>/math/ when placed there by hand
    root: str  # the folder above train/ and test/ inside the archive (after any top-level folder)


HENDRYCKS_DIR = "math/hendrycks_math"
HENDRYCKS_SPLITS = ("train", "test")
# The GitHub archive at the commit SOURCES.md names carries a verbatim copy of the release; the original
# tarball (hendrycks/math README) is the fallback. Neither archive is pinned by digest (GitHub does not
# promise byte-stable archives): the rebuilt JSONL is, which is what matters.
_AGENTS = "e8c4e3c2d19739d3dff59e577d1c97090cc15f59"
HENDRYCKS_ARCHIVES = (
    Archive(f"https://github.com/aiwaves-cn/agents/archive/{_AGENTS}.tar.gz", f"agents-{_AGENTS}.tar.gz",
            "src/agents/datasets/data/math"),
    Archive("https://people.eecs.berkeley.edu/~hendrycks/MATH.tar", "MATH.tar", "MATH"),
)
FETCH_NAMES = {  # `python -m mdpo.data fetch NAME`: the files of each name
    "gsm8k": ["gsm8k/train.jsonl", "gsm8k/test.jsonl"],
    "math": [f"{HENDRYCKS_DIR}/{s}.jsonl" for s in HENDRYCKS_SPLITS],
    "math500": ["math/prm800k_math_splits/test.jsonl"],
}


class DatasetError(ValueError):
    """A dataset could not be found, fetched or read; the message is one line naming the file and the fix."""


# ---------------------------------------------------------------- where files live

def data_root(data_dir=None) -> Path:
    """The data dir: `data_dir`, else $MDPO_DATA, else the user cache ($XDG_CACHE_HOME/mdpo/data)."""
    if data_dir:
        return Path(data_dir).expanduser()
    if os.environ.get("MDPO_DATA"):
        return Path(os.environ["MDPO_DATA"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "mdpo" / "data"


def dataset_files(data: str, data_dir=None, split: str = "test") -> list[Path]:
    """The file(s) behind `data` (a name of `split`, or a path), fetched first if they are missing."""
    root = data_root(data_dir)
    names = TRAIN_DATASETS if split == "train" else DATASETS
    if data in names:
        return [ensure(names[data], root)]
    repo = PROMPT_SETS.get(data, data if data in PROMPT_SETS.values() else None)
    if repo is not None:
        return prompt_set_files(repo, root)
    path = Path(data).expanduser()
    if path.is_dir():
        raise DatasetError(f"{path}: is a directory, not a data file: give a .jsonl or .parquet file (or a dataset "
                           f"name: {', '.join(sorted({*names, *PROMPT_SETS}))})")
    if not path.is_file():
        where = f"--data {data!r}, data dir {str(root)!r}"
        raise DatasetError(f"{path}: data file not found ({where}; names: {', '.join(sorted({*names, *PROMPT_SETS}))})")
    return [path]


def prompt_set_files(repo_id: str, root: Path) -> list[Path]:
    """Data files of a Hub prompt set: <root>/<repo_id>/ when it holds any, else the Hub snapshot's."""
    local = _data_files(root / repo_id)
    if local:
        return local
    if _offline():
        raise DatasetError(f"{root / repo_id}: no .parquet or .jsonl files and MDPO_OFFLINE is set: download "
                           f"https://huggingface.co/datasets/{repo_id} by hand into that folder")
    from mdpo.hub import DATA_FILES, HubError, snapshot

    try:
        files = _data_files(snapshot(repo_id, DATA_FILES, repo_type="dataset"))
    except HubError as e:
        raise DatasetError(f"{e} (or put its files in {root / repo_id})") from None
    if not files:
        raise DatasetError(f"https://huggingface.co/datasets/{repo_id} has no .parquet or .jsonl files")
    return files


def _data_files(folder: Path) -> list[Path]:
    """.parquet / .jsonl files under `folder`, in path order, skipping hidden folders (caches, partial files)."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.rglob("*") if p.suffix in (".parquet", ".jsonl") and p.is_file()
             and not any(part.startswith(".") for part in p.relative_to(folder).parts)]
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


# ---------------------------------------------------------------- fetching

def _offline() -> bool:
    return os.environ.get("MDPO_OFFLINE", "").strip().lower() in ("1", "true", "yes")


def _urls(rel: str) -> tuple[str, ...]:
    mirror = os.environ.get("MDPO_DATA_MIRROR", "").rstrip("/")
    return (f"{mirror}/{rel}",) if mirror else FILES[rel].urls


def ensure(rel: str, root) -> Path:
    """`root/rel`, downloading (or rebuilding) and verifying it first when it is missing."""
    root = Path(root)
    dest = root / rel
    if dest.is_file():
        return dest
    if root.exists() and not root.is_dir():
        raise DatasetError(f"{root}: is a file, not a data folder: set --data-dir / $MDPO_DATA to a folder")
    if dest.is_dir():
        raise DatasetError(f"{dest}: is a directory, not a data file: remove it (it is fetched again) or set "
                           f"--data-dir / $MDPO_DATA to a folder that has {rel}")
    if rel not in FILES:
        raise DatasetError(f"{dest}: data file not found and no source is known for it")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DatasetError(f"{dest}: data file not found, and {root} cannot be created ({e.strerror}): "
                           f"set --data-dir / $MDPO_DATA to a writable folder") from None
    with _lock(root):
        if dest.is_file():  # another process fetched it while we waited
            return dest
        try:
            if FILES[rel].urls or os.environ.get("MDPO_DATA_MIRROR"):
                _fetch_file(rel, dest)
            else:
                rebuild_hendrycks(root)
        except OSError as e:  # the data dir is read-only or full
            raise DatasetError(f"{dest}: data file not found, and it cannot be written there ({e.strerror or e}): "
                               f"set --data-dir / $MDPO_DATA to a writable folder") from None
    return dest


@contextlib.contextmanager
def _lock(root: Path):
    """One fetcher per data dir at a time (torchrun starts one process per GPU, all wanting the same files)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock; the atomic renames still keep every file whole
        yield
        return
    try:
        f = open(root / ".fetch.lock", "a")
    except OSError:
        yield
        return
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _by_hand(url: str, dest: Path, rel: str) -> str:
    return f"download {url} by hand to {dest}, or set --data-dir / $MDPO_DATA to a folder that has {rel}"


def _fetch_file(rel: str, dest: Path) -> None:
    src = FILES[rel]
    urls = _urls(rel)
    if _offline():
        raise DatasetError(f"{dest}: not present and MDPO_OFFLINE is set: {_by_hand(urls[0], dest, rel)}")
    errors = []
    for url in urls:
        try:
            download(url, dest, size=src.size, sha256=src.sha256)
            return
        except _Unreachable as e:
            errors.append(str(e) if len(urls) == 1 else f"{url}: {e}")
    raise DatasetError(f"cannot download {urls[0] if len(urls) == 1 else rel} ({'; '.join(errors)}): "
                       f"{_by_hand(urls[0], dest, rel)}")


class _Unreachable(Exception):
    """The server could not be reached or refused the file (the next URL may work)."""


def _urlopen(url: str, timeout: float):
    # A User-Agent: some servers refuse Python's default one.
    return urllib.request.urlopen(urllib.request.Request(url, headers={"User-Agent": "mdpo"}), timeout=timeout)


def download(url: str, dest, size: int | None = None, sha256: str | None = None, timeout: float = 60.0) -> Path:
    """Download `url` to `dest` through a temporary file, checking the length and (when given) size and sha256.

    Nothing is left at `dest` or beside it unless the whole, verified file arrived. Raises DatasetError for a
    truncated or wrong file, _Unreachable when the server cannot be reached.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            try:
                resp = _urlopen(url, timeout)
            except urllib.error.HTTPError as e:
                raise _Unreachable(f"HTTP {e.code} {e.reason}") from None
            except (urllib.error.URLError, OSError) as e:
                raise _Unreachable(str(getattr(e, "reason", e))) from None
            with resp:
                expected = resp.headers.get("Content-Length")
                expected = int(expected) if expected and expected.isdigit() else None
                digest, got = hashlib.sha256(), 0
                with tqdm(total=expected or size, unit="B", unit_scale=True, unit_divisor=1024, leave=False,
                          desc=f"fetch {dest.name}") as bar:
                    try:
                        while chunk := resp.read(1 << 20):
                            f.write(chunk)
                            digest.update(chunk)
                            got += len(chunk)
                            bar.update(len(chunk))
                    except (http.client.IncompleteRead, OSError):
                        pass  # the connection broke mid-file: reported below as a truncated download
            f.flush()
            os.fsync(f.fileno())
        if (expected is not None and got < expected) or (size is not None and got < size):
            raise DatasetError(f"{url}: download truncated ({got} of {expected or size} bytes); the partial "
                               f"file was removed; rerun to retry")
        if size is not None and got != size:
            raise DatasetError(f"{url}: got {got} bytes, expected {size}; the file was removed, nothing was kept "
                               f"at {dest}")
        if sha256 is not None and digest.hexdigest() != sha256:
            raise DatasetError(f"{url}: sha256 {digest.hexdigest()[:16]}... is not the pinned {sha256[:16]}...; "
                               f"the file was removed, nothing was kept at {dest}")
        os.replace(tmp, dest)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return dest


# ---------------------------------------------------------------- the Hendrycks MATH rebuild

def rebuild_hendrycks(root) -> list[Path]:
    """Write math/hendrycks_math/{train,test}.jsonl under `root` from a Hendrycks MATH archive.

    Uses an archive already placed in <root>/math/ (by hand: no network), else downloads each of
    HENDRYCKS_ARCHIVES in turn (deleting it after). Raises DatasetError if none works.
    """
    root = Path(root)
    folder = root / "math"
    rels = [f"{HENDRYCKS_DIR}/{s}.jsonl" for s in HENDRYCKS_SPLITS]
    for a in HENDRYCKS_ARCHIVES:
        if (folder / a.filename).is_file():
            return _rebuild_from(folder / a.filename, a.root, root, str(folder / a.filename), "delete it and rerun")
    first, last = HENDRYCKS_ARCHIVES[0], HENDRYCKS_ARCHIVES[-1]
    hand = (f"download {first.url} by hand to {folder / first.filename} (or {last.url} to "
            f"{folder / last.filename}), or set --data-dir / $MDPO_DATA to a folder that has {rels[0]} and {rels[1]}")
    if _offline():
        raise DatasetError(f"{root / rels[0]}: not present and MDPO_OFFLINE is set: {hand}")
    folder.mkdir(parents=True, exist_ok=True)
    failures = []
    for a in HENDRYCKS_ARCHIVES:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{a.filename}.", suffix=".part")
        os.close(fd)
        try:
            download(a.url, tmp)
            return _rebuild_from(Path(tmp), a.root, root, a.url, "rerun to retry")
        except _Unreachable as e:
            failures.append(f"{a.url}: {e}")
        finally:
            Path(tmp).unlink(missing_ok=True)  # the archive is only a means: the JSONL files are the data
    raise DatasetError(f"cannot download the Hendrycks MATH release ({'; '.join(failures)}): {hand}")


def _rebuild_from(archive: Path, inner_root: str, root: Path, origin: str, fix: str) -> list[Path]:
    """Rebuild both splits from `archive`; write each only if its sha256 is the pinned one."""
    member = re.compile(rf"(?:^|/){re.escape(inner_root)}/(train|test)/([a-z_]+)/(\d+)\.json$")
    rows: dict[str, list] = {s: [] for s in HENDRYCKS_SPLITS}
    try:
        with tarfile.open(archive, "r:*") as tar:
            for m in tar:
                hit = member.search(m.name)
                if hit and m.isfile():
                    split, subject, n = hit.groups()
                    rows[split].append((subject, int(n), tar.extractfile(m).read()))
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DatasetError(f"{origin}: not a complete tar archive ({e}); nothing was written; {fix}") from None
    out = []
    for split in HENDRYCKS_SPLITS:
        rel = f"{HENDRYCKS_DIR}/{split}.jsonl"
        data = hendrycks_jsonl(split, rows[split])
        got = hashlib.sha256(data).hexdigest()
        if got != FILES[rel].sha256:
            raise DatasetError(f"{origin}: the {split} split rebuilt from it ({len(rows[split])} problems) has sha256 "
                               f"{got[:16]}..., not the pinned {FILES[rel].sha256[:16]}...; nothing was written; "
                               f"{fix}")
        out.append((root / rel, data))
    for path, data in out:  # both splits checked before either is written
        with atomic_open(path, "wb") as f:
            f.write(data)
    return [path for path, _ in out]


def hendrycks_jsonl(split: str, files) -> bytes:
    """The JSONL of one split from (subject, n, bytes of <split>/<subject>/<n>.json) triples.

    One line per problem, sorted by (subject, n): the file's JSON object unchanged (key order kept, non-ASCII
    kept) plus "unique_id" = "<split>/<subject>/<n>.json", PRM800K's id scheme. How the files are indented
    does not matter; this is exactly how ../shared/data's DERIVED files were made (their digests match).
    """
    lines = []
    for subject, n, raw in sorted(files, key=lambda x: (x[0], x[1])):
        obj = json.loads(raw.decode("utf-8"))
        obj["unique_id"] = f"{split}/{subject}/{n}.json"
        lines.append(json.dumps(obj, ensure_ascii=False) + "\n")
    return "".join(lines).encode("utf-8")


# ---------------------------------------------------------------- reading problems

def _rows(path: Path):
    """(row number, location, row) for each row of a JSONL or Parquet file; blank JSONL lines are skipped.
    A file that is not JSONL / Parquet, holds a line that is not a JSON object, or no row is a DatasetError."""
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DatasetError(f"{path}: reading Parquet needs pyarrow: {PARQUET_EXTRA}") from None
        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises its own error types for bad files
            raise DatasetError(f"{path}: unreadable Parquet file ({' '.join(str(e).split())})") from None
        if table.num_rows == 0:
            raise DatasetError(f"{path}: empty Parquet file (no rows)")
        for i, row in enumerate(table.to_pylist(), 1):
            yield i, f"{path}:row {i}", row
        return
    yield from read_jsonl(path, DatasetError, objects=True, empty_ok=False)


def gold_answer(row: dict, where: str) -> str | None:
    """The gold answer of a row (GSM8K ####, a given answer, or MATH's last \\boxed{}); None if it has none."""
    if "####" in str(row.get("answer", "")):
        return gold_gsm8k(row["answer"])  # GSM8K: the number after ####
    if row.get("answer") is None and "####" in str(row.get("solution", "")):
        return gold_gsm8k(row["solution"])  # augmented GSM8K-style rows keep the #### rule
    if row.get("answer") is not None:
        return str(row["answer"])  # MATH-500 and prepared files carry the answer itself
    if "solution" in row:
        return gold_math(row["solution"])  # MATH: the last \boxed{} of the solution
    raise DatasetError(f"{where}: no 'answer' or 'solution' field")


def load_problems(data: str, data_dir=None, split: str = "test", skipped: list | None = None) -> list[dict]:
    """Problems as dicts with id, question, gold (and level / subject where the data has them).

    `data` is a dataset name (its `split` file in the data dir, fetched if missing), a prompt set name
    (prompt_iter1..3) or a JSONL / Parquet path. Accepted rows: GSM8K (question, answer with ####), MATH
    (problem, solution with \\boxed{}), MATH-500 / prepared files (answer), and the paper's augmented prompt
    sets (idx, type, problem or question, solution). A row without a gold answer is an error, unless `skipped`
    is a list: then its location is appended there and it is left out (training prompts that cannot be graded
    teach nothing).
    """
    problems = []
    offset = 0  # ids continue across the files of a multi-file prompt set
    for path in dataset_files(data, data_dir, split):
        last = 0
        for i, where, row in _rows(path):
            last = i
            question = row.get("question", row.get("problem"))
            if not isinstance(question, str):
                raise DatasetError(f"{where}: no 'question' or 'problem' field")
            gold = gold_answer(row, where)
            if gold is None or not gold.strip():
                if skipped is not None:
                    skipped.append(where)
                    continue
                raise DatasetError(f"{where}: no gold answer (no \\boxed{{}} in the solution)")
            level = row.get("level")
            if isinstance(level, int):
                level = f"Level {level}"
            problems.append({"id": str(row.get("unique_id", row.get("idx", offset + i - 1))), "question": question,
                             "gold": gold, "level": level, "subject": row.get("type", row.get("subject"))})
        offset += last
    return problems


# ---------------------------------------------------------------- python -m mdpo.data fetch

def fetch_main(argv=None) -> int:
    """`python -m mdpo.data fetch NAME...`: download and verify the named datasets into the data dir."""
    ap = argparse.ArgumentParser(prog="python -m mdpo.data fetch",
                                 description="Download and verify datasets into the data dir (then no network "
                                             "is needed).")
    ap.add_argument("names", nargs="+", metavar="NAME", help=f"{', '.join([*FETCH_NAMES, *PROMPT_SETS])}")
    ap.add_argument("--data-dir", default=None, help="default: $MDPO_DATA, else ~/.cache/mdpo/data")
    args = ap.parse_args(argv)
    root = data_root(args.data_dir)
    bad = [n for n in args.names if n not in FETCH_NAMES and n not in PROMPT_SETS]
    if bad:
        print(f"error: unknown dataset {bad[0]!r}; known: {', '.join([*FETCH_NAMES, *PROMPT_SETS])}", file=sys.stderr)
        return 2
    try:
        for name in args.names:
            if name in PROMPT_SETS:
                for p in prompt_set_files(PROMPT_SETS[name], root):
                    print(f"{name}: {p}")
                continue
            for rel in FETCH_NAMES[name]:
                path = ensure(rel, root)
                ok = _sha256(path) == FILES[rel].sha256
                print(f"{name}: {path} ({'sha256 ok' if ok else 'present, but not the pinned sha256: a local copy'})")
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
