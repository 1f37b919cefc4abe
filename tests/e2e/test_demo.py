"""`posttrain demo --quick`: the whole flow (data -> pretrain -> SFT -> DPO -> held-out exact match and
preference accuracy -> table) on a short schedule. The full demo's accuracy claim is measured by `make demo` (README)."""

import json
import subprocess
import sys

from helpers import ROOT


def test_quick_demo_prints_table_and_report(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "posttrain.cli", "demo", "--quick", "--output-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    for heading in (
        "stage",
        "final loss",
        "held-out acc (chat)",
        "tokens/s",
        "wall time",
        "pretrain (base)",
        "sft",
        "dpo",
        "grpo",
        "GRPO training reward",
        "pref acc",
        "sampled acc (mean@2)",
        "pass@2",
    ):
        assert heading in res.stdout
    report = json.loads((tmp_path / "demo_report.json").read_text())
    assert [s["stage"] for s in report["stages"]] == ["pretrain (base)", "sft", "dpo", "grpo"]
    assert report["num_heldout"] == 48 and report["samples_per_prompt"] == 2  # --quick scores a subset
    for stage in report["stages"]:
        assert 0.0 <= stage["heldout_accuracy_chat"] <= 1.0 and stage["tokens_per_s"] > 0
        # k = 2 answers per question: the mean is a multiple of 1/(2 x 48), pass@2 bounds it from above
        hits = stage["heldout_accuracy_sampled"] * 96
        assert abs(hits - round(hits)) < 1e-9
        assert stage["heldout_accuracy_sampled"] <= stage["heldout_pass_at_k"] <= 1.0
        assert 0.0 <= stage["heldout_preference_accuracy"] <= 1.0
        assert (tmp_path / stage["hf_dir"].split(str(tmp_path) + "/")[-1] / "config.json").is_file()
    # Each stage after the first is scored on its own target against the checkpoint it started from;
    # DPO's starts at 50%: policy == reference, every pair a tie.
    gains = report["gains"]
    assert {k: g["metric"] for k, g in gains.items()} == {
        "sft": "heldout_accuracy_chat",
        "dpo": "heldout_dpo_reward_accuracy",
        "grpo": "heldout_accuracy_sampled",
    }
    assert (
        gains["dpo"]["before"] == 0.5
        and gains["dpo"]["after"] == report["dpo_heldout_reward_accuracy"]["after"]
    )
    assert gains["grpo"]["before"] == report["stages"][2]["heldout_accuracy_sampled"]
    assert report["seed"] == 0 and "gain of grpo on its target" in res.stdout
    # Each stage trained: its loss fell over its 12 steps.
    for name in ("pretrain", "sft", "dpo"):
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        losses = [r["loss"] for r in rows if "loss" in r]  # eval rows carry eval_loss instead
        assert len(losses) == 12 and losses[-1] < losses[0]
    # The RL stage ran its 3 quick steps from the DPO model, each with a reward, and exported.
    rl_rows = [json.loads(line) for line in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rl_rows if "reward/mean" in r] == [1, 2, 3]
    assert str(tmp_path / "grpo" / "hf") in res.stdout
