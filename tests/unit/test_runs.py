"""`posttrain runs`: status of each run from status.json / summary.json / metrics.jsonl, liveness of a
`running` status, best eval, and the exact resume command of an interrupted or failed run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from posttrain.cli import main
from posttrain.metrics import runs


def make_run(
    root: Path, name: str, rows: list[dict], *, max_steps: int = 4, checkpoint: bool = False
) -> Path:
    out = root / name
    out.mkdir(parents=True)
    (out / "config.yaml").write_text(
        f"recipe: sft\noutput_dir: {out}\ntraining: {{max_steps: {max_steps}}}\n"
    )
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if checkpoint:
        (out / "checkpoints" / "step_000002").mkdir(parents=True)
    return out


def steps(n: int, eval_at=()) -> list[dict]:
    rows = []
    for s in range(1, n + 1):
        rows.append({"step": s, "loss": 3.0 - 0.5 * s})
        if s in eval_at:
            rows.append({"step": s, "eval_loss": {2: 2.5, 4: 2.25, 6: 2.4}[s]})
    return rows


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.fixture
def root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the runs' recorded working directory is this one
    root = tmp_path / "runs"
    done = make_run(root, "done", steps(4, eval_at=(2, 4)))
    runs.mark_started(done, "sft")
    runs.mark_step(done, 4, 4)
    runs.mark_ended(done, "finished")
    status = runs.read_status(done)
    status["started_at"] = status["ended_at"] - 75.0  # the job took 75 s from start to end
    (done / runs.STATUS_FILE).write_text(json.dumps(status))
    (done / "summary.json").write_text(json.dumps({"status": "finished", "steps": 4, "wall_time_s": 70.0}))

    crashed = make_run(root, "nested/crashed", steps(3, eval_at=(2,)), max_steps=6, checkpoint=True)
    runs.mark_started(crashed, "sft", world_size=2)
    runs.mark_step(crashed, 3, 6)
    status = runs.read_status(crashed)
    status["pid"] = dead_pid()  # the process is gone without a word (SIGKILL, OOM killer)
    (crashed / runs.STATUS_FILE).write_text(json.dumps(status))

    failed = make_run(root, "failed", steps(2), checkpoint=True)
    runs.mark_started(failed, "dpo")
    runs.mark_step(failed, 2, 4)
    runs.mark_ended(failed, "failed", ValueError("loss is nan"))

    live = make_run(root, "live", steps(1))
    runs.mark_started(live, "sft")  # this process: alive
    runs.mark_step(live, 1, 4)

    ctrl_c = make_run(root, "ctrl_c", steps(1))  # interrupted before any checkpoint
    runs.mark_started(ctrl_c, "sft")
    runs.mark_ended(ctrl_c, runs.end_status(KeyboardInterrupt()), KeyboardInterrupt())
    return root


def test_statuses_steps_losses_and_best_eval(root):
    found = {Path(r.path).relative_to(root).as_posix(): r for r in runs.find_runs(root)}
    assert sorted(found) == ["ctrl_c", "done", "failed", "live", "nested/crashed"]
    assert {k: r.status for k, r in found.items()} == {
        "ctrl_c": "interrupted",
        "done": "finished",
        "failed": "failed",
        "live": "running",
        "nested/crashed": "interrupted",
    }
    done, crashed = found["done"], found["nested/crashed"]
    assert (done.step, done.total_steps, done.last_loss, done.wall_time_s) == (4, 4, 1.0, 75.0)
    assert done.best_eval == ("eval_loss", 2.25, 4) and done.resume_command is None
    assert (crashed.step, crashed.total_steps, crashed.last_loss) == (3, 6, 1.5)
    assert crashed.best_eval == ("eval_loss", 2.5, 2)
    assert crashed.resume_command == "posttrain run runs/nested/crashed/config.yaml --resume --nproc 2"
    assert found["failed"].error == "ValueError: loss is nan"
    assert found["failed"].resume_command == "posttrain run runs/failed/config.yaml --resume"
    assert found["ctrl_c"].resume_command is None and found["live"].resume_command is None


def test_resume_command_from_another_directory_changes_there_first(root, tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    run = runs.read_run(root / "nested" / "crashed")
    assert (
        run.resume_command
        == f"cd {tmp_path} && posttrain run runs/nested/crashed/config.yaml --resume --nproc 2"
    )


def test_a_run_on_another_host_is_running_until_its_status_goes_stale(root):
    out = root / "live"
    status = runs.read_status(out)
    status["host"] = socket.gethostname() + "-other"
    (out / runs.STATUS_FILE).write_text(json.dumps(status))
    assert runs.read_run(out).status == "running"
    status["updated_at"] = time.time() - runs.STALE_AFTER_S - 1
    (out / runs.STATUS_FILE).write_text(json.dumps(status))
    assert runs.read_run(out).status == "interrupted"


def test_a_reused_pid_is_not_taken_for_the_run(root):
    out = root / "live"
    status = runs.read_status(out)
    assert status["pid"] == os.getpid() and runs.read_run(out).status == "running"
    status["pid_start"] = "1"  # same pid, different process start time
    (out / runs.STATUS_FILE).write_text(json.dumps(status))
    assert runs.read_run(out).status == "interrupted"


def test_cli_table_and_json(root, capsys):
    assert main(["runs", str(root)]) == 0
    out = capsys.readouterr().out
    lines = {line.split("│")[1].strip(): line for line in out.splitlines() if line.count("│") > 5}
    assert set(lines) == {"ctrl_c", "done", "failed", "live", "nested/crashed"}
    assert "finished" in lines["done"] and "4/4" in lines["done"] and "eval_loss 2.25 @4" in lines["done"]
    assert (
        "1m15s" in lines["done"]
        and "interrupted" in lines["nested/crashed"]
        and "3/6" in lines["nested/crashed"]
    )
    assert (
        f"resume {root / 'nested/crashed'}:  posttrain run runs/nested/crashed/config.yaml --resume --nproc 2"
        in out
    )
    assert f"{root / 'ctrl_c'} cannot resume: no checkpoint was written" in out
    assert main(["runs", str(root), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["path"], r["status"], r["step"]) for r in rows][:2] == [
        (str(root / "ctrl_c"), "interrupted", 1),
        (str(root / "done"), "finished", 4),
    ]


def test_no_runs(tmp_path, capsys):
    assert main(["runs", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == f"no runs under {tmp_path}"


def test_a_run_without_status_file_is_running_while_its_metrics_change(tmp_path):
    out = make_run(tmp_path, "plain", steps(2))  # written by code that keeps no status.json
    assert runs.read_run(out).status == "running"
    old = time.time() - runs.STALE_AFTER_S - 1
    for name in ("metrics.jsonl", "config.yaml"):
        os.utime(out / name, (old, old))
    assert runs.read_run(out).status == "interrupted"
    (out / "summary.json").write_text(json.dumps({"status": "finished", "steps": 2, "wall_time_s": 9.5}))
    assert runs.read_run(out).status == "finished" and runs.read_run(out).wall_time_s == 9.5


def test_a_finished_run_resumed_for_more_steps_is_running_again(root):
    out = root / "done"
    runs.mark_started(out, "sft")  # `--resume training.max_steps=8` in the same folder
    run = runs.read_run(out)
    assert (run.status, run.step) == ("running", 4)  # summary.json of the first run is stale
