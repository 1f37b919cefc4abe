"""`posttrain verify-model --family F` passes for every family we define (the CI gate of the model zoo)."""

from __future__ import annotations

import pytest

from posttrain.models.hf_io import MODEL_TYPES
from posttrain.models.verify import TINY_CONFIGS, main


def test_every_family_has_a_tiny_config():
    """A family registered for loading but missing from the verifier would ship unverified."""
    assert (
        sorted(TINY_CONFIGS) == sorted(MODEL_TYPES) == ["gemma3", "gpt_oss", "llama3", "qwen3", "qwen3_moe"]
    )


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_verify_model_cli_passes(family: str, capsys):
    """The CLI exits 0 and prints PASSED with a max logits diff within the fp32 tolerance."""
    assert main(["--family", family]) == 0
    out = capsys.readouterr().out
    assert f"verify-model {family}: PASSED" in out
    diff = float(out.split("max |logits diff| vs transformers:")[1].split()[0])
    assert diff <= 1e-4
