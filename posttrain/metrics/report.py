"""`posttrain report RUN_DIR`: one self-contained HTML page that explains a finished (or running) run.

It reads OUTPUT/metrics.jsonl, summary.json, status.json and config.yaml, draws one PNG per panel
with matplotlib (Agg, no display needed) and writes OUTPUT/report/index.html with every PNG embedded
(base64) and the same PNGs beside it. Panels, each drawn only when its keys are in the metrics:

  training   loss (+ eval_loss), learning rate, gradient norm, tokens/s, MFU, peak memory
  eval       every other eval_* metric
  data mix   share of samples and of tokens per source and step (`samples/<source>`, `tokens/<source>`)
  RL         reward mean +- std, accuracy, response length, KL, clip fraction / entropy, rollout-vs-
             trainer logprob mismatch, importance ratios, time per phase, generation tokens/s
  other      every numeric key no panel above shows (a recipe's own metrics, e.g. DPO's rewards/*)

`panels(rows)` is the pure part (metrics rows -> what each figure plots); `write_report` draws.
"""

from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import dataclass
from pathlib import Path

from posttrain.errors import PosttrainError


@dataclass
class Series:
    key: str  # the metric name in metrics.jsonl
    steps: list[int]
    values: list[float]


@dataclass
class Panel:
    name: str  # file stem of its PNG
    title: str
    series: list[Series]
    kind: str = "line"  # line | stack (shares that add up to 1) | grid (one small plot per series)
    ylabel: str = ""
    log_y: bool = False
    band: Series | None = None  # +- this around the first series (reward std)


# (name, title, keys, y label, log scale): the training and RL panels, in page order. A key ending in
# "*" stands for every logged key that starts with the rest (in the order they were first logged).
TRAINING = [
    ("loss", "Loss", ["loss", "lm_loss", "eval_loss"], "loss", False),
    ("lr", "Learning rate", ["lr"], "lr", False),
    ("grad_norm", "Gradient norm (before clipping)", ["grad_norm"], "norm", True),
    ("throughput", "Throughput", ["tokens_per_s", "tokens_per_s/*"], "tokens/s", False),
    ("mfu", "Model FLOPs utilisation", ["mfu"], "MFU", False),
    ("memory", "Peak memory", ["peak_memory_mb"], "MiB", False),
]
RL = [
    ("rl_reward", "Reward (mean +- std over the step's samples)", ["reward/mean"], "reward", False),
    ("rl_accuracy", "Accuracy", ["accuracy", "pass@*", "eval_accuracy"], "accuracy", False),
    ("rl_response_length", "Response length", ["response_length/*"], "tokens", False),
    ("rl_kl", "KL to the reference", ["kl"], "KL", False),
    ("rl_policy", "Clip fraction and entropy", ["clip_fraction", "clip_fraction/*", "entropy"], "", False),
    (
        "rl_mismatch",
        "Rollout engine vs trainer |delta logprob|",
        ["mismatch/mean_abs_logprob_diff", "mismatch/max_abs_logprob_diff"],
        "|delta logprob|",
        True,
    ),
    ("rl_ratio", "Importance ratios", ["ratio/*", "is_ratio/*"], "ratio", False),
]
PHASE_PREFIX = "time/"  # RL time per phase: time/generate_s, time/reference_s, time/update_s, time/sync_s
SOURCE_PREFIXES = (
    ("samples/", "Data mix: share of samples per step"),
    ("tokens/", "Data mix: share of tokens per step"),
)
NOT_PLOTTED = {"step", "skipped_nonfinite", "eval_tokens", "eval_units", "num"}
GRID_MAX = 24  # series per small-multiples figure


def _series(rows: list[dict], key: str) -> Series | None:
    steps, values = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            continue  # NaN/inf are written as strings; they are not drawn
        steps.append(int(r["step"]))
        values.append(float(v))
    return Series(key, steps, values) if values else None


def _keys(rows: list[dict]) -> list[str]:
    seen: dict[str, None] = {}
    for r in rows:
        for k, v in r.items():
            if isinstance(v, int | float) and not isinstance(v, bool):
                seen.setdefault(k, None)
    return [k for k in seen if k not in NOT_PLOTTED]


def panels(rows: list[dict]) -> list[Panel]:
    """What the report plots for these metrics rows, in page order; only panels with data."""
    keys = _keys(rows)
    used: set[str] = set()
    out: list[Panel] = []
    for name, title, wanted, ylabel, log_y in TRAINING + RL:
        names = [
            k for w in wanted for k in ([x for x in keys if x.startswith(w[:-1])] if w[-1] == "*" else [w])
        ]
        found = [s for k in dict.fromkeys(names) if (s := _series(rows, k))]
        if not found:
            continue
        used.update(s.key for s in found)
        panel = Panel(name, title, found, ylabel=ylabel, log_y=log_y)
        if name == "rl_reward" and (band := _series(rows, "reward/std")):
            panel.band = band
            used.add(band.key)
        out.append(panel)
    phases = [s for k in keys if k.startswith(PHASE_PREFIX) and (s := _series(rows, k))]
    if phases:
        out.append(Panel("rl_phase_time", "Time per phase", phases, ylabel="s"))
        used.update(s.key for s in phases)
    for prefix, title in SOURCE_PREFIXES:
        sources = [s for k in keys if k.startswith(prefix) and (s := _series(rows, k))]
        if sources:
            out.append(Panel(f"data_mix_{prefix.rstrip('/')}", title, sources, kind="stack", ylabel="share"))
            used.update(s.key for s in sources)
    evals = [s for k in keys if k.startswith("eval_") and k not in used and (s := _series(rows, k))]
    out.extend(_grids("eval", "Eval metrics", evals))
    used.update(s.key for s in evals)
    rest = [s for k in keys if k not in used and (s := _series(rows, k))]
    out.extend(_grids("other", "Other metrics", rest))
    return out


def _grids(name: str, title: str, series: list[Series]) -> list[Panel]:
    chunks = [series[i : i + GRID_MAX] for i in range(0, len(series), GRID_MAX)]
    return [
        Panel(name if i == 0 else f"{name}_{i + 1}", title, chunk, kind="grid")
        for i, chunk in enumerate(chunks)
    ]


# ------------------------------------------------------------------------------ drawing


def _shares(series: list[Series]) -> tuple[list[int], list[list[float]]]:
    """Per step, each source's share of the step's total (steps where the total is 0 are left out)."""
    by_step: dict[int, dict[str, float]] = {}
    for s in series:
        for step, v in zip(s.steps, s.values):
            by_step.setdefault(step, {})[s.key] = v
    steps = sorted(st for st, vals in by_step.items() if sum(vals.values()) > 0)
    shares = [[by_step[st].get(s.key, 0.0) / sum(by_step[st].values()) for st in steps] for s in series]
    return steps, shares


def draw(panel: Panel, path: Path) -> Path:
    """Draw one panel into a PNG at path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if panel.kind == "grid":
        cols = min(3, len(panel.series))
        rows = math.ceil(len(panel.series) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False)
        for ax, s in zip(axes.flat, panel.series):
            ax.plot(s.steps, s.values, marker="o" if len(s.steps) <= 20 else None, markersize=3)
            ax.set_title(s.key, fontsize=9)
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(panel.series) :]:
            ax.axis("off")
        fig.suptitle(panel.title)
    else:
        fig, ax = plt.subplots(figsize=(7.5, 3.6))
        if panel.kind == "stack":
            steps, shares = _shares(panel.series)
            labels = [s.key.split("/", 1)[1] for s in panel.series]
            ax.stackplot(steps, shares, labels=labels, alpha=0.85)
            ax.set_ylim(0, 1)
        else:
            for s in panel.series:
                sparse = len(s.steps) <= 20 or s.key.startswith("eval_")
                ax.plot(s.steps, s.values, label=s.key, marker="o" if sparse else None, markersize=3)
            if panel.band is not None:
                first = panel.series[0]
                std = dict(zip(panel.band.steps, panel.band.values))
                lo = [v - std.get(st, 0.0) for st, v in zip(first.steps, first.values)]
                hi = [v + std.get(st, 0.0) for st, v in zip(first.steps, first.values)]
                ax.fill_between(first.steps, lo, hi, alpha=0.2, label=panel.band.key)
            if panel.log_y and all(v > 0 for s in panel.series for v in s.values):
                ax.set_yscale("log")
        ax.set_title(panel.title)
        ax.set_xlabel("step")
        ax.set_ylabel(panel.ylabel)
        ax.grid(alpha=0.3)
        if len(panel.series) > 1 or panel.band is not None or panel.kind == "stack":
            ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------ the page

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; } td, th { padding: 3px 10px; border-bottom: 1px solid #ddd;
text-align: left; } img { max-width: 100%; border: 1px solid #eee; }
.curves { display: grid; grid-template-columns: 1fr 1fr; gap: 0.5em 1.5em; } .curves figure { margin: 0; }
.curves figure.wide { grid-column: 1 / -1; } figcaption { font-size: 12px; }
.status-finished { color: #1a7f37; } .status-failed { color: #cf222e; } .status-interrupted { color: #9a6700; }
pre { background: #f6f8fa; padding: 1em; overflow: auto; font-size: 12px; }
"""


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return html.escape(str(value))


def _table(pairs: list[tuple[str, object]]) -> str:
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{_fmt(v)}</td></tr>" for k, v in pairs)
    return f"<table>{body}</table>"


def _sources_table(sources: dict) -> str:
    if not sources:
        return ""
    head = "<tr><th>source</th><th>samples</th><th>tokens</th><th>skipped</th></tr>"
    body = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{s.get('samples', '')}</td><td>{s.get('tokens', '')}</td>"
        f"<td>{html.escape(json.dumps(s.get('skipped', {})))}</td></tr>"
        for name, s in sources.items()
    )
    return f"<h2>Data sources</h2><table>{head}{body}</table>"


def write_report(run_dir: Path, out_dir: Path | None = None) -> Path:
    """Draw every panel of the run at run_dir and write the page; returns the HTML file's path."""
    from posttrain.metrics.jsonl import read_jsonl
    from posttrain.metrics.progress import format_duration
    from posttrain.metrics.runs import read_run

    run_dir = Path(run_dir)
    metrics_file = run_dir / "metrics.jsonl"
    if not metrics_file.is_file():
        raise PosttrainError(f"{metrics_file} not found: is {run_dir} a run's output_dir?")
    rows = read_jsonl(metrics_file)
    out_dir = Path(out_dir) if out_dir else run_dir / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    run = read_run(run_dir)
    summary = (
        json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
    )

    figures = []
    for panel in panels(rows):
        png = draw(panel, out_dir / f"{panel.name}.png")
        wide = ' class="wide"' if panel.kind == "grid" and len(panel.series) > 1 else ""
        data = base64.b64encode(png.read_bytes()).decode()
        figures.append(
            f'<figure id="{panel.name}"{wide}><img alt="{html.escape(panel.title)}" data-file="{png.name}" '
            f'src="data:image/png;base64,{data}"><figcaption><a href="{png.name}">{png.name}</a>'
            f"</figcaption></figure>"
        )
    facts = [
        ("recipe", run.recipe),
        ("status", run.status),
        ("steps", f"{run.step}/{run.total_steps if run.total_steps is not None else '?'}"),
        ("last loss", run.last_loss if run.last_loss is not None else "-"),
        (
            "best eval",
            "-"
            if run.best_eval is None
            else f"{run.best_eval[0]} {run.best_eval[1]:.6g} at step {run.best_eval[2]}",
        ),
        ("wall time", "-" if run.wall_time_s is None else format_duration(run.wall_time_s)),
        ("tokens seen", summary.get("tokens_seen", "-")),
        (
            "parameters (trainable)",
            f"{summary.get('num_params', '-')} ({summary.get('num_trainable_params', '-')})",
        ),
        ("world size", summary.get("world_size", "-")),
        ("non-finite steps", summary.get("nonfinite_steps", "-")),
        ("HF export", summary.get("hf_dir") or "-"),
        ("output", str(run_dir.resolve())),
    ]
    if run.error:
        facts.append(("error", run.error))
    if run.resume_command:
        facts.append(("resume with", run.resume_command))
    final = {k: v for k, v in summary.get("final", {}).items() if isinstance(v, int | float)}
    config = (run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").is_file() else ""
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>posttrain report: {html.escape(run_dir.name)}</title>
<style>{CSS}</style></head><body>
<h1>{html.escape(run_dir.name)} <small class="status-{run.status}">{run.status}</small></h1>
{_table(facts)}
{"<h2>Final metrics</h2>" + _table(sorted(final.items())) if final else ""}
{_sources_table(summary.get("data_sources", {}))}
<h2>Curves</h2>
<div class="curves">{"".join(figures) if figures else "<p>no metrics logged yet</p>"}</div>
<h2>Config</h2><details><summary>config.yaml</summary><pre>{html.escape(config)}</pre></details>
</body></html>
"""
    index = out_dir / "index.html"
    index.write_text(page)
    return index
