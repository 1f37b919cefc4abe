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


def _evaluate(
    hf_dir: Path,
    rows: list[dict],
    pref_rows: list[dict] | None,
    samples: int,
    seed: int = 0,
    text: bool = True,
    max_new_tokens: int = 24,
) -> dict:
    """Held-out greedy (chat; and text) exact match, sampled mean@k / pass@k and, given pairs, preference
    accuracy of the checkpoint at hf_dir. The sampling seed is the demo's: the same on every stage."""
    model, _ = load_pretrained(hf_dir)
    tokenizer = Tokenizer.from_dir(hf_dir)
    kw = {"max_new_tokens": max_new_tokens}
    out = {"chat": exact_match_accuracy(model, tokenizer, rows, prompt_format="chat", progress="auto", **kw)}
    if text:
        out["text"] = exact_match_accuracy(
            model, tokenizer, rows, prompt_format="text", progress="auto", **kw
        )
    out["sampled"] = sampled_exact_match_accuracy(
        model, tokenizer, rows, samples_per_prompt=samples, seed=seed, **kw
    )
    if pref_rows is not None:
        out["pref"] = preference_accuracy(model, tokenizer, pref_rows)
    return out


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
        _config_path("pretrain.yaml"),
        [
            f"output_dir={out / 'pretrain'}",
            f"data.train.path={data['pretrain']}",
            *extra,
        ],
    )
    pre = pretrain.train(pre_cfg)
    stages.append(("pretrain (base)", pre, _evaluate(Path(pre["hf_dir"]), rows, pref_rows, samples, seed)))

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
    stages.append(("sft", post, _evaluate(Path(post["hf_dir"]), rows, pref_rows, samples, seed)))

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
    stages.append(("dpo", pref, _evaluate(Path(pref["hf_dir"]), rows, pref_rows, samples, seed)))
    # What DPO optimises: the implicit reward beta * (log pi - log pi_ref) ranks chosen above rejected on
    # held-out pairs. At the start policy == reference, so every reward is 0: all ties (50%, chance).
    dpo_reward_accuracy = pref["final"].get("eval_rewards/accuracy")

    grpo_cfg = load_job(
        _config_path("grpo.yaml"),
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
    stages.append(("grpo", rl, _evaluate(Path(rl["hf_dir"]), rows, pref_rows, samples, seed)))

    report = {
        "demo": "tiny",
        "seed": seed,
        "stages": [stage_row(name, s, ev, samples) for name, s, ev in stages],
        "num_heldout": len(rows),
        "samples_per_prompt": samples,
        "dpo_heldout_reward_accuracy": {"before": 0.5, "after": dpo_reward_accuracy},  # before: all ties
        "grpo_train_reward": _reward_windows(out / "grpo" / "metrics.jsonl"),
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


def stage_row(name: str, s: dict, ev: dict, samples: int) -> dict:
    """One stage's line of the report: its training summary `s` and held-out evaluation `ev`."""
    row = {
        "stage": name,
        "final_loss": s["final"].get("loss", float("nan")) if s else float("nan"),  # grpo: last update's
        "heldout_accuracy_chat": ev["chat"]["accuracy"],
        "heldout_accuracy_sampled": ev["sampled"]["accuracy"],
        "heldout_pass_at_k": ev["sampled"][f"pass@{samples}"],
        "per_task_chat": {k: v for k, v in ev["chat"].items() if k.startswith("accuracy/")},
        "per_task_sampled": {k: v for k, v in ev["sampled"].items() if k.startswith("accuracy/")},
        "per_task_pass_at_k": {k: v for k, v in ev["sampled"].items() if k.startswith("pass@") and "/" in k},
        # trained tokens (+ generated ones for the RL stage) per second of the stage
        "tokens_per_s": (s["tokens_seen"] + s.get("tokens_generated", 0)) / max(s["wall_time_s"], 1e-9)
        if s
        else 0.0,
        "train_wall_s": s["wall_time_s"] if s else 0.0,
        "hf_dir": s["hf_dir"] if s else None,
    }
    if "text" in ev:
        row["heldout_accuracy_text"] = ev["text"]["accuracy"]
    if "pref" in ev:
        row["heldout_preference_accuracy"] = ev["pref"]["accuracy"]
        row["preference_accuracy_by_kind"] = {
            k: v for k, v in ev["pref"].items() if k.startswith("accuracy/")
        }
    return row


def stage_gains(stages: list[dict], targets: dict[str, str]) -> dict:
    """{stage: {"metric", "before", "after", "gain"}} for each stage named in `targets`."""
    gains = {}
    for prev, cur in zip(stages, stages[1:]):
        key = next((k for k in targets if cur["stage"].startswith(k)), None)
        if key is not None:
            metric = targets[key]
            before, after = prev.get(metric), cur.get(metric)
            if before is None or after is None:  # e.g. a DPO run too short to evaluate its pairs
                continue
            gains[key] = {"metric": metric, "before": before, "after": after, "gain": after - before}
    return gains


def run_seeds(seeds: list[int], output_dir: str | Path, quick: bool = False, model: str = "tiny") -> dict:
    """Run the demo once per seed (OUTPUT/seed<N>) and summarise each stage's gain over the seeds
    (OUTPUT/seeds_report.json, see summarise_seeds)."""
    out = Path(output_dir)
    reports = [run_one(model, out / f"seed{seed}", quick=quick, seed=seed) for seed in seeds]
    combined = summarise_seeds(reports)
    (out / "seeds_report.json").write_text(json.dumps(combined, indent=2) + "\n")
    print_seeds(combined)
    return combined


def summarise_seeds(reports: list[dict]) -> dict:
    """Each stage's gain on its target over the seeds' reports: per seed, mean, sample std, min..max.
    A gain "holds" when it is positive on every seed and its mean exceeds its spread (max - min)."""
    import statistics

    summary = {}
    for stage in reports[0]["gains"]:
        per_seed = {r["seed"]: r["gains"][stage] for r in reports}
        values = [g["gain"] for g in per_seed.values()]
        mean, spread = statistics.fmean(values), max(values) - min(values)
        summary[stage] = {
            "metric": reports[0]["gains"][stage]["metric"],
            "per_seed": per_seed,
            "mean": mean,
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values),
            "max": max(values),
            "holds": min(values) > 0 and mean > spread,
        }
    return {
        "demo": reports[0]["demo"],
        "seeds": [r["seed"] for r in reports],
        "gains": summary,
        "wall_time_s": {r["seed"]: r["wall_time_s"] for r in reports},
    }


def run_one(model: str, output_dir: str | Path, quick: bool = False, seed: int = 0) -> dict:
    """One seed of the tiny demo or of the real-model one (`model`: tiny | smollm2)."""
    if model == "tiny":
        return run_demo(output_dir, quick=quick, seed=seed)
    if model == "smollm2":
        from posttrain.recipes.demo_real import run_real

        return run_real(output_dir, quick=quick, seed=seed)
    raise ValueError(f"unknown demo model {model!r} (expected tiny or smollm2)")


def print_seeds(combined: dict) -> None:
    from rich.console import Console

    console = Console(width=170)
    console.print(
        f"[bold]{combined['demo']} demo, seeds {combined['seeds']}: each stage's gain on its target[/]"
    )
    for stage, g in combined["gains"].items():
        per = ", ".join(
            f"seed {s}: {v['before']:.1%} -> {v['after']:.1%} ({v['gain']:+.1%})"
            for s, v in g["per_seed"].items()
        )
        console.print(
            f"{stage} ({g['metric']}): gain mean {g['mean']:+.1%} std {g['std']:.1%} min..max "
            f"{g['min']:+.1%}..{g['max']:+.1%}  holds={g['holds']}  ({per})"
        )
    walls = ", ".join(f"{s}: {w:.0f}s" for s, w in combined["wall_time_s"].items())
    console.print(f"wall time per seed: {walls}")


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
            f"{s.get('heldout_accuracy_text', float('nan')):.1%}",
            f"{s['heldout_accuracy_sampled']:.1%}",
            f"{s['heldout_pass_at_k']:.1%}",
            f"{s.get('heldout_preference_accuracy', float('nan')):.1%}",
            f"{s['tokens_per_s']:,.0f}",
            f"{s['train_wall_s']:.0f}s",
        )
    console = Console(width=170)
    console.print(table)
    for s in report["stages"][1:]:
        console.print(f"per task (chat, after {s['stage']}): {s['per_task_chat']}")
        console.print(f"per task (sampled, after {s['stage']}): {s['per_task_sampled']}")
    dpo_stage = next((s for s in report["stages"] if s["stage"] == "dpo"), None)
    if dpo_stage is not None:
        console.print(
            f"preference accuracy by rejected kind (after dpo): {dpo_stage['preference_accuracy_by_kind']}"
        )
    acc = report.get("dpo_heldout_reward_accuracy", {})
    if acc.get("after") is not None:
        console.print(
            "DPO held-out reward accuracy (its implicit reward vs the SFT reference ranks chosen above "
            f"rejected; before DPO every pair is a tie, counted half): {acc['before']:.1%} -> {acc['after']:.1%}"
        )
    rl = report.get("grpo_train_reward")
    if rl:
        console.print(
            f"GRPO training reward (exact answer, sampled at temperature 1), mean of the first {rl['steps']} "
            f"steps {rl['first']:.1%} -> of the last {rl['steps']} {rl['last']:.1%}"
        )
    for stage, g in report.get("gains", {}).items():
        console.print(
            f"gain of {stage} on its target ({g['metric']}): {g['before']:.1%} -> {g['after']:.1%} ({g['gain']:+.1%})"
        )
    console.print(f"HF checkpoint: {report['stages'][-1]['hf_dir']}  (total {report['wall_time_s']:.0f}s)")
