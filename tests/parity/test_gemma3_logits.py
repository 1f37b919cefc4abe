"""Gemma 3 parity: our definition vs transformers' Gemma3ForCausalLM (sliding + global layers, per-kind RoPE,
linear scaling, sandwich norms), packing invariance, the window having an effect, HF I/O both ways."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from posttrain.errors import ModelError
from posttrain.models.gemma3 import (
    Gemma3Config,
    Gemma3ForCausalLM,
    GemmaRMSNorm,
    from_hf_state_dict,
    to_hf_state_dict,
)
from posttrain.models.hf_io import build_model, load_pretrained, save_pretrained
from posttrain.models.verify import TINY_CONFIGS, main, verify_family

TOL_FP32 = 1e-4
T_LONG = 40  # > sliding_window (8): later queries of sliding layers lose their earliest keys
TINY = TINY_CONFIGS["gemma3"]
INIT_STD = 0.1


def randomise_norms(model: torch.nn.Module, seed: int = 7) -> None:
    """Norm weights start at 0 (scale 1 + w = 1); random ones make the (1 + w) convention observable."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


def tiny(tied: bool, seed: int = 0, **overrides) -> tuple[Gemma3ForCausalLM, Gemma3Config]:
    torch.manual_seed(seed)
    model, config = build_model("gemma3", {**TINY, "tie_word_embeddings": tied, **overrides})
    # std 0.1, not 0.02: MLP inputs then reach the range where tanh-GELU and exact GELU differ (~2e-3
    # in the logits, vs ~5e-6 for a correct model), so the 1e-4 parity checks can see the activation.
    model.init_weights(INIT_STD)
    randomise_norms(model, seed + 7)
    return model.eval(), config


def load_hf(path: Path, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager").eval()


def max_logits_diff(model: Gemma3ForCausalLM, hf, vocab_size: int, T: int = T_LONG) -> float:
    ids_BT = torch.randint(0, vocab_size, (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model.logits(model(ids_BT))
        ref = hf(ids_BT).logits
    assert ours.shape == ref.shape == (2, T, vocab_size)
    return (ours - ref).abs().max().item()


@pytest.mark.parametrize("tied", [False, True])
def test_logits_match_transformers(tmp_path: Path, tied: bool) -> None:
    model, config = tiny(tied)
    assert config.layer_types == ["sliding_attention"] * 2 + ["full_attention"] + ["sliding_attention"] * 2
    save_pretrained(model, config, tmp_path)
    hf = load_hf(tmp_path)
    assert type(hf).__name__ == "Gemma3ForCausalLM"
    assert hf.config.tie_word_embeddings is tied
    assert hf.config.layer_types == config.layer_types and hf.config.sliding_window == 8
    assert hf.config.query_pre_attn_scalar == 24
    assert hf.config.rope_parameters == {
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 50_000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1_000.0},
    }
    # Same RoPE tables per kind, bit for bit (global: theta 5e4 then / 8; sliding: theta 1e3).
    for kind in ("full_attention", "sliding_attention"):
        assert torch.equal(model.rotary[kind].inv_freq, getattr(hf.model.rotary_emb, f"{kind}_inv_freq"))
    assert max_logits_diff(model, hf, config.vocab_size) <= TOL_FP32


def test_attention_bias_and_all_global_layers_match_transformers(tmp_path: Path) -> None:
    model, config = tiny(
        tied=False, attention_bias=True, layer_types=["full_attention"] * 5, rope_scaling=None
    )
    save_pretrained(model, config, tmp_path)
    hf = load_hf(tmp_path)
    assert hf.config.attention_bias and hf.config.rope_parameters["full_attention"]["rope_type"] == "default"
    assert max_logits_diff(model, hf, config.vocab_size) <= TOL_FP32


@pytest.mark.parametrize("tied", [False, True])
def test_transformers_checkpoint_loads_into_ours(tmp_path: Path, tied: bool) -> None:
    """config.json and weights written by transformers itself; the config given in the old spelling."""
    from transformers import Gemma3ForCausalLM as HFGemma3
    from transformers import Gemma3TextConfig

    hf_config = Gemma3TextConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=32,
        query_pre_attn_scalar=20,
        sliding_window=6,
        sliding_window_pattern=3,
        rope_theta=200_000.0,
        rope_local_base_freq=500.0,
        rope_scaling={"rope_type": "linear", "factor": 4.0},
        tie_word_embeddings=tied,
        initializer_range=INIT_STD,
    )
    torch.manual_seed(0)
    hf = HFGemma3(hf_config).eval()
    randomise_norms(hf)
    hf.save_pretrained(tmp_path)
    model, config = load_pretrained(tmp_path)
    assert config.layer_types == (["sliding_attention"] * 2 + ["full_attention"]) * 2
    assert (config.rope_theta, config.rope_local_base_freq) == (200_000.0, 500.0)
    assert config.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    assert (config.head_dim, config.num_key_value_heads, config.sliding_window) == (32, 1, 6)
    assert config.tie_word_embeddings is tied
    # The in-memory model runs SDPA (bitwise equal to ours); the reference is the eager reload.
    assert max_logits_diff(model.eval(), load_hf(tmp_path), config.vocab_size) <= TOL_FP32


def test_packed_row_equals_documents_alone() -> None:
    model, config = tiny(tied=False)
    gen = torch.Generator().manual_seed(2)
    lens = [5, 21, 12]  # two documents longer than the 8-token window
    docs = [torch.randint(0, config.vocab_size, (1, n), generator=gen) for n in lens]
    positions = torch.cat([torch.arange(n) for n in lens]).unsqueeze(0)
    doc_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lens)]).unsqueeze(0)
    with torch.no_grad():
        packed = model(torch.cat(docs, dim=1), positions, doc_ids)
        alone = torch.cat([model(d) for d in docs], dim=1)
    assert (packed - alone).abs().max().item() <= 1e-5
    # Without the mask the later documents would see the earlier ones: the check has teeth.
    with torch.no_grad():
        leaky = model(torch.cat(docs, dim=1), positions)
    assert (leaky[:, lens[0] :] - alone[:, lens[0] :]).abs().max().item() > 1e-3


def test_sliding_window_changes_logits() -> None:
    """Same weights with the window removed: identical up to the window, different after (no vacuous pass)."""
    model, config = tiny(tied=False)
    unwindowed = Gemma3ForCausalLM(Gemma3Config(**{**vars(config), "sliding_window": 10_000})).eval()
    unwindowed.load_state_dict(model.state_dict())
    ids_BT = torch.randint(0, config.vocab_size, (2, T_LONG), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        windowed_logits = model.logits(model(ids_BT))
        full_logits = unwindowed.logits(unwindowed(ids_BT))
    W = config.sliding_window
    assert (windowed_logits[:, :W] - full_logits[:, :W]).abs().max().item() <= 1e-6
    assert (windowed_logits[:, W:] - full_logits[:, W:]).abs().max().item() > 1e-2


def test_verify_family_and_cli_pass(capsys: pytest.CaptureFixture[str]) -> None:
    report = verify_family("gemma3", seed=3)
    assert report.passed, report.format()
    assert report.max_abs_diff_logits <= TOL_FP32 and report.max_abs_diff_packed <= TOL_FP32
    assert main(["--family", "gemma3"]) == 0
    assert "verify-model gemma3: PASSED" in capsys.readouterr().out


def test_bf16_embeddings_scale_like_transformers(tmp_path: Path) -> None:
    """sqrt(48) = 6.93 is rounded to bf16 (6.9375) before the multiply, in HF and here: embeddings agree bitwise."""
    model, config = tiny(tied=True, hidden_size=48, num_hidden_layers=1)
    save_pretrained(model, config, tmp_path)
    hf = load_hf(tmp_path, torch.bfloat16)
    model = model.to(torch.bfloat16)
    ids_BT = torch.arange(config.vocab_size).view(4, -1)
    with torch.no_grad():
        assert torch.equal(model.embed(ids_BT), hf.model.embed_tokens(ids_BT))


def test_norm_matches_transformers_bitwise_in_bf16() -> None:
    """Gemma multiplies by (1 + w) in fp32 and casts after (Llama casts before): invisible in fp32, so pin
    it in bf16, where the two orders differ by an ulp."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    ours, ref = GemmaRMSNorm(64, 1e-6), Gemma3RMSNorm(64, 1e-6)
    with torch.no_grad():
        ours.weight.normal_(0.0, 0.5)
        ref.weight.copy_(ours.weight)
    ours, ref = ours.to(torch.bfloat16), ref.to(torch.bfloat16)
    x = torch.randn(4, 7, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(ours(x), ref(x))
        x_fp32 = x.float()
        normed = (x_fp32 * torch.rsqrt(x_fp32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
        casts_first = (1.0 + ours.weight) * normed
    assert not torch.equal(ours(x), casts_first)  # the order is observable here: the check has teeth


@pytest.mark.parametrize("tied", [False, True])
def test_save_load_round_trip_bitwise(tmp_path: Path, tied: bool) -> None:
    model, config = tiny(tied)
    save_pretrained(model, config, tmp_path, token_ids={"eos_token_id": 1, "pad_token_id": 0})
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["model_type"] == "gemma3_text" and written["eos_token_id"] == 1
    # Old spelling too, for transformers 4 / vLLM.
    assert (written["rope_theta"], written["rope_local_base_freq"]) == (50_000.0, 1_000.0)
    assert written["rope_scaling"] == {"rope_type": "linear", "factor": 8.0}
    assert written["sliding_window_pattern"] == 3
    loaded, loaded_config = load_pretrained(tmp_path)
    assert loaded_config == config
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    ids = torch.randint(0, config.vocab_size, (1, T_LONG))
    with torch.no_grad():
        assert torch.equal(model(ids), loaded(ids))


def test_config_reads_old_and_new_spelling_and_transformers_reload(tmp_path: Path) -> None:
    from transformers import AutoConfig

    config = Gemma3Config(**TINY)
    d = config.to_hf_dict()
    old = {k: v for k, v in d.items() if k not in ("rope_parameters", "layer_types")}
    new = {k: v for k, v in d.items() if k not in ("rope_theta", "rope_local_base_freq", "rope_scaling")}
    for variant in (old, new):
        assert Gemma3Config.from_hf_dict(variant) == config
    (tmp_path / "config.json").write_text(json.dumps(d))
    assert Gemma3Config.from_hf_dict(AutoConfig.from_pretrained(tmp_path).to_dict()) == config
    # Absent keys mean HF's defaults: global layer every 6th, bases 1e6 / 1e4, head_dim 256, tied.
    bare = Gemma3Config.from_hf_dict(
        {k: TINY[k] for k in ("vocab_size", "hidden_size", "num_attention_heads")}
        | {"intermediate_size": 128, "num_hidden_layers": 12}
    )
    assert bare.layer_types.count("full_attention") == 2 and bare.layer_types[5] == "full_attention"
    assert (bare.rope_theta, bare.rope_local_base_freq, bare.head_dim) == (1e6, 1e4, 256)
    assert bare.tie_word_embeddings and bare.rope_scaling is None and bare.sliding_window == 4096


@pytest.mark.parametrize(
    ("change", "feature"),
    [
        ({"final_logit_softcapping": 30.0}, "final_logit_softcapping"),
        ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
        ({"use_bidirectional_attention": True}, "use_bidirectional_attention"),
        ({"hidden_activation": "gelu"}, "hidden_activation"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
        (
            {"rope_parameters": {"sliding_attention": {"rope_type": "linear", "factor": 2.0}}},
            "sliding_attention",
        ),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}, "keyed by layer type"),
        ({"layer_types": ["chunked_attention"] * 5}, "chunked_attention"),
        ({"model_type": "gemma3"}, "multimodal"),
    ],
)
def test_config_rejects_unsupported_features(change: dict, feature: str) -> None:
    d = Gemma3Config(**TINY).to_hf_dict()
    with pytest.raises(ModelError, match=feature):
        Gemma3Config.from_hf_dict({**d, **change})


def test_from_hf_state_dict_checks_keys() -> None:
    model, config = tiny(tied=True)
    hf_sd = to_hf_state_dict(model.state_dict(), config)
    assert "lm_head.weight" not in hf_sd
    assert "model.layers.4.post_feedforward_layernorm.weight" in hf_sd
    assert "model.layers.0.self_attn.k_norm.weight" in hf_sd
    ours = from_hf_state_dict({**hf_sd, "lm_head.weight": torch.zeros(1)}, config)
    assert set(ours) == set(model.state_dict())
    with pytest.raises(ModelError, match=r"model\.layers\.0\.self_attn\.q_proj\.bias"):  # bias not enabled
        from_hf_state_dict({**hf_sd, "model.layers.0.self_attn.q_proj.bias": torch.zeros(1)}, config)
    del hf_sd["model.layers.1.pre_feedforward_layernorm.weight"]
    with pytest.raises(ModelError, match=r"layers\.1\.mlp_norm\.weight"):
        from_hf_state_dict(hf_sd, config)


@pytest.mark.parametrize("tied", [False, True])
def test_num_params_init_and_meta_rebuild(tied: bool) -> None:
    for bias in (False, True):
        model, config = tiny(tied, attention_bias=bias)
        assert config.num_params() == sum(p.numel() for p in model.parameters())
    torch.manual_seed(5)
    fresh, _ = build_model("gemma3", {**TINY, "tie_word_embeddings": tied})
    norms = [p for name, p in fresh.named_parameters() if "norm" in name]
    assert len(norms) == 4 * 5 + 2 * 5 + 1 and all(not p.any() for p in norms)  # zeros: scale 1 + 0
    with torch.device("meta"):
        m = Gemma3ForCausalLM(fresh.config)
    m = m.to_empty(device="cpu")
    m.rebuild_buffers()
    for kind in ("full_attention", "sliding_attention"):
        assert torch.equal(m.rotary[kind].inv_freq, fresh.rotary[kind].inv_freq)
