"""The HF export keeps the training dtype (model.dtype) unless training.export_dtype says otherwise, and
config.json's `dtype` names what the safetensors hold; transformers loads it in that dtype."""

import json

import pytest
import torch
from helpers import job, write_jsonl
from safetensors import safe_open

from posttrain.config import validate_job
from posttrain.recipes import sft

ROWS = [
    {
        "messages": [
            {"role": "user", "content": f"What is {i} + 1?"},
            {"role": "assistant", "content": str(i + 1)},
        ]
    }
    for i in range(8)
]


@pytest.mark.parametrize(
    "model_dtype, export_dtype, expected",
    [("bfloat16", "auto", "bfloat16"), ("float32", "auto", "float32"), ("bfloat16", "float32", "float32")],
)
def test_export_keeps_the_training_dtype(tmp_path, model_dtype, export_dtype, expected):
    from transformers import AutoModelForCausalLM

    raw = job(tmp_path, write_jsonl(tmp_path / "train.jsonl", ROWS), training={"max_steps": 1})
    raw["model"]["dtype"] = model_dtype
    raw["training"]["export_dtype"] = export_dtype
    hf_dir = sft.train(validate_job(raw))["hf_dir"]
    config = json.loads(open(f"{hf_dir}/config.json").read())
    assert config["dtype"] == expected
    with safe_open(f"{hf_dir}/model.safetensors", framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {getattr(torch, expected)}
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype="auto")
    assert next(hf.parameters()).dtype == getattr(torch, expected)
