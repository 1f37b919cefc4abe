"""Synthetic run folders for the report and runs tests.

`grpo_rows` are metrics.jsonl rows with the keys the GRPO controller logs (reward, accuracy,
response length, KL, clip fraction, entropy, mismatch telemetry, ratios, phase times, generation
tokens/s, MFU), so the RL panels are tested before a real GRPO run exists.
"""

from __future__ import annotations

import json
from pathlib import Path


def grpo_rows(steps: int = 12) -> list[dict]:
    rows = []
    for s in range(1, steps + 1):
        rows.append(
            {
                "step": s,
                "loss": 0.05 - 0.002 * s,
                "lr": 1e-6,
                "grad_norm": 0.5 + 0.01 * s,
                "tokens_per_s": 900.0 + s,
                "mfu": 0.01 * s,
                "peak_memory_mb": 1000.0 + s,
                "reward/mean": 0.1 + 0.05 * s,
                "reward/std": 0.3 - 0.01 * s,
                "accuracy": 0.04 * s,
                "response_length/mean": 20.0 - 0.5 * s,
                "kl": 0.001 * s,
                "pass@4": min(1.0, 0.1 * s),
                "clip_fraction": 0.02,
                "clip_fraction/low": 0.01,
                "is_ratio/mean": 0.99,
                "entropy": 1.5 - 0.05 * s,
                "mismatch/mean_abs_logprob_diff": 1e-6 * s,
                "mismatch/max_abs_logprob_diff": 1e-5 * s,
                "ratio/mean": 1.0,
                "ratio/max": 1.0 + 0.01 * s,
                "time/generate_s": 2.0,
                "time/reference_s": 0.3,
                "time/update_s": 1.1,
                "time/sync_s": 0.05,
                "tokens_per_s/generate": 400.0 + 3 * s,
                "samples/arith": 6,
                "samples/sort": 2,
            }
        )
        if s % 4 == 0:
            rows.append({"step": s, "eval_accuracy": 0.05 * s, "eval_reward/mean": 0.2 + 0.04 * s})
    rows.append({"step": 13, "loss": "nan", "lr": 1e-6})  # a non-finite step: written as a string
    return rows


def write_run(parent: Path, rows: list[dict], recipe: str = "grpo", name: str = "run") -> Path:
    """A finished run's folder parent/name with these metrics rows."""
    run = parent / name
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "config.yaml").write_text(f"recipe: {recipe}\ntraining: {{max_steps: 13}}\n")
    (run / "summary.json").write_text(json.dumps({"recipe": recipe, "status": "finished", "steps": 13}))
    return run
