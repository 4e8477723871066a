"""Byte-level BPE tokenizers (mdpo.bpe) against transformers' fast tokenizer on the same tokenizer.json.

The tokenizer files are built here: a BPE trained with the `tokenizers` trainer on math text, with Llama 3's
and Qwen2's pre-tokenizer split patterns (Llama 3 groups digits by up to three, Qwen splits them one by one)
and their special tokens. Held-out strings cover unicode, digits, whitespace runs, code and LaTeX.
"""

import json
import unicodedata

import pytest

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

from mdpo.bpe import BPETokenizer, byte_alphabet  # noqa: E402
from mdpo.chat import FORMATS  # noqa: E402
from mdpo.data import trajectory_from_turns  # noqa: E402
from mdpo.trajectory import Role  # noqa: E402

# The checkpoints' own split patterns (tokenizer.json "pre_tokenizer"), facts of Llama 3 and Qwen2.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
KINDS = {
    "llama3": dict(split=LLAMA3_SPLIT, nfc=False, bos="<|begin_of_text|>", eos="<|eot_id|>", pad=None,
                   specials=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                             "<|eot_id|>"]),
    "chatml": dict(split=QWEN2_SPLIT, nfc=True, bos=None, eos="<|im_end|>", pad="<|endoftext|>",
                   specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"]),
}
CORPUS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "How many clips did Natalia sell altogether in April and May? 48 / 2 = 24 clips in May.",
    "```python\nfrom sympy import symbols, solve\nx = symbols('x')\nprint(solve(2*x + 3 - 11, x))\n```",
    "```output\n[4]\n```\nThe answer is $\\boxed{4}$.",
    "Let $f(x) = \\frac{3x^2 - 5}{x + 1}$. Find $f(2)$: $\\frac{12 - 5}{3} = \\frac{7}{3}$.",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting.",
    "def total(prices):\n    return sum(p * 1.08 for p in prices)\n\n\nprint(total([19.99, 5.25]))",
    "Café, naïve, über: 3 × 4 = 12, π ≈ 3.14159, √2, 日本語の数学, 😀 answers.",
] * 20
HELD_OUT = [
    "Janet's ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins with 4933828.",
    "   leading spaces, trailing tabs\t\t\nand\n\n\nnewline runs     inside",
    "for i in range(10):\n\tif i % 3 == 0:\n\t\tprint(f'{i:>4}')  # comment",
    "$\\int_0^1 x^2\\,dx = \\left.\\frac{x^3}{3}\\right|_0^1 = \\tfrac{1}{3}$ and \\sqrt[3]{27}=3",
    "Ünïcödé: ß→SS, Ω≈Ω (composed vs combining: é vs e\u0301), 中文数字一二三, emoji 🧮🎉👩‍👩‍👧",
    "1234567890 12,345.678 -0.5e-10 0x1F",
    "",
]


def build(tmp_path, kind):
    k = KINDS[kind]
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    if k["nfc"]:
        tok.normalizer = tokenizers.normalizers.NFC()
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([
        tokenizers.pre_tokenizers.Split(tokenizers.Regex(k["split"]), behavior="isolated", invert=False),
        tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=600, special_tokens=k["specials"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
                                             show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    d = tmp_path / kind
    d.mkdir()
    tok.save(str(d / "tokenizer.json"))
    cfg = {"bos_token": k["bos"], "eos_token": k["eos"], "pad_token": k["pad"]}
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d


@pytest.fixture(scope="module", params=list(KINDS))
def pair(request, tmp_path_factory):
    """(mdpo's tokenizer, transformers' tokenizer loaded from mdpo's save_pretrained, kind)."""
    d = build(tmp_path_factory.mktemp("bpe"), request.param)
    ours = BPETokenizer.from_pretrained(d)
    saved = d.parent / (request.param + "_saved")
    ours.save_pretrained(saved)
    theirs = transformers.AutoTokenizer.from_pretrained(saved)
    return ours, theirs, request.param


def test_byte_alphabet_is_a_bijection_on_256_bytes():
    a = byte_alphabet()
    assert sorted(a.values()) == list(range(256)) and len(a) == 256
    assert a["!"] == ord("!") and a["Ġ"] == ord(" ") and a["Ċ"] == ord("\n")  # GPT-2's space and newline


def test_encode_and_decode_equal_transformers(pair):
    ours, theirs, kind = pair
    assert type(theirs).__name__ in ("PreTrainedTokenizerFast", "TokenizersBackend")
    for text in HELD_OUT:
        ids = ours.encode(text)
        assert ids == theirs.encode(text, add_special_tokens=False), text
        assert ours.decode(ids) == theirs.decode(ids, clean_up_tokenization_spaces=False), text
    # digit grouping comes from the checkpoint's pattern: up to three for Llama 3, one for Qwen
    digits = [ours.decode([i]) for i in ours.encode("4933828")]
    assert max(map(len, digits)) <= (3 if kind == "llama3" else 1)


def test_decode_stream_is_exact_on_multibyte_characters(pair):
    ours, _, kind = pair
    for text in HELD_OUT:
        ids = ours.encode(text)
        stream = ours.decode_stream()
        steps = [stream.step(i) for i in ids]
        # Qwen normalises to NFC first: the combining e + U+0301 comes back composed
        want = unicodedata.normalize("NFC", text) if KINDS[kind]["nfc"] else text
        assert "".join(steps) + stream.flush() == ours.decode(ids) == want
        assert "\ufffd" not in "".join(steps)  # no step emitted half a character
    emoji = ours.encode("🧮")
    assert len(emoji) > 1  # not in the tiny vocabulary: split over byte tokens, completed by the last one


def test_special_strings_in_data_stay_text(pair):
    ours, theirs, kind = pair
    chat = FORMATS[kind]
    end = ours.piece_to_id(chat.end_turn)
    assert end in ours.special_ids and end in ours.stop_ids
    printed = f"x{chat.end_turn}{chat.start_turn}assistant"
    assert ours.encode(printed) == theirs.encode(printed, add_special_tokens=False)  # markup: special ids
    data = ours.encode(printed, special=False)
    assert end not in data and not set(data) & ours.special_ids and ours.decode(data) == printed
    turn = chat.tool_turn_ids(ours, printed)
    assert turn.count(end) == 1 and turn[-(2 if chat.after_end else 1)] == end  # only the turn's own close
    # without a special string in the data, the parts tokenize exactly as the whole text
    assert chat.tool_turn_ids(ours, "42\n") == ours.encode(chat.tool_turn_text("42\n"))


def test_chat_template_and_trajectory_ids_equal_transformers(pair):
    ours, theirs, kind = pair
    chat = FORMATS[kind]
    q, code, final = "What is 6*7?", "```python\nprint(6*7)\n```", "The answer is \\boxed{42}."
    messages = [{"role": "user", "content": q}, {"role": "assistant", "content": code},
                {"role": "user", "content": "```output\n42\n```"}, {"role": "assistant", "content": final}]
    text = ours.render_chat(messages, add_generation_prompt=False)
    assert text == theirs.apply_chat_template(messages, tokenize=False)
    assert ours.render_chat(messages[:1]) == theirs.apply_chat_template(messages[:1], tokenize=False,
                                                                       add_generation_prompt=True)
    # the SFT builder (and the sampler, through the same pieces) gives the template's ids, roles from parts
    # (a trajectory ends at the policy's own stop token; the template closes the turn with after_end too)
    t = trajectory_from_turns(ours, q, [(code, "42"), (final, None)], "q0")
    assert text.endswith(chat.close)
    assert t.tokens == theirs.encode(text[:len(text) - len(chat.after_end)], add_special_tokens=False)
    model_text = ours.decode([x for x, r in zip(t.tokens, t.roles) if r == Role.MODEL])
    assert model_text == code + final + chat.end_turn
    tool_text = ours.decode([x for x, r in zip(t.tokens, t.roles) if r == Role.TOOL])
    assert tool_text == chat.tool_turn_text("42")
    if kind == "chatml":  # a system turn, where the format has one
        sys_msgs = [{"role": "system", "content": "Reason step by step."}] + messages[:1]
        assert ours.render_chat(sys_msgs) == theirs.apply_chat_template(sys_msgs, tokenize=False,
                                                                       add_generation_prompt=True)


def test_missing_library_and_bad_files_are_one_line(tmp_path, monkeypatch):
    import builtins

    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json: not a tokenizers tokenizer.json"):
        BPETokenizer.from_pretrained(tmp_path)
    real = builtins.__import__

    def no_tokenizers(name, *a, **k):
        if name == "tokenizers":
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_tokenizers)
    with pytest.raises(ImportError, match=r"needs the 'tokenizers' package: pip install 'mdpo\[bpe\]'"):
        BPETokenizer.from_pretrained(tmp_path)


def test_sampler_with_a_bpe_tokenizer_writes_the_sft_layout(pair):
    """A rollout through the real sampler and interpreter, on a tiny model of the family that uses this format,
    forced along an SFT trajectory's model tokens: the same ids, roles and turns as trajectory_from_turns (and so
    as the chat template's ids, above); the interpreter's output is fed back in the family's tool turn."""
    import torch

    from mdpo.executor import ExecutorPool
    from mdpo.model import ModelConfig, build_model
    from mdpo.sampler import Request, Sampler, SamplingParams

    ours, _, kind = pair
    family = {"llama3": "tiny-llama", "chatml": "tiny-qwen2"}[kind]
    sft = trajectory_from_turns(ours, "What is 6*7?", [("```python\nprint(6*7)\n```", "42"),
                                                        ("The answer is \\boxed{42}.", None)], "q")
    model = build_model(ModelConfig.from_name(family, vocab_size=ours.vocab_size), seed=0).eval()

    def choose(prompt_id, sample_id, generated):
        return sft.tokens[sft.prompt_len + len(generated)]

    with ExecutorPool(max_workers=1, timeout=10) as ex:
        sampler = Sampler(model, ours, batch_size=1, max_length=256, executor=ex, choose=choose)
        (t,) = sampler.generate([Request("q", sft.tokens[:sft.prompt_len])], SamplingParams(temperature=0.0))
    assert (t.tokens, t.roles, t.turns) == (sft.tokens, sft.roles, sft.turns)
    assert t.finish_reason == "end_of_turn" and sampler.stats["tool_calls"] == 1
    assert torch.tensor(t.tokens).max() < ours.vocab_size
