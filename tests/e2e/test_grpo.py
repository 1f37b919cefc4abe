"""configs/tiny/grpo.yaml end to end: in one process (rl.local) and on a local Ray with separate worker
groups, GRPO raises the reward; a resumed run continues exactly; the export loads.

The tiny config starts from the tiny SFT checkpoint and rewards exact answers (the demo's RL stage
measures held-out accuracy on that path). Here, to fit the test budget, the same config starts from a
random model (model.arch) and rewards a property such a model can learn in a few steps: the share of
digits in its answers (examples/rewards.py:digit_fraction).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ARCH = (
    "model.arch={hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, num_attention_heads: 4, "
    "num_key_value_heads: 2, head_dim: 16}"
)
OVERRIDES = [
    "model.path=null",
    ARCH,
    "tokenizer.path=builtin",
    "rl.rewards=[{kind: function, function: examples/rewards.py:digit_fraction}]",
    "data.eval.max_samples=16",
    "training.max_steps=12",
    "training.eval_every_steps=0",
    "training.save_every_steps=6",
    "rl.prompts_per_step=8",
    "rl.group_size=8",
    "rl.max_new_tokens=8",
    "rl.kl_coef=0.01",  # exercises the reference worker and the KL term
    "optim.lr=3e-3",
    "metrics.progress=plain",
]


def run(out: Path, *extra: str) -> list[dict]:
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "posttrain.cli",
            "run",
            "configs/tiny/grpo.yaml",
            f"output_dir={out}",
            *OVERRIDES,
            *extra,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "setup check: max |trainer - engine| logprob" in res.stdout
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def rewards(rows: list[dict]) -> list[float]:
    return [r["reward/mean"] for r in rows if "reward/mean" in r]


def assert_learns(rows: list[dict]) -> None:
    r = rewards(rows)
    assert len(r) == 12
    first, last = sum(r[:4]) / 4, sum(r[-4:]) / 4
    print(f"reward: first 4 steps {first:.3f}, last 4 steps {last:.3f}")
    assert last > first + 0.05


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("grpo") / "local"
    return out, run(out)


def test_local_grpo_raises_the_reward_and_logs_every_phase(local_run):
    out, rows = local_run
    assert_learns(rows)
    step = next(r for r in rows if r.get("step") == 3 and "reward/mean" in r)
    for key in (
        "reward/std",
        "reward/digit_fraction",
        "response_length/mean",
        "kl",
        "entropy",
        "clip_fraction/low",
        "clip_fraction/high",
        "mismatch/mean_abs_logprob_diff",
        "mismatch/max_abs_logprob_diff",
        "is_ratio/mean",
        "time/generate_s",
        "time/reward_s",
        "time/old_logprobs_s",
        "time/reference_s",
        "time/update_s",
        "time/sync_s",
        "tokens_per_s/generate",
        "tokens_per_s/update",
        "mfu",
        "weight_version",
    ):
        assert key in step, key
    assert step["mismatch/max_abs_logprob_diff"] <= 1e-4  # fp32, same weights: kernels only
    assert step["weight_version"] == 4  # one sync at start, one per step
    summary = json.loads((out / "summary.json").read_text())
    assert summary["recipe"] == "grpo" and summary["weight_version"] == 13
    from posttrain.models.hf_io import load_pretrained

    model, _ = load_pretrained(out / "hf")  # the export loads back (vocabulary rows unpadded: 843 of 896)
    padding_rows = 896 - 843
    assert sum(p.numel() for p in model.parameters()) == summary["num_params"] - padding_rows * 64


def test_resumed_grpo_continues_exactly(local_run, tmp_path):
    out, rows = local_run
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_000012")
    (resumed / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows if r["step"] <= 6)  # as a run killed after step 6
    )
    again = run(resumed, "training.resume=true")
    straight = {r["step"]: r for r in rows if "reward/mean" in r}
    for r in again:
        if "reward/mean" in r and r["step"] > 6:
            for key in ("reward/mean", "loss", "grad_norm", "kl"):
                assert r[key] == pytest.approx(straight[r["step"]][key], abs=1e-6), (r["step"], key)


@pytest.mark.distributed
def test_ray_separate_worker_groups_raise_the_reward(local_run, tmp_path):
    _, local_rows = local_run
    rows = run(tmp_path / "ray", "rl.local=false", "rl.placement=separate", "training.save_every_steps=0")
    assert_learns(rows)
    # Same seeds, same code: the first step (sampled before any update) is the local run's.
    first_local = next(r for r in local_rows if "reward/mean" in r)
    first_ray = next(r for r in rows if "reward/mean" in r)
    assert first_ray["reward/mean"] == pytest.approx(first_local["reward/mean"], abs=1e-6)


def test_report_and_runs_show_the_grpo_run(local_run):
    """`posttrain report` draws the RL panels from a real GRPO run; `posttrain runs` lists it as finished."""
    from posttrain.metrics.report import write_report
    from posttrain.metrics.runs import read_run

    out, _ = local_run
    page = write_report(out).read_text()
    pngs = {p.name for p in (out / "report").glob("*.png")}
    assert {"rl_reward.png", "rl_mismatch.png"} <= pngs
    assert "recipe: grpo" in page
    run = read_run(out)
    assert (run.recipe, run.status, run.step, run.total_steps) == ("grpo", "finished", 12, 12)
