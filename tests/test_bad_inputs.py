"""Every entry point answers a bad input file with one line on stderr, exit status 2 and no traceback.

Each file an entry point reads gets each kind of bad file: not UTF-8 (on line 3, after two good lines), binary
junk (gzip, PNG, random bytes), a directory, and the natural extras (missing, empty, a line that is not JSON,
not an object, or misses a key). Everything runs in-process through main(argv); no model is ever loaded (the
loaders are patched to fail the test if one is reached), so bad input fails first and fast.
"""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest

import mdpo.data as data_mod
import mdpo.eval as ev
import mdpo.pipeline as pl
import mdpo.train as tr
from mdpo.trajectory import Trajectory

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "experiments" / "gemma7b_mdpo.yaml")

PROBLEM = {"question": "What is 1 + 1?", "answer": "#### 2"}
TRAJ = json.loads(Trajectory("q0", 0, [2, 5, 6, 7], [0, 0, 1, 1], [0, 0, 1, 1], correct=True).to_json())
PAIR = {"chosen": TRAJ, "rejected": dict(TRAJ, sample_id=1, correct=False)}
MESSAGES = {"messages": [{"role": "user", "content": "1 + 1?"}, {"role": "assistant", "content": "\\boxed{2}"}]}
YAML_OK = "loss:\n  beta: 0.1\n"
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256))


@pytest.fixture(autouse=True)
def no_model_loads(monkeypatch):
    """Bad input must fail before any model or tokenizer is loaded (or the sandbox is started)."""
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the bad input was refused")
    for mod in (tr, ev):
        monkeypatch.setattr(mod, "load_pretrained", refuse)
    monkeypatch.setattr(pl, "announce_sandbox", refuse)


def jsonl_bytes(row: dict) -> bytes:
    return (json.dumps(row) + "\n").encode()


def write_kind(path: Path, kind: str, good: bytes) -> tuple[int | None, str]:
    """Write a bad file of `kind` at `path` (`good`: one valid line of its format); returns (the line the error
    must name or None, a phrase the error must hold)."""
    if kind == "non_utf8":
        path.write_bytes(good + good + b'{"question": "caf\xe9 \xff"}\n')
        return 3, "not valid UTF-8 (byte 0xe9 at offset 17); save it as UTF-8"
    if kind == "gzip":
        path.write_bytes(gzip.compress(good * 3))
        return None, "gzip-compressed data"
    if kind == "png":
        path.write_bytes(PNG)
        return None, "a PNG image"
    if kind == "random":
        path.write_bytes(random.Random(0).randbytes(2000))
        return None, "binary data, not a"
    if kind == "directory":
        path.mkdir()
        return None, "is a directory"
    if kind == "missing":
        return None, "not found"
    if kind == "empty":
        path.write_bytes(b"")
        return None, "empty"
    if kind == "bad_json":
        path.write_bytes(good + good[: len(good) // 2] + b"\n")
        return 2, "invalid JSON"
    if kind == "not_object":
        path.write_bytes(good + b"[1, 2, 3]\n")
        return 2, ""
    if kind == "missing_key":
        path.write_bytes(good + b'{"unrelated": 1}\n')
        return 2, ""
    raise ValueError(kind)


FILE_KINDS = ["non_utf8", "gzip", "png", "random", "directory", "missing"]
JSONL_KINDS = FILE_KINDS + ["empty", "bad_json", "not_object", "missing_key"]


def assert_one_line(rc: int, capsys, path: Path, line: int | None, phrase: str) -> str:
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert rc == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1, err
    msg = lines[0]
    assert msg.startswith("error: ") and str(path) in msg, msg
    if line is not None:
        assert f"{path}:{line}:" in msg or f"{path}: line {line}:" in msg, msg
    assert phrase in msg, msg
    return msg


# ---------------------------------------------------------------- python -m mdpo.eval
@pytest.mark.parametrize("kind", JSONL_KINDS)
def test_eval_data_file(kind, tmp_path, capsys):
    bad = tmp_path / "problems.jsonl"
    line, phrase = write_kind(bad, kind, jsonl_bytes(PROBLEM))
    (tmp_path / "model").mkdir()
    rc = ev.main(["--model", str(tmp_path / "model"), "--data", str(bad), "--out", str(tmp_path / "out")])
    msg = assert_one_line(rc, capsys, bad, line, phrase)
    if kind == "missing_key":
        assert "no 'question' or 'problem' field" in msg
    if kind == "not_object":
        assert "expected a JSON object, got a list" in msg


@pytest.mark.parametrize("kind", ["non_utf8", "random", "directory", "bad_json", "not_object"])
def test_eval_resume_file(kind, tmp_path, capsys):
    """OUT/trajectories.jsonl, read back when an eval resumes."""
    data = tmp_path / "problems.jsonl"
    data.write_bytes(jsonl_bytes(PROBLEM))
    (tmp_path / "model").mkdir()
    out = tmp_path / "out"
    out.mkdir()
    bad = out / "trajectories.jsonl"
    line, phrase = write_kind(bad, kind, jsonl_bytes(TRAJ))
    rc = ev.main(["--model", str(tmp_path / "model"), "--data", str(data), "--out", str(out)])
    assert_one_line(rc, capsys, bad, line, phrase)


def test_eval_contradictory_flags(tmp_path, capsys):
    (tmp_path / "model").mkdir()
    base = ["--model", str(tmp_path / "model"), "--out", str(tmp_path / "o"), "--kv-attention", "flex"]
    assert ev.main(base + ["--compile"]) == 2
    assert "--compile and --kv-attention flex" in capsys.readouterr().err
    assert ev.main(base + ["--kv-block-size", "4096"]) == 2
    assert "--kv-block-size 4096 must be >= 2 and < --max-length 2048" in capsys.readouterr().err


# ---------------------------------------------------------------- python -m mdpo.train
def train_argv(tmp_path, config=CONFIG, data=None):
    (tmp_path / "model").mkdir(exist_ok=True)
    data = data or tmp_path / "pairs.jsonl"
    return [str(config), "--data", str(data), "--out", str(tmp_path / "out"),
            f"model.name_or_path={tmp_path / 'model'}"]


@pytest.mark.parametrize("kind", JSONL_KINDS)
def test_train_data_file(kind, tmp_path, capsys):
    bad = tmp_path / "pairs.jsonl"
    line, phrase = write_kind(bad, kind, jsonl_bytes(PAIR))
    msg = assert_one_line(tr.main(train_argv(tmp_path)), capsys, bad, line, phrase)
    if kind in ("not_object", "missing_key"):
        assert "a pair needs 'chosen' and 'rejected'" in msg


def test_train_trajectory_missing_field(tmp_path, capsys):
    """Labelled trajectories (loss.type mkto): a trajectory without its tokens."""
    bad = tmp_path / "kto.jsonl"
    bad.write_bytes(jsonl_bytes(TRAJ) + jsonl_bytes({k: v for k, v in TRAJ.items() if k != "tokens"}))
    rc = tr.main(train_argv(tmp_path, data=bad) + ["loss.type=mkto"])
    assert_one_line(rc, capsys, bad, 2, "missing field 'tokens'")


YAML_KINDS = FILE_KINDS + ["empty", "not_mapping"]


def write_yaml_kind(path: Path, kind: str) -> tuple[int | None, str]:
    if kind == "not_mapping":
        path.write_text("- a\n- b\n")
        return None, "expected a mapping of sections"
    if kind == "empty":
        path.write_text("# nothing\n")
        return None, "empty config"
    if kind == "non_utf8":
        path.write_bytes(YAML_OK.encode() + b"name: caf\xe9\n")
        return 3, "not valid UTF-8 (byte 0xe9 at offset 9); save it as UTF-8"
    return write_kind(path, kind, YAML_OK.encode())


@pytest.mark.parametrize("kind", YAML_KINDS)
def test_train_config_file(kind, tmp_path, capsys):
    bad = tmp_path / "exp.yaml"
    line, phrase = write_yaml_kind(bad, kind)
    (tmp_path / "pairs.jsonl").write_bytes(jsonl_bytes(PAIR))
    assert_one_line(tr.main(train_argv(tmp_path, config=bad)), capsys, bad, line, phrase)


def test_train_model_config_json(tmp_path, capsys):
    """The model folder's config.json, read for the vocabulary before the weights."""
    (tmp_path / "pairs.jsonl").write_bytes(jsonl_bytes(PAIR))
    argv = train_argv(tmp_path)
    bad = tmp_path / "model" / "config.json"
    bad.write_bytes(b'{"model_type": "gemma",\n "x": "\xff"}\n')
    assert_one_line(tr.main(argv), capsys, bad, 2, "not valid UTF-8")


# ---------------------------------------------------------------- python -m mdpo.pipeline
def pipeline_config(tmp_path, **sections) -> Path:
    (tmp_path / "model").mkdir(exist_ok=True)
    prompts = tmp_path / "prompts.jsonl"
    if not prompts.exists():
        prompts.write_bytes(b"".join(jsonl_bytes(dict(PROBLEM, id=f"p{i}")) for i in range(8)))
    body = {"model": {"name_or_path": str(tmp_path / "model")},
            "data": {"train": [str(prompts)], "heldout": 2, "prompts_per_iteration": 2},
            "eval": {"sets": ["gsm8k"]}, "metrics": {"out_dir": str(tmp_path / "runs")}}
    for key, value in sections.items():
        section, name = key.split("__")
        body.setdefault(section, {})[name] = value
    path = tmp_path / "exp.yaml"
    path.write_text(json.dumps(body))  # JSON is YAML
    return path


@pytest.mark.parametrize("kind", YAML_KINDS)
def test_pipeline_config_file(kind, tmp_path, capsys):
    bad = tmp_path / "exp.yaml"
    line, phrase = write_yaml_kind(bad, kind)
    assert_one_line(pl.main([str(bad)]), capsys, bad, line, phrase)


@pytest.mark.parametrize("kind", JSONL_KINDS)
def test_pipeline_sft_data(kind, tmp_path, capsys):
    bad = tmp_path / "sft.jsonl"
    line, phrase = write_kind(bad, kind, jsonl_bytes(TRAJ))
    config = pipeline_config(tmp_path, sft__data=str(bad))
    msg = assert_one_line(pl.main([str(config), "--stage", "sft"]), capsys, bad, line, phrase)
    if kind == "missing_key":
        assert "missing field 'prompt_id'" in msg
    assert not (tmp_path / "runs").exists()  # refused before the run folder was made


@pytest.mark.parametrize("kind", JSONL_KINDS)
def test_pipeline_train_prompts(kind, tmp_path, capsys):
    bad = tmp_path / "train.jsonl"
    line, phrase = write_kind(bad, kind, jsonl_bytes(PROBLEM))
    config = pipeline_config(tmp_path, data__train=[str(bad)])
    assert_one_line(pl.main([str(config)]), capsys, bad, line, phrase)


@pytest.mark.parametrize("kind", ["non_utf8", "gzip", "directory", "missing", "empty", "missing_key"])
def test_pipeline_eval_set(kind, tmp_path, capsys):
    """eval.sets files are read only after the SFT stage: they are checked at the start."""
    bad = tmp_path / "test.jsonl"
    line, phrase = write_kind(bad, kind, jsonl_bytes(PROBLEM))
    config = pipeline_config(tmp_path, eval__sets=[str(bad)])
    assert_one_line(pl.main([str(config)]), capsys, bad, line, phrase)
    assert not (tmp_path / "runs").exists()


def test_pipeline_damaged_state_file(tmp_path, capsys):
    config = pipeline_config(tmp_path)
    out = tmp_path / "runs" / "exp"
    out.mkdir(parents=True)
    (out / "state.json").write_bytes(b"\x1f\x8b\x08\x00junk")
    assert_one_line(pl.main([str(config)]), capsys, out / "state.json", None, "gzip-compressed data")


# ---------------------------------------------------------------- python -m mdpo.data
def data_argv(tmp_path, messages, tokenizer=None):
    if tokenizer is None:
        tokenizer = tmp_path / "tok"
        tokenizer.mkdir(exist_ok=True)
    return ["--messages", str(messages), "--tokenizer", str(tokenizer), "--out", str(tmp_path / "sft.jsonl")]


@pytest.mark.parametrize("kind", JSONL_KINDS)
def test_data_messages_file(kind, tmp_path, capsys):
    bad = tmp_path / "messages.jsonl"
    line, phrase = write_kind(bad, kind, jsonl_bytes(MESSAGES))
    msg = assert_one_line(data_mod.main(data_argv(tmp_path, bad)), capsys, bad, line, phrase)
    if kind == "missing_key":
        assert "expected an object with a 'messages' list" in msg


@pytest.mark.parametrize("kind", ["junk", "directory", "missing"])
def test_data_tokenizer(kind, tmp_path, capsys):
    messages = tmp_path / "messages.jsonl"
    messages.write_bytes(jsonl_bytes(MESSAGES))
    folder = tmp_path / "tok"
    folder.mkdir()
    bad = folder / "tokenizer.model"
    if kind == "junk":
        bad.write_bytes(random.Random(0).randbytes(300))
    elif kind == "directory":
        bad.mkdir()
    phrase = "not a SentencePiece tokenizer model" if kind == "junk" else "no SentencePiece tokenizer.model"
    assert_one_line(data_mod.main(data_argv(tmp_path, messages, folder)), capsys, bad, None, phrase)


def test_data_fetch_into_a_file(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MDPO_OFFLINE", "1")
    bad = tmp_path / "data.gz"
    bad.write_bytes(gzip.compress(b"x"))
    assert_one_line(data_mod.main(["fetch", "gsm8k", "--data-dir", str(bad)]), capsys, bad, None,
                    "is a file, not a data folder")


def test_data_message_that_is_not_an_object(tmp_path, capsys):
    bad = tmp_path / "messages.jsonl"
    bad.write_bytes(jsonl_bytes(MESSAGES) + jsonl_bytes({"messages": ["1 + 1?", {"role": "assistant"}]}))
    assert_one_line(data_mod.main(data_argv(tmp_path, bad)), capsys, bad, 2,
                    "message 0 should be an object with string 'role' and 'content'")


def test_utf16_file_is_named_as_such(tmp_path, capsys):
    bad = tmp_path / "problems.jsonl"
    bad.write_bytes((json.dumps(PROBLEM) + "\n").encode("utf-16"))
    (tmp_path / "model").mkdir()
    rc = ev.main(["--model", str(tmp_path / "model"), "--data", str(bad), "--out", str(tmp_path / "out")])
    assert_one_line(rc, capsys, bad, None, "UTF-16-encoded text, not a JSONL text file; save it as UTF-8")


def test_utf8_bom_is_accepted(tmp_path):
    from mdpo.datasets import load_problems

    path = tmp_path / "problems.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + jsonl_bytes(PROBLEM) + jsonl_bytes(PROBLEM))
    assert [p["gold"] for p in load_problems(str(path))] == ["2", "2"]
