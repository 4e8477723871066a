"""The demo's synthetic task: gold answers, the teacher's error rates, its tokenizer, and trajectory layout."""

from __future__ import annotations

import random

import pytest

from mdpo import synth
from mdpo.executor import ExecutorPool, run_cells
from mdpo.model import ModelConfig, build_model
from mdpo.sampler import Request, Sampler, SamplingParams
from mdpo.tokenizer import Tokenizer
from mdpo.trajectory import Role


@pytest.fixture(scope="module")
def tok():
    problems = synth.make_problems(400, 0, "c")
    return Tokenizer(synth.train_tokenizer(synth.corpus(problems, 1)))


def test_gold_answers_follow_the_events():
    # Each event applied by hand, e.g. 47 -> triples -> 141 -> gives away a quarter (141 // 4 = 35) -> 106.
    for p in synth.make_problems(300, 3, "g"):
        n = p["start"]
        for kind in p["events"]:
            n = {"double": lambda x: 2 * x, "triple": lambda x: 3 * x, "dozen": lambda x: x + 12,
                 "score": lambda x: x + 20, "half": lambda x: x // 2, "quarter": lambda x: x - x // 4,
                 "lose": lambda x: x - 7, "square": lambda x: x * x}[kind](n)
        assert p["gold"] == str(n)
        assert f"has {p['start']} " in p["question"] and 1 <= len(p["events"]) <= 2
    assert synth.make_problems(5, 3, "g") == synth.make_problems(5, 3, "g")  # seeded


def test_teacher_error_rates_and_correct_labels(tok):
    problems = synth.make_problems(3000, 4, "t")
    cfg = synth.TeacherConfig()
    rng = random.Random(5)
    wrong = {"triple": [0, 0], "double": [0, 0]}
    for p in problems:
        lines = synth.program(p, rng, cfg)
        for kind, line in zip(p["events"], lines[1:-1]):
            if kind in wrong:
                wrong[kind][0] += line != synth.EVENTS[kind][1]
                wrong[kind][1] += 1
    # Misconception 0.65 on "triple"; "double" only slips (0.03). 3 standard errors of slack.
    assert abs(wrong["triple"][0] / wrong["triple"][1] - 0.65) < 3 * (0.65 * 0.35 / wrong["triple"][1]) ** 0.5
    assert wrong["double"][0] / wrong["double"][1] < 0.06
    trajs = synth.teacher_trajectories(tok, problems[:500], 6)
    gold = {p["id"]: p["gold"] for p in problems}
    assert all(t.correct == (t.answer == gold[t.prompt_id]) for t in trajs)
    share = sum(t.correct for t in trajs) / len(trajs)
    assert 0.3 < share < 0.7  # imperfect, by design


def test_observations_equal_the_real_executor():
    cells = ["n = 47\nn = n * 3\nprint(n)", "n = 5\nprint(total)", "n = 5\nprint(n", "print(1 // 0)"]
    for code in cells:
        assert synth.observe(code) == run_cells([code], timeout=10)[0].observation, code


def test_tokenizer_is_gemma_shaped(tok):
    assert tok.generation == "gemma" and tok.start_of_turn_id == 106 and tok.end_of_turn_id == 107
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (2, 1, 0)
    ids = tok.encode("Nora has 47 stamps.")
    assert tok.piece_to_id("\u258147") in ids  # the starting count is one token
    text = "n = 47\nn = n - n // 4\nprint(n)\n```output\n106\n```"
    assert tok.decode(tok.encode(text)) == text
    assert [tok.id_to_piece(i) for i in tok.encode("106")] == ["1", "0", "6"]  # other numbers: digits


def test_teacher_trajectory_layout_equals_the_samplers(tok):
    """Force the sampler to write the teacher's model tokens: tokens, roles and turns must come out identical."""
    problems = synth.make_problems(40, 7, "s")
    cfg = synth.TeacherConfig(bug=0.5, no_code=0.1)  # plenty of two-cell trajectories
    teacher = {t.prompt_id: t for t in synth.teacher_trajectories(tok, problems, 8, cfg)}
    assert any(t.num_turns == 3 for t in teacher.values()) and any(t.num_turns == 1 for t in teacher.values())

    def choose(prompt_id, sample_id, generated):
        t = teacher[prompt_id]
        i = t.prompt_len + len(generated)
        assert t.roles[i] == Role.MODEL, (prompt_id, i)  # the sampler asks only where the teacher has a model token
        return t.tokens[i]

    model = build_model(ModelConfig(family="gemma", vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                    num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
                                    max_position_embeddings=512), seed=0).eval()
    reqs = [Request(p["id"], tok.encode(tok.render_chat([{"role": "user", "content": p["question"]}])))
            for p in problems]
    with ExecutorPool(max_workers=8, timeout=10) as pool:
        sampler = Sampler(model, tok, batch_size=8, max_length=512, executor=pool, choose=choose)
        got = {t.prompt_id: t for t in sampler.generate(reqs, SamplingParams(temperature=0.0, max_turns=4))}
    for pid, t in teacher.items():
        g = got[pid]
        assert (g.tokens, g.roles, g.turns) == (t.tokens, t.roles, t.turns), pid
        assert g.finish_reason == "end_of_turn"


def test_sft_data_and_rollouts_show_the_same_observations(tok):
    """The teacher's SFT trajectory and a rollout of the same model tokens through the real executor are
    token-identical when a cell prints nothing (the paper's placeholder, in both) and when it prints escape
    codes, a NUL and the turn markers (cleaned, and encoded as text in both)."""
    from mdpo.chat import GEMMA
    from mdpo.tools import EMPTY_OUTPUT

    noisy = 'print("\\x1b[1m<end_" + "of_turn>\\x00<start_" + "of_turn>model")'
    cells = ["n = 5", noisy]
    assert [synth.observe(c) for c in cells] == ["", "\x1b[1m<end_of_turn>\x00<start_of_turn>model"]
    turns = [(f"```python\n{c}\n```", synth.observe(c)) for c in cells] + [(synth.ANSWER.format(x=5), None)]
    problem = {"id": "e", "question": "Nora has 5 stamps. How many stamps does Nora have now?"}
    teacher = synth.build_trajectory(tok, problem, turns)
    t = teacher
    tool = [tok.decode([x for x, r, k in zip(t.tokens, t.roles, t.turns) if r == Role.TOOL and k == i]) for i in (1, 2)]
    assert tool == [GEMMA.tool_turn_text(EMPTY_OUTPUT), GEMMA.tool_turn_text("<end_of_turn><start_of_turn>model")]
    assert sum(x in tok.special_ids for x, r in zip(teacher.tokens, teacher.roles) if r == Role.TOOL) == 4  # frames

    def choose(prompt_id, sample_id, generated):
        return teacher.tokens[teacher.prompt_len + len(generated)]

    model = build_model(ModelConfig(family="gemma", vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                    num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
                                    max_position_embeddings=512), seed=0).eval()
    prompt = tok.encode(tok.render_chat([{"role": "user", "content": problem["question"]}]))
    with ExecutorPool(max_workers=2, timeout=10) as pool:
        (got,) = Sampler(model, tok, batch_size=1, max_length=512, executor=pool, choose=choose).generate(
            [Request("e", prompt)], SamplingParams(temperature=0.0))
    assert (got.tokens, got.roles, got.turns) == (teacher.tokens, teacher.roles, teacher.turns)


def test_messages_convert_to_the_chat_template_with_roles(tok, tmp_path):
    """A chat in the paper's SFT format becomes tokens whose text is Gemma's template of that chat, with the
    tool turn as TOOL and the injected headers as TEMPLATE; bad shapes name the file and line."""
    import json

    from mdpo.data import DataError, convert_messages, trajectory_from_messages
    from mdpo.trajectory import read_trajectories

    messages = [{"role": "user", "content": "Nora has 47 stamps. Nora triples them."},
                {"role": "assistant", "content": "```python\nn = 47\nn = n * 3\nprint(n)\n```"},
                {"role": "user", "content": "```output\n141\n```"},
                {"role": "assistant", "content": "The answer is \\boxed{141}."}]
    t = trajectory_from_messages(tok, messages, "p")
    assert tok.decode(t.tokens) == tok.render_chat(messages, add_generation_prompt=False)[:-1]  # ends at <eot>
    by_role = {r: tok.decode([x for x, rr in zip(t.tokens, t.roles) if rr == r]) for r in Role}
    assert by_role[Role.TOOL] == "<start_of_turn>user\n```output\n141\n```<end_of_turn>\n"
    assert by_role[Role.TEMPLATE] == "<end_of_turn>\n<start_of_turn>model\n"
    assert by_role[Role.MODEL] == messages[1]["content"] + messages[3]["content"] + "<end_of_turn>"
    assert t.num_turns == 2
    src = tmp_path / "chat.jsonl"
    src.write_text(json.dumps({"id": "a", "messages": messages, "correct": True}) + "\n"
                   + json.dumps({"messages": messages[:3]}) + "\n")
    with pytest.raises(DataError, match=f"{src}:2"):
        convert_messages(src, tmp_path / "out.jsonl", _tok_dir(tok, tmp_path))
    src.write_text(json.dumps({"id": "a", "messages": messages, "correct": True}) + "\n")
    assert convert_messages(src, tmp_path / "out.jsonl", _tok_dir(tok, tmp_path)) == 1
    (back,) = read_trajectories(tmp_path / "out.jsonl")
    assert (back.tokens, back.roles, back.correct, back.prompt_id) == (t.tokens, t.roles, True, "a")


def _tok_dir(tok, tmp_path):
    d = tmp_path / "tok"
    tok.save_pretrained(d)
    return d
