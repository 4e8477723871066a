"""Chat formats: the strings that frame turns, one object per model family.

Every piece of markup mdpo itself writes around a conversation comes from here: the sampler's injected
template and tool turns, the SFT trajectories of mdpo.data.trajectory_from_turns (and the demo's teacher
through it), and the turn strings of the tokenizers' chat-template rendering. A new model family is one new
ChatFormat instance (and an entry in FORMATS; mdpo/families.py names it); nothing else spells a turn marker.

Gemma (1, 2 and 3 share the strings; the paper, reference/paper.md section 1.5):

    prompt      <bos><start_of_turn>user\\n{question}<end_of_turn>\\n<start_of_turn>model\\n
    after code  <end_of_turn>\\n                 TEMPLATE (only \\n when the model itself wrote <end_of_turn>)
                <start_of_turn>user\\n```output\\n{observation}\\n```<end_of_turn>\\n      TOOL
                <start_of_turn>model\\n          TEMPLATE

The other families follow the same layout with their own strings (the roles, not the strings, decide every
mask):

    ChatML (Qwen)  <|im_start|>user\\n{q}<|im_end|>\\n<|im_start|>assistant\\n ... <|im_end|>\\n
    Llama 3        <|start_header_id|>user<|end_header_id|>\\n\\n{q}<|eot_id|>
                   <|start_header_id|>assistant<|end_header_id|>\\n\\n ... <|eot_id|>
    Mistral        <s> [INST] {q} [/INST] ... </s>          (the paper's, section 1.5: observations
                   </s> [INST] ```output\\n{r}\\n``` [/INST])

Where a tool's output goes: a user turn holding the ```output block, for every family, as the paper does for
Gemma and Mistral. Qwen2.5's own template has a tool role that it also renders as a user turn (wrapping the
text in <tool_response>); Qwen2.5-Math's tool-integrated format keeps ```output inside the assistant's text.
mdpo keeps one layout for every family so that the executor, the grader's last-turn rule and the masks are the
same code; a fork that wants Qwen's <tool_response> changes output_open / output_close here.

The tool's observation is user-turn text: `tool_turn_ids` encodes it as plain text, so an interpreter that
prints "<end_of_turn>" (or "<|im_end|>") cannot close the turn or forge a model turn (it becomes ordinary
tokens, never the special ids).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping, Sequence


@dataclass(frozen=True)
class ChatFormat:
    """Turn markup of one model family. Roles are the names the model was trained with ("user", "model")."""

    name: str
    start_turn: str | None  # the special token that opens every turn: sampled by the model, it ends the trajectory
    end_turn: str  # the model's stop token at the end of its turn (one special token)
    user_role: str = "user"
    model_role: str = "model"
    header: str = "{start}{role}\n"  # a turn's opening: {start} is start_turn, {role} the role name
    model_header: str | None = None  # a model turn's opening when it is not `header`'s (Mistral: none)
    user_close: str | None = None  # what ends a user turn; None: end_turn + after_end, as a model turn
    after_end: str = "\n"  # what follows end_turn before the next turn
    output_open: str = "```output\n"  # wraps a tool's observation inside the user turn
    output_close: str = "\n```"

    def open(self, role: str) -> str:
        """The header of a `role` turn, e.g. `<start_of_turn>model\\n`."""
        if role == self.model_role and self.model_header is not None:
            return self.model_header
        return self.header.format(start=self.start_turn or "", role=role)

    @property
    def close(self) -> str:
        """What ends a model turn: `<end_of_turn>\\n`."""
        return self.end_turn + self.after_end

    def close_of(self, role: str) -> str:
        """What ends a `role` turn."""
        return self.close if role == self.model_role or self.user_close is None else self.user_close

    @property
    def output_fence(self) -> str:
        """The fence that opens an output block ("```output"): the model never writes one itself."""
        return self.output_open.rstrip("\n")

    def turn(self, role: str, content: str) -> str:
        """One whole turn: header, content, close."""
        return self.open(role) + content + self.close_of(role)

    def tool_turn(self, observation: str) -> list[tuple[str, bool]]:
        """The user turn carrying a tool's observation, as (text, special tokens allowed) parts."""
        return [(self.open(self.user_role) + self.output_open, True), (observation, False),
                (self.output_close + self.close_of(self.user_role), True)]

    def tool_turn_text(self, observation: str) -> str:
        """The tool turn as text (tokenizer corpora, documentation); tokens come from tool_turn_ids."""
        return "".join(text for text, _ in self.tool_turn(observation))

    def tool_turn_ids(self, tok, observation: str) -> list[int]:
        """Token ids of the tool turn; the observation is plain text (no special ids, whatever it prints)."""
        return tok.encode_parts(self.tool_turn(observation), start=False)


GEMMA = ChatFormat("gemma", start_turn="<start_of_turn>", end_turn="<end_of_turn>")
# Qwen 2.5 / 3 (instruct models stop at <|im_end|>; base models emit <|endoftext|>, the tokenizer's eos).
CHATML = ChatFormat("chatml", start_turn="<|im_start|>", end_turn="<|im_end|>", model_role="assistant")
# Llama 3: a header of three tokens, and nothing between a turn's <|eot_id|> and the next header.
LLAMA3 = ChatFormat("llama3", start_turn="<|start_header_id|>", end_turn="<|eot_id|>", model_role="assistant",
                    header="{start}{role}<|end_header_id|>\n\n", after_end="")
# Mistral v0.3 as the paper renders it: a user turn is " [INST] ... [/INST]", a model turn has no header and
# ends with </s>; "[INST]" is the token that opens a turn.
MISTRAL = ChatFormat("mistral", start_turn="[INST]", end_turn="</s>", model_role="assistant",
                     header=" [INST] ", model_header="", after_end="", user_close=" [/INST]")

# Template family (mdpo.tokenizer.TEMPLATES, Tokenizer.generation; families.Family.chat) -> its format.
FORMATS: dict[str, ChatFormat] = {"gemma": GEMMA, "gemma3": GEMMA, "chatml": CHATML, "llama3": LLAMA3,
                                  "mistral": MISTRAL}


def for_tokenizer(tok) -> ChatFormat:
    """The chat format of a tokenizer's family (Gemma when the vocabulary does not say)."""
    return FORMATS.get(getattr(tok, "generation", None) or "gemma", GEMMA)


def render(chat: ChatFormat, messages: Sequence[Mapping[str, Any]], bos: str, add_generation_prompt: bool) -> str:
    """Messages as text in `chat`'s markup: an optional leading system turn (formats whose header names the
    role), then user / assistant turns alternating."""
    if not messages:
        raise ValueError("render_chat needs at least one message")
    out = [bos]
    rest = list(messages)
    if rest[0]["role"] == "system":
        if "{role}" not in chat.header:
            raise ValueError(f"the {chat.name} format has no system turn")
        out.append(chat.open("system") + rest[0]["content"] + chat.close_of("system"))
        rest = rest[1:]
    for i, m in enumerate(rest):
        if (m["role"] == "user") != (i % 2 == 0) or m["role"] not in ("user", "assistant"):
            raise ValueError("Conversation roles must alternate user/assistant/user/assistant/...")
        role = chat.model_role if m["role"] == "assistant" else chat.user_role
        out.append(chat.turn(role, m["content"]))
    if add_generation_prompt:
        out.append(chat.open(chat.model_role))
    return "".join(out)


def chat_template(chat: ChatFormat) -> str:
    """A Jinja chat template (for tokenizer_config.json) rendering exactly what `render` does."""
    q = json.dumps  # a JSON string is a valid Jinja string literal
    system = ""
    if "{role}" in chat.header:
        system = ("{% if messages[0]['role'] == 'system' %}{{ " + q(chat.open("system")) + " + messages[0]['content'] + "
                  + q(chat.close_of("system")) + " }}{% set messages = messages[1:] %}{% endif %}")
    return ("{{ bos_token if bos_token else '' }}" + system +
            "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
            "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
            "{% if message['role'] == 'assistant' %}{{ " + q(chat.open(chat.model_role)) + " + message['content'] + "
            + q(chat.close_of(chat.model_role)) + " }}{% else %}{{ " + q(chat.open(chat.user_role)) +
            " + message['content'] + " + q(chat.close_of(chat.user_role)) + " }}{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}{{ " + q(chat.open(chat.model_role)) + " }}{% endif %}")
