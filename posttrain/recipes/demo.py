"""`posttrain demo`: the whole spine on a laptop CPU, in a few minutes, with nothing downloaded.

1. write synthetic tasks with verifiable answers (disjoint train / held-out splits);
2. pretrain a tiny Qwen3-shaped model from scratch on them as plain text;
3. SFT it on the same kinds of tasks rendered as chat conversations;
4. DPO the SFT model on preference pairs (chosen: the exact answer; rejected: a near miss or the
   right answer padded with chatter);
5. GRPO the DPO model on RL prompts with a verifiable reward (exact answer), sampling groups of
   answers with our rollout engine and reinforcing the better ones;
6. after each stage, greedy-decode the held-out questions and score exact match, both through the
   chat template and in the plain text format the base model was trained on; sample 8 answers per
   held-out question at temperature 1 (the RL stage's sampling) and score their mean exact match and
   pass@8; and measure held-out preference accuracy (chosen more likely than rejected) on unseen pairs.

The stage configs are ordinary job files (`configs/demo/*.yaml`); the demo only fills in paths and
the seed. `--seed N` changes the synthetic data (train problems, the held-out draw), the model init,
the data order and all sampling; `--seeds 0,1,2` runs each seed into OUTPUT/seed<N> and writes
OUTPUT/seeds_report.json with each stage's gain on its own target metric (mean, std, min..max):

    sft  -> held-out greedy exact match through the chat template (vs the base model);
    dpo  -> held-out DPO reward accuracy: the share of unseen pairs whose implicit reward
            beta * (log pi - log pi_ref) ranks chosen above rejected, which is what the DPO loss raises
            (on its training pairs). Before DPO the policy is its reference, every reward is 0 and each
            pair is a tie: 50% (ties count half: chance). The reference-free preference accuracy is
            reported too but is not DPO's objective: DPO moves margins relative to the reference, so
            pairs the SFT model already ranked right can lose a little while the reward accuracy rises;
    grpo -> held-out sampled accuracy mean@8 at temperature 1: what on-policy RL raises.

`--model smollm2` runs the real-model demo instead (posttrain/recipes/demo_real.py).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from posttrain.config import load_job
from posttrain.data.synthetic import write_demo_data
from posttrain.recipes import dpo, grpo, pretrain, sft
from posttrain.recipes.demo_common import (
    SAMPLES_PER_PROMPT,
    config_path,
    evaluate_checkpoint,
    print_report,
    print_seeds,
    reward_windows,
    stage_columns,
    stage_gains,
    stage_row,
    summarise_seeds,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "demo"
QUICK_HELDOUT = 48  # --quick scores this many held-out questions (and pairs) per stage, not all 300
QUICK_GRPO = ["training.max_steps=3", "rl.prompts_per_step=4", "data.eval.max_samples=8"]
QUICK = [
    "training.max_steps=12",
    "training.log_every_steps=1",
]  # --quick: a smoke run of the same flow (for tests)


def run_demo(output_dir: str | Path = "runs/demo", quick: bool = False, seed: int = 0) -> dict:
    """The tiny demo, one seed; returns the report also written to OUTPUT/demo_report.json."""
    out = Path(output_dir)
    t0 = time.perf_counter()
    data = write_demo_data(out / "data", seed=seed, num_sft=20000)
    rows = [json.loads(line) for line in data["heldout"].read_text().splitlines()]
    pref_rows = [json.loads(line) for line in data["pref_heldout"].read_text().splitlines()]
    extra = [f"seed={seed}", *(QUICK if quick else [])]
    samples = 2 if quick else SAMPLES_PER_PROMPT
    if quick:
        rows, pref_rows = rows[:QUICK_HELDOUT], pref_rows[:QUICK_HELDOUT]
    stages = []

    pre_cfg = load_job(
        config_path(CONFIGS, "pretrain.yaml"),
        [
            f"output_dir={out / 'pretrain'}",
            f"data.train.path={data['pretrain']}",
            *extra,
        ],
    )
    pre = pretrain.train(pre_cfg)
    stages.append(
        ("pretrain (base)", pre, evaluate_checkpoint(Path(pre["hf_dir"]), rows, pref_rows, samples, seed))
    )

    sft_cfg = load_job(
        config_path(CONFIGS, "sft.yaml"),
        [
            f"output_dir={out / 'sft'}",
            f"data.train.path={data['sft_train']}",
            f"model.path={pre['hf_dir']}",
            *extra,
        ],
    )
    post = sft.train(sft_cfg)
    stages.append(("sft", post, evaluate_checkpoint(Path(post["hf_dir"]), rows, pref_rows, samples, seed)))

    dpo_cfg = load_job(
        config_path(CONFIGS, "dpo.yaml"),
        [
            f"output_dir={out / 'dpo'}",
            f"data.train.path={data['pref_train']}",
            f"data.eval.path={data['pref_heldout']}",
            f"model.path={post['hf_dir']}",
            *extra,
        ],
    )
    pref = dpo.train(dpo_cfg)
    stages.append(("dpo", pref, evaluate_checkpoint(Path(pref["hf_dir"]), rows, pref_rows, samples, seed)))
    # What DPO optimises: the implicit reward beta * (log pi - log pi_ref) ranks chosen above rejected on
    # held-out pairs. At the start policy == reference, so every reward is 0: all ties (50%, chance).
    dpo_reward_accuracy = pref["final"].get("eval_rewards/accuracy")

    grpo_cfg = load_job(
        config_path(CONFIGS, "grpo.yaml"),
        [
            f"output_dir={out / 'grpo'}",
            f"data.train.path={data['rl_train']}",
            f"data.eval.path={data['rl_heldout']}",
            f"model.path={pref['hf_dir']}",
            f"seed={seed}",
            *(QUICK_GRPO if quick else []),
        ],
    )
    rl = grpo.train(grpo_cfg)
    stages.append(("grpo", rl, evaluate_checkpoint(Path(rl["hf_dir"]), rows, pref_rows, samples, seed)))

    report = {
        "demo": "tiny",
        "seed": seed,
        "stages": [stage_row(name, s, ev, samples) for name, s, ev in stages],
        "num_heldout": len(rows),
        "samples_per_prompt": samples,
        "dpo_heldout_reward_accuracy": {"before": 0.5, "after": dpo_reward_accuracy},  # before: all ties
        "grpo_train_reward": reward_windows(out / "grpo" / "metrics.jsonl", window=20),
        "wall_time_s": time.perf_counter() - t0,
    }
    # DPO's target on the stage rows it compares: the SFT model is the DPO reference (every pair a tie).
    report["stages"][1]["heldout_dpo_reward_accuracy"] = 0.5
    report["stages"][2]["heldout_dpo_reward_accuracy"] = dpo_reward_accuracy
    report["gains"] = stage_gains(report["stages"], TARGETS)
    (out / "demo_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    return report


# Each stage after the first is judged by the held-out metric it optimises (see the module docstring);
# the gain is that metric after the stage minus before it (the previous stage's checkpoint).
TARGETS = {
    "sft": "heldout_accuracy_chat",
    "dpo": "heldout_dpo_reward_accuracy",
    "grpo": "heldout_accuracy_sampled",
}


def run_seeds(seeds: list[int], output_dir: str | Path, quick: bool = False, model: str = "tiny") -> dict:
    """Run the demo once per seed (OUTPUT/seed<N>) and summarise each stage's gain over the seeds
    (OUTPUT/seeds_report.json, see summarise_seeds)."""
    out = Path(output_dir)
    reports = [run_one(model, out / f"seed{seed}", quick=quick, seed=seed) for seed in seeds]
    combined = summarise_seeds(reports)
    (out / "seeds_report.json").write_text(json.dumps(combined, indent=2) + "\n")
    print_seeds(combined)
    return combined


def run_one(model: str, output_dir: str | Path, quick: bool = False, seed: int = 0) -> dict:
    """One seed of the tiny demo or of the real-model one (`model`: tiny | smollm2)."""
    if model == "tiny":
        return run_demo(output_dir, quick=quick, seed=seed)
    if model == "smollm2":
        from posttrain.recipes.demo_real import run_real

        return run_real(output_dir, quick=quick, seed=seed)
    raise ValueError(f"unknown demo model {model!r} (expected tiny or smollm2)")


def print_table(report: dict) -> None:
    cols = stage_columns(report["samples_per_prompt"])
    title = f"posttrain demo: held-out exact match on {report['num_heldout']} unseen problems"
    names = ("stage", "loss", "chat", "text", "sampled", "pass", "pref", "tok_s", "wall")
    print_report(report, title, [cols[n] for n in names], _notes)


def _notes(report: dict) -> list[str]:
    lines = []
    for s in report["stages"][1:]:
        lines.append(f"per task (chat, after {s['stage']}): {s['per_task_chat']}")
        lines.append(f"per task (sampled, after {s['stage']}): {s['per_task_sampled']}")
    dpo_stage = next((s for s in report["stages"] if s["stage"] == "dpo"), None)
    if dpo_stage is not None:
        lines.append(
            f"preference accuracy by rejected kind (after dpo): {dpo_stage['preference_accuracy_by_kind']}"
        )
    acc = report.get("dpo_heldout_reward_accuracy", {})
    if acc.get("after") is not None:
        lines.append(
            "DPO held-out reward accuracy (its implicit reward vs the SFT reference ranks chosen above "
            f"rejected; before DPO every pair is a tie, counted half): {acc['before']:.1%} -> {acc['after']:.1%}"
        )
    rl = report.get("grpo_train_reward")
    if rl:
        lines.append(
            f"GRPO training reward (exact answer, sampled at temperature 1), mean of the first {rl['steps']} "
            f"steps {rl['first']:.1%} -> of the last {rl['steps']} {rl['last']:.1%}"
        )
    return lines
