"""Reading the text files people hand to mdpo (JSONL data, YAML configs, JSON records), with one-line errors.

Every reader of an input file goes through here, so every entry point answers a bad file the same way: one
line naming the file (and the line, where there is one) and what to do, raised as the caller's own error
class (ConfigError, DatasetError, TrainError, ...), never a UnicodeDecodeError or IsADirectoryError traceback.

    for i, where, row in read_jsonl(path, DataError, objects=True):   # where = "path:i"
    text = read_text(path, ConfigError, "YAML")

What is refused, and how it reads:

    data/x.jsonl: file not found
    data/x.jsonl: is a directory, not a JSONL file
    data/x.jsonl: gzip-compressed data, not a JSONL text file; decompress it first (gunzip)
    data/x.jsonl: binary data, not a JSONL text file
    data/x.jsonl:3: binary data (a NUL byte at offset 7), not JSONL text
    data/x.jsonl:3: not valid UTF-8 (byte 0xff at offset 12); save it as UTF-8
    data/x.jsonl:3: invalid JSON (Expecting value at column 1)
    data/x.jsonl:3: expected a JSON object, got a list
    data/x.jsonl: empty file (no JSONL rows)

Lines are read as bytes and decoded one at a time, so a large file is streamed and a bad byte is reported
with its line. A UTF-8 byte-order mark at the start is accepted and dropped.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any, Callable, Iterator

__all__ = ["read_lines", "read_text", "read_jsonl", "read_json", "describe_json"]

# Leading bytes of formats that are not text, and what to say about each.
MAGIC: tuple[tuple[bytes, str, str], ...] = (  # (signature, what it is, what to do)
    (b"\xff\xfe", "UTF-16-encoded text", "save it as UTF-8"),  # Windows editors' "Unicode"
    (b"\xfe\xff", "UTF-16-encoded text", "save it as UTF-8"),
    (b"\x1f\x8b", "gzip-compressed data", "decompress it first (gunzip)"),
    (b"BZh", "bzip2-compressed data", "decompress it first (bunzip2)"),  # checked with its block magic below
    (b"\xfd7zXZ\x00", "xz-compressed data", "decompress it first (unxz)"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed data", "decompress it first (unzstd)"),
    (b"PK\x03\x04", "a zip archive", "extract the file from it first"),
    (b"PAR1", "a Parquet file", "give it a .parquet name where Parquet is read"),
    (b"\x89PNG\r\n\x1a\n", "a PNG image", ""),
    (b"\xff\xd8\xff", "a JPEG image", ""),
    (b"GIF8", "a GIF image", ""),
    (b"%PDF-", "a PDF document", ""),
    (b"\x7fELF", "an executable", ""),
    (b"SQLite format 3\x00", "an SQLite database", ""),
    (b"GGUF", "a GGUF model file", ""),
    (b"\x93NUMPY", "a NumPy array file", ""),
)


def _magic(head: bytes) -> tuple[str, str] | None:
    for sig, what, fix in MAGIC:
        if head.startswith(sig):
            if sig == b"BZh" and head[4:10] != b"1AY&SY":
                continue  # a text file may well start with "BZh"
            return what, fix
    if head[257:262] == b"ustar":
        return "a tar archive", "extract the file from it first"
    return None


def _looks_binary(head: bytes) -> bool:
    """True for bytes that are no text in any encoding: a NUL, or more than 10% of them control characters or
    not UTF-8 (a Latin-1 file has a few non-UTF-8 bytes among ASCII text: that is text in the wrong encoding)."""
    if b"\x00" in head:
        return True
    text = head.decode("utf-8", "replace")
    if len(text) < 64:  # too little to tell: a short file gets the exact byte (not UTF-8, or bad JSON / YAML)
        return False
    odd = sum(ch == "\ufffd" or (ord(ch) < 32 and ch not in "\t\n\r\f\v\b\x1b") or ch == "\x7f" for ch in text)
    return odd > 0.1 * len(text)


def _open(path: Path, error: type[Exception], what: str):
    """`path` opened for reading bytes, after checking it is a regular file; `error` says why not."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise error(f"{path}: file not found") from None
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror or e})") from None
    if stat.S_ISDIR(st.st_mode):
        raise error(f"{path}: is a directory, not a {what} file") from None
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{path}: not a regular file (a {what} file is expected)") from None
    try:
        return open(path, "rb")
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror or e})") from None


def read_lines(path, error: type[Exception] = ValueError, what: str = "text",
               where: Callable[[int], str] | None = None) -> Iterator[tuple[int, str]]:
    """(line number, decoded line with its newline) for each line of the text file `path`.

    Raises `error` with one line for a missing / unreadable file, a directory, a known binary format, a NUL
    byte or bytes that are not UTF-8; `where(i)` names line i in those messages (default "path:i").
    """
    path = Path(path)
    where = where or (lambda i: f"{path}:{i}")
    f = _open(path, error, what)
    with f:
        try:
            head = f.read(512)
            kind = _magic(head)
            if kind is not None:
                raise error(f"{path}: {kind[0]}, not a {what} text file" + (f"; {kind[1]}" if kind[1] else ""))
            if _looks_binary(head):
                raise error(f"{path}: binary data, not a {what} text file")
            f.seek(0)
            for i, raw in enumerate(f, 1):
                if i == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]
                nul = raw.find(b"\x00")
                if nul >= 0:
                    raise error(f"{where(i)}: binary data (a NUL byte at offset {nul}), not {what} text")
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise error(f"{where(i)}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                                f"save it as UTF-8") from None
                yield i, line
        except OSError as e:  # an I/O error mid-file (a failing disk, a vanished network mount)
            raise error(f"{path}: cannot read ({e.strerror or e})") from None


def read_text(path, error: type[Exception] = ValueError, what: str = "text") -> str:
    """The whole text of `path` (checked as read_lines does; lines are named "path: line N")."""
    path = Path(path)
    return "".join(line for _, line in read_lines(path, error, what, lambda i: f"{path}: line {i}"))


def describe_json(value: Any) -> str:
    """'a list', 'a string', ... for a parsed JSON value (in messages)."""
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def read_jsonl(path, error: type[Exception] = ValueError, what: str = "JSONL", objects: bool = False,
               empty_ok: bool = True) -> Iterator[tuple[int, str, Any]]:
    """(line number, "path:line", parsed value) for each non-blank line of the JSONL file `path`.

    objects: every line must be a JSON object. empty_ok False: a file without a single row is an error.
    Every problem raises `error` with one line naming the file and line (see read_lines).
    """
    path = Path(path)
    rows = 0
    for i, line in read_lines(path, error, what):
        if not line.strip():
            continue
        here = f"{path}:{i}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            hint = " (a JSONL file holds one JSON value per line)" if rows == 0 and line.strip() in "[{" else ""
            raise error(f"{here}: invalid JSON ({e.msg.removesuffix(' at')} at column {e.colno}){hint}") from None
        if objects and not isinstance(value, dict):
            raise error(f"{here}: expected a JSON object, got {describe_json(value)}")
        rows += 1
        yield i, here, value
    if not rows and not empty_ok:
        raise error(f"{path}: empty file (no {what} rows)")


def read_json(path, error: type[Exception] = ValueError, what: str = "JSON") -> Any:
    """The parsed JSON document in `path`; errors as read_lines, and bad JSON is named by its line."""
    path = Path(path)
    text = read_text(path, error, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{path}: invalid JSON at line {e.lineno}: {e.msg.removesuffix(' at')}") from None
