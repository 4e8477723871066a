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
           goes on as it would have). Every fed row then samples its next token: one host sync per step.

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

import torch

from mdpo.chat import ChatFormat, for_tokenizer
from mdpo.extraction import LIMIT_MESSAGE
from mdpo.model import Gemma
from mdpo.packed import is_fresh, pack_for_cpu, should_pack
from mdpo.paged import Feed, PagedKVCache, StepView, plan_blocks
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


@dataclass
class _Row:
    req: int
    sample_id: int
    params: SamplingParams
    tokens: list[int]
    roles: list[int]
    turns: list[int]
    logprobs: list[float]
    length: int  # tokens whose keys/values are in the cache; tokens[length:] are queued for the next forward
    stream: object
    turn: int = 1
    turn_tokens: int = 0
    turn_text: str = ""  # the model turn's text, decoded up to the last token that could touch a fence
    pending: list = field(default_factory=list)  # the turn's tokens sampled since (not decoded yet)
    finder: object = None  # the tool's call finder for this turn (mdpo.tools.FenceFinder); None without a tool
    future: cf.Future | None = None
    closed_by_eot: bool = False
    tool_status: list = field(default_factory=list)  # executor status of each call (ok, error, timeout, ...)
    calls: list = field(default_factory=list)  # the code of each call, as run (what a continuation replays)
    key: int = 0  # this sample's random key: (seed, prompt id, sample id) hashed (gumbel_noise)
    order: int = 0  # admission order: the oldest rows are fed first, the newest preempted first
    leader: int | None = None  # slot of the sibling whose prompt prefill this row waits for
    recompute: bool = False  # preempted: its next feed is its whole trajectory again
    prefilling: bool = False  # the first of a prompt's samples, feeding the prompt for its siblings too


_MASK32 = 0xFFFFFFFF


def _mix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser on int64 tensors holding 32-bit values. The products overflow int64 and
    wrap; their low 32 bits, which the mask keeps, are the same as in unsigned 32-bit arithmetic."""
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _MASK32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _MASK32
    return h ^ (h >> 16)


def gumbel_noise(keys: torch.Tensor, positions: torch.Tensor, vocab_hash: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) noise (R, V), a pure function of each row's 63-bit key, its position and the token id.

    Counter-based: a draw depends on (seed, prompt id, sample id, position) and nothing else: not on the batch,
    the slot, the device or what was drawn before, so a resumed or re-batched run draws the same tokens. The
    uniform has 24 bits (the float32 mantissa); the largest Gumbel value it can give is 17.3, so a token is
    misdrawn only where that truncation matters, with probability below 1e-7 per draw.
    vocab_hash: _mix32 of each token id plus a constant (precomputed once per vocabulary and device).
    """
    row = _mix32((keys & _MASK32) ^ _mix32(((keys >> 32) & _MASK32) ^ _mix32(positions & _MASK32)))
    h = _mix32(row[:, None] ^ vocab_hash[None, :])
    u = ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))  # in (0, 1), never 0 or 1
    return -torch.log(-torch.log(u))


def filter_logits(x: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Set to -inf what top-k (k > 0: keep tokens at least as large as the k-th largest, ties included) and
    then top-p (drop a token once the more likely ones reach p; the top one always stays) remove, for all
    rows at once. top_k (R,) int, 0 = off; top_p (R,) float, 1 = off. Returns a new tensor."""
    x = x.clone()
    k_max = int(top_k.max()) if top_k.numel() else 0  # the parameters are host data: no device sync
    if k_max > 0:
        kth = x.topk(min(k_max, x.shape[-1]), dim=-1).values.gather(1, (top_k.clamp(min=1) - 1)[:, None])
        x = x.masked_fill((top_k[:, None] > 0) & (x < kth), float("-inf"))
    if bool((top_p < 1).any()):
        sorted_x, order = x.sort(dim=-1, descending=True)
        probs = torch.softmax(sorted_x, dim=-1)
        # Only rows that ask for it: at p = 1 a rounded cumulative sum can reach 1 before the last token.
        drop = ((probs.cumsum(-1) - probs) >= top_p[:, None]) & (top_p < 1)[:, None]
        x = x.scatter(1, order, sorted_x.masked_fill(drop, float("-inf")))
    return x


def step_hidden(net, view: StepView) -> torch.Tensor:
    """One packed step (mdpo.paged): final-norm hidden states (1, N, d) of every packed token."""
    return net(view.tokens, positions=view.positions, cache=view, return_hidden=True)


def step_logits(net, view: StepView) -> torch.Tensor:
    """One packed step (mdpo.paged): fp32 logits (F, V) of each feed's last token."""
    hidden = net(view.tokens, positions=view.positions, cache=view, return_hidden=True)
    return net.head(hidden[0, view.last]).float()  # the (large) head only where a token is sampled


class GraphedStep:
    """Decode-only steps as CUDA graphs, one per read shape (the attended length, rounded up to `bucket`).

    Eager, a 7B decode step dispatches about a thousand small kernels from Python, and on an H200 that, not
    memory, sets its speed: 67-108 ms a step at any batch size against 4.2 ms to read the weights
    (docs/LOG.md, the first GPU check). A graph replays the recorded kernels in one launch. Its shapes are
    fixed: the step covers every row (PagedKVCache.plan(all_rows=True): rows that do not step are padding
    that writes where nothing is read), the head runs on all of them, and the read length is bucketed. The
    step's inputs (tokens, positions, write slots, read slots, masks' position differences) are copied into
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
        return out + [seg["mask"][k] for k in sorted(seg["mask"])]

    def __call__(self, net, view: StepView) -> torch.Tensor:
        assert len(view.segments) == 1 and view.segments[0]["q_index"] is None, "decode-only steps"
        every = torch.arange(view.tokens.shape[1], device=view.tokens.device)
        if not self.capture:
            view.last, last = every, view.last
            return step_logits(self.net, view)[last]
        seg = view.segments[0]
        key = tuple((k, v if isinstance(v, int) else tuple(v.shape)) for k, v in sorted(seg["read"].items()))
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
        model: a Gemma (eval mode, any dtype/device).
        tokenizer: a mdpo Tokenizer (stop ids, incremental decoding, observation encoding).
        batch_size: most rows decoded together (with a paged cache, the pool may admit fewer).
        max_length: no trajectory grows beyond it.
        tool: a mdpo.tools.Tool (finds a call in the model's turn, runs it, makes the observation), e.g.
            PythonTool(pool) for the paper's interpreter. None: no calls are made.
        executor: shorthand for tool=PythonTool(executor) (an ExecutorPool, or any object with
            submit(key, code) -> Future and release(key)).
        chat: the turn markup (mdpo.chat.ChatFormat); None: the tokenizer's family's.
        seed: seed of the counter-based draws (gumbel_noise).
        choose: testing hook, (prompt_id, sample_id, generated ids) -> forced token id or None.
        block_size: KV block size (mdpo.paged); >= max_length is the dense layout (one block per row, nothing
            shared or preempted, decode reads slices). None: 16 on CUDA, dense elsewhere (on a CPU a paged read
            is a gather as costly as the attention itself, and memory is rarely the limit).
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
    """

    def __init__(self, model: Gemma, tokenizer, batch_size: int = 8, max_length: int = 2048, executor=None,
                 seed: int = 0, choose: Callable | None = None, model_name: str = "", pack: bool | None = None,
                 compile: bool = False, tool: Tool | None = None, chat: ChatFormat | None = None,
                 graphs: bool | None = None, graph_bucket: int = 128, block_size: int | None = None,
                 kv_cache_gb: float | None = None, prefill_chunk: int = 512, verbose: bool = False):
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
        self.kv = self._make_cache(block_size, kv_cache_gb)
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
        self.tokenizer_id = hashlib.sha256(tokenizer.model_proto).hexdigest()[:16]
        self._vocab_hash: torch.Tensor | None = None  # gumbel_noise's per-token hashes, made on first use
        self.stats = {"forward_calls": 0, "prefill_tokens": 0, "extend_tokens": 0, "decode_steps": 0,
                      "decode_tokens": 0, "recompute_tokens": 0, "preemptions": 0, "sampled_tokens": 0,
                      "tool_calls": 0}
        # Encoded once: the template pieces injected around every tool turn.
        self._close_turn = tokenizer.encode(c.close)
        self._after_eot = tokenizer.encode(c.close[len(c.end_turn):])  # the model wrote <end_of_turn> itself
        self._open_model = tokenizer.encode(c.open(c.model_role))
        self._max_calls = tokenizer.encode(MAX_CALLS_TEXT)
        # Which ids' bytes hold a backtick: only those can open or close a call (see _append_sampled).
        self._backtick = [b"`" in tokenizer._token_bytes(i) for i in range(tokenizer.vocab_size)] \
            if self.tool is not None else []

    def _make_cache(self, block_size: int | None, kv_cache_gb: float | None) -> PagedKVCache:
        cfg = self.model.config
        if block_size is None:
            block_size = 16 if self.device.type == "cuda" else self.max_length
        budget = None if kv_cache_gb is None else int(kv_cache_gb * 2 ** 30)
        if budget is None and self.device.type == "cuda" and block_size < self.max_length:
            free, _ = torch.cuda.mem_get_info(self.device)
            dense = self.B * self.max_length * self.model.kv_bytes_per_token(self.dtype)
            budget = min(dense, int(0.9 * free))
        blocks = plan_blocks(cfg, self.B, self.max_length, block_size, budget, self.dtype, self.prefill_chunk) \
            if block_size < self.max_length else None
        return PagedKVCache(cfg, self.B, self.max_length, block_size, blocks, self.dtype, self.device,
                            max_feed=self.prefill_chunk)

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

    @torch.no_grad()
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
        rows: list[_Row | None] = [None] * self.B
        held: dict[int, tuple] = {}  # req -> (the prompt's KV kept for siblings not admitted yet, its last logits)
        self._starved = False  # a row could not be fed for want of blocks: admit nothing new until it is
        try:
            while queue or any(r is not None for r in rows):
                yield from self._admit(requests, default, queue, rows, held)
                yield from self._collect_tools(rows)
                if not (yield from self._step(rows, held, queue)):
                    waiting = [r.future for r in rows if r is not None and r.future is not None]
                    if waiting:
                        cf.wait(waiting, return_when=cf.FIRST_COMPLETED)
                    elif not any(r is not None for r in rows) and queue:
                        raise RuntimeError("the KV pool admits no prompt: raise kv_cache_gb")
        finally:
            for handle, _ in held.values():
                self.kv.drop(handle)
            for i, r in enumerate(rows):
                if r is not None:
                    self.kv.release(i)

    def _row_key(self, prompt_id: str, sample_id: int) -> int:
        """A sample's random key depends only on (seed, prompt id, sample id): not on the batch it shares, the
        order rows finish in, or which samples an interrupted run had already drawn."""
        digest = hashlib.sha256(f"{self.seed}/{prompt_id}/{sample_id}".encode()).digest()
        return int.from_bytes(digest[:8], "little") >> 1

    # --- loop stages ---

    def _new_row(self, r: Request, req: int, sample_id: int, p: SamplingParams, length: int) -> _Row:
        n = len(r.tokens)
        self._admitted += 1
        return _Row(req=req, sample_id=sample_id, params=p, tokens=list(r.tokens),
                    roles=list(r.roles) if r.roles is not None else [Role.PROMPT] * n,
                    turns=list(r.turns) if r.turns is not None else [0] * n,
                    logprobs=[0.0] * n, length=length, turn=max(1, r.turns[-1] if r.turns else 1),
                    stream=self.tok.decode_stream(), finder=self._new_finder(),
                    key=self._row_key(r.prompt_id, sample_id), order=self._admitted)

    _admitted = 0

    def _admit(self, requests, default, queue, rows, held):
        """Free slots take the next samples while the pool has room. N samples of one prompt share one prefill:
        the first (the leader) feeds the prompt; its siblings take the prompt's blocks and draw their first token
        from the same logits after that step; siblings admitted in a later step take them from `held`."""
        free = [i for i, r in enumerate(rows) if r is None]
        running = sum(r is not None for r in rows)
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
                    rows[slot] = self._new_row(r, req, sample_id, p, length=n)
                    self.kv.adopt(handle, slot)
            else:
                rows[slots[0]] = self._new_row(r, req, group[0], p, length=0)
                rows[slots[0]].prefilling = True
                for slot, sample_id in zip(slots[1:], group[1:]):
                    rows[slot] = self._new_row(r, req, sample_id, p, length=n)
                    rows[slot].leader = slots[0]
            for slot in slots:
                for code in r.replay:  # queued first: the session runs a key's cells in order
                    self.tool.submit((r.prompt_id, rows[slot].sample_id), code)
            if not (queue and queue[0][0] == req) and req in held:
                self.kv.drop(held.pop(req)[0])  # the prompt's last sample is in
            if adopted:  # they draw their first tokens now, from the held logits
                yield from self._draw_and_append(rows, slots, logits.expand(len(slots), -1))

    def _collect_tools(self, rows):
        for i, row in enumerate(rows):
            if row is None or row.future is None or not row.future.done():
                continue
            fut, row.future = row.future, None
            try:
                result = fut.result()
            except Exception as e:  # the tool itself failed: report it as the observation, keep going
                result = ToolResult(f"{type(e).__name__}: {e}", "crashed")
            observation = self.tool.observation(result)
            row.tool_status.append(getattr(result, "status", "ok"))
            done = self._inject(row, observation)
            if done:
                yield self._finish(rows, i, done, self._requests)

    def _preempt(self, rows, i: int):
        """Give back row i's blocks; it will feed its whole trajectory again (its tokens and state are kept)."""
        self.kv.release(i)
        rows[i].length = 0
        rows[i].recompute = True
        self.stats["preemptions"] += 1

    def _schedule(self, rows, held) -> list[Feed]:
        """What each row feeds this step, oldest rows first, with blocks reserved for it. When the pool runs
        short: drop held prompts first, then preempt the newest row that holds blocks and is not fed this step
        (possibly the row asking)."""
        want = sorted((i for i, r in enumerate(rows) if r is not None and r.future is None and r.leader is None
                       and len(r.tokens) > r.length), key=lambda i: rows[i].order)
        feeds, fed = [], set()
        self._starved = False
        for i in want:
            r = rows[i]
            end = min(len(r.tokens), r.length + self.prefill_chunk)  # long feeds go in chunks
            while not self.kv.ensure(i, r.length, end):
                if held:
                    req = next(iter(held))
                    self.kv.drop(held.pop(req)[0])
                    continue
                holders = [j for j, x in enumerate(rows) if x is not None and j not in fed and j != i
                           and self.kv.holds(j)]
                victim = max(holders + [i], key=lambda j: rows[j].order)
                if victim == i:
                    if r.length:
                        self._preempt(rows, i)
                    self._starved = True
                    break
                self._preempt(rows, victim)
            else:
                feeds.append(Feed(i, r.length, r.tokens[r.length:end]))
                fed.add(i)
        if not feeds and self._starved:
            raise RuntimeError(f"the KV pool cannot hold one row: raise kv_cache_gb (pool: {self.memory_plan()})")
        return feeds

    def _step(self, rows, held, queue):
        """One forward for everything that is fed this step; returns whether anything was."""
        feeds = self._schedule(rows, held)
        if not feeds:
            return False
        for f in feeds:
            r, n = rows[f.row], len(f.tokens)
            prompt = len(self._requests[r.req].tokens)
            if r.recompute:
                self.stats["recompute_tokens"] += n
            elif f.start < prompt:
                self.stats["prefill_tokens"] += n
            elif n > 1:
                self.stats["extend_tokens"] += n
            else:
                self.stats["decode_tokens"] += 1
        decode_only = all(len(f.tokens) == 1 for f in feeds)
        graphed = self._graphed is not None and decode_only
        view = self.kv.plan(feeds, all_rows=graphed, bucket=self.graph_bucket if graphed else 1)
        if graphed:
            logits = self._graphed(self.net, view)
        else:
            if self._compiled is not None and decode_only:
                # The head (one matmul: nothing to fuse) stays outside: the number of sampled rows changes every
                # step and would cost recompiles where it crosses 1 or equals the number of packed tokens.
                logits = self.net.head(self._compiled(self.net, view)[0, view.last]).float()
            else:
                logits = step_logits(self.net, view)
        self.stats["forward_calls"] += 1
        self.stats["decode_steps"] += any(len(f.tokens) == 1 for f in feeds)
        slots, index = [], []
        for j, f in enumerate(feeds):
            r = rows[f.row]
            r.length = f.start + len(f.tokens)
            self.kv.trim(f.row, r.length)
            if r.length < len(r.tokens):  # a chunk of a long feed: the rest comes next step, nothing is drawn
                continue
            r.recompute = False
            slots.append(f.row)
            index.append(j)
            if not r.prefilling:
                continue
            r.prefilling = False  # a leader's prompt is in: its siblings take its blocks and its logits
            n = len(r.tokens)
            for s in [s for s, x in enumerate(rows) if x is not None and x.leader == f.row]:
                self.kv.share(f.row, s, n)
                rows[s].leader = None
                slots.append(s)
                index.append(j)
            if queue and queue[0][0] == r.req and r.req not in held:  # and siblings not admitted yet
                held[r.req] = (self.kv.hold(f.row, n), logits[j: j + 1].clone())
        if slots:
            yield from self._draw_and_append(rows, slots, logits[torch.tensor(index, device=logits.device)])
        return True

    def _draw_and_append(self, rows, slots, logits):
        toks, lps = self._sample([rows[s] for s in slots], logits, self._requests)
        for s, t, lp in zip(slots, toks, lps):
            done = self._append_sampled(rows[s], t, lp, self._requests)
            if done:
                yield self._finish(rows, s, done, self._requests)

    # --- pieces ---

    def _sample(self, rows: list[_Row], logits: torch.Tensor, requests):
        """Draw one token per row from fp32 logits (R, V), all rows in tensor ops; returns (ids, model log-probs
        of those ids) as lists, read back in one host sync."""
        ids = logits.argmax(-1)
        temps = [r.params.temperature for r in rows]
        if any(t > 0 for t in temps):
            ids = self._draw(rows, logits, ids, temps)
        if self.choose is not None:
            for j, r in enumerate(rows):
                forced = self.choose(requests[r.req].prompt_id, r.sample_id, r.tokens[len(requests[r.req].tokens):])
                if forced is not None:
                    ids[j] = forced
        # log p(id) = logit(id) - logsumexp(logits): the model's own distribution, before temperature/top-k/p.
        chosen = logits.gather(1, ids[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)
        self.stats["sampled_tokens"] += len(rows)
        both = torch.stack((ids.to(torch.float64), chosen.to(torch.float64))).tolist()  # ids < 2^53: exact
        return [int(i) for i in both[0]], both[1]

    def _draw(self, rows: list[_Row], logits: torch.Tensor, ids: torch.Tensor, temps: list[float]) -> torch.Tensor:
        """Replace the greedy ids of temperature > 0 rows by Gumbel-max draws from their filtered distributions:
        argmax(x / T + g) with g ~ Gumbel(0, 1) is a draw from softmax(x / T)."""
        dev = logits.device
        temp = torch.tensor(temps, device=dev)
        x = filter_logits(logits / temp.clamp(min=1e-6)[:, None],
                          torch.tensor([r.params.top_k for r in rows], device=dev),
                          torch.tensor([r.params.top_p for r in rows], device=dev))
        if self._vocab_hash is None or self._vocab_hash.shape[0] != logits.shape[1]:
            self._vocab_hash = _mix32(torch.arange(logits.shape[1], device=dev) + 0x9E3779B9)
        g = gumbel_noise(torch.tensor([r.key for r in rows], device=dev),
                         torch.tensor([len(r.tokens) for r in rows], device=dev), self._vocab_hash)
        return torch.where(temp > 0, (x + g).argmax(-1), ids)

    def _append_sampled(self, row: _Row, token: int, logprob: float, requests) -> str | None:
        """Record a sampled token and advance the row's turn state; returns a finish reason or None."""
        row.tokens.append(token)
        row.roles.append(Role.MODEL)
        row.turns.append(row.turn)
        row.logprobs.append(logprob)
        row.turn_tokens += 1
        if token in self.stop_ids:
            if token == self.sot_id:
                return "start_of_turn"
            if token == self.eot_id and row.finder is not None:
                code = row.finder.open_call(self._turn_text(row))
                if code is not None:  # <end_of_turn> inside an open block ends the block too: run what was written
                    row.closed_by_eot = True
                    return self._start_tool(row, code, requests)
            return "eos" if token != self.eot_id else "end_of_turn"
        if row.finder is not None:
            # The text is needed only where a call can open or close: tokens holding a backtick, and those
            # after an incomplete fence. The others wait, undecoded, until then (no tool: never decoded).
            row.pending.append(token)
            if self._backtick[token] or row.finder.waiting:
                call = row.finder.feed(self._turn_text(row))
                if call is not None:
                    return "output_fence" if call is STOP else self._start_tool(row, call, requests)
        if len(row.tokens) >= self.max_length or len(row.tokens) >= row.params.max_length:
            return "max_length"
        if row.turn_tokens >= row.params.max_new_tokens_per_turn:
            return "max_new_tokens"
        return None

    def _turn_text(self, row: _Row) -> str:
        if row.pending:
            row.turn_text += row.stream.steps(row.pending)
            row.pending.clear()
        return row.turn_text

    def _start_tool(self, row: _Row, code: str, requests) -> str | None:
        if len(row.tokens) >= self.max_length:
            return "max_length"
        key = (requests[row.req].prompt_id, row.sample_id)
        row.calls.append(code.strip("\n"))
        row.future = self.tool.submit(key, row.calls[-1])
        self.stats["tool_calls"] += 1
        return None

    def _inject(self, row: _Row, observation: str) -> str | None:
        """Queue the tool turn after a paused row's code; returns a finish reason if the row ends here."""
        close = self._after_eot if row.closed_by_eot else self._close_turn
        pieces = [(close, Role.TEMPLATE, row.turn),
                  (self.chat.tool_turn_ids(self.tok, observation), Role.TOOL, row.turn)]
        last_call = row.turn >= row.params.max_turns
        if last_call:
            pieces.append((self._open_model + self._max_calls, Role.TEMPLATE, row.turn + 1))
        else:
            pieces.append((self._open_model, Role.TEMPLATE, row.turn + 1))
        limit = min(self.max_length, row.params.max_length)
        for ids, role, turn in pieces:
            ids = ids[: max(0, limit - len(row.tokens))]
            row.tokens += ids
            row.roles += [role] * len(ids)
            row.turns += [turn] * len(ids)
            row.logprobs += [0.0] * len(ids)
        if last_call:
            return "max_turns"
        if len(row.tokens) >= limit:
            return "max_length"
        row.turn += 1
        row.turn_tokens = 0
        row.turn_text = ""
        row.pending = []
        row.finder = self._new_finder()
        row.closed_by_eot = False
        row.stream = self.tok.decode_stream()
        return None

    def _finish(self, rows, slot: int, reason: str, requests) -> Trajectory:
        row = rows[slot]
        rows[slot] = None
        self.kv.release(slot)
        req = requests[row.req]
        if self.tool is not None:
            self.tool.release((req.prompt_id, row.sample_id))
        return Trajectory(prompt_id=req.prompt_id, sample_id=row.sample_id, tokens=row.tokens,
                          roles=[int(r) for r in row.roles], turns=row.turns, logprobs=row.logprobs,
                          finish_reason=reason, model=self.model_name, tokenizer=self.tokenizer_id,
                          # A continuation's record starts with its prefix's calls and their statuses.
                          meta=dict(req.meta, tool_status=list(req.meta.get("tool_status", [])) + row.tool_status,
                                    calls=list(req.replay) + row.calls))
