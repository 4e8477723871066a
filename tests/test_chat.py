"""Chat formats: one object holds a model family's turn markup, and everything mdpo writes around a
conversation (sampler, SFT data, the demo's teacher, the tokenizer's template rendering) takes it from there."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

import mdpo
from mdpo.chat import GEMMA, ChatFormat, for_tokenizer
from mdpo.data import trajectory_from_turns
from mdpo.model import ModelConfig, build_model
from mdpo.sampler import Request, Sampler, SamplingParams
from mdpo.tokenizer import Tokenizer
from mdpo.tools import Calculator
from mdpo.trajectory import Role

MARKUP = ("<start_of_turn>", "<end_of_turn>", "```output")
PACKAGE = Path(mdpo.__file__).parent


@pytest.fixture(scope="module")
def tok(gemma3_dir):
    return Tokenizer.from_pretrained(gemma3_dir)


def code_strings(tree) -> list[str]:
    """String constants of a syntax tree, docstrings and error messages excluded."""
    skip = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and n.body
            and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    skip |= {id(c) for n in ast.walk(tree) if isinstance(n, ast.Raise) for c in ast.walk(n)}
    return [n.value for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in skip]


def test_turn_markup_is_spelled_only_in_chat_py():
    """The sampler, the SFT builder, the teacher, the tools and the tokenizer's renderer take every turn
    string from mdpo.chat (the tokenizer's own vocabulary lookups and the verbatim official Jinja templates,
    kept for save_pretrained, are not renderings of mdpo's)."""
    for name in ("sampler.py", "data.py", "synth.py", "tools.py", "executor.py"):
        found = [s for s in code_strings(ast.parse((PACKAGE / name).read_text())) if any(m in s for m in MARKUP)]
        assert not found, (name, found)
    from mdpo.tokenizer import Tokenizer as T
    render = ast.parse(inspect.getsource(T.render_chat).replace("\n    ", "\n")[4:])
    assert not [s for s in code_strings(render) if any(m in s for m in MARKUP)]


def test_gemma_strings(tok):
    assert for_tokenizer(tok) is GEMMA and GEMMA.open("user") == "<start_of_turn>user\n"
    assert GEMMA.close == "<end_of_turn>\n" and GEMMA.output_fence == "```output"
    assert GEMMA.tool_turn_text("42") == "<start_of_turn>user\n```output\n42\n```<end_of_turn>\n"
    conv = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    assert tok.render_chat(conv) == "<bos>" + GEMMA.turn("user", "Q") + GEMMA.turn("model", "A") + GEMMA.open("model")
    # Plain observations tokenize exactly as the whole turn's text would (the layout of existing data).
    assert GEMMA.tool_turn_ids(tok, "x = 1\n42") == tok.encode(GEMMA.tool_turn_text("x = 1\n42"))


def test_a_new_format_changes_rollouts_and_sft_data_together(tok):
    """Swapping the format object (here: tool output wrapped in ```result) changes what the sampler injects
    and what trajectory_from_turns writes, identically, with no other change."""
    fmt = ChatFormat("test", start_turn="<start_of_turn>", end_turn="<end_of_turn>", output_open="```result\n")
    sft = trajectory_from_turns(tok, "What is 6*7?", [("```calc\n6*7\n```", "42"), ("\\boxed{42}", None)], "q",
                                chat=fmt)
    model = build_model(ModelConfig.from_name("tiny-gemma3", vocab_size=262144), seed=0).eval()

    def choose(prompt_id, sample_id, generated):
        return sft.tokens[sft.prompt_len + len(generated)]

    sampler = Sampler(model, tok, batch_size=1, max_length=256, tool=Calculator(), chat=fmt, choose=choose)
    (t,) = sampler.generate([Request("q", sft.tokens[:sft.prompt_len])], SamplingParams(temperature=0.0))
    assert (t.tokens, t.roles, t.turns) == (sft.tokens, sft.roles, sft.turns)
    tool = tok.decode([x for x, r in zip(t.tokens, t.roles) if r == Role.TOOL])
    assert tool == "<start_of_turn>user\n```result\n42\n```<end_of_turn>\n"
