"""Full-state checkpoints for single-process runs: model, optimizer, step, data state, RNG.

Each checkpoint is a folder `OUTPUT/checkpoints/step_000123/` holding `state.pt` and the resolved
`config.yaml`. It is written into a temporary folder and renamed into place, so a process killed
mid-write leaves the previous checkpoint intact; only the newest `keep_last` are kept.
(Distributed runs use torch.distributed.checkpoint instead; see the distributed issue.)
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import torch

PREFIX = "step_"


def rng_state() -> dict:
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def save_checkpoint(root: Path, step: int, state: dict, config_yaml: str, keep_last: int) -> Path:
    """Write `state` atomically as checkpoint `step`, then prune old ones."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:06d}"
    tmp = root / f".tmp_{PREFIX}{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    torch.save(state, tmp / "state.pt")
    (tmp / "config.yaml").write_text(config_yaml)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in list_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders are never listed)."""
    if not root.is_dir():
        return []
    return sorted(
        p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / "state.pt").is_file()
    )


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def load_checkpoint(path: Path) -> dict:
    # weights_only=False: the state holds Python RNG tuples and the data state's lists.
    return torch.load(path / "state.pt", map_location="cpu", weights_only=False)
