"""Measured tables in README.md and docs/*.md are generated from the result files the commands write.

    python -m mdpo.docs            # copy finished runs' reports to docs/results/, rewrite every generated table
                                   # from its source (`make docs`)
    python -m mdpo.docs --check    # exit 1 naming each table that is stale or whose source is missing

A hand-copied table goes stale the day the code under it changes (the README's demo table did). So a
measured table is never typed: a document holds a marker naming its source, and this module writes the
table between the marker and its end line::

    <!-- table: docs/results/bench_vllm.json main -->
    ...generated...
    <!-- /table -->

The source is either `mdpo/config.py` (the config reference: every key, its default and the comment on its
line, read from the dataclass sections themselves), a benchmark's JSON result (its "tables" entry of that name: columns and rows, the same
table the benchmark printed; `benchmarks/common.py: emit`) or a markdown report a command wrote (the demo's
and the ablation bench's report.md, copied whole; the name is left out). Paths are relative to the
repository root. A result file also carries "meta" (command, machine, date), printed under the table so that
a reader knows what was measured and when.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from mdpo.atomic import atomic_open

ROOT = Path(__file__).resolve().parent.parent
DOCS = ("README.md", "docs")  # the files (and folders of *.md) that may hold generated tables
MARKER = re.compile(r"^<!-- table: (?P<src>\S+)(?: (?P<name>\S+))? -->\n(?P<body>.*?)^<!-- /table -->$",
                    re.M | re.S)


class DocsError(Exception):
    """A marker whose source file or table is missing, or a malformed result file."""


def markdown_table(columns, rows) -> str:
    """A GitHub markdown table; None shows as an empty cell, floats as they were rounded by the producer."""
    def cell(v):
        return "" if v is None else str(v).replace("|", "\\|")  # a bare | would end the cell
    lines = ["| " + " | ".join(map(cell, columns)) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(map(cell, r)) + " |" for r in rows]
    return "\n".join(lines)


def config_reference() -> str:
    """Every config key with its default and meaning: the comment on its line in mdpo/config.py (and the
    comment lines under it), so that the reference is the schema and cannot drift from it."""
    import dataclasses
    import inspect

    from mdpo.config import CHOICES, ExperimentConfig, _SECTIONS

    rows = []
    for section, cls in _SECTIONS.items():
        lines = inspect.getsource(cls).splitlines()
        for f in dataclasses.fields(cls):
            i = next(i for i, line in enumerate(lines) if re.match(rf"\s+{f.name}\s*:", line))
            meaning = [lines[i].partition("  # ")[2].strip()]
            while i + 1 < len(lines) and lines[i + 1].strip().startswith("#"):
                i += 1
                meaning.append(lines[i].strip().lstrip("#").strip())
            key = f"{section}.{f.name}"
            text = " ".join(m for m in meaning if m).replace(f'CHOICES["{key}"]', ", ".join(CHOICES.get(key, ())))
            default = getattr(getattr(ExperimentConfig(), section), f.name)
            shown = json.dumps(default, ensure_ascii=False) if isinstance(default, (str, list)) else repr(default)
            rows.append([f"`{key}`", f"`{shown}`", text])
    return markdown_table(["key", "default", "meaning"], rows) + "\n"


def render(src: str, name: str | None, root: Path = ROOT) -> str:
    """The generated text for one marker (without the marker lines)."""
    if src == "mdpo/config.py":
        return config_reference()
    path = root / src
    if not path.is_file():
        raise DocsError(f"{src}: source of a generated table is missing (rerun the command that writes it; "
                        f"docs/README.md lists them)")
    if path.suffix == ".md":
        return path.read_text(encoding="utf-8").strip() + "\n"
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
        table = result["tables"][name or "main"]
        text = markdown_table(table["columns"], table["rows"])
    except (ValueError, KeyError, TypeError) as e:
        raise DocsError(f"{src}: no table {name or 'main'!r} with columns and rows ({type(e).__name__}: {e})")
    meta = result.get("meta") or {}
    if meta:
        text += "\n\n<sub>" + "; ".join(f"{k}: {v}" for k, v in meta.items()) + "</sub>"
    return text + "\n"


def doc_files(root: Path = ROOT) -> list[Path]:
    out = []
    for d in DOCS:
        p = root / d
        out += sorted(p.rglob("*.md")) if p.is_dir() else [p] if p.is_file() else []
    return out


def markers(text: str):
    """(source, name, current body, span) of every generated table in a document."""
    return [(m["src"], m["name"], m["body"], m.span("body")) for m in MARKER.finditer(text)]


def regenerate(root: Path = ROOT, check: bool = False) -> list[str]:
    """Rewrite (or with check=True only compare) every generated table; returns one line per stale table.

    A missing source is an error in both modes: a table nobody can regenerate is a hand-copied one."""
    stale = []
    for doc in doc_files(root):
        text = doc.read_text(encoding="utf-8")
        new, pos = [], 0
        for src, name, body, (a, b) in markers(text):
            fresh = render(src, name, root)
            new += [text[pos:a], fresh]
            pos = b
            if fresh != body:
                stale.append(f"{doc.relative_to(root)}: the table from {src}{' ' + name if name else ''} "
                             f"differs from its source (run `make docs`)")
        new.append(text[pos:])
        if not check and "".join(new) != text:
            with atomic_open(doc) as f:
                f.write("".join(new))
    return stale


def collect(root: Path = ROOT, runs: Path | None = None) -> list[str]:
    """Copy the reports of finished default runs into docs/results/ (the demo's and the ablation bench's).

    Only a run of the default sizes, model and config is copied for the demo (README.md reports that one: a
    `make demo ARGS=loss.beta=0.5` in runs/demo is not it); the ablation bench's report names its variants and
    seeds itself. Returns the files copied."""
    import shutil

    from mdpo.demo import is_default_run

    runs = runs or root / "runs"
    copied = []
    for report, dest, ok in ((runs / "demo" / "report.md", "docs/results/demo.md", is_default_run),
                             (runs / "ablate" / "report.md", "docs/results/ablate.md", lambda _: True)):
        if report.is_file() and ok(report.parent) and (not (root / dest).is_file()
                                                        or (root / dest).read_bytes() != report.read_bytes()):
            (root / dest).parent.mkdir(parents=True, exist_ok=True)
            with atomic_open(root / dest) as f:
                f.write(report.read_text(encoding="utf-8"))
            copied.append(dest)
    return copied


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mdpo.docs", description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only report stale tables (exit 1 if any)")
    args = ap.parse_args(argv)
    try:
        if not args.check:
            for dest in collect(ROOT):
                print(f"{dest}: copied from the run's report")
        stale = regenerate(ROOT, check=args.check)
    except DocsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.check:
        print("\n".join(stale) if stale else "every generated table matches its source")
        return 1 if stale else 0
    print(f"{len(stale)} table(s) regenerated" if stale else "every generated table was up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
