"""What the two demos share (posttrain/recipes/demo.py: the tiny model; demo_real.py: SmolLM2): scoring a
checkpoint on held-out questions, one report row per stage, each stage's gain on its own target, the
summary over seeds, the training-reward windows and the printed table. Neither demo imports the other.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from pathlib import Path

from posttrain.data.tokenizer import Tokenizer
from posttrain.evaluate import exact_match_accuracy, preference_accuracy, sampled_exact_match_accuracy
from posttrain.models.hf_io import load_pretrained

SAMPLES_PER_PROMPT = 8  # held-out answers sampled per question (mean@8 and pass@8)


def config_path(configs: Path, name: str) -> Path:
    """configs/<demo>/<name>; installed (non-editable) copies fall back to the current directory's."""
    for base in (configs, Path("configs") / configs.name):
        if (base / name).is_file():
            return base / name
    raise FileNotFoundError(f"demo config {name} not found under {configs}")


def evaluate_checkpoint(
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


def summarise_seeds(reports: list[dict]) -> dict:
    """Each stage's gain on its target over the seeds' reports: per seed, mean, sample std, min..max.
    A gain "holds" when it is positive on every seed and its mean exceeds its spread (max - min)."""
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


def reward_windows(metrics_file: Path, window: int | None = None) -> dict:
    """Mean sampled GRPO training reward of the first and the last `window` steps (default: a quarter
    of the steps). One step's reward moves a lot from step to step; windows show the trend."""
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    rewards = [r["reward/mean"] for r in rows if "reward/mean" in r]
    n = max(1, min(window, len(rewards) // 2) if window else len(rewards) // 4)
    return {"steps": n, "first": sum(rewards[:n]) / n, "last": sum(rewards[-n:]) / n}


Column = tuple[str, Callable[[dict], str]]  # (header, stage row -> cell)


def print_report(report: dict, title: str, columns: list[Column], notes: Callable[[dict], list[str]]) -> None:
    """The stage table, the demo's own `notes` lines, each stage's gain on its target and the final
    checkpoint."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for header, _ in columns:
        table.add_column(header, justify="left" if header == "stage" else "right")
    for s in report["stages"]:
        table.add_row(*(cell(s) for _, cell in columns))
    console = Console(width=170)
    console.print(table)
    for line in notes(report):
        console.print(line)
    for stage, g in report.get("gains", {}).items():
        console.print(
            f"gain of {stage} on its target ({g['metric']}): {g['before']:.1%} -> {g['after']:.1%} ({g['gain']:+.1%})"
        )
    console.print(f"HF checkpoint: {report['stages'][-1]['hf_dir']}  (total {report['wall_time_s']:.0f}s)")


def stage_columns(k: int) -> dict[str, Column]:
    """The columns both demos print, by name."""
    pct = lambda key: lambda s: f"{s.get(key, float('nan')):.1%}"  # noqa: E731
    return {
        "stage": ("stage", lambda s: s["stage"]),
        "loss": ("final loss", lambda s: f"{s['final_loss']:.3f}"),
        "chat": ("held-out acc (chat)", pct("heldout_accuracy_chat")),
        "text": ("held-out acc (text)", pct("heldout_accuracy_text")),
        "sampled": (f"sampled acc (mean@{k})", pct("heldout_accuracy_sampled")),
        "pass": (f"pass@{k}", pct("heldout_pass_at_k")),
        "pref": ("pref acc", pct("heldout_preference_accuracy")),
        "tok_s": ("tokens/s", lambda s: f"{s['tokens_per_s']:,.0f}"),
        "wall": ("wall time", lambda s: f"{s['train_wall_s']:.0f}s"),
    }
