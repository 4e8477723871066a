"""Greedy text generation with a KV cache: the smallest end-to-end use of model + tokenizer.

    python -m mdpo.generate --model DIR --prompt "The capital of France is" [--max-new-tokens 32]

This is a plain single-prompt loop; the batched, tool-pausing sampler used for rollouts lives elsewhere.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from mdpo.model import CausalLM, KVCache
from mdpo.weights import CheckpointError, load_pretrained, parse_dtype


@torch.no_grad()
def greedy_generate(model: CausalLM, prompt: list[int], max_new_tokens: int, stop_ids=(), on_token=None) -> list[int]:
    """Greedy continuation of `prompt` (token ids), at most max_new_tokens, ending early at a stop id."""
    if not prompt:
        raise ValueError("empty prompt")
    device = model.embed_tokens.weight.device
    cache = KVCache(model.config, 1, len(prompt) + max_new_tokens, model.embed_tokens.weight.dtype, device)
    tokens = torch.tensor([prompt], device=device)
    positions = torch.arange(len(prompt), device=device)[None]
    out: list[int] = []
    for _ in range(max_new_tokens):
        # Only the last position's logits are needed: run the head on one hidden state.
        hidden = model(tokens, positions=positions, cache=cache, return_hidden=True)
        next_id = int(model.head(hidden[:, -1]).argmax(-1))
        out.append(next_id)
        if on_token is not None:
            on_token(next_id)
        if next_id in stop_ids:
            break
        positions = positions[:, -1:] + 1
        tokens = torch.tensor([[next_id]], device=device)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mdpo.generate", description="Greedy generation from a prompt.")
    ap.add_argument("--model", required=True, help="HF-layout model folder (config.json, safetensors, tokenizer.model)")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: the checkpoint's own dtype)")
    ap.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    args = ap.parse_args(argv)
    from mdpo.tokenizer import load_tokenizer

    try:
        model = load_pretrained(args.model, dtype=args.dtype and parse_dtype(args.dtype)).eval()
        tok = load_tokenizer(args.model)
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = tok.render_chat([{"role": "user", "content": args.prompt}]) if args.chat else args.prompt
    prompt = tok.encode(text, bos=True)
    stream = tok.decode_stream()
    print(args.prompt, end="", flush=True)
    t0 = time.perf_counter()
    out = greedy_generate(model, prompt, args.max_new_tokens, stop_ids=tok.stop_ids,
                          on_token=lambda i: print(stream.step(i), end="", flush=True))
    dt = time.perf_counter() - t0
    print(stream.flush(), end="")
    print(f"\n[{len(prompt)} prompt tokens, {len(out)} new tokens in {dt:.2f} s, {len(out) / dt:.1f} tok/s]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
