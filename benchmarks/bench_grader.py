"""Grader agreement: mdpo's verdicts against the expected ones on tests/grading_cases.jsonl, beside Math-Verify's.

    python benchmarks/bench_grader.py [--cases tests/grading_cases.jsonl] [--show-misses]

Each row of the table is a real grading case (public graders' test suites, issue threads, real MATH golds and
real ToRA trajectories; its `source` says which) with the verdict it should get. mdpo grades with
`mdpo.grader.grade(pred, gold)`: the prediction text is extracted as in a rollout, the gold as a gold.
Math-Verify (optional: `pip install math-verify`; never imported by mdpo itself) grades as its README and
shared/reference/grading-executors.md recommend: `verify(parse(gold), parse(pred))`, a gold with no math
delimiters wrapped in `\\boxed{}`, a prediction with none wrapped in `$...$`.
Prints agreement per category for both, mdpo's slowest cases, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mdpo.grader import grade  # noqa: E402

_DELIM = re.compile(r"\$|\\\(|\\\[|\\boxed")


def mdpo_verdict(pred: str, gold: str) -> bool:
    return bool(grade(pred, gold)[1])


def math_verify_fn():
    """Math-Verify's verdict function, or None when the package is not installed."""
    try:
        from math_verify import parse, verify
    except ImportError:
        return None

    def run(pred: str, gold: str) -> bool:
        g = gold if _DELIM.search(gold) else "\\boxed{%s}" % gold
        p = pred if _DELIM.search(pred) else "$%s$" % pred
        try:
            return bool(verify(parse(g), parse(p)))
        except Exception:
            return False

    return run


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default=str(ROOT / "tests" / "grading_cases.jsonl"))
    ap.add_argument("--show-misses", action="store_true", help="print every case mdpo gets wrong")
    args = ap.parse_args(argv)
    cases = [json.loads(line) for line in open(args.cases) if line.strip()]
    mv = math_verify_fn()

    per = defaultdict(lambda: {"n": 0, "mdpo": 0, "mv": 0})
    slow, misses = [], []
    t_mdpo = t_mv = 0.0
    for c in cases:
        t0 = time.perf_counter()
        ok = mdpo_verdict(c["pred"], c["gold"]) == c["expected"]
        dt = time.perf_counter() - t0
        t_mdpo += dt
        slow.append((dt, c["pred"][:60], c["gold"][:40]))
        row = per[c["category"]]
        row["n"] += 1
        row["mdpo"] += ok
        if not ok:
            misses.append(c)
        if mv is not None:
            t0 = time.perf_counter()
            row["mv"] += mv(c["pred"], c["gold"]) == c["expected"]
            t_mv += time.perf_counter() - t0

    n = len(cases)
    tot_mdpo = sum(r["mdpo"] for r in per.values())
    tot_mv = sum(r["mv"] for r in per.values())
    print(f"{'category':22s} {'n':>5s} {'mdpo':>8s} {'math-verify':>12s}")
    for cat in sorted(per, key=lambda k: -per[k]["n"]):
        r = per[cat]
        mvs = f"{100 * r['mv'] / r['n']:11.1f}%" if mv else "         -"
        print(f"{cat:22s} {r['n']:5d} {100 * r['mdpo'] / r['n']:7.1f}% {mvs}")
    mvs = f"{100 * tot_mv / n:11.1f}%" if mv else "         -"
    print(f"{'total':22s} {n:5d} {100 * tot_mdpo / n:7.1f}% {mvs}")
    print(f"time: mdpo {t_mdpo:.1f} s ({1000 * t_mdpo / n:.1f} ms/case)"
          + (f", math-verify {t_mv:.1f} s" if mv else ", math-verify not installed"))
    print("slowest mdpo cases:", ", ".join(f"{dt * 1000:.0f} ms" for dt, _, _ in sorted(slow, reverse=True)[:3]))
    if args.show_misses:
        for c in misses:
            print(json.dumps({k: c[k] if len(str(c[k])) < 300 else str(c[k])[-300:] for k in c}, ensure_ascii=False))
    result = {"bench": "grader", "cases": n, "mdpo_agree": tot_mdpo, "mdpo_pct": round(100 * tot_mdpo / n, 2),
              "math_verify_agree": tot_mv if mv else None,
              "math_verify_pct": round(100 * tot_mv / n, 2) if mv else None,
              "per_category": {k: dict(v) for k, v in per.items()}, "mdpo_seconds": round(t_mdpo, 2)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
