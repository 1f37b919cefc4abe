"""benchmarks/sft_vs_trl.py's own guarantees, on its cheapest settings: SmolLM2's marked training template
(what TRL trains with) gives the ids and loss mask posttrain gives; the tiny path runs both sides in their own
processes, agrees on the same data at the start and reports each side's memory."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
from helpers import ROOT
from real_model import smollm2_dir


def _bench():
    spec = importlib.util.spec_from_file_location("sft_vs_trl", ROOT / "benchmarks" / "sft_vs_trl.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def test_smollm2_training_template_masks_what_posttrain_masks():
    bench = _bench()
    name, ok, detail = bench.tokens_check(smollm2_dir(), n=64)
    assert ok, detail
    assert detail.startswith("64 of 64") and "SmolLM2 + generation markers" in detail


@pytest.mark.slow
def test_tiny_path_checks_and_memory(tmp_path):
    bench = _bench()
    argv = ["--steps", "1", "--warmup-steps", "1", "--rows", "2", "--micro-rows", "1", "--threads", "1"]
    bench.main([*argv, "--output-dir", str(tmp_path)])  # exit code 1 is possible: 2 steps are a small sample
    results = json.loads((tmp_path / "results.json").read_text())
    checks = {c["name"]: c for c in results["checks"]}
    for name in (
        "same token ids and loss masks",
        "same-data losses at the start agree",
        "posttrain: ran all steps",
        "trl: ran all steps",
        "first-step losses agree",
    ):
        assert checks[name]["ok"], checks[name]
    for side in ("posttrain", "trl"):
        memory = results["sides"][side]["memory"]
        assert memory["peak_rss_mib"] >= memory["loop_start_rss_mib"] > 100  # torch alone is > 100 MiB
        assert memory["loop_peak_above_start_mib"] >= 0
        assert results["sides"][side]["tokens_per_s"] > 0
