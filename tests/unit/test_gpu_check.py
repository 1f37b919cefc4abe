"""benchmarks/gpu_check.py --dry-run: every step of the one-shot GPU check runs on the CPU with tiny shapes
and reports its numbers, so a GPU lease is never spent on a crash."""

import json
import os
import subprocess
import sys

from helpers import ROOT


def test_dry_run_runs_every_step(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/gpu_check.py"), "--dry-run", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = json.loads(out.read_text())["steps"]
    assert list(steps) == ["preflight", "verify", "lm_head", "flex", "sft", "generation", "recipes"]
    assert all(s["status"] == "ok" for s in steps.values()), {k: s.get("error") for k, s in steps.items()}
    assert steps["verify"]["all_passed"] is True
    assert steps["preflight"]["matmul_float32_tflops"] > 0
    assert all(steps["lm_head"][f"vocab_{v}_ms"] > 0 for v in (151669, 151680, 151936))
    assert all(steps["flex"][f"{f}/logits_rel_diff"] < 1e-5 for f in ("qwen3", "gpt_oss"))
    sft = steps["sft"]
    assert 0 < sft["tiny/packed/mfu"] < 1.5 and sft["tiny/packed_vs_unpacked"] > 0
    assert (
        steps["generation"]["ours_tokens_per_s"] > 0 and steps["generation"]["transformers_tokens_per_s"] > 0
    )
    recipes = steps["recipes"]
    assert (
        recipes["grpo_steps"] == 2 and recipes["sft_final_loss"] > 0 and recipes["grpo_time/generate_s"] > 0
    )
