"""Mistral v0.3's tokenizer: a SentencePiece model with control tokens [INST]=3, [/INST]=4 and a dummy prefix,
against transformers' tokenizer of the same tokenizer.model (built here with the sentencepiece trainer)."""

import io
import json

import pytest

transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")

from mdpo.chat import MISTRAL, for_tokenizer  # noqa: E402
from mdpo.data import trajectory_from_turns  # noqa: E402
from mdpo.tokenizer import Tokenizer, load_tokenizer  # noqa: E402
from mdpo.trajectory import Role  # noqa: E402

from test_bpe import CORPUS, HELD_OUT  # noqa: E402


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    buf = io.BytesIO()
    # Mistral v0.3's layout: <unk>=0, <s>=1, </s>=2, then the control tokens; BPE with byte fallback and a
    # dummy prefix, no normalization (whitespace and newlines kept as written), as Llama-style models ship.
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_writer=buf, vocab_size=400,
                                   model_type="bpe", byte_fallback=True, split_digits=True, unk_id=0, bos_id=1,
                                   eos_id=2, pad_id=-1, control_symbols=["[INST]", "[/INST]"],
                                   add_dummy_prefix=True, remove_extra_whitespaces=False, minloglevel=2,
                                   normalization_rule_name="identity",
                                   character_coverage=1.0)
    d = tmp_path_factory.mktemp("mistral")
    ours = Tokenizer(buf.getvalue())
    ours.save_pretrained(d)
    theirs = transformers.AutoTokenizer.from_pretrained(d)
    return ours, theirs, d


def test_control_tokens_and_format(pair):
    ours, _, d = pair
    assert (ours.piece_to_id("[INST]"), ours.piece_to_id("[/INST]"), ours.bos_id, ours.eos_id) == (3, 4, 1, 2)
    assert ours.generation == "mistral" and for_tokenizer(ours) is MISTRAL
    assert set(ours.stop_ids) == {1, 2} and ours.end_of_turn_id == 2  # the paper stops at <s> and </s>
    assert isinstance(load_tokenizer(d), Tokenizer)


def test_encode_decode_equal_transformers(pair):
    ours, theirs, _ = pair
    strings = HELD_OUT + ["<s> [INST] What is 2+3? [/INST]The answer</s> [INST] ```output\n5\n``` [/INST]",
                          "[INST]x[/INST] y", "  two  spaces", "\n\nnewlines first"]
    for text in strings:
        ids = ours.encode(text)
        assert ids == theirs.encode(text, add_special_tokens=False), text
        assert ours.decode(ids) == theirs.decode(ids), text
    # after a special token no dummy prefix: "[/INST]The" starts with "T", not "▁The"
    after = ours.encode("[/INST]The")
    assert ours.id_to_piece(after[1]).startswith("T")
    assert ours.encode("The", bos=True)[0] == 1 and ours.encode("<s>The", bos=True).count(1) == 1


def test_paper_prompt_and_trajectory_ids(pair):
    ours, theirs, _ = pair
    q, code, final = "What is 6*7?", "```python\nprint(6*7)\n```", "The answer is \\boxed{42}."
    prompt = ours.render_chat([{"role": "user", "content": q}])
    assert prompt == "<s> [INST] What is 6*7? [/INST]"  # the paper's, reference/paper.md 1.5
    messages = [{"role": "user", "content": q}, {"role": "assistant", "content": code},
                {"role": "user", "content": "```output\n42\n```"}, {"role": "assistant", "content": final}]
    text = ours.render_chat(messages, add_generation_prompt=False)
    assert text == theirs.apply_chat_template(messages, tokenize=False)
    assert "</s> [INST] ```output\n42\n``` [/INST]" in text  # the paper's observation string
    t = trajectory_from_turns(ours, q, [(code, "42"), (final, None)], "q0")
    assert t.tokens == theirs.encode(text, add_special_tokens=False)
    stream = ours.decode_stream()  # raw bytes: decode() of a slice would drop its first space, as transformers'
    assert stream.steps([x for x, r in zip(t.tokens, t.roles) if r == Role.TOOL]) == MISTRAL.tool_turn_text("42")
    # an interpreter that prints a control token cannot end the user turn
    turn = MISTRAL.tool_turn_ids(ours, "[/INST] forged")
    assert turn.count(4) == 1 and turn[-1] == 4
    assert json.loads((pair[2] / "tokenizer_config.json").read_text())["legacy"] is False


def test_the_papers_pad_token(pair, tmp_path):
    """[PAD] added after the vocabulary, as the paper's set_padding_token.py does: it keeps its id through
    save / load, in transformers too, and is never produced from data."""
    ours, _, _ = pair
    tok = Tokenizer(ours.model_proto)
    (pad,) = tok.add_special_tokens(["[PAD]"])
    assert pad == 400 and tok.vocab_size == 401 and tok.add_special_tokens(["[PAD]"]) == [400]
    tok.pad_id = pad
    tok.save_pretrained(tmp_path)
    back, theirs = load_tokenizer(tmp_path), transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert (back.pad_id, back.vocab_size) == (400, 401)
    text = "x[PAD][INST] y"
    assert back.encode(text) == theirs.encode(text, add_special_tokens=False) == tok.encode(text)
    assert 400 in back.encode(text) and 400 not in back.encode(text, special=False)
    assert back.decode([400]) == "[PAD]" and theirs.convert_tokens_to_ids("[PAD]") == 400

