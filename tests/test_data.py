"""Filters, pairs, KTO / RAFT sets, held-out split and pair files, on hand-built trajectories (no model)."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json

import pytest

from mdpo.config import FilterConfig
from mdpo.data import (FILTERS, DataError, apply_filters, build_kto, build_pairs, build_raft, file_digest,
                       first_model_turn, pair_stats, read_pairs, split_heldout, verify_file, write_pairs)
from mdpo.trajectory import Role, Trajectory, write_trajectories

P, M, T, S = (int(r) for r in (Role.PROMPT, Role.MODEL, Role.TOOL, Role.TEMPLATE))


def traj(pid="p", sid=0, first=(40, 41), calls=1, correct=True, answer="7", finish="end_of_turn",
         status="default") -> Trajectory:
    """Prompt (3 tokens), `calls` model turns each followed by a tool turn, then a 2-token final turn.

    Length: 3 + (len(first) + 4) + 5 * (calls - 1) + 2 with calls >= 1; 3 + len(first) with calls == 0
    (then `first` is the final answer turn). status "default" = every call "ok"; None = no tool_status.
    """
    tokens, roles, turns = [2, 10, 11], [P, P, P], [0, 0, 0]

    def add(ids, role, turn):
        tokens.extend(ids)
        roles.extend([role] * len(ids))
        turns.extend([turn] * len(ids))

    for c in range(calls):
        add(first if c == 0 else (50 + c,), M, c + 1)
        add([90], S, c + 1)  # <end_of_turn>\n closing the code turn
        add([91, 92], T, c + 1)  # the tool's user turn
        add([93], S, c + 2)  # <start_of_turn>model\n of the next turn
    add(first if calls == 0 else (60, 61), M, calls + 1 if calls else 1)
    meta = {} if status is None else {"tool_status": ["ok"] * calls if status == "default" else list(status)}
    return Trajectory(pid, sid, tokens, roles, turns, finish_reason=finish, answer=answer, correct=correct,
                      meta=meta)


def ids(ts):
    return [(t.prompt_id, t.sample_id) for t in ts]


# ---------------------------------------------------------------- filters
def test_helper_shapes():
    t = traj(first=(40, 41), calls=2)
    assert len(t.tokens) == 3 + 6 + 5 + 2 == 16
    assert first_model_turn(t) == (40, 41)
    assert t.roles.count(T) == 4 and t.num_turns == 3
    assert first_model_turn(traj(first=(7, 8, 9), calls=0)) == (7, 8, 9)


def filter_cases():
    """(trajectory, filter that must remove it or None), in input order; max_length is 20."""
    return [
        (traj("p", 0, first=(40, 41)), None),  # the reference winner
        (traj("p", 1, first=(42,), calls=0, answer="x" * 30), "no_tool_call"),  # also long: first filter wins
        (traj("p", 2, first=(43,), answer="x" * 21, finish="max_turns"), "long_answer"),  # also overlong
        (traj("p", 3, first=(44,), answer="x" * 20), None),  # exactly max_answer_chars: kept
        (traj("p", 4, first=(45,), correct=False, answer=None), None),  # no answer: a loser, kept
        (traj("p", 5, first=(46,), finish="max_new_tokens"), "overlong"),
        (traj("p", 6, first=(47,), finish="max_length", correct=False), "overlong"),
        (traj("p", 7, first=(48, 48), calls=3), "overlong"),  # 3 + 6 + 10 + 2 = 21 > max_length
        (traj("p", 8, first=(49, 49, 49, 49, 49, 49), calls=2), None),  # 3 + 10 + 5 + 2 = 20 = max_length
        (traj("p", 9, first=(51, 52), calls=2, status=["ok", "error"]), "correct_after_error"),
        (traj("p", 10, first=(53,), calls=2, status=["error", "ok"]), None),  # the last call worked
        (traj("p", 11, first=(54,), status=["timeout"], correct=False), None),  # losers may follow an error
        (traj("p", 13, first=(40, 41)), "duplicate_first_turn"),  # same first turn and label as p/0
        (traj("p", 14, first=(40, 41), correct=False), None),  # same first turn, other label
        (traj("q", 0, first=(40, 41)), None),  # same first turn, other prompt
        (traj("p", 15, first=(40, 41), answer="y" * 25), "long_answer"),  # duplicate, but long first
        (traj("r", 0, first=(70, 71), finish="max_turns"), "overlong"),  # the first copy is dropped ...
        (traj("r", 1, first=(70, 71)), None),  # ... so this one is no duplicate of a kept trajectory
        (traj("p", 16, first=(80, 81), correct=False), None),
        (traj("p", 17, first=(80, 81), correct=None, answer=None), "duplicate_first_turn"),  # None is a loser
    ]


def test_each_filter_removes_exactly_its_cases():
    cases = filter_cases()
    kept, counts = apply_filters([t for t, _ in cases], FilterConfig(), max_length=20)
    assert ids(kept) == ids([t for t, why in cases if why is None])
    assert counts == {"input": 20, "no_tool_call": 1, "long_answer": 2, "overlong": 4, "correct_after_error": 1,
                      "duplicate_first_turn": 2, "kept": 10}
    assert list(counts) == ["input", *FILTERS, "kept"]
    assert counts["input"] == counts["kept"] + sum(counts[f] for f in FILTERS)


def test_filter_names_are_config_switches():
    fields = {f.name: f.type for f in dataclasses.fields(FilterConfig)}
    assert all(fields[name] in (bool, "bool") for name in FILTERS)


def test_switched_off_filter_passes_to_the_next():
    ts = [traj("p", 1, first=(42,), calls=0, answer="x" * 30),  # no call and long
          traj("p", 2, first=(43,), answer="x" * 21, finish="max_turns"),  # long and overlong
          traj("p", 3, first=(44,), calls=2, status=["ok", "memory"])]  # correct after a failed call
    _, counts = apply_filters(ts, FilterConfig(), max_length=100)
    assert [counts[f] for f in FILTERS] == [1, 1, 0, 1, 0]
    _, counts = apply_filters(ts, FilterConfig(no_tool_call=False), max_length=100)
    assert [counts[f] for f in FILTERS] == [0, 2, 0, 1, 0]
    _, counts = apply_filters(ts, FilterConfig(long_answer=False), max_length=100)
    assert [counts[f] for f in FILTERS] == [1, 0, 1, 1, 0]
    kept, counts = apply_filters(ts, FilterConfig(correct_after_error=False), max_length=100)
    assert ids(kept) == [("p", 3)] and counts["correct_after_error"] == 0
    # 30 characters is not longer than max_answer_chars = 30: with the tool filter off, p/1 is kept
    kept, counts = apply_filters(ts, FilterConfig(no_tool_call=False, max_answer_chars=30), max_length=100)
    assert ids(kept) == [("p", 1)] and [counts[f] for f in FILTERS] == [0, 0, 1, 1, 0]


def test_all_filters_off_keeps_everything():
    off = FilterConfig(no_tool_call=False, long_answer=False, correct_after_error=False,
                       duplicate_first_turn=False, overlong=False)
    ts = [t for t, _ in filter_cases()]
    kept, counts = apply_filters(ts, off, max_length=5)
    assert ids(kept) == ids(ts)
    assert counts == {"input": 20, **{f: 0 for f in FILTERS}, "kept": 20}


def test_a_tool_call_without_a_recorded_status_is_an_error():
    """A missing meta["tool_status"] used to mean "keep": correct_after_error then did nothing, silently. The
    sampler records a status per call, so a trajectory with tool turns and no status is not its output."""
    bare = traj("p", 12, first=(55,), status=None)  # correct, one call, status unknown
    with pytest.raises(DataError, match=r"p/12 called the tool but has no meta\['tool_status'\]"):
        apply_filters([traj("p", 0), bare], FilterConfig(), max_length=100)
    with pytest.raises(DataError, match="p/12"):  # a loser too: the file is not a sampler's
        apply_filters([dataclasses.replace(bare, correct=False)], FilterConfig(), max_length=100)
    # The filter switched off does not need the status; a trajectory without calls has none to record.
    kept, _ = apply_filters([bare], FilterConfig(correct_after_error=False), max_length=100)
    assert ids(kept) == [("p", 12)]
    no_call = traj("p", 13, first=(56,), calls=0, status=None)
    kept, _ = apply_filters([no_call], FilterConfig(no_tool_call=False), max_length=100)
    assert ids(kept) == [("p", 13)]
    # An empty list is a record (no calls made): not the same as no record.
    assert apply_filters([traj("p", 14, first=(57,), calls=0, status=[])], FilterConfig(no_tool_call=False),
                         max_length=100)[1]["kept"] == 1


def test_duplicates_per_prompt_and_label():
    ts = [traj("a", 0, first=(1, 2)), traj("a", 1, first=(1, 2), correct=False),
          traj("a", 2, first=(1, 2)), traj("a", 3, first=(1, 2), correct=False),
          traj("a", 4, first=(1, 2, 3)),  # a longer first turn is a different one
          traj("b", 0, first=(1, 2)),
          traj("a", 5, first=(1, 2), calls=2)]  # same first turn, different later turns: still a duplicate
    kept, counts = apply_filters(ts, FilterConfig(), max_length=100)
    assert ids(kept) == [("a", 0), ("a", 1), ("a", 4), ("b", 0)]
    assert counts["duplicate_first_turn"] == 3
    off = FilterConfig(duplicate_first_turn=False)
    assert len(apply_filters(ts, off, max_length=100)[0]) == 7


# ---------------------------------------------------------------- pairs
def group(pid, n_pos, n_neg, none_loser=False):
    out = [traj(pid, i, first=(100 + i,)) for i in range(n_pos)]
    out += [traj(pid, n_pos + i, first=(200 + i,), correct=False) for i in range(n_neg)]
    if none_loser:
        out[-1] = dataclasses.replace(out[-1], correct=None, answer=None)
    return out


def key(pair):
    return (pair[0].prompt_id, pair[0].sample_id, pair[1].sample_id)


def test_pairs_zip_when_both_sides_exceed_n():
    ts = group("a", 3, 3)
    for seed in range(20):  # sampling 2 of 9 combinations would repeat a trajectory half the time
        pairs = build_pairs(ts, 2, seed)
        assert len(pairs) == 2
        chosen, rejected = [c.sample_id for c, _ in pairs], [r.sample_id for _, r in pairs]
        assert len(set(chosen)) == 2 and set(chosen) <= {0, 1, 2}
        assert len(set(rejected)) == 2 and set(rejected) <= {3, 4, 5}


def test_pairs_from_product_otherwise():
    # 1 winner, 3 losers, N = 2: two distinct combinations, the winner in both.
    pairs = build_pairs(group("b", 1, 3), 2, seed=0)
    assert len(pairs) == 2 and len({key(p) for p in pairs}) == 2
    assert all(c.sample_id == 0 and r.sample_id in (1, 2, 3) for c, r in pairs)
    # 3 and 3 with N = 3 is not "more than N": 3 distinct combinations out of the 9.
    for seed in range(10):
        pairs = build_pairs(group("c", 3, 3), 3, seed)
        assert len({key(p) for p in pairs}) == 3
    # fewer combinations than N: all of them.
    pairs = build_pairs(group("d", 2, 1), 5, seed=0)
    assert sorted(key(p) for p in pairs) == [("d", 0, 2), ("d", 1, 2)]


def test_pairs_need_a_winner_and_a_loser():
    ts = group("only_pos", 3, 0) + group("only_neg", 0, 2, none_loser=True) + group("ok", 1, 1, none_loser=True)
    pairs = build_pairs(ts, 1, seed=0)
    assert [key(p) for p in pairs] == [("ok", 0, 1)]  # correct None counts as a loser
    assert pairs[0][0].correct is True and pairs[0][1].correct is None
    with pytest.raises(ValueError, match="pairs_per_prompt"):
        build_pairs(ts, 0, seed=0)


def test_pairs_are_deterministic_and_per_prompt():
    a, b, c = group("a", 4, 5), group("b", 2, 3), group("c", 1, 6)
    pairs = build_pairs(a + b + c, 3, seed=7)
    assert [p[0].prompt_id for p in pairs] == ["a"] * 3 + ["b"] * 3 + ["c"] * 3  # sorted ids
    assert [key(p) for p in build_pairs(a + b + c, 3, seed=7)] == [key(p) for p in pairs]
    interleaved = [t for row in itertools.zip_longest(c, b, a) for t in row if t is not None]
    assert [key(p) for p in build_pairs(c + b + a, 3, seed=7)] == [key(p) for p in pairs]
    assert [key(p) for p in build_pairs(interleaved, 3, seed=7)] == [key(p) for p in pairs]
    # one prompt's pairs do not depend on which other prompts are present
    assert [key(p) for p in build_pairs(b, 3, seed=7)] == [key(p) for p in pairs[3:6]]
    # and the seed matters
    assert any([key(p) for p in build_pairs(a + b + c, 3, s)] != [key(p) for p in pairs] for s in range(5))


def test_pair_stats():
    ts = group("a", 2, 1) + group("b", 0, 2, none_loser=True) + group("c", 3, 0)
    ts[0] = dataclasses.replace(ts[0], finish_reason="eos")
    st = pair_stats(ts)
    assert st["trajectories"] == 8 and st["prompts"] == 3 and st["correct"] == 5
    assert st["correct_share"] == 5 / 8 and st["no_answer"] == 1
    assert (st["prompts_with_correct"], st["prompts_with_incorrect"], st["prompts_with_both"]) == (2, 2, 1)
    assert st["coverage"] == 1 / 3
    assert st["finish_reasons"] == {"end_of_turn": 7, "eos": 1}
    assert pair_stats([])["coverage"] == 0.0


# ---------------------------------------------------------------- KTO, RAFT
def test_kto_is_balanced_and_labelled():
    pairs = build_pairs(group("a", 3, 3) + group("b", 1, 2, none_loser=True), 2, seed=1)
    kto = build_kto(pairs, seed=3)
    assert len(kto) == 8
    assert sum(t.correct is True for t in kto) == 4 and sum(t.correct is False for t in kto) == 4
    assert sorted(ids(kto)) == sorted(ids([c for c, _ in pairs] + [r for _, r in pairs]))
    assert ids(kto) != ids([c for c, _ in pairs] + [r for _, r in pairs])  # shuffled
    assert ids(build_kto(pairs, seed=3)) == ids(kto)
    assert any(r.correct is None for _, r in pairs)  # the None loser was labelled False on a copy only


def test_raft_keeps_k_correct_per_prompt():
    ts = group("a", 3, 2) + group("b", 1, 1) + group("c", 0, 2)
    one = build_raft(ts, 1, seed=0)
    assert [t.prompt_id for t in one] == ["a", "b"] and all(t.correct is True for t in one)
    two = build_raft(ts, 2, seed=0)
    assert [t.prompt_id for t in two] == ["a", "a", "b"] and two[0].sample_id < two[1].sample_id
    assert ids(build_raft(ts, 5, seed=0)) == [("a", 0), ("a", 1), ("a", 2), ("b", 0)]
    assert ids(build_raft(ts, 1, seed=0)) == ids(one)
    assert len({ids(build_raft(ts, 1, seed=s))[0] for s in range(20)}) > 1  # the choice is random
    with pytest.raises(ValueError, match="k must be >= 1"):
        build_raft(ts, 0, seed=0)


# ---------------------------------------------------------------- held-out split
PROBLEMS = [{"id": f"q{i}", "question": str(i)} for i in range(10)]


def test_split_sizes_and_order():
    train, held = split_heldout(PROBLEMS, 0.2, seed=0)
    assert len(held) == 2 and len(train) == 8
    assert sorted(p["id"] for p in train + held) == sorted(p["id"] for p in PROBLEMS)  # disjoint, complete
    assert train == [p for p in PROBLEMS if p in train] and held == [p for p in PROBLEMS if p in held]
    assert len(split_heldout(PROBLEMS, 3, seed=0)[1]) == 3
    assert len(split_heldout(PROBLEMS, 0.01, seed=0)[1]) == 1  # a fraction gives at least one


def test_split_is_deterministic_and_order_free():
    held = {p["id"] for p in split_heldout(PROBLEMS, 3, seed=5)[1]}
    assert {p["id"] for p in split_heldout(PROBLEMS, 3, seed=5)[1]} == held
    assert {p["id"] for p in split_heldout(PROBLEMS[::-1], 3, seed=5)[1]} == held
    assert {p["id"] for p in split_heldout(PROBLEMS, 4, seed=5)[1]} > held  # a larger split extends it
    assert any({p["id"] for p in split_heldout(PROBLEMS, 3, seed=s)[1]} != held for s in range(5))


def test_split_errors():
    with pytest.raises(ValueError, match="leaves no training problems"):
        split_heldout(PROBLEMS, 10, seed=0)
    with pytest.raises(ValueError, match="must be > 0"):
        split_heldout(PROBLEMS, 0, seed=0)
    with pytest.raises(ValueError, match="held-out part would be empty"):
        split_heldout([], 0.5, seed=0)
    with pytest.raises(ValueError, match="neither a fraction"):
        split_heldout(PROBLEMS, 2.5, seed=0)
    with pytest.raises(ValueError, match="'q1' occurs more than once"):
        split_heldout(PROBLEMS + [{"id": "q1"}], 2, seed=0)
    with pytest.raises(ValueError, match="problem 1 has no 'id'"):
        split_heldout([{"id": 1}, {"question": "?"}], 1, seed=0)


# ---------------------------------------------------------------- files
def sample_pairs():
    return build_pairs(group("a", 2, 2) + group("b", 1, 1, none_loser=True), 1, seed=0)


def test_pairs_file_round_trip(tmp_path):
    pairs = sample_pairs()
    path = tmp_path / "it1" / "pairs.jsonl"
    info = write_pairs(path, pairs)
    assert info == {"rows": 2, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    assert file_digest(path) == info
    assert read_pairs(path) == pairs
    row = json.loads(path.read_text().splitlines()[0])
    assert set(row) == {"chosen", "rejected"} and isinstance(row["chosen"], dict)  # objects, not strings
    assert row["chosen"]["roles"].startswith("PPPM")
    assert not list(path.parent.glob(".*tmp"))  # the atomic write left no temporary file


def test_written_files_load_in_the_trainer(tmp_path):
    from mdpo.config import LossConfig
    from mdpo.objectives import get_objective
    from mdpo.train import load_examples

    def obj(name):
        return get_objective(LossConfig(type=name))

    pairs = sample_pairs()
    write_pairs(tmp_path / "pairs.jsonl", pairs)
    examples, dropped = load_examples(tmp_path / "pairs.jsonl", obj("mdpo"), "model", 64, 1000)
    assert len(examples) == 2 and dropped == {"empty_mask": 0, "too_long": 0}
    assert examples[0].seqs == list(pairs[0])
    # KTO data is one trajectory per line; the None-labelled loser must load (the loader needs a label).
    write_trajectories(tmp_path / "kto.jsonl", build_kto(pairs, seed=0))
    examples, _ = load_examples(tmp_path / "kto.jsonl", obj("mkto"), "model", 64, 1000)
    assert len(examples) == 4


def test_verify_file_catches_damage(tmp_path):
    path = tmp_path / "pairs.jsonl"
    expected = write_pairs(path, sample_pairs())
    verify_file(path, expected)  # intact: no error
    good = path.read_bytes()

    path.write_bytes(b"".join(good.splitlines(keepends=True)[:-1]))
    with pytest.raises(DataError, match=r"pairs\.jsonl: expected 2 rows, found 1"):
        verify_file(path, expected)

    i = good.index(b'"tokens": [2') + len(b'"tokens": [')
    path.write_bytes(good[:i] + b"3" + good[i + 1:])  # one byte: token 2 becomes 3
    with pytest.raises(DataError, match=r"pairs\.jsonl: checksum mismatch"):
        verify_file(path, expected)
    assert isinstance(DataError("x"), ValueError)

    path.unlink()
    with pytest.raises(DataError, match=r"pairs\.jsonl: missing file"):
        verify_file(path, expected)


def test_read_pairs_names_bad_lines(tmp_path):
    path = tmp_path / "pairs.jsonl"
    write_pairs(path, sample_pairs())
    lines = path.read_text().splitlines()
    path.write_text(lines[0] + "\n" + '{"chosen": {}}\n')
    with pytest.raises(DataError, match=r"pairs\.jsonl:2: a pair needs"):
        read_pairs(path)
    path.write_text(lines[0] + "\n\n{oops\n")
    with pytest.raises(DataError, match=r"pairs\.jsonl:3: invalid JSON"):
        read_pairs(path)
