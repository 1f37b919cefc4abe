"""One run's lifecycle, the same for every recipe (SFT, pretraining, DPO, RM, distillation, events, GRPO).

A `Run` owns what a user reads in OUTPUT/ while and after a job runs:

* config.yaml (the validated job, written first) and status.json (started -> step -> finished/failed,
  read by `posttrain runs`);
* the trackers (metrics.jsonl always; those of `metrics.trackers`), opened once the resume step is known;
* summary.json at the end, with the final artifacts handed to the trackers.

`Run.loop` is the one loop skeleton: it calls the recipe's step function for steps start+1..total and
owns the cadence (log on training.log_every_steps and the last step, evaluate on eval_every_steps,
checkpoint on save_every_steps, one final evaluation unless the last step just had one), so no recipe
re-implements it. The Trainer's fit() steps an optimizer over a loader with it; GRPO steps its
controller. Only rank 0 writes files; the other ranks run the same calls quietly.

Used as a context manager, a run that raises is marked as failed (or interrupted) in status.json and its
trackers are closed with that status.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from posttrain.config import MetricsConfig, TrainingConfig
from posttrain.metrics import runs
from posttrain.metrics.progress import Progress
from posttrain.metrics.trackers import Trackers, check_trackers, open_trackers

StepFn = Callable[[int], dict]  # step number (1-based) -> that step's metrics


class Run:
    """OUTPUT/ of one job on this process; see the module docstring."""

    def __init__(
        self,
        output_dir: str | Path,
        recipe: str,
        config_yaml: str,
        metrics: MetricsConfig,
        *,
        is_main: bool = True,
        world_size: int = 1,
    ):
        check_trackers(metrics)  # a missing tracker package fails before anything is written
        self.out, self.recipe, self.config_yaml = Path(output_dir), recipe, config_yaml
        self.metrics, self.is_main = metrics, is_main
        self.progress_mode = metrics.progress if is_main else "quiet"
        self.trackers = Trackers([])
        self.t0 = time.perf_counter()
        if is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(config_yaml)
            runs.mark_started(self.out, recipe, world_size)

    @property
    def elapsed_s(self) -> float:
        return time.perf_counter() - self.t0

    def __enter__(self) -> Run:
        return self

    def __exit__(self, exc_type, err, tb) -> None:
        if err is not None:
            self.fail(err)

    # ------------------------------------------------------------------------------ tracking
    def open(self, resume_step: int | None = None) -> None:
        """Start the trackers (rank 0); resume_step: the step a resumed run continues from. A tracker
        that cannot start fails here, before the first step."""
        if self.is_main:
            config = yaml.safe_load(self.config_yaml) or {}
            self.trackers = open_trackers(self.metrics, self.out, config, resume_step)

    def log(self, step: int, total_steps: int, metrics: dict) -> None:
        self.trackers.log_metrics(step, metrics)
        if self.is_main:
            runs.mark_step(self.out, step, total_steps)

    def log_eval(self, step: int, metrics: dict) -> None:
        self.trackers.log_eval(step, metrics)

    # ------------------------------------------------------------------------------ the loop
    def loop(
        self,
        training: TrainingConfig,
        *,
        start: int,
        total: int,
        step: StepFn,
        evaluate: Callable[[], dict] | None = None,
        save: Callable[[], object] | None = None,
        label: str = "train",
        show: Callable[[dict], dict] = lambda metrics: {},
    ) -> tuple[dict, dict]:
        """Steps start+1..total on the training section's cadence (module docstring); `show` picks the
        values the progress line prints. Returns (the last step's metrics, the last evaluation's)."""
        progress = Progress(
            total, label, self.progress_mode, every_s=self.metrics.progress_every_s, start=start
        )
        every_eval = training.eval_every_steps
        metrics: dict = {}
        eval_metrics: dict = {}
        try:
            for n in range(start + 1, total + 1):
                metrics = step(n)
                if n % training.log_every_steps == 0 or n == total:
                    self.log(n, total, metrics)
                if evaluate and every_eval and n % every_eval == 0:
                    eval_metrics = evaluate()
                    self.log_eval(n, eval_metrics)
                progress.update(n, **show(metrics))
                if save and training.save_every_steps and n % training.save_every_steps == 0:
                    save()
            if evaluate and not (every_eval and total % every_eval == 0):
                eval_metrics = evaluate()
                self.log_eval(total, eval_metrics)
        finally:
            progress.close()
        return metrics, eval_metrics

    # ------------------------------------------------------------------------------ the end
    def finish(self, summary: dict, artifacts: dict[str, str | Path | None] | None = None) -> dict:
        """summary.json (rank 0), the artifacts' locations to the trackers, status finished."""
        if self.is_main:
            write_summary(self.out, summary)
        files = {"summary": self.out / "summary.json", "config": self.out / "config.yaml"}
        for name, path in {**(artifacts or {}), **files}.items():
            if path is not None and Path(path).exists():
                self.trackers.log_artifact(name, Path(path))
        self.trackers.finish("finished")
        if self.is_main:
            runs.mark_ended(self.out, "finished")
        return summary

    def fail(self, err: BaseException) -> None:
        """Close the trackers and mark status.json with how the run ended (failed, interrupted)."""
        status = runs.end_status(err)
        self.trackers.finish(status)
        if self.is_main and self.out.is_dir():
            runs.mark_ended(self.out, status, err)


def write_summary(out_dir: Path, summary: dict) -> Path:
    path = Path(out_dir) / "summary.json"
    path.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return path
