"""Experiment trackers behind one small protocol, chosen by `metrics.trackers`.

Every tracker receives the same calls, in this order, on rank 0 only:

    log_config(config)            the resolved job config as a dict (once, not again on resume)
    log_metrics(step, metrics)    per optimizer step: loss, lr, grad_norm, tokens_per_s, mfu, ...
    log_eval(step, metrics)       after each evaluation: eval_loss, eval_<metric>, ...
    log_artifact(name, path)      where the final artifacts are (hf, summary, config)
    finish(status)                finished | failed | interrupted

JSONL (OUTPUT/metrics.jsonl) is always on; TensorBoard, MLflow and W&B are imported only when listed,
so `import posttrain` stays light. A tracker that cannot start (package missing, tracking URI
unreachable) raises a TrackerError naming the config key before the first training step; the
package check runs earlier still, when the job's output directory is created (`check_trackers`).

Resuming (`--resume`) continues the same MLflow and W&B runs (their ids are kept in
OUTPUT/trackers.json); TensorBoard drops the events a crashed run wrote after its last checkpoint,
like metrics.jsonl. MLflow and W&B keep both copies of such steps (their stores are append-only).
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import time
from pathlib import Path
from typing import Protocol

from posttrain.config import MetricsConfig
from posttrain.errors import TrackerError
from posttrain.metrics.jsonl import JsonlTracker

IDS_FILE = "trackers.json"  # run ids of the MLflow / W&B runs, for resuming into the same run


class Tracker(Protocol):
    def log_config(self, config: dict) -> None: ...
    def log_metrics(self, step: int, metrics: dict) -> None: ...
    def log_eval(self, step: int, metrics: dict) -> None: ...
    def log_artifact(self, name: str, path: Path) -> None: ...
    def finish(self, status: str = "finished") -> None: ...


# tracker -> (modules it needs, what to install)
REQUIREMENTS = {
    "tensorboard": (("tensorboard",), "tensorboard"),
    "mlflow": (("mlflow", "sqlalchemy", "alembic"), "mlflow-skinny sqlalchemy alembic"),
    "wandb": (("wandb",), "wandb"),
}


def check_trackers(cfg: MetricsConfig) -> None:
    """Fail now, naming the key and the package, when a listed tracker's package is not installed."""
    for name in dict.fromkeys(cfg.trackers):
        if name == "jsonl":
            continue
        modules, pip = REQUIREMENTS[name]
        missing = [m for m in modules if importlib.util.find_spec(m) is None]
        if missing:
            raise TrackerError(
                f"metrics.trackers lists {name!r}, but {', '.join(missing)} is not installed: "
                f"pip install {pip}  (or pip install 'posttrain[trackers]')"
            )


def numeric(metrics: dict) -> dict[str, float]:
    """The values a tracker can plot (numbers and bools), as floats."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}


def flatten(config: dict, prefix: str = "") -> dict[str, str]:
    """{"optim": {"lr": 1e-3}} -> {"optim.lr": "0.001"} (lists as JSON), for trackers' flat params."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value if isinstance(value, str) else json.dumps(value)
    return flat


class Trackers:
    """All open trackers of a run, called together; `finish` is idempotent."""

    def __init__(self, trackers: list[Tracker]):
        self.trackers = list(trackers)

    def log_config(self, config: dict) -> None:
        for t in self.trackers:
            t.log_config(config)

    def log_metrics(self, step: int, metrics: dict) -> None:
        for t in self.trackers:
            t.log_metrics(step, metrics)

    def log_eval(self, step: int, metrics: dict) -> None:
        for t in self.trackers:
            t.log_eval(step, metrics)

    def log_artifact(self, name: str, path: Path) -> None:
        for t in self.trackers:
            t.log_artifact(name, path)

    def finish(self, status: str = "finished") -> None:
        trackers, self.trackers = self.trackers, []
        for t in trackers:
            t.finish(status)


# ------------------------------------------------------------------------------ TensorBoard


class TensorBoardTracker:
    """Scalars under their metric names (`loss`, `eval_loss`, `samples/<source>`), the config as text."""

    def __init__(self, log_dir: Path, resume_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: events at steps > resume_step (logged after the last checkpoint) are dropped.
        purge = None if resume_step is None else resume_step + 1
        self.writer = SummaryWriter(str(log_dir), purge_step=purge)

    def log_config(self, config: dict) -> None:
        import yaml

        text = yaml.safe_dump(config, sort_keys=False)
        self.writer.add_text("config", "".join(f"    {line}\n" for line in text.splitlines()), 0)

    def log_metrics(self, step: int, metrics: dict) -> None:
        for key, value in numeric(metrics).items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    log_eval = log_metrics

    def log_artifact(self, name: str, path: Path) -> None:
        self.writer.add_text(f"artifacts/{name}", str(path), 0)

    def finish(self, status: str = "finished") -> None:
        self.writer.add_text("status", status, 0)
        self.writer.close()


# ------------------------------------------------------------------------------ MLflow

MLFLOW_STATUS = {"finished": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}
MLFLOW_KEY = re.compile(r"[^\w\-. /]")  # characters MLflow refuses in metric and param names
ARTIFACT_MAX_BYTES = 16 * 2**20  # files up to this size are copied into MLflow; larger: location only


class MLflowTracker:
    """One MLflow run: params are the flattened config, metrics carry their step, the config and
    summary are stored as artifacts and each artifact's location as a tag (`artifact.<name>`)."""

    def __init__(self, client, run_id: str):
        self.client, self.run_id = client, run_id

    @classmethod
    def open(cls, cfg, out_dir: Path, resume_step: int | None, ids: dict) -> MLflowTracker:
        from mlflow import MlflowClient

        uri = cfg.tracking_uri or f"sqlite:///{(out_dir / 'mlflow.db').resolve()}"
        client = MlflowClient(tracking_uri=uri)
        if resume_step is not None and ids.get("mlflow_run_id"):
            run_id = ids["mlflow_run_id"]
            client.update_run(run_id, status="RUNNING")
            return cls(client, run_id)
        exp = client.get_experiment_by_name(cfg.experiment_name)
        if exp is not None:
            exp_id = exp.experiment_id
        else:
            location = cfg.artifact_location or (out_dir / "mlflow-artifacts").resolve().as_uri()
            exp_id = client.create_experiment(cfg.experiment_name, artifact_location=location)
        tags = {"posttrain.output_dir": str(out_dir.resolve())}
        run = client.create_run(exp_id, run_name=cfg.run_name or out_dir.resolve().name, tags=tags)
        return cls(client, run.info.run_id)

    def log_config(self, config: dict) -> None:
        import yaml
        from mlflow.entities import Param

        params = [Param(MLFLOW_KEY.sub("_", k), v[:6000]) for k, v in flatten(config).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i : i + 100])
        self.client.log_text(self.run_id, yaml.safe_dump(config, sort_keys=False), "config.yaml")

    def log_metrics(self, step: int, metrics: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [
            Metric(MLFLOW_KEY.sub("_", k), v, now, step)
            for k, v in numeric(metrics).items()
            if not math.isinf(v)
        ]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[i : i + 1000])

    log_eval = log_metrics

    def log_artifact(self, name: str, path: Path) -> None:
        path = Path(path)
        self.client.set_tag(self.run_id, f"artifact.{name}", str(path.resolve()))
        if path.is_file() and path.stat().st_size <= ARTIFACT_MAX_BYTES:
            self.client.log_artifact(self.run_id, str(path))

    def finish(self, status: str = "finished") -> None:
        self.client.set_terminated(self.run_id, status=MLFLOW_STATUS.get(status, "FAILED"))


# ------------------------------------------------------------------------------ W&B


class WandbTracker:
    """A W&B run under OUTPUT/wandb (offline by default: `wandb sync OUTPUT/wandb/offline-run-*`)."""

    def __init__(self, run):
        self.run = run

    @classmethod
    def open(cls, cfg, out_dir: Path, resume_step: int | None, ids: dict) -> WandbTracker:
        import wandb

        run_id = ids.get("wandb_run_id") if resume_step is not None else None
        run = wandb.init(
            mode=cfg.mode,
            project=cfg.project,
            entity=cfg.entity,
            name=cfg.run_name or out_dir.resolve().name,
            dir=str(out_dir),
            id=run_id,
            resume="allow" if run_id else None,
            reinit="create_new",  # several jobs in one process (the demo, tests) get a run each
            settings=wandb.Settings(console="off", silent=True, save_code=False, disable_git=True),
        )
        return cls(run)

    def log_config(self, config: dict) -> None:
        self.run.config.update(config, allow_val_change=True)

    def log_metrics(self, step: int, metrics: dict) -> None:
        self.run.log(numeric(metrics), step=step)

    log_eval = log_metrics

    def log_artifact(self, name: str, path: Path) -> None:
        self.run.summary[f"artifacts/{name}"] = str(Path(path).resolve())

    def finish(self, status: str = "finished") -> None:
        self.run.finish(exit_code=0 if status == "finished" else 1)


# ------------------------------------------------------------------------------ opening


def _open_tensorboard(metrics: MetricsConfig, out_dir: Path, resume_step, ids) -> Tracker:
    return TensorBoardTracker(Path(metrics.tensorboard.log_dir or out_dir / "tensorboard"), resume_step)


def _open_mlflow(metrics: MetricsConfig, out_dir: Path, resume_step, ids) -> Tracker:
    tracker = MLflowTracker.open(metrics.mlflow, out_dir, resume_step, ids)
    ids["mlflow_run_id"] = tracker.run_id
    return tracker


def _open_wandb(metrics: MetricsConfig, out_dir: Path, resume_step, ids) -> Tracker:
    tracker = WandbTracker.open(metrics.wandb, out_dir, resume_step, ids)
    ids["wandb_run_id"] = tracker.run.id
    return tracker


# tracker name -> (opener, the config key to name when it fails)
OPENERS = {
    "tensorboard": (_open_tensorboard, "metrics.tensorboard.log_dir"),
    "mlflow": (_open_mlflow, "metrics.mlflow.tracking_uri"),
    "wandb": (_open_wandb, "metrics.wandb"),
}


def open_trackers(
    metrics: MetricsConfig, out_dir: Path, config: dict, resume_step: int | None = None
) -> Trackers:
    """metrics.jsonl plus every tracker `metrics.trackers` lists, started now (rank 0 only).

    resume_step: the step a resumed run continues from (None for a fresh run)."""
    out_dir = Path(out_dir)
    check_trackers(metrics)
    ids_path = out_dir / IDS_FILE
    ids = json.loads(ids_path.read_text()) if ids_path.is_file() else {}
    opened: list[Tracker] = [JsonlTracker(out_dir / "metrics.jsonl", resume_step=resume_step)]
    for name in dict.fromkeys(metrics.trackers):
        if name == "jsonl":
            continue
        opener, key = OPENERS[name]
        try:
            opened.append(opener(metrics, out_dir, resume_step, ids))
        except Exception as err:
            Trackers(opened).finish("failed")
            raise TrackerError(f"tracker {name!r} could not start (check {key}): {err}") from err
    if len(opened) > 1:
        ids_path.write_text(json.dumps(ids, indent=2) + "\n")
    trackers = Trackers(opened)
    if resume_step is None:
        trackers.log_config(config)
    return trackers
