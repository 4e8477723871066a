"""mdpo.plan of the paper's recipes on 80 GB cards: full fine-tuning on 1 and 8 GPUs against LoRA on one.

    python benchmarks/plan_recipes.py [--gpu-gb 80] [--out docs/results/plan_recipes.json]

Gemma-7B (experiments/gemma7b_mdpo.yaml) and Gemma-2-9B (experiments/gemma2_9b_mdpo.yaml) as shipped: bf16,
activation checkpointing, a pair of 2048 tokens a micro-batch, gradients accumulated to the global batch. The
architecture is the preset of the same shape (no weights are read). Estimates, not measurements: the CPU check of
the estimate is bench_train.py --lora; the GPU check's lora section measures the one-GPU row's step. Prints a
table, then one JSON line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common import emit  # benchmarks/common.py

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mdpo.config import load_config  # noqa: E402
from mdpo.plan import GB, plan  # noqa: E402

RECIPES = [("gemma7b_mdpo", "gemma-7b"), ("gemma2_9b_mdpo", "gemma-2-9b")]
SETUPS = [("full fine-tuning", 1, []), ("full fine-tuning", 8, []), ("LoRA rank 16", 1, ["lora.enabled=true"])]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpu-gb", type=float, default=80.0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    rows, results = [], []
    for exp, preset in RECIPES:
        for what, gpus, over in SETUPS:
            p = plan(load_config(ROOT / "experiments" / f"{exp}.yaml", over), gpus, args.gpu_gb, preset)
            t = p.train
            results.append({"experiment": exp, "model": preset, "setup": what, "gpus": gpus,
                            "train_gb": round(p.train_total / GB, 1), "fits": p.fits("train"),
                            "parts_gb": {k: round(v / GB, 2) for k, v in t.items()}, "peak": p.peak_phase,
                            "rollout_gb": round(p.rollout_total / GB, 1), "rows_700": p.rows, "knobs": p.knobs})
            rows.append([exp, what, f"{gpus} x {args.gpu_gb:g} GB", f"{p.train_total / GB:.1f}",
                         f"{t['weights'] / GB:.1f} + {t['optimizer'] / GB:.1f} + "
                         f"{p.phases[p.peak_phase] / GB:.1f} ({p.peak_phase})",
                         "fits" if p.fits("train") else "does not fit", f"{p.rollout_total / GB:.1f} ({p.rows})"])
    cols = ["experiment", "training", "GPUs", "GB per GPU", "weights + optimizer + step peak (moment)", "verdict",
            "rollout GB (rows of 700 tokens)"]
    emit({"bench": "plan_recipes", "gpu_gb": args.gpu_gb, "rows": results}, {"recipes": (cols, rows)}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
