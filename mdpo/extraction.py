"""Final-answer extraction from model turns and dataset golds (used by mdpo.grader, the M-DPO / M-KTO reward).

ToRA's order, extended to the forms real outputs use: the last `\\boxed{}` (adjacent boxes that only
separators divide are one answer: "\\boxed{1} and \\boxed{-2}"); a "The answer is" / "Final Answer:" phrase
(which wins when it comes after the last box); the whole text when it is itself an answer ("x = 3",
"$\\frac{1}{2}$"); the last ```output block; else the last math span or number, whichever ends later.
Doubly escaped text (`\\\\frac` from a JSON dump) is undone first. Nothing here raises on junk input, and every
regex runs on a bounded window or anchored, so a 100k-character trajectory costs milliseconds.
"""

from __future__ import annotations

import re

__all__ = ["LIMIT_MESSAGE", "extract_answer", "gold_gsm8k", "gold_math"]


# ----------------------------------------------------------------------------------------------------
# Brackets (also used by mdpo.latex and mdpo.grader)
# ----------------------------------------------------------------------------------------------------

def _match_brace(text: str, start: int) -> int | None:
    """Index of the `}` closing the `{` at `start`, or None when unbalanced. Escapes (`\\{`) don't count."""
    depth = 0
    i, n = start, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def _matching_close(s: str, start: int) -> int | None:
    depth = 0
    i = start
    while i < len(s):
        c = s[i]
        if c == "\\" and i + 1 < len(s):
            if s[i + 1] == "{":
                depth += 1
            elif s[i + 1] == "}":
                depth -= 1
                if depth == 0:
                    return i
            i += 2
            continue
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def _split_top(s: str, sep: str = ",") -> list[str]:
    """Split at `sep` outside (), [], {}, \\{ \\} (bracket kinds are not matched: intervals are [a,b))."""
    parts, depth, cur, i, n = [], 0, [], 0, len(s)
    while i < n:
        c = s[i]
        if depth == 0 and s.startswith(sep, i) and not (sep[0] == "\\" and s[i + len(sep):i + len(sep) + 1].isalpha()):
            parts.append("".join(cur))
            cur = []
            i += len(sep)
            continue
        if c == "\\" and i + 1 < n:
            if s[i + 1] in "{}":
                depth += 1 if s[i + 1] == "{" else -1
            cur.append(s[i:i + 2])
            i += 2
            continue
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        cur.append(c)
        i += 1
    parts.append("".join(cur))
    return parts


# ----------------------------------------------------------------------------------------------------
# Final answers
# ----------------------------------------------------------------------------------------------------

# The paper's rollout appends this to a trajectory that used up its tool calls without answering.
LIMIT_MESSAGE = "Reach max function call limit."


# A doubly escaped command (`\\frac` in a JSON-escaped or Python-repr'd output) is undone when the text shows
# it for a command that is never a row break followed by a word: then every `\\` in the text is one `\`.
_DOUBLED_RE = re.compile(r"(?<!\\)\\\\(?:d?frac|tfrac|sqrt|left|right|le|ge|leq|geq|neq|infty|pi|cdot|times|text|"
                         r"boxed|begin|end|pm|in|cup|approx|mathrm|mathbf|circ|ln|log|sin|cos|tan)(?![a-zA-Z])")


def _undouble(text: str) -> str:
    """`\\\\frac{1}{2}` -> `\\frac{1}{2}` when the whole text is doubly escaped (matrix row breaks become `\\\\`)."""
    if "\\\\" in text and _DOUBLED_RE.search(text):
        # a matrix row break written `\\` in a doubly escaped text is `\\\\`: halve every run of backslashes
        return re.sub(r"\\+", lambda m: "\\" * max(1, len(m.group(0)) // 2), text)
    return text


# `\boxed` must be a whole command (`\boxedx` is another macro). ToRA matches the bare word "boxed", which
# made it read "a lego boxed set with 500 pieces" (GSM8K test 146) as an answer; we require the backslash.
_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![a-zA-Z])")


def _boxes(text: str) -> list[tuple[int, int, str | None]]:
    """(start, end, content) of every `\\boxed{...}` / `\\boxed x` / `\\fbox{...}`; content None when the box
    is malformed (unbalanced, e.g. a truncated turn: it then runs to the end of the text)."""
    out = []
    n = len(text)
    for m in _BOX_RE.finditer(text):
        if out and m.start() < out[-1][1]:
            continue  # a box inside a box
        j = m.end()
        while j < n and text[j] in " \t":
            j += 1
        if j < n and text[j] == "{":
            end = _match_brace(text, j)
            if end is None:
                out.append((m.start(), n, None))
                break
            out.append((m.start(), end + 1, text[j + 1:end].strip() or None))
            continue
        # `\boxed 5`: one TeX token; we take the whitespace/`$`-delimited run, as ToRA splits on `$`.
        t = re.match(r"[^\s$]+", text[j:])
        tok = t.group(0).rstrip(".,;") if t else ""
        out.append((m.start(), j + (len(t.group(0)) if t else 0), tok or None))
    return out


# What may stand between two boxes that together give one answer: "\boxed{1} and \boxed{-2}", "$\boxed{3}$,
# $\boxed{5}$". Any other word ("wait, correcting: \boxed{7}") keeps only the last box.
_BOX_GAP_RE = re.compile(r"(?:\s|[$,;.]|\\[()\[\]]|\\\\|\\q?quad|\\text\{\s*(?:and|or)\s*\}|\band\b|\bor\b"
                         r"|(?<![A-Za-z])[A-Za-z](?:_\{?\w+\}?)?\s*=)*")  # "x = \boxed{1}, y = \boxed{2}"


def _last_box(text: str, join: bool = False) -> tuple[str | None, bool]:
    """(content, found) for the last `\\boxed{...}` / `\\boxed x` / `\\fbox{...}` in `text`.

    found=True with content None means the last box is malformed (unbalanced, e.g. a truncated turn);
    we do not fall back to an earlier box, since the model's final answer is unreadable. `join=True` also
    takes the boxes just before it that only separators divide from it ("\\boxed{1} and \\boxed{-2}" is
    "1, -2"), the way models box each of several answers.
    """
    boxes = _boxes(text)
    if not boxes:
        return None, False
    start, _, content = boxes[-1]
    if content is None or not join:
        return content, True
    parts = [content]
    for k in range(len(boxes) - 2, -1, -1):
        s0, e0, c0 = boxes[k]
        if c0 is None or not _BOX_GAP_RE.fullmatch(text[e0:start]) or c0 in parts:
            break
        parts.insert(0, c0)
        start = s0
    return ", ".join(parts), True


def _last_box_end(text: str) -> int:
    boxes = _boxes(text)
    return boxes[-1][1] if boxes else -1


def _clean(ans: str | None) -> str | None:
    if ans is None:
        return None
    ans = ans.strip()
    ans = re.sub(r"^[:\s]+", "", ans)
    ans = re.sub(r"[\s.$/]+$", "", ans)  # ToRA strips a trailing '.', '/' and we also drop '$'
    ans = re.sub(r"^\$+", "", ans).strip()
    ans = re.sub(r'^\\?"(.*)\\?"$', r"\1", ans).strip()  # a quoted answer: "\"$12$ and $13$\""
    ans = re.sub(r"(?<!\\)\\$", "", ans).strip()  # "185\": a stray trailing backslash
    return ans or None


# "The answer is 5", "Final Answer: The final answer is $28\%$", "Answer: 7", "answer $9$". A bare "answer"
# counts only when math delimiters follow it at once ("to answer the question" is prose).
_ANSWER_IS_RE = re.compile(r"answer(?:\s+is\b|\s*:|(?=\s*(?:\$|\\\(|\\\[)))", re.IGNORECASE)
# Only a "final answer" statement overrides an earlier box (MATH solutions box the answer, then write "we
# can check our answer ... so our answer is correct" or "a calculator gives the answer $33.98$").
_FINAL_RE = re.compile(r"final\s+$", re.IGNORECASE)
_NOT_AN_ANSWER_RE = re.compile(r"(?:correct|incorrect|wrong|right|not|as follows|the same|that|this|below|above)\b",
                               re.IGNORECASE)
_OUTPUT_RE = re.compile(r"```output[ \t]*\n?(.*?)(?:```|$)", re.DOTALL)


# Thousands groups are only joined when well formed ("1,080"); "3, 5, 7" stays three numbers; "2/3" is one.
_LAST_NUM_RE = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?(?![\d,])|-?\d+/\d+(?![\d/])|-?\d*\.?\d+")


# $...$, $$...$$, \(...\), \[...\]: an inline $ span never crosses a blank line.
_MATH_SPAN_RE = re.compile(r"\$\$(.+?)\$\$|(?<!\\)\$((?:\\\$|[^$\n]|\n(?!\s*\n))+?)(?<!\\)\$"
                           r"|\\\((.+?)\\\)|\\\[(.+?)\\\]", re.DOTALL)


# Words that may appear in an answer without making it prose ("2 and 3", "\sin x", "18 dollars").
_ANSWER_WORDS = {"and", "or", "sin", "cos", "tan", "cot", "sec", "csc", "log", "ln", "exp", "sqrt", "pi", "inf",
                 "infinity", "mod", "pmod", "frac", "dfrac", "text", "mathrm", "no", "yes", "odd", "even"}


def _answer_is_tail(rest: str) -> str | None:
    rest = rest.lstrip(" \t:")
    line = rest.split("\n", 1)[0].strip()
    if not line or _NOT_AN_ANSWER_RE.match(line):
        return None
    m = _MATH_SPAN_RE.match(line)
    if m:
        return _clean(next(g for g in m.groups() if g is not None))
    m = re.match(r"\$\$(.+?)\$\$|\\\[(.+?)\\\]", rest, re.DOTALL)  # a display block: "Answer \[\n 9 \n\]"
    if m:
        return _clean(m.group(1) or m.group(2))
    line = re.split(r"\.(?:\s|$)", line, maxsplit=1)[0]  # end of sentence, but not "3.5"
    line = re.sub(r"\s*I hope it is correct.*$", "", line)
    if line and not _is_bare_answer(line):
        # "The answer is: the volume of $ABCD$ is 120": the sentence's last math or number
        return _last_span_or_number(line)
    return _clean(line)


def _strip_delims(text: str) -> str:
    t = text.strip()
    for a, b in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if t.startswith(a) and t.endswith(b) and len(t) > len(a) + len(b) - 1:
            inner = t[len(a):len(t) - len(b)]
            if a not in inner and b not in inner:
                return inner.strip()
    return t


def _is_bare_answer(text: str) -> bool:
    """Whether `text` is itself an answer ("x = 3", "$\\frac{1}{2}$", "12 and 13", "Evelyn") rather than prose
    or a trajectory: a short piece of math with at most one ordinary word outside `\\text{}` boxes."""
    t = _strip_delims(text)
    if not t or "```" in t or len(t) > 400 or "\n\n" in t:
        return False
    if "$" in t.replace("\\$", ""):
        # several math spans: an answer only when all the text between them is connectives ("$2$ or $3$")
        rest = _MATH_SPAN_RE.sub(" ", t)
        if re.search(r"[A-Za-z]{2,}", re.sub(r"\b(?:and|or)\b", "", rest)):
            return False
    bare = re.sub(r"\\[A-Za-z]+\s*\{[^{}]*\}|\\[A-Za-z]+", " ", t)
    # all-capital runs are names of points and segments ("AB=9, CD=4"), not words
    words = [w for w in re.findall(r"[A-Za-z]{2,}", bare) if w.lower() not in _ANSWER_WORDS and not w.isupper()]
    return len(words) <= 1


_TAIL_CHARS = 3000


def _last_span_or_number(text: str) -> str | None:
    """The last math span ($...$, \\(...\\), \\[...\\]) or the last number outside spans, whichever ends later."""
    text = text[-_TAIL_CHARS:]  # the answer is at the end; a bounded window keeps the span regex linear
    span = None
    for span in _MATH_SPAN_RE.finditer(text):
        pass
    outside = _MATH_SPAN_RE.sub(lambda m: " " * len(m.group(0)), text)
    num = None
    for num in _LAST_NUM_RE.finditer(outside):
        pass
    if span is not None and (num is None or span.end() >= num.end()):
        inner = next(g for g in span.groups() if g is not None)
        return _clean(inner)
    if num is not None:
        return _clean(num.group(0).replace(",", ""))
    return None


def extract_answer(text: str) -> str | None:
    """The final answer of a model turn, or None.

    Order (ToRA's, extended): the last brace-matched `\\boxed{}` (also `\\boxed 5`, `\\fbox{}`); else the
    text after the last "answer is" / "Answer:" (first line or math span, `$` and trailing period stripped);
    else the whole text when it is itself an answer ("x = 3", "$\\frac{1}{2}$", "12 and 13"); else the last
    ```output block (its last non-empty line); else the last math span or the last number, whichever comes
    later (well-formed thousands commas removed). A turn ending with the paper's "Reach max function call
    limit." has no answer.
    """
    try:
        if not isinstance(text, str) or not text.strip():
            return None
        if text.rstrip().endswith(LIMIT_MESSAGE):
            return None
        text = _undouble(text)
        last = None
        for last in _ANSWER_IS_RE.finditer(text):
            pass
        box_end = _last_box_end(text)
        final = last is not None and _FINAL_RE.search(text[max(0, last.start() - 12):last.start()])
        if final and last.start() > box_end:
            # "... \boxed{255} ... Final Answer: The final answer is $10,455$": the later statement wins
            ans = _answer_is_tail(text[last.end():])
            if ans:
                return ans
        content, found = _last_box(text, join=True)
        if found:
            return _clean(content)
        if last is not None:
            ans = _answer_is_tail(text[last.end():])
            if ans:
                return ans
        if _is_bare_answer(text):
            return _clean(_strip_delims(text))
        outs = _OUTPUT_RE.findall(text)
        if outs:
            lines = [ln.strip() for ln in outs[-1].strip().splitlines() if ln.strip()]
            if lines:
                return _clean(lines[-1])
        return _last_span_or_number(text)
    except Exception:  # never let a malformed trajectory crash a rollout
        return None


def gold_gsm8k(answer_field: str) -> str:
    """GSM8K gold: the text after the last `####`, thousands commas removed ("1,080" -> "1080")."""
    if not isinstance(answer_field, str):
        return ""
    return answer_field.split("####")[-1].strip().replace(",", "")


def gold_math(solution: str) -> str | None:
    """MATH gold: content of the last brace-matched `\\boxed{}` in the solution (also `\\boxed 2`), or None."""
    if not isinstance(solution, str):
        return None
    try:
        content, _ = _last_box(solution)
        return content
    except Exception:
        return None
