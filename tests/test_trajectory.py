"""Trajectory records: exact JSONL round trips, masks from roles, clear errors for bad files."""

import json

import pytest

from mdpo.trajectory import Role, Trajectory, TrajectoryError, read_trajectories, write_trajectories


def example():
    P, M, T, S = Role.PROMPT, Role.MODEL, Role.TOOL, Role.TEMPLATE
    roles = [P, P, P, M, M, S, T, T, T, S, M, M]
    return Trajectory(prompt_id="gsm8k/7", sample_id=3, tokens=list(range(100, 112)), roles=[int(r) for r in roles],
                      turns=[0, 0, 0, 1, 1, 1, 1, 1, 1, 2, 2, 2], logprobs=[0.0] * 3 + [-0.5, -1 / 3] + [0.0] * 5
                      + [-2.25, -1e-9], finish_reason="end_of_turn", answer="\\frac{1}{3}", correct=True,
                      model="runs/iter1", tokenizer="abc", meta={"level": "Level 5", "type": "Algebra"})


def test_masks_follow_roles():
    t = example()
    assert t.loss_mask("model") == [False] * 3 + [True, True] + [False] * 5 + [True, True]
    assert t.loss_mask("paper") == [False] * 3 + [True, True, True, False, False, False, True, True, True]
    assert t.loss_mask("completion") == [False] * 3 + [True] * 9
    assert t.prompt_len == 3 and t.num_turns == 2
    with pytest.raises(ValueError, match="unknown mask mode 'tool'"):
        t.loss_mask("tool")


def test_jsonl_round_trip_is_exact(tmp_path):
    ts = [example(), Trajectory("p", 0, [2, 5], [0, 1], [0, 1])]
    f = tmp_path / "out" / "traj.jsonl"
    assert write_trajectories(f, ts) == 2
    back = list(read_trajectories(f))
    assert back == ts
    assert back[0].logprobs[4] == -1 / 3  # floats survive bit for bit
    line = json.loads(f.read_text().splitlines()[0])
    assert line["roles"] == "PPPMMSTTTSMM"  # one readable character per token
    assert not list(tmp_path.glob("out/.*tmp"))


def test_bad_lines_name_file_and_line(tmp_path):
    f = tmp_path / "t.jsonl"
    good = example().to_json()
    f.write_text(good + "\n" + good.replace('"roles": "PPP', '"roles": "PXP') + "\n")
    with pytest.raises(TrajectoryError, match=r"t.jsonl:2: unknown role characters \['X'\]"):
        list(read_trajectories(f))
    f.write_text(good + "\n\n" + "{not json\n")
    with pytest.raises(TrajectoryError, match=r"t.jsonl:3: invalid JSON"):
        list(read_trajectories(f))
    d = json.loads(good)
    del d["tokens"]
    f.write_text(json.dumps(d) + "\n")
    with pytest.raises(TrajectoryError, match=r"t.jsonl:1: missing field 'tokens'"):
        list(read_trajectories(f))
    d = json.loads(good)
    d["turns"] = d["turns"][:-1]
    f.write_text(json.dumps(d) + "\n")
    with pytest.raises(TrajectoryError, match=r"t.jsonl:1: .*differ in length"):
        list(read_trajectories(f))


def test_failed_write_leaves_previous_file(tmp_path):
    f = tmp_path / "t.jsonl"
    write_trajectories(f, [example()])
    before = f.read_text()

    def broken():
        yield example()
        raise RuntimeError("killed mid-write")
    with pytest.raises(RuntimeError):
        write_trajectories(f, broken())
    assert f.read_text() == before and len(list(tmp_path.iterdir())) == 1
