"""training.device: a one-process job computes where the config says (auto = CUDA when there is one),
asking for CUDA without one is a config error, and the model moves to the world's device before training."""

import pytest
import torch
from helpers import job, tiny_model

from posttrain.config import ParallelismConfig, validate_job
from posttrain.errors import ConfigError
from posttrain.parallel.parallelize import parallelize
from posttrain.parallel.world import World, init_world, use_cuda


def test_auto_follows_the_machine_and_cpu_is_always_cpu():
    assert use_cuda("auto") == torch.cuda.is_available()
    assert use_cuda("cpu") is False
    assert init_world(ParallelismConfig(), device="cpu").device == torch.device("cpu")
    expected = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    assert init_world(ParallelismConfig(), device="auto").device == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_a_gpu_names_the_key():
    with pytest.raises(ConfigError, match="training.device=cuda"):
        init_world(ParallelismConfig(), device="cuda")
    with pytest.raises(ConfigError, match="parallelism.backend=nccl"):
        use_cuda("auto", ParallelismConfig(backend="nccl"))


def test_a_world_of_one_moves_the_model_to_its_device():
    model, _ = tiny_model()
    notes = parallelize(model, World(device=torch.device("meta")), ParallelismConfig())
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert notes == ["on meta"]
    model, _ = tiny_model()
    assert parallelize(model, World(), ParallelismConfig()) == []  # the CPU: nothing to move
    assert {p.device.type for p in model.parameters()} == {"cpu"}


def test_device_is_validated(tmp_path):
    raw = job(tmp_path, tmp_path / "train.jsonl")
    raw["training"]["device"] = "tpu"
    with pytest.raises(ConfigError, match="training.device"):
        validate_job(raw)
