"""`posttrain verify-model --family F` passes for every family we define (the CI gate of the model zoo):
tied and untied tiny models agree with transformers to 1e-9 of the logit scale in fp64, are as accurate
as transformers in fp32 (rows and packed rows), route every token alike (MoE), and pass the bf16 gate."""

from __future__ import annotations

import json

import pytest

from posttrain.models.hf_io import MODEL_TYPES
from posttrain.models.verify import FP64_REL_TOL, TINY_CONFIGS, main


def test_every_family_has_a_tiny_config():
    """A family registered for loading but missing from the verifier would ship unverified."""
    assert (
        sorted(TINY_CONFIGS) == sorted(MODEL_TYPES) == ["gemma3", "gpt_oss", "llama3", "qwen3", "qwen3_moe"]
    )


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_verify_model_cli_passes(family: str, capsys):
    """The CLI exits 0; its JSON report (worst of tied and untied) holds every gate's numbers."""
    assert main(["--family", family, "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["passed"] is True and r["family"] == family and r["first_diverging"] is None
    assert all(r["gates"].values()) and {"fp64", "fp32", "fp32_packed", "bf16"} <= set(r["gates"])
    # Same operations in fp64: measured 0.0 for every family (bitwise), gated at 1e-9 of the scale.
    assert r["fp64_rel_diff"] <= FP64_REL_TOL
    # fp32: ours is within 2x transformers' own fp32 error (+ 1e-6 of the scale), rows and packed rows.
    assert r["fp32_ours_err"] <= r["fp32_bound"] and r["packed_ours_err"] <= r["packed_bound"]
    assert r["max_abs_diff_logits"] <= 1e-5  # logits of scale ~1: ~3e-7 measured
    if family in ("qwen3_moe", "gpt_oss"):
        assert r["routing_mismatches"] == 0 and r["gates"]["routing"]
    bf16 = r["bf16"]
    assert bf16["kl_mean"] <= bf16["kl_bound"] and bf16["top1_agreement"] >= bf16["top1_bound"]
    assert 0 < bf16["hf_kl_mean_vs_ref"] and bf16["max_abs_diff"] < 0.1 and bf16["mean_abs_diff"] < 0.01
