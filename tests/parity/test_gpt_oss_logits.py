"""GPT-OSS parity: our definition vs transformers' GptOssForCausalLM (sinks, sliding/full layers, YaRN, fused
MoE), exact top-k routing, packing invariance, HF checkpoint I/O in both directions, quantized refusal.

Every parameter is randomised (HF inits biases to zero and our init does too) so a wrong mapping of any
tensor, a dropped sink or a swapped gate/up interleave shows in the logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from posttrain.errors import ModelError
from posttrain.models.gpt_oss import (
    GptOssConfig,
    GptOssForCausalLM,
    YarnRopeScaling,
    from_hf_state_dict,
    to_hf_state_dict,
)
from posttrain.models.hf_io import build_model, load_pretrained, save_pretrained
from posttrain.models.verify import TINY_CONFIGS, main, verify_family

TOL_FP32 = 1e-4
TINY = TINY_CONFIGS["gpt_oss"]
T_IDS = 40  # past the 8-token window and the 16-token original RoPE context


def randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """Every tensor random, by name, so ours and HF's can be randomised the same way."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith("sinks"):
                p.copy_(noise)  # O(1) logits: comparable to the scores, so sinks take real mass
            elif "bias" in name:
                p.copy_(0.1 * noise)
            else:
                p.copy_(0.1 * noise)


def tiny(tied: bool = False, seed: int = 0, **overrides) -> tuple[GptOssForCausalLM, GptOssConfig]:
    torch.manual_seed(seed)
    model, config = build_model("gpt_oss", {**TINY, "tie_word_embeddings": tied, **overrides})
    randomise(model, seed)
    return model.eval(), config


def load_hf(path: Path, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager", **kwargs
    ).eval()


def ids(T: int = T_IDS, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (2, T), generator=torch.Generator().manual_seed(seed))


def max_diff(model: GptOssForCausalLM, hf, ids_BT: torch.Tensor) -> float:
    with torch.no_grad():
        ours = model.logits(model(ids_BT))
        ref = hf(ids_BT).logits
    assert ours.shape == ref.shape
    return (ours - ref).abs().max().item()


@pytest.mark.parametrize(
    "rope",
    [
        "tiny",  # yarn, truncate false (gpt-oss's setting)
        {"factor": 4.0, "original_max_position_embeddings": 16, "truncate": True, "beta_fast": 16.0},
        None,  # plain RoPE
    ],
)
@pytest.mark.parametrize("tied", [False, True])
def test_logits_match_transformers(tmp_path: Path, tied: bool, rope) -> None:
    model, config = tiny(tied, **({} if rope == "tiny" else {"rope_scaling": rope}))
    save_pretrained(model, config, tmp_path)
    hf = load_hf(tmp_path)
    assert type(hf).__name__ == "GptOssForCausalLM"
    assert hf.config.tie_word_embeddings is tied
    assert hf.config.layer_types == TINY["layer_types"] and hf.config.sliding_window == 8
    assert hf.config.rope_parameters["rope_type"] == ("default" if rope is None else "yarn")
    # Same RoPE table bit for bit, and the same cos/sin multiplier.
    assert torch.equal(model.rotary.inv_freq, hf.model.rotary_emb.inv_freq)
    assert model.rotary.attention_factor == hf.model.rotary_emb.attention_scaling
    # Both of HF's experts implementations (the grouped_mm default and the eager loop).
    diff = max_diff(model, hf, ids())
    diff_eager = max_diff(model, load_hf(tmp_path, experts_implementation="eager"), ids())
    print(f"max |logits diff| tied={tied} rope={rope}: grouped_mm {diff:.3e}, eager {diff_eager:.3e}")
    assert diff <= TOL_FP32 and diff_eager <= TOL_FP32


def test_transformers_checkpoint_loads_into_ours(tmp_path: Path) -> None:
    """A config.json and weights written by transformers itself (not by us) load and match."""
    from transformers import GptOssConfig as HFConfig
    from transformers import GptOssForCausalLM as HFModel

    hf_config = HFConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=8,
        num_experts_per_tok=2,
        sliding_window=8,
        max_position_embeddings=64,
        swiglu_limit=1.5,  # low enough that the clamps bite on these activations
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 10_000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 16,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "truncate": False,
        },
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    hf = HFModel(hf_config).eval()
    randomise(hf, seed=4)
    hf.save_pretrained(tmp_path)
    model, config = load_pretrained(tmp_path)
    assert config.layer_types == ["sliding_attention", "full_attention"] * 2  # HF's default pattern
    assert config.rope_theta == 10_000.0 and config.head_dim == 16 and config.swiglu_limit == 1.5
    assert config.rope_scaling == YarnRopeScaling(4.0, 16, 32.0, 1.0, truncate=False)
    diff = max_diff(model.eval(), hf, ids())
    print(f"max |logits diff| transformers-written checkpoint: {diff:.3e}")
    assert diff <= TOL_FP32


def _hf_router_ids(hf, ids_BT: torch.Tensor) -> list[torch.Tensor]:
    """Top-k expert ids [N, k] of each HF layer, captured from its router's output."""
    captured: list[torch.Tensor] = []
    hooks = [
        layer.mlp.router.register_forward_hook(lambda _m, _i, out: captured.append(out[2]))
        for layer in hf.model.layers
    ]
    try:
        with torch.no_grad():
            hf(ids_BT)
    finally:
        for hook in hooks:
            hook.remove()
    return captured


def test_router_topk_matches_transformers_exactly(tmp_path: Path) -> None:
    model, config = tiny(tied=False)
    save_pretrained(model, config, tmp_path)
    hf = load_hf(tmp_path)
    ids_BT = ids()
    with torch.no_grad():
        model(ids_BT)
    ours = [layer.mlp.last_expert_ids for layer in model.layers]
    ref = _hf_router_ids(hf, ids_BT)
    assert len(ours) == len(ref) == config.num_hidden_layers
    for layer, (a, b) in enumerate(zip(ours, ref)):
        assert torch.equal(a, b), f"layer {layer}: top-k experts differ"  # same ids, same order
        assert a.unique().numel() >= 4, "routing should spread over experts, or the check is weak"
    # The router alone on one input: identical logits, weights and ids (top-k first, softmax over k).
    x_ND = torch.randn(64, config.hidden_size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        for mine, theirs in zip(model.layers[0].mlp.router(x_ND), hf.model.layers[0].mlp.router(x_ND)):
            assert torch.equal(mine, theirs)


def test_experts_equal_dense_reference() -> None:
    """The token-gathering loop equals computing every expert for every token and weighting the top k."""
    model, config = tiny(tied=False, swiglu_limit=0.5)  # a low limit so both clamps are exercised
    mlp = model.layers[1].mlp
    x_ND = 2 * torch.randn(50, config.hidden_size, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        out = mlp(x_ND[None])[0]
        _, weights_Nk, experts_Nk = mlp.router(x_ND)
        ex = mlp.experts
        gate_up_ENF = torch.einsum("nd,edf->enf", x_ND, ex.gate_up_proj) + ex.gate_up_proj_bias[:, None]
        gate, up = gate_up_ENF[..., ::2], gate_up_ENF[..., 1::2]  # interleaved, as HF stores them
        assert (gate > 0.5).any() and (up.abs() > 0.5).any()
        gate, up = gate.clamp(max=0.5), up.clamp(-0.5, 0.5)
        h_ENF = (up + 1) * gate * torch.sigmoid(1.702 * gate)
        y_END = torch.einsum("enf,efd->end", h_ENF, ex.down_proj) + ex.down_proj_bias[:, None]
        n_Nk = torch.arange(50)[:, None].expand_as(experts_Nk)
        ref = (y_END[experts_Nk, n_Nk] * weights_Nk[..., None]).sum(1)
    assert (out - ref).abs().max().item() <= 1e-5


def test_packed_row_equals_documents_alone() -> None:
    model, config = tiny(tied=False)
    gen = torch.Generator().manual_seed(2)
    lens = [7, 13, 5]  # the 13-token document is longer than the 8-token window
    docs = [torch.randint(0, config.vocab_size, (1, n), generator=gen) for n in lens]
    positions = torch.cat([torch.arange(n) for n in lens]).unsqueeze(0)
    doc_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lens)]).unsqueeze(0)
    with torch.no_grad():
        packed = model(torch.cat(docs, dim=1), positions, doc_ids)
        alone = torch.cat([model(d) for d in docs], dim=1)
        leaky = model(torch.cat(docs, dim=1), positions)
    assert (packed - alone).abs().max().item() <= 1e-5
    # Without the doc mask the later documents would see the earlier ones: the check has teeth.
    assert (leaky[:, lens[0] :] - alone[:, lens[0] :]).abs().max().item() > 1e-3


def test_sinks_and_window_matter(tmp_path: Path) -> None:
    """Zeroed sinks, or no window, change the logits (so parity cannot pass with either ignored)."""
    model, config = tiny(tied=False)
    ids_BT = ids()
    with torch.no_grad():
        base = model.logits(model(ids_BT))
        saved = [layer.attention.sinks.clone() for layer in model.layers]
        for layer in model.layers:
            layer.attention.sinks.zero_()
        no_sinks = model.logits(model(ids_BT))
        for layer, s in zip(model.layers, saved):
            layer.attention.sinks.copy_(s)
        model.sliding_window = None
        no_window = model.logits(model(ids_BT))
        short = ids(T=8)  # within the window: unchanged
        same = model.logits(model(short))
        model.sliding_window = config.sliding_window
        assert torch.equal(model.logits(model(ids_BT)), base)
        assert torch.equal(model.logits(model(short)), same)
    assert (base - no_sinks).abs().max().item() > 1e-2
    assert (
        base[:, config.sliding_window :] - no_window[:, config.sliding_window :]
    ).abs().max().item() > 1e-2
    # Tokens inside the window are unaffected (up to rounding: the experts' token batches change).
    assert (base[:, : config.sliding_window] - no_window[:, : config.sliding_window]).abs().max() <= 1e-5
    # And transformers agrees on which one is right: a model saved with a wider window differs from HF's.
    save_pretrained(model, GptOssConfig(**{**TINY, "sliding_window": 32}), tmp_path)
    assert max_diff(model, load_hf(tmp_path), ids_BT) > 1e-2


def test_quantized_checkpoint_refused(tmp_path: Path) -> None:
    d = GptOssConfig(**TINY).to_hf_dict()
    d["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": ["model.layers.*.self_attn"],
    }
    with pytest.raises(ModelError, match=r"mxfp4.*dequantized bf16"):
        GptOssConfig.from_hf_dict(d)
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ModelError, match="dequantized bf16"):
        load_pretrained(tmp_path)


def test_verify_family_and_cli_pass(capsys: pytest.CaptureFixture[str]) -> None:
    report = verify_family("gpt_oss", seed=3)
    print(report.format())
    assert report.passed, report.format()
    assert report.max_abs_diff_logits <= TOL_FP32 and report.max_abs_diff_packed <= TOL_FP32
    assert report.routing_mismatches == 0
    assert main(["--family", "gpt_oss"]) == 0
    assert "verify-model gpt_oss: PASSED" in capsys.readouterr().out


def test_config_round_trips_through_transformers() -> None:
    """to_hf_dict -> transformers GptOssConfig -> to_dict -> from_hf_dict gives the same config."""
    from transformers import GptOssConfig as HFConfig

    for rope in (TINY["rope_scaling"], None, {**TINY["rope_scaling"], "attention_factor": 1.5}):
        ours = GptOssConfig(**{**TINY, "rope_scaling": rope})
        hf = HFConfig.from_dict(ours.to_hf_dict())
        assert hf.num_experts == ours.num_experts == 8 and hf.head_dim == 16
        assert hf.layer_types == ours.layer_types and hf.swiglu_alpha == 1.702
        assert GptOssConfig.from_hf_dict(hf.to_dict()) == ours
    # The Hub's spelling (transformers 4: rope_scaling + top-level rope_theta, no rope_parameters).
    hub = {
        "model_type": "gpt_oss",
        **{k: v for k, v in TINY.items() if k not in ("rope_scaling", "rope_theta", "layer_types")},
        "rope_theta": 150000,
        "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                         "original_max_position_embeddings": 4096, "truncate": False},
        "experts_per_token": 2,
    }  # fmt: skip
    c = GptOssConfig.from_hf_dict(hub)
    assert c.rope_theta == 150_000.0 and c.rope_scaling == YarnRopeScaling(32.0, 4096, truncate=False)
    assert c.layer_types == ["sliding_attention", "full_attention"] * 2


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"rope_scaling": None, "rope_parameters": {"rope_type": "llama3", "factor": 8.0}}, "llama3"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "mscale": 1.0}}, "mscale"),
        ({"layer_types": ["sliding_attention", "chunked_attention"] * 2}, "layer_types"),
        ({"model_type": "llama"}, "gpt_oss"),
    ],
)
def test_config_rejects_unsupported(change: dict, match: str) -> None:
    d = GptOssConfig(**TINY).to_hf_dict()
    with pytest.raises(ModelError, match=match):
        GptOssConfig.from_hf_dict({**d, **change})


@pytest.mark.parametrize("tied", [False, True])
def test_save_load_round_trip_bitwise(tmp_path: Path, tied: bool) -> None:
    model, config = tiny(tied)
    save_pretrained(model, config, tmp_path, token_ids={"eos_token_id": 2})
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["model_type"] == "gpt_oss" and written["eos_token_id"] == 2
    assert written["rope_scaling"]["rope_type"] == "yarn" and written["num_local_experts"] == 8
    loaded, loaded_config = load_pretrained(tmp_path)
    assert loaded_config == config
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert torch.equal(loaded.rotary.inv_freq, model.rotary.inv_freq)
    with torch.no_grad():
        assert torch.equal(model(ids()), loaded.eval()(ids()))


def test_from_hf_state_dict_checks_keys() -> None:
    model, config = tiny(tied=False)
    hf_sd = to_hf_state_dict(model.state_dict(), config)
    assert hf_sd["model.layers.0.mlp.experts.gate_up_proj"].shape == (8, 64, 64)  # [E, D, 2F]
    assert hf_sd["model.layers.0.mlp.experts.down_proj"].shape == (8, 32, 64)  # [E, F, D]
    assert set(from_hf_state_dict(hf_sd, config)) == set(model.state_dict())
    blocks = "model.layers.0.mlp.experts.gate_up_proj_blocks"  # an MXFP4 tensor
    with pytest.raises(ModelError, match=blocks):
        from_hf_state_dict({**hf_sd, blocks: torch.zeros(1)}, config)
    del hf_sd["model.layers.1.self_attn.sinks"]
    with pytest.raises(ModelError, match=r"layers\.1\.attention\.sinks"):
        from_hf_state_dict(hf_sd, config)
    no_bias = GptOssConfig(**TINY, attention_bias=False)
    assert not any(".attention." in k and k.endswith("bias") for k in GptOssForCausalLM(no_bias).state_dict())


@pytest.mark.parametrize("tied", [False, True])
def test_num_params_matches_module(tied: bool) -> None:
    for bias in (False, True):
        model, config = tiny(tied, attention_bias=bias)
        assert config.num_params() == sum(p.numel() for p in model.parameters())


def test_training_step_reaches_every_parameter() -> None:
    """Backward gives gradients to sinks, router (weight and bias), fused experts; aux loss in train mode."""
    model, _ = tiny(tied=False)
    model.train()
    h = model(ids())
    loss = model.logits(h).logsumexp(-1).mean() + model.aux_loss()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, name


def test_init_weights_deterministic_and_meta_rebuild() -> None:
    torch.manual_seed(5)
    a, config = build_model("gpt_oss", TINY)
    torch.manual_seed(5)
    b, _ = build_model("gpt_oss", TINY)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    assert a.layers[0].attention.sinks.abs().max() > 0  # sinks and router bias: normal init, as HF
    assert a.layers[0].mlp.router.bias.abs().max() > 0
    for layer in a.layers:  # every projection initialised: normal(0, 0.02) weights, zero biases
        for proj in (layer.attention.q_proj, layer.attention.o_proj, layer.mlp.experts):
            weight = proj.weight if isinstance(proj, torch.nn.Linear) else proj.gate_up_proj
            assert 0.015 < weight.std().item() < 0.025
        assert not layer.attention.k_proj.bias.any() and not layer.mlp.experts.down_proj_bias.any()
    with torch.device("meta"):  # meta + to_empty + init_weights: nothing left uninitialised
        e = GptOssForCausalLM(config)
    e = e.to_empty(device="cpu")
    f = GptOssForCausalLM(config)  # constructed on CPU: construction itself draws random numbers
    for model in (e, f):
        torch.manual_seed(7)
        model.init_weights()
    for (name, p), q in zip(f.named_parameters(), e.parameters()):
        assert torch.equal(p, q), name
    with torch.device("meta"):
        m = GptOssForCausalLM(config)
    m = m.to_empty(device="cpu")
    m.rebuild_buffers()
    assert torch.equal(m.rotary.inv_freq, a.rotary.inv_freq)
