"""python -m mdpo.eval: metrics against hand counts, resume, and clear errors."""

import json

import pytest

from mdpo import eval as ev
from mdpo.model import ModelConfig, build_model
from mdpo.tokenizer import Tokenizer
from mdpo.trajectory import Role, Trajectory, read_trajectories
from mdpo.weights import save_pretrained

DATA = [
    {"question": "What is 2+3?", "answer": "2+3=<<2+3=5>>5\n#### 5"},
    {"question": "What is 1,000 + 234?", "answer": "#### 1,234"},
    {"problem": "Compute $\\frac{1}{2}+\\frac{1}{4}$.", "solution": "It is $\\boxed{\\frac34}$.", "level": "Level 2",
     "type": "Algebra"},
]


@pytest.fixture(scope="module")
def tiny_dir(gemma3_dir, tmp_path_factory):
    tok = Tokenizer.from_pretrained(gemma3_dir)
    model = build_model(ModelConfig.from_name("tiny-gemma3", vocab_size=262144), seed=0)
    d = tmp_path_factory.mktemp("tiny") / "model"
    save_pretrained(model, d, tokenizer=tok)
    return d


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# Problem loading (names, files, downloads) moved to mdpo.datasets: tests/test_datasets.py.


def traj(pid, sid, correct, answer, statuses=(), turns=1):
    n = 4 + turns
    return Trajectory(pid, sid, list(range(n)), [0] * 4 + [Role.MODEL] * turns, [0] * 4 + list(range(1, turns + 1)),
                      answer=answer, correct=correct, meta={"tool_status": list(statuses)})


def test_metrics_against_hand_counts():
    probs = [{"id": "a", "gold": "5", "level": "Level 1", "subject": "Algebra"},
             {"id": "b", "gold": "7", "level": "Level 3", "subject": "Algebra"}]
    ts = [traj("a", 0, True, "5", ["ok"], 2), traj("a", 1, False, "4", ["error", "ok"], 3),
          traj("a", 2, True, "5.0", [], 1),
          traj("b", 0, False, "6", ["timeout"], 2), traj("b", 1, False, "6", [], 1), traj("b", 2, True, "7", [], 1)]
    m = ev.compute_metrics(ts, probs, 3)
    assert m["pass@1"] == pytest.approx((2 / 3 + 1 / 3) / 2)
    assert m["pass@3"] == 1.0
    assert m["maj@3"] == pytest.approx(0.5)  # a: 5 (and 5.0) wins; b: 6 wins, which is wrong
    assert m["by_level"]["Level 1"]["pass@1"] == pytest.approx(2 / 3)
    assert m["by_subject"]["Algebra"]["problems"] == 2
    assert m["tools"]["calls_per_trajectory"] == pytest.approx(4 / 6)
    assert m["tools"]["error_rate"] == pytest.approx(1 / 4) and m["tools"]["timeout_rate"] == pytest.approx(1 / 4)
    assert m["tools"]["mean_turns"] == pytest.approx(10 / 6)


def test_end_to_end_and_resume(tiny_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", DATA)
    out = tmp_path / "out"
    args = ["--model", str(tiny_dir), "--data", str(data), "--out", str(out), "--n", "2", "--max-new-tokens", "6",
            "--batch-size", "3", "--temperature", "1.0"]
    assert ev.main(args) == 0
    ts = list(read_trajectories(out / "trajectories.jsonl"))
    assert sorted((t.prompt_id, t.sample_id) for t in ts) == [(i, s) for i in ("0", "1", "2") for s in (0, 1)]
    m = json.loads((out / "metrics.json").read_text())
    assert m["samples"] == 6 and m["pass@1"] == sum(bool(t.correct) for t in ts) / 6
    # Simulate a kill: drop two finished samples and tear the last line; the rerun redoes exactly those.
    lines = (out / "trajectories.jsonl").read_text().splitlines(keepends=True)
    kept = lines[:3] + [lines[3][:40]]
    (out / "trajectories.jsonl").write_text("".join(kept))
    assert ev.main(args) == 0
    again = list(read_trajectories(out / "trajectories.jsonl"))
    assert sorted((t.prompt_id, t.sample_id) for t in again) == sorted((t.prompt_id, t.sample_id) for t in ts)
    assert [t.to_json() for t in again[:3]] == [line.rstrip("\n") for line in lines[:3]]
    # A finished run reruns as a no-op.
    assert ev.main(args) == 0
    assert len(list(read_trajectories(out / "trajectories.jsonl"))) == 6


def test_kv_attention_flex_gives_the_default_trajectories(tiny_dir, tmp_path, monkeypatch):
    """--kv-attention flex (paged blocks of 4, FlexAttention over live blocks) reaches the Sampler and samples the
    same trajectories as the default dense cache (temperature 1, log-probs to 1e-5)."""
    import mdpo.paged as paged
    calls = []
    flex = paged.flex_decode
    monkeypatch.setattr(paged, "flex_decode", lambda *a: calls.append(1) or flex(*a))
    data = write_jsonl(tmp_path / "d.jsonl", DATA)
    base = ["--model", str(tiny_dir), "--data", str(data), "--n", "2", "--max-new-tokens", "6", "--batch-size", "3",
            "--temperature", "1.0"]
    assert ev.main(base + ["--out", str(tmp_path / "dense")]) == 0
    assert not calls
    assert ev.main(base + ["--out", str(tmp_path / "flex"), "--kv-attention", "flex", "--kv-block-size", "4"]) == 0
    assert calls
    a, b = ({(t.prompt_id, t.sample_id): t for t in read_trajectories(tmp_path / d / "trajectories.jsonl")}
            for d in ("dense", "flex"))
    assert a.keys() == b.keys() and all(a[k].tokens == b[k].tokens for k in a)
    assert max(abs(x - y) for k in a for x, y in zip(a[k].logprobs, b[k].logprobs)) < 1e-5


def test_bad_flags_exit_2(tiny_dir, tmp_path, capsys):
    assert ev.main(["--model", str(tiny_dir), "--data", str(tmp_path / "none.jsonl"), "--out", str(tmp_path)]) == 2
    assert "none.jsonl: data file not found" in capsys.readouterr().err
    assert ev.main(["--model", str(tmp_path / "nomodel"), "--data", "gsm8k", "--data-dir", "/nonexistent",
                    "--out", str(tmp_path / "o")]) == 2
    assert ev.main(["--model", str(tiny_dir), "--n", "0", "--out", str(tmp_path / "o")]) == 2
    assert "--n must be >= 1" in capsys.readouterr().err


def test_final_turn_after_the_call_limit_has_no_answer(gemma3_dir):
    tok = Tokenizer.from_pretrained(gemma3_dir)
    from mdpo.sampler import MAX_CALLS_TEXT
    code = tok.encode("```python\nprint(42)\n```")
    tool = tok.encode("<start_of_turn>user\n```output\n42\n```<end_of_turn>\n")
    tail = tok.encode("<start_of_turn>model\n" + MAX_CALLS_TEXT)
    t = Trajectory("p", 0, [2] + code + tool + tail, [0] + [Role.MODEL] * len(code) + [Role.TOOL] * len(tool)
                   + [Role.TEMPLATE] * len(tail), [0] + [1] * (len(code) + len(tool)) + [2] * len(tail))
    text = ev.final_turn_text(t, tok)
    assert text.strip().endswith("Reach max function call limit.")
    from mdpo.grader import extract_answer
    assert extract_answer(text) is None  # not the 42 printed by the earlier turn's code
    done = Trajectory("q", 0, [2] + code + tok.encode("So \\boxed{42}.") + [tok.end_of_turn_id],
                      [0] + [Role.MODEL] * (len(code) + len(tok.encode("So \\boxed{42}.")) + 1),
                      [0] + [1] * (len(code) + len(tok.encode("So \\boxed{42}.")) + 1))
    assert extract_answer(ev.final_turn_text(done, tok)) == "42"


def test_summary_prints_each_metric_once(tiny_dir, tmp_path, capsys, monkeypatch):
    import mdpo.executor as ex

    monkeypatch.setattr(ex, "_ANNOUNCED", [])  # as in a fresh process
    monkeypatch.setenv("MDPO_SANDBOX", "rlimits")  # the line names the isolation the workers really get
    data = write_jsonl(tmp_path / "d.jsonl", DATA)
    out = tmp_path / "out"
    assert ev.main(["--model", str(tiny_dir), "--data", str(data), "--out", str(out), "--max-new-tokens", "4"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    captured = capsys.readouterr()
    lines = [ln.split() for ln in captured.out.splitlines() if ln.strip().startswith("pass@")]
    assert lines == [["pass@1", f"{100 * m['pass@1']:.1f}%"]]  # n = 1: pass@1 and pass@n are one metric
    said = [ln for ln in captured.err.splitlines() if "executor sandbox:" in ln]
    assert said == [f"executor sandbox: {ex.ISOLATION['rlimits']}"]


def test_a_trajectory_that_wrote_the_tool_turn_itself_is_wrong(gemma3_dir):
    """finish_reason start_of_turn / output_fence: the model invented the interpreter's turn; its answer, even a
    right one, does not count (the same trajectory ending at <end_of_turn> does)."""
    tok = Tokenizer.from_pretrained(gemma3_dir)
    ids = tok.encode("The answer is $\\boxed{5}$.")
    for reason, correct in (("end_of_turn", True), ("start_of_turn", False), ("output_fence", False)):
        t = Trajectory("p", 0, [2] + ids, [0] + [Role.MODEL] * len(ids), [0] + [1] * len(ids), finish_reason=reason)
        ev.grade_trajectory(t, "5", tok)
        assert t.answer == "5" and t.correct is correct, reason
