"""Generated tables (mdpo/docs.py, `make docs`): every measured table in README.md and docs/ equals its source file."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from mdpo import demo, docs
from mdpo.config import CHOICES, ExperimentConfig, _SECTIONS, save_config

ROOT = Path(__file__).resolve().parents[1]


def test_every_generated_table_matches_its_source():
    """The check CI runs: a table that differs from its source, or whose source is missing, fails here."""
    assert docs.regenerate(ROOT, check=True) == []
    found = {src for f in docs.doc_files(ROOT) for src, *_ in docs.markers(f.read_text())}
    assert {"docs/results/demo.md", "mdpo/config.py"} <= found  # the README's demo table and the config reference
    for src in found - {"mdpo/config.py"}:
        assert (ROOT / src).is_file(), src


def make_root(tmp_path, doc: str, results: dict[str, str]) -> Path:
    (tmp_path / "docs" / "results").mkdir(parents=True)
    (tmp_path / "README.md").write_text(doc)
    for name, text in results.items():
        (tmp_path / name).write_text(text)
    return tmp_path


def test_render_and_regenerate(tmp_path, capsys):
    result = {"tables": {"main": {"columns": ["dtype", "x"], "rows": [["float32", 1.25], ["a|b", None]]}},
              "meta": {"command": "python b.py", "date": "2026-12-07"}}
    doc = ("# t\n\n<!-- table: docs/results/b.json main -->\nstale\n<!-- /table -->\n\nkept\n"
           "<!-- table: docs/results/r.md -->\n<!-- /table -->\n")
    root = make_root(tmp_path, doc, {"docs/results/b.json": json.dumps(result),
                                     "docs/results/r.md": "| m |\n| --- |\n| SFT |\n\n"})
    assert len(docs.regenerate(root, check=True)) == 2
    assert (root / "README.md").read_text() == doc  # check mode writes nothing
    assert len(docs.regenerate(root)) == 2
    assert (root / "README.md").read_text() == (
        "# t\n\n<!-- table: docs/results/b.json main -->\n"
        "| dtype | x |\n|---|---|\n| float32 | 1.25 |\n| a\\|b |  |\n\n"
        "<sub>command: python b.py; date: 2026-12-07</sub>\n<!-- /table -->\n\nkept\n"
        "<!-- table: docs/results/r.md -->\n| m |\n| --- |\n| SFT |\n<!-- /table -->\n")
    assert docs.regenerate(root, check=True) == []  # idempotent


def test_missing_source_or_table_is_one_line(tmp_path, capsys, monkeypatch):
    root = make_root(tmp_path, "<!-- table: docs/results/gone.json -->\n<!-- /table -->\n", {})
    with pytest.raises(docs.DocsError, match=r"docs/results/gone.json: source of a generated table is missing"):
        docs.regenerate(root, check=True)
    root = make_root(tmp_path / "b", "<!-- table: docs/results/x.json other -->\n<!-- /table -->\n",
                     {"docs/results/x.json": json.dumps({"tables": {"main": {"columns": [], "rows": []}}})})
    with pytest.raises(docs.DocsError, match=r"docs/results/x.json: no table 'other'"):
        docs.regenerate(root)
    monkeypatch.setattr(docs, "ROOT", root)
    assert docs.main(["--check"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "x.json" in err and "Traceback" not in err


def test_config_reference_lists_every_key_with_its_default():
    """Against the dataclasses walked here: one row per field, in schema order, the default as the schema has it."""
    rows = [line.split(" | ") for line in docs.config_reference().splitlines()[2:]]
    cfg = ExperimentConfig()
    want = [(f"`{s}.{f.name}`", getattr(getattr(cfg, s), f.name)) for s, cls in _SECTIONS.items()
            for f in dataclasses.fields(cls)]
    assert [r[0].lstrip("| ") for r in rows] == [k for k, _ in want]
    for (key, default), row in zip(want, rows):
        shown = row[1].strip("`")
        assert (json.loads(shown) if isinstance(default, (str, list)) else shown) == (
            default if isinstance(default, (str, list)) else repr(default)), key
        assert row[2].strip(" |"), f"{key} has no comment in mdpo/config.py"
        choices = CHOICES.get(key.strip("`"))
        if choices:
            assert "one of " + ", ".join(choices) in row[2] and "CHOICES[" not in row[2]


def test_collect_copies_only_a_default_demo(tmp_path):
    runs = tmp_path / "runs"
    out = runs / "demo"
    (out / "data").mkdir(parents=True)
    (out / "report.md").write_text("| model |\n")
    save_config(demo.demo_config(out), out / "run" / "config.yaml")
    done = {"sizes": demo.SIZES, "model": demo.MODEL, "seed": 0}
    (out / "data" / "done.json").write_text(json.dumps({**done, "sizes": {**demo.SIZES, "test": 6}}))
    assert docs.collect(tmp_path, runs) == []  # another size: not the README's demo
    (out / "data" / "done.json").write_text(json.dumps(done))
    save_config(demo.demo_config(out, ["loss.beta=0.5"]), out / "run" / "config.yaml")
    assert docs.collect(tmp_path, runs) == []  # another config
    save_config(demo.demo_config(out), out / "run" / "config.yaml")
    assert docs.collect(tmp_path, runs) == ["docs/results/demo.md"]
    assert (tmp_path / "docs" / "results" / "demo.md").read_text() == "| model |\n"
    assert docs.collect(tmp_path, runs) == []  # unchanged: nothing to copy
