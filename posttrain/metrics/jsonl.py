"""The always-on tracker: one JSON object per optimizer step in `OUTPUT/metrics.jsonl`.

Other trackers (TensorBoard, MLflow, W&B) follow the same small protocol and are imported only
when a config asks for them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Protocol


class Tracker(Protocol):
    def log(self, metrics: dict, step: int) -> None: ...
    def close(self) -> None: ...


def _clean(value):
    """JSON has no NaN/inf: write them as strings so a bad step is still visible in the file."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class JsonlTracker:
    """Writes `metrics.jsonl`. A run resumed at step k keeps the records up to k and drops the
    ones a crashed run logged after its last checkpoint, so no step appears twice."""

    def __init__(self, path: Path, resume_step: int | None = None):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        kept = []
        if resume_step is not None and path.is_file():
            kept = [r for r in read_jsonl(path) if r.get("step", 0) <= resume_step]
        self._f = path.open("w")
        for record in kept:
            self._f.write(json.dumps(record) + "\n")

    def log(self, metrics: dict, step: int) -> None:
        record = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
