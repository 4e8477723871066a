"""Tools: what the model is shown of a tool's output, finding calls in a turn, and a second tool (a calculator)
run through the real Sampler."""

from __future__ import annotations

import time

import pytest

from mdpo.chat import GEMMA
from mdpo.executor import ExecutorPool, run_cells
from mdpo.model import ModelConfig, build_model
from mdpo.sampler import Request, Sampler, SamplingParams
from mdpo.tokenizer import Tokenizer
from mdpo.tools import (EMPTY_OUTPUT, STOP, Calculator, FenceFinder, PythonTool, ToolResult, calculate,
                        observation_text)
from mdpo.trajectory import Role


@pytest.fixture(scope="module")
def tok(gemma3_dir):
    return Tokenizer.from_pretrained(gemma3_dir)


def test_observations_are_cleaned_as_the_paper_does():
    """ANSI escapes and control characters other than newline and tab never reach the model (the executor
    returns them raw: a colour code and a NUL byte printed by a cell)."""
    cells = [r'print("\x1b[31mred\x1b[0m\x00!")',
             r'import sys; sys.stdout.write("a\x1b]0;title\x07b\rc\x08d\x7f\x1b(B\x9b1m\tt\ne")']
    raw = [r.observation for r in run_cells(cells, timeout=10)]
    assert "\x1b" in raw[0] and "\x00" in raw[0]  # what the interpreter printed
    shown = [PythonTool(pool=object()).observation(ToolResult(r)) for r in raw]
    assert shown[0] == "red!"
    assert shown[1] == "abcd1m\tt\ne27"  # 27: the value of the write() call, shown as in a notebook
    for text in shown:
        assert not any(ord(c) < 32 and c not in "\t\n" or 0x7f <= ord(c) <= 0x9f for c in text)
    assert observation_text("x\ud800y") == "x?y"  # a lone surrogate cannot be tokenized


def test_empty_output_is_the_papers_placeholder():
    (r,) = run_cells(["x = 1"], timeout=10)
    assert r.status == "ok" and r.observation == ""
    assert EMPTY_OUTPUT == "Result is not defined"
    assert PythonTool(pool=object()).observation(r) == EMPTY_OUTPUT
    assert PythonTool(pool=object(), empty_output="(no output)").observation(r) == "(no output)"
    assert observation_text(" \x1b[0m\n ") == EMPTY_OUTPUT  # nothing left once cleaned
    assert observation_text("  5\n") == "5"


def feed_all(finder, text, step):
    """Feed `text` to a finder in pieces of `step` characters, as a model writes it; the first answer."""
    for end in range(step, len(text) + step, step):
        got = finder.feed(text[:end])
        if got is not None:
            return got, end
    return None, len(text)


@pytest.mark.parametrize("step", [1, 2, 3, 7])
def test_fence_finder_finds_calls_however_the_text_is_split(step):
    new = lambda: FenceFinder("```python", "```output")  # noqa: E731
    code, _ = feed_all(new(), "Let me see.\n```python\nx = 2\nprint(x)\n```\nmore", step)
    assert code == "\nx = 2\nprint(x)\n"
    # Another language's block is not a call; the python block after it is.
    code, _ = feed_all(new(), "```text\nhello\n```\nthen\n````python\ny = 1\n```", step)
    assert code == "\ny = 1\n"
    # A made-up output block outside any call: STOP, as soon as its fence is complete.
    got, end = feed_all(new(), "The result:\n```output\n42\n```", step)
    assert got is STOP and end >= len("The result:\n```output") and end < len("The result:\n```output") + step
    # Inside a call, "```output" is just the call's closing fence.
    code, _ = feed_all(new(), "```python\nprint(1)\n```output", step)
    assert code == "\nprint(1)\n"
    f = new()
    assert feed_all(f, "```python\nprint(1)\n", step)[0] is None
    assert f.open_call("```python\nprint(1)\n") == "\nprint(1)\n"
    assert FenceFinder("```python").open_call("no call") is None


def test_fence_finder_scans_only_new_text():
    """Per token the finder looks at the new characters (plus two held back): its cost does not grow with the
    length of the turn, so the sampler's per-token work stays what the old fixed-string scan cost."""
    f = FenceFinder("```python", "```output")
    text = ""
    for i in range(2000):
        text += "word "
        assert f.feed(text) is None
        assert f.scan >= len(text) - 2
    text += "```python\nx=1\n"
    f.feed(text)
    assert f.start == len(text) - len("\nx=1\n") and f.scan >= len(text) - 2


def test_calculator_evaluates_arithmetic_and_nothing_else():
    assert calculate("2*(3+4)") == 14 and calculate("-7//2") == -4 and calculate("2**0.5") == 2 ** 0.5
    assert calculate("10 % 4 + 1/4") == 2.25
    t0 = time.monotonic()
    for bad in ["__import__('os').system('true')", "x + 1", "(1).__class__", "[1, 2]", "9**9**9",
                "2**100000", "'a' * 3"]:
        with pytest.raises(ValueError):
            calculate(bad)
    assert time.monotonic() - t0 < 1.0  # refused before computing, not after
    r = Calculator().submit(("p", 0), "1 + 1\n\n1/0\n3 *").result()
    assert r.status == "error"
    assert r.observation.splitlines()[:2] == ["2", "ZeroDivisionError: division by zero"]
    assert r.observation.splitlines()[2].startswith("SyntaxError")


def test_calculator_through_the_real_sampler(tok):
    """A second tool plugs into the sampler unchanged: its fence pauses the turn, its answer comes back as the
    TOOL turn of the chat format, token-exact, and the next model turn resumes after it."""
    model = build_model(ModelConfig.from_name("tiny-gemma3", vocab_size=262144), seed=0).eval()
    turn1 = tok.encode("Compute it.\n```calc\n2*(3+4)\n```")
    turn2 = tok.encode("The answer is \\boxed{14}.") + [tok.end_of_turn_id]
    script = iter(turn1 + turn2)
    prompt = tok.encode(tok.render_chat([{"role": "user", "content": "What is 2*(3+4)?"}]))
    sampler = Sampler(model, tok, batch_size=1, max_length=256, tool=Calculator(),
                      choose=lambda pid, sid, generated: next(script))
    (t,) = sampler.generate([Request("q", prompt)], SamplingParams(temperature=0.0))
    tool_turn = GEMMA.tool_turn_ids(tok, "14")
    close, header = tok.encode(GEMMA.close), tok.encode(GEMMA.open("model"))
    assert t.tokens == prompt + turn1 + close + tool_turn + header + turn2
    assert t.roles == ([Role.PROMPT] * len(prompt) + [Role.MODEL] * len(turn1) + [Role.TEMPLATE] * len(close)
                       + [Role.TOOL] * len(tool_turn) + [Role.TEMPLATE] * len(header) + [Role.MODEL] * len(turn2))
    assert t.finish_reason == "end_of_turn" and t.meta["tool_status"] == ["ok"]
    assert sum(t.loss_mask("model")) == len(turn1) + len(turn2)  # masks come from the recorded roles


def test_python_tool_is_the_executor_in_the_sampler(tok):
    """The interpreter is one Tool: a cell that prints nothing shows the placeholder in the rollout."""
    model = build_model(ModelConfig.from_name("tiny-gemma3", vocab_size=262144), seed=0).eval()
    turn1 = tok.encode("```python\nx = 6 * 7\n```")
    turn2 = tok.encode("```python\nprint(x)\n```")
    turn3 = tok.encode("\\boxed{42}") + [tok.end_of_turn_id]
    script = iter(turn1 + turn2 + turn3)
    with ExecutorPool(max_workers=2, timeout=10) as pool:
        sampler = Sampler(model, tok, batch_size=1, max_length=256, tool=PythonTool(pool),
                          choose=lambda pid, sid, generated: next(script))
        (t,) = sampler.generate([Request("q", tok.encode("<bos>Q"))], SamplingParams(temperature=0.0))
    tool_text = [tok.decode([x for x, r, k in zip(t.tokens, t.roles, t.turns) if r == Role.TOOL and k == turn])
                 for turn in (1, 2)]
    assert tool_text == [GEMMA.tool_turn_text(EMPTY_OUTPUT), GEMMA.tool_turn_text("42")]
    assert t.meta["tool_status"] == ["ok", "ok"]
    with pytest.raises(ValueError, match="not both"):
        Sampler(model, tok, batch_size=1, max_length=32, tool=Calculator(), executor=object())


def test_a_failed_last_cell_reaches_the_filter_through_the_real_executor(tok, tmp_path):
    """The executor's own status, not a fake's, travels cell -> sampler -> meta["tool_status"] -> rollout file
    -> filters: a right answer typed after a cell that raised (or crashed the interpreter) is dropped by
    correct_after_error, one after a cell that was fixed is kept, and so is a wrong answer after an error."""
    from mdpo.config import FilterConfig
    from mdpo.data import apply_filters
    from mdpo.eval import grade_trajectory
    from mdpo.trajectory import read_trajectories, write_trajectories

    def script(*turns):
        ids = []
        for text in turns:
            ids += tok.encode(text)
        return iter(ids + [tok.end_of_turn_id])

    scripts = {  # prompt id -> the model's tokens, all turns; every cell is a separate tool call
        "raised": script("```python\nx = 6 * 7\n```", "```python\nprint(x / 0)\n```", "\\boxed{42}"),
        "fixed": script("```python\nprint(y)\n```", "```python\ny = 42\nprint(y)\n```", "\\boxed{42}"),
        "crashed": script("```python\nimport os\nos._exit(3)\n```", "\\boxed{42}"),
        "wrong": script("```python\nx = 6 * 7\n```", "```python\nprint(x / 0)\n```", "\\boxed{41}"),
    }
    # One layer: the model's outputs are all forced, only the vocabulary must be the tokenizer's.
    cfg = ModelConfig.from_name("tiny-gemma", vocab_size=262144, num_layers=1, layer_types=None)
    model = build_model(cfg, seed=0).eval()
    with ExecutorPool(max_workers=2, timeout=10) as pool:
        sampler = Sampler(model, tok, batch_size=2, max_length=256, tool=PythonTool(pool),
                          choose=lambda pid, sid, generated: next(scripts[pid]))
        ts = list(sampler.generate([Request(pid, tok.encode("<bos>Q")) for pid in scripts],
                                   SamplingParams(temperature=0.0)))
    for t in ts:
        grade_trajectory(t, "42", tok)
    by_id = {t.prompt_id: t for t in ts}
    assert {pid: (t.meta["tool_status"], t.correct) for pid, t in by_id.items()} == {
        "raised": (["ok", "error"], True), "fixed": (["error", "ok"], True),
        "crashed": (["crashed"], True), "wrong": (["ok", "error"], False)}
    last_tool = [tok.decode([x for x, r, k in zip(t.tokens, t.roles, t.turns) if r == Role.TOOL and k == 2])
                 for t in (by_id["raised"], by_id["wrong"])]
    assert last_tool == [GEMMA.tool_turn_text("ZeroDivisionError: division by zero")] * 2  # what the model saw
    write_trajectories(tmp_path / "rollout.jsonl", ts)  # the pipeline filters what it reads back
    back = sorted(read_trajectories(tmp_path / "rollout.jsonl"), key=lambda t: t.prompt_id)
    kept, counts = apply_filters(back, FilterConfig(), max_length=256)
    assert [t.prompt_id for t in kept] == ["fixed", "wrong"]
    assert counts == {"input": 4, "no_tool_call": 0, "long_answer": 0, "overlong": 0, "correct_after_error": 2,
                      "duplicate_first_turn": 0, "kept": 2}
