"""Turn-level preferences (loss.type turn_dpo): continuations from a prefix with the interpreter state replayed,
the branch points, and a loss that the shared prefix does not enter."""

import pytest
import torch

from mdpo.config import LossConfig
from mdpo.data import apply_filters, first_model_turn
from mdpo.config import FilterConfig
from mdpo.eval import EvalError, prefix_problem
from mdpo.executor import ExecutorPool
from mdpo.logprobs import sequence_logprobs
from mdpo.losses import dpo_loss
from mdpo.model import ModelConfig, build_model
from mdpo.objectives import Batch, Example, ObjectiveError, get_objective, turn_starts
from mdpo.sampler import Request, Sampler, SamplingParams
from mdpo.tokenizer import Tokenizer
from mdpo.tools import PythonTool
from mdpo.train import batch_tensors
from mdpo.trajectory import Role, Trajectory

P, M, T, S = int(Role.PROMPT), int(Role.MODEL), int(Role.TOOL), int(Role.TEMPLATE)


def obj(name, **kw):
    return get_objective(LossConfig(type=name, **kw))


@pytest.fixture(scope="module")
def tok(gemma3_dir):
    return Tokenizer.from_pretrained(gemma3_dir)


# The state a cell leaves behind: seeded randomness (replayed exactly), a list, an import; the second cell
# prints all of it, so its output is the interpreter's state at the branch point.
CELL1 = "import random, math\nrandom.seed(7)\nx = random.randint(1, 10**9)\ny = [x, x * 2]"
CELL2 = "print(x, y, math.pi, sorted(k for k in globals() if not k.startswith('_')))"


def scripted_sampler(tok, pool, turns):
    """A sampler whose model writes `turns` ((text, ends the trajectory)) token by token (the choose hook)."""
    model = build_model(ModelConfig.from_name("tiny-gemma3", vocab_size=262144), seed=0).eval()
    script = iter([t for text, last in turns for t in tok.encode(text) + ([tok.end_of_turn_id] if last else [])])
    return Sampler(model, tok, batch_size=2, max_length=512, tool=PythonTool(pool),
                   choose=lambda pid, sid, generated: next(script))


def test_continuation_replays_the_interpreter_state(tok):
    """A continuation cut where turn 2 begins reruns turn 1's cell in its own session: the same cell 2 then
    prints the same state, token for token, as in the original; without the replay it cannot (NameError)."""
    turns = [(f"```python\n{CELL1}\n```", False), (f"```python\n{CELL2}\n```", False), ("\\boxed{1}", True)]
    prompt = tok.encode(tok.render_chat([{"role": "user", "content": "Q?"}]))
    with ExecutorPool(max_workers=4, timeout=20) as pool:
        (orig,) = scripted_sampler(tok, pool, turns).generate([Request("q", prompt)], SamplingParams(temperature=0))
        cut = turn_starts(orig)[0]
        assert orig.roles[cut] == M and orig.turns[cut] == 2 and orig.roles[cut - 1] == S
        job = prefix_problem(orig, cut, "1")
        assert job["prefix"]["calls"] == [CELL1] and job["prefix"]["tool_status"] == ["ok"]
        pre = job["prefix"]

        def continuation(replay):
            # The continuation's model writes turn 2 onwards.
            tail = [(f"```python\n{CELL2}\n```", False), ("\\boxed{1}", True)]
            sampler = scripted_sampler(tok, pool, tail)
            req = Request(job["id"], pre["tokens"], roles=pre["roles"], turns=pre["turns"], replay=replay,
                          meta={"branch": cut, "tool_status": pre["tool_status"]})
            (c,) = sampler.generate([req], SamplingParams(temperature=0))
            return c

        c = continuation(pre["calls"])
        bare = continuation([])
    assert c.tokens == orig.tokens and c.roles == orig.roles and c.turns == orig.turns
    assert c.meta["calls"] == orig.meta["calls"] == [CELL1, CELL2]
    assert c.meta["tool_status"] == orig.meta["tool_status"] == ["ok", "ok"]
    assert c.meta["branch"] == cut and c.logprobs[:cut] == [0.0] * cut  # the prefix was not sampled here
    out = [tok.decode([x for x, r, k in zip(t.tokens, t.roles, t.turns) if r == T and k == 2]) for t in (orig, bare)]
    assert "'math', 'random', 'x', 'y'" in out[0] and "NameError" in out[1]
    assert bare.meta["tool_status"] == ["ok", "error"]


def test_prefix_problem_needs_the_recorded_calls():
    t = Trajectory("p", 3, [2, 5, 6, 7, 8, 9], [P, M, S, T, S, M], [0, 1, 1, 1, 2, 2], meta={"tool_status": ["ok"]})
    with pytest.raises(EvalError, match=r"p/3: no record of the 1 tool calls before position 5"):
        prefix_problem(t, 5, "1")
    t.meta["calls"] = ["print(1)"]
    job = prefix_problem(t, 5, "1")
    assert job["id"] == "p>3@5" and job["prefix"]["tokens"] == [2, 5, 6, 7, 8]
    assert job["prefix"]["calls"] == ["print(1)"] and job["prefix"]["source"] == "p"


def traj(pid, sid, parts, correct, g, meta=None):
    """A prompt of 3 tokens, then (role, turn, n) runs of random tokens."""
    tokens, roles, turns = [2, 7, 8], [P] * 3, [0] * 3
    for role, turn, n in parts:
        tokens += torch.randint(5, 200, (n,), generator=g).tolist()
        roles += [role] * n
        turns += [turn] * n
    return Trajectory(pid, sid, tokens, roles, turns, correct=correct, answer="1",
                      meta={"tool_status": ["ok"] * (max(turns) - 1), **(meta or {})})


TWO_TURNS = [(M, 1, 4), (S, 1, 2), (T, 1, 3), (S, 2, 2), (M, 2, 5)]


def test_branch_points_are_turn_starts_of_prompts_with_both_outcomes():
    g = torch.Generator().manual_seed(0)
    one_turn = [(M, 1, 6)]
    kept = [traj("a", 0, TWO_TURNS, True, g), traj("a", 1, one_turn, False, g),  # both outcomes, one cut
            traj("b", 0, TWO_TURNS, True, g), traj("b", 1, TWO_TURNS, True, g),  # right only: no point
            traj("c", 0, one_turn, True, g), traj("c", 1, one_turn, False, g)]  # no second turn: no point
    o = obj("turn_dpo")
    points = o.branch_points(kept, seed=5)
    assert [(t.prompt_id, t.sample_id, cut) for t, cut in points] == [("a", 0, 3 + 4 + 2 + 3 + 2)]
    assert turn_starts(kept[0]) == [14] and turn_starts(kept[1]) == []
    assert o.branch_points(kept, seed=5) == points  # a function of the seed and the data only
    with pytest.raises(ObjectiveError, match="loss.branch_samples: a pair needs two continuations"):
        obj("turn_dpo", branch_samples=1)


def test_duplicate_filter_reads_a_continuations_own_first_turn():
    """Continuations share their first turns: the duplicate filter must compare the first turn after the cut,
    or every continuation of a prefix would be a 'duplicate' of the first."""
    g = torch.Generator().manual_seed(1)
    base = traj("a>0@14", 0, TWO_TURNS, True, g, {"branch": 14})
    same_prefix = Trajectory(base.prompt_id, 1, base.tokens[:14] + [9, 9, 9, 9, 9], base.roles, base.turns,
                             correct=True, answer="1", meta=dict(base.meta))
    assert first_model_turn(base) == tuple(base.tokens[14:]) and first_model_turn(same_prefix) == (9,) * 5
    kept, counts = apply_filters([base, same_prefix], FilterConfig(), 512)
    assert len(kept) == 2 and counts["duplicate_first_turn"] == 0
    copy = Trajectory(base.prompt_id, 2, list(base.tokens), base.roles, base.turns, correct=True, answer="1",
                      meta=dict(base.meta))
    assert apply_filters([base, copy], FilterConfig(), 512)[1]["duplicate_first_turn"] == 1


def test_shared_prefix_contributes_nothing_to_the_loss():
    """Through the trainer's path (batch_tensors -> sequence_logprobs -> objective.loss) the turn-level pair's
    log-probs are sums over the continuation's model tokens only, against a naive full-softmax sum; plain
    M-DPO on the same pair also sums the prefix's model tokens, so the two differ by exactly that."""
    g = torch.Generator().manual_seed(2)
    model = build_model(ModelConfig.from_name("tiny-gemma2"), seed=0).eval()
    ref = build_model(ModelConfig.from_name("tiny-gemma2"), seed=1).eval()
    chosen = traj("a>0@14", 0, TWO_TURNS, True, g, {"branch": 14})
    rejected = Trajectory(chosen.prompt_id, 1, chosen.tokens[:14] + torch.randint(5, 200, (7,), generator=g).tolist(),
                          chosen.roles[:14] + [M] * 7, chosen.turns[:14] + [2] * 7, correct=False, answer="2",
                          meta=dict(chosen.meta))
    seqs = [chosen, rejected]
    o = obj("turn_dpo", beta=0.5, nll_coef=0.3)

    def naive(net, t, start):
        with torch.no_grad():
            logp = torch.log_softmax(net(torch.tensor([t.tokens]))[0, :-1].float(), -1)
        lp = logp.gather(1, torch.tensor(t.tokens[1:])[:, None])[:, 0]
        return sum(lp[j - 1].item() for j in range(max(1, start), len(t.tokens)) if t.roles[j] == M)

    tokens, w = batch_tensors(seqs, "model", "cpu", o)
    assert w[:, :14].sum().item() == 0.0  # the prefix (its model turn included) has weight 0
    with torch.no_grad():
        pol, counts = sequence_logprobs(model, tokens, w)
        rf, _ = sequence_logprobs(ref, tokens, w)
    for i, t in enumerate(seqs):
        assert pol[i].item() == pytest.approx(naive(model, t, 14), rel=1e-5)
        assert rf[i].item() == pytest.approx(naive(ref, t, 14), rel=1e-5)
        assert counts[i].item() == sum(r == M for r in t.roles[14:])
    losses, _ = o.loss(Batch(pol, rf, counts, [Example(seqs)]))
    want = dpo_loss(pol[0:1], pol[1:2], rf[0:1], rf[1:2], beta=0.5, nll_coef=0.3, chosen_tokens=counts[0:1])[0]
    assert losses.item() == pytest.approx(want.item())
    # Plain M-DPO counts the shared prefix's 4 model tokens in both sums.
    tokens2, m2 = batch_tensors(seqs, "model", "cpu", obj("mdpo"))
    with torch.no_grad():
        pol2, counts2 = sequence_logprobs(model, tokens2, m2)
    prefix = naive(model, chosen, 1) - naive(model, chosen, 14)
    assert prefix < -1.0  # the prefix's tokens carry real log-prob mass
    assert (pol2 - pol).tolist() == pytest.approx([prefix, prefix], rel=1e-4)
    assert (counts2 - counts).tolist() == [4, 4]
    # A trajectory-level pair (no branch) of turn_dpo is plain M-DPO.
    plain = [traj("b", 0, TWO_TURNS, True, g), traj("b", 1, TWO_TURNS, False, g)]
    assert torch.equal(batch_tensors(plain, "model", "cpu", o)[1].bool(), batch_tensors(plain, "model", "cpu")[1])


def test_turn_dpo_builds_trajectory_and_branch_pairs():
    g = torch.Generator().manual_seed(3)
    kept = [traj("a", 0, TWO_TURNS, True, g), traj("a", 1, TWO_TURNS, False, g)]
    c = [traj("a>0@14", k, TWO_TURNS, k % 2 == 0, g, {"branch": 14}) for k in range(4)]
    rows = obj("turn_dpo").build(kept, 0, c)
    assert [(r[0].prompt_id, r[0].correct, r[1].correct) for r in rows] == [("a", True, False),
                                                                          ("a>0@14", True, False)]
    assert obj("mdpo").build(kept, 0, c) == rows[:1]  # M-DPO ignores continuations
