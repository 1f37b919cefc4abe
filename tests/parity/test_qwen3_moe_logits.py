"""Qwen3-MoE parity: logits, routing and the load-balancing loss equal transformers' Qwen3MoeForCausalLM,
checkpoints load in both directions (Hub per-expert layout), and the verifier catches routing changes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from posttrain.errors import ModelError
from posttrain.models import qwen3_moe
from posttrain.models.hf_io import build_model, load_pretrained, save_pretrained
from posttrain.models.moe import MoE
from posttrain.models.verify import TINY_CONFIGS, _routing_mismatches, verify_family

TOL = 1e-4


def tiny(**overrides):
    torch.manual_seed(0)
    model, config = build_model(
        "qwen3_moe", {**TINY_CONFIGS["qwen3_moe"], "tie_word_embeddings": False, **overrides}
    )
    return model.eval(), config


def load_hf(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def ids(config, T: int = 33, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (2, T), generator=torch.Generator().manual_seed(seed))


def test_verifier_passes_with_exact_routing():
    """verify-model qwen3_moe: logits and packing within 1e-4 and zero tokens routed differently."""
    report = verify_family("qwen3_moe", report_bf16=False)
    assert report.passed, report.format()
    assert report.routing_mismatches == 0
    assert report.max_abs_diff_logits <= TOL


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_ours_saved_loads_in_transformers(tmp_path: Path, norm_topk_prob: bool):
    """Our checkpoint in the Hub layout: same logits, same experts per token, same aux loss as HF."""
    model, config = tiny(norm_topk_prob=norm_topk_prob)
    save_pretrained(model, config, tmp_path)
    hf = load_hf(tmp_path)
    x = ids(config)
    with torch.no_grad():
        ours = model.logits(model(x))
        outputs = []
        mismatches = _routing_mismatches(model, hf, lambda: outputs.append(hf(x, output_router_logits=True)))
    assert (ours - outputs[0].logits).abs().max().item() <= TOL
    assert mismatches == 0
    model.train()  # aux loss is computed from the last forward's router outputs
    model(x)
    assert abs(model.aux_loss().item() - outputs[0].aux_loss.item()) <= 1e-5


def test_transformers_checkpoint_loads_into_ours(tmp_path: Path):
    """A model created and saved by transformers (fused experts in memory, per-expert on disk) loads here."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(**{**TINY_CONFIGS["qwen3_moe"], "tie_word_embeddings": False}, num_local_experts=8)
    torch.manual_seed(3)
    hf = Qwen3MoeForCausalLM(cfg).eval()
    with torch.no_grad():  # HF inits the router to zeros: randomise so routing is not a tie-break
        for p in hf.parameters():
            p.normal_(0, 0.1)
    hf.save_pretrained(tmp_path)
    ours, config = load_pretrained(tmp_path)
    assert config.num_experts == 8 and config.mlp_only_layers == [1]
    x = ids(config, seed=4)
    with torch.no_grad():
        assert (ours.eval().logits(ours(x)) - hf(x).logits).abs().max().item() <= TOL


def test_routing_check_is_not_vacuous():
    """Perturbing one router changes the experts of some tokens, and the verifier counts them."""
    model, config = tiny()
    other, _ = tiny()
    with torch.no_grad():
        other.layers[0].mlp.router.weight.add_(torch.randn_like(other.layers[0].mlp.router.weight) * 0.5)
    x = ids(config)
    model(x)
    other(x)
    changed = (
        model.layers[0].mlp.last_expert_ids.sort(-1).values
        != other.layers[0].mlp.last_expert_ids.sort(-1).values
    )
    assert changed.any()


def test_dense_and_sparse_layers_follow_hf_rules():
    """mlp_only_layers and decoder_sparse_step decide which layers get experts; keys follow."""
    model, config = tiny(mlp_only_layers=[], decoder_sparse_step=2, num_hidden_layers=4)
    kinds = [isinstance(layer.mlp, MoE) for layer in model.layers]
    assert kinds == [False, True, False, True]
    keys = qwen3_moe.expected_keys(config)
    assert "layers.0.mlp.gate_proj.weight" in keys and "layers.0.mlp.router.weight" not in keys
    assert "layers.1.mlp.experts.7.down_proj.weight" in keys and "layers.1.mlp.gate_proj.weight" not in keys
    assert set(keys) == set(model.state_dict())


def test_missing_expert_weight_is_an_error(tmp_path: Path):
    """A checkpoint without one expert's tensor fails naming it instead of training a random expert."""
    model, config = tiny()
    sd = qwen3_moe.to_hf_state_dict(model.state_dict(), config)
    del sd["model.layers.2.mlp.experts.5.up_proj.weight"]
    with pytest.raises(ModelError, match=r"layers\.2\.mlp\.experts\.5\.up_proj\.weight"):
        qwen3_moe.from_hf_state_dict(sd, config)


def test_aux_loss_reaches_the_training_loss():
    """lm_loss_fn adds coef * aux * tokens in training and reports lm_loss and moe_aux_loss apart."""
    from posttrain.train.setup import lm_loss_fn

    model, config = tiny()
    model.train()
    x = ids(config, T=16)
    batch = {"input_ids": x, "position_ids": torch.arange(16).expand(2, 16), "targets": x.roll(-1, 1)}
    plain, _ = lm_loss_fn(64, config.vocab_size)(model, batch)
    total, metrics = lm_loss_fn(64, config.vocab_size, moe_aux_coef=0.5)(model, batch)
    aux = model.aux_loss().item()
    assert aux >= config.num_experts_per_tok * 0.999  # E * sum f*P >= k, equality when balanced
    assert abs(total.item() - (plain.item() + 0.5 * aux * 32)) <= 1e-3
    assert abs(metrics["moe_aux_loss"].item() - aux * 32) <= 1e-4
