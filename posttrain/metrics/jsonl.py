"""The always-on tracker: one JSON object per optimizer step in `OUTPUT/metrics.jsonl`, and one per
evaluation (`{"step": s, "eval_loss": ..., ...}`: eval rows carry `eval_*` keys and no `loss`).

It follows the small `Tracker` protocol of posttrain/metrics/trackers.py; the other trackers
(TensorBoard, MLflow, W&B) are imported only when `metrics.trackers` lists them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path


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

    def log_config(self, config: dict) -> None:
        """Nothing to do: the resolved config is already OUTPUT/config.yaml."""

    def log_metrics(self, step: int, metrics: dict) -> None:
        record = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()

    def log_eval(self, step: int, metrics: dict) -> None:
        self.log_metrics(step, metrics)

    def log_artifact(self, name: str, path: Path) -> None:
        """Nothing to do: summary.json records where the artifacts are."""

    def finish(self, status: str = "finished") -> None:
        if not self._f.closed:
            self._f.close()

    # The first API (kept for callers written against it): log(metrics, step), close().
    def log(self, metrics: dict, step: int) -> None:
        self.log_metrics(step, metrics)

    def close(self) -> None:
        self.finish()


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
