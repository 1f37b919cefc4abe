"""The dpo, rm and distill recipes from their tiny job files: metrics move the right way, exports
load in transformers, and bad set-ups fail with the key at fault."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from posttrain.config import load_job
from posttrain.errors import ConfigError
from tests.helpers import ROOT

CONFIGS = ROOT / "configs/tiny"


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def run_recipe(name: str, out: Path, *overrides: str) -> dict:
    import importlib

    cfg = load_job(CONFIGS / f"{name}.yaml", [f"output_dir={out}", "metrics.progress=quiet", *overrides])
    return importlib.import_module(f"posttrain.recipes.{name}").train(cfg)


def test_dpo_learns_the_preferences(tmp_path: Path):
    """From step 1 (policy == reference: every implicit reward 0, loss log 2) the loss falls and the
    chosen answers' reward rises above the rejected ones', on training and on held-out pairs."""
    out = tmp_path / "dpo"
    summary = run_recipe(
        "dpo", out, "training.max_steps=30", "training.eval_every_steps=30", "training.export_hf=false"
    )
    rows = [m for m in metrics(out) if "loss" in m]
    assert abs(rows[0]["loss"] - 0.6931) < 1e-3 and rows[0]["rewards/margin"] == pytest.approx(0.0, abs=1e-6)
    assert rows[-1]["loss"] < 0.6 * rows[0]["loss"]  # observed 0.36 after 30 steps (from 0.69)
    assert rows[-1]["rewards/margin"] > 1.0 and rows[-1]["rewards/accuracy"] > 0.6
    final = summary["final"]
    assert final["eval_rewards/accuracy"] > 0.7 and final["eval_rewards/margin"] > 1.0  # observed 0.82, 3.2
    assert final["eval_units"] == 200  # every held-out pair, counted once


def test_dpo_with_lora_uses_the_adapter_free_base_as_reference(tmp_path: Path):
    out = tmp_path / "dpo_lora"
    run_recipe(
        "dpo",
        out,
        "training.max_steps=8",
        "training.eval_every_steps=0",
        "training.export_hf=false",
        "data.eval=null",
        "dpo.reference=lora_disabled",
        "model.lora={rank: 8, alpha: 16, targets: [attention, mlp]}",
        "optim.lr=5e-3",
    )
    rows = [m for m in metrics(out) if "loss" in m]
    assert abs(rows[0]["loss"] - 0.6931) < 1e-3  # zero-initialised adapters: policy == reference
    assert rows[-1]["loss"] < rows[0]["loss"]


def test_dpo_lora_disabled_needs_lora(tmp_path: Path):
    with pytest.raises(ConfigError, match="needs model.lora"):
        run_recipe("dpo", tmp_path / "x", "dpo.reference=lora_disabled")


def test_reward_model_ranks_held_out_pairs_and_loads_as_a_sequence_classifier(tmp_path: Path):
    from transformers import AutoModelForSequenceClassification

    from posttrain.data.pairs import render_pair
    from posttrain.data.tokenizer import Tokenizer

    out = tmp_path / "rm"
    summary = run_recipe("rm", out, "training.max_steps=30", "training.eval_every_steps=30")
    rows = [m for m in metrics(out) if "loss" in m]
    assert rows[0]["accuracy"] < 0.8 and rows[-1]["loss"] < rows[0]["loss"]
    assert summary["final"]["eval_accuracy"] > 0.7  # observed 0.795 after 30 steps
    # The export scores a conversation as our head does at its last token.
    hf = AutoModelForSequenceClassification.from_pretrained(out / "hf", dtype=torch.float32).eval()
    tok = Tokenizer.from_dir(out / "hf")
    pair = json.loads((ROOT / "data/tiny/pref_heldout.jsonl").read_text().splitlines()[0])
    ids, _, (n_c, _) = render_pair(tok, pair)
    with torch.no_grad():
        score_hf = float(hf(torch.tensor([ids[:n_c]])).logits[0, 0])
    from posttrain.parallel.build import build_model_for
    from posttrain.train import checkpoint as ckpt

    cfg = load_job(CONFIGS / "rm.yaml")
    ours = build_model_for(cfg.model, tok, 0, score_head="reward").module.eval()
    ours.load_state_dict(ckpt.load_checkpoint(ckpt.latest_checkpoint(out / "checkpoints"))["model"])
    with torch.no_grad():
        h = ours(torch.tensor([ids[:n_c]]))
        score_ours = float(ours.heads["reward"](h)[0, -1, 0])
    print(f"score: transformers {score_hf:.6f}, ours {score_ours:.6f}")
    assert abs(score_hf - score_ours) <= 1e-4


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A briefly trained tiny SFT model exported for transformers (the distillation teacher)."""
    from posttrain.recipes import sft

    out = tmp_path_factory.mktemp("teacher")
    cfg = load_job(
        CONFIGS / "sft.yaml",
        [
            f"output_dir={out}",
            "metrics.progress=quiet",
            "training.max_steps=40",
            "training.eval_every_steps=0",
            "data.eval=null",
        ],
    )
    return Path(sft.train(cfg)["hf_dir"])


@pytest.mark.parametrize("kind", ["forward_kl", "jsd"])
def test_distillation_moves_the_student_towards_the_teacher(tmp_path: Path, teacher: Path, kind: str):
    out = tmp_path / kind
    summary = run_recipe(
        "distill",
        out,
        f"distill.teacher.path={teacher}",
        f"distill.kind={kind}",
        "training.max_steps=30",
        "training.eval_every_steps=0",
        "training.export_hf=false",
        "data.eval=null",
    )
    rows = [m for m in metrics(out) if "loss" in m]
    assert rows[-1]["distill_loss"] < 0.5 * rows[0]["distill_loss"]
    assert rows[-1]["ce_loss"] < rows[0]["ce_loss"]
    assert summary["steps"] == 30


def test_distillation_refuses_a_teacher_with_another_tokenizer(tmp_path: Path, teacher: Path):
    from transformers import AutoTokenizer

    other = tmp_path / "other_teacher"
    for f in teacher.iterdir():
        if not f.name.startswith("tokenizer") and f.name != "special_tokens_map.json":
            (other / f.name).parent.mkdir(parents=True, exist_ok=True)
            (other / f.name).write_bytes(f.read_bytes())
    tok = AutoTokenizer.from_pretrained(teacher)
    tok.add_tokens(["<extra_teacher_token>"])
    tok.save_pretrained(other)
    with pytest.raises(ConfigError, match="differs from tokenizer.path"):
        run_recipe("distill", tmp_path / "x", f"distill.teacher.path={other}")
