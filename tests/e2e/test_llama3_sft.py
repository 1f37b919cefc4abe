"""A Llama 3 model trains through the same SFT recipe (family chosen in the job file) and its
export loads in transformers as LlamaForCausalLM with the same logits as ours."""

import json

import torch
from helpers import ROOT, job_config

from posttrain.metrics.jsonl import read_jsonl
from posttrain.models.hf_io import load_pretrained
from posttrain.recipes import sft


def test_llama3_sft_exports_to_transformers(tmp_path):
    cfg = job_config(
        tmp_path, ROOT / "data/tiny/sft_train.jsonl", model={"family": "llama3"}, training={"max_steps": 8}
    )
    summary = sft.train(cfg)
    losses = [r["loss"] for r in read_jsonl(tmp_path / "out/metrics.jsonl")]
    assert len(losses) == 8 and losses[-1] < losses[0]
    hf_dir = tmp_path / "out/hf"
    assert json.loads((hf_dir / "config.json").read_text())["model_type"] == "llama"
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    ours, ours_cfg = load_pretrained(hf_dir)
    assert ours_cfg.rope_theta == 500_000.0  # the family default, not Qwen3's
    ids = torch.randint(0, 800, (2, 21))
    with torch.no_grad():
        assert (hf(ids).logits - ours.logits(ours(ids))).abs().max().item() <= 1e-4
    assert summary["steps"] == 8
