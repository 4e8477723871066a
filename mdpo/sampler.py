"""Batched, KV-cached sampling of tool-integrated trajectories, with the interpreter in the loop.

Up to B rows (slots) decode together over one KV cache (mdpo.paged: a pool of blocks with a table per row,
or the dense layout of one block per row). Each row holds one trajectory. One loop iteration:

1. admit:  free slots take the next samples while the pool has room. N samples of one prompt share one
           prefill: the first feeds the prompt, its siblings take the prompt's blocks (paged: shared, copied on
           write; dense: copied) and draw their first token from the same logits; the prompt's KV is kept for
           siblings admitted later.
2. tools:  finished interpreter calls are turned into observation tokens and queued on their row.
3. step:   ONE forward for every row with queued tokens: admitted prompts, observations and single decoded
           tokens packed into one row of tokens with per-token positions (the weights are read once a step).
           Blocks are reserved first; when the pool is short the newest row is preempted and later feeds its
           whole trajectory again (its draws are a pure function of (seed, prompt, sample, position), so it
           goes on as it would have). Every fed row then samples its next token (mdpo.sampling): one host sync
           per step, to read the tokens back.

Row state lives in arrays (_Slots: every row's tokens, roles, turns, log-probs and counters), so the schedule, the
step's inputs and the recording of a step's tokens are a few array operations for all rows. Python looks at a row
only when its new token can matter: a stop token, a token holding a backtick (a call may open or close: then the
turn's text is decoded and scanned), the token after an incomplete fence, or a length limit. Before (session 8),
each row cost Python every step: 3.5-3.9 ms of host work a step at 256 rows, against 0.83-1.02 ms now in the same runs
(docs/LOG.md, session 9).

A row pauses when its model turn makes a tool call (mdpo.tools: a closed ```python block for the interpreter):
the call goes to the tool and the other rows keep decoding. The turn markup around the tool's observation comes
from the chat format (mdpo.chat). Every token is recorded with its role (mdpo.trajectory.Role), so the
trainer's mask comes from how a token was produced, never from re-reading text.

How a model turn ends (finish_reason when the trajectory ends there):
* `<end_of_turn>` ("end_of_turn") or `<eos>` ("eos"): the turn is over. Inside an open call block,
  `<end_of_turn>` closes the block as well: the call runs and the trajectory goes on.
* a closed call: the tool runs, its observation is injected, the next model turn starts.
* `<start_of_turn>` ("start_of_turn"): the model began a turn of its own, the first step of writing the
  user's turn (and so the tool's output) itself. The paper stops generation at this string; mdpo ends the
  trajectory there and runs no open block, so a made-up observation never follows it.
* "```output" written by the model outside a call ("output_fence", only with a tool): a made-up output block.
  The paper stops generation at this string; mdpo ends the trajectory there, as soon as the fence is decoded.
  (A "```output" right after a call cannot happen: the row pauses as soon as the call's closing fence is.)
Unlike the paper, which drops a stop string from its text, mdpo keeps these tokens as the policy's actions
(role MODEL): they were sampled, and token-exact trajectories are what the loss trains on. Neither ending is a
truncation; a trajectory that ends this way should count as a loser whatever its answer, so that the loss
pushes the marker down (grading's decision: MALFORMED_ENDINGS names them).
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch

from mdpo.chat import ChatFormat, for_tokenizer
from mdpo.extraction import LIMIT_MESSAGE
from mdpo.model import CausalLM
from mdpo.packed import is_fresh, pack_for_cpu, should_pack
from mdpo.paged import Feeds, PagedKVCache, StepView, plan_blocks
from mdpo.sampling import Drawer, counter_uniform
from mdpo.tools import STOP, PythonTool, Tool, ToolResult
from mdpo.trajectory import Role, Trajectory

MAX_CALLS_TEXT = "\n" + LIMIT_MESSAGE  # the paper's closing text after the last allowed call
MALFORMED_ENDINGS = ("start_of_turn", "output_fence")  # finish reasons of a turn that began a fake user turn


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    max_new_tokens_per_turn: int = 512
    max_turns: int = 6  # model turns; the paper's horizon H
    max_length: int = 2048  # whole trajectory, prompt included


@dataclass
class Request:
    """A prompt (already rendered and tokenised, BOS included) and how many samples to draw from it."""

    prompt_id: str
    tokens: list[int]
    n: int = 1
    params: SamplingParams | None = None  # None = the sampler's default
    meta: dict = field(default_factory=dict)
    sample_ids: list[int] | None = None  # ids of the n samples (default 0..n-1); a resumed job draws only the missing
    # A continuation: `tokens` is a trajectory's prefix ending where a model turn starts, with that prefix's
    # roles and turn indices, and `replay` the tool calls the prefix made, run again (in order, their output
    # unused) in each sample's own interpreter session before its first call, so that the session holds the
    # state it had at the branch point.
    roles: list[int] | None = None
    turns: list[int] | None = None
    replay: list[str] = field(default_factory=list)


class _Row:
    """What Python keeps of a row: its request, tool state and turn text. Its tokens and counters live in the
    sampler's _Slots arrays, row `slot`."""

    __slots__ = ("req", "sample_id", "params", "stream", "turn_text", "decoded", "finder", "future", "closed_by_eot",
                 "tool_status", "calls")

    def __init__(self, req: int, sample_id: int, params: SamplingParams, stream, finder, decoded: int):
        self.req, self.sample_id, self.params = req, sample_id, params
        self.stream = stream
        self.turn_text = ""  # the model turn's text, decoded up to index `decoded` of the row's tokens
        self.decoded = decoded
        self.finder = finder  # the tool's call finder for this turn (mdpo.tools.FenceFinder); None without a tool
        self.future: cf.Future | None = None
        self.closed_by_eot = False
        self.tool_status: list = []  # executor status of each call (ok, error, timeout, ...)
        self.calls: list = []  # the code of each call, as run (what a continuation replays)


class _Slots:
    """Every slot's tokens and counters as arrays, so that a step appends to all rows and checks them in a few
    numpy operations, and Python looks at a row only where something happens (a stop token, a backtick, a
    limit). tok / role / turn / lp (B, max_length) hold each row's trajectory; n its length; cached how many of
    its tokens are in the KV cache (tokens[cached:n] are fed next)."""

    def __init__(self, B: int, L: int):
        self.tok = np.zeros((B, L), np.int64)
        self.role = np.zeros((B, L), np.int8)
        self.turn = np.zeros((B, L), np.int32)
        self.lp = np.zeros((B, L), np.float64)
        self.n = np.zeros(B, np.int64)
        self.cached = np.zeros(B, np.int64)
        self.prompt = np.zeros(B, np.int64)  # the request's prompt length
        self.now = np.zeros(B, np.int32)  # the model turn being written (turn index of its tokens)
        self.turn_tokens = np.zeros(B, np.int64)  # tokens sampled in this turn
        self.turn_max = np.zeros(B, np.int64)  # params.max_new_tokens_per_turn
        self.limit = np.zeros(B, np.int64)  # min(sampler max_length, params.max_length)
        self.temp = np.zeros(B, np.float64)
        self.top_k = np.zeros(B, np.int64)
        self.top_p = np.ones(B, np.float64)
        self.key = np.zeros(B, np.int64)  # the sample's random key: (seed, prompt id, sample id) hashed
        self.order = np.zeros(B, np.int64)  # admission order: the oldest rows are fed first, the newest preempted first
        self.live = np.zeros(B, bool)  # a row holds the slot
        self.ready = np.zeros(B, bool)  # may be fed: not paused on a tool call, not waiting for its leader's prefill
        self.waiting = np.zeros(B, bool)  # its finder waits for the rest of a fence (mdpo.tools.FenceFinder.waiting)
        self.recompute = np.zeros(B, bool)  # preempted: its next feeds are its whole trajectory again
        self.prefilling = np.zeros(B, bool)  # the first of a prompt's samples, feeding the prompt for its siblings too

    def put(self, s: int, tokens, role, turn):
        """Append tokens that were not sampled (role and turn index: one value or one per token; log-prob 0)."""
        a, b = self.n[s], self.n[s] + len(tokens)
        self.tok[s, a:b] = tokens
        self.role[s, a:b] = role
        self.turn[s, a:b] = turn
        self.lp[s, a:b] = 0.0
        self.n[s] = b

    def feed_ends(self, rows: np.ndarray, starts: np.ndarray, chunk: int) -> np.ndarray:
        """Where the feeds of `rows` from `starts` end: their last token, or `chunk` tokens on (long feeds go in
        chunks)."""
        return np.minimum(self.n[rows], starts + chunk)


def step_hidden(net, view: StepView) -> torch.Tensor:
    """One packed step (mdpo.paged): final-norm hidden states (1, N, d) of every packed token."""
    return net(view.tokens, positions=view.positions, cache=view, return_hidden=True)


def step_logits(net, view: StepView) -> torch.Tensor:
    """One packed step (mdpo.paged): fp32 logits (F, V) of each feed's last token."""
    hidden = net(view.tokens, positions=view.positions, cache=view, return_hidden=True)
    return net.head(hidden[0, view.last]).float()  # the (large) head only where a token is sampled


class GraphedStep:
    """Decode-only steps as CUDA graphs, one per step shape (rows and attended length, each bucketed).

    Eager, a 7B decode step dispatches about a thousand small kernels from Python, and on an H200 that, not
    memory, sets its speed: 67-108 ms a step at any batch size against 4.2 ms to read the weights
    (docs/LOG.md, the first GPU check). A graph replays the recorded kernels in one launch. Its shapes are
    fixed: the step covers the decoding rows padded to a row bucket (PagedKVCache.row_bucket: powers of two from 8 to
    B; PagedKVCache.plan(pad_to=...): padding rows read and write only null blocks; dense: every slot), the head
    runs on all of them, and the read length is bucketed: one graph per (rows, length) bucket (with
    attention="flex" the read has no length: one graph per row bucket). The step's inputs (tokens, positions,
    write slots, read slots or flex block lists, masks' position differences) are copied into
    the captured view's tensors before each replay; the graphs share one memory pool, and each step's logits
    are read before the next replay. Off CUDA the same static-shape step runs eagerly (what the CPU tests
    compare with the plain step).
    """

    def __init__(self, net, device):
        self.net = net
        self.graphs: dict[tuple, tuple] = {}
        self.capture = torch.device(device).type == "cuda"
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None

    @staticmethod
    def _tensors(view: StepView) -> list[torch.Tensor]:
        seg = view.segments[0]
        out = [view.tokens, view.positions] + [view.write[k] for k in sorted(view.write)]
        out += [seg["read"][k] for k in sorted(seg["read"]) if isinstance(seg["read"][k], torch.Tensor)]
        out += [t for plan in seg.get("flex", {}).values() for t in plan]  # the same order in every plan
        return out + [seg["mask"][k] for k in sorted(seg["mask"])]

    def __call__(self, net, view: StepView) -> torch.Tensor:
        assert len(view.segments) == 1 and view.segments[0]["q_index"] is None, "decode-only steps"
        every = torch.arange(view.tokens.shape[1], device=view.tokens.device)
        if not self.capture:
            view.last, last = every, view.last
            return step_logits(self.net, view)[last]
        seg = view.segments[0]
        key = (seg["R"],) + tuple((k, v if isinstance(v, int) else tuple(v.shape))
                                  for k, v in sorted(seg["read"].items()))
        if key not in self.graphs:
            self.graphs[key] = self._capture(view, every)
        static, graph, logits = self.graphs[key]
        for dst, src in zip(self._tensors(static), self._tensors(view)):
            dst.copy_(src, non_blocking=True)
        graph.replay()
        return logits[view.last]

    def _capture(self, view: StepView, every: torch.Tensor):
        static = StepView(view.cache)
        static.segments, static.seg_rows = [dict(view.segments[0])], list(view.seg_rows)
        seg = static.segments[0]
        seg["read"] = {k: (v if isinstance(v, int) else v.clone()) for k, v in seg["read"].items()}
        seg["mask"] = {k: v.clone() for k, v in seg["mask"].items()}
        if "flex" in seg:
            seg["flex"] = {k: tuple(t.clone() for t in v) for k, v in seg["flex"].items()}
        static.tokens, static.positions, static.last = view.tokens.clone(), view.positions.clone(), every
        static.write = {k: v.clone() for k, v in view.write.items()}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # a warm-up off the capture (library handles, workspaces)
            step_logits(self.net, static)
        torch.cuda.current_stream().wait_stream(side)
        static._masks.clear()  # masks are made inside the graph, from the static position differences
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = step_logits(self.net, static)
        return static, graph, logits


class Sampler:
    """Samples trajectories from `model`, running the model's tool calls with `tool` if one is given.

    Args:
        model: a CausalLM of any family (eval mode, any dtype/device).
        tokenizer: a mdpo Tokenizer (stop ids, incremental decoding, observation encoding).
        batch_size: most rows decoded together (with a paged cache, the pool may admit fewer).
        max_length: no trajectory grows beyond it.
        tool: a mdpo.tools.Tool (finds a call in the model's turn, runs it, makes the observation), e.g.
            PythonTool(pool) for the paper's interpreter. None: no calls are made.
        executor: shorthand for tool=PythonTool(executor) (an ExecutorPool, or any object with
            submit(key, code) -> Future and release(key)).
        chat: the turn markup (mdpo.chat.ChatFormat); None: the tokenizer's family's.
        seed: seed of the counter-based draws (mdpo.sampling).
        choose: testing hook, (prompt_id, sample_id, generated ids) -> forced token id or None. The ids are a
            view of the row's array (no copy a row a step), valid during the call.
        block_size: KV block size (mdpo.paged); >= max_length is the dense layout (one block per row, nothing
            shared or preempted, decode reads slices). None: 16 on CUDA or with attention="flex", dense elsewhere
            (on a CPU a paged gather costs as much as the attention itself, and memory is rarely the limit).
        kv_cache_gb: the paged pool's size; None: what batch_size rows of max_length need, capped on CUDA at
            90% of the device memory free once the model is loaded.
        prefill_chunk: most tokens one row feeds in a step; a longer prompt, observation or recompute goes in
            chunks over several steps (bounds a step's work and, with sliding windows, a row's blocks).
        pack: run a oneDNN-packed twin of the model (mdpo.packed): about 2x faster decoding on CPU, at the cost
            of a second copy of the weights. None = on wherever it applies (CPU, fp32 or native bf16) and that
            copy takes less than half the available memory.
        graphs: run decode-only steps as CUDA graphs (GraphedStep; on the CPU its static-shape step runs eagerly);
            None = on for a CUDA model unless compile.
        compile: run decode-only steps through torch.compile. It fuses the norms, RoPE and residual adds between the
            matmuls, which on CPU are a quarter of a 270M decode step. Costs a compile on first use (about a
            minute on 2 cores; cached on disk after that); the step takes the weights as inputs, so updated or
            repacked weights need no recompile. Logits match the eager step to ~1e-6 in fp32; in bf16 fused
            reductions round differently (up to ~2 bf16 ulps of a logit), so an exact tie between top tokens can
            break the other way.
        attention: how decoding rows read a paged pool (mdpo.paged): "gather" (padded to the longest row) or
            "flex" (FlexAttention over live blocks only; compiled, a few seconds per row bucket and layer kind,
            once per process). flex needs the paged layout: block_size None then means 16 on the CPU too.
    """

    def __init__(self, model: CausalLM, tokenizer, batch_size: int = 8, max_length: int = 2048, executor=None,
                 seed: int = 0, choose: Callable | None = None, model_name: str = "", pack: bool | None = None,
                 compile: bool = False, tool: Tool | None = None, chat: ChatFormat | None = None,
                 graphs: bool | None = None, graph_bucket: int = 128, block_size: int | None = None,
                 kv_cache_gb: float | None = None, prefill_chunk: int = 512, verbose: bool = False,
                 attention: str = "gather"):
        self.model = model
        self.tok = tokenizer
        self.B = batch_size
        self.max_length = max_length
        if executor is not None:
            if tool is not None:
                raise ValueError("pass tool= or executor=, not both")
            tool = PythonTool(executor)
        self.tool = tool
        self.choose = choose
        self.model_name = model_name
        w = model.embed_tokens.weight
        self.device, self.dtype = w.device, w.dtype
        self.seed = seed
        self.pack = should_pack(model) if pack is None else pack
        self.net = model  # what forwards run on: the model, or its packed twin (refreshed in generate)
        # dynamic=True: the number of tokens and the attended length change every step; traced symbolically they
        # cost a compile per kind of step, not one per value. emulate_precision_casts rounds fused intermediates
        # to the activation dtype where eager does, which keeps bf16 steps close to eager's.
        # Only decode-only steps (the hot path, one shape of step) are compiled: steps that also feed prompts or
        # observations are rarer and each mix of segments would be a compile of its own.
        self._compiled = torch.compile(step_hidden, dynamic=True, options={"emulate_precision_casts": True}) \
            if compile else None
        self.prefill_chunk = prefill_chunk
        if attention == "flex" and compile:
            raise ValueError("attention='flex' compiles its own kernel inside the eager step: pass compile=False")
        self.kv = self._make_cache(block_size, kv_cache_gb, attention)
        if verbose:
            print(self.memory_plan())
        if graphs is None:
            graphs = self.device.type == "cuda" and not compile
        self._graphed = None
        if graphs:
            if compile or self.pack:
                raise ValueError("graphs=True runs the plain model's step: pass compile=False, pack=False")
            self._graphed = GraphedStep(model, self.device)
        self.graph_bucket = graph_bucket
        self.chat = c = chat or for_tokenizer(tokenizer)
        self.eot_id = self._single_id(c.end_turn)
        self.sot_id = self._single_id(c.start_turn)  # sampled: ends the trajectory (module docstring)
        self.stop_ids = set(tokenizer.stop_ids) | {i for i in (self.eot_id, self.sot_id) if i is not None}
        self.tokenizer_id = tokenizer.fingerprint
        self._drawer = Drawer()
        self.stats = {"forward_calls": 0, "prefill_tokens": 0, "extend_tokens": 0, "decode_steps": 0,
                      "decode_tokens": 0, "recompute_tokens": 0, "preemptions": 0, "sampled_tokens": 0,
                      "tool_calls": 0}
        # Encoded once: the template pieces injected around every tool turn.
        # (start=False: each continues a sequence; a dummy-prefix tokenizer puts no "▁" before it)
        self._close_turn = tokenizer.encode(c.close, start=False)
        self._after_eot = tokenizer.encode(c.close[len(c.end_turn):], start=False)  # the model wrote <end_of_turn> itself
        self._open_model = tokenizer.encode(c.open(c.model_role), start=False)
        self._max_calls = tokenizer.encode(MAX_CALLS_TEXT, start=False)
        # Which ids' bytes hold a backtick: only those can open or close a call (see _after_token).
        self._vocab = max(model.config.vocab_size, tokenizer.vocab_size)
        self._backtick = np.zeros(self._vocab, bool)
        if self.tool is not None:
            self._backtick[:tokenizer.vocab_size] = [b"`" in tokenizer._token_bytes(i)
                                                     for i in range(tokenizer.vocab_size)]

    def _make_cache(self, block_size: int | None, kv_cache_gb: float | None, attention: str) -> PagedKVCache:
        cfg = self.model.config
        if block_size is None:
            block_size = 16 if self.device.type == "cuda" or attention == "flex" else self.max_length
        budget = None if kv_cache_gb is None else int(kv_cache_gb * 2 ** 30)
        if budget is None and self.device.type == "cuda" and block_size < self.max_length:
            free, _ = torch.cuda.mem_get_info(self.device)
            dense = self.B * self.max_length * self.model.kv_bytes_per_token(self.dtype)
            budget = min(dense, int(0.9 * free))
        blocks = plan_blocks(cfg, self.B, self.max_length, block_size, budget, self.dtype, self.prefill_chunk) \
            if block_size < self.max_length else None
        return PagedKVCache(cfg, self.B, self.max_length, block_size, blocks, self.dtype, self.device,
                            max_feed=self.prefill_chunk, attention=attention)

    def memory_plan(self, typical_length: int = 700) -> str:
        """One line: weights, pool, the tokens it holds, and how many rows of a typical length fit."""
        kv, gb = self.kv, 2 ** 30
        if kv.dense:
            return (f"kv cache: weights {self.model.weight_bytes() / gb:.2f} GB, dense pool {kv.pool_bytes() / gb:.2f}"
                    f" GB: {self.B} rows of {self.max_length} tokens")
        per_token = self.model.kv_bytes_per_token(self.dtype)
        tokens = kv.pool_bytes() // per_token
        # A running row of that length holds its blocks up to there (sliding groups: the window's).
        fit = min((g.num_blocks - 1) // kv.blocks_for(g, typical_length - 1, typical_length) for g in kv.groups)
        return (f"kv cache: weights {self.model.weight_bytes() / gb:.2f} GB, paged pool {kv.pool_bytes() / gb:.2f} GB"
                f" in blocks of {kv.bs}: {tokens} tokens of all layers, {fit} rows of {typical_length} tokens "
                f"(at most {self.B} rows run)")

    def _single_id(self, marker: str) -> int | None:
        ids = self.tok.encode(marker)
        return ids[0] if len(ids) == 1 and ids[0] in self.tok.special_ids else None

    def _new_finder(self):
        return self.tool.finder(self.chat.output_fence) if self.tool is not None else None

    # --- public ---

    @torch.inference_mode()  # no autograd bookkeeping at all: ~12% less host time per small tensor op than no_grad
    def generate(self, requests: list[Request], params: SamplingParams | None = None) -> Iterator[Trajectory]:
        """Yield one Trajectory per sample as rows finish (not in request order)."""
        default = params or SamplingParams()
        if self.pack and (self.net is self.model or not is_fresh(self.net, self.model)):
            self.net = None  # drop a stale twin before packing the new one: never two copies at once
            self.net = pack_for_cpu(self.model, self.B)
        self._requests = requests
        queue = deque((i, s) for i, r in enumerate(requests)
                      for s in (r.sample_ids if r.sample_ids is not None else range(r.n)))
        for r in requests:
            if not r.tokens:
                raise ValueError(f"request {r.prompt_id!r}: empty prompt")
            if (r.roles is not None and len(r.roles) != len(r.tokens)) or \
                    (r.turns is not None and len(r.turns) != len(r.tokens)):
                raise ValueError(f"request {r.prompt_id!r}: roles / turns do not match its {len(r.tokens)} tokens")
            if r.replay and self.tool is None:
                raise ValueError(f"request {r.prompt_id!r}: calls to replay but the sampler has no tool")
            if len(r.tokens) >= self.max_length:
                raise ValueError(f"request {r.prompt_id!r}: prompt of {len(r.tokens)} tokens does not fit "
                                 f"max_length {self.max_length}")
        self._special = np.zeros(self._vocab, bool)  # stop ids (read here: a caller may change stop_ids)
        self._special[list(self.stop_ids)] = True
        self.s = _Slots(self.B, self.max_length)
        rows: list[_Row | None] = [None] * self.B
        self._paused: set[int] = set()  # slots waiting for a tool call
        self._followers: dict[int, list[int]] = {}  # leader slot -> siblings waiting for its prompt
        held: dict[int, tuple] = {}  # req -> (the prompt's KV kept for siblings not admitted yet, its last logits)
        self._starved = False  # a row could not be fed for want of blocks: admit nothing new until it is
        try:
            while queue or self.s.live.any():
                yield from self._admit(requests, default, queue, rows, held)
                yield from self._collect_tools(rows)
                if not (yield from self._step(rows, held, queue)):
                    waiting = [rows[i].future for i in self._paused]
                    if waiting:
                        cf.wait(waiting, return_when=cf.FIRST_COMPLETED)
                    elif not self.s.live.any() and queue:
                        raise RuntimeError("the KV pool admits no prompt: raise kv_cache_gb")
        finally:
            for handle, _ in held.values():
                self.kv.drop(handle)
            for i in np.nonzero(self.s.live)[0]:
                self.kv.release(int(i))

    def _row_key(self, prompt_id: str, sample_id: int) -> int:
        """A sample's random key depends only on (seed, prompt id, sample id): not on the batch it shares, the
        order rows finish in, or which samples an interrupted run had already drawn."""
        digest = hashlib.sha256(f"{self.seed}/{prompt_id}/{sample_id}".encode()).digest()
        return int.from_bytes(digest[:8], "little") >> 1

    # --- loop stages ---

    _admitted = 0

    def _new_row(self, slot: int, r: Request, req: int, sample_id: int, p: SamplingParams, cached: int) -> _Row:
        s, n = self.s, len(r.tokens)
        s.n[slot] = 0
        s.put(slot, r.tokens, r.roles if r.roles is not None else Role.PROMPT, r.turns if r.turns is not None else 0)
        s.cached[slot], s.prompt[slot] = cached, n
        s.now[slot] = max(1, r.turns[-1] if r.turns else 1)
        s.turn_tokens[slot], s.turn_max[slot] = 0, p.max_new_tokens_per_turn
        s.limit[slot] = min(self.max_length, p.max_length)
        s.temp[slot], s.top_k[slot], s.top_p[slot] = p.temperature, p.top_k, p.top_p
        s.key[slot] = self._row_key(r.prompt_id, sample_id)
        self._admitted += 1
        s.order[slot] = self._admitted
        s.live[slot], s.ready[slot], s.waiting[slot], s.recompute[slot] = True, True, False, False
        s.prefilling[slot] = False
        return _Row(req, sample_id, p, self.tok.decode_stream(), self._new_finder(), decoded=n)

    def _admit(self, requests, default, queue, rows, held):
        """Free slots take the next samples while the pool has room. N samples of one prompt share one prefill:
        the first (the leader) feeds the prompt; its siblings take the prompt's blocks and draw their first token
        from the same logits after that step; siblings admitted in a later step take them from `held`."""
        if not queue or self._starved:
            return
        free = np.nonzero(~self.s.live)[0].tolist()
        running = self.B - len(free)
        while free and queue and not self._starved:
            req = queue[0][0]
            r = requests[req]
            if req not in held and not self.kv.can_admit(len(r.tokens), reserve=running):
                break
            group = []
            while queue and queue[0][0] == req and len(group) < len(free):
                group.append(queue.popleft()[1])
            slots, free = free[: len(group)], free[len(group):]
            running += len(group)
            p = r.params or default
            n = len(r.tokens)
            adopted = req in held
            if adopted:
                handle, logits = held[req]
                for slot, sample_id in zip(slots, group):
                    rows[slot] = self._new_row(slot, r, req, sample_id, p, cached=n)
                    self.kv.adopt(handle, slot)
            else:
                rows[slots[0]] = self._new_row(slots[0], r, req, group[0], p, cached=0)
                self.s.prefilling[slots[0]] = True
                for slot, sample_id in zip(slots[1:], group[1:]):
                    rows[slot] = self._new_row(slot, r, req, sample_id, p, cached=n)
                    self.s.ready[slot] = False
                if len(slots) > 1:
                    self._followers[slots[0]] = slots[1:]
            for slot in slots:
                for code in r.replay:  # queued first: the session runs a key's cells in order
                    self.tool.submit((r.prompt_id, rows[slot].sample_id), code)
            if not (queue and queue[0][0] == req) and req in held:
                self.kv.drop(held.pop(req)[0])  # the prompt's last sample is in
            if adopted:  # they draw their first tokens now, from the held logits
                yield from self._draw_and_append(rows, np.array(slots), logits.expand(len(slots), -1))

    def _collect_tools(self, rows):
        for i in sorted(self._paused):
            row = rows[i]
            if not row.future.done():
                continue
            fut, row.future = row.future, None
            self._paused.discard(i)
            self.s.ready[i] = True
            try:
                result = fut.result()
            except Exception as e:  # the tool itself failed: report it as the observation, keep going
                result = ToolResult(f"{type(e).__name__}: {e}", "crashed")
            observation = self.tool.observation(result)
            row.tool_status.append(getattr(result, "status", "ok"))
            done = self._inject(rows, i, observation)
            if done:
                yield self._finish(rows, i, done)

    def _preempt(self, i: int):
        """Give back row i's blocks; it will feed its whole trajectory again (its tokens and state are kept)."""
        self.kv.release(i)
        self.s.cached[i] = 0
        self.s.recompute[i] = True
        self.stats["preemptions"] += 1

    def _schedule(self, held) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """What each row feeds this step, oldest rows first, with blocks reserved for it: (rows, starts, ends).
        When the pool runs short: drop held prompts first, then preempt the newest row that holds blocks and is
        not fed this step (possibly the row asking)."""
        s = self.s
        self._starved = False
        want = np.nonzero(s.live & s.ready & (s.n > s.cached))[0]
        starts = s.cached[want]
        ends = s.feed_ends(want, starts, self.prefill_chunk)
        ok = self.kv.has_blocks(want, starts, ends)  # the common case: nothing to allocate, copy or preempt
        if ok.all():
            return want, starts, ends
        by_age = np.argsort(s.order[want], kind="stable")
        want, starts, ok = want[by_age], starts[by_age], ok[by_age]
        fed: list[int] = []
        fed_set: set[int] = set()
        for k, i in enumerate(want.tolist()):
            start = int(s.cached[i])  # 0 if a row before preempted it
            if ok[k] and start == starts[k]:
                fed.append(i)
                fed_set.add(i)
                continue
            end = int(s.feed_ends(i, start, self.prefill_chunk))
            while not self.kv.ensure(i, start, end):
                if held:
                    req = next(iter(held))
                    self.kv.drop(held.pop(req)[0])
                    continue
                holders = [j for j in np.nonzero(s.live)[0].tolist()
                           if j not in fed_set and j != i and self.kv.holds(j)]
                victim = max(holders + [i], key=lambda j: s.order[j])
                if victim == i:
                    if start:
                        self._preempt(i)
                    self._starved = True
                    break
                self._preempt(victim)
            else:
                fed.append(i)
                fed_set.add(i)
        if not fed and self._starved:
            raise RuntimeError(f"the KV pool cannot hold one row: raise kv_cache_gb (pool: {self.memory_plan()})")
        rows = np.array(fed, dtype=np.int64)
        starts = s.cached[rows]
        return rows, starts, s.feed_ends(rows, starts, self.prefill_chunk)

    def _step(self, rows, held, queue):
        """One forward for everything that is fed this step; returns whether anything was."""
        s = self.s
        fed, starts, ends = self._schedule(held)
        if not len(fed):
            return False
        lens = ends - starts
        single = lens == 1
        decode_only = bool(single.all())
        rec = s.recompute[fed]
        pre = ~rec & (starts < s.prompt[fed])
        self.stats["recompute_tokens"] += int(lens[rec].sum())
        self.stats["prefill_tokens"] += int(lens[pre].sum())
        self.stats["extend_tokens"] += int(lens[~rec & ~pre & ~single].sum())
        self.stats["decode_tokens"] += int((single & ~rec & ~pre).sum())
        if decode_only:
            tokens = s.tok[fed, starts]
        else:
            tokens = np.concatenate([s.tok[i, a:b] for i, a, b in zip(fed.tolist(), starts.tolist(), ends.tolist())])
        graphed = self._graphed is not None and decode_only
        # A graph has static shapes: the decoding rows run padded to a row bucket.
        view = self.kv.plan(Feeds(fed, starts, lens, tokens), pad_to=self.kv.row_bucket(len(fed)) if graphed else None,
                            bucket=self.graph_bucket if graphed else 1)
        if graphed:
            logits = self._graphed(self.net, view)
        elif self._compiled is not None and decode_only:
            # The head (one matmul: nothing to fuse) stays outside: the number of sampled rows changes every
            # step and would cost recompiles where it crosses 1 or equals the number of packed tokens.
            logits = self.net.head(self._compiled(self.net, view)[0, view.last]).float()
        else:
            logits = step_logits(self.net, view)
        self.stats["forward_calls"] += 1
        self.stats["decode_steps"] += bool(single.any())
        s.cached[fed] = ends
        self.kv.trim_rows(fed, ends)
        whole = ends == s.n[fed]  # a chunk of a long feed draws nothing: the rest comes next step
        draw_rows, index = fed[whole], np.nonzero(whole)[0]
        s.recompute[draw_rows] = False
        leading = s.prefilling[draw_rows]
        if leading.any():
            extra_rows, extra_index = [], []
            for i, j in zip(draw_rows[leading].tolist(), index[leading].tolist()):
                r = rows[i]
                s.prefilling[i] = False  # a leader's prompt is in: its siblings take its blocks and its logits
                n = int(s.prompt[i])
                for sib in self._followers.pop(i, []):
                    self.kv.share(i, sib, n)
                    s.ready[sib] = True
                    extra_rows.append(sib)
                    extra_index.append(j)
                if queue and queue[0][0] == r.req and r.req not in held:  # and siblings not admitted yet
                    held[r.req] = (self.kv.hold(i, n), logits[j: j + 1].clone())
            draw_rows = np.concatenate([draw_rows, np.array(extra_rows, dtype=np.int64)])
            index = np.concatenate([index, np.array(extra_index, dtype=np.int64)])
        if len(draw_rows):
            if len(index) != logits.shape[0] or (index != np.arange(len(index))).any():
                logits = logits[torch.from_numpy(index).to(logits.device, non_blocking=True)]
            yield from self._draw_and_append(rows, draw_rows, logits)
        return True

    def _draw_and_append(self, rows, slots: np.ndarray, logits: torch.Tensor):
        """Draw a token for each of `slots` from its logits (R, V), append them all, and look in Python only at the
        rows whose token ends a turn, may open or close a call, or reaches a limit."""
        s = self.s
        n = s.n[slots]
        ids, logp = self._drawer.draw(logits, s.temp[slots], s.top_k[slots], s.top_p[slots],
                                      counter_uniform(s.key[slots], n))
        if self.choose is not None:
            forced = False
            for j, i in enumerate(slots.tolist()):
                r = rows[i]
                f = self.choose(self._requests[r.req].prompt_id, r.sample_id, s.tok[i, s.prompt[i]: n[j]])
                if f is not None:
                    ids[j], forced = f, True
            if forced:
                logp = self._drawer.logprobs(logits, ids)
        if ids.device.type == "cpu":  # the arrays are the tensors' memory: nothing to copy or wait for
            ids, lps = ids.numpy(), logp.numpy().astype(np.float64)
        else:  # one transfer, the one host sync of the step
            both = torch.stack((ids.to(torch.float64), logp.to(torch.float64))).cpu().numpy()
            ids, lps = both[0].astype(np.int64), both[1]
        self.stats["sampled_tokens"] += len(slots)
        at = slots * self.max_length + n  # flat indices into the (B, max_length) arrays
        s.tok.ravel()[at] = ids
        s.role.ravel()[at] = Role.MODEL
        s.turn.ravel()[at] = s.now[slots]
        s.lp.ravel()[at] = lps
        s.n[slots] = n = n + 1
        s.turn_tokens[slots] += 1
        look = self._special[ids] | (n >= s.limit[slots]) | (s.turn_tokens[slots] >= s.turn_max[slots])
        if self.tool is not None:
            look |= self._backtick[ids] | s.waiting[slots]
        for i in slots[look].tolist():
            done = self._after_token(rows, i)
            if done:
                yield self._finish(rows, i, done)

    # --- pieces ---

    def _after_token(self, rows, i: int) -> str | None:
        """Row i's new token may end its turn, open or close a call, or reach a limit: returns a finish reason or
        None (a tool call started, or nothing happened)."""
        s, row = self.s, rows[i]
        n = int(s.n[i])
        token = int(s.tok[i, n - 1])
        if token in self.stop_ids:
            if token == self.sot_id:
                return "start_of_turn"
            if token == self.eot_id and row.finder is not None:
                code = row.finder.open_call(self._turn_text(i, row, n - 1))
                if code is not None:  # <end_of_turn> inside an open block ends the block too: run what was written
                    row.closed_by_eot = True
                    return self._start_tool(rows, i, code)
            return "eos" if token != self.eot_id else "end_of_turn"
        if row.finder is not None and (self._backtick[token] or row.finder.waiting):
            # The text is needed only where a call can open or close: tokens holding a backtick, and those
            # after an incomplete fence. The others wait, undecoded, until then (no tool: never decoded).
            call = row.finder.feed(self._turn_text(i, row, n))
            s.waiting[i] = row.finder.waiting
            if call is not None:
                return "output_fence" if call is STOP else self._start_tool(rows, i, call)
        if n >= s.limit[i]:
            return "max_length"
        if s.turn_tokens[i] >= s.turn_max[i]:
            return "max_new_tokens"
        return None

    def _turn_text(self, i: int, row: _Row, upto: int) -> str:
        if row.decoded < upto:
            row.turn_text += row.stream.steps(self.s.tok[i, row.decoded: upto].tolist())
            row.decoded = upto
        return row.turn_text

    def _start_tool(self, rows, i: int, code: str) -> str | None:
        if self.s.n[i] >= self.max_length:
            return "max_length"
        row = rows[i]
        key = (self._requests[row.req].prompt_id, row.sample_id)
        row.calls.append(code.strip("\n"))
        row.future = self.tool.submit(key, row.calls[-1])
        self._paused.add(i)
        self.s.ready[i] = False
        self.stats["tool_calls"] += 1
        return None

    def _inject(self, rows, i: int, observation: str) -> str | None:
        """Queue the tool turn after a paused row's code; returns a finish reason if the row ends here."""
        s, row = self.s, rows[i]
        turn = int(s.now[i])
        close = self._after_eot if row.closed_by_eot else self._close_turn
        pieces = [(close, Role.TEMPLATE, turn), (self.chat.tool_turn_ids(self.tok, observation), Role.TOOL, turn)]
        last_call = turn >= row.params.max_turns
        if last_call:
            pieces.append((self._open_model + self._max_calls, Role.TEMPLATE, turn + 1))
        else:
            pieces.append((self._open_model, Role.TEMPLATE, turn + 1))
        limit = int(s.limit[i])
        for ids, role, t in pieces:
            s.put(i, ids[: max(0, limit - int(s.n[i]))], role, t)
        if last_call:
            return "max_turns"
        if s.n[i] >= limit:
            return "max_length"
        s.now[i] = turn + 1
        s.turn_tokens[i] = 0
        s.waiting[i] = False
        row.turn_text = ""
        row.decoded = int(s.n[i])
        row.finder = self._new_finder()
        row.closed_by_eot = False
        row.stream = self.tok.decode_stream()
        return None

    def _finish(self, rows, i: int, reason: str) -> Trajectory:
        s, row = self.s, rows[i]
        rows[i] = None
        s.live[i] = s.ready[i] = False
        self._paused.discard(i)
        self.kv.release(i)
        req = self._requests[row.req]
        if self.tool is not None:
            self.tool.release((req.prompt_id, row.sample_id))
        n = int(s.n[i])
        return Trajectory(prompt_id=req.prompt_id, sample_id=row.sample_id, tokens=s.tok[i, :n].tolist(),
                          roles=s.role[i, :n].tolist(), turns=s.turn[i, :n].tolist(), logprobs=s.lp[i, :n].tolist(),
                          finish_reason=reason, model=self.model_name, tokenizer=self.tokenizer_id,
                          # A continuation's record starts with its prefix's calls and their statuses.
                          meta=dict(req.meta, tool_status=list(req.meta.get("tool_status", [])) + row.tool_status,
                                    calls=list(req.replay) + row.calls))
