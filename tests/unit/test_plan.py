"""`posttrain plan`: the resolved execution plan (device, mesh, dtypes, memory per device) without training.
Its decisions are checked for this CPU and for hardware it lacks (--assume), and its memory estimate
against the peak a real run of the same tiny config measures (within 20%)."""

import json
import os
import subprocess
import sys

import pytest
from helpers import ROOT, cli_run

from posttrain.config import load_job
from posttrain.errors import ConfigError
from posttrain.plan import parse_assume, plan

SFT = ROOT / "configs/tiny/sft.yaml"


def test_decisions_here_and_for_hardware_this_machine_lacks():
    here = plan(load_job(SFT, ["training.device=cpu"]))
    assert (here["device"], here["world_size"], here["mesh"]) == (
        "cpu",
        1,
        dict(dp_replicate=1, dp_shard=1, tp=1),
    )
    assert here["dtypes"] == dict(
        parameters="float32", compute="float32", gradient_reduction="float32", optimizer_state="float32"
    )
    one_gpu = plan(load_job(SFT), parse_assume("cuda:1"))
    assert one_gpu["device"] == "cuda" and one_gpu["world_size"] == 1
    assert one_gpu["memory_per_device_bytes"]["runtime"] == 600 * 2**20  # the CUDA context, not this RSS
    assert here["attention"].startswith("sdpa") and one_gpu["attention"].startswith("flex")
    assert one_gpu["memory_per_device_bytes"]["attention_mask"] == 0  # BlockMasks, no dense [T, T] mask

    cfg = load_job(SFT, ["parallelism.tp=2", "parallelism.mixed_precision=bfloat16"])
    eight = plan(cfg, parse_assume("cuda:8"))
    assert eight["mesh"] == dict(dp_replicate=1, dp_shard=4, tp=2)
    assert eight["dtypes"]["compute"] == "bfloat16" and eight["dtypes"]["gradient_reduction"] == "float32"
    # parameters, gradients and AdamW's two moments are sharded over all 8 ranks (FSDP 4 x TP 2)
    total, mem = eight["parameters"]["total"], eight["memory_per_device_bytes"]
    assert mem["parameters"] == total * 4 // 8 and mem["optimizer_state"] == 2 * total * 4 // 8
    assert "fsdp_gathered_block" in mem
    # TP 2 halves each rank's activations; bf16 compute shrinks them, though norms and RoPE keep fp32 copies
    no_tp = plan(load_job(SFT, ["parallelism.mixed_precision=bfloat16"]), parse_assume("cuda:8"))
    assert mem["activations"] == pytest.approx(no_tp["memory_per_device_bytes"]["activations"] / 2, rel=1e-6)
    fp32_acts = here["memory_per_device_bytes"]["activations"]
    assert fp32_acts / 2 < no_tp["memory_per_device_bytes"]["activations"] < fp32_acts
    full_ac = plan(load_job(SFT, ["parallelism.activation_checkpointing=full"]))
    assert (
        full_ac["memory_per_device_bytes"]["activations"] < here["memory_per_device_bytes"]["activations"] / 2
    )


def test_lora_counts_only_adapters_as_trainable():
    p = plan(load_job(SFT, ["model.lora.rank=4", "model.lora.targets=[attention]"]))
    # 4 layers x (q 128->128, k 128->64, v 128->64, o 128->128) adapters of rank 4: r * (in + out) each
    adapters = 4 * 4 * ((128 + 128) + (128 + 64) + (128 + 64) + (128 + 128))
    assert p["parameters"]["trainable"] == adapters
    assert p["memory_per_device_bytes"]["optimizer_state"] == 2 * adapters * 4


def test_bad_assume_is_a_clear_error():
    with pytest.raises(ConfigError, match="cuda:8"):
        parse_assume("tpu:8")


@pytest.mark.parametrize("config", ["sft", "dpo"])
def test_memory_estimate_is_within_20_percent_of_the_measured_peak(tmp_path, config):
    job = ROOT / f"configs/tiny/{config}.yaml"
    overrides = ["training.max_steps=3", "training.eval_every_steps=0", "training.save_every_steps=0"]
    cli_run(job, tmp_path / "run", *overrides, "metrics.progress=quiet")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    measured = max(r["peak_memory_mb"] for r in rows if "peak_memory_mb" in r) * 2**20
    proc = subprocess.run(
        [sys.executable, "-m", "posttrain.cli", "plan", str(job), *overrides, "--json"],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    estimate = json.loads(proc.stdout)["memory_per_device_total_bytes"]
    assert abs(estimate - measured) / measured < 0.20, (estimate / 2**20, measured / 2**20)
