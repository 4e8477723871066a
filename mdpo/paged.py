"""The sampler's KV cache: a pool of fixed-size blocks, block tables per row, and attention over one packed step.

Why paged: a dense cache reserves rows x max_length positions in every layer up front. Gemma-7B holds 0.46 MB
per token in bf16, so 64 rows of 2048 tokens take 60 GB before the first token, and each of a prompt's N samples
keeps its own copy of the prompt. Here memory is a pool of blocks of `block_size` positions:
* a row holds only the blocks its tokens occupy (block tables map a row's logical blocks to pool blocks);
* the N samples of a prompt share the prompt's blocks (reference counts); a row that writes into a shared
  block first gets a private copy of it (copy-on-write, only ever the prompt's last, partial block);
* layers with a sliding window hold their own blocks and give back those that fell out of the window;
* when the pool runs out, the sampler preempts a row (`release`) and later feeds its whole trajectory again.

Layout. Layers are split into groups with one block table each: full-attention layers, and sliding layers whose
window is short enough to ever free a block (otherwise all layers form one group). For each of its layers a
group holds keys and values of shape (num_blocks, block_size, H_kv, D). Block 0 of every group is the null
block: never handed out, written by padding rows, never attended (see `plan`).

Dense mode (block_size >= max_length): one block per row, row r owns block r + 1 for good. Nothing is shared
(siblings get a copy of the prompt, `share`) and nothing is preempted, but the decode segment reads the pool as a
slice, not a gather: on a CPU a gather costs as much as the attention it feeds (docs/LOG.md), so dense is the
CPU default and paged the CUDA one.

A step. `plan(feeds)` packs what every row feeds -- a prompt, an observation, a whole trajectory after a
preemption, or one decoded token -- into one (1, N) row of tokens with per-token positions (decoding rows first).
Each layer's `StepView.attend` writes the step's keys and values into their blocks, then attends in two
segments: rows feeding one token as one batch of (R, H, 1, D) queries, rows feeding several as right-padded
(R, H, T, D) queries. Each segment reads only its rows' live blocks (a sliding group from the window's first
block on), with an additive mask from positions. The linear layers, which read all the weights, run once on all
N tokens.

Reading only live KV (attention="flex"). The gather above pads every decoding row to the longest row's block count:
with rows of lengths spread over 150..2048 it reads ~1.7x the live bytes, then copies them once more before
attending. With attention="flex" the decode segment instead runs torch's FlexAttention over the pool itself, with
a block mask listing each row's live blocks (`flex_decode`): the kernel visits only those, and nothing is copied.
It is compiled (eager FlexAttention would evaluate the mask over the whole pool) and its shapes are static (rows
in buckets, block lists padded), so it is captured in CUDA graphs like the rest of the step. Prefill segments keep
the gather.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from mdpo.model import ModelConfig, eager_attention


class BlockAllocator:
    """Free list and reference counts of one group's blocks. Block 0 is the null block and is never handed out."""

    def __init__(self, num_blocks: int):
        self.ref = np.zeros(num_blocks, dtype=np.int64)  # an array: the sampler checks many rows' blocks at once
        self.free = list(range(num_blocks - 1, 0, -1))  # popped from the end: low ids first

    @property
    def num_free(self) -> int:
        return len(self.free)

    def alloc(self) -> int:
        b = self.free.pop()
        self.ref[b] = 1
        return b

    def incref(self, b: int):
        self.ref[b] += 1

    def decref(self, b: int):
        self.ref[b] -= 1
        if self.ref[b] == 0:
            self.free.append(b)
        elif self.ref[b] < 0:
            raise RuntimeError(f"block {b} released more often than it was taken")


KV_READS = ("gather", "flex")  # how a decode segment reads the pool (PagedKVCache's `attention`)


class _Group:
    """Layers that share block tables: their pools, allocator and every row's table."""

    def __init__(self, layers, window, num_blocks, block_size, max_rows, max_blocks, config, dtype, device):
        self.layers, self.window, self.num_blocks = layers, window, num_blocks
        # The windows its layers attend with (None: full), which flex plans apart: a group may mix full and sliding
        # layers when no window frees a block (kv_groups); `window` is the one that frees blocks, if any.
        self.windows = sorted({config.sliding_window if config.layer_types[i] == "sliding" else None for i in layers},
                              key=lambda w: w or 0)
        shape = (num_blocks, block_size, config.num_kv_heads, config.head_dim)
        self.k = {i: torch.zeros(shape, dtype=dtype, device=device) for i in layers}
        self.v = {i: torch.zeros(shape, dtype=dtype, device=device) for i in layers}
        self.alloc = BlockAllocator(num_blocks)
        self.tables: list[list[int]] = [[] for _ in range(max_rows)]  # logical -> pool block; 0 = given back
        # The same, for vectorised plans, and one more row, all null blocks, for padding rows (plan's pad_to).
        self.table = np.zeros((max_rows + 1, max_blocks), dtype=np.int64)
        self.first = np.zeros(max_rows, dtype=np.int64)  # first logical block a row still holds (sliding groups
        # free the ones before)
        self.peak = 0  # most blocks held at once

    def live_blocks(self) -> int:
        return self.num_blocks - 1 - self.alloc.num_free


@dataclass
class Feed:
    """What one row feeds in a step: `tokens` at positions start, start + 1, ..."""

    row: int
    start: int
    tokens: list[int]


@dataclass
class Feeds:
    """A step's feeds as arrays: feed f is row rows[f] feeding lens[f] tokens from position starts[f]; `tokens`
    holds them all, feed after feed. What the sampler builds without a Python object per row."""

    rows: np.ndarray
    starts: np.ndarray
    lens: np.ndarray
    tokens: np.ndarray

    @staticmethod
    def of(feeds: list[Feed]) -> "Feeds":
        return Feeds(np.array([f.row for f in feeds], dtype=np.int64),
                     np.array([f.start for f in feeds], dtype=np.int64),
                     np.array([len(f.tokens) for f in feeds], dtype=np.int64),
                     np.array([t for f in feeds for t in f.tokens], dtype=np.int64))


def kv_groups(config: ModelConfig, max_length: int, block_size: int) -> list[tuple[list[int], int | None]]:
    """(layers, window) per block-table group: sliding layers get their own tables only if their window can free
    a block before max_length; otherwise every layer shares one table (its window still masks)."""
    window = config.sliding_window
    sliding = [i for i, t in enumerate(config.layer_types) if t == "sliding"]
    full = [i for i, t in enumerate(config.layer_types) if t != "sliding"]
    if not sliding or not full or window + block_size > max_length:
        return [(list(range(config.num_layers)), None)]
    return [(full, None), (sliding, window)]


def row_blocks(window: int | None, max_length: int, block_size: int, max_feed: int) -> int:
    """Most blocks one row holds in a group at once: all of max_length, or (sliding) a window plus the longest
    feed, which is written before the blocks that fell out of the window are given back."""
    if window is None:
        return -(-max_length // block_size)
    return min(-(-max_length // block_size), -(-(window + max_feed) // block_size) + 1)


def plan_blocks(config: ModelConfig, max_rows: int, max_length: int, block_size: int, budget_bytes: int | None,
                dtype: torch.dtype, max_feed: int = 512) -> list[int]:
    """Blocks per group for a pool of `budget_bytes` (None: what max_rows rows of max_length need, which is
    never more than a dense cache). The budget is split between groups in proportion to what one row of
    max_length holds in each; every group gets at least one such row plus the null block."""
    groups = kv_groups(config, max_length, block_size)
    per_block = [2 * len(layers) * block_size * config.num_kv_heads * config.head_dim * dtype.itemsize
                 for layers, _ in groups]
    row_blocks_ = [row_blocks(w, max_length, block_size, max_feed) for _, w in groups]
    if budget_bytes is None:
        return [max_rows * n + 1 for n in row_blocks_]
    row_bytes = sum(n * b for n, b in zip(row_blocks_, per_block))
    rows = budget_bytes / row_bytes
    return [max(int(rows * n), n) + 1 for n in row_blocks_]


_FLEX: dict = {}


def flex_decode(q, k_pool, v_pool, num, index, edge, scale: float, softcap: float | None) -> torch.Tensor:
    """Decode attention over a block pool, reading only each row's live blocks (FlexAttention, compiled).

    q (R, H, 1, D); k_pool / v_pool (num_blocks, bs, H_kv, D), viewed as one (1, H_kv, num_blocks * bs, D) sequence
    that every row's query attends into (a batch-1 key/value broadcast against R query rows). num (R,) and index
    (R, W) int32: row r's live blocks are index[r, :num[r]] (pool block ids, first to last). edge (4, R) int32: the
    last live block and the query's offset in it, the first live block and the window's first offset in it. Only
    those two blocks can hold invisible keys (slots after the query, or before a sliding window), so the mask needs
    no position table: it hides slots past the query in the last block and before the window in the first."""
    bs = k_pool.shape[1]
    key = (q.device.type, q.dtype, tuple(q.shape), tuple(index.shape), bs, float(scale), softcap)
    fn = _FLEX.get(key)
    if fn is None:
        fn = _FLEX[key] = _compile_flex(q.device.type, bs, float(scale), softcap)
    n = k_pool.shape[0]
    k = k_pool.view(1, n * bs, *k_pool.shape[2:]).transpose(1, 2)
    v = v_pool.view(1, n * bs, *v_pool.shape[2:]).transpose(1, 2)
    return fn(q, k, v, num, index, edge)


def _compile_flex(device_type: str, bs: int, scale: float, softcap: float | None):
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    # On the CPU inductor picks a "decoding" template for one-token queries that splits the work by the pool's
    # length, not the rows' (its cost grows with the pool: 123 ms against 21 ms for 32 rows of a 4097-block pool,
    # docs/LOG.md); a partition size that is not a multiple of the block size makes it take its attention
    # template. On CUDA the defaults (the Triton decode kernel) are kept.
    options = {"PARTITION_SIZE": bs * 8 + 1} if device_type == "cpu" else None  # (no multiple of bs >= 2)

    def mask_mod(b, h, q_idx, kv_idx, edge):
        blk, off = kv_idx // bs, kv_idx % bs
        return ((blk != edge[0, b]) | (off <= edge[1, b])) & ((blk != edge[2, b]) | (off >= edge[3, b]))

    def score_mod(score, b, h, q_idx, kv_idx):
        return softcap * torch.tanh(score / softcap)  # Gemma 2's attention logit cap

    def run(q, k, v, num, index, edge):
        mask = BlockMask.from_kv_blocks(num[:, None, None], index[:, None, None], BLOCK_SIZE=(16, bs),
                                        mask_mod=lambda b, h, qi, ki: mask_mod(b, h, qi, ki, edge),
                                        seq_lengths=(1, k.shape[2]), compute_q_blocks=False)
        return flex_attention(q, k, v, score_mod=score_mod if softcap else None, block_mask=mask, scale=scale,
                              enable_gqa=q.shape[1] != k.shape[1], kernel_options=options)

    # Shapes are static (rows in buckets, block lists padded), so each shape is compiled once. But every `run`
    # closure shares one code object, and dynamo keeps its compiled variants per code object: Gemma 3 at 128
    # rows alone needs 10 (5 row buckets x 2 block groups), past dynamo's default limit of 8 (fullgraph=True
    # makes hitting it an error, never a silent fall back to eager, which would attend over the whole pool).
    # torch.compile takes a per-function limit from torch 2.13 on; before, the global one is raised.
    if "recompile_limit" in inspect.signature(torch.compile).parameters:
        return torch.compile(run, fullgraph=True, dynamic=False, recompile_limit=256)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
    return torch.compile(run, fullgraph=True, dynamic=False)


class PagedKVCache:
    """Block pools and tables for up to `max_rows` rows of at most `max_length` tokens (see the module docstring).

    num_blocks: blocks per group (plan_blocks), ignored in dense mode (block_size >= max_length).
    max_feed: most tokens a row feeds in one step (the sampler's prefill_chunk); a pool must hold one row.
    attention: how the decode segment reads the pool: "gather" (padded to the longest row) or "flex" (only live
        blocks, `flex_decode`, its rows padded to `row_bucket`; paged layout only, blocks of at least 2).
    """

    def __init__(self, config: ModelConfig, max_rows: int, max_length: int, block_size: int,
                 num_blocks: list[int] | None = None, dtype=torch.float32, device=None, max_feed: int = 512,
                 attention: str = "gather"):
        self.config, self.max_rows, self.max_length = config, max_rows, max_length
        self.dense = block_size >= max_length
        if attention not in KV_READS:
            raise ValueError(f"attention={attention!r}: use one of {KV_READS}")
        if attention == "flex" and (self.dense or block_size < 2):  # 2: see _compile_flex's partition size
            raise ValueError(f"attention='flex' reads a paged pool: block_size {block_size} must be >= 2 and "
                             f"< max_length {max_length}")
        self.attention = attention
        self.bs = bs = max_length if self.dense else block_size
        self.max_blocks = -(-max_length // bs)
        self.dtype, self.device = dtype, torch.device(device or "cpu")
        spec = kv_groups(config, max_length, bs)
        if self.dense:
            num_blocks = [max_rows + 1]
        elif num_blocks is None:
            num_blocks = plan_blocks(config, max_rows, max_length, bs, None, dtype, max_feed)
        if len(num_blocks) != len(spec):
            raise ValueError(f"{len(num_blocks)} block counts for {len(spec)} groups")
        self.groups = [_Group(layers, w, n, bs, max_rows, self.max_blocks, config, dtype, device)
                       for (layers, w), n in zip(spec, num_blocks)]
        self.group_of = {i: g for g in self.groups for i in g.layers}
        for g in self.groups:
            need = row_blocks(g.window, max_length, bs, max_feed)
            if g.num_blocks - 1 < need:
                raise ValueError(f"a KV pool of {g.num_blocks - 1} blocks cannot hold one row of {max_length} "
                                 f"tokens ({need} blocks): raise rollout.kv_cache_gb")
        if self.dense:
            g = self.groups[0]
            g.table[:max_rows, 0] = np.arange(1, max_rows + 1)
            for r in range(max_rows):
                g.tables[r] = [r + 1]
        self._copies: list[tuple[_Group, int, int, int]] = []  # (group, src block, dst block, positions) pending
        # On the CPU, attention over bf16 keys and values is slower than casting what a step reads to fp32 and
        # attending in fp32: without native bf16 (no AVX512-BF16/AMX) 6x slower, and even with it (AVX512-BF16)
        # torch's CPU flash kernel took 7.4 ms a call against 1.6 ms in fp32 at 64 rows (benchmarks/prof_sampler.py,
        # docs/LOG.md: the upcast decodes 1.33x faster at 8 rows, 1.36x at 64, the same at 1). Scores and softmax
        # are accumulated in fp32 either way; the output is rounded back to the activation dtype.
        self.upcast = self.device.type == "cpu" and dtype != torch.float32
        self.stats = {"cow_copies": 0, "peak_blocks": 0}
        self._arange: torch.Tensor | None = None

    # --- memory accounting ---

    def bytes_per_block(self, g: _Group) -> int:
        c = self.config
        return 2 * len(g.layers) * self.bs * c.num_kv_heads * c.head_dim * self.dtype.itemsize

    def pool_bytes(self) -> int:
        return sum(g.num_blocks * self.bytes_per_block(g) for g in self.groups)

    def held_bytes(self) -> int:
        """Bytes of the blocks rows (and held prefixes) hold now."""
        if self.dense:
            return self.pool_bytes()
        return sum(g.live_blocks() * self.bytes_per_block(g) for g in self.groups)

    def blocks_for(self, g: _Group, start: int, end: int) -> int:
        """Blocks a row needs in group g to feed positions [start, end) with nothing cached."""
        lo = max(0, start - g.window + 1) if g.window else 0
        return (end - 1) // self.bs - lo // self.bs + 1

    def can_admit(self, n_tokens: int, reserve: int) -> bool:
        """Whether a prompt of n_tokens fits with `reserve` blocks per group left for the rows already running."""
        if self.dense:
            return True
        return all(g.alloc.num_free >= self.blocks_for(g, 0, n_tokens) + reserve for g in self.groups)

    # --- tables ---

    def _set(self, g: _Group, row: int, j: int, block: int):
        t = g.tables[row]
        if j == len(t):
            t.append(block)
        else:
            t[j] = block
        g.table[row, j] = block

    def ensure(self, row: int, start: int, end: int) -> bool:
        """Give `row` private blocks for positions [start, end). Positions before start are cached already (a
        row's earlier steps, or a shared prompt), so only the blocks from start's on are looked at: one or two
        per decoding row. False, with nothing changed, if a group has too few free blocks."""
        if self.dense:
            return True
        j0, j1 = start // self.bs, (end - 1) // self.bs
        for g in self.groups:
            t = g.tables[row]
            need = sum(1 for j in range(j0, j1 + 1) if j >= len(t) or t[j] == 0 or g.alloc.ref[t[j]] > 1)
            if need > g.alloc.num_free:
                return False
        for g in self.groups:
            t = g.tables[row]
            if not t:
                g.first[row] = j0
            while len(t) < j0:  # blocks before a sliding window that were never needed
                self._set(g, row, len(t), 0)
            for j in range(j0, j1 + 1):
                if j < len(t) and t[j] != 0:
                    old = t[j]
                    if g.alloc.ref[old] > 1:  # copy-on-write: another row (or a held prompt) reads this block too
                        new = g.alloc.alloc()
                        self._copies.append((g, old, new, start - j * self.bs))  # only positions before start
                        g.alloc.decref(old)
                        self._set(g, row, j, new)
                else:
                    self._set(g, row, j, g.alloc.alloc())
        live = 0
        for g in self.groups:
            n = g.live_blocks()
            g.peak, live = max(g.peak, n), live + n
        if live > self.stats["peak_blocks"]:
            self.stats["peak_blocks"] = live
        return True

    def has_blocks(self, rows: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
        """Which rows can feed [start, end) with no block to allocate or copy (`ensure` would change nothing):
        the feed stays in one block that the row holds alone. Most decoding rows, checked in a few array ops."""
        if self.dense:
            return np.ones(len(rows), dtype=bool)
        j = starts // self.bs
        ok = (ends - 1) // self.bs == j
        j = np.minimum(j, self.max_blocks - 1)
        for g in self.groups:
            b = g.table[rows, j]
            ok &= (b != 0) & (g.alloc.ref[b] == 1)
        return ok

    def trim_rows(self, rows: np.ndarray, next_pos: np.ndarray):
        """`trim` for many rows; Python runs only for those with a block to give back (in any sliding group)."""
        due = np.zeros(len(rows), dtype=bool)
        for g in self.groups:
            if g.window is not None:
                due |= np.maximum(0, next_pos - g.window + 1) // self.bs > g.first[rows]
        for i in np.nonzero(due)[0].tolist():
            self.trim(int(rows[i]), int(next_pos[i]))

    def trim(self, row: int, next_pos: int):
        """Sliding groups: give back the blocks no query at next_pos or later can see."""
        for g in self.groups:
            if g.window is None:
                continue
            keep = max(0, next_pos - g.window + 1) // self.bs  # first block the window of next_pos reaches
            t = g.tables[row]
            for j in range(int(g.first[row]), min(keep, len(t))):
                if t[j]:
                    g.alloc.decref(t[j])
                    self._set(g, row, j, 0)
            g.first[row] = max(g.first[row], keep)

    def holds(self, row: int) -> bool:
        """Whether `row` holds any block (what preempting it would give back)."""
        return not self.dense and any(any(g.tables[row]) for g in self.groups)

    def release(self, row: int):
        """Give back every block of `row` (it finished, or was preempted)."""
        if self.dense:
            return
        for g in self.groups:
            for b in g.tables[row]:
                if b:
                    g.alloc.decref(b)
            g.tables[row] = []
            g.table[row] = 0
            g.first[row] = 0

    def share(self, src: int, dst: int, n: int):
        """Row dst starts with row src's first n positions (a sibling sample of the same prompt). Paged: dst refers
        to src's blocks; dense: the positions are copied before the next step."""
        if self.dense:
            g = self.groups[0]
            self._copies.append((g, src + 1, dst + 1, n))
            return
        for g in self.groups:
            lo = max(0, n - g.window) // self.bs if g.window else 0  # what the next query (at n) can see
            for j in range(lo, (n - 1) // self.bs + 1):
                b = g.tables[src][j]
                g.alloc.incref(b)
                while len(g.tables[dst]) < j:
                    self._set(g, dst, len(g.tables[dst]), 0)
                self._set(g, dst, j, b)
            g.first[dst] = lo

    def hold(self, row: int, n: int):
        """Keep row's first n positions for siblings admitted later (`adopt`), independent of the row's fate."""
        if self.dense:
            g, b = self.groups[0], row + 1
            return [(g, {i: (g.k[i][b, :n].clone(), g.v[i][b, :n].clone()) for i in g.layers})], n
        held = []
        for g in self.groups:
            lo = max(0, n - g.window) // self.bs if g.window else 0
            blocks = g.tables[row][lo: (n - 1) // self.bs + 1]
            for b in blocks:
                g.alloc.incref(b)
            held.append((g, lo, blocks))
        return held, n

    def adopt(self, handle, row: int):
        held, n = handle
        if self.dense:
            (g, kv), = held
            for i, (k, v) in kv.items():
                g.k[i][row + 1, :n] = k
                g.v[i][row + 1, :n] = v
            return
        for g, lo, blocks in held:
            for j, b in enumerate(blocks, start=lo):
                g.alloc.incref(b)
                while len(g.tables[row]) < j:
                    self._set(g, row, len(g.tables[row]), 0)
                self._set(g, row, j, b)
            g.first[row] = lo

    def drop(self, handle):
        held, _ = handle
        if not self.dense:
            for g, _, blocks in held:
                for b in blocks:
                    g.alloc.decref(b)

    def held_handle_blocks(self, handle) -> int:
        return 0 if self.dense else sum(len(blocks) for _, _, blocks in handle[0])

    # --- a step ---

    def _apply_copies(self):
        """The step's pending block copies, one indexed copy per layer for all copies of a length (a prompt's
        siblings admitted together all copy the same length: one op per layer, not one per sibling)."""
        by_length: dict[tuple, tuple[list[int], list[int]]] = {}
        reads, writes = set(), set()
        for g, src, dst, n in self._copies:
            if n > 0:
                srcs, dsts = by_length.setdefault((g, n), ([], []))
                srcs.append(src)
                dsts.append(dst)
                reads.add((id(g), src))
                writes.add((id(g), dst))
                self.stats["cow_copies"] += 1
        # Batches may run out of the copies' order, which is only safe while no block is both written and read:
        # destinations are fresh blocks (copy-on-write) or a new sibling's own (dense), sources are blocks other
        # rows still hold.
        if reads & writes:
            raise RuntimeError("a block is both copied from and into in one step")
        for (g, n), (srcs, dsts) in by_length.items():
            src, dst = _upload(np.array(srcs), self.device), _upload(np.array(dsts), self.device)  # no sync
            for i in g.layers:
                g.k[i][dst, :n] = g.k[i][src, :n]
                g.v[i][dst, :n] = g.v[i][src, :n]
        self._copies.clear()

    def plan(self, feeds: "Feeds | list[Feed]", pad_to: int | None = None, bucket: int = 1,
             all_rows: bool = False) -> "StepView":
        """Pack `feeds` into one step (see the module docstring). Decoding feeds (one token) come first, then the
        others; `StepView.last[f]` is the index in the packed row of feed f's last token.

        pad_to: the decode segment has exactly this many rows (static shapes for CUDA graphs): the decoding rows,
        then padding rows (token 0 at position 0, attending position 0 only, writing into the null block through
        a table row of null blocks kept for them). all_rows: pad_to=max_rows (how session 8's Sampler, a
        bench_rollout baseline, asks for it). Dense mode always runs every slot in slot order, which lets the
        segment read the pool as a slice; its padding rows write to their own last position, which no token ever
        occupies (the token at max_length - 1 is sampled, never fed).
        bucket: the decode segment's read length is rounded up to a multiple of it (static shapes again)."""
        if isinstance(feeds, list):
            feeds = Feeds.of(feeds)
        self._apply_copies()
        bs, dev = self.bs, self.device
        pad_to = self.max_rows if all_rows else pad_to
        lens = feeds.lens
        if (lens < 1).any():
            raise ValueError("a feed without tokens")
        last = np.zeros(len(lens), dtype=np.int64)
        if len(feeds.tokens) == len(lens):  # one token a feed: a decode step, the usual kind
            dec, multi = slice(None), np.zeros(0, dtype=np.int64)
            d_rows, d_pos, d_tok = feeds.rows, feeds.starts, feeds.tokens
        else:
            first_tok = np.cumsum(lens) - lens  # each feed's first token in feeds.tokens
            dec = np.nonzero(lens == 1)[0]
            multi = np.nonzero(lens > 1)[0]
            d_rows, d_pos, d_tok = feeds.rows[dec], feeds.starts[dec], feeds.tokens[first_tok[dec]]
        n_d = len(d_rows)
        if self.dense:
            rows = np.arange(self.max_rows)
            qpos = np.zeros(self.max_rows, dtype=np.int64)  # mask positions; padding attends position 0
            wpos = np.full(self.max_rows, self.max_length - 1, dtype=np.int64)  # positions written
            toks = np.zeros(self.max_rows, dtype=np.int64)
            qpos[d_rows] = wpos[d_rows] = d_pos
            toks[d_rows] = d_tok
            real = np.zeros(self.max_rows, dtype=bool)
            real[d_rows] = True
            last[dec] = d_rows
        elif pad_to is not None:
            pad = pad_to - n_d
            if pad < 0:
                raise ValueError(f"{n_d} decoding rows do not fit a step padded to {pad_to}")
            rows = np.concatenate([d_rows, np.full(pad, self.max_rows)])  # the table row of null blocks
            qpos = np.concatenate([d_pos, np.zeros(pad, dtype=np.int64)])
            wpos = np.concatenate([d_pos, np.full(pad, self.max_length - 1)])
            toks = np.concatenate([d_tok, np.zeros(pad, dtype=np.int64)])
            real = np.arange(pad_to) < n_d
            last[dec] = np.arange(n_d)
        else:
            rows, qpos, wpos, toks = d_rows, d_pos, d_pos, d_tok
            real = np.ones(n_d, dtype=bool)
            last[dec] = np.arange(n_d)
        n_dec = len(rows)
        tokens, positions, write_rows = toks, wpos, rows
        if len(multi):
            m_lens = lens[multi]
            m_rows = feeds.rows[multi]
            m_starts = feeds.starts[multi]
            m_feed = np.repeat(np.arange(len(multi)), m_lens)  # which multi feed each of their tokens belongs to
            m_step = np.arange(len(m_feed)) - np.repeat(np.cumsum(m_lens) - m_lens, m_lens)  # its index in the feed
            last[multi] = n_dec + np.cumsum(m_lens) - 1
            tokens = np.concatenate([toks, feeds.tokens[first_tok[multi][m_feed] + m_step]])
            positions = np.concatenate([wpos, m_starts[m_feed] + m_step])
            write_rows = np.concatenate([rows, m_rows[m_feed]])

        view = StepView(self)
        view.tokens = _upload(tokens, dev)[None]
        view.positions = _upload(np.maximum(positions, 0), dev)[None]
        view.last = _upload(last, dev)
        # Rope positions: padding rows rotate at their written position; it never matters (never attended).
        for g in self.groups:
            blk = g.table[write_rows, np.minimum(positions // bs, self.max_blocks - 1)]
            view.write[id(g)] = _upload(blk * bs + positions % bs, dev)
        if n_dec and self.attention == "flex":
            view.segments.append(self._flex_segment(rows, qpos))
            view.seg_rows.append(n_dec)
        elif n_dec:
            view.segments.append(self._segment(rows, qpos[:, None], qpos, np.where(real, qpos, 0), None,
                                               bucket, slice_ok=self.dense))
            view.seg_rows.append(n_dec)
        if len(multi):
            T = int(m_lens.max())
            # Pad queries repeat their row's last token (position and packed index): finite, discarded.
            steps = np.minimum(np.arange(T)[None], (m_lens - 1)[:, None])
            q_pos = m_starts[:, None] + steps
            q_index = (n_dec + np.cumsum(m_lens) - m_lens)[:, None] + steps
            valid = (np.arange(T)[None] < m_lens[:, None]).reshape(-1)
            view.segments.append(self._segment(m_rows, q_pos, m_starts, m_starts + m_lens - 1, q_index, 1, False))
            view.seg_rows.append(_upload(np.nonzero(valid)[0], dev))
        return view

    def _segment(self, rows, q_pos, first_q, last_q, q_index, bucket, slice_ok):
        """Read plan of one segment: for each group, the pool slots to gather (R, S) (or a slice length), and the
        additive mask (R, 1, T, S) from query positions q_pos (R, T) and the slots' positions. Paged reads go up
        as block ids (R, blocks) and are widened to slots on the device: a fraction of the bytes and host work."""
        bs, dev = self.bs, self.device
        seg = {"q_index": None if q_index is None else _upload(q_index.reshape(-1), dev),
               "T": q_pos.shape[1], "R": len(rows), "read": {}, "mask": {}}
        qp = _upload(q_pos, dev)
        for g in self.groups:
            if slice_ok:  # dense: every row, block r + 1, read as a slice of the pool
                S = min(self.max_length, -(-int(last_q.max() + 1) // bucket) * bucket)
                kpos = self._positions(S)[None]
                seg["read"][id(g)] = S
            else:
                lo = (np.maximum(0, first_q - g.window + 1) // bs) if g.window else np.zeros_like(first_q)
                step = max(1, bucket // bs)  # the read length in whole blocks, rounded up to the bucket
                nb = min(self.max_blocks, -(-(int((last_q // bs - lo).max()) + 1) // step) * step)
                idx = lo[:, None] + np.arange(nb)[None]
                blocks = np.where(idx < self.max_blocks, g.table[rows[:, None], np.minimum(idx, self.max_blocks - 1)],
                                  0)
                slots = _upload(blocks, dev)[:, :, None] * bs + self._positions(bs)
                seg["read"][id(g)] = slots.reshape(len(rows), -1)
                kpos = _upload(lo * bs, dev)[:, None] + self._positions(nb * bs)[None]
            # q - k (R, T, S); the mask itself is made per window in StepView (a group may mix full and sliding
            # layers), keys beyond a row's query (padding, null blocks) are hidden by causality.
            seg["mask"][id(g)] = qp[:, :, None] - kpos[:, None, :]
        return seg

    def row_bucket(self, n: int) -> int:
        """Rows a static-shape decode segment runs for n decoding rows: the next power of two from 8 on, at most
        max_rows (a CUDA graph or compiled flex kernel per bucket; padding costs at most as much as the rows)."""
        return min(self.max_rows, max(8, 1 << (n - 1).bit_length()))

    def _flex_segment(self, rows, qpos):
        """Read plan of a decode segment for `flex_decode`: per group and window, each row's live blocks (from the
        window's first block, or 0, to the query's) and the edges the mask needs. The kernel's shapes are static:
        its rows are padded to a bucket (a step planned with pad_to is already; otherwise only the attention is
        padded, not the step's other layers). Padding rows (the table row of null blocks, position 0) read slot 0
        of the null block."""
        bs, dev, mb, R = self.bs, self.device, self.max_blocks, len(rows)
        seg = {"q_index": None, "T": 1, "R": R, "read": {}, "mask": {}, "flex": {}}
        pad = self.row_bucket(R) - R
        if pad > 0:
            rows = np.concatenate([rows, np.full(pad, self.max_rows)])
            qpos = np.concatenate([qpos, np.zeros(pad, dtype=np.int64)])
            R += pad
        hi = qpos // bs
        j = np.arange(mb)
        for g in self.groups:
            # inductor's CPU lowering asserts that the block lists span the whole key sequence (the pool)
            width = max(g.num_blocks, mb) if dev.type == "cpu" else mb
            for w in g.windows:
                first = np.maximum(0, qpos - w + 1) if w else np.zeros_like(qpos)
                lo = first // bs
                num = hi - lo + 1
                index = np.zeros((R, width), dtype=np.int32)
                index[:, :mb] = np.where(j < num[:, None], g.table[rows[:, None], np.minimum(lo[:, None] + j, mb - 1)],
                                         0)
                edge = np.stack([g.table[rows, hi], qpos % bs, g.table[rows, lo], first % bs]).astype(np.int32)
                seg["flex"][(id(g), w)] = (_upload(num.astype(np.int32), dev), _upload(index, dev), _upload(edge, dev))
        return seg

    def _positions(self, n: int) -> torch.Tensor:
        """arange(n) on the device, from one cached arange of every position the blocks of a row hold."""
        if self._arange is None:
            self._arange = torch.arange(self.max_blocks * self.bs, device=self.device)
        return self._arange[:n]


def _upload(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array as a tensor on `device`. On CUDA the copy is queued without waiting for the device (the sampler
    allows itself one synchronisation a step, when it reads the drawn tokens back)."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t if device.type == "cpu" else t.to(device, non_blocking=True)


class StepView:
    """One step's packed inputs and read plans; the model's attention calls `attend` for every layer."""

    paged = True

    def __init__(self, cache: PagedKVCache):
        self.cache = cache
        self.tokens = self.positions = self.last = None
        self.write: dict[int, torch.Tensor] = {}
        self.segments: list[dict] = []
        self.seg_rows: list = []  # decode: number of rows; multi: indices of the real tokens in (R * T)
        self._masks: dict = {}

    def _mask(self, s: int, seg: dict, g: _Group, window: int | None, dtype) -> torch.Tensor:
        key = (s, id(g), window, dtype)
        if key not in self._masks:
            delta = seg["mask"][id(g)]
            visible = delta >= 0
            if window is not None:
                visible = visible & (delta < window)
            m = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
            self._masks[key] = m.masked_fill_(~visible, float("-inf"))[:, None]  # (R, 1, T, S)
        return self._masks[key]

    def attend(self, layer: int, q, k, v, scale: float, softcap: float | None, window: int | None, impl: str):
        """q (1, H, N, D), k / v (1, H_kv, N, D) of the packed step -> attention output (1, H, N, D)."""
        c = self.cache
        g = c.group_of[layer]
        H, D = q.shape[1], q.shape[3]
        kf, vf = g.k[layer].view(-1, *g.k[layer].shape[2:]), g.v[layer].view(-1, *g.v[layer].shape[2:])
        kf.index_copy_(0, self.write[id(g)], k[0].transpose(0, 1))  # (N, H_kv, D) into their slots
        vf.index_copy_(0, self.write[id(g)], v[0].transpose(0, 1))
        outs, start = [], 0
        for s, (seg, rows) in enumerate(zip(self.segments, self.seg_rows)):
            R, T = seg["R"], seg["T"]
            if "flex" in seg:  # decode rows, reading only their live blocks
                num, index, edge = seg["flex"][(id(g), window)]
                qs = q[0, :, start: start + R].transpose(0, 1)  # (R, H, D)
                if len(num) > R:  # the kernel's row bucket
                    qs = torch.cat([qs, qs.new_zeros(len(num) - R, *qs.shape[1:])])
                start += R
                o = flex_decode(qs[:, :, None].contiguous(), g.k[layer], g.v[layer], num, index, edge, scale,
                                softcap)
                outs.append(o[:R, :, 0].to(q.dtype))
                continue
            if seg["q_index"] is None:  # decode: the first R packed tokens, one per row
                qs = q[0, :, start: start + R].transpose(0, 1)[:, :, None]  # (R, H, 1, D)
                start += R
            else:
                qs = q[0][:, seg["q_index"]].view(H, R, T, D).transpose(0, 1)  # (R, H, T, D)
            read = seg["read"][id(g)]
            if isinstance(read, int):  # dense slice: rows 0..R-1 own blocks 1..R
                ks, vs = g.k[layer][1: R + 1, :read], g.v[layer][1: R + 1, :read]
            else:
                ks = kf.index_select(0, read.view(-1)).view(R, -1, *kf.shape[1:])
                vs = vf.index_select(0, read.view(-1)).view(R, -1, *vf.shape[1:])
            if c.upcast:  # cast (R, S, H_kv, D) before the transpose: a cast of the strided view is 4x slower
                qs, ks, vs = qs.float(), ks.float(), vs.float()
            ks, vs = ks.transpose(1, 2), vs.transpose(1, 2)  # (R, H_kv, S, D)
            mask = self._mask(s, seg, g, window, qs.dtype)
            if impl == "sdpa" and softcap is None:
                o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale,
                                                   enable_gqa=qs.shape[1] != ks.shape[1])
            else:
                o = eager_attention(qs, ks, vs, mask, scale, softcap)
            o = o.to(q.dtype)
            if seg["q_index"] is None:
                outs.append(o[:, :, 0])  # (R, H, D)
            else:
                outs.append(o.transpose(1, 2).reshape(R * T, H, D)[rows])
        out = torch.cat(outs) if len(outs) > 1 else outs[0]
        return out.transpose(0, 1)[None]  # (1, H, N, D)
