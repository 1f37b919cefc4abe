"""Full-state checkpoints through torch.distributed.checkpoint (DCP), for one process or many.

A checkpoint is a folder `OUTPUT/checkpoints/step_000123/`:

  .metadata, __*_*.distcp   model and optimizer state in DCP's format, written by every rank in
                            parallel (each its own shards) and loadable on ANY world size: DCP
                            reshards on load, so a run saved on 2 ranks resumes on 1 and the reverse
  trainer.pt                step, counters, the data state (with `data.shard_by: rows` it is the same
                            on every rank), the world size it was saved on
  rank_<r>.pt               rank r's RNG states (and its data state with `data.shard_by: samples`)
  config.yaml               the resolved job config

Atomicity: everything is written into `.tmp_step_000123/`; only when every rank has finished does
rank 0 rename it to `step_000123/` (a rename is atomic on one filesystem). A process killed mid-write
leaves a temporary folder that is never listed and is removed by the next save, so the previous
checkpoint stays the latest complete one. Only the newest `keep_last` are kept.

Single-process runs use the same format (DCP runs without a process group).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

PREFIX = "step_"
TRAINER_FILE = "trainer.pt"
FAULT_ENV = "POSTTRAIN_FAULT"  # test hook: "checkpoint_write:STEP" SIGKILLs rank 0 mid-write at STEP


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def fault_point(name: str, step: int) -> None:
    """Kill this process here if the POSTTRAIN_FAULT test hook names this point (first attempt only)."""
    spec = os.environ.get(FAULT_ENV, "")
    if spec != f"{name}:{step}" or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        return
    if int(os.environ.get("RANK", "0")) == int(os.environ.get("POSTTRAIN_FAULT_RANK", "0")):
        os.kill(os.getpid(), signal.SIGKILL)


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def save_checkpoint(
    root: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict,
    rank_state: dict,
    config_yaml: str,
    keep_last: int,
    progress: str = "quiet",
) -> Path:
    """Write checkpoint `step` from every rank (a collective call), atomically; prune old ones.
    `progress`: a progress mode for rank 0 (posttrain/metrics/progress.py), in parts written."""
    from posttrain.metrics.progress import Progress

    rank = _rank()
    shown = Progress(3, f"checkpoint step {step}", progress if rank == 0 else "quiet", unit="parts")
    final, tmp = root / f"{PREFIX}{step:06d}", root / f".tmp_{PREFIX}{step:06d}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        for stale in root.glob(f".tmp_{PREFIX}*"):  # left by a process killed mid-write
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
    with warnings.catch_warnings():  # single process: DCP notes it runs without a process group
        warnings.filterwarnings("ignore", message=".*assuming the intent is to")
        dcp.save(state, checkpoint_id=str(tmp))
    shown.advance()  # model and optimizer shards
    torch.save({"rng": rng_state(), **rank_state}, tmp / f"rank_{rank}.pt")
    fault_point("checkpoint_write", step)
    if rank == 0:
        torch.save(trainer_state, tmp / TRAINER_FILE)
        (tmp / "config.yaml").write_text(config_yaml)
    shown.advance()  # trainer, data and RNG state
    _barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in list_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    shown.advance()  # renamed into place
    shown.close()
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders are never listed)."""
    if not root.is_dir():
        return []
    return sorted(
        p
        for p in root.iterdir()
        if p.is_dir()
        and p.name.startswith(PREFIX)
        and (p / TRAINER_FILE).is_file()
        and (p / ".metadata").is_file()
    )


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def load_into(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Load model and optimizer (resharded to this world), return (trainer state, this rank's state).

    A rank that did not exist when the checkpoint was written (resuming on more ranks) takes rank 0's
    RNG states; with `data.shard_by: rows` the data state is in the trainer state and fits any world."""
    state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to")
        dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optimizer"])
    rank_file = path / f"rank_{_rank()}.pt"
    if not rank_file.is_file():
        rank_file = path / "rank_0.pt"
    # weights_only=False: Python RNG tuples and the data state's lists.
    trainer_state = torch.load(path / TRAINER_FILE, map_location="cpu", weights_only=False)
    rank_state = torch.load(rank_file, map_location="cpu", weights_only=False)
    return trainer_state, rank_state


def load_checkpoint(path: Path) -> dict:
    """A checkpoint as plain data in one process (for inspection and tests): {"model": {name: tensor},
    "optimizer": ..., **trainer state}. Reads the whole checkpoint into memory."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        flat = Path(tmp) / "state.pt"
        dcp_to_torch_save(str(path), str(flat))
        state = torch.load(flat, map_location="cpu", weights_only=False)
    trainer_state = torch.load(path / TRAINER_FILE, map_location="cpu", weights_only=False)
    return {**state, **trainer_state}
