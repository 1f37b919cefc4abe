"""configs/tiny/sft.yaml end to end (shortened): the loss falls, metrics and summary are complete,
and OUTPUT/hf loads in transformers with the same logits as our model."""

import json
import subprocess
import sys

import pytest
import torch
from helpers import ROOT

from posttrain.config import load_job
from posttrain.metrics.jsonl import read_jsonl
from posttrain.models.hf_io import load_pretrained
from posttrain.recipes import sft

STEP_KEYS = {"step", "loss", "lr", "grad_norm", "num_loss_tokens", "tokens_per_s", "mfu", "peak_memory_mb"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sft")
    cfg = load_job(
        ROOT / "configs/tiny/sft.yaml",
        [
            f"output_dir={out}",
            "training.max_steps=40",
            "training.eval_every_steps=20",
            "training.save_every_steps=20",
            "training.keep_last_checkpoints=1",
            "metrics.progress=quiet",
            f"data.train.path={ROOT / 'data/tiny/sft_train.jsonl'}",
            f"data.eval.path={ROOT / 'data/tiny/heldout.jsonl'}",
        ],
    )
    return out, sft.train(cfg)


def test_loss_falls_and_metrics_are_complete(run):
    out, summary = run
    steps = [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 41))
    assert all(STEP_KEYS <= r.keys() for r in steps)
    assert steps[-1]["loss"] < 0.6 * steps[0]["loss"]
    assert all(r["grad_norm"] > 0 and 0 < r["mfu"] < 1.5 and r["num_loss_tokens"] > 0 for r in steps)
    evals = [r for r in read_jsonl(out / "metrics.jsonl") if "eval_loss" in r]
    assert [r["step"] for r in evals] == [20, 40] and evals[1]["eval_loss"] < evals[0]["eval_loss"]
    saved = json.loads((out / "summary.json").read_text())
    assert saved["steps"] == 40 and saved["skipped_samples"] == {"train": {}, "eval": {}}
    assert saved["final"]["eval_loss"] == evals[1]["eval_loss"] and saved["wall_time_s"] > 0


def test_hf_export_loads_in_transformers_with_same_logits(run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = run
    hf = AutoModelForCausalLM.from_pretrained(out / "hf", dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(out / "hf")
    ours, _ = load_pretrained(out / "hf")
    ours.eval()
    ids = torch.tensor(
        [
            hf_tok.apply_chat_template(
                [{"role": "user", "content": "Sort: 3 1 2"}], add_generation_prompt=True, tokenize=True
            )["input_ids"]
        ]
    )
    with torch.no_grad():
        diff = (hf(ids).logits - ours.logits(ours(ids))).abs().max().item()
    assert diff <= 1e-4
    gen = json.loads((out / "hf/generation_config.json").read_text())
    assert hf_tok.convert_tokens_to_ids("<|im_end|>") in gen["eos_token_id"]


def test_checkpoints_are_kept_last_n(run):
    out, _ = run
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000040"]


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "posttrain.cli", *args], capture_output=True, text=True, cwd=ROOT
    )


def test_cli_errors_are_one_line(tmp_path):
    bad = _cli("run", "configs/tiny/sft.yaml", "training.max_stesp=3")
    assert (
        bad.returncode == 2
        and "did you mean 'training.max_steps'" in bad.stderr
        and "Traceback" not in bad.stderr
    )
    missing = _cli(
        "run",
        "configs/tiny/sft.yaml",
        "model.arch=null",
        "model.path=/no/such/model",
        f"output_dir={tmp_path}",
    )
    assert missing.returncode == 2 and "no config.json in /no/such/model" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    tok = _cli("run", "configs/tiny/sft.yaml", "tokenizer.path=/no/tok", f"output_dir={tmp_path}")
    assert tok.returncode == 2 and "tokenizer path not found: /no/tok" in tok.stderr


def test_verify_model_cli_passes():
    res = _cli("verify-model", "--family", "qwen3")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "PASS" in res.stdout
