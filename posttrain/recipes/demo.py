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

The stage configs are ordinary job files (`configs/demo/*.yaml`); the demo only fills in paths.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from posttrain.config import load_job
from posttrain.data.synthetic import write_demo_data
from posttrain.data.tokenizer import Tokenizer
from posttrain.evaluate import exact_match_accuracy, preference_accuracy, sampled_exact_match_accuracy
from posttrain.models.hf_io import load_pretrained
from posttrain.recipes import dpo, grpo, pretrain, sft

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "demo"
QUICK_HELDOUT = 48  # --quick scores this many held-out questions (and pairs) per stage, not all 300
SAMPLES_PER_PROMPT = 8  # held-out answers sampled per question (mean@8 and pass@8)
QUICK_GRPO = ["training.max_steps=3", "rl.prompts_per_step=4", "data.eval.max_samples=8"]
QUICK = [
    "training.max_steps=12",
    "training.log_every_steps=1",
]  # --quick: a smoke run of the same flow (for tests)


def _config_path(name: str) -> Path:
    # Installed (non-editable) copies fall back to the configs next to the current directory.
    for base in (CONFIGS, Path("configs/demo")):
        if (base / name).is_file():
            return base / name
    raise FileNotFoundError(f"demo config {name} not found under {CONFIGS}")


def _evaluate(hf_dir: Path, rows: list[dict], pref_rows: list[dict], samples: int) -> dict:
    model, _ = load_pretrained(hf_dir)
    tokenizer = Tokenizer.from_dir(hf_dir)
    chat = exact_match_accuracy(model, tokenizer, rows, prompt_format="chat", progress="auto")
    text = exact_match_accuracy(model, tokenizer, rows, prompt_format="text", progress="auto")
    sampled = sampled_exact_match_accuracy(model, tokenizer, rows, samples_per_prompt=samples, seed=0)
    pref = preference_accuracy(model, tokenizer, pref_rows)
    return {"chat": chat, "text": text, "sampled": sampled, "pref": pref}


def run_demo(output_dir: str | Path = "runs/demo", quick: bool = False) -> dict:
    out = Path(output_dir)
    t0 = time.perf_counter()
    data = write_demo_data(out / "data", seed=0, num_sft=20000)
    rows = [json.loads(line) for line in data["heldout"].read_text().splitlines()]
    pref_rows = [json.loads(line) for line in data["pref_heldout"].read_text().splitlines()]
    extra = QUICK if quick else []
    samples = 2 if quick else SAMPLES_PER_PROMPT
    if quick:
        rows, pref_rows = rows[:QUICK_HELDOUT], pref_rows[:QUICK_HELDOUT]
    stages = []

    pre_cfg = load_job(
        _config_path("pretrain.yaml"),
        [
            f"output_dir={out / 'pretrain'}",
            f"data.train.path={data['pretrain']}",
            *extra,
        ],
    )
    pre = pretrain.train(pre_cfg)
    stages.append(("pretrain (base)", pre, _evaluate(Path(pre["hf_dir"]), rows, pref_rows, samples)))

    sft_cfg = load_job(
        _config_path("sft.yaml"),
        [
            f"output_dir={out / 'sft'}",
            f"data.train.path={data['sft_train']}",
            f"model.path={pre['hf_dir']}",
            *extra,
        ],
    )
    post = sft.train(sft_cfg)
    stages.append(("sft", post, _evaluate(Path(post["hf_dir"]), rows, pref_rows, samples)))

    dpo_cfg = load_job(
        _config_path("dpo.yaml"),
        [
            f"output_dir={out / 'dpo'}",
            f"data.train.path={data['pref_train']}",
            f"data.eval.path={data['pref_heldout']}",
            f"model.path={post['hf_dir']}",
            *extra,
        ],
    )
    pref = dpo.train(dpo_cfg)
    stages.append(("dpo", pref, _evaluate(Path(pref["hf_dir"]), rows, pref_rows, samples)))
    # What DPO optimises: the implicit reward beta * (log pi - log pi_ref) ranks chosen above rejected on
    # held-out pairs. At the start policy == reference, so every reward is 0 and no pair is ranked (0%).
    dpo_reward_accuracy = pref["final"].get("eval_rewards/accuracy")

    grpo_cfg = load_job(
        _config_path("grpo.yaml"),
        [
            f"output_dir={out / 'grpo'}",
            f"data.train.path={data['rl_train']}",
            f"data.eval.path={data['rl_heldout']}",
            f"model.path={pref['hf_dir']}",
            *(QUICK_GRPO if quick else []),
        ],
    )
    rl = grpo.train(grpo_cfg)
    stages.append(("grpo", rl, _evaluate(Path(rl["hf_dir"]), rows, pref_rows, samples)))

    report = {
        "stages": [
            {
                "stage": name,
                "final_loss": s["final"].get("loss", float("nan")),  # grpo: its last update's
                "heldout_accuracy_chat": ev["chat"]["accuracy"],
                "heldout_accuracy_text": ev["text"]["accuracy"],
                "heldout_accuracy_sampled": ev["sampled"]["accuracy"],
                "heldout_pass_at_k": ev["sampled"][f"pass@{samples}"],
                "per_task_chat": {k: v for k, v in ev["chat"].items() if k.startswith("accuracy/")},
                "per_task_sampled": {k: v for k, v in ev["sampled"].items() if k.startswith("accuracy/")},
                "heldout_preference_accuracy": ev["pref"]["accuracy"],
                "preference_accuracy_by_kind": {
                    k: v for k, v in ev["pref"].items() if k.startswith("accuracy/")
                },
                # trained tokens (+ generated ones for the RL stage) per second of the stage
                "tokens_per_s": (s["tokens_seen"] + s.get("tokens_generated", 0))
                / max(s["wall_time_s"], 1e-9),
                "train_wall_s": s["wall_time_s"],
                "hf_dir": s["hf_dir"],
            }
            for name, s, ev in stages
        ],
        "num_heldout": len(rows),
        "samples_per_prompt": samples,
        "dpo_heldout_reward_accuracy": {"before": 0.0, "after": dpo_reward_accuracy},
        "grpo_train_reward": _reward_windows(out / "grpo" / "metrics.jsonl"),
        "wall_time_s": time.perf_counter() - t0,
    }
    (out / "demo_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    return report


def _reward_windows(metrics_file: Path, window: int = 20) -> dict:
    """Mean sampled training reward of the first and the last `window` GRPO steps (one step's reward,
    over 32 prompts of mixed tasks, moves by +-0.1 from step to step)."""
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    rewards = [r["reward/mean"] for r in rows if "reward/mean" in r]
    n = max(1, min(window, len(rewards) // 2))
    return {"steps": n, "first": sum(rewards[:n]) / n, "last": sum(rewards[-n:]) / n}


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"posttrain demo: held-out exact match on {report['num_heldout']} unseen problems")
    cols = (
        "stage",
        "final loss",
        "held-out acc (chat)",
        "held-out acc (text)",
        f"sampled acc (mean@{report['samples_per_prompt']})",
        f"pass@{report['samples_per_prompt']}",
        "pref acc",
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
            f"{s['heldout_accuracy_text']:.1%}",
            f"{s['heldout_accuracy_sampled']:.1%}",
            f"{s['heldout_pass_at_k']:.1%}",
            f"{s['heldout_preference_accuracy']:.1%}",
            f"{s['tokens_per_s']:,.0f}",
            f"{s['train_wall_s']:.0f}s",
        )
    console = Console(width=170)
    console.print(table)
    for s in report["stages"][1:]:
        console.print(f"per task (chat, after {s['stage']}): {s['per_task_chat']}")
        console.print(f"per task (sampled, after {s['stage']}): {s['per_task_sampled']}")
    dpo_stage = next((s for s in report["stages"] if s["stage"] == "dpo"), report["stages"][-1])
    console.print(
        f"preference accuracy by rejected kind (after dpo): {dpo_stage['preference_accuracy_by_kind']}"
    )
    acc = report.get("dpo_heldout_reward_accuracy", {})
    if acc.get("after") is not None:
        console.print(
            "DPO held-out reward accuracy (its implicit reward vs the SFT reference ranks chosen above "
            f"rejected): {acc['before']:.1%} -> {acc['after']:.1%}"
        )
    rl = report.get("grpo_train_reward")
    if rl:
        console.print(
            f"GRPO training reward (exact answer, sampled at temperature 1), mean of the first {rl['steps']} "
            f"steps {rl['first']:.1%} -> of the last {rl['steps']} {rl['last']:.1%}"
        )
    console.print(f"HF checkpoint: {report['stages'][-1]['hf_dir']}  (total {report['wall_time_s']:.0f}s)")
