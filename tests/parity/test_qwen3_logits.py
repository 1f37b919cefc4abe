"""Qwen3 parity: our definition vs transformers' Qwen3ForCausalLM, packing invariance, and HF checkpoint I/O."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from posttrain.errors import ModelError
from posttrain.models.hf_io import build_model, load_pretrained, save_pretrained
from posttrain.models.qwen3 import Qwen3Config, Qwen3ForCausalLM, from_hf_state_dict, to_hf_state_dict
from posttrain.models.verify import TINY_CONFIGS, main, verify_family

TOL_FP32 = 1e-4


def tiny(tied: bool, seed: int = 0) -> tuple[Qwen3ForCausalLM, Qwen3Config]:
    torch.manual_seed(seed)
    model, config = build_model("qwen3", {**TINY_CONFIGS["qwen3"], "tie_word_embeddings": tied})
    return model.eval(), config


@pytest.mark.parametrize("tied", [False, True])
def test_logits_match_transformers(tmp_path: Path, tied: bool) -> None:
    from transformers import AutoModelForCausalLM

    model, config = tiny(tied)
    save_pretrained(model, config, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    assert type(hf).__name__ == "Qwen3ForCausalLM"
    assert hf.config.tie_word_embeddings is tied
    ids_BT = torch.randint(0, config.vocab_size, (2, 33), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model.logits(model(ids_BT))
        ref = hf(ids_BT).logits
    assert ours.shape == ref.shape == (2, 33, config.vocab_size)
    assert (ours - ref).abs().max().item() <= TOL_FP32


def test_packed_row_equals_documents_alone() -> None:
    model, config = tiny(tied=False)
    gen = torch.Generator().manual_seed(2)
    lens = [5, 11, 8]
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


def test_verify_family_passes() -> None:
    report = verify_family("qwen3", seed=3)
    assert report.passed, report.format()
    assert report.max_abs_diff_logits <= TOL_FP32 and report.max_abs_diff_packed <= TOL_FP32
    assert report.first_diverging is None


def test_verify_names_first_diverging_layer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from posttrain.models import verify

    model, config = tiny(tied=True)
    save_pretrained(model, config, tmp_path)

    def drifted_load(path, dtype, device="cpu"):  # break our copy only: HF keeps the saved weights
        ours = load_pretrained(path, dtype=dtype)[0].eval()
        with torch.no_grad():
            ours.layers[1].mlp.up_proj.weight.add_(0.5)
        return ours

    monkeypatch.setattr(verify, "_load_ours", drifted_load)
    report = verify.verify_dir(tmp_path, 0, sizes=verify.TINY_SIZES, bf16=False)
    assert not report.passed and report.max_abs_diff_logits > TOL_FP32
    assert report.first_diverging == "layers.1.mlp.up_proj"


def test_verify_cli_on_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, config = tiny(tied=False)
    save_pretrained(model, config, tmp_path)
    assert main(["--hf-dir", str(tmp_path)]) == 0
    assert "PASSED" in capsys.readouterr().out


def test_verify_cli_exits_1_and_names_the_module_when_ours_drifts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A definition that drifts from transformers (here: our load of the checkpoint gets layer 1's MLP
    perturbed, transformers' does not) fails the CLI with exit code 1 and the first diverging module."""
    from posttrain.models import verify

    model, config = tiny(tied=False)
    save_pretrained(model, config, tmp_path)

    def drifted_load(path, dtype, device="cpu"):
        ours = load_pretrained(path, dtype=dtype)[0].eval()
        with torch.no_grad():
            ours.layers[1].mlp.up_proj.weight.add_(0.5)
        return ours

    monkeypatch.setattr(verify, "_load_ours", drifted_load)
    assert main(["--hf-dir", str(tmp_path), "--no-bf16"]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "first diverging module: layers.1.mlp.up_proj" in out


@pytest.mark.parametrize("tied", [False, True])
def test_save_load_round_trip_bitwise(tmp_path: Path, tied: bool) -> None:
    model, config = tiny(tied)
    save_pretrained(
        model, config, tmp_path, token_ids={"eos_token_id": 2}, generation_config={"max_new_tokens": 8}
    )
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["model_type"] == "qwen3" and written["eos_token_id"] == 2
    assert (tmp_path / "generation_config.json").is_file()
    loaded, loaded_config = load_pretrained(tmp_path)
    assert loaded_config == config
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert torch.equal(loaded.rotary.inv_freq, model.rotary.inv_freq)
    ids = torch.randint(0, config.vocab_size, (1, 9))
    with torch.no_grad():
        assert torch.equal(model(ids), loaded(ids))


def test_sharded_save_writes_index_and_loads(tmp_path: Path) -> None:
    model, config = tiny(tied=False)
    save_pretrained(model, config, tmp_path, max_shard_bytes=64 * 1024)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard_files = set(index["weight_map"].values())
    assert len(shard_files) > 1 and not (tmp_path / "model.safetensors").exists()
    assert all((tmp_path / f).is_file() for f in shard_files)
    assert set(index["weight_map"]) == set(to_hf_state_dict(model.state_dict(), config))
    loaded, _ = load_pretrained(tmp_path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name


def test_load_bf16(tmp_path: Path) -> None:
    model, config = tiny(tied=True)
    save_pretrained(model, config, tmp_path)
    loaded, _ = load_pretrained(tmp_path, dtype=torch.bfloat16)
    assert loaded.tok_embeddings.weight.dtype == torch.bfloat16
    assert loaded.rotary.inv_freq.dtype == torch.float32
    assert torch.equal(loaded.tok_embeddings.weight, model.tok_embeddings.weight.to(torch.bfloat16))


def test_from_hf_state_dict_missing_key_names_it() -> None:
    model, config = tiny(tied=True)
    hf_sd = to_hf_state_dict(model.state_dict(), config)
    del hf_sd["model.layers.1.self_attn.k_norm.weight"]
    with pytest.raises(ModelError, match=r"layers\.1\.attention\.k_norm\.weight"):
        from_hf_state_dict(hf_sd, config)


def test_from_hf_state_dict_tied_ignores_lm_head_and_rejects_unknown() -> None:
    model, config = tiny(tied=True)
    hf_sd = to_hf_state_dict(model.state_dict(), config)
    assert "lm_head.weight" not in hf_sd
    ours = from_hf_state_dict({**hf_sd, "lm_head.weight": torch.zeros(1)}, config)
    assert set(ours) == set(model.state_dict())
    with pytest.raises(ModelError, match="model.layers.9.mlp.up_proj.weight"):
        from_hf_state_dict({**hf_sd, "model.layers.9.mlp.up_proj.weight": torch.zeros(1)}, config)


def test_load_pretrained_missing_dir_names_path(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelError, match="no-such-model"):
        load_pretrained(missing)


def test_load_pretrained_unsupported_model_type(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    with pytest.raises(ModelError, match="mamba"):
        load_pretrained(tmp_path)


@pytest.mark.parametrize(
    ("change", "feature"),
    [
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}}, "yarn"),
        ({"attention_bias": True}, "attention_bias"),
        ({"use_sliding_window": True}, "sliding"),
    ],
)
def test_config_rejects_unsupported_features(change: dict, feature: str) -> None:
    d = Qwen3Config(**TINY_CONFIGS["qwen3"]).to_hf_dict()
    with pytest.raises(ModelError, match=feature):
        Qwen3Config.from_hf_dict({**d, **change})


def test_config_reads_old_and_new_rope_spelling() -> None:
    base = Qwen3Config(**TINY_CONFIGS["qwen3"], rope_theta=500_000.0).to_hf_dict()
    old = {k: v for k, v in base.items() if k != "rope_parameters"}
    new = {k: v for k, v in base.items() if k not in ("rope_theta", "rope_scaling")}
    assert Qwen3Config.from_hf_dict(old).rope_theta == 500_000.0
    assert Qwen3Config.from_hf_dict(new).rope_theta == 500_000.0


def test_num_params_matches_module() -> None:
    for tied in (False, True):
        model, config = tiny(tied)
        assert config.num_params() == sum(p.numel() for p in model.parameters())


def test_init_weights_deterministic_and_meta_rebuild() -> None:
    a, _ = tiny(tied=False, seed=5)
    b, _ = tiny(tied=False, seed=5)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    with torch.device("meta"):
        m = Qwen3ForCausalLM(a.config)
    m = m.to_empty(device="cpu")
    m.rebuild_buffers()
    assert torch.equal(m.rotary.inv_freq, a.rotary.inv_freq)
