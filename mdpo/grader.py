"""Answer equivalence for GSM8K / MATH trajectories (the reward of M-DPO / M-KTO); extraction is in mdpo.extraction.

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
* integers, fractions and exact expressions compare exactly ("100009" is not "100000", "1048570" is not
  2^{20}); only where a side is a decimal ("1.4142", "17.9999") does the relative tolerance `REL_TOL` (1e-4,
  ToRA/Qwen's value; `rel_tol=` per call) apply, so decimal approximations of exact answers still pass;
* bare lists ("3, 5, 7") and sets compare unordered, repeats collapsed; tuples, intervals and matrices compare
  in order, with bracket kinds required to match; a bare list may stand for a parenthesised tuple, never for
  an interval; a list equals one value only when every item does ("x+11, 11+x" is 11+x);
* `x < -1 or x > 1` is the union of the two intervals; a sum or product of written matrices is its value;
* `a \\pm b` is the list `a+b, a-b`; `x > 2` is the interval `(2, \\infty)`; `\\mathbb{R}` is `(-\\infty, \\infty)`;
* `y = 2x+1` equals `2x+1` (a bare variable on the left) and `y - 2x = 1` (proportional equations);
* `4210` equals `4210_5` (the base only restated); words compare case-insensitively;
* a percent sign is dropped ("50\\%" is 50), not read as a factor 1/100;
* a label names the value: `k = 5`, `(p,q) = (3,2)`, `AB = 4, CD = 5` (no digits or +/- on the left); digit
  groups `1{,}000`, `1\\,000`, `1\\!000` are one number; `;` separates answers; a doubly escaped `\\\\frac` is `\\frac`;
* `a \\approx b`: a gold matches either side, a prediction is read by its exact side; two decimals compare exactly;
* text with no `\\boxed` is reduced to its final answer (`mdpo.extraction.extract_answer`), in is_equiv too.

LaTeX is translated to sympy by the small recursive-descent parser in `mdpo.latex` (no antlr / latex2sympy).
Every sympy comparison runs under a wall-clock limit and a timeout counts as "not equal"; no public
function raises on junk input.
"""

from __future__ import annotations

import re
import time
from fractions import Fraction

# extraction lives in mdpo.extraction; its public names stay importable from here
from mdpo.extraction import (LIMIT_MESSAGE, _is_bare_answer, _last_box, _matching_close, _split_top, _undouble,
                             extract_answer, gold_gsm8k, gold_math)
from mdpo.latex import (GREEK, MAX_LEN, ParseError, Timeout, _brace_args, _is_approx, _join_thousands,
                        _strip_outer_braces, _to_number, _top_level_map, equations_equivalent, load_sympy,
                        parse_latex, run_with_timeout, sympy_equal)

__all__ = ["extract_answer", "gold_gsm8k", "gold_math", "strip_answer", "is_equiv", "grade", "LIMIT_MESSAGE",
           "REL_TOL"]

# Relative tolerance for a number written as a decimal approximation ("1.4142" for \sqrt{2}, "17.9999" for 18;
# ToRA's and Qwen's value). Integers and exact values never get one: "100009" is not "100000". Override per
# call with is_equiv(..., rel_tol=...); config key eval.grader_tolerance.
REL_TOL = 1e-4


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


def _is_label(lhs: str) -> bool:
    """Whether the left side of `lhs = value` names the answer ("x", "f(x)", "(p,q)", "AB", "|AB|", "A:B",
    "\\frac{NO}{BO}", "V_{1}:V_{2}") rather than being mathematics: no digits outside subscripts, no + or -.
    Gold "7 = 11a+c" or "2x + z = 1" is an equation, never a labelled value."""
    t = re.sub(r"_\s*(?:\{[^{}]*\}|\w)|'", "", lhs.strip())
    t = re.sub(r"\\(?:frac|left|right|mathrm|text|overline|angle|triangle|operatorname)(?![a-zA-Z])", "", t)
    if not t or re.search(r"[\d+\-*/=<>^!]", t):
        return False
    t = re.sub(r"\\(?:%s)(?![a-zA-Z])" % "|".join(GREEK), "a", t)
    return bool(re.fullmatch(r"[A-Za-z(){}|:,\s\[\]]+", t)) and bool(re.search(r"[A-Za-z]", t))


def _drop_var_prefix(s: str, eq: bool = True) -> str:
    m = (_VAR_PREFIX_RE if eq else _IN_PREFIX_RE).match(s)
    if m and "=" not in s[m.end():]:
        return s[m.end():].strip()
    if eq and "=" in s:
        parts = _split_top(s, "=")
        if len(parts) == 2 and parts[1].strip() and _is_label(parts[0]):
            return parts[1].strip()
    return s


# `\quadx_{2}` (a lost space after \quad, seen in real golds) is \quad followed by x_{2}
_ESCAPES_RE = re.compile(r"\\\\|\\[()\[\],:;> !]|\\(?:quad|qquad)(?!ed)")


def _normalize(s, drop_eq: bool = True) -> str:
    """Light normalisation that keeps spaces (they matter to the parser); strip_answer also drops them.
    drop_eq=False keeps a `y =` prefix so that is_equiv can compare `y = 2x+3` with `y - 2x = 3`."""
    if not isinstance(s, str):
        return ""
    s = _undouble(s)
    if "boxed" in s or "fbox" in s:
        content, found = _last_box(s, join=True)
        if found and content:
            s = content
    elif not _is_bare_answer(s):
        s = extract_answer(s) or s  # prose ("The answer is 5"): its final answer
    if len(s) > MAX_LEN:
        return s.strip()
    for a, b in _UNICODE:
        if a in s:
            s = s.replace(a, b)
    s = re.sub(r"\s+", " ", s).strip()
    s = s.replace("\\$", " ").replace("$", " ")
    s = re.sub(r",\\!\s*(?=\d{3})", ",", s)  # "10,\!080": a thousands separator
    # other digit-group separators: "14{,}916", "1\,000", "1\!000", "1\ 000", "1~000"
    s = re.sub(r"(?<=\d)\s?(?:\{\s*,\s*\}|\\[,! ]|~)\s?(?=\d{3}(?!\d))", ",", s)
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
    s = re.sub(r"(?<=[)\]])\s*(?:and|or)\s*(?=[(\[])", ", ", s)  # "(11,7)or(7,11)"
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
    s = re.sub(r"^\(?([A-E])(?:\)|\.)\s+[A-Za-z].*$", r"\1", s)  # "(C) Plane", "C. x = 42": the choice
    s = _drop_var_prefix(s, drop_eq)
    s = _top_level_map(s, _join_thousands)
    s = re.sub(r"(?<![\w.])\.(\d)", r"0.\1", s)  # ".35625" -> "0.35625"
    s = re.sub(r"(?<![\d.])(\d+)\.0+(?![\d.])", r"\1", s)  # "18.0" -> "18" (Python prints floats)
    s = re.sub(r"(?<![\d.])(\d+\.\d*?[1-9])0+(?![\d.])", r"\1", s)  # "1.50" -> "1.5"
    s = re.sub(r"(?<=\d)_\s*\{\s*(\d+)\s*\}", r"_\1", s)  # base subscripts "4210_{5}" -> "4210_5"
    s = _brace_args(s)
    s = re.sub(r"[\s.,;]+$|(?<![\\\s])\\$", "", s)  # trailing punctuation (never a decimal point: "5." is 5)
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


def _close(a, b, rel_tol) -> bool:
    if a == b:
        return True
    return abs(a - b) <= Fraction(rel_tol) * max(abs(a), abs(b))


def _num_equal(a: Fraction, b: Fraction, ctx, approx: bool = True) -> bool:
    """Exact values `a` (prediction) and `b` (gold): equal, or within the relative tolerance when `approx`
    (a side was written as a decimal). "100009" is never "100000": near-miss integers are wrong answers."""
    rel_tol, lenient = ctx
    tol = rel_tol if approx else 0
    if _close(a, b, tol):
        return True
    # ToRA's math_equal also accepts ref*100 and ref/100; off by default because 0.18 and 1800 then
    # "equal" a gold of 18 (a reward-hackable false positive)
    return lenient and (_close(a, b * 100, tol) or _close(a, b / 100, tol))


# ----------------------------------------------------------------------------------------------------
# Structure: lists, tuples, intervals, sets, unions, matrices, equations
# ----------------------------------------------------------------------------------------------------


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


_FLIP = {"<": ">", ">": "<", "\\le": "\\ge", "\\ge": "\\le", "\\lt": "\\gt", "\\gt": "\\lt"}
_INEQ_OPS = {"<": "<", ">": ">", "\\le": "<=", "\\ge": ">=", "\\lt": "<", "\\gt": ">"}
_INEQ_RE = r"(<|>|\\le(?![a-zA-Z])|\\ge(?![a-zA-Z])|\\lt(?![a-zA-Z])|\\gt(?![a-zA-Z]))"


def _inequality_to_interval(s: str):
    """`x > 2` -> ("(", ")", ["2", "\\infty"]); `-2 \\le x < 7` -> ("[", ")", ["-2", "7"])."""
    s = re.sub(r"^\s*-\s*([A-Za-z])\s*" + _INEQ_RE + r"\s*(-?)\s*(?=[\d\\])",
               lambda m: "%s %s %s" % (m.group(1), _FLIP[m.group(2)], "" if m.group(3) else "-"), s)  # -x > -1
    var = r"([A-Za-z](?:\([A-Za-z]\))?)"
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


_MATRIX_RE = re.compile(r"\\begin\{([pbBvV]?matrix|array|smallmatrix)\}(?:\{[^{}]*\})?(.*?)\\end\{\1\}", re.DOTALL)


def _matrix_expression(s: str):
    """`A + B`, `A B`, `A \\cdot B` of written-out matrices, evaluated to ("matrix", rows) (a small expression that
    evaluates to the answer); None when `s` is anything else or an entry does not parse."""
    sp = load_sympy()
    mats, ops, pos = [], [], 0
    for m in _MATRIX_RE.finditer(s):
        gap = s[pos:m.start()].strip()
        if mats:
            if gap not in ("", "+", "-", "\\cdot", "\\times"):
                return None
            ops.append(gap)
        elif gap:
            return None
        rows = [r for r in re.split(r"\\\\", m.group(2)) if r.strip()]
        cells = [[parse_latex(_canon(c.strip())) for c in _split_top(r, "&")] for r in rows]
        if not cells or any(c is None for r in cells for c in r) or len({len(r) for r in cells}) != 1:
            return None
        mats.append(sp.Matrix(cells))
        pos = m.end()
    if len(mats) < 2 or s[pos:].strip():
        return None
    terms, signs = [mats[0]], [1]
    for op, mx in zip(ops, mats[1:]):
        if op in ("", "\\cdot", "\\times"):
            terms[-1] = terms[-1] * mx  # raises on a shape mismatch: then the answer is not this
        else:
            terms.append(mx)
            signs.append(-1 if op == "-" else 1)
    total = sum((t * k for t, k in zip(terms[1:], signs[1:])), terms[0])
    return ("matrix", [[("scalar", sp.latex(sp.nsimplify(total[i, j]) if total[i, j].is_Float else total[i, j]))
                        for j in range(total.cols)] for i in range(total.rows)])


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
    if s.count("\\begin{") > 1:
        value = _matrix_expression(s)
        if value is not None:
            return value
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
        if len(items) < 2:
            items = _split_top(s[1:-1], ";")  # "(0;-2;6)": coordinates separated by semicolons
        if len(items) >= 2:
            return ("seq", s[0], s[-1], [_struct(_drop_var_prefix(x), depth + 1) for x in items])
        if (s[0] == "(" and s[-1] == ")") or s[1:].lstrip().startswith("\\begin"):
            return _struct(s[1:-1], depth + 1)  # "(5)", "\left[\begin{array}...\end{array}\right]"
    groups = _split_top(s, ";")
    if len(groups) >= 2 and all(g.strip() for g in groups):
        # "p=5,q=2;p=7,q=2", "-12;-11;-10": semicolons separate the answers, commas the parts of one
        return ("bare", [_struct(_drop_var_prefix(g.strip()), depth + 1) for g in groups])
    items = _split_top(s, ",")
    if len(items) >= 2:
        return ("bare", _flat_items(items, depth))
    pm = _expand_pm(s)
    if len(pm) > 1:
        return ("bare", [_struct(x, depth + 1) for x in pm])
    eq = _split_top(s, "=")
    if len(eq) > 2 and all(x.strip() for x in eq):
        # "x = 5+5+1 = 11": a chain of steps; the last side is the value (the first kept when it is a label)
        eq = [eq[0], eq[-1]] if _is_label(eq[0]) else [eq[-1]]
        if len(eq) == 1:
            return _struct(eq[0], depth + 1)
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


def _key(x):
    return tuple(_key(y) for y in x) if isinstance(x, (tuple, list)) else _canon(x)


def _dedupe(items: list) -> list:
    seen, out = set(), []
    for x in items:
        k = _key(x)
        if k not in seen:
            seen.add(k)
            out.append(x)
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
            return _num_equal(na, nb, self.ctx, _is_approx(ca) != _is_approx(cb))
        ea = parse_latex(ca, self.deadline)
        if ea is None:
            return False
        eb = parse_latex(cb, self.deadline)
        if eb is None:
            return False
        rel_tol, lenient = self.ctx
        if not (_is_approx(ca) or _is_approx(cb)):
            rel_tol = 0.0  # both exact: sympy_equal then compares exactly (2^{20} is not 1048570)
        return sympy_equal(ea, eb, rel_tol, lenient, self.deadline)

    def eq(self, A, B) -> bool:
        ka, kb = A[0], B[0]
        if (ka == "eq") != (kb == "eq") and kb != "scalar" and ka != "scalar":
            # "(p,q) = (3,2)" against "(3,2)": a labelled value is the value
            e, o = (A, B) if ka == "eq" else (B, A)
            if not _is_label(e[1]):
                return False
            v = _struct(e[2])
            return self.eq(v, o) if ka == "eq" else self.eq(o, v)
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
            xs, ys = A[1], B[1]
            if len(xs) != len(ys):  # a solution listed twice is one solution: sets have no multiplicity
                xs, ys = _dedupe(xs), _dedupe(ys)
            return _unordered(xs, ys, self.eq)
        if {ka, kb} == {"bare", "scalar"}:
            # "\boxed{x+11} or \boxed{11+x}": one answer written two ways equals it (every item must)
            bl, sc = (A, B) if ka == "bare" else (B, A)
            return all(self.eq(x, sc) if ka == "bare" else self.eq(sc, x) for x in bl[1])
        if {ka, kb} == {"set", "scalar"}:
            st, sc = (A, B) if ka == "set" else (B, A)
            return len(st[1]) == 1 and (self.eq(st[1][0], sc) if ka == "set" else self.eq(sc, st[1][0]))
        if ka == "union" and kb == "union":
            return _unordered(A[1], B[1], self.eq)
        if {ka, kb} == {"union", "bare"}:
            # "x < -1 or x > 1" against (-\infty,-1) \cup (1,\infty): inequalities joined by "or" are a union
            un, bl = (A, B) if ka == "union" else (B, A)
            if not all(x[0] == "seq" and x[1] + x[2] in ("()", "(]", "[)", "[]") for x in bl[1]):
                return False
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
            if not (re.fullmatch(_VAR, e[1].strip()) or _is_label(e[1])):
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

_APPROX_SPLIT = "\\approx"


def _approx_forms(s: str, gold: bool) -> list[str]:
    """`\\frac{2}{3} \\approx 0.67`: a gold stands for each side (exact and rounded); a prediction for its
    exact side only, so "5 \\approx 7" cannot collect the reward for 7. A bare label ("x \\approx 11") drops."""
    if _APPROX_SPLIT not in s:
        return [s]
    parts = [p.strip() for p in _split_top(s, _APPROX_SPLIT)]
    parts = [p for p in parts if p and not re.fullmatch(_VAR, p)]
    if not parts:
        return [s]
    return parts if gold else parts[:1]


def is_equiv(pred: str, gold: str, *, percent_leniency: bool = False, timeout: float = 2.0,
             rel_tol: float = REL_TOL) -> bool:
    """Whether answer `pred` equals answer `gold` (LaTeX or plain text; prose is reduced to its final
    answer as in `extract_answer`). Never raises; a timeout is False.

    Integers, fractions and other exact values compare exactly; where one side is written as a decimal
    ("1.4142" for \\sqrt{2}), values within relative tolerance `rel_tol` (default `REL_TOL` = 1e-4, as ToRA and
    Qwen) match; `percent_leniency=True` also accepts gold*100 and gold/100 (the paper's ToRA behaviour).
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
        deadline = time.monotonic() + timeout
        for x in _approx_forms(a, gold=False):
            for y in _approx_forms(b, gold=True):
                if _equiv_normalized(x, y, rel_tol, percent_leniency, deadline):
                    return True
        return False
    except (Exception, Timeout):
        return False


def _equiv_normalized(a: str, b: str, rel_tol: float, lenient: bool, deadline: float) -> bool:
    ca, cb = _canon(a), _canon(b)
    if ca == cb:
        return True
    # exact numbers (all of GSM8K) need neither sympy nor a timer
    na, nb = _to_number(ca), _to_number(cb)
    if na is not None and nb is not None:
        # two decimals ("306956.64" vs "306956.63") are two exact values: the tolerance is for a decimal
        # that approximates a value written otherwise ("17.9999" for 18, "0.0833" for \\frac{1}{12})
        return _num_equal(na, nb, (rel_tol, lenient), _is_approx(ca) != _is_approx(cb))
    load_sympy()  # the first import takes ~1 s: never let the alarm interrupt it half-way
    left = deadline - time.monotonic()
    if left <= 0:
        return False

    def work():
        return _Comparer(rel_tol, lenient, deadline).eq(_struct(a), _struct(b))

    return bool(run_with_timeout(work, left))


def grade(text: str, gold: str, **kw) -> tuple[str | None, bool]:
    """(extracted answer, correct?) for a model's final turn against a gold answer string."""
    pred = extract_answer(text)
    if pred is None:
        return None, False
    return pred, is_equiv(pred, gold, **kw)
