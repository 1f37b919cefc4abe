"""Llama 3 parity: our definition vs transformers' LlamaForCausalLM (with and without llama3 RoPE scaling),
packing invariance, and HF checkpoint I/O in both directions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from posttrain.errors import ModelError
from posttrain.models.hf_io import build_model, load_pretrained, save_pretrained
from posttrain.models.llama3 import (
    Llama3Config,
    Llama3ForCausalLM,
    Llama3RopeScaling,
    from_hf_state_dict,
    to_hf_state_dict,
)
from posttrain.models.verify import TINY_CONFIGS, main, verify_family

TOL_FP32 = 1e-4
# Original context 16 tokens, ids of 40: positions well past the pre-training length.
SCALING = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16)
BASE = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


def tiny(tied: bool, seed: int = 0, **overrides) -> tuple[Llama3ForCausalLM, Llama3Config]:
    torch.manual_seed(seed)
    model, config = build_model("llama", {**BASE, "tie_word_embeddings": tied, **overrides})
    return model.eval(), config


def load_hf(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def assert_logits_match(model: Llama3ForCausalLM, hf, vocab_size: int, T: int = 40) -> None:
    ids_BT = torch.randint(0, vocab_size, (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model.logits(model(ids_BT))
        ref = hf(ids_BT).logits
    assert ours.shape == ref.shape == (2, T, vocab_size)
    assert (ours - ref).abs().max().item() <= TOL_FP32


@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("tied", [False, True])
def test_logits_match_transformers(tmp_path: Path, tied: bool, scaled: bool) -> None:
    model, config = tiny(tied, rope_scaling=SCALING if scaled else None)
    save_pretrained(model, config, tmp_path)
    hf = load_hf(tmp_path)
    assert type(hf).__name__ == "LlamaForCausalLM"
    assert hf.config.tie_word_embeddings is tied
    assert hf.config.rope_parameters["rope_type"] == ("llama3" if scaled else "default")
    assert hf.config.rope_parameters["rope_theta"] == 500_000.0
    # Same RoPE table, bit for bit: the scaling is HF's, op for op.
    assert torch.equal(model.rotary.inv_freq, hf.model.rotary_emb.inv_freq)
    assert_logits_match(model, hf, config.vocab_size)


def test_scaling_changes_frequencies_in_all_three_bands() -> None:
    """The verify config's scaling keeps high frequencies, smooths the middle band and divides the rest."""
    plain, _ = tiny(tied=True, rope_theta=10_000.0)
    scaled, config = tiny(tied=True, rope_theta=10_000.0, rope_scaling=TINY_CONFIGS["llama3"]["rope_scaling"])
    ratio = plain.rotary.inv_freq / scaled.rotary.inv_freq
    factor = config.rope_scaling.factor
    assert ratio[0].item() == 1.0  # high-frequency band: unchanged
    assert torch.allclose(ratio[-1], torch.tensor(factor))  # low-frequency band: divided by factor
    assert ((ratio > 1.0) & (ratio < factor - 1e-3)).any()  # the smoothed band in between


def test_explicit_head_dim_and_biases_match_transformers(tmp_path: Path) -> None:
    """head_dim != hidden/heads, and biases on every projection (randomised so a wrong mapping shows)."""
    model, config = tiny(tied=False, head_dim=32, attention_bias=True, mlp_bias=True, rope_scaling=SCALING)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.1)
    save_pretrained(model, config, tmp_path)
    hf = load_hf(tmp_path)
    assert hf.config.head_dim == 32 and hf.config.attention_bias and hf.config.mlp_bias
    assert_logits_match(model, hf, config.vocab_size)


def test_transformers_checkpoint_loads_into_ours(tmp_path: Path) -> None:
    """A config.json and weights written by transformers itself (not by us) load and match."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_config = LlamaConfig(
        **{k: v for k, v in BASE.items()},
        rope_parameters={"rope_type": "llama3", "rope_theta": 500_000.0, **SCALING},
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    hf = LlamaForCausalLM(hf_config).eval()
    hf.save_pretrained(tmp_path)
    model, config = load_pretrained(tmp_path)
    assert config.rope_scaling == Llama3RopeScaling(**SCALING)
    assert config.rope_theta == 500_000.0 and config.head_dim == 16
    assert_logits_match(model.eval(), hf, config.vocab_size)


def test_packed_row_equals_documents_alone() -> None:
    model, config = tiny(tied=False, rope_scaling=SCALING)
    gen = torch.Generator().manual_seed(2)
    lens = [5, 21, 8]
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


def test_verify_family_and_cli_pass(capsys: pytest.CaptureFixture[str]) -> None:
    report = verify_family("llama3", seed=3)
    assert report.passed, report.format()
    assert report.max_abs_diff_logits <= TOL_FP32 and report.max_abs_diff_packed <= TOL_FP32
    assert main(["--family", "llama3"]) == 0
    assert "verify-model llama3: PASSED" in capsys.readouterr().out


@pytest.mark.parametrize("tied", [False, True])
def test_save_load_round_trip_bitwise(tmp_path: Path, tied: bool) -> None:
    model, config = tiny(tied, rope_scaling=SCALING)
    save_pretrained(model, config, tmp_path, token_ids={"eos_token_id": 2})
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["model_type"] == "llama" and written["eos_token_id"] == 2
    assert written["rope_scaling"]["rope_type"] == "llama3"  # old spelling, for transformers 4 / vLLM
    loaded, loaded_config = load_pretrained(tmp_path)
    assert loaded_config == config
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert torch.equal(loaded.rotary.inv_freq, model.rotary.inv_freq)
    ids = torch.randint(0, config.vocab_size, (1, 40))
    with torch.no_grad():
        assert torch.equal(model(ids), loaded(ids))


def test_config_reads_old_and_new_rope_spelling() -> None:
    base = Llama3Config(**BASE, rope_scaling=SCALING).to_hf_dict()
    old = {k: v for k, v in base.items() if k != "rope_parameters"}
    new = {k: v for k, v in base.items() if k not in ("rope_theta", "rope_scaling")}
    for d in (old, new):
        c = Llama3Config.from_hf_dict(d)
        assert c.rope_theta == 500_000.0 and c.rope_scaling == Llama3RopeScaling(**SCALING)
    plain = Llama3Config(**BASE).to_hf_dict()
    assert plain["rope_scaling"] is None
    assert Llama3Config.from_hf_dict(plain).rope_scaling is None


@pytest.mark.parametrize(
    ("change", "feature"),
    [
        ({"rope_scaling": None, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),
    ],
)
def test_config_rejects_unsupported_features(change: dict, feature: str) -> None:
    d = Llama3Config(**BASE, rope_scaling=SCALING).to_hf_dict()
    with pytest.raises(ModelError, match=feature):
        Llama3Config.from_hf_dict({**d, **change})


def test_rope_scaling_unknown_key_names_closest() -> None:
    with pytest.raises(ModelError, match="did you mean 'low_freq_factor'"):
        Llama3Config(**BASE, rope_scaling={**SCALING, "low_freq_facter": 1.0})


def test_from_hf_state_dict_checks_keys() -> None:
    model, config = tiny(tied=True)
    hf_sd = to_hf_state_dict(model.state_dict(), config)
    assert "lm_head.weight" not in hf_sd
    ours = from_hf_state_dict({**hf_sd, "lm_head.weight": torch.zeros(1)}, config)
    assert set(ours) == set(model.state_dict())
    with pytest.raises(ModelError, match=r"model\.layers\.0\.self_attn\.q_proj\.bias"):  # bias not enabled
        from_hf_state_dict({**hf_sd, "model.layers.0.self_attn.q_proj.bias": torch.zeros(1)}, config)
    with pytest.raises(ModelError, match=r"model\.layers\.9\.mlp\.up_proj\.weight"):
        from_hf_state_dict({**hf_sd, "model.layers.9.mlp.up_proj.weight": torch.zeros(1)}, config)
    del hf_sd["model.layers.1.self_attn.k_proj.weight"]
    with pytest.raises(ModelError, match=r"layers\.1\.attention\.k_proj\.weight"):
        from_hf_state_dict(hf_sd, config)


@pytest.mark.parametrize("tied", [False, True])
def test_num_params_matches_module(tied: bool) -> None:
    for bias in (False, True):
        model, config = tiny(tied, attention_bias=bias, mlp_bias=bias)
        assert config.num_params() == sum(p.numel() for p in model.parameters())


def test_init_weights_deterministic_and_meta_rebuild() -> None:
    a, _ = tiny(tied=False, seed=5, rope_scaling=SCALING)
    b, _ = tiny(tied=False, seed=5, rope_scaling=SCALING)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    with torch.device("meta"):
        m = Llama3ForCausalLM(a.config)
    m = m.to_empty(device="cpu")
    m.rebuild_buffers()
    assert torch.equal(m.rotary.inv_freq, a.rotary.inv_freq)
