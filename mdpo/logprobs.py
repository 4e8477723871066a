"""Per-sequence sums of masked token log-probs, without materialising [tokens x vocab] logits.

Gemma's vocabulary is 256k: fp32 logits for two DPO pairs of 2k tokens are 8 GB, and a naive log-softmax
keeps another copy for backward. Here the LM head runs only at the selected positions, in chunks, inside
a custom autograd function whose backward recomputes each chunk's logits instead of saving them (the
Cut-Cross-Entropy / Liger idea). Peak extra memory is one (chunk, vocab) fp32 buffer in forward and in
backward (mdpo/plan.py counts it), and the result is an ordinary differentiable (B,) tensor, so any
sequence-level loss (DPO, KTO) can sit on top.

Log-softmax is always fp32, and Gemma 2's final soft-cap is applied before it, as in the model's head.
"""

from __future__ import annotations

import torch

from mdpo.model import CausalLM


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, softcap: float | None):
    """fp32 logits (c, V) for hidden rows h (c, d); also the pre-cap tanh, needed by the backward."""
    logits = (h @ weight.T).float()  # matmul in the model dtype, like the model's head; softmax in fp32
    if softcap is None:
        return logits, None
    t = torch.tanh(logits / softcap)
    return t * softcap, t


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, softcap, chunk_size):
        M = hidden.shape[0]
        out = torch.empty(M, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(M, dtype=torch.float32, device=hidden.device)
        for s in range(0, M, chunk_size):
            logits, _ = _chunk_logits(hidden[s:s + chunk_size], weight, softcap)
            picked = logits.gather(1, targets[s:s + chunk_size, None])[:, 0]
            # logsumexp in place (max, then exp and sum in the buffer itself): torch.logsumexp would allocate a
            # second (c, V) buffer, doubling this function's peak.
            m = logits.amax(-1, keepdim=True)
            lse[s:s + chunk_size] = logits.sub_(m).exp_().sum(-1).log_() + m[:, 0]
            out[s:s + chunk_size] = picked - lse[s:s + chunk_size]
            del logits  # freed before the next chunk's is made: one (c, V) buffer at a time
        # Saved: inputs and the (M,) normalisers, never the (M, V) logits.
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.softcap, ctx.chunk_size = softcap, chunk_size
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, targets, lse = ctx.saved_tensors
        softcap, chunk = ctx.softcap, ctx.chunk_size
        grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        # fp32 accumulator for the head's gradient (the same tensor when the weight is fp32).
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if ctx.needs_input_grad[1] else None
        for s in range(0, hidden.shape[0], chunk):
            h = hidden[s:s + chunk]
            g = grad_out[s:s + chunk, None].float()  # (c, 1)
            logits, t = _chunk_logits(h, weight, softcap)  # recomputed: one extra head matmul per chunk
            # d logp[target] / d logits = onehot(target) - softmax(logits), built in place in `logits`.
            p = logits.sub_(lse[s:s + chunk, None]).exp_().mul_(-g)
            p.scatter_add_(1, targets[s:s + chunk, None], g)
            if t is not None:
                p.mul_(1 - t * t)  # through cap * tanh(z / cap)
            p = p.to(h.dtype)
            if grad_h is not None:
                torch.mm(p, weight, out=grad_h[s:s + chunk])
            if grad_w is not None:
                if p.dtype == torch.float32:
                    grad_w.addmm_(p.T, h)  # accumulate in place: no (V, d) temporary per chunk
                else:
                    grad_w.add_((p.T @ h).float())  # bf16 matmul, fp32 accumulation
            del logits, t, p  # as in forward: the next chunk's buffer is made after this one is freed
        return grad_h, (grad_w.to(weight.dtype) if grad_w is not None else None), None, None, None


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                   softcap: float | None = None, chunk_size: int = 512) -> torch.Tensor:
    """log softmax(softcap(hidden @ weight.T))[targets], fp32 (M,), computed chunk by chunk.

    Args:
        hidden: (M, d) final hidden states at the selected positions.
        weight: (V, d) the (tied) output embedding.
        targets: (M,) token ids whose log-probs are wanted.
    """
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32) + 0 * weight.sum()  # keeps the graph connected
    return _TokenLogprobs.apply(hidden, weight, targets, softcap, chunk_size)


def masked_token_logprobs(model: CausalLM, tokens: torch.Tensor, loss_mask: torch.Tensor,
                          positions: torch.Tensor | None = None, chunk_size: int = 512):
    """log p(token | earlier tokens) at each masked token, with gradients: (logps (M,) fp32, rows (M,), select).

    `select` (B, T-1) is where loss_mask[:, 1:] != 0, in row-major order: logps[k] is the k-th True entry's token
    (token t + 1, predicted at position t), rows[k] its row. Token-level objectives (GRPO) use these directly;
    sequence_logprobs sums them.
    """
    if tokens.shape != loss_mask.shape:
        raise ValueError(f"tokens {tuple(tokens.shape)} and loss_mask {tuple(loss_mask.shape)} differ in shape")
    hidden = model(tokens, positions=positions, return_hidden=True)  # (B, T, d)
    select = loss_mask[:, 1:] != 0  # (B, T-1): target token t+1 predicted at position t
    h = hidden[:, :-1][select]  # (M, d)
    targets = tokens[:, 1:][select]  # (M,)
    rows = torch.arange(tokens.shape[0], device=tokens.device)[:, None].expand_as(select)[select]  # (M,)
    return token_logprobs(h, model.head_weight, targets, model.config.final_softcap, chunk_size), rows, select


def sequence_logprobs(model: CausalLM, tokens: torch.Tensor, loss_mask: torch.Tensor,
                      positions: torch.Tensor | None = None, chunk_size: int = 512):
    """Sum over the masked tokens of each row of log p(token | earlier tokens), with gradients.

    Args:
        tokens: (B, T) right-padded token ids.
        loss_mask: (B, T) bool, True at the tokens whose log-probs count (the policy's own tokens). Token t is
            predicted from position t - 1, so position 0 can never count. A float mask weights each token's
            log-prob instead (0 = not counted): per-turn weights of a turn-weighted objective.
    Returns:
        (sums (B,) fp32, counts (B,) int64): (weighted) summed log-probs and the number of tokens summed per row.
    """
    lp, rows, select = masked_token_logprobs(model, tokens, loss_mask, positions, chunk_size)
    if loss_mask.is_floating_point():
        lp = lp * loss_mask[:, 1:][select].float()
    sums = torch.zeros(tokens.shape[0], dtype=torch.float32, device=tokens.device).index_add(0, rows, lp)
    return sums, select.sum(-1)
