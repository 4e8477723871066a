"""LaTeX / plain-text math answers -> sympy, and time-bounded sympy comparison (used by mdpo.grader).

A small recursive-descent parser for the subset of LaTeX that final answers use (no antlr / latex2sympy):
numbers, variables, + - * / ^, implicit products, \\frac, \\sqrt, \\binom, |x|, floor/ceil, factorials,
trig / log / exp. It refuses (returns None) on anything else, on words of 3+ letters, and on values too
large to build (9^{9^{9^9}}, 10000!). Comparison evaluates at random points with a relative tolerance and
falls back to `simplify`. The parser and the point evaluation raise `Timeout` past a wall-clock deadline;
`run_with_timeout` bounds a whole comparison, interrupting sympy itself (SIGALRM) where it can. The string
helpers mdpo.grader normalises with (braces, macro arguments, digit groups, exact numbers) live here too.
Exact values compare exactly; a tolerance is for decimal approximations only.
"""

from __future__ import annotations

import random
import re
import signal
import threading
import time
from fractions import Fraction

from mdpo.extraction import _match_brace

__all__ = ["ParseError", "Timeout", "GREEK", "MAX_LEN", "MAX_EXP10", "load_sympy", "parse_latex",
           "EXACT_REL_TOL", "sympy_equal", "equations_equivalent", "run_with_timeout"]

MAX_LEN = 3000  # answers longer than this are compared as strings only (no parsing / sympy)
MAX_EXP10 = 1000  # largest |n| accepted in 1e<n> / \times 10^{n}
_MAX_POW_BITS = 200_000  # refuse to build exact integer powers larger than this (9^{9^{9^9}})
_MAX_FACTORIAL = 5000
# Relative difference, at 30 significant digits, below which two exact values are "equal": far above the
# rounding noise of evaluating \sqrt{37-20\sqrt3} - (5-2\sqrt3), far below any decimal a model writes.
EXACT_REL_TOL = 1e-20

GREEK = ("alpha", "beta", "gamma", "delta", "epsilon", "varepsilon", "zeta", "eta", "theta", "vartheta",
         "iota", "kappa", "lambda", "mu", "nu", "xi", "rho", "sigma", "tau", "upsilon", "phi", "varphi",
         "chi", "psi", "omega", "Gamma", "Delta", "Theta", "Lambda", "Xi", "Sigma", "Phi", "Psi", "Omega")


class ParseError(Exception):
    """Not an answer this parser reads (callers fall back to string comparison)."""


class Timeout(BaseException):
    """Raised past a deadline or by the alarm; a BaseException so that sympy's `except Exception` blocks
    cannot swallow it."""


_sp = None


def load_sympy():
    """The sympy module, imported on first use (the import takes ~1 s)."""
    global _sp
    if _sp is None:
        import sympy
        _sp = sympy
    return _sp


# ----------------------------------------------------------------------------------------------------
# Parser
# ----------------------------------------------------------------------------------------------------

_TOKEN_RE = re.compile(r"""
  (?P<num>(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+(?![\d.]))?)
| (?P<cmd>\\[a-zA-Z]+|\\[{}|])
| (?P<word>[a-zA-Z]+)
| (?P<op>\*\*|[-+*/^_()\[\]{}|!,=<>'&])
| (?P<ws>\s+)
""", re.VERBOSE)

_FUNCS = {"sin", "cos", "tan", "cot", "sec", "csc", "arcsin", "arccos", "arctan", "sinh", "cosh", "tanh",
          "log", "ln", "exp", "sqrt", "asin", "acos", "atan", "abs"}
_CONST_WORDS = {"pi"}


def _tokenize(s: str) -> list[tuple[str, str]]:
    toks, pos, n = [], 0, len(s)
    while pos < n:
        m = _TOKEN_RE.match(s, pos)
        if not m:
            raise ParseError(f"bad char {s[pos]!r}")
        pos = m.end()
        kind = m.lastgroup
        val = m.group(kind)
        if kind == "ws":
            continue
        if kind == "word":
            if val in _FUNCS or val in _CONST_WORDS:
                toks.append(("cmd", "\\" + val))
            elif len(val) >= 3:
                # a word ("Evelyn", "east") is not a product of letters: leave it to string comparison
                raise ParseError(f"word {val!r}")
            else:
                toks.extend(("var", ch) for ch in val)
            continue
        toks.append((kind, val))
    toks.append(("end", ""))
    return toks


_TRIG = {"sin": "sin", "cos": "cos", "tan": "tan", "cot": "cot", "sec": "sec", "csc": "csc",
         "arcsin": "asin", "arccos": "acos", "arctan": "atan", "asin": "asin", "acos": "acos", "atan": "atan",
         "sinh": "sinh", "cosh": "cosh", "tanh": "tanh"}
_INVERSE = {"sin": "asin", "cos": "acos", "tan": "atan", "cot": "acot", "sec": "asec", "csc": "acsc"}
_ATOM_CMDS = {"frac", "sqrt", "binom", "pi", "infty", "lfloor", "lceil", "exp", "log", "ln", "abs",
              "{", "|", "overline"} | set(_TRIG) | set(GREEK)


class _Parser:
    def __init__(self, s: str, deadline: float):
        self.sp = load_sympy()
        self.toks = _tokenize(s)
        self.i = 0
        self.abs_depth = 0
        self.depth = 0
        self.deadline = deadline

    # -- token helpers
    def peek(self):
        return self.toks[self.i]

    def next(self):
        t = self.toks[self.i]
        self.i += 1
        return t

    def accept(self, kind, val=None):
        t = self.toks[self.i]
        if t[0] == kind and (val is None or t[1] == val):
            self.i += 1
            return True
        return False

    def expect(self, kind, val=None):
        if not self.accept(kind, val):
            raise ParseError(f"expected {val or kind}, got {self.peek()}")

    def parse(self):
        e = self.expr()
        if self.peek()[0] != "end":
            raise ParseError(f"trailing {self.peek()}")
        return e

    # -- grammar
    def expr(self):
        self.depth += 1
        if self.depth > 100:
            raise ParseError("too deep")
        if time.monotonic() > self.deadline:
            raise Timeout()
        node = self.term()
        while True:
            if self.accept("op", "+"):
                node = node + self.term()
            elif self.accept("op", "-"):
                node = node - self.term()
            else:
                break
        self.depth -= 1
        return node

    def starts_atom(self):
        k, v = self.peek()
        if k in ("num", "var"):
            return True
        if k == "op":
            return v in ("(", "[", "{") or (v == "|" and self.abs_depth == 0)
        if k == "cmd":
            name = v[1:]
            return name in _ATOM_CMDS and not (name == "|" and self.abs_depth > 0)
        return False

    def term(self):
        node = self.factor()
        while True:
            k, v = self.peek()
            if (k == "op" and v == "*") or (k == "cmd" and v in ("\\cdot", "\\times", "\\ast")):
                self.next()
                node = node * self.factor()
            elif (k == "op" and v == "/") or (k == "cmd" and v == "\\div"):
                self.next()
                den = self.factor()
                if den == 0:
                    raise ParseError("division by zero")
                node = node / den
            elif self.starts_atom():
                node = node * self.power()
            else:
                return node

    def factor(self):
        if self.accept("op", "-"):
            return -self.factor()
        if self.accept("op", "+"):
            return self.factor()
        return self.power()

    def power(self):
        base = self.postfix()
        if self.accept("op", "^") or self.accept("op", "**"):
            exp = self.exponent()
            base = self.pow(base, exp)
        return base

    def exponent(self):
        if self.peek() == ("op", "{"):
            return self.group()
        if self.accept("op", "-"):
            return -self.exponent()
        return self.postfix()

    def pow(self, base, exp):
        sp = self.sp
        if exp.is_Number and base.is_Number:
            if base.is_Rational and exp.is_Rational:
                bits = max(abs(int(base.p)).bit_length(), abs(int(base.q)).bit_length(), 1)
                if abs(exp) * bits > _MAX_POW_BITS:
                    raise ParseError("power too large")  # 9^{9^{9^9}}: never materialise
            elif abs(exp) > 10 ** 6:
                raise ParseError("power too large")
        elif exp.is_Number and abs(exp) > 10 ** 4:
            raise ParseError("power too large")
        if base == 0 and exp.is_Number and exp.is_negative:
            raise ParseError("division by zero")
        return sp.Pow(base, exp)

    def postfix(self):
        node = self.atom()
        while True:
            if self.accept("op", "!"):
                if node.is_Number and (not node.is_Integer or node > _MAX_FACTORIAL or node < 0):
                    raise ParseError("factorial")
                node = self.sp.factorial(node)
            elif self.peek() == ("op", "'"):
                raise ParseError("prime")
            else:
                return node

    def group(self):
        self.expect("op", "{")
        e = self.expr()
        self.expect("op", "}")
        return e

    def arg(self):
        """A TeX macro argument: {group} or one token."""
        if self.peek() == ("op", "{"):
            return self.group()
        k, v = self.peek()
        if k == "num" and len(v) > 1:  # \frac12: the argument is the single digit 1
            self.toks[self.i] = ("num", v[1:])
            return self.number(v[0])
        return self.atom()

    def number(self, text):
        m = re.match(r"^(.*?)(?:[eE]([+-]?\d+))?$", text)
        mant, exp = m.group(1), m.group(2)
        if exp is not None and abs(int(exp)) > MAX_EXP10:
            raise ParseError("exponent")
        f = Fraction(mant) * (Fraction(10) ** int(exp) if exp else 1)
        return self.sp.Rational(f.numerator, f.denominator)

    def func_arg(self):
        """Argument of \\sin, \\log, ...: (...), {...}, or an implicit product of powers (\\sin 2x)."""
        if self.peek() == ("op", "("):
            return self.atom()
        if self.peek() == ("op", "{"):
            return self.group()
        node = self.factor()
        while self.starts_atom() and not (self.peek()[0] == "cmd" and self.peek()[1][1:] in _TRIG | {"log", "ln", "exp"}):
            node = node * self.power()
        return node

    def atom(self):
        sp = self.sp
        k, v = self.next()
        if k == "num":
            node = self.number(v)
            if self.peek() == ("op", "_"):
                raise ParseError("base subscript")  # 52_8: compared as strings
            return node
        if k == "var":
            name = v
            if self.accept("op", "_"):
                name += "_" + self.subscript()
            if name == "i":
                return sp.I
            if name == "e":
                return sp.E
            return sp.Symbol(name)
        if k == "op":
            if v in ("(", "["):
                close = ")" if v == "(" else "]"
                e = self.expr()
                if not (self.accept("op", close) or self.accept("op", ")" if close == "]" else "]")):
                    raise ParseError("unclosed")
                return e
            if v == "{":
                e = self.expr()
                self.expect("op", "}")
                return e
            if v == "|":
                self.abs_depth += 1
                e = self.expr()
                self.abs_depth -= 1
                self.expect("op", "|")
                return sp.Abs(e)
            raise ParseError(f"unexpected {v}")
        if k == "cmd":
            name = v[1:]
            if name == "frac":
                num = self.arg()
                den = self.arg()
                if den == 0:
                    raise ParseError("division by zero")
                return num / den
            if name == "binom":
                a, b = self.arg(), self.arg()
                if (a.is_Number and abs(a) > _MAX_FACTORIAL) or (b.is_Number and abs(b) > _MAX_FACTORIAL):
                    raise ParseError("binomial")
                return sp.binomial(a, b)
            if name == "sqrt":
                if self.accept("op", "["):
                    idx = self.expr()
                    self.expect("op", "]")
                    x = self.arg()
                    if idx.is_Integer and idx % 2 == 1 and x.is_Number and x.is_negative:
                        return -sp.Pow(-x, 1 / idx)  # real odd root: \sqrt[3]{-8} = -2
                    return sp.Pow(x, 1 / idx)
                return sp.sqrt(self.arg())
            if name == "pi":
                return sp.pi
            if name == "infty":
                return sp.oo
            if name in GREEK:
                return sp.Symbol(name)
            if name == "lfloor":
                e = self.expr()
                self.expect("cmd", "\\rfloor")
                return sp.floor(e)
            if name == "lceil":
                e = self.expr()
                self.expect("cmd", "\\rceil")
                return sp.ceiling(e)
            if name == "|":
                e = self.expr()
                self.expect("cmd", "\\|")
                return sp.Abs(e)
            if name == "overline":
                raise ParseError("overline")
            if name in _TRIG or name in ("log", "ln", "exp", "abs"):
                return self.function(name)
        raise ParseError(f"unsupported {v!r}")

    def subscript(self):
        if self.peek() == ("op", "{"):
            j = self.i + 1
            parts = []
            while self.toks[j][0] in ("num", "var"):  # the final ("end", "") token stops the scan
                parts.append(self.toks[j][1])
                j += 1
            if self.toks[j] != ("op", "}") or not parts:
                raise ParseError("subscript")
            self.i = j + 1
            return "".join(parts)
        k, v = self.next()
        if k not in ("num", "var"):
            raise ParseError("subscript")
        return v

    def function(self, name):
        sp = self.sp
        base = None
        power = None
        if name == "log" and self.accept("op", "_"):
            base = self.arg()
        if self.accept("op", "^"):
            power = self.exponent()
        x = self.func_arg()
        if name in _TRIG:
            fname = _TRIG[name]
            if power is not None and power == -1 and name in _INVERSE:
                return getattr(sp, _INVERSE[name])(x)
            val = getattr(sp, fname)(x)
        elif name == "ln" or (name == "log" and base is None):
            val = sp.log(x)  # MATH's \log is natural unless a base is given
        elif name == "log":
            val = sp.log(x, base)
        elif name == "exp":
            val = sp.exp(x)
        else:
            val = sp.Abs(x)
        return self.pow(val, power) if power is not None else val


_MIXED_SUB_RE = re.compile(r"(?<![\w.}\)^_])(\d+)\s*\\frac\{(\d+)\}\{(\d+)\}")


def _mixed_to_sum(s: str) -> str:
    """`1\\frac{4}{5}` -> `(1+\\frac{4}{5})` for proper fractions (ToRA/Qwen read it as 4/5)."""
    def rep(m):
        a, b = int(m.group(2)), int(m.group(3))
        if 0 < a < b:
            return "(%s+\\frac{%s}{%s})" % m.groups()
        return m.group(0)
    return _MIXED_SUB_RE.sub(rep, s)


def parse_latex(s: str, deadline: float = float("inf")):
    """The sympy expression for a LaTeX / plain-text answer, or None when it cannot be read.

    Never raises, except `Timeout` once `time.monotonic()` passes `deadline`.
    """
    if len(s) > MAX_LEN:
        return None
    try:
        return _Parser(_mixed_to_sum(s), deadline).parse()
    except Exception:  # ParseError, sympy errors, RecursionError; Timeout (a BaseException) propagates
        return None


# ----------------------------------------------------------------------------------------------------
# LaTeX string helpers for mdpo.grader: braces, macro arguments, digit groups, exact numbers
# ----------------------------------------------------------------------------------------------------


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


# A decimal literal with a nonzero fractional part ("3.14", "1.2e-5") is an approximation, the only kind of
# number a tolerance applies to. Integers, fractions, 0.\overline{3} and "18.0" (normalised to 18) are exact.
def _is_approx(c: str) -> bool:
    """Whether the canonical answer `c` contains a decimal approximation (a tolerance may apply)."""
    return "." in c and bool(re.search(r"\d\.\d|(?<!\d)\.\d", re.sub(r"\\overline\{\d+\}", "", c)))


# ----------------------------------------------------------------------------------------------------
# Comparison
# ----------------------------------------------------------------------------------------------------

def _sym_close(va, vb, rel_tol) -> bool | None:
    """Compare two evaluated sympy numbers (maybe complex); None when not comparable numbers."""
    sp = load_sympy()
    if va == vb:
        return True
    if va.has(sp.nan, sp.zoo) or vb.has(sp.nan, sp.zoo) or not va.is_number or not vb.is_number:
        return None
    if va.has(sp.oo, -sp.oo) or vb.has(sp.oo, -sp.oo):
        return False
    diff = abs(sp.N(va - vb, 30))
    scale = max(abs(sp.N(va, 30)), abs(sp.N(vb, 30)))
    if not (diff.is_Number and scale.is_Number):
        return None
    return bool(diff <= rel_tol * scale)


def _rand_points(symbols, k, seed=20240607):
    sp = load_sympy()
    rng = random.Random(seed)
    # positive, non-integer, distinct values: away from the poles and branch cuts of the usual answers
    return [{s: sp.Float(0.3 + 2.2 * rng.random(), 30) for s in symbols} for _ in range(k)]


def sympy_equal(ea, eb, rel_tol: float, lenient: bool = False, deadline: float = float("inf")) -> bool:
    """Whether two sympy expressions are equal: numbers within relative tolerance `rel_tol` (`lenient` also
    accepts eb*100 and eb/100), expressions at 6 random points, else `simplify(ea - eb) == 0`.
    `rel_tol=0` compares exactly (rationals as they are, other values to `EXACT_REL_TOL`).

    Never raises (a sympy error is False), except `Timeout` once `time.monotonic()` passes `deadline`.
    """
    try:
        return _sympy_equal(ea, eb, rel_tol, lenient, deadline)
    except Exception:
        return False


def _sympy_equal(ea, eb, rel_tol, lenient, deadline) -> bool:
    sp = load_sympy()
    if ea == eb:
        return True
    if ea.has(sp.nan, sp.zoo) or eb.has(sp.nan, sp.zoo):  # \frac{1}{0}-like junk is never an answer
        return False
    if rel_tol <= 0:
        # exact comparison: rationals (2^{20} is built exactly) compare as they are; irrational constants
        # and expressions are evaluated at 30 digits, where only rounding noise is left (EXACT_REL_TOL)
        if ea.is_Rational and eb.is_Rational:
            return bool(ea == eb) or (lenient and (ea == eb * 100 or ea == eb / 100))
        rel_tol = EXACT_REL_TOL
    syms = sorted(ea.free_symbols | eb.free_symbols, key=str)
    if not syms:
        va, vb = sp.N(ea, 30), sp.N(eb, 30)
        r = _sym_close(va, vb, rel_tol)
        if r is None:
            return bool(sp.simplify(ea - eb) == 0)
        if not r and lenient and vb.is_real:
            r = bool(_sym_close(va, vb * 100, rel_tol) or _sym_close(va, vb / 100, rel_tol))
        return r
    good = 0
    for pt in _rand_points(syms, 6):
        if time.monotonic() > deadline:
            raise Timeout()
        va, vb = ea.evalf(30, subs=pt), eb.evalf(30, subs=pt)
        r = _sym_close(va, vb, rel_tol)
        if r is False:
            return False
        if r:
            good += 1
    if good >= 3:
        return True
    return bool(sp.simplify(ea - eb) == 0)


def equations_equivalent(lhs1, rhs1, lhs2, rhs2, rel_tol: float) -> bool:
    """`lhs1 = rhs1` vs `lhs2 = rhs2` (sympy expressions): equal when lhs1 - rhs1 is a constant nonzero
    multiple of lhs2 - rhs2."""
    sp = load_sympy()
    d1, d2 = lhs1 - rhs1, lhs2 - rhs2
    syms = sorted(d1.free_symbols | d2.free_symbols, key=str)
    if d1.free_symbols != d2.free_symbols:
        return False
    ratio = None
    for pt in _rand_points(syms, 5):
        v1, v2 = sp.N(d1.subs(pt), 30), sp.N(d2.subs(pt), 30)
        if not (v1.is_number and v2.is_number) or v1.has(sp.nan, sp.zoo) or v2.has(sp.nan, sp.zoo):
            continue
        if abs(v2) < 1e-20:
            if abs(v1) > 1e-20:
                return False
            continue
        q = v1 / v2
        if ratio is None:
            ratio = q
        elif not _sym_close(q, ratio, rel_tol):
            return False
    return ratio is not None and abs(ratio) > 1e-20


# ----------------------------------------------------------------------------------------------------
# Wall-clock limit
# ----------------------------------------------------------------------------------------------------

def _alarm_handler(signum, frame):
    raise Timeout()


def run_with_timeout(fn, timeout: float):
    """fn() under a wall-clock limit; None on timeout. SIGALRM in the main thread (interrupts sympy),
    else a daemon thread joined with a timeout (the thread is abandoned, its result ignored)."""
    if timeout is None or timeout <= 0:
        timeout = 1e-3
    use_signal = (hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread())
    if use_signal:
        try:
            prev_handler = signal.signal(signal.SIGALRM, _alarm_handler)
        except (ValueError, OSError):
            use_signal = False
    if use_signal:
        t0 = time.monotonic()
        prev_delay, prev_interval = signal.getitimer(signal.ITIMER_REAL)
        try:
            try:
                # an outer alarm due sooner keeps its deadline
                signal.setitimer(signal.ITIMER_REAL, min(timeout, prev_delay) if prev_delay else timeout)
                return fn()
            except Timeout:
                return None
        finally:
            while True:  # the alarm may fire during clean-up itself
                try:
                    signal.setitimer(signal.ITIMER_REAL, 0)
                    signal.signal(signal.SIGALRM, prev_handler)
                    if prev_delay:
                        left = prev_delay - (time.monotonic() - t0)
                        signal.setitimer(signal.ITIMER_REAL, max(left, 1e-4), prev_interval)
                    break
                except Timeout:
                    continue
    box: list = []

    def worker():
        try:
            box.append(fn())
        except BaseException:
            box.append(None)

    th = threading.Thread(target=worker, daemon=True)
    th.start()
    th.join(timeout)
    return box[0] if box else None


# ----------------------------------------------------------------------------------------------------
# Public comparison
