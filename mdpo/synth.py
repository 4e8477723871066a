"""The demo's synthetic task: word problems whose answers need Python, and an imperfect teacher.

A problem tracks one quantity through one or two events ("Nora has 47 stamps. Nora triples them. Nora gives away
a quarter of them. How many stamps does Nora have now?"). A tiny model cannot do that arithmetic in its head:
it has to write it as code (n = 47, n = n * 3, n = n - n // 4, print(n)), run it, and copy the printed number
into \\boxed{}. What it has to learn is which code each event means.

The teacher that writes the SFT trajectories is imperfect in the ways the paper's SFT data is:
* misconceptions: for three kinds of event ("triples", "a score", "a quarter of them") it writes the wrong
  operation more often than the right one, so greedy decoding of the SFT model is wrong on them, while
  sampling at temperature 1 still produces the right code sometimes. Only the reward (the gold answer) can tell
  the two apart: that is what M-DPO has to learn;
* buggy first attempts (a NameError or SyntaxError) that it fixes in a second turn, after reading the error;
* answers without any code (guesses), and final answers that miscopy the printed number.

Trajectories are built token by token with roles exactly as mdpo.sampler records them (model turn, the
`<end_of_turn>\\n` template, the ```output tool turn, the `<start_of_turn>model\\n` template), so SFT data and
rollouts share one layout. Observations are computed here, in-process, with the executor's rules (printed output;
last traceback line on an exception); a test checks them against the real sandboxed executor. What the model is
shown of them (cleaned; the paper's placeholder for an empty output) is made by mdpo.tools.observation_text inside
trajectory_from_turns, the same function the sampler's tool uses.
"""

from __future__ import annotations

import contextlib
import io
import random
import traceback
from dataclasses import dataclass

from mdpo.chat import GEMMA
from mdpo.data import trajectory_from_turns
from mdpo.sampler import MAX_CALLS_TEXT
from mdpo.tools import observation_text
from mdpo.trajectory import Trajectory

NAMES = ["Ava", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivan", "Jade", "Kai", "Lena", "Milo", "Nora",
         "Omar", "Pia", "Quinn", "Rosa", "Sam", "Tess"]
ITEMS = ["apples", "coins", "stamps", "marbles", "books", "cards", "shells", "beads", "pens", "stickers",
         "cookies", "candles"]

# Events: kind -> (sentence, the right update of n, the teacher's misconception or None). The events carry no
# digits: the only number to copy from the question is the starting count (one token, see train_tokenizer), and
# the arithmetic, which a tiny model cannot do in its head, is left to Python. What the model must learn is
# which code each event means; the teacher gets three of them wrong more often than right.
EVENTS = {
    "double": ("{name} doubles them.", "n = n * 2", None),
    "triple": ("{name} triples them.", "n = n * 3", "n = n + 3"),
    "dozen": ("{name} buys a dozen more.", "n = n + 12", None),
    "score": ("{name} finds a score more.", "n = n + 20", "n = n + 10"),
    "half": ("{name} sells half of them.", "n = n // 2", None),
    "quarter": ("{name} gives away a quarter of them.", "n = n - n // 4", "n = n // 4"),
    "lose": ("{name} loses seven of them.", "n = n - 7", None),
    "square": ("{name} squares the count.", "n = n * n", None),
}
SLIPS = {"n = n * 2": "n = n * 3", "n = n + 12": "n = n + 10", "n = n // 2": "n = n - 2", "n = n - 7": "n = n + 7"}
QUESTION = "How many {item} does {name} have now?"
ANSWER = "The answer is \\boxed{{{x}}}."


@dataclass
class TeacherConfig:
    """How often the teacher errs (probabilities per trajectory or per event)."""

    misconception: float = 0.65  # wrong operation on a misconception event
    slip: float = 0.03  # wrong operation on any other event
    no_code: float = 0.08  # answer with a guess, no code
    bug: float = 0.15  # first cell has a bug, fixed in a second turn
    miscopy: float = 0.04  # final answer changes a digit of the printed number


def make_problem(rng: random.Random, pid: str) -> dict:
    """One problem: question text, gold answer, the starting count and the events (1 or 2 kinds, in order)."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    value = start = rng.randint(10, 99)
    kinds = rng.sample([k for k in EVENTS if k != "square"], 2) if rng.random() < 0.6 else [rng.choice(list(EVENTS))]
    sentences = [f"{name} has {value} {item}."]
    for kind in kinds:
        sentences.append(EVENTS[kind][0].format(name=name))
        value = eval(EVENTS[kind][1][4:], {"n": value})  # our own template, never model code
    sentences.append(QUESTION.format(item=item, name=name))
    return {"id": pid, "question": " ".join(sentences), "gold": str(value), "events": kinds, "start": start}


def make_problems(n: int, seed: int, prefix: str) -> list[dict]:
    """`n` problems from one seed; ids are `{prefix}-{i}`."""
    rng = random.Random(seed)
    return [make_problem(rng, f"{prefix}-{i}") for i in range(n)]


def program(problem: dict, rng: random.Random, cfg: TeacherConfig) -> list[str]:
    """The teacher's code lines for a problem (with its misconceptions and slips)."""
    lines = [f"n = {problem['start']}"]
    for kind in problem["events"]:
        _, right, wrong = EVENTS[kind]
        if wrong is not None and rng.random() < cfg.misconception:
            lines.append(wrong)
        elif right in SLIPS and rng.random() < cfg.slip:
            lines.append(SLIPS[right])
        else:
            lines.append(right)
    lines.append("print(n)")
    return lines


def observe(code: str) -> str:
    """What the interpreter shows for `code`: printed output, or the last traceback line (executor rules)."""
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(code, "<cell>", "exec"), {})  # the teacher's own generated code, never a model's
    except Exception as e:  # noqa: BLE001 - the observation is the error itself
        return traceback.format_exception_only(type(e), e)[-1].strip()
    return out.getvalue().strip()


def _miscopy(x: str, rng: random.Random) -> str:
    i = rng.randrange(len(x))
    d = rng.choice([c for c in "0123456789" if c != x[i] and (i or c != "0" or len(x) == 1)])
    return x[:i] + d + x[i + 1:]


def teacher_turns(problem: dict, rng: random.Random, cfg: TeacherConfig) -> list[tuple[str, str | None]]:
    """The teacher's model turns: [(text, code or None)], each code turn followed by its observation."""
    if rng.random() < cfg.no_code:
        guess = str(max(1, int(int(problem["gold"]) * rng.uniform(0.5, 1.5))))
        return [(ANSWER.format(x=guess), None)]
    turns = []
    lines = program(problem, rng, cfg)
    if rng.random() < cfg.bug:
        bad = list(lines)
        if rng.random() < 0.5:
            bad[-1] = "print(total)"  # a name that was never defined
        else:
            bad[-1] = bad[-1][:-1]  # print(n  -> unclosed parenthesis
        turns.append((bad, observe("\n".join(bad))))
    code = "\n".join(lines)
    turns.append((lines, observe(code)))
    result = turns[-1][1]
    final = _miscopy(result, rng) if rng.random() < cfg.miscopy and result.isdigit() else result
    out = [(f"```python\n{chr(10).join(c)}\n```", obs) for c, obs in turns]
    return out + [(ANSWER.format(x=final), None)]


def build_trajectory(tok, problem: dict, turns: list[tuple[str, str | None]], sample_id: int = 0,
                     empty_output: str | None = None) -> Trajectory:
    """Token ids and roles of a scripted trajectory (mdpo.data.trajectory_from_turns), labelled as the teacher's.
    empty_output: shown for a cell that prints nothing (None: the paper's text, as in the demo's rollouts)."""
    t = trajectory_from_turns(tok, problem["question"], turns, problem["id"], sample_id, empty_output=empty_output)
    t.model = "teacher"
    return t


def teacher_trajectories(tok, problems: list[dict], seed: int, cfg: TeacherConfig | None = None,
                         per_problem: int = 1, empty_output: str | None = None) -> list[Trajectory]:
    """SFT data: `per_problem` teacher trajectories for each problem, graded against the gold answer."""
    cfg = cfg or TeacherConfig()
    rng = random.Random(seed)
    out = []
    for p in problems:
        for s in range(per_problem):
            turns = teacher_turns(p, rng, cfg)
            t = build_trajectory(tok, p, turns, s, empty_output)
            t.answer = turns[-1][0][len("The answer is \\boxed{"):-2]
            t.correct = t.answer == p["gold"]
            out.append(t)
    return out


def corpus(problems: list[dict], seed: int, cfg: TeacherConfig | None = None) -> list[str]:
    """Text for training the tokenizer: questions and every teacher turn, with the chat markup."""
    cfg = cfg or TeacherConfig()
    rng = random.Random(seed)
    texts = []
    for p in problems:
        texts.append(p["question"])
        for text, obs in teacher_turns(p, rng, cfg):
            texts.append(text)
            if obs is not None:
                texts.append(GEMMA.tool_turn_text(observation_text(obs)))
    # The markup of a turn-limit ending: "<start_of_turn>user\n<end_of_turn>\n<start_of_turn>model\nReach max ..."
    texts.append(GEMMA.turn(GEMMA.user_role, "") + GEMMA.open(GEMMA.model_role) + MAX_CALLS_TEXT.lstrip("\n"))
    return texts


def train_tokenizer(texts: list[str], vocab_size: int = 1024, whole_numbers: int = 100) -> bytes:
    """A Gemma-style SentencePiece BPE model (split digits, byte fallback, no dummy prefix, no normalisation).

    Unlike Gemma, " 0" .. " {whole_numbers - 1}" (with their leading space) are single pieces: the starting
    count is then one token, copied from the question by one lookup. Digit by digit, a 4-layer model needed
    thousands of steps to learn the copy (docs/LOG.md); other numbers (outputs, answers) are still digits.

    The special pieces sit at Gemma 1's ids (pad 0, eos 1, bos 2, unk 3, <start_of_turn> 106, <end_of_turn> 107),
    so mdpo.tokenizer recognises the generation and renders Gemma's chat template without being told.
    """
    import sentencepiece as spm

    specials = [f"<unused{i}>" for i in range(102)] + [GEMMA.start_turn, GEMMA.end_turn]
    # "\u2581" is SentencePiece's space: " 47" is one piece, the same token in "has 47 stamps" and in "n = 47".
    specials += ["\u2581" + str(i) for i in range(whole_numbers)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=buf, model_type="bpe", vocab_size=vocab_size,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
        unk_piece="<unk>", user_defined_symbols=specials, split_digits=True, byte_fallback=True,
        add_dummy_prefix=False, remove_extra_whitespaces=False, normalization_rule_name="identity",
        allow_whitespace_only_pieces=True, split_by_whitespace=True, character_coverage=1.0,
        max_sentence_length=8192, num_threads=2, minloglevel=2, hard_vocab_limit=False)
    return buf.getvalue()
