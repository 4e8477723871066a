"""Trajectories: token ids with one role per token. The sampler writes them; the trainer's mask reads them.

Token ids are the data. A trajectory is never re-tokenised from text, and masks are never found by
scanning for token patterns: every token carries the role it was produced with.

Roles:
    PROMPT    the rendered prompt (`<bos><start_of_turn>user\\n{question}<end_of_turn>\\n<start_of_turn>model\\n`)
    MODEL     a token the policy sampled
    TOOL      the tool's turn: `<start_of_turn>user\\n```output\\n{observation}\\n```<end_of_turn>\\n` (the markup is
              mdpo.chat's, the observation text mdpo.tools.observation_text's, encoded as plain text)
    TEMPLATE  chat-template tokens the sampler injects around a model turn: the `<end_of_turn>\\n` that closes
              a model turn ending in a code block, and the `<start_of_turn>model\\n` header of the next one

Which tokens count as the policy's actions (the loss mask), by `mask` mode:
    "model"       MODEL only: exactly the tokens the policy sampled (mdpo's default for M-DPO / M-KTO).
    "paper"       MODEL + TEMPLATE: reproduces the paper's mask, which trains the template tokens around model
                  turns and masks the user turn holding the tool output (paper.md section 4.1). These tokens
                  are deterministic given the history, so their log-ratio is close to 0 either way.
    "completion"  everything after the prompt, tool output included: the single-turn DPO / KTO baseline.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from enum import IntEnum
from typing import Iterable, Iterator

from mdpo import textfile
from mdpo.atomic import atomic_open


class Role(IntEnum):
    PROMPT = 0
    MODEL = 1
    TOOL = 2
    TEMPLATE = 3


ROLE_CHARS = "PMTS"  # one character per role in JSONL: Prompt, Model, Tool, template (S for "scaffold")
MASK_MODES = {
    "model": {Role.MODEL},
    "paper": {Role.MODEL, Role.TEMPLATE},
    "completion": {Role.MODEL, Role.TEMPLATE, Role.TOOL},
}


class TrajectoryError(ValueError):
    """A malformed trajectory or trajectory file; the message names the file and line."""


@dataclass
class Trajectory:
    """One rollout: tokens, a role and a turn index per token, and what became of it."""

    prompt_id: str
    sample_id: int
    tokens: list[int]
    roles: list[int]
    turns: list[int]  # 0 for the prompt, then 1, 2, ... for each model turn and the tool turn after it
    logprobs: list[float] | None = None  # sampler's log-prob per token (0.0 where not sampled)
    finish_reason: str = ""  # eos, end_of_turn, start_of_turn, output_fence, max_turns, max_new_tokens, max_length
    answer: str | None = None
    correct: bool | None = None
    model: str = ""  # which policy sampled it (path or name)
    tokenizer: str = ""  # identifies the tokenizer (e.g. sha256 of tokenizer.model)
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        n = len(self.tokens)
        if len(self.roles) != n or len(self.turns) != n or (self.logprobs is not None and len(self.logprobs) != n):
            raise TrajectoryError(f"trajectory {self.prompt_id}/{self.sample_id}: tokens ({n}), roles "
                                  f"({len(self.roles)}), turns ({len(self.turns)}) and logprobs differ in length")

    def loss_mask(self, mode: str = "model") -> list[bool]:
        """True for each token that counts as a policy action under `mode` (see the module docstring)."""
        if mode not in MASK_MODES:
            raise ValueError(f"unknown mask mode {mode!r}; expected one of {sorted(MASK_MODES)}")
        keep = MASK_MODES[mode]
        return [r in keep for r in self.roles]

    @property
    def num_turns(self) -> int:
        return max(self.turns, default=0)

    @property
    def prompt_len(self) -> int:
        n = 0
        while n < len(self.roles) and self.roles[n] == Role.PROMPT:
            n += 1
        return n

    def text(self, tokenizer, show_roles: bool = False) -> str:
        """Readable text; with show_roles, each run of one role is prefixed by [ROLE]."""
        if not show_roles:
            return tokenizer.decode(self.tokens)
        out, start = [], 0
        for i in range(1, len(self.tokens) + 1):
            if i == len(self.tokens) or self.roles[i] != self.roles[start]:
                out.append(f"[{Role(self.roles[start]).name}]" + tokenizer.decode(self.tokens[start:i]))
                start = i
        return "".join(out)

    def to_json(self) -> str:
        d = asdict(self)
        d["roles"] = "".join(ROLE_CHARS[r] for r in self.roles)
        return json.dumps(d, ensure_ascii=False)

    @classmethod
    def from_json(cls, line: str, where: str = "<string>") -> "Trajectory":
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise TrajectoryError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
        return cls.from_dict(d, where)

    @classmethod
    def from_dict(cls, d, where: str = "<object>") -> "Trajectory":
        """A trajectory from its parsed JSON object (as nested in a pairs file); errors name `where`."""
        if not isinstance(d, dict):
            raise TrajectoryError(f"{where}: expected a JSON object")
        missing = [k for k in ("prompt_id", "sample_id", "tokens", "roles", "turns") if k not in d]
        if missing:
            raise TrajectoryError(f"{where}: missing field {missing[0]!r}")
        try:
            bad = set(d["roles"]) - set(ROLE_CHARS)
            if bad:
                raise TrajectoryError(f"{where}: unknown role characters {sorted(bad)} (expected {ROLE_CHARS})")
            return cls(**dict(d, roles=[ROLE_CHARS.index(c) for c in d["roles"]]))
        except TrajectoryError as e:
            raise TrajectoryError(str(e) if str(e).startswith(where) else f"{where}: {e}") from None
        except (ValueError, TypeError) as e:
            raise TrajectoryError(f"{where}: {e}") from None


def read_jsonl(path, error: type[Exception] = TrajectoryError, objects: bool = False,
               empty_ok: bool = True) -> Iterator[tuple[str, object]]:
    """("file:line", parsed value) for each non-blank line; `error` names the file (missing, a directory, not
    UTF-8 text, empty when not `empty_ok`) or the line (bad JSON, not an object when `objects`): see mdpo.textfile."""
    for _, where, value in textfile.read_jsonl(path, error, objects=objects, empty_ok=empty_ok):
        yield where, value


def read_trajectories(path) -> Iterator[Trajectory]:
    """Trajectories of a JSONL file; a malformed line raises TrajectoryError naming file and line."""
    for where, d in read_jsonl(path):
        yield Trajectory.from_dict(d, where)


def write_trajectories(path, trajectories: Iterable[Trajectory]) -> int:
    """Write JSONL atomically (temp file + rename): a crash never leaves a half-written file. Returns the count."""
    n = 0
    with atomic_open(path) as f:
        for t in trajectories:
            f.write(t.to_json() + "\n")
            n += 1
    return n
