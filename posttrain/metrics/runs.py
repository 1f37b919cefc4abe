"""Run status and `posttrain runs [DIR]`: which runs exist under a folder, how far each got, and the
one command that resumes an interrupted one.

Rank 0 keeps `OUTPUT/status.json` up to date: `running` when the output directory is created (with
the process id, host, working directory and world size), the step after each logged step,
and `finished`, `failed` (with the error) or `interrupted` (Ctrl-C) when the job ends. A process that
dies without a word (SIGKILL, OOM killer, a lost node) leaves `running` behind: on the same host a
dead process id reads as `interrupted`; for another host, a status not updated for
`STALE_AFTER_S` seconds does.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

STATUS_FILE = "status.json"
STALE_AFTER_S = 1800.0  # another host's run whose status is this old is taken as interrupted
STATUSES = ("running", "finished", "failed", "interrupted")


def end_status(err: BaseException) -> str:
    """The status a job ends with when `err` stops it."""
    return "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _write(out_dir: Path, status: dict) -> None:
    path = Path(out_dir) / STATUS_FILE
    tmp = path.with_name(f".{STATUS_FILE}.tmp")
    tmp.write_text(json.dumps(status, indent=2, default=str) + "\n")
    tmp.replace(path)  # atomic: a reader never sees half a file


def read_status(out_dir: Path) -> dict:
    path = Path(out_dir) / STATUS_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def mark_started(out_dir: Path, recipe: str, world_size: int = 1) -> None:
    """A job starts writing into out_dir (rank 0)."""
    pid = os.getpid()
    now = time.time()
    _write(
        out_dir,
        {
            "status": "running",
            "recipe": recipe,
            "pid": pid,
            "pid_start": _process_start(pid),
            "host": socket.gethostname(),
            "cwd": os.getcwd(),
            "world_size": world_size,
            "started_at": now,
            "updated_at": now,
            "step": 0,  # a resumed run reports its step after the first one it logs
        },
    )


def mark_step(out_dir: Path, step: int, total_steps: int) -> None:
    status = read_status(out_dir)
    status.update(step=step, total_steps=total_steps, updated_at=time.time())
    status.setdefault("status", "running")
    _write(out_dir, status)


def mark_ended(out_dir: Path, status: str, error: BaseException | None = None) -> None:
    current = read_status(out_dir)
    current.update(status=status, updated_at=time.time(), ended_at=time.time())
    if error is not None:
        current["error"] = f"{type(error).__name__}: {error}"[:2000]
    else:
        current.pop("error", None)
    _write(out_dir, current)


def _alive(status: dict, out_dir: Path) -> bool:
    """Is the process that wrote a `running` status still there? A run without status.json (written by
    code that does not keep one) counts as running while its metrics.jsonl changed recently."""
    if not status:
        files = [f for f in (out_dir / "metrics.jsonl", out_dir / "config.yaml") if f.is_file()]
        return bool(files) and time.time() - max(f.stat().st_mtime for f in files) < STALE_AFTER_S
    if status.get("host") != socket.gethostname():
        return time.time() - status.get("updated_at", 0) < STALE_AFTER_S
    pid = status.get("pid")
    if not pid:
        return False
    start = _process_start(pid)
    if start is None:
        return False
    return status.get("pid_start") in (None, start)


# ------------------------------------------------------------------------------ listing


@dataclass
class RunInfo:
    path: str  # the output directory
    recipe: str
    status: str  # running | finished | failed | interrupted
    step: int  # optimizer steps done
    total_steps: int | None
    last_loss: float | None
    best_eval: tuple[str, float, int] | None  # (metric, value, step)
    wall_time_s: float | None
    has_checkpoint: bool
    resume_command: str | None  # for interrupted or failed runs with a checkpoint
    error: str | None


def _rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a crash mid-write
            continue
    return rows


def _number(value) -> float | None:
    """A logged value as a float: non-finite ones are written as the strings "nan", "inf", "-inf"."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def best_eval(rows: list[dict]) -> tuple[str, float, int] | None:
    """The lowest eval_loss (with its step); without one, the highest eval_accuracy / eval_reward/mean."""
    for key, pick in (("eval_loss", min), ("eval_accuracy", max), ("eval_reward/mean", max)):
        found = [(r[key], r["step"]) for r in rows if isinstance(r.get(key), int | float)]
        if found:
            value, step = pick(found, key=lambda x: x[0])
            return key, float(value), int(step)
    return None


def resume_command(out_dir: Path, status: dict) -> str:
    """The command that continues this run from its latest checkpoint, from the directory it ran in."""
    config = Path(out_dir) / "config.yaml"
    cwd = status.get("cwd")
    if cwd:
        try:
            config = config.resolve().relative_to(Path(cwd).resolve())
        except ValueError:
            config = config.resolve()
    cmd = f"posttrain run {shlex.quote(str(config))} --resume"
    if status.get("world_size", 1) > 1:
        cmd += f" --nproc {status['world_size']}"
    return f"cd {shlex.quote(cwd)} && {cmd}" if cwd and Path(cwd).resolve() != Path.cwd().resolve() else cmd


def read_run(out_dir: Path) -> RunInfo:
    out_dir = Path(out_dir)
    status = read_status(out_dir)
    summary = (
        json.loads((out_dir / "summary.json").read_text()) if (out_dir / "summary.json").is_file() else {}
    )
    rows = _rows(out_dir / "metrics.jsonl")
    steps = [r for r in rows if "loss" in r]
    config = _config(out_dir)
    # status.json is the latest word (a run resumed in a finished run's folder is running again);
    # runs written by code that keeps none are finished once their summary says so.
    if status.get("status"):
        state = status["status"]
    else:
        state = "finished" if summary.get("status") == "finished" else "running"
    if state == "running" and not _alive(status, out_dir):
        state = "interrupted"
    total = status.get("total_steps") or config.get("training", {}).get("max_steps")
    step = max([status.get("step", 0), summary.get("steps", 0), *(r["step"] for r in steps)])
    if status.get("started_at"):
        wall = status.get("ended_at", status.get("updated_at", time.time())) - status["started_at"]
    else:
        wall = summary.get("wall_time_s")
    ckpts = out_dir / "checkpoints"
    has_ckpt = ckpts.is_dir() and any(p.name.startswith("step_") for p in ckpts.iterdir())
    resumable = state in ("interrupted", "failed") and has_ckpt
    return RunInfo(
        path=str(out_dir),
        recipe=status.get("recipe") or summary.get("recipe") or config.get("recipe", "?"),
        status=state,
        step=int(step),
        total_steps=total,
        last_loss=_number(steps[-1]["loss"]) if steps else None,
        best_eval=best_eval(rows),
        wall_time_s=wall,
        has_checkpoint=has_ckpt,
        resume_command=resume_command(out_dir, status) if resumable else None,
        error=status.get("error"),
    )


def _config(out_dir: Path) -> dict:
    import yaml

    try:
        return yaml.safe_load((out_dir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}


SKIP_DIRS = {"checkpoints", "hf", "adapter", "tensorboard", "wandb", "mlflow-artifacts", "report", "data"}


def find_runs(root: Path) -> list[RunInfo]:
    """Every run directory (one with config.yaml and metrics.jsonl or status.json) under root."""
    root = Path(root)
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        if "config.yaml" in filenames and ({"metrics.jsonl", STATUS_FILE} & set(filenames)):
            found.append(read_run(Path(dirpath)))
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
    return sorted(found, key=lambda r: r.path)


# ------------------------------------------------------------------------------ the table


def _cells(run: RunInfo, root: Path) -> list[str]:
    from posttrain.metrics.progress import format_duration

    try:
        name = str(Path(run.path).relative_to(root)) or "."
    except ValueError:
        name = run.path
    total = "?" if run.total_steps is None else str(run.total_steps)
    best = "-" if run.best_eval is None else f"{run.best_eval[0]} {run.best_eval[1]:.4g} @{run.best_eval[2]}"
    return [
        name,
        run.recipe,
        run.status,
        f"{run.step}/{total}",
        "-" if run.last_loss is None else f"{run.last_loss:.4g}",
        best,
        "-" if run.wall_time_s is None else format_duration(run.wall_time_s),
        run.path,
    ]


HEADER = ["run", "recipe", "status", "steps", "last loss", "best eval", "wall time", "output"]


def print_runs(root: Path, as_json: bool = False) -> int:
    """The table (or JSON lines) of the runs under root, then the resume command of each resumable run."""
    runs = find_runs(root)
    if as_json:
        for run in runs:
            print(json.dumps(asdict(run)))
        return 0
    if not runs:
        print(f"no runs under {root}")
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"runs under {root}")
    colors = {"finished": "green", "running": "cyan", "failed": "red", "interrupted": "yellow"}
    for head in HEADER:
        table.add_column(head, no_wrap=head in ("status", "steps", "output"))
    for run in runs:
        cells = _cells(run, Path(root))
        cells[2] = f"[{colors[run.status]}]{run.status}[/]"
        table.add_row(*cells)
    console = Console()
    if not console.is_terminal:  # logs and pipes: never cut a path to fit an assumed 80 columns
        console = Console(width=1000)
    console.print(table)
    for run in runs:
        if run.resume_command:
            console.print(f"resume {run.path}:  {run.resume_command}", markup=False, highlight=False)
        elif run.status in ("failed", "interrupted"):
            why = "no checkpoint was written (training.save_every_steps)"
            console.print(f"{run.path} cannot resume: {why}", markup=False, highlight=False)
    return 0
