"""Tools the model calls from its turn, and the one place that makes what it is shown back.

A tool tells the sampler how to find a call in the model's turn (`finder`) and runs it (`submit` ->
Future of a result with `.observation` and optionally `.status`); `observation` turns that result into the
text the model reads. mdpo.sampler does the rest: it pauses the row, injects the observation as a user turn
(mdpo.chat) with role TOOL, and resumes. Two implementations:

* PythonTool: a ```python block, run in the sandboxed persistent interpreter (mdpo.executor). The paper's tool.
* Calculator: a ```calc block of arithmetic expressions, evaluated in-process without eval (an example of a
  second tool, and a cheap one for tests).

A new tool is one class here: a `fence` (or its own `finder`), `submit`, and optionally `release`.

What the model is shown (`observation_text`, every tool, rollouts and SFT data alike):
* ANSI escape sequences (colour, cursor, titles) and control characters other than newline and tab are
  removed, as the paper's driver strips ANSI codes: they are terminal markup, and NUL or a carriage return
  mean nothing to a tokenizer;
* surrounding whitespace is stripped (the paper's `.strip()`);
* nothing left: the paper's placeholder, EMPTY_OUTPUT ("Result is not defined"), so an output block is never
  empty. The text is a parameter (`empty_output=`) of PythonTool and mdpo.data.trajectory_from_turns; keep
  the two equal, or SFT data and rollouts show the model different things.
"""

from __future__ import annotations

import abc
import ast
import concurrent.futures as cf
import operator
import re
from dataclasses import dataclass

from mdpo.executor import ExecutorPool

EMPTY_OUTPUT = "Result is not defined"  # the paper's text for a cell that printed nothing (paper.md 1.4)
FENCE = "```"  # closes every fenced call; the Markdown code fence

# Escape sequences: OSC (ESC ] ... BEL or ESC \\, within a line: titles, hyperlinks), CSI (ESC [ ... final
# byte: colours, cursor) and the short forms (ESC ( B, ESC =, ...); a truncated one goes too. The C1 form of
# CSI (U+009B) goes with the control characters below; its parameters are left as harmless text.
_ANSI = re.compile(r"\x1b\][^\x07\x1b\n]*(?:\x07|\x1b\\)?|\x1b\[[0-?]*[ -/]*[@-~]?|\x1b[ -/]*[0-~]?")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # Unicode category Cc, except \t and \n


def clean_observation(text: str) -> str:
    """`text` without ANSI escape sequences and control characters other than newline and tab."""
    text = _ANSI.sub("", text)
    # Lone surrogates (print("\ud800")) cannot be encoded as UTF-8 and would break the tokenizer.
    return _CONTROL.sub("", text).encode("utf-8", "replace").decode("utf-8")


def observation_text(raw: str, empty_output: str = EMPTY_OUTPUT) -> str:
    """What the model is shown for a tool's raw output: cleaned, stripped, `empty_output` if nothing is left."""
    return clean_observation(raw).strip() or empty_output


@dataclass
class ToolResult:
    """A tool's answer: its raw output and a status (the executor's statuses: ok, error, timeout, ...)."""

    observation: str
    status: str = "ok"


STOP = object()  # FenceFinder.feed: the model wrote the stop fence (```output) outside any call


class FenceFinder:
    """Finds a call `{opener}...```` in a model turn's growing text, incrementally.

    `feed(text)` is called after every sampled token with the turn's text so far and returns the call's text
    once its closing fence is written, STOP when the model writes `stop` (outside a call), else None. Each
    feed is one str.find of "```" over the newly decoded characters (plus two held back, as a fence may
    straddle tokens): no more work per token than the fixed-string scan it replaces.
    """

    __slots__ = ("opener", "stop", "start", "scan", "longest", "waiting")

    def __init__(self, opener: str, stop: str | None = None):
        self.opener, self.stop = opener, stop
        self.start = -1  # where the open call's text begins, -1 while no call is open
        self.scan = 0  # where the next search starts
        self.longest = max(len(opener), len(stop or ""))
        # True while a fence's first characters are written but not what it opens ("```py"): the next
        # tokens decide, whatever characters they hold. Otherwise only a token with a backtick can change
        # what feed returns, so a caller may feed only after those (the sampler does).
        self.waiting = False

    def feed(self, text: str):
        self.waiting = False
        if self.start < 0:
            i = text.find(FENCE, self.scan)
            while i >= 0:
                if text.startswith(self.opener, i):
                    self.start = self.scan = i + len(self.opener)
                    break
                if self.stop is not None and text.startswith(self.stop, i):
                    return STOP
                tail = text[i:]
                if len(tail) < self.longest and (self.opener.startswith(tail) or
                                                 (self.stop is not None and self.stop.startswith(tail))):
                    self.scan = i  # "```py": wait for the rest of the fence
                    self.waiting = True
                    return None
                i = text.find(FENCE, i + 1)  # another language's fence (```text): not a call
            else:
                self.scan = max(self.scan, len(text) - len(FENCE) + 1)
                return None
        j = text.find(FENCE, self.scan)
        if j < 0:
            self.scan = max(self.start, len(text) - len(FENCE) + 1)
            return None
        return text[self.start:j]

    def open_call(self, text: str) -> str | None:
        """The text of a call still open at the end of the turn (the model ended it with <end_of_turn>)."""
        return text[self.start:] if self.start >= 0 else None


class Tool(abc.ABC):
    """Base of the tools: a fenced call, the shared observation rules. Subclasses set `fence` and `submit`."""

    fence: str = ""  # the text that opens a call, e.g. "```python"; the call ends at the next "```"
    empty_output: str = EMPTY_OUTPUT

    def finder(self, stop: str | None = None) -> FenceFinder:
        """A fresh call finder for one model turn (`stop`: the chat format's output fence)."""
        return FenceFinder(self.fence, stop)

    @abc.abstractmethod
    def submit(self, key, call: str) -> cf.Future:
        """Run a call of trajectory `key`; a Future of a result with `.observation` (and `.status`)."""

    def observation(self, result) -> str:
        """The text the model is shown for a result."""
        return observation_text(result.observation, self.empty_output)

    def release(self, key) -> None:
        """Trajectory `key` is finished: drop its state."""

    def close(self) -> None:
        """Release what the tool holds (processes, threads)."""


class PythonTool(Tool):
    """A ```python block, run in trajectory `key`'s persistent sandboxed interpreter (mdpo.executor).

    pool: an ExecutorPool (or any object with submit(key, code) -> Future and release(key)); None: one of its
    own, built from `limits` (e.g. timeout=20.0, max_workers=8) and shut down by close().
    empty_output: shown for a cell that prints nothing (None: EMPTY_OUTPUT).
    """

    fence = "```python"

    def __init__(self, pool=None, empty_output: str | None = None, **limits):
        self.pool = pool if pool is not None else ExecutorPool(**limits)
        self._own = pool is None
        self.empty_output = EMPTY_OUTPUT if empty_output is None else empty_output

    def submit(self, key, call: str) -> cf.Future:
        return self.pool.submit(key, call)

    def release(self, key) -> None:
        self.pool.release(key)

    def close(self) -> None:
        if self._own:
            self.pool.shutdown()


_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_MAX_BITS = 10_000  # integers up to ~3000 digits: str() of them stays under Python's 4300-digit limit


def calculate(expr: str):
    """The value of one arithmetic expression (numbers, + - * / // % **, parentheses); raises ValueError."""
    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](ev(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            a, b = ev(node.left), ev(node.right)
            # Bound the size before computing: 9**9**9 would take the process with it.
            if isinstance(node.op, ast.Pow) and isinstance(a, int) and isinstance(b, int) and \
                    abs(b) * max(abs(a).bit_length(), 1) > _MAX_BITS:
                raise ValueError("result too large")
            if isinstance(node.op, ast.Mult) and isinstance(a, int) and isinstance(b, int) and \
                    abs(a).bit_length() + abs(b).bit_length() > _MAX_BITS:
                raise ValueError("result too large")
            return _BINARY[type(node.op)](a, b)
        raise ValueError(f"not arithmetic: {ast.unparse(node)}")

    if len(expr) > 1000:
        raise ValueError("expression too long")
    return ev(ast.parse(expr.strip(), mode="eval"))


class Calculator(Tool):
    """A ```calc block: one arithmetic expression per line; each line's value (or error) on its own line."""

    fence = "```calc"

    def __init__(self, empty_output: str | None = None):
        self.empty_output = EMPTY_OUTPUT if empty_output is None else empty_output

    def submit(self, key, call: str) -> cf.Future:
        lines, status = [], "ok"
        for line in call.splitlines():
            if not line.strip():
                continue
            try:
                lines.append(repr(calculate(line)))
            except (ValueError, SyntaxError, ArithmeticError, RecursionError) as e:
                lines.append(f"{type(e).__name__}: {e}")
                status = "error"
        fut: cf.Future = cf.Future()
        fut.set_result(ToolResult("\n".join(lines), status))  # computed now: no thread, no waiting
        return fut
