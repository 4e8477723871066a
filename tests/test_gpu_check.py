"""benchmarks/gpu_check.py stays runnable as-is: its --smoke mode runs every section at toy sizes on the CPU."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke_runs_every_section():
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert not [k for k in out if k.endswith("/error")], out
    assert out["decode/tiny-gemma/rows=4"]["tok_per_s"] > 0
    assert out["decode/tiny-gemma/rows=1"]["compiled_tok_per_s"] > 0  # the compiled step the GPU run captures
    # bf16 logits equal transformers' bf16 logits on the same weights (the parity the GPU run reports).
    for name in ("tiny-gemma", "tiny-gemma2"):
        assert out[f"parity/{name}/2L"] == {"max_abs_diff": 0.0, "top1_agree": 1.0}
    assert out["step/tiny-gemma/bfloat16/ac=True"]["tok_per_s"] > 0
    assert out["step/tiny-gemma/fsdp_mixed_bf16/ac=True"]["tok_per_s"] > 0  # train.py's own path
    lora = out["lora/tiny-gemma/r16/ac=True"]  # the one-GPU recipe's step, and the plan of it
    assert lora["tok_per_s"] > 0 and lora["plan_gb"] >= 0
    # The static-shape paged decode step (what CUDA graphs replay) gives the eager dense step's greedy tokens.
    assert out["rollout/tiny-gemma/greedy_graphs_paged_vs_eager_dense"] == {"rows_identical": "8/8"}
    row = out["rollout/tiny-gemma/rows=4"]
    assert row["paged_tok_per_s"] > 0 and row["dense_tok_per_s"] > 0 and row["paged_preemptions"] == 0
    assert row["paused_tok_per_s"] > 0 and row["paused_tool_calls"] == 2 * 4  # two calls in each of 4 rows
    assert row["flex_tok_per_s"] > 0 and "flex_error" not in row  # the paged pool read through FlexAttention
    kv = out["kvread/tiny-gemma"]
    assert kv["gather_ms"] > 0 and kv["flex_ms"] > 0 and kv["flex_max_diff"] < 2e-2  # bf16, one layer
    assert out["rollout/tiny-gemma/kv_plan"]["plan"].startswith("kv cache: weights")
    for name in ("tiny-qwen2", "tiny-mistral"):  # the other families' decode rows
        assert out[f"families/{name}/rows=4"]["tok_per_s"] > 0 and f"families/{name}/weights_gb" in out
    assert out["demo"]["exit"] == 0 and out["demo"]["summary"]["final_accuracy"]["n"] == 6
