"""Paged KV cache (mdpo.paged): packed steps against the model's plain forward, shared and copied-on-write prompt
blocks, sliding-window frees, preemption, and the paged sampler against the dense one token for token."""

import math
import random

import pytest
import torch

from mdpo.model import ModelConfig, build_model
from mdpo.paged import BlockAllocator, Feed, PagedKVCache, kv_groups, plan_blocks
from mdpo.sampler import Request, Sampler, SamplingParams
from mdpo.tokenizer import Tokenizer
from mdpo.trajectory import Role

from test_sampler import Immediate, naive_greedy, prompts, scripted, teacher_forced_logprobs, tiny


@pytest.fixture(scope="module")
def tok(gemma3_dir):
    return Tokenizer.from_pretrained(gemma3_dir)


def all_free(cache):
    return all(g.alloc.num_free == g.num_blocks - 1 for g in cache.groups)


# --- the cache alone ---


def test_allocator_counts_and_refuses_double_release():
    a = BlockAllocator(4)
    b1, b2 = a.alloc(), a.alloc()
    assert (b1, b2) == (1, 2) and a.num_free == 1  # block 0 is the null block, never handed out
    a.incref(b1)
    a.decref(b1)
    assert a.num_free == 1
    a.decref(b1)
    assert a.num_free == 2
    with pytest.raises(RuntimeError, match="released more often"):
        a.decref(b1)


def test_groups_and_memory_plan():
    g3 = ModelConfig.from_name("gemma-3-270m")
    full, sliding = kv_groups(g3, 2048, 16)
    assert full == ([5, 11, 17], None) and sliding[1] == 512 and len(sliding[0]) == 15
    assert kv_groups(ModelConfig.from_name("gemma-7b"), 2048, 16) == [(list(range(28)), None)]
    # Gemma 2's window (4096) never frees a block of a 2048-token row: one group, windows still masked per layer.
    assert len(kv_groups(ModelConfig.from_name("gemma-2-9b"), 2048, 16)) == 1
    # Without a budget: what rows x max_length need; a row in the sliding group holds at most its window plus
    # the longest feed (a prefill chunk: 512 by default, written before the blocks that left the window go).
    assert plan_blocks(g3, 4, 2048, 16, None, torch.bfloat16) == [4 * 128 + 1, 4 * (1024 // 16 + 1) + 1]
    assert plan_blocks(g3, 4, 2048, 16, None, torch.bfloat16, max_feed=16) == [4 * 128 + 1, 4 * (528 // 16 + 1) + 1]
    # A budget of one row's bytes gives one row per group (plus the null block).
    c = ModelConfig.from_name("gemma-7b")
    row = 2048 * 2 * 28 * 16 * 256 * 2
    assert plan_blocks(c, 64, 2048, 16, row * 10, torch.bfloat16) == [10 * 128 + 1]
    with pytest.raises(ValueError, match="cannot hold one row of 64 tokens"):
        PagedKVCache(ModelConfig.from_name("tiny-gemma"), 2, 64, 4, [10])


@pytest.mark.parametrize("name", ["tiny-gemma", "tiny-gemma2", "tiny-gemma3", "tiny-llama", "tiny-mistral-v0.1", "tiny-qwen2", "tiny-qwen3"])
@pytest.mark.parametrize("block_size", [4, 64])  # paged, dense
def test_packed_steps_match_the_plain_forward(name, block_size):
    """Rows of different lengths fed in packed steps -- prompts, several-token extends and one-token decodes in the
    same forward, over blocks handed out in a shuffled order -- give the logits of a plain forward of each
    row's whole sequence (fp32, 1e-5 of the logits' scale). tiny-gemma2/3 and tiny-mistral-v0.1 slide a window of 8
    across blocks of 4."""
    torch.manual_seed(0)
    model = tiny(name)
    c = model.config
    cache = PagedKVCache(c, 4, 64, block_size, [40] * len(kv_groups(c, 64, block_size)))
    for g in cache.groups:  # fragmented pool: blocks come in a shuffled order
        random.Random(1).shuffle(g.alloc.free)
    seqs = [torch.randint(3, 512, (n,)).tolist() for n in (23, 10, 40, 17)]
    # (row, how many tokens it feeds) per step: prompts, decodes and extends mixed.
    schedule = [[(0, 11), (1, 9)], [(0, 1), (1, 1), (2, 19)], [(0, 6), (2, 1), (3, 5)], [(0, 5), (1, 0), (2, 20),
                (3, 1)], [(3, 11)]]
    fed = [0] * 4
    for step in schedule:
        feeds = []
        for row, n in step:
            if n:
                assert cache.ensure(row, fed[row], fed[row] + n)
                feeds.append(Feed(row, fed[row], seqs[row][fed[row]: fed[row] + n]))
        view = cache.plan(feeds)
        with torch.no_grad():
            hidden = model(view.tokens, positions=view.positions, cache=view, return_hidden=True)
            got = model.head(hidden[0, view.last])
        for j, f in enumerate(feeds):
            fed[f.row] += len(f.tokens)
            cache.trim(f.row, fed[f.row])
            with torch.no_grad():
                want = model(torch.tensor([seqs[f.row][: fed[f.row]]]))[0, -1]
            # 1e-5 of the logits' scale: the Llama-style norms, scaled x3 by tiny(), give logits of ~6 where
            # fp32 summation order alone moves them by 2.3e-5 (plain SDPA against plain eager, tiny-qwen3)
            scale = max(1.0, want.abs().max().item())
            torch.testing.assert_close(got[j], want, atol=1e-5 * scale, rtol=1e-5)
    assert fed == [len(s) for s in seqs]
    for row in range(4):
        cache.release(row)
    assert all_free(cache)


def test_sliding_group_holds_only_the_window():
    c = ModelConfig.from_name("tiny-gemma3")  # window 8
    cache = PagedKVCache(c, 1, 64, 4, [20, 20])
    full, sliding = cache.groups
    for pos in range(40):
        assert cache.ensure(0, pos, pos + 1)
        cache.trim(0, pos + 1)
        # the next query (pos + 1) sees keys from pos - 6 on: blocks (pos - 6) // 4 .. pos // 4 stay
        assert sliding.live_blocks() == pos // 4 - max(0, pos - 6) // 4 + 1
        assert full.live_blocks() == pos // 4 + 1
    assert [b != 0 for b in sliding.tables[0]] == [False] * 8 + [True, True]
    cache.release(0)
    assert all_free(cache)


def test_siblings_share_prompt_blocks_and_copy_the_partial_one_on_write():
    c = ModelConfig.from_name("tiny-gemma")
    cache = PagedKVCache(c, 4, 64, 4, [30])
    (g,) = cache.groups
    assert cache.ensure(0, 0, 10)  # a 10-token prompt: blocks 0, 1 full, block 2 holds 2 positions
    k = g.k[0]
    blocks = list(g.tables[0])
    k[blocks] = torch.randn(3, *k.shape[1:])
    handle = cache.hold(0, 10)
    for s in (1, 2):
        cache.share(0, s, 10)
    assert [g.alloc.ref[b] for b in blocks] == [4, 4, 4]  # leader, two siblings, the held prompt
    assert g.live_blocks() == 3
    before = k[blocks[2]].clone()
    for s in (0, 1, 2):  # each writes position 10: into the shared partial block
        assert cache.ensure(s, 10, 11)
    cache.plan([Feed(0, 10, [5])])  # copies happen before the next step
    assert cache.stats["cow_copies"] == 3 and g.live_blocks() == 3 + 3
    for s in (0, 1, 2):
        assert g.tables[s][:2] == blocks[:2] and g.tables[s][2] != blocks[2]
        assert torch.equal(k[g.tables[s][2], :2], before[:2])  # the prompt's two positions, copied
    cache.adopt(handle, 3)  # a sibling admitted later still finds the prompt intact
    assert g.tables[3] == blocks and torch.equal(k[blocks[2]], before)
    cache.drop(handle)
    for s in range(4):
        cache.release(s)
    assert all_free(cache)


def test_ensure_refuses_without_changing_anything():
    c = ModelConfig.from_name("tiny-gemma")
    cache = PagedKVCache(c, 2, 16, 4, [6])  # 5 usable blocks
    assert cache.ensure(0, 0, 16)
    assert not cache.ensure(1, 0, 8)
    assert cache.groups[0].tables[1] == [] and cache.groups[0].alloc.num_free == 1
    assert cache.ensure(1, 0, 4)


# --- the sampler on a paged cache ---


def run(sampler, reqs, params):
    out = {(t.prompt_id, t.sample_id): t for t in sampler.generate(reqs, params)}
    assert all_free(sampler.kv)  # every block given back
    return out


def same_trajectories(a, b, tol=1e-5):
    assert a.keys() == b.keys()
    for key in a:
        x, y = a[key], b[key]
        assert (x.tokens, x.roles, x.turns, x.finish_reason) == (y.tokens, y.roles, y.turns, y.finish_reason), key
        assert max(abs(p - q) for p, q in zip(x.logprobs, y.logprobs)) < tol, key


@pytest.mark.parametrize("name", ["tiny-gemma", "tiny-gemma2", "tiny-gemma3", "tiny-llama", "tiny-mistral-v0.1", "tiny-qwen2", "tiny-qwen3"])
def test_paged_sampler_equals_dense_and_the_uncached_loop(tok, name):
    """Greedy, 3 samples of each of 5 prompts through 4 slots (refills, siblings in the same and in later steps),
    blocks of 4 against the dense layout: the same trajectories, equal to a naive uncached loop."""
    model = tiny(name)
    reqs = [Request(r.prompt_id, r.tokens, n=3) for r in prompts(5, [5, 17, 9, 30, 12])]
    params = SamplingParams(temperature=0.0, max_new_tokens_per_turn=20)
    dense = run(Sampler(model, tok, batch_size=4, max_length=64), reqs, params)
    paged_sampler = Sampler(model, tok, batch_size=4, max_length=64, block_size=4)
    paged = run(paged_sampler, reqs, params)
    same_trajectories(paged, dense)
    for r in reqs:
        expected = r.tokens + naive_greedy(model, r.tokens, 20, paged_sampler.stop_ids)
        assert all(paged[(r.prompt_id, s)].tokens == expected for s in range(3))
    assert paged_sampler.stats["prefill_tokens"] == sum(len(r.tokens) for r in reqs)  # each prompt ran once
    assert paged_sampler.kv.stats["cow_copies"] > 0


def test_paged_sampler_with_tool_calls_equals_dense(tok):
    """Forced choices with tool calls: rows pause, observations of different lengths are fed in packed steps,
    temperature 1 draws elsewhere; tiny-gemma3's window of 8 frees blocks of 4 all along. Both paged reads."""
    model = tiny("tiny-gemma3", seed=5, vocab_size=262144)
    code = {"a": "print(a)", "b": "print(b)", "c": "print(c)"}
    outputs = {"print(a)": "1", "print(b)": " ".join(["22"] * 20), "print(c)": "3 3 3 3 3"}
    scripts = {pid: tok.encode(f"Let me see.\n```python\n{c}\n```") for pid, c in code.items()}
    reqs = [Request(pid, tok.encode(tok.render_chat([{"role": "user", "content": f"Q {pid}"}])), n=2)
            for pid in code]
    params = SamplingParams(temperature=1.0, max_new_tokens_per_turn=30, max_turns=2)

    def sampler(**kw):
        pos = {}

        def choose(pid, sid, generated):  # the first turn is scripted, the rest sampled
            i = pos.get((pid, sid), 0)
            pos[(pid, sid)] = i + 1
            return scripts[pid][i] if i < len(scripts[pid]) else None
        return Sampler(model, tok, batch_size=4, max_length=256, executor=Immediate(answer=lambda c: outputs[c]),
                       choose=choose, seed=3, **kw)

    dense = run(sampler(), reqs, params)
    paged_sampler = sampler(block_size=4)
    paged = run(paged_sampler, reqs, params)
    same_trajectories(paged, dense)
    same_trajectories(run(sampler(block_size=4, attention="flex"), reqs, params), dense)  # observations beside
    # decoding rows: steps with a flex decode segment and a gathered multi-token one
    assert all(Role.TOOL in t.roles for t in paged.values())
    for t in paged.values():
        ref = teacher_forced_logprobs(model, t.tokens)
        assert max(abs(t.logprobs[i] - ref[i]) for i, r in enumerate(t.roles) if r == Role.MODEL) < 1e-4
    # The sliding layers held a window's worth per row, the full layers everything.
    full, sliding = paged_sampler.kv.groups
    assert sliding.peak < full.peak


@pytest.mark.parametrize("name, attention", [("tiny-gemma", "gather"), ("tiny-gemma3", "gather"),
                                             ("tiny-gemma3", "flex")])
def test_graphed_steps_in_row_buckets_equal_the_plain_paged_step(tok, name, attention):
    """The static-shape decode step that CUDA graphs replay (eager here) runs the decoding rows padded to a
    power-of-two bucket (8, 16, ...), the padding reading and writing only null blocks: as rows finish at different
    lengths the buckets shrink, and every trajectory equals the plain paged step's (temperature 1), with the pool
    read by the gather or by flex (whose block lists have the bucket's rows too)."""
    model = tiny(name, seed=2)
    plain = Sampler(model, tok, batch_size=20, max_length=64, block_size=4, seed=4, pack=False)
    graphed = Sampler(model, tok, batch_size=20, max_length=64, block_size=4, seed=4, pack=False, graphs=True,
                      graph_bucket=8, attention=attention)
    plain.stop_ids = graphed.stop_ids = set()  # rows end at their request's token budget: staggered, known ends
    shapes = []
    step = graphed._graphed.__call__

    def spy(net, view):
        shapes.append(tuple(view.tokens.shape))
        for num, _, _ in view.segments[0].get("flex", {}).values():
            assert len(num) == view.tokens.shape[1]
        return step(net, view)
    graphed._graphed = spy
    reqs = [Request(r.prompt_id, r.tokens, n=3,
                    params=SamplingParams(temperature=1.0, max_new_tokens_per_turn=3 + 5 * i))
            for i, r in enumerate(prompts(7, [5, 9, 14, 6, 11, 20, 8], seed=2))]
    same_trajectories(run(graphed, reqs, None), run(plain, reqs, None))
    rows = {s[1] for s in shapes}
    assert {8, 16} <= rows and rows <= {8, 16, 20}  # 20 slots: the top bucket is the batch itself


@pytest.mark.parametrize("name", ["tiny-gemma", "tiny-gemma2", "tiny-gemma3", "tiny-mistral-v0.1", "tiny-qwen2"])
def test_flex_decode_reads_live_blocks_and_equals_the_gather(tok, name):
    """attention="flex" (FlexAttention over each row's live blocks, compiled): rows of staggered lengths, siblings
    sharing prompt blocks, a pool small enough to preempt, Gemma 2's softcap and windows of 8 over blocks of 4 --
    the trajectories of the padded gather, drawn at temperature 1; and the blocks the decode segment lists are
    exactly the live ones."""
    model = tiny(name, seed=2)
    reqs = [Request(r.prompt_id, r.tokens, n=2,
                    params=SamplingParams(temperature=1.0, max_new_tokens_per_turn=12 + 10 * i))
            for i, r in enumerate(prompts(5, [5, 9, 14, 6, 20], seed=2))]
    small = 2.2 * 64 * model.kv_bytes_per_token() / 2 ** 30
    gather = Sampler(model, tok, batch_size=8, max_length=64, block_size=4, seed=4, kv_cache_gb=small)
    flex = Sampler(model, tok, batch_size=8, max_length=64, block_size=4, seed=4, kv_cache_gb=small,
                   attention="flex")
    gather.stop_ids = flex.stop_ids = set()  # rows end at their token budget: staggered, known ends
    listed = []
    plan = flex.kv.plan

    def spy(feeds, **kw):  # every decode segment: blocks listed per row vs the blocks its positions live in
        view = plan(feeds, **kw)
        for seg in view.segments:
            for (gid, w), (num, index, edge) in seg.get("flex", {}).items():
                g = next(g for g in flex.kv.groups if id(g) == gid)
                for r, p in zip(feeds.rows[feeds.lens == 1].tolist(), feeds.starts[feeds.lens == 1].tolist()):
                    k = list(feeds.rows[feeds.lens == 1]).index(r)
                    lo = max(0, p - w + 1) // 4 if w else 0
                    listed.append((index[k, :num[k]].tolist(), g.tables[r][lo: p // 4 + 1]))
        return view
    flex.kv.plan = spy
    same_trajectories(run(flex, reqs, None), run(gather, reqs, None))
    assert flex.stats["preemptions"] > 0 and flex.stats["decode_steps"] > 20
    assert listed and all(a == b and 0 not in a for a, b in listed)


def test_flex_with_a_window_inside_a_shared_block_table(tok):
    """When a window cannot free a block before max_length, sliding and full layers share one block table and flex
    plans each window's blocks apart: window 8 over blocks of 4 within 11 tokens, against the gather."""
    model = tiny("tiny-gemma3", seed=3)
    reqs = [Request(r.prompt_id, r.tokens, n=2) for r in prompts(3, [3, 4, 5], seed=3)]
    params = SamplingParams(temperature=1.0, max_new_tokens_per_turn=8)
    gather = Sampler(model, tok, batch_size=6, max_length=11, block_size=4, seed=2)
    flex = Sampler(model, tok, batch_size=6, max_length=11, block_size=4, seed=2, attention="flex")
    assert len(flex.kv.groups) == 1 and flex.kv.groups[0].windows == [None, 8]
    gather.stop_ids = flex.stop_ids = set()
    got = run(flex, reqs, params)
    assert max(len(t.tokens) for t in got.values()) == 11  # positions 8..10 attend without the first keys
    same_trajectories(got, run(gather, reqs, params))


@pytest.mark.parametrize("name", ["tiny-gemma", "tiny-gemma3"])
def test_preempted_rows_recompute_and_go_on_as_if_uninterrupted(tok, name):
    """A pool with room for about two rows and 6 slots: rows are preempted, fed again from their first token,
    and every trajectory equals the one of a pool large enough for all (sampled at temperature 1)."""
    model = tiny(name, seed=7)
    reqs = [Request(r.prompt_id, r.tokens, n=2) for r in prompts(4, [9, 14, 6, 11], seed=7)]
    params = SamplingParams(temperature=1.0, max_new_tokens_per_turn=40)
    big = run(Sampler(model, tok, batch_size=6, max_length=64, block_size=4, seed=1), reqs, params)
    per_token = model.kv_bytes_per_token()
    small = Sampler(model, tok, batch_size=6, max_length=64, block_size=4, seed=1,
                    kv_cache_gb=2.2 * 64 * per_token / 2 ** 30)
    got = run(small, reqs, params)
    assert small.stats["preemptions"] > 0 and small.stats["recompute_tokens"] > 0
    same_trajectories(got, big)
    assert small.kv.stats["peak_blocks"] <= sum(g.num_blocks - 1 for g in small.kv.groups)


def test_memory_plan_line(tok):
    model = tiny("tiny-gemma3")
    s = Sampler(model, tok, batch_size=8, max_length=128, block_size=16, kv_cache_gb=0.001)
    line = s.memory_plan(typical_length=100)
    per_token = model.kv_bytes_per_token()
    assert line.startswith("kv cache: weights") and "paged pool" in line and "blocks of 16" in line
    assert f"{s.kv.pool_bytes() // per_token} tokens" in line
    full, sliding = s.kv.groups
    # a row of 100 tokens: 7 blocks of full layers; sliding layers (window 8) keep positions 92..99: blocks 5, 6
    rows = min((full.num_blocks - 1) // math.ceil(100 / 16), (sliding.num_blocks - 1) // 2)
    assert f"{rows} rows of 100 tokens" in line
    assert "dense pool" in Sampler(model, tok, batch_size=8, max_length=128).memory_plan()


def test_bf16_step_attends_in_fp32_on_cpu(monkeypatch):
    """bf16 packed steps (attention upcast to fp32, the CPU default) stay within bf16 rounding of
    the plain bf16 forward, with the upcast on and off."""
    model = tiny("tiny-gemma3").to(torch.bfloat16)
    seq = torch.randint(3, 512, (30,)).tolist()
    assert PagedKVCache(model.config, 1, 64, 4, [20, 20], dtype=torch.bfloat16).upcast
    assert not PagedKVCache(model.config, 1, 64, 4, [20, 20], dtype=torch.float32).upcast
    for upcast in (True, False):
        cache = PagedKVCache(model.config, 1, 64, 4, [20, 20], dtype=torch.bfloat16)
        cache.upcast = upcast
        assert cache.ensure(0, 0, 29)
        with torch.no_grad():
            view = cache.plan([Feed(0, 0, seq[:29])])
            model(view.tokens, positions=view.positions, cache=view, return_hidden=True)
            cache.trim(0, 29)
            assert cache.ensure(0, 29, 30)
            view = cache.plan([Feed(0, 29, seq[29:])])
            got = model.head(model(view.tokens, positions=view.positions, cache=view, return_hidden=True)[0, -1])
            want = model(torch.tensor([seq]))[0, -1]
        # logits of magnitude <= 1.5: a bf16 ulp there is 2^-7; measured 0.016 (upcast) and 0.012 (bf16 SDPA)
        assert (got.float() - want.float()).abs().max() <= 4 * 2 ** -7
        assert got.argmax() == want.argmax()
