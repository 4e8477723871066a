"""Chat formats: the strings that frame turns, one object per model family.

Every piece of markup mdpo itself writes around a conversation comes from here: the sampler's injected
template and tool turns, the SFT trajectories of mdpo.data.trajectory_from_turns (and the demo's teacher
through it), and the turn strings of mdpo.tokenizer's chat-template rendering. A new model family is one new
ChatFormat instance (and an entry in FORMATS); nothing else spells a turn marker.

Gemma (1, 2 and 3 share the strings; the paper, reference/paper.md section 1.5):

    prompt      <bos><start_of_turn>user\\n{question}<end_of_turn>\\n<start_of_turn>model\\n
    after code  <end_of_turn>\\n                 TEMPLATE (only \\n when the model itself wrote <end_of_turn>)
                <start_of_turn>user\\n```output\\n{observation}\\n```<end_of_turn>\\n      TOOL
                <start_of_turn>model\\n          TEMPLATE

The tool's observation is user-turn text: `tool_turn_ids` encodes it as plain text, so an interpreter that
prints "<end_of_turn>" cannot close the turn or forge a model turn (it becomes ordinary tokens, never the
special ids).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ChatFormat:
    """Turn markup of one model family. Roles are the names the model was trained with ("user", "model")."""

    name: str
    start_turn: str  # opens a turn; followed by the role and a newline
    end_turn: str  # the model's stop token at the end of its turn
    user_role: str = "user"
    model_role: str = "model"
    output_open: str = "```output\n"  # wraps a tool's observation inside the user turn
    output_close: str = "\n```"

    def open(self, role: str) -> str:
        """The header of a `role` turn, e.g. `<start_of_turn>model\\n`."""
        return f"{self.start_turn}{role}\n"

    @property
    def close(self) -> str:
        """What ends a turn: `<end_of_turn>\\n`."""
        return f"{self.end_turn}\n"

    @property
    def output_fence(self) -> str:
        """The fence that opens an output block ("```output"): the model never writes one itself."""
        return self.output_open.rstrip("\n")

    def turn(self, role: str, content: str) -> str:
        """One whole turn: header, content, close."""
        return self.open(role) + content + self.close

    def tool_turn(self, observation: str) -> list[tuple[str, bool]]:
        """The user turn carrying a tool's observation, as (text, special tokens allowed) parts."""
        return [(self.open(self.user_role) + self.output_open, True), (observation, False),
                (self.output_close + self.close, True)]

    def tool_turn_text(self, observation: str) -> str:
        """The tool turn as text (tokenizer corpora, documentation); tokens come from tool_turn_ids."""
        return "".join(text for text, _ in self.tool_turn(observation))

    def tool_turn_ids(self, tok, observation: str) -> list[int]:
        """Token ids of the tool turn; the observation is plain text (no special ids, whatever it prints)."""
        return tok.encode_parts(self.tool_turn(observation))


GEMMA = ChatFormat("gemma", start_turn="<start_of_turn>", end_turn="<end_of_turn>")

# Template family (mdpo.tokenizer.TEMPLATES, Tokenizer.generation) -> its format.
FORMATS: dict[str, ChatFormat] = {"gemma": GEMMA, "gemma3": GEMMA}


def for_tokenizer(tok) -> ChatFormat:
    """The chat format of a tokenizer's family (Gemma when the vocabulary does not say)."""
    return FORMATS.get(getattr(tok, "generation", None) or "gemma", GEMMA)
