"""The iterative pipeline end to end on a tiny model: stages, data, selection, resume, corruption, kill."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mdpo import synth
from mdpo.data import DataError, read_pairs
from mdpo.model import ModelConfig, build_model
from mdpo.pipeline import Pipeline
from mdpo.config import load_config
from mdpo.tokenizer import Tokenizer
from mdpo.trajectory import Role, read_trajectories, write_trajectories
from mdpo.weights import save_pretrained

ROOT = Path(__file__).resolve().parents[1]

YAML = """
model: {{name_or_path: {init}, dtype: float32, attn_impl: sdpa}}
data: {{train: [{prompts}], heldout: 4, prompts_per_iteration: 6}}
rollout: {{n_current: 3, n_previous: 1, temperature: 1.0, max_new_tokens_per_turn: 24, max_turns: 2,
          max_length: 160, batch_size: 8, executor_timeout: 5.0}}
loss: {{type: {loss}, beta: 0.1}}
sft: {{data: {sft}, lr: 5.0e-3, epochs: 8, global_batch_size: 8, warmup_steps: 2}}
optimizer: {{lr: 1.0e-3}}
training: {{iterations: 2, global_batch_size: 2, micro_batch_size: 2, warmup_steps: 1, eval_every: 1,
           activation_checkpointing: false, schedule: constant}}
eval: {{sets: [{test}], limit: 6, heldout_limit: 4, max_turns: 2, max_new_tokens_per_turn: 24, batch_size: 8}}
checkpoint: {{every: 0}}
"""


def problem(i: int, gold: int) -> dict:
    return {"id": f"q{i}", "question": f"Pick {i}.", "gold": str(gold)}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A task a 2-layer model learns in seconds: print 1 or 2, then box the printed number; gold is 1 or 2.

    The SFT data picks 1 or 2 at random, so sampled trajectories of one prompt are both right and wrong and
    every stage (pairs, training, selection) has work to do.
    """
    d = tmp_path_factory.mktemp("pipe")
    rng = random.Random(0)
    probs = [problem(i, rng.choice([1, 2])) for i in range(40)]
    texts = [p["question"] for p in probs] + ["```python\nprint(1)\n```", "The answer is \\boxed{2}."] * 20
    tok = Tokenizer(synth.train_tokenizer(texts + synth.corpus(synth.make_problems(50, 0, "c"), 0),
                                          whole_numbers=0))
    sft = []
    for i, p in enumerate(probs):
        x = rng.choice("12")
        turns = [(f"```python\nprint({x})\n```", x), (f"The answer is \\boxed{{{x}}}.", None)]
        sft.append(synth.build_trajectory(tok, p, turns))
    write_trajectories(d / "sft.jsonl", sft * 5)
    with open(d / "prompts.jsonl", "w") as f:
        for p in probs[:16]:
            f.write(json.dumps({"idx": p["id"], "question": p["question"], "answer": p["gold"]}) + "\n")
    with open(d / "test.jsonl", "w") as f:
        for p in probs[16:22]:
            f.write(json.dumps({"idx": p["id"], "question": p["question"], "answer": p["gold"]}) + "\n")
    cfg = ModelConfig(family="gemma", vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=2, num_kv_heads=1, head_dim=16, max_position_embeddings=256)
    save_pretrained(build_model(cfg, seed=0), d / "init", tokenizer=tok)
    return d


def write_config(d: Path, loss: str = "mdpo") -> Path:
    path = d / f"{loss}.yaml"
    path.write_text(YAML.format(init=d / "init", prompts=d / "prompts.jsonl", sft=d / "sft.jsonl",
                                test=d / "test.jsonl", loss=loss))
    return path


def stable(results: dict) -> dict:
    """results.json without wall-clock fields."""
    out = json.loads(json.dumps(results))
    for r in out.values():
        for k in ("tokens_per_s", "step_time_s", "peak_mem_gb"):
            r.get("train", {}).pop(k, None)
    return out


STDERR: dict[str, str] = {}  # what the module's pipeline run wrote to stderr


@pytest.fixture(scope="module")
def run(setup):
    import contextlib
    import io

    from mdpo import executor

    cfg = load_config(write_config(setup))
    out = setup / "run"
    executor._ANNOUNCED.clear()  # as in a fresh process: an earlier test file may have announced already
    buf = io.StringIO()
    with contextlib.redirect_stderr(buf):  # a module fixture has no capsys
        results = Pipeline(cfg, out).run()
    STDERR["run"] = buf.getvalue()
    return out, results


def naive_filter_counts(trajs, max_length: int, max_answer_chars: int = 20) -> dict:
    """The paper's filters (FilterConfig defaults) written out plainly, not through mdpo.data: each dropped
    trajectory counts for the first filter that removes it; duplicates are looked for among survivors only."""
    counts = {"input": len(trajs), "no_tool_call": 0, "long_answer": 0, "overlong": 0, "correct_after_error": 0,
              "duplicate_first_turn": 0, "kept": 0}
    seen = set()
    for t in trajs:
        if Role.TOOL not in t.roles:
            why = "no_tool_call"
        elif t.answer is not None and len(t.answer) > max_answer_chars:
            why = "long_answer"
        elif len(t.tokens) > max_length or t.finish_reason in ("max_turns", "max_length", "max_new_tokens"):
            why = "overlong"
        elif t.correct is True and t.meta["tool_status"][-1] != "ok":
            why = "correct_after_error"
        else:
            first = tuple(x for x, r, k in zip(t.tokens, t.roles, t.turns) if k == 1 and r == Role.MODEL)
            why = "duplicate_first_turn" if (t.prompt_id, t.correct is True, first) in seen else "kept"
            seen.add((t.prompt_id, t.correct is True, first))
        counts[why] += 1
    return counts


def test_pipeline_stages_and_data(run):
    out, results = run
    assert sorted(results) == ["iter_0", "iter_1", "iter_2"]
    prompts = [json.loads(x) for x in (out / "prompts.jsonl").read_text().splitlines()]
    splits = [p["split"] for p in prompts]
    assert splits.count("heldout") == 4 and splits.count("iter_1") == 6 and splits.count("iter_2") == 6
    for it in (1, 2):
        d = out / f"iter_{it}"
        ids = {p["id"] for p in prompts if p["split"] == f"iter_{it}"}
        cur = list(read_trajectories(d / "rollout.jsonl"))
        # Iteration 1 has no previous model (rollout.first_previous unset): all 3 + 1 samples from the policy.
        assert len(cur) == 6 * (4 if it == 1 else 3) and {t.prompt_id for t in cur} == ids
        prev = d / "rollout_prev.jsonl"
        assert prev.exists() == (it == 2)
        if it == 2:
            assert len(list(read_trajectories(prev))) == 6
            # Sample ids are unique per prompt across the two models: the previous model's follow the policy's.
            assert {t.sample_id for t in cur} == {0, 1, 2} and {t.sample_id for t in read_trajectories(prev)} == {3}
            assert {t.model for t in read_trajectories(prev)} == {str(out / "sft" / "final")}  # π1 = SFT
            assert {t.model for t in cur} == {str(out / "iter_1" / "policy")}
        info = results[f"iter_{it}"]
        f = info["data"]["filters"]
        assert f["input"] == len(cur) + (6 if it == 2 else 0)
        # The filters saw the policy's rollouts, then the previous model's, each sorted by (prompt, sample).
        seen = sorted(cur, key=lambda t: (t.prompt_id, t.sample_id))
        if it == 2:
            seen += sorted(read_trajectories(prev), key=lambda t: (t.prompt_id, t.sample_id))
        assert f == naive_filter_counts(seen, max_length=160)
        pairs = read_pairs(d / "data.jsonl")
        assert len(pairs) == info["data"]["examples"] > 0
        for chosen, rejected in pairs:
            assert chosen.correct is True and rejected.correct is not True and chosen.prompt_id == rejected.prompt_id
        sel = info["select"]
        steps = len(pairs) // 2
        cands = {f"step_{s}" for s in range(1, steps)} | {"final"}
        # One candidate (a single step, so no exports): nothing to choose, nothing scored.
        assert set(sel["scores"]) == (cands if len(cands) > 1 else set())
        assert sel["chosen"] == "final" if len(cands) == 1 else sel["scores"][sel["chosen"]] == max(sel["scores"].values())
        assert (d / "policy" / "config.json").is_file() and (d / "policy" / "tokenizer.model").is_file()
    for it in (0, 1, 2):  # test accuracy: a hand count over the graded trajectories of the eval file
        graded = list(read_trajectories(out / f"iter_{it}" / "eval" / "test.jsonl"))
        assert sorted(t.prompt_id for t in graded) == [f"q{i}" for i in range(16, 22)]
        k = sum(t.correct is True for t in graded)
        assert results[f"iter_{it}"]["eval"]["test"] == {**results[f"iter_{it}"]["eval"]["test"],
                                                         "pass@1": k / 6, "problems": 6}
    # The isolation the cells got is said once, at the start, though every sampling stage starts a pool.
    said = [ln for ln in STDERR["run"].splitlines() if "executor sandbox:" in ln]
    assert len(said) == 1 and STDERR["run"].lstrip().startswith(said[0])
    # Iteration 2 trains from iteration 1's selected model, whose reference log-probs are its own.
    cfg2 = (out / "iter_2" / "train" / "config.yaml").read_text()
    assert str(out / "iter_1" / "policy") in cfg2


def test_rerun_skips_finished_stages(run, setup):
    out, results = run
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.jsonl")}
    again = Pipeline(load_config(write_config(setup)), out).run()
    assert stable(again) == stable(results)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.jsonl")} == before  # nothing was redone


def test_corrupt_intermediate_file_is_reported(run, setup, tmp_path):
    out, _ = run
    copy = tmp_path / "run"
    import shutil
    shutil.copytree(out, copy)
    path = copy / "iter_1" / "rollout.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]))  # truncated
    with pytest.raises(DataError, match=str(path)):
        Pipeline(load_config(write_config(setup)), copy).run()
    path.write_text("".join(lines).replace('"correct": false', '"correct": true', 1))  # same rows, other bytes
    with pytest.raises(DataError, match="checksum"):
        Pipeline(load_config(write_config(setup)), copy).run()


def test_killed_run_resumes_to_the_same_results(run, setup, tmp_path):
    """Kill the pipeline in the middle of iteration 1's rollout and again in its training; the rerun ends equal."""
    out, results = run
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "mdpo.pipeline", str(write_config(setup)), "--out", str(killed)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), TQDM_DISABLE="1")
    for marker in (killed / "iter_1" / "rollout.jsonl", killed / "iter_1" / "train" / "metrics.jsonl"):
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while not (marker.exists() and marker.stat().st_size > 0) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (killed / "results.json").exists() or "iter_2" not in json.loads((killed / "results.json").read_text())
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    d = diff(stable(json.loads((killed / "results.json").read_text())), stable(results))
    assert d == [], "\n".join(map(str, d))
    for name in ("iter_1/rollout.jsonl", "iter_2/rollout.jsonl", "iter_2/eval/test.jsonl"):
        assert content(killed / name) == content(out / name), name
    assert [[content_of(t) for t in p] for p in read_pairs(killed / "iter_2" / "data.jsonl")] == \
        [[content_of(t) for t in p] for p in read_pairs(out / "iter_2" / "data.jsonl")]


def diff(a, b, path="") -> list:
    """Paths where two JSON values differ (a readable assertion)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [x for k in sorted(set(a) | set(b)) for x in diff(a.get(k), b.get(k), f"{path}.{k}")]
    return [] if a == b else [(path, a, b)]


def content_of(t) -> tuple:
    return t.prompt_id, t.sample_id, t.tokens, t.roles, t.turns, t.answer, t.correct, t.finish_reason


def content(path: Path) -> list:
    """A trajectory file's samples in a fixed order, without the model path (which names the output folder)."""
    return sorted(content_of(t) for t in read_trajectories(path))


def _rank(rank, port, config, out):
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TQDM_DISABLE="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        Pipeline(load_config(config, ["training.micro_batch_size=1"]), Path(out)).run()  # 2 ranks x 1 = 2
    finally:
        dist.destroy_process_group()


def test_two_ranks_share_the_work_and_match_one(run, setup, tmp_path):
    """Under torchrun-style ranks (2 gloo processes): the ranks split every sampling stage and train with FSDP2;
    the rollouts equal the single-process run's (a sample's randomness depends on its ids only) and so do the
    data, selection and test accuracy."""
    import socket

    import torch.multiprocessing as mp

    out1, results = run
    out2 = tmp_path / "two"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(port, str(write_config(setup)), str(out2)), nprocs=2, join=True)
    two = json.loads((out2 / "results.json").read_text())
    assert not list(out2.rglob("*.rank*.jsonl"))  # the per-rank shares were merged and removed
    for name in ("iter_0/eval/test.jsonl", "iter_1/rollout.jsonl", "iter_2/rollout.jsonl"):
        assert content(out2 / name) == content(out1 / name), name
    for it in ("iter_1", "iter_2"):
        assert two[it]["data"] == results[it]["data"]
        assert two[it]["select"]["chosen"] == results[it]["select"]["chosen"]
        assert two[it]["eval"]["test"]["pass@1"] == results[it]["eval"]["test"]["pass@1"]
        assert two[it]["train"]["loss"] == pytest.approx(results[it]["train"]["loss"], abs=1e-4)


SHARED = ROOT.parent / "shared" / "data"


@pytest.mark.skipif(not (SHARED / "gsm8k" / "train.jsonl").is_file(), reason="shared/data not beside the checkout")
def test_training_prompts_are_the_train_splits_and_augmented_rows_parse(tmp_path):
    from mdpo.pipeline import load_prompts, split_prompts

    cfg = load_config(ROOT / "experiments" / "gemma7b_mdpo.yaml", [f"data.data_dir={SHARED}"])
    prompts = load_prompts(cfg)
    # GSM8K train + MATH train (not the test sets), less the two MATH solutions whose \\boxed{} is empty
    # (train/number_theory/7115 and 7117, read by hand); "\\boxed 2" without braces does count.
    assert len(prompts) == 7473 + 7500 - 2
    ids = {p["id"] for p in prompts}
    assert "math:train/number_theory/7116.json" in ids
    assert not ids & {"math:train/number_theory/7115.json", "math:train/number_theory/7117.json"}
    first = prompts[0]
    assert first["id"] == "gsm8k:0" and first["gold"] == "72"  # Natalia's clips: 48 + 24
    assert all(p["id"].startswith("math:") for p in prompts[7473:])
    split = split_prompts(cfg, prompts)
    count = {s: sum(p["split"] == s for p in split) for s in ("heldout", "iter_1", "iter_2", "iter_3")}
    assert count["heldout"] == 1000 and count["iter_1"] == count["iter_2"] == count["iter_3"] == (14971 - 1000) // 3
    ids = [p["id"] for p in split]
    assert len(set(ids)) == len(ids)  # disjoint sets
    # The paper's augmented prompt sets: idx, type, problem or question, solution.
    aug = tmp_path / "aug.jsonl"
    aug.write_text(json.dumps({"idx": 7, "type": "MATH_Rephrased", "problem": "What is $1+1$?",
                               "solution": "It is $\\\\boxed{2}$."}) + "\n"
                   + json.dumps({"idx": 8, "type": "GSM_AnsAug", "question": "2 + 3?",
                                 "solution": "2 + 3 = 5\n#### 5"}) + "\n")
    cfg = load_config(ROOT / "experiments" / "gemma7b_mdpo.yaml", [f"data.train=[{aug}]"])
    got = [(p["id"], p["question"], p["gold"]) for p in load_prompts(cfg)]
    assert got == [("aug:7", "What is $1+1$?", "2"), ("aug:8", "2 + 3?", "5")]


def test_stage_sft_cli(run, setup, tmp_path, capsys):
    """`make sft EXP=...` = `python -m mdpo.pipeline CONFIG --stage sft`: trains only π0 (or finds it done);
    a config without sft.data is refused with exit code 2 and one line."""
    from mdpo.pipeline import main

    out1, _ = run
    out = tmp_path / "sft_only"
    assert main([str(write_config(setup)), "--out", str(out), "--stage", "sft"]) == 0
    assert capsys.readouterr().out.strip() == str(out / "sft" / "final")
    assert not (out / "iter_1").exists() and (out / "sft" / "final" / "tokenizer.model").is_file()
    a = (out / "sft" / "final" / "model.safetensors").read_bytes()
    assert a == (out1 / "sft" / "final" / "model.safetensors").read_bytes()  # same stage as inside `run`
    assert main([str(write_config(setup)), "--out", str(out), "--stage", "sft", "sft.data=null"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "sft.data" in err and "\n" not in err


def test_turn_dpo_iteration_samples_continuations_from_prefixes(run, setup, tmp_path):
    """loss.type turn_dpo: a branch stage samples continuations of cut trajectories; each starts with its source's
    prefix token for token, and the branch pairs share that prefix and differ in outcome."""
    out, _ = run
    cfg = load_config(write_config(setup, "turn_dpo"), [f"model.name_or_path={out / 'sft' / 'final'}", "sft.data=null",
                                                       "training.iterations=1", "loss.branch_samples=3"])
    res = Pipeline(cfg, tmp_path / "turn").run()
    d = tmp_path / "turn" / "iter_1"
    info = res["iter_1"]["data"]["branches"]
    rollouts = {(t.prompt_id, t.sample_id): t for t in read_trajectories(d / "rollout.jsonl")}
    conts = list(read_trajectories(d / "branches.jsonl"))
    assert info["points"] > 0 and len(conts) == 3 * info["points"] == info["continuations"]["trajectories"]
    for c in conts:
        cut, src = c.meta["branch"], rollouts[(c.meta["source"], c.meta["parent"])]
        assert c.prompt_id == f"{src.prompt_id}>{src.sample_id}@{cut}"
        assert c.tokens[:cut] == src.tokens[:cut] and c.roles[:cut] == src.roles[:cut]
        assert c.roles[cut] == Role.MODEL and c.turns[cut] == 2  # the cut is where model turn 2 begins
        assert c.meta["calls"][:1] == src.meta["calls"][:1] and c.model == str(out / "sft" / "final")
    pairs = read_pairs(d / "data.jsonl")
    branch_pairs = [p for p in pairs if "branch" in p[0].meta]
    assert len(branch_pairs) == info["pairs"] and len(pairs) == res["iter_1"]["data"]["examples"]
    for chosen, rejected in branch_pairs:
        cut = chosen.meta["branch"]
        assert rejected.meta["branch"] == cut and chosen.tokens[:cut] == rejected.tokens[:cut]
        assert chosen.correct is True and rejected.correct is not True


def test_share_reuses_an_identical_sampling_job(setup, tmp_path, monkeypatch):
    """Pipeline --share: a job sampled once is copied, byte for byte, into a second run; another seed samples."""
    from mdpo import pipeline

    cfg = load_config(write_config(setup))
    problems = [{"id": f"q{i}", "question": f"Pick {i}.", "gold": "1"} for i in range(3)]
    params = pipeline.rollout_params(cfg)
    share = tmp_path / "share"
    first = pipeline.sample(str(setup / "init"), problems, tmp_path / "a.jsonl", 2, params, cfg, "a", 4, 7, share)
    calls = []
    real = pipeline.sample_graded
    monkeypatch.setattr(pipeline, "sample_graded", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = pipeline.sample(str(setup / "init"), problems, tmp_path / "b.jsonl", 2, params, cfg, "b", 4, 7, share)
    assert calls == [] and (tmp_path / "b.jsonl").read_bytes() == (tmp_path / "a.jsonl").read_bytes()
    assert [t.to_json() for t in again] == [t.to_json() for t in first] and len(first) == 6
    pipeline.sample(str(setup / "init"), problems, tmp_path / "c.jsonl", 2, params, cfg, "c", 4, 8, share)
    assert calls == [1] and len(list(share.glob("*.jsonl"))) == 2
    # Greedy decoding draws nothing: a greedy job of another seed is the same job.
    greedy = pipeline.eval_params(cfg)
    pipeline.sample(str(setup / "init"), problems, tmp_path / "d.jsonl", 1, greedy, cfg, "d", 4, 7, share)
    pipeline.sample(str(setup / "init"), problems, tmp_path / "e.jsonl", 1, greedy, cfg, "e", 4, 9, share)
    assert calls == [1, 1] and (tmp_path / "e.jsonl").read_bytes() == (tmp_path / "d.jsonl").read_bytes()


def test_lora_runs_every_stage_and_exports_merged_models(run, setup, tmp_path):
    """lora.enabled through the pipeline's iterations (rollouts, M-DPO, selection, eval), from the module run's SFT
    model (a rank-4 adapter on the random 2-layer init does not learn the task; the SFT objective with adapters is
    in test_lora.py): every training stage writes a merged export, which rollouts and evaluation load, and beside
    it the adapter on that stage's base."""
    from safetensors.torch import load_file

    sft = run[0] / "sft" / "final"
    cfg = load_config(write_config(setup), ["lora.enabled=true", "lora.rank=4", "lora.alpha=8", "optimizer.lr=1.0e-2",
                                            f"model.name_or_path={sft}", "sft.data=null"])
    out = tmp_path / "lora"
    results = Pipeline(cfg, out).run()
    assert sorted(results) == ["iter_0", "iter_1", "iter_2"]
    stages = [(out / "iter_1" / "train" / "final", sft), (out / "iter_2" / "train" / "final", out / "iter_1" / "policy")]
    for final, base in stages:
        conf = json.loads((final / "adapter" / "adapter_config.json").read_text())
        assert Path(conf["base_model_name_or_path"]) == base and conf["r"] == 4
        merged, start = load_file(final / "model.safetensors"), load_file(base / "model.safetensors")
        assert merged.keys() == start.keys()  # a plain HF checkpoint: no adapter tensors in it
        changed = {k for k in merged if not (merged[k] == start[k]).all()}
        assert changed and all(k.endswith("_proj.weight") for k in changed), changed
    # Rollouts of iteration 2 came from iteration 1's merged policy.
    assert {t.model for t in read_trajectories(out / "iter_2" / "rollout.jsonl")} == {str(out / "iter_1" / "policy")}


@pytest.mark.parametrize("loss", ["grpo", "rloo"])
def test_online_rl_objectives_run_through_the_pipeline(run, setup, tmp_path, loss, monkeypatch):
    """GRPO / RLOO as pipeline iterations from the module run's SFT model: on-policy rollouts (no previous model),
    groups of one prompt scored in data.jsonl (all-equal groups left out and counted), training on the sampler's
    recorded log-probs (ratio 1 and the mismatch checked at the first step), evaluation only where eval.every says."""
    sft = run[0] / "sft" / "final"
    cfg = load_config(write_config(setup), [f"loss.type={loss}", f"model.name_or_path={sft}", "sft.data=null",
                                            "rollout.n_current=4", "rollout.n_previous=0", "eval.select=false",
                                            "eval.every=2", "training.iterations=3", "data.prompts_per_iteration=4",
                                            "optimizer.lr=1.0e-3"])
    out = tmp_path / loss
    from mdpo import eval as ev
    loads, real = [], ev.load_pretrained
    monkeypatch.setattr(ev, "load_pretrained", lambda path, *a, **k: loads.append(str(path)) or real(path, *a, **k))
    results = Pipeline(cfg, out).run()
    assert sorted(results) == ["iter_0", "iter_1", "iter_2", "iter_3"]
    # Rollouts of iterations 2 and 3 sample the model this process just trained, in memory: no reload from disk.
    assert not any("iter_1" in p or "iter_2" in p for p in loads), loads
    a = list(read_trajectories(out / "iter_2" / "rollout.jsonl"))
    assert a and {t.model for t in a} == {str(out / "iter_1" / "policy")}
    assert "eval" not in results["iter_1"] and "eval" in results["iter_2"] and "eval" in results["iter_3"]
    for it in (1, 2, 3):
        info = json.loads((out / f"iter_{it}" / "data_stats.json").read_text())
        assert info["groups"] == info["groups_trained"] + info["groups_all_equal"] + info["groups_of_one"]
        rows = list(read_trajectories(out / f"iter_{it}" / "data.jsonl"))
        assert len(rows) == info["examples"] and all("advantage" in t.meta for t in rows)
        by: dict = {}
        for t in rows:
            by.setdefault(t.prompt_id, []).append(t.meta["advantage"])
        assert all(abs(sum(a)) < 1e-4 for a in by.values())  # advantages are centred within each group
        m = [json.loads(x) for x in (out / f"iter_{it}" / "train" / "metrics.jsonl").read_text().splitlines()]
        if m:
            assert m[0]["ratio/mean"] == pytest.approx(1.0, abs=1e-4) and m[0]["mismatch/mean_abs"] < 1e-4
