"""Final-answer extraction and equivalence for GSM8K / MATH trajectories (the reward of M-DPO / M-KTO).

The paper grades with ToRA's `extract_answer` + `strip_string` + `math_equal` (Xiong et al. 2024, repo
`inference/eval/grader.py`). This module keeps ToRA's extraction order and normalisation spirit but
fixes the failure modes measured in `shared/reference/grading-executors.md` section 2.2:

* open vs closed intervals are different (ToRA strips all brackets before comparing);
* "3, 5, 7" is a list, never the number 357 (ToRA removes commas before `float()`);
* mixed numbers `1\\frac{4}{5}` are 9/5 (ToRA/Qwen read 4/5);
* `\\cdot` is multiplication, not deleted (ToRA turns `3 \\cdot 2^{2006}` into `32^{2006}`);
* the x100 / x0.01 "percent" leniency is off unless asked for (`percent_leniency=True`);
* `7 = 11a+c` keeps its left side (the "k =" prefix rule only drops a *variable* name);
* unit stripping never removes single letters (Qwen makes `(a+5)(b+2)` equal `(+5)(b+2)`);
* e-notation keeps its exponent (Math-Verify reads `1.5e3` as 1.5);
* tiny numbers are compared relatively, never "both below 1e-6 so equal" (Math-Verify).

Policies (they decide DPO labels, so they are written down):
* numbers are exact fractions compared with relative tolerance 1e-4 (ToRA/Qwen's value; `rel_tol=0` for
  exact), so decimal approximations of exact answers pass (`1.4142` for `\\sqrt{2}`, also `17.9999` for 18);
* bare lists ("3, 5, 7") and sets compare unordered; tuples, intervals and matrices compare in order, with
  bracket kinds required to match; a bare list may stand for a parenthesised tuple, never for an interval;
* `a \\pm b` is the list `a+b, a-b`; `x > 2` is the interval `(2, \\infty)`; `\\mathbb{R}` is `(-\\infty, \\infty)`;
* `y = 2x+1` equals `2x+1` (a bare variable on the left) and `y - 2x = 1` (proportional equations);
* `4210` equals `4210_5` (the base only restated); words compare case-insensitively;
* a percent sign is dropped ("50\\%" is 50), not read as a factor 1/100.

LaTeX is translated to sympy by the small recursive-descent parser in `mdpo.latex` (no antlr / latex2sympy).
Every sympy comparison runs under a wall-clock limit and a timeout counts as "not equal"; no public
function raises on junk input.
"""

from __future__ import annotations

import re
import time
from fractions import Fraction

from mdpo.latex import (GREEK, MAX_EXP10, MAX_LEN, ParseError, Timeout, equations_equivalent, load_sympy,
                        parse_latex, run_with_timeout, sympy_equal)

__all__ = ["extract_answer", "gold_gsm8k", "gold_math", "strip_answer", "is_equiv", "grade"]

# The paper's rollout appends this to a trajectory that used up its tool calls without answering.
LIMIT_MESSAGE = "Reach max function call limit."


# ----------------------------------------------------------------------------------------------------
# Extraction
# ----------------------------------------------------------------------------------------------------

# `\boxed` must be a whole command (`\boxedx` is another macro). ToRA matches the bare word "boxed", which
# made it read "a lego boxed set with 500 pieces" (GSM8K test 146) as an answer; we require the backslash.
_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![a-zA-Z])")


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


def _last_box(text: str) -> tuple[str | None, bool]:
    """(content, found) for the last `\\boxed{...}` / `\\boxed x` / `\\fbox{...}` in `text`.

    found=True with content None means the last box is malformed (unbalanced, e.g. a truncated turn);
    we do not fall back to an earlier box, since the model's final answer is unreadable.
    """
    last = None
    for last in _BOX_RE.finditer(text):
        pass
    if last is None:
        return None, False
    j = last.end()
    n = len(text)
    while j < n and text[j] in " \t":
        j += 1
    if j < n and text[j] == "{":
        end = _match_brace(text, j)
        if end is None:
            return None, True
        return text[j + 1:end].strip() or None, True
    # `\boxed 5`: one TeX token; we take the whitespace/`$`-delimited run, as ToRA splits on `$`.
    m = re.match(r"[^\s$]+", text[j:])
    if not m:
        return None, True
    tok = m.group(0).rstrip(".,;")
    return tok or None, True


def _clean(ans: str | None) -> str | None:
    if ans is None:
        return None
    ans = ans.strip()
    ans = re.sub(r"^[:\s]+", "", ans)
    ans = re.sub(r"[\s.$/]+$", "", ans)  # ToRA strips a trailing '.', '/' and we also drop '$'
    ans = re.sub(r"^\$+", "", ans).strip()
    return ans or None


_ANSWER_IS_RE = re.compile(r"answer is", re.IGNORECASE)
_OUTPUT_RE = re.compile(r"```output[ \t]*\n?(.*?)(?:```|$)", re.DOTALL)
# Thousands groups are only joined when well formed ("1,080"); "3, 5, 7" stays three numbers.
_LAST_NUM_RE = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?(?![\d,])|-?\d*\.?\d+")


def _answer_is_tail(rest: str) -> str | None:
    rest = rest.lstrip(" \t:")
    line = rest.split("\n", 1)[0].strip()
    if not line:
        return None
    m = re.match(r"\$\$?(.+?)\$", line) or re.match(r"\\\((.+?)\\\)", line) or re.match(r"\\\[(.+?)\\\]", line)
    if m:
        return _clean(m.group(1))
    line = re.split(r"\.(?:\s|$)", line, maxsplit=1)[0]  # end of sentence, but not "3.5"
    return _clean(line)


def extract_answer(text: str) -> str | None:
    """The final answer of a model turn, or None.

    Order (ToRA's): the last brace-matched `\\boxed{}` (also `\\boxed 5`, `\\fbox{}`); else the text
    after the last "answer is" (first line, `$` and trailing period stripped); else the last ```output
    block (its last non-empty line); else the last number (well-formed thousands commas removed).
    A turn ending with the paper's "Reach max function call limit." has no answer.
    """
    try:
        if not isinstance(text, str) or not text.strip():
            return None
        if text.rstrip().endswith(LIMIT_MESSAGE):
            return None
        content, found = _last_box(text)
        if found:
            return _clean(content)
        last = None
        for last in _ANSWER_IS_RE.finditer(text):
            pass
        if last is not None:
            ans = _answer_is_tail(text[last.end():])
            if ans:
                return ans
        outs = _OUTPUT_RE.findall(text)
        if outs:
            lines = [ln.strip() for ln in outs[-1].strip().splitlines() if ln.strip()]
            if lines:
                return _clean(lines[-1])
        nums = _LAST_NUM_RE.findall(text)
        if nums:
            return _clean(nums[-1].replace(",", ""))
        return None
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


# ----------------------------------------------------------------------------------------------------
# Normalisation
# ----------------------------------------------------------------------------------------------------

_UNICODE = [
    ("\u2212", "-"), ("\u2013", "-"), ("\u2014", "-"), ("\u00d7", "\\times "), ("\u22c5", "\\cdot "),
    ("\u00b7", "\\cdot "), ("\u00f7", "\\div "), ("\u03c0", "\\pi "), ("\u221a", "\\sqrt"),
    ("\u221e", "\\infty "), ("\u00b0", "^\\circ"), ("\u2264", "\\le "), ("\u2265", "\\ge "),
    ("\u2260", "\\ne "), ("\u222a", "\\cup "), ("\u2229", "\\cap "), ("\u00b2", "^2"), ("\u00b3", "^3"),
    ("\u00a0", " "), ("\u2009", " "), ("\u202f", " "), ("\u2026", "\\ldots "), ("\u2205", "\\emptyset "),
    ("\u00bd", "\\frac{1}{2}"), ("\u00bc", "\\frac{1}{4}"), ("\u00be", "\\frac{3}{4}"),
]

_WRAPPERS = ("text", "textbf", "textit", "textrm", "textsf", "texttt", "textnormal", "mbox", "hbox",
             "mathrm", "mathbf", "mathit", "mathsf", "mathtt", "mathnormal", "emph", "boldsymbol", "bm",
             "operatorname")
_WRAP_RE = re.compile(r"\\(?:%s)\s*\{([^{}]*)\}" % "|".join(_WRAPPERS))
# A trailing unit in a text box after a value: "5.4 \text{ cents}", "864 \mbox{ inches}^2". Content must be
# a word (2+ letters) or start with a space, so `2\mathrm{e}` keeps its e.
_TRAIL_TEXT_RE = re.compile(
    r"^(?P<pre>.*\S)\s*\\(?:text|textrm|textnormal|mbox|hbox|mathrm)\s*\{(?P<u>\s*[A-Za-z][A-Za-z .\-]*)\}"
    r"\s*(?:\^\s*\{?\s*[23]\s*\}?)?\s*$")
_CONNECTOR = {"and", "or"}

# Short unit words that may follow a number (single letters are never units here: see Qwen's bug).
_SHORT_UNITS = {"cm", "mm", "km", "ft", "in", "yd", "mi", "kg", "mg", "lb", "lbs", "oz", "hr", "hrs", "min",
                "mph", "sq", "cu", "ml", "am", "pm", "th", "st", "nd", "rd", "m2", "cm2"}
# Words that are mathematics, not units, when they trail a value.
_MATH_WORDS = {"sin", "cos", "tan", "cot", "sec", "csc", "log", "ln", "exp", "sqrt", "pi", "arcsin", "arccos",
               "arctan", "sinh", "cosh", "tanh", "infty", "inf", "infinity", "and", "or", "oo", "mod", "pmod"}
_UNIT_TAIL_RE = re.compile(r"^(?P<pre>.*?[\d})])(?P<words>\s*[A-Za-z][A-Za-z.\-]*(?:\s+[A-Za-z][A-Za-z.\-]*)*)"
                           r"\s*(?:\^\s*\{?\s*[23]\s*\}?)?$")

# "x =", "y=", "f(x) =", "\theta =", "x \in": dropped. Only a *variable* on the left: hendrycks/ToRA/Qwen drop
# any left side of <= 2 characters, which turned gold "7 = 11a+c" into "11a+c".
_VAR = r"(?:[A-Za-z](?:_\{?\w+\}?)?'*(?:\([A-Za-z]\))?|\\(?:%s))" % "|".join(GREEK)
_VAR_PREFIX_RE = re.compile(r"^\s*%s\s*(?:=|\\in(?![a-zA-Z]))\s*(?=\S)" % _VAR)
_IN_PREFIX_RE = re.compile(r"^\s*%s\s*\\in(?![a-zA-Z])\s*(?=\S)" % _VAR)


def _unit_tail(s: str) -> str:
    m = _UNIT_TAIL_RE.match(s)
    if not m:
        return s
    words = re.findall(r"[A-Za-z][A-Za-z.\-]*", m.group("words"))
    for w in words:
        lw = w.lower().strip(".-")
        if lw in _MATH_WORDS or (len(lw) < 3 and lw not in _SHORT_UNITS):
            return s
    # "5cm" needs no space, but a 3+-letter run glued to a value ("2xyz") could be a product: need a space
    if not m.group("words")[:1].isspace() and m.group("words").strip().lower().strip(".") not in _SHORT_UNITS:
        return s
    return m.group("pre")


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


def _top_level_map(s: str, fn) -> str:
    """Apply `fn` to the depth-0 stretches of `s` (outside any bracket)."""
    out, depth, start = [], 0, 0
    for i, c in enumerate(s):
        if c in "([{" and not (i and s[i - 1] == "\\" and c != "{"):
            if depth == 0:
                out.append(fn(s[start:i]))
                start = i
            depth += 1
        elif c in ")]}":
            depth -= 1
            if depth == 0:
                out.append(s[start:i + 1])
                start = i + 1
            depth = max(depth, 0)
    tail = s[start:]
    out.append(fn(tail) if depth == 0 else tail)
    return "".join(out)


def _join_thousands(seg: str) -> str:
    seg = re.sub(r"(?<![\d.,])\d{1,3}(?:,\d{3})+(?![\d,])", lambda m: m.group(0).replace(",", ""), seg)
    return re.sub(r"(?<![\d.])\d{1,3}(?: \d{3})+(?![\d.])", lambda m: m.group(0).replace(" ", ""), seg)


_ARGS_CMD_RE = re.compile(r"\\(frac|binom|sqrt)(?![a-zA-Z])")


def _brace_args(s: str) -> str:
    """`\\frac12` -> `\\frac{1}{2}`, `\\frac 59` -> `\\frac{5}{9}`, `\\sqrt3` -> `\\sqrt{3}` (one TeX token per arg)."""
    out, i, n = [], 0, len(s)
    while i < n:
        m = _ARGS_CMD_RE.search(s, i)
        if not m:
            out.append(s[i:])
            break
        out.append(s[i:m.end()])
        i = m.end()
        nargs = 1 if m.group(1) == "sqrt" else 2
        if nargs == 1:
            j = i
            while j < n and s[j] == " ":
                j += 1
            if j < n and s[j] == "[":
                k = s.find("]", j)
                if k < 0:
                    continue
                out.append(s[i:k + 1])
                i = k + 1
        for _ in range(nargs):
            j = i
            while j < n and s[j] == " ":
                j += 1
            if j >= n:
                break
            if s[j] == "{":
                k = _match_brace(s, j)
                if k is None:
                    break
                out.append(s[j:k + 1])
                i = k + 1
            elif s[j] == "\\":
                mm = re.match(r"\\[a-zA-Z]+", s[j:])
                tok = mm.group(0) if mm else s[j:j + 2]
                out.append("{" + tok + "}")
                i = j + len(tok)
            else:
                out.append("{" + s[j] + "}")
                i = j + 1
    return "".join(out)


def _strip_outer_braces(s: str) -> str:
    while len(s) >= 2 and s[0] == "{" and _match_brace(s, 0) == len(s) - 1:
        s = s[1:-1].strip()
    return s


def _drop_var_prefix(s: str, eq: bool = True) -> str:
    m = (_VAR_PREFIX_RE if eq else _IN_PREFIX_RE).match(s)
    if m and "=" not in s[m.end():]:
        return s[m.end():].strip()
    return s


_ESCAPES_RE = re.compile(r"\\\\|\\[()\[\],:;> !]|\\(?:quad|qquad)(?![a-zA-Z])")


def _normalize(s, drop_eq: bool = True) -> str:
    """Light normalisation that keeps spaces (they matter to the parser); strip_answer also drops them.
    drop_eq=False keeps a `y =` prefix so that is_equiv can compare `y = 2x+3` with `y - 2x = 3`."""
    if not isinstance(s, str):
        return ""
    if len(s) > MAX_LEN:
        return s.strip()
    if "boxed" in s or "fbox" in s:
        content, found = _last_box(s)
        if found and content:
            s = content
    for a, b in _UNICODE:
        if a in s:
            s = s.replace(a, b)
    s = re.sub(r"\s+", " ", s).strip()
    s = s.replace("\\$", " ").replace("$", " ")
    s = re.sub(r",\\!\s*(?=\d{3})", ",", s)  # "10,\!080": a thousands separator
    # math delimiters \( \[ and spacing \, \; \! \quad; a matrix row break \\ is kept as it is
    s = _ESCAPES_RE.sub(lambda m: m.group(0) if m.group(0) == "\\\\" else ("" if m.group(0) == "\\!" else " "), s)
    s = s.replace("~", " ")
    s = s.replace("<=", "\\le ").replace(">=", "\\ge ").replace("!=", "\\ne ")
    s = re.sub(r"\\(?:displaystyle|textstyle|scriptstyle|limits)(?![a-zA-Z])", "", s)
    s = re.sub(r"\\[dtc]frac(?![a-zA-Z])", r"\\frac", s)
    s = re.sub(r"\\[dt]binom(?![a-zA-Z])", r"\\binom", s)
    s = re.sub(r"\\(?:left|right)\s*\.", "", s)
    s = re.sub(r"\\(?:left|right|[bB]igg?[lr]?)(?![a-zA-Z])", "", s)
    s = re.sub(r"\\lbrace(?![a-zA-Z])", r"\\{", s)
    s = re.sub(r"\\rbrace(?![a-zA-Z])", r"\\}", s)
    s = re.sub(r"\\[lr]vert(?![a-zA-Z])|\\mid(?![a-zA-Z])", "|", s)
    s = re.sub(r"\\(?:leq|leqslant)(?![a-zA-Z])", r"\\le", s)
    s = re.sub(r"\\(?:geq|geqslant)(?![a-zA-Z])", r"\\ge", s)
    s = re.sub(r"\\neq(?![a-zA-Z])", r"\\ne", s)
    s = re.sub(r"\\dots[bc]?(?![a-zA-Z])|\\cdots(?![a-zA-Z])", r"\\ldots", s)
    # degrees and percent are decoration of a number ("90^\circ" is 90, "50\%" is 50)
    s = re.sub(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ(?![a-zA-Z])|\\degree(?![a-zA-Z])", "", s)
    s = s.replace("\\%", "").replace("%", "")
    s = re.sub(r"\\mathbb\s*\{?\s*R\s*\}?(?![a-zA-Z])|\\R(?![a-zA-Z])", r"(-\\infty,\\infty)", s)
    # units in text boxes, then unwrap the remaining text-like wrappers
    for _ in range(3):
        m = _TRAIL_TEXT_RE.match(s)
        if not m or m.group("u").strip().lower() in _CONNECTOR:
            break
        if len(m.group("u").strip()) < 2 and not m.group("u")[:1].isspace():
            break  # `2\mathrm{e}`: a one-letter box glued to the value is a symbol, not a unit
        s = m.group("pre").strip()
    for _ in range(10):
        s2 = _WRAP_RE.sub(lambda m: m.group(1), s)
        if s2 == s:
            break
        s = s2
    s = re.sub(r"\s+", " ", s).strip()
    s = re.sub(r"\s*,?\s+(?:and|or)\s+", ", ", s)  # "2 and 3", "x=2 or x=3": a list
    for _ in range(3 if len(s) <= 300 else 0):  # the tail regex is quadratic: short answers only
        s2 = _unit_tail(s)
        if s2 == s:
            break
        s = s2.strip()
    s = re.sub(r"(?<!\\)\b(?:infinity|inf)\b", r"\\infty", s)
    s = re.sub(r"(?<![A-Za-z\\])oo(?![A-Za-z])", r"\\infty", s)
    s = re.sub(r"(^|[(\[,])\s*\+\s*\\infty", r"\1\\infty", s)
    s = re.sub(r"\\varnothing(?![a-zA-Z])|\\\{\s*\\\}", r"\\emptyset", s)
    s = _strip_outer_braces(s.strip())
    s = re.sub(r"^\(\s*([A-E])\s*\)$", r"\1", s)  # multiple choice "\text{(C)}" -> "C"
    s = _drop_var_prefix(s, drop_eq)
    s = _top_level_map(s, _join_thousands)
    s = re.sub(r"(?<![\w.])\.(\d)", r"0.\1", s)  # ".35625" -> "0.35625"
    s = re.sub(r"(?<![\d.])(\d+)\.0+(?![\d.])", r"\1", s)  # "18.0" -> "18" (Python prints floats)
    s = re.sub(r"(?<![\d.])(\d+\.\d*?[1-9])0+(?![\d.])", r"\1", s)  # "1.50" -> "1.5"
    s = re.sub(r"(?<=\d)_\s*\{\s*(\d+)\s*\}", r"_\1", s)  # base subscripts "4210_{5}" -> "4210_5"
    s = _brace_args(s)
    s = re.sub(r"[\s.,;]+$", "", s)  # trailing punctuation (never a decimal point: "5." is 5)
    s = re.sub(r"^[\s,;:]+", "", s)
    return _strip_outer_braces(s.strip())


def _canon(s: str) -> str:
    """Remove spaces, except where they end a command (`\\pi r`) or separate two numbers (`3 5`)."""
    s = re.sub(r"(\\[a-zA-Z]+) +(?=[a-zA-Z])", "\\1\x00", s)
    s = re.sub(r"(?<=\d) +(?=\d)", "\x00", s)
    return s.replace(" ", "").replace("\x00", " ")


def strip_answer(s: str) -> str:
    """Canonical string form of an answer (`\\dfrac`->`\\frac`, no `\\left`/`\\right`, `$`, `^\\circ`, `\\%`,
    units, `\\text{}`, `x =` prefix, thousands commas, trailing period, spaces). Never raises."""
    try:
        return _canon(_normalize(s))
    except Exception:
        return s.strip() if isinstance(s, str) else ""


# ----------------------------------------------------------------------------------------------------
# Exact numbers without sympy (GSM8K and most MATH answers take this path)
# ----------------------------------------------------------------------------------------------------

_DEC = r"(?:\d+(?:\.\d*)?|\.\d+)"
_NUM_RE = re.compile(r"^(-?)(%s)(?:[eE]([+-]?\d+))?$" % _DEC)
_SCI_RE = re.compile(r"^(-?)(%s)\\(?:times|cdot)10\^\{?(-?\d+)\}?$" % _DEC)
_FRAC_RE = re.compile(r"^(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}$")
_SLASH_RE = re.compile(r"^(-?)(\d+)/(\d+)$")
_MIXED_RE = re.compile(r"^(-?)(\d+)(?:\\frac\{(\d+)\}\{(\d+)\}|\x00?(\d+)/(\d+))$")
_REPEAT_RE = re.compile(r"^(-?)(\d*)\.(\d*)\\overline\{(\d+)\}$")


def _to_number(c: str) -> Fraction | None:
    """Exact value of a canonical numeric string (ints, decimals, 1e3, 1.2\\times10^{3}, a/b, \\frac{a}{b},
    mixed numbers, 0.\\overline{3}); None for anything else."""
    c = c.replace(" ", "\x00") if " " in c else c
    m = _NUM_RE.match(c)
    if m:
        sign, mant, exp = m.groups()
        if exp is not None and abs(int(exp)) > MAX_EXP10:
            return None
        v = Fraction(mant) * (Fraction(10) ** int(exp) if exp else 1)
        return -v if sign else v
    m = _SCI_RE.match(c)
    if m:
        sign, mant, exp = m.groups()
        if abs(int(exp)) > MAX_EXP10:
            return None
        v = Fraction(mant) * Fraction(10) ** int(exp)
        return -v if sign else v
    m = _FRAC_RE.match(c) or _SLASH_RE.match(c)
    if m:
        sign, a, b = m.groups()
        if int(b) == 0:
            return None
        v = Fraction(int(a), int(b))
        return -v if sign else v
    m = _MIXED_RE.match(c)
    if m:
        sign, whole = m.group(1), int(m.group(2))
        a, b = (m.group(3), m.group(4)) if m.group(3) is not None else (m.group(5), m.group(6))
        a, b = int(a), int(b)
        if not 0 < a < b:  # only a proper fraction makes a mixed number; "3\frac{5}{2}" is a product
            return None
        v = whole + Fraction(a, b)
        return -v if sign else v
    m = _REPEAT_RE.match(c)
    if m:
        sign, ip, fp, rep = m.groups()
        v = Fraction(int(ip or "0")) + (Fraction(int(fp), 10 ** len(fp)) if fp else 0)
        v += Fraction(int(rep), (10 ** len(rep) - 1) * 10 ** len(fp))
        return -v if sign else v
    return None


def _close(a, b, rel_tol) -> bool:
    if a == b:
        return True
    return abs(a - b) <= Fraction(rel_tol) * max(abs(a), abs(b))


def _num_equal(a: Fraction, b: Fraction, ctx) -> bool:
    rel_tol, lenient = ctx
    if _close(a, b, rel_tol):
        return True
    # ToRA's math_equal also accepts ref*100 and ref/100; off by default because 0.18 and 1800 then
    # "equal" a gold of 18 (a reward-hackable false positive)
    return lenient and (_close(a, b * 100, rel_tol) or _close(a, b / 100, rel_tol))


# ----------------------------------------------------------------------------------------------------
# Structure: lists, tuples, intervals, sets, unions, matrices, equations
# ----------------------------------------------------------------------------------------------------

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


_PM_RE = re.compile(r"\\(?:pm|mp)(?![a-zA-Z])")


def _expand_pm(s: str, limit: int = 3) -> list[str]:
    """`1 \\pm \\sqrt{19}` -> [`1 + \\sqrt{19}`, `1 - \\sqrt{19}`] (textual, so `\\frac{1\\pm\\sqrt5}{2}` works)."""
    if len(_PM_RE.findall(s)) > limit:
        return [s]  # junk: expanding would be exponential
    out = [s]
    for _ in range(limit):
        nxt = []
        changed = False
        for x in out:
            m = _PM_RE.search(x)
            if not m:
                nxt.append(x)
                continue
            changed = True
            nxt.append(x[:m.start()] + "+" + x[m.end():])
            nxt.append(x[:m.start()] + "-" + x[m.end():])
        out = nxt
        if not changed:
            break
    return out


_INEQ_OPS = {"<": "<", ">": ">", "\\le": "<=", "\\ge": ">=", "\\lt": "<", "\\gt": ">"}
_INEQ_RE = r"(<|>|\\le(?![a-zA-Z])|\\ge(?![a-zA-Z])|\\lt(?![a-zA-Z])|\\gt(?![a-zA-Z]))"


def _inequality_to_interval(s: str):
    """`x > 2` -> ("(", ")", ["2", "\\infty"]); `-2 \\le x < 7` -> ("[", ")", ["-2", "7"])."""
    var = r"([A-Za-z])"
    m = re.fullmatch(r"\s*(.+?)\s*" + _INEQ_RE + r"\s*" + var + r"\s*" + _INEQ_RE + r"\s*(.+?)\s*", s)
    if m:
        lo, op1, _, op2, hi = m.groups()
        o1, o2 = _INEQ_OPS[op1], _INEQ_OPS[op2]
        if o1 in ("<", "<=") and o2 in ("<", "<="):
            return ("[" if o1 == "<=" else "(", "]" if o2 == "<=" else ")", [lo, hi])
        return None
    m = re.fullmatch(r"\s*" + var + r"\s*" + _INEQ_RE + r"\s*(.+?)\s*", s)
    if m:
        _, op, v = m.groups()
        o = _INEQ_OPS[op]
        if o in ("<", "<="):
            return ("(", "]" if o == "<=" else ")", ["-\\infty", v])
        return ("[" if o == ">=" else "(", ")", [v, "\\infty"])
    m = re.fullmatch(r"\s*(.+?)\s*" + _INEQ_RE + r"\s*" + var + r"\s*", s)
    if m:
        v, op, _ = m.groups()
        o = _INEQ_OPS[op]
        if o in ("<", "<="):  # v < x
            return ("[" if o == "<=" else "(", ")", [v, "\\infty"])
        return ("(", "]" if o == ">=" else ")", ["-\\infty", v])
    return None


def _struct(s: str, depth: int = 0):
    """Parse a normalised answer into a nested tuple:
    ("scalar", s) | ("seq", open, close, items) | ("set", items) | ("bare", items) | ("union", items)
    | ("matrix", rows) | ("eq", lhs, rhs)."""
    s = _strip_outer_braces(s.strip())
    if depth > 20:
        raise ParseError("too deep")
    if not s:
        return ("scalar", "")
    parts = _split_top(s, "\\cup")
    if len(parts) > 1:
        return ("union", [_struct(p, depth + 1) for p in parts])
    m = re.fullmatch(r"\\begin\{([pbBvV]?matrix|array|smallmatrix)\}(?:\{[^{}]*\})?(.*)\\end\{\1\}", s, re.DOTALL)
    if m:
        rows = [r for r in re.split(r"\\\\", m.group(2)) if r.strip()]
        return ("matrix", [[_struct(c, depth + 1) for c in _split_top(r, "&")] for r in rows])
    if s == "\\emptyset":
        return ("set", [])
    if s.startswith("\\{") and _matching_close(s, 0) == len(s) - 2 and s.endswith("\\}"):
        inner = s[2:-2].strip()
        items = [x for x in _split_top(inner, ",")] if inner else []
        return ("set", _flat_items(items, depth))
    if s[0] in "([" and s[-1] in ")]" and _matching_close(s, 0) == len(s) - 1:
        items = _split_top(s[1:-1], ",")
        if len(items) >= 2:
            return ("seq", s[0], s[-1], [_struct(_drop_var_prefix(x), depth + 1) for x in items])
        if s[0] == "(" and s[-1] == ")":
            return _struct(s[1:-1], depth + 1)
    items = _split_top(s, ",")
    if len(items) >= 2:
        return ("bare", _flat_items(items, depth))
    pm = _expand_pm(s)
    if len(pm) > 1:
        return ("bare", [_struct(x, depth + 1) for x in pm])
    eq = _split_top(s, "=")
    if len(eq) == 2 and eq[0].strip() and eq[1].strip():
        return ("eq", eq[0].strip(), eq[1].strip())
    iv = _inequality_to_interval(s)
    if iv:
        return ("seq", iv[0], iv[1], [("scalar", x) for x in iv[2]])
    return ("scalar", s)


def _flat_items(items, depth):
    out = []
    for x in items:
        x = _drop_var_prefix(x.strip())
        for y in _expand_pm(x):
            out.append(_struct(y, depth + 1))
    return out


def _unordered(xs, ys, cmp) -> bool:
    if len(xs) != len(ys):
        return False
    used = [False] * len(ys)
    for x in xs:
        for j, y in enumerate(ys):
            if not used[j] and cmp(x, y):
                used[j] = True
                break
        else:
            return False
    return True


def _ordered(xs, ys, cmp) -> bool:
    return len(xs) == len(ys) and all(cmp(x, y) for x, y in zip(xs, ys))


def _equation_equal(a: tuple[str, str], b: tuple[str, str], rel_tol: float, deadline: float) -> bool:
    """`l1 = r1` vs `l2 = r2`: equal when l1 - r1 is a constant nonzero multiple of l2 - r2."""
    parts = [parse_latex(_canon(x), deadline) for x in (*a, *b)]
    if any(p is None for p in parts):
        return False
    return equations_equivalent(*parts, rel_tol)


_BASE_RE = re.compile(r"^(\d+)_(\d+)$")


class _Comparer:
    def __init__(self, rel_tol: float, lenient: bool, deadline: float):
        self.ctx = (rel_tol, lenient)
        self.deadline = deadline

    def scalar(self, a: str, b: str) -> bool:
        if time.monotonic() > self.deadline:
            raise Timeout()
        a, b = _drop_var_prefix(a), _drop_var_prefix(b)
        ca, cb = _canon(a), _canon(b)
        if not ca or not cb:
            return False
        if ca == cb:
            return True
        if re.fullmatch(r"[A-Za-z][A-Za-z ]+", ca) and ca.lower() == cb.lower():
            return True  # "East" vs "east"
        ma, mb = _BASE_RE.match(ca), _BASE_RE.match(cb)
        if ma or mb:
            # "4210_5" vs "4210": the same digits, the base only restated
            da = ma.group(1) if ma else ca
            db = mb.group(1) if mb else cb
            return da == db and (not (ma and mb) or ma.group(2) == mb.group(2))
        na, nb = _to_number(ca), _to_number(cb)
        if na is not None and nb is not None:
            return _num_equal(na, nb, self.ctx)
        ea = parse_latex(ca, self.deadline)
        if ea is None:
            return False
        eb = parse_latex(cb, self.deadline)
        if eb is None:
            return False
        rel_tol, lenient = self.ctx
        return sympy_equal(ea, eb, rel_tol, lenient, self.deadline)

    def eq(self, A, B) -> bool:
        ka, kb = A[0], B[0]
        if ka == "scalar" and kb == "scalar":
            return self.scalar(A[1], B[1])
        if ka == "seq" and kb == "seq":
            return A[1] == B[1] and A[2] == B[2] and _ordered(A[3], B[3], self.eq)
        if {ka, kb} == {"seq", "bare"}:
            # "6, 31, -1" for "(6,31,-1)"; never for [a, b] or (a, b], which are intervals
            sq = A if ka == "seq" else B
            if sq[1] != "(" or sq[2] != ")":
                return False
            return _ordered(A[3], B[1], self.eq) if ka == "seq" else _ordered(A[1], B[3], self.eq)
        if ka in ("set", "bare") and kb in ("set", "bare"):
            return _unordered(A[1], B[1], self.eq)
        if {ka, kb} == {"set", "scalar"}:
            st, sc = (A, B) if ka == "set" else (B, A)
            return len(st[1]) == 1 and (self.eq(st[1][0], sc) if ka == "set" else self.eq(sc, st[1][0]))
        if ka == "union" and kb == "union":
            return _unordered(A[1], B[1], self.eq)
        if ka == "matrix" and kb == "matrix":
            return len(A[1]) == len(B[1]) and all(_ordered(ra, rb, self.eq) for ra, rb in zip(A[1], B[1]))
        if {ka, kb} == {"matrix", "seq"}:
            mx, sq = (A, B) if ka == "matrix" else (B, A)
            rows = mx[1]
            flat = [r[0] for r in rows] if all(len(r) == 1 for r in rows) else (rows[0] if len(rows) == 1 else None)
            if flat is None or sq[1] != "(" or sq[2] != ")":
                return False
            return _ordered(flat, sq[3], self.eq) if ka == "matrix" else _ordered(sq[3], flat, self.eq)
        if {ka, kb} == {"eq", "scalar"}:
            # "y = 2x+3" vs "2x+3": the left side must be a bare variable (gold "7 = 11a+c" is no prefix)
            e, sc = (A, B) if ka == "eq" else (B, A)
            if not re.fullmatch(_VAR, e[1].strip()):
                return False
            return self.scalar(e[2], sc[1]) if ka == "eq" else self.scalar(sc[1], e[2])
        if ka == "eq" and kb == "eq":
            if _canon(A[1]) == _canon(B[1]) and self.scalar(A[2], B[2]):
                return True
            return _equation_equal((A[1], A[2]), (B[1], B[2]), self.ctx[0], self.deadline)
        return False


# ----------------------------------------------------------------------------------------------------
# Public comparison
# ----------------------------------------------------------------------------------------------------

def is_equiv(pred: str, gold: str, *, percent_leniency: bool = False, timeout: float = 2.0,
             rel_tol: float = 1e-4) -> bool:
    """Whether answer `pred` equals answer `gold` (LaTeX or plain text). Never raises; a timeout is False.

    Numbers are exact fractions compared with relative tolerance `rel_tol` (1e-4, as ToRA and Qwen);
    `percent_leniency=True` also accepts gold*100 and gold/100 (the paper's ToRA behaviour).
    """
    try:
        if not isinstance(pred, str) or not isinstance(gold, str):
            return False
        a, b = _normalize(pred, drop_eq=False), _normalize(gold, drop_eq=False)
        if not a or not b:
            return False
        if _canon(a) == _canon(b):
            return True
        if len(a) > MAX_LEN or len(b) > MAX_LEN:
            return False
        # exact numbers (all of GSM8K) need neither sympy nor a timer
        na, nb = _to_number(_canon(a)), _to_number(_canon(b))
        if na is not None and nb is not None:
            return _num_equal(na, nb, (rel_tol, percent_leniency))
        load_sympy()  # the first import takes ~1 s: never let the alarm interrupt it half-way
        deadline = time.monotonic() + timeout

        def work():
            return _Comparer(rel_tol, percent_leniency, deadline).eq(_struct(a), _struct(b))

        return bool(run_with_timeout(work, timeout))
    except (Exception, Timeout):
        return False


def grade(text: str, gold: str, **kw) -> tuple[str | None, bool]:
    """(extracted answer, correct?) for a model's final turn against a gold answer string."""
    pred = extract_answer(text)
    if pred is None:
        return None, False
    return pred, is_equiv(pred, gold, **kw)
