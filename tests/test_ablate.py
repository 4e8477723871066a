"""mdpo.ablate (make ablate): --quick end to end at a tiny size, the intervals against a hand computation, resume.

The demo task at a size a test can afford teaches a model nothing (tests/test_demo.py), so an M-DPO iteration
would have no pairs. The bench is run here on the pipeline tests' learnable task (print 1 or 2, then box it),
put where mdpo.demo.prepare leaves its data; everything after that is the bench's own code path.
"""

from __future__ import annotations

import json
import math
import random
import time

import pytest

from mdpo import ablate, demo, synth
from mdpo.model import ModelConfig, build_model
from mdpo.tokenizer import Tokenizer
from mdpo.trajectory import read_trajectories, write_trajectories
from mdpo.weights import save_pretrained

SIZES = {"sft": 40, "prompts": 16, "test": 6, "tokenizer_corpus": 40}
ARCH = {"hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1,
        "head_dim": 16, "max_position_embeddings": 256}
OVERRIDES = ["data.heldout=4", "data.prompts_per_iteration=6", "rollout.n_current=3", "rollout.n_previous=1",
             "rollout.max_new_tokens_per_turn=24", "rollout.max_turns=2", "rollout.max_length=160",
             "rollout.batch_size=8", "sft.lr=5.0e-3", "sft.epochs=8", "sft.global_batch_size=8", "sft.warmup_steps=2",
             "optimizer.lr=1.0e-3", "training.iterations=1", "training.global_batch_size=2",
             "training.micro_batch_size=2", "training.warmup_steps=1", "training.eval_every=1", "eval.heldout_limit=4",
             "eval.max_turns=2", "eval.max_new_tokens_per_turn=24", "eval.batch_size=8", "checkpoint.every=0"]


def write_task(out):
    """The learnable task in mdpo.demo.prepare's layout (data/, init/, data/done.json for these sizes)."""
    rng = random.Random(0)
    probs = [{"id": f"q{i}", "question": f"Pick {i}.", "gold": str(rng.choice([1, 2]))} for i in range(40)]
    texts = [p["question"] for p in probs] + ["```python\nprint(1)\n```", "The answer is \\boxed{2}."] * 20
    tok = Tokenizer(synth.train_tokenizer(texts + synth.corpus(synth.make_problems(50, 0, "c"), 0), whole_numbers=0))
    sft = []
    for p in probs:
        x = rng.choice("12")
        sft.append(synth.build_trajectory(tok, p, [(f"```python\nprint({x})\n```", x),
                                                   (f"The answer is \\boxed{{{x}}}.", None)]))
    data = out / "data"
    data.mkdir(parents=True)
    write_trajectories(data / "sft.jsonl", sft * 5)
    demo.write_problems(data / "prompts.jsonl", probs[:16])
    demo.write_problems(data / "test.jsonl", probs[16:22])
    cfg = ModelConfig(family="gemma", vocab_size=tok.vocab_size, **ARCH)
    save_pretrained(build_model(cfg, seed=0), out / "init", tokenizer=tok)
    (data / "done.json").write_text(json.dumps({"sizes": {**demo.SIZES, **SIZES}, "model": {**demo.MODEL, **ARCH},
                                                "seed": 0}))


def args(out) -> list[str]:
    return (["--quick", "--out", str(out)] + [f"--size={k}={v}" for k, v in SIZES.items()]
            + [f"--arch={k}={v}" for k, v in ARCH.items()] + OVERRIDES)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("ablate") / "bench"
    write_task(out)
    t0 = time.monotonic()
    rc = ablate.main(args(out))
    return out, rc, time.monotonic() - t0


def test_quick_bench_end_to_end(quick, capsys):
    out, rc, _ = quick
    assert rc == 0
    variants, seeds = ablate.QUICK
    assert variants == ["mdpo", "dpo_nomask"] and seeds == 2
    # One SFT model for every run: each run's config names it and none has an SFT stage of its own.
    sft = out / "base" / "sft" / "final"
    assert (sft / "config.json").is_file()
    x = {}  # (variant, seed, iteration) -> 0/1 per test problem, counted by hand from the eval files
    for v in variants:
        for s in range(seeds):
            run = out / "runs" / v / f"seed{s}"
            cfg = (run / "config.yaml").read_text()
            assert f"name_or_path: {sft}" in cfg and f"seed: {42 + s}" in cfg and not (run / "sft").exists()
            assert ("mask: completion" in cfg) == (v == "dpo_nomask")
            for it in (0, 1):
                g = {t.prompt_id: float(bool(t.correct)) for t in read_trajectories(run / f"iter_{it}" / "eval" /
                                                                                    "test.jsonl")}
                x[v, s, it] = [g[k] for k in sorted(g)]
    # The shared sampling jobs: iteration 0's evaluation (greedy: no seed) is one job for all four runs, copied
    # byte for byte (the lines are in the order rows finished), and a seed's iteration-1
    # rollouts (the SFT model, the same prompts and seed) are one job for both variants.
    evals = {(out / "runs" / v / f"seed{s}" / "iter_0" / "eval" / "test.jsonl").read_bytes()
             for v in variants for s in range(seeds)}
    assert len(evals) == 1
    for s in range(seeds):
        r = [(out / "runs" / v / f"seed{s}" / "iter_1" / "rollout.jsonl").read_bytes() for v in variants]
        assert r[0] == r[1]
    assert (out / "runs" / "mdpo" / "seed0" / "iter_1" / "rollout.jsonl").read_bytes() != \
        (out / "runs" / "mdpo" / "seed1" / "iter_1" / "rollout.jsonl").read_bytes()
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    runs = {(r["variant"], r["seed"], r["iteration"]): r["accuracy"] for r in rows if r["kind"] == "run"}
    assert runs == {k: sum(v) / len(v) for k, v in x.items()}
    means = {(r["variant"], r["iteration"]): r for r in rows if r["kind"] == "variant"}
    for v in variants:
        m = means[v, 1]
        assert m["mean"] == pytest.approx(sum(sum(x[v, s, 1]) for s in range(2)) / 12)
        assert m["ci"] == pytest.approx(list(naive_interval([x[v, 0, 1], x[v, 1, 1]])[1:]))
    (d,) = [r for r in rows if r["kind"] == "difference"]
    diff = [[a - b for a, b in zip(x["dpo_nomask", s, 1], x["mdpo", s, 1])] for s in range(2)]
    assert [d["mean"], *d["ci"]] == pytest.approx(list(naive_interval(diff, lo=-1.0)))
    claims = {r["claim"]: r for r in rows if r["kind"] == "direction"}
    assert set(claims) == {"M-DPO > SFT", "masked > unmasked, DPO"}
    dirn = claims["masked > unmasked, DPO"]
    assert dirn["difference"] == pytest.approx(-d["mean"])  # a - b with a = M-DPO
    assert dirn["verdict"] == ablate.verdict(*dirn["ci"], True)
    timing = [r for r in rows if r["kind"] == "timing"][0]
    assert {"rollout", "train", "select", "eval", "sft"} <= set(timing["stage_seconds"])
    report = (out / "report.md").read_text()
    assert "| M-DPO (the recipe) |" in report and "| DPO, no mask |" in report and "masked > unmasked, DPO" in report
    assert (out / "ablation.png").stat().st_size > 10_000


def test_rerun_skips_finished_runs(quick, capsys):
    """Kill-and-rerun is resume: with every run finished, a rerun starts no pipeline and prints the same table."""
    out, _, first = quick
    before = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*.jsonl")}
    table = (out / "report.md").read_text().split("Wall time")[0]
    t0 = time.monotonic()
    assert ablate.main(args(out)) == 0
    assert time.monotonic() - t0 < first / 3
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*.jsonl")} == before
    assert (out / "report.md").read_text().split("Wall time")[0] == table


def test_other_overrides_in_the_same_folder_are_refused(quick, capsys):
    """A rerun with different overrides would mix two experiments in one table: one line, nothing run."""
    out, _, _ = quick
    assert ablate.main(args(out) + ["optimizer.lr=2.0e-3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {out / 'base'} was run with other overrides (optimizer.lr=2.0e-3): use another --out "
                   "or remove that folder")


def naive_interval(x, lo=0.0):
    """mean +- 1.96 sqrt(var over problems of the seed-mean / n + var over seeds of the problem-mean / S)."""
    S, n = len(x), len(x[0])
    per_problem = [sum(x[s][i] for s in range(S)) / S for i in range(n)]
    per_seed = [sum(r) / n for r in x]
    mean = sum(per_problem) / n

    def var(v):
        m = sum(v) / len(v)
        return sum((a - m) ** 2 for a in v) / (len(v) - 1)

    half = 1.96 * math.sqrt(var(per_problem) / n + var(per_seed) / S)
    return mean, max(lo, mean - half), min(1.0, mean + half)  # an accuracy lies in [0, 1], a difference in [-1, 1]


def test_interval_by_hand():
    # Two seeds, four problems. Problem means .5 1 0 .5 (var 1/6); seed means .75 .25 (var 1/8).
    x = [[1, 1, 0, 1], [0, 1, 0, 0]]
    m, lo, hi = ablate.interval(x, bounds=(-math.inf, math.inf))
    half = 1.96 * math.sqrt((1 / 6) / 4 + (1 / 8) / 2)
    assert (m, lo, hi) == pytest.approx((0.5, 0.5 - half, 0.5 + half))
    assert ablate.interval(x) == (0.5, 0.0, 1.0)  # half = 0.63: cut to what an accuracy can be
    # One seed: the problem term only.
    m, lo, hi = ablate.interval([[1, 0, 1, 1]], bounds=(-math.inf, math.inf))
    assert (m, hi - m) == pytest.approx((0.75, 1.96 * math.sqrt(0.25 / 4)))
    assert ablate.interval([[1, 1, 1, 0], [1, 1, 1, 1]])[2] == 1.0  # cut at 100%
    assert ablate.verdict(0.01, 0.2, True) == "holds" and ablate.verdict(-0.2, -0.01, False) == "reversed"
    assert ablate.verdict(-0.1, 0.1, True).startswith("not resolved")
    assert ablate.verdict(-0.1, 0.1, False).startswith("holds (no difference")


def test_bad_variant_is_one_line(tmp_path, capsys):
    assert ablate.main(["--variants", "mdpo,nope", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --variants: unknown nope; known: mdpo, mkto") and "\n" not in err
    assert not (tmp_path / "data").exists()  # checked before anything was prepared


def test_rl_variants_compare_at_equal_trajectory_budgets():
    """An online-RL variant runs k x M-DPO's iterations of 1/k the trajectories, evaluated every k-th: its column t
    is its iteration k t. A variant whose budget would not match is refused in one line."""
    from mdpo.config import ConfigError, load_config

    base = load_config(ablate.EXPERIMENT, ablate.VARIANTS["mdpo"][1])
    for name in ("grpo", "drgrpo", "rloo"):
        cfg = load_config(ablate.EXPERIMENT, ablate.VARIANTS[name][1])
        k = ablate.budget_scale(name, cfg, base)
        assert k == 4 and cfg.loss.type == name and cfg.rollout.n_previous == 0  # on-policy
        per = cfg.data.prompts_per_iteration * (cfg.rollout.n_current + cfg.rollout.n_previous)
        assert per * cfg.training.iterations == base.data.prompts_per_iteration * 8 * base.training.iterations
    assert ablate.budget_scale("mkto", load_config(ablate.EXPERIMENT, ablate.VARIANTS["mkto"][1]), base) == 1
    bad = load_config(ablate.EXPERIMENT, [*ablate.VARIANTS["grpo"][1], "eval.every=2"])
    with pytest.raises(ConfigError, match="variant grpo: training.iterations 12 against M-DPO's 3"):
        ablate.budget_scale("grpo", bad, base)
    bad = load_config(ablate.EXPERIMENT, [*ablate.VARIANTS["grpo"][1], "data.prompts_per_iteration=60"])
    with pytest.raises(ConfigError, match="equal numbers of trajectories"):
        ablate.budget_scale("grpo", bad, base)


def test_report_reads_an_rl_variant_at_its_budget_points(tmp_path):
    """report() with scale: M-DPO's iteration t against the RL variant's iteration 4 t (hand-made eval files)."""
    from mdpo.trajectory import Trajectory

    def evals(folder, it, correct):
        write_trajectories(folder / f"iter_{it}" / "eval" / "test.jsonl",
                           [Trajectory(f"p{i}", 0, [2], [0], [0], correct=c) for i, c in enumerate(correct)])

    out = tmp_path / "bench"
    for s in range(2):
        m, g = ablate.run_dir(out, "mdpo", s), ablate.run_dir(out, "grpo", s)
        for it, c in enumerate([[0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0]]):
            evals(m, it, c)
        for it, c in [(0, [0, 0, 0, 0]), (4, [1, 1, 1, 0]), (8, [1, 1, 1, 1]), (12, [1, 1, 1, 1])]:
            evals(g, it, c)
        evals(g, 5, [0, 0, 0, 0])  # an iteration between budget points is never read
    summary = ablate.report(out, ["mdpo", "grpo"], 2, 3, None, {"grpo": 4}, 1600)
    assert [round(x[0], 4) for x in summary["variants"]["grpo"]] == [0.0, 0.75, 1.0, 1.0]
    assert [round(x[0], 4) for x in summary["variants"]["mdpo"]] == [0.0, 0.25, 0.5, 0.75]
    assert [round(d[0], 4) for d in summary["differences"]["grpo"]] == [0.5, 0.5, 0.25]
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert {(r["iteration"], r["variant_iteration"]) for r in rows if r["kind"] == "run" and r["variant"] == "grpo"} \
        == {(0, 0), (1, 4), (2, 8), (3, 12)}
    report = (out / "report.md").read_text()
    assert "iteration t of GRPO is after 4 x t of its smaller iterations" in report and "min / run" in report
