"""Fixtures shared by the end-to-end tests: runs that several test files start from, made once per session.

`make test` runs two pytest workers (pytest-xdist); a session fixture would otherwise run once in each
worker that needs it. The run is made under a file lock in the directory the workers share and read
back by the others (the pattern pytest-xdist documents for once-per-session fixtures)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from filelock import FileLock

from tests.helpers import ROOT


@pytest.fixture(scope="session")
def tiny_events_run(tmp_path_factory, worker_id) -> tuple[Path, dict]:
    """configs/tiny/events.yaml trained once (~1 min on 2 CPU cores): (output dir, summary). Its `hf`
    export is the event model the purchase fine-tune and GRPO over recommended items start from."""
    from posttrain.config import load_job
    from posttrain.recipes import events

    shared = (
        tmp_path_factory.getbasetemp() if worker_id == "master" else tmp_path_factory.getbasetemp().parent
    )
    out = shared / "events-shared" / "tiny"
    with FileLock(str(shared / "events-shared.lock")):
        summary_file = out / "summary.json"
        if not summary_file.is_file():
            overrides = [f"output_dir={out}", "metrics.progress=quiet", "training.eval_every_steps=0"]
            events.train(load_job(ROOT / "configs/tiny/events.yaml", overrides))
        return out, json.loads(summary_file.read_text())
