"""Tracker plumbing without a training run: the package check that fails a job before it starts,
the flattening of the config into tracker params, and the fan-out that closes each tracker once."""

from __future__ import annotations

import importlib.util

import pytest
from helpers import ROOT, job_config

from posttrain.errors import TrackerError
from posttrain.metrics import trackers
from posttrain.metrics.jsonl import read_jsonl


def test_a_missing_tracker_package_fails_the_job_before_its_output_exists(tmp_path, monkeypatch):
    from posttrain.recipes import sft

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    cfg = job_config(
        tmp_path, ROOT / "data/tiny/sft_train.jsonl", metrics={"trackers": ["tensorboard", "wandb"]}
    )
    with pytest.raises(TrackerError) as err:
        sft.train(cfg)
    assert str(err.value) == (
        "metrics.trackers lists 'wandb', but wandb is not installed: pip install wandb  "
        "(or pip install 'posttrain[trackers]')"
    )
    assert not (tmp_path / "out").exists()


def test_unknown_tracker_name_is_a_config_error(tmp_path):
    from posttrain.errors import ConfigError

    with pytest.raises(ConfigError, match=r"metrics.trackers.1"):
        job_config(tmp_path, ROOT / "x.jsonl", metrics={"trackers": ["jsonl", "neptune"]})


def test_flatten_and_numeric():
    config = {"optim": {"lr": 1e-3, "betas": [0.9, 0.95]}, "recipe": "sft", "model": {"path": None}, "x": {}}
    assert trackers.flatten(config) == {
        "optim.lr": "0.001",
        "optim.betas": "[0.9, 0.95]",
        "recipe": "sft",
        "model.path": "null",
        "x": "{}",
    }
    assert trackers.numeric({"loss": 1, "ok": True, "name": "a", "lr": 0.5}) == {
        "loss": 1.0,
        "ok": 1.0,
        "lr": 0.5,
    }


def test_jsonl_only_and_finish_is_idempotent(tmp_path):
    cfg = job_config(tmp_path, ROOT / "x.jsonl").metrics
    opened = trackers.open_trackers(cfg, tmp_path, {"recipe": "sft"})
    opened.log_metrics(1, {"loss": 2.0, "lr": float("nan")})
    opened.log_eval(1, {"eval_loss": 1.5})
    opened.finish("finished")
    opened.finish("failed")  # nothing left to close
    assert read_jsonl(tmp_path / "metrics.jsonl") == [
        {"step": 1, "loss": 2.0, "lr": "nan"},
        {"step": 1, "eval_loss": 1.5},
    ]
    assert not (tmp_path / trackers.IDS_FILE).exists()  # no run ids to keep for jsonl alone
