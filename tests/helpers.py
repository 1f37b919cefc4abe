"""Tiny fixtures shared by tests: a small Qwen3, the embedded tokenizer, job configs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from posttrain.config import validate_job
from posttrain.data.tokenizer import Tokenizer
from posttrain.models.hf_io import build_model

ROOT = Path(__file__).resolve().parents[1]
TINY_ARCH = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    tie_word_embeddings=False,
)


def tiny_model(vocab_size: int = 896, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model, cfg = build_model("qwen3", {"vocab_size": vocab_size, **TINY_ARCH, **overrides})
    return model, cfg


def tokenizer() -> Tokenizer:
    return Tokenizer.from_dir("builtin")


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def job(tmp_path: Path, train_path: Path, fmt: str = "chat", recipe: str = "sft", **sections) -> dict:
    """A raw job dict for a tiny from-scratch run; `sections` update the defaults per section."""
    raw = {
        "recipe": recipe,
        "output_dir": str(tmp_path / "out"),
        "seed": 0,
        "model": {"arch": dict(TINY_ARCH)},
        "data": {"train": {"path": str(train_path), "format": fmt}, "max_tokens_per_pack": 128},
        "optim": {"lr": 3e-3},
        "training": {"global_batch_size": 4, "micro_batch_size_per_device": 2, "max_steps": 6},
        "metrics": {"progress": "quiet", "peak_flops_per_s": 1e11},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return raw


def job_config(*args, **kwargs):
    return validate_job(job(*args, **kwargs))


def make_trainer(model, loss_fn, cfg, output_dir: Path, total_steps: int, training=None):
    """A Trainer with one micro-batch per step and dummy FLOPs accounting (unit tests)."""
    from posttrain.train.trainer import Trainer

    return Trainer(
        model,
        loss_fn,
        training=training or cfg.training,
        optim=cfg.optim,
        schedule=cfg.schedule,
        total_steps=total_steps,
        grad_accum_steps=1,
        output_dir=output_dir,
        config_yaml="",
        flops_fn=lambda doc_lens, units: 1.0,
        peak_flops_per_s=1.0,
        progress="quiet",
    )


def cli_run(
    config: str | Path,
    out: Path,
    *args: str,
    base: list[str] = (),
    env: dict | None = None,
    check: bool = True,
    timeout: int = 300,
) -> subprocess.CompletedProcess:
    """`posttrain run CONFIG [base] output_dir=OUT [overrides] [flags]` in a fresh process, one thread per
    process (as the launcher gives each worker), output captured; args mix overrides and flags
    (`--nproc`, its number); env adds variables for this run. Raises with the tail of the output when check and it fails."""
    flags = [a for a in args if a.startswith("--") or a.isdigit()]
    overrides = [a for a in args if a not in flags]
    cmd = [
        sys.executable,
        "-m",
        "posttrain.cli",
        "run",
        str(config),
        *base,
        f"output_dir={out}",
        *overrides,
        *flags,
    ]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc
