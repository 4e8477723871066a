"""How the sampler draws each row's next token: temperature, top-k, top-p and counter-based randomness, for all
rows at once in tensor ops.

Randomness. A row's draw at a position uses one uniform u that is a hash of (row key, position), where the key
hashes (seed, prompt id, sample id) (`Sampler._row_key`). Nothing else enters: not the batch, the slot, the
device's generator state or what was drawn before, so a resumed, re-batched or preempted row draws what it
would have drawn (up to the logits themselves, which no kernel makes batch-invariant).

Inverse CDF, not Gumbel-max. Gumbel-max needs a hashed noise value per (row, vocabulary entry): about twenty
integer and log passes over the (R, V) logits. With a logsumexp for the log-probabilities it took 991 ms a step
for 64 rows of Gemma's 262k vocabulary on one CPU core and 1.75 ms for 256 rows of 512; the inverse CDF takes
22 ms and 0.25 ms (docs/LOG.md, session 9). It needs one uniform per row (counter_uniform, on the host) and, on
the device, one softmax (which also gives the drawn token's log-probability) and block sums. The search has two
levels: block sums of the probabilities over blocks of ~sqrt(V) entries, a cumulative sum over the blocks to
find the block, then one within it. Cumulative sums are in float64 and u has 53 bits, so a token's interval is
resolved to ~1e-7 of its own probability (the float32 softmax), and no token is drawn for a rounding error in
a long cumulative sum.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

def counter_uniform(keys: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Uniform(0, 1) float64 (R,) with 53 random bits, a pure function of each row's 63-bit key and position:
    SplitMix64's output for state `key` at step position + 1 (its finaliser passes BigCrush). Computed on the
    host, where keys and positions are: R numbers, a few array operations, no device work."""
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps modulo 2^64, as SplitMix64 intends
        z = np.asarray(keys).astype(np.uint64) + (np.asarray(positions).astype(np.uint64) + np.uint64(1)) \
            * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return ((z >> np.uint64(11)).astype(np.float64) + 0.5) * (1.0 / (1 << 53))  # in (0, 1), never 0 or 1


def filter_logits(x: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Set to -inf what top-k (k > 0: keep tokens at least as large as the k-th largest, ties included) and
    then top-p (drop a token once the more likely ones reach p; the top one always stays) remove, for all
    rows at once. top_k (R,) int, 0 = off; top_p (R,) float, 1 = off. Returns a new tensor."""
    x = x.clone()
    k_max = int(top_k.max()) if top_k.numel() else 0  # callers pass host tensors: no device sync
    if k_max > 0:
        kth = x.topk(min(k_max, x.shape[-1]), dim=-1).values.gather(1, (top_k.clamp(min=1) - 1)[:, None].to(x.device))
        x = x.masked_fill((top_k[:, None].to(x.device) > 0) & (x < kth), float("-inf"))
    if bool((top_p < 1).any()):
        top_p = top_p.to(x.device)
        sorted_x, order = x.sort(dim=-1, descending=True)
        probs = torch.softmax(sorted_x, dim=-1)
        # Only rows that ask for it: at p = 1 a rounded cumulative sum can reach 1 before the last token.
        drop = ((probs.cumsum(-1) - probs) >= top_p[:, None]) & (top_p < 1)[:, None]
        x = x.scatter(1, order, sorted_x.masked_fill(drop, float("-inf")))
    return x


class Drawer:
    """Draws one token per row from fp32 logits (R, V); keeps one scratch buffer between steps."""

    def __init__(self):
        self._scratch: torch.Tensor | None = None
        self._ar: torch.Tensor | None = None

    def _buffer(self, x: torch.Tensor) -> torch.Tensor:
        """A float32 scratch tensor shaped like x (R, V), kept between steps: a fresh (R, V) tensor a step costs
        page faults on a CPU (a softmax of 64 x 262144 takes 41 ms into a new tensor, 20 ms into this one)."""
        R, V = x.shape
        s = self._scratch
        if s is None or s.device != x.device or s.shape[1] != V or s.shape[0] < R:
            s = self._scratch = torch.empty(max(R, 1), V, device=x.device)
        return s[:R]

    def log_normaliser(self, x: torch.Tensor) -> torch.Tensor:
        """logsumexp(x, -1) (R,), through the scratch buffer (torch.logsumexp allocates and is slower on CPU)."""
        s = self._buffer(x)
        m = x.amax(-1, keepdim=True)
        torch.sub(x, m, out=s)
        return m[:, 0] + s.exp_().sum(-1).log()

    def inverse_cdf(self, x: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The token whose interval of the cumulative softmax(x) holds u (R,), and softmax(x) (R, V) itself (in
        the scratch buffer where V divides into blocks: valid until the Drawer's next call)."""
        R, V = x.shape
        block = 1 << max(4, math.ceil(math.log2(V) / 2))  # ~sqrt(V): both levels are short
        if V % block == 0:  # Gemma's vocabularies (256000, 262144) and the tiny ones
            padded = probs = torch.ops.aten._softmax.out(x, -1, False, out=self._buffer(x))  # torch.softmax, kept
        else:
            probs = torch.softmax(x, -1)
            padded = F.pad(probs, (0, block - V % block))
        blocks = padded.view(R, -1, block)
        sums = blocks.sum(-1).double()  # (R, nb): summed in float32 (vectorised), the rest in float64
        cum = sums.cumsum(-1)
        total = cum[:, -1:]
        target = u[:, None] * total  # < total: u < 1
        blk = (cum < target).sum(-1)  # the first block whose end passes the target
        vals = blocks[self._arange(R, x.device), blk]  # (R, block)
        inside = vals.cumsum(-1, dtype=torch.float64)
        # The block's own float64 sum can fall a rounding error short of the float32 one that chose it: the target
        # is kept below it, so that it never lands past the block's last token with mass (on padding or an exp
        # that underflowed); that moves at most 2^-40 of the block's mass.
        t = torch.minimum(target - (cum - sums).gather(1, blk[:, None]), inside[:, -1:] * (1 - 2.0 ** -40))
        return blk * block + (inside < t).sum(-1), probs

    def _arange(self, n: int, device) -> torch.Tensor:
        a = self._ar
        if a is None or a.device != device or a.shape[0] < n:
            a = self._ar = torch.arange(max(n, 256), device=device)
        return a[:n]

    def draw(self, logits: torch.Tensor, temperature: np.ndarray, top_k: np.ndarray, top_p: np.ndarray,
             u: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Next tokens (R,) and their log-probabilities under the model's own distribution (before temperature,
        top-k and top-p). temperature 0 = greedy; the sampling parameters and each row's uniform u
        (counter_uniform) are host arrays (no device sync)."""
        hot = temperature > 0
        dev = logits.device
        u = torch.from_numpy(u).to(dev, non_blocking=True)
        if hot.all() and (temperature == 1).all() and not top_k.any() and (top_p >= 1).all():
            # Plain sampling: the softmax drawn from is the model's own, so a drawn token's log-probability is the
            # log of its float32 probability (exact to ~1e-7; a token below 1e-38 would lose digits, and all of
            # them together are drawn with probability below V x 1e-38).
            ids, probs = self.inverse_cdf(logits, u)
            return ids, probs.gather(1, ids[:, None])[:, 0].log()
        if hot.any():
            t = torch.from_numpy(np.where(hot, temperature, 1.0).astype(np.float32)).to(dev, non_blocking=True)
            x = filter_logits(logits / t[:, None], torch.from_numpy(top_k.astype(np.int64)),
                              torch.from_numpy(top_p.astype(np.float32)))
            ids, _ = self.inverse_cdf(x, u)
            if not hot.all():
                ids = torch.where(torch.from_numpy(~hot).to(dev, non_blocking=True), logits.argmax(-1), ids)
        else:
            ids = logits.argmax(-1)
        return ids, self.logprobs(logits, ids)

    def logprobs(self, logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """log softmax(logits)[ids] (R,): the model's log-probability of each row's token."""
        return logits.gather(1, ids[:, None])[:, 0] - self.log_normaliser(logits)
