"""The verifier's gates have teeth: each kind of definition bug fails the right gate and the report names
the module where it starts; the JSON report carries every number.

Bugs are injected into OUR copy only (transformers loads the saved checkpoint untouched) by replacing
verify._load_ours, so every check below runs the real verify_dir on a tiny saved checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from posttrain.models import verify
from posttrain.models.hf_io import MODEL_TYPES, build_model, save_pretrained
from posttrain.models.verify import FP64_REL_TOL, TINY_CONFIGS, TINY_SIZES, main, verify_dir
from posttrain.models.verify_inputs import VerifyInputs


def saved(tmp_path: Path, family: str, tied: bool = False) -> Path:
    torch.manual_seed(0)
    model, config = build_model(MODEL_TYPES[family], {**TINY_CONFIGS[family], "tie_word_embeddings": tied})
    save_pretrained(model, config, tmp_path)
    return tmp_path


def broken_load(monkeypatch: pytest.MonkeyPatch, bug, only: torch.dtype | None = None) -> None:
    """Apply bug(model) to every load of ours (or only to loads in dtype `only`)."""
    original = verify._load_ours

    def load(path, dtype, device="cpu"):
        model = original(path, dtype, device)
        if only is None or dtype == only:
            with torch.no_grad():
                bug(model)
        return model

    monkeypatch.setattr(verify, "_load_ours", load)


def test_norm_eps_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A wrong epsilon in layer 1's pre-MLP norm (1e-1 instead of 1e-5): fp64 fails, and the walk names
    that norm, not the layer or the logits."""
    saved(tmp_path, "llama3")
    broken_load(monkeypatch, lambda m: setattr(m.layers[1].mlp_norm, "eps", 1e-1))
    report = verify_dir(tmp_path, 0, sizes=TINY_SIZES, bf16=False)
    assert not report.passed and not report.gates["fp64"]
    assert report.fp64_rel_diff > 1e-4
    assert report.first_diverging == "layers.1.mlp_norm"


def test_rotary_base_is_named_as_the_code_after_the_projections(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RoPE has no parameters: q/k/v projections agree, o_proj's input (attention output) does not."""
    saved(tmp_path, "qwen3")

    def bug(model):
        model.rotary.rope_theta *= 2
        model.rebuild_buffers()

    broken_load(monkeypatch, bug)
    report = verify_dir(tmp_path, 0, sizes=TINY_SIZES, bf16=False)
    assert not report.gates["fp64"]
    assert report.first_diverging.startswith(
        "layers.0: between layers.0.attention.k_norm and layers.0.attention.o_proj"
    )


def test_gemma_embedding_scale_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    saved(tmp_path, "gemma3")
    broken_load(monkeypatch, lambda m: setattr(m, "embed_scale", m.embed_scale * 1.001))
    report = verify_dir(tmp_path, 0, sizes=TINY_SIZES, bf16=False)
    assert not report.gates["fp64"]
    assert report.first_diverging == "tok_embeddings (embedding lookup or its scale)"


def test_fp32_only_error_fails_the_fp32_gate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An error of 1e-4 relative in one fp32 weight (fp64 untouched): ~100x transformers' own fp32 error,
    far below the old absolute 1e-4 on logits of scale ~1. The fp32 gate catches it and names the module."""
    saved(tmp_path, "qwen3")
    broken_load(monkeypatch, lambda m: m.layers[1].mlp.up_proj.weight.mul_(1 + 1e-4), only=torch.float32)
    report = verify_dir(tmp_path, 0, sizes=TINY_SIZES, bf16=False)
    assert report.gates["fp64"] and report.fp64_rel_diff == 0.0
    assert not report.gates["fp32"], report.format()
    assert report.fp32_ours_err > report.fp32_bound > 2 * report.fp32_hf_err
    assert report.first_diverging == "fp32 only: layers.1.mlp.up_proj"


def test_packing_bug_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Doc ids dropped from our packed row (later documents see earlier ones): every row as it is passes,
    the packed pieces do not. (Positions that fail to restart would NOT show: RoPE only sees offsets.)"""
    saved(tmp_path, "llama3")
    packed = VerifyInputs.packed

    def leaky(self):
        ids, positions, doc_ids = packed(self)
        return ids, positions, torch.zeros_like(doc_ids)

    monkeypatch.setattr(VerifyInputs, "packed", leaky)
    report = verify_dir(tmp_path, 0, sizes=TINY_SIZES, bf16=False)
    assert report.gates["fp64"] and report.gates["fp32"] and not report.gates["fp32_packed"]
    assert report.packed_ours_err > 1e-3
    assert report.first_diverging == "packing (attention mask or per-document positions)"


def test_json_report_has_every_number(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    saved(tmp_path, "qwen3_moe", tied=True)
    assert main(["--hf-dir", str(tmp_path), "--seed", "0", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] is True and report["first_diverging"] is None and report["seeds"] == [0, 1]
    assert set(report["gates"]) == {"fp64", "fp32", "fp32_packed", "routing", "bf16"}
    assert report["fp64_rel_diff"] <= FP64_REL_TOL and report["routing_mismatches"] == 0
    assert (
        report["fp32_ours_err"] <= report["fp32_bound"]
        and report["packed_ours_err"] <= report["packed_bound"]
    )
    bf16 = report["bf16"]
    for key in ("max_abs_diff", "mean_abs_diff", "top1_agreement", "kl_mean", "kl_bound", "top1_bound"):
        assert key in bf16
    assert bf16["kl_mean"] <= bf16["kl_bound"] and bf16["top1_agreement"] >= bf16["top1_bound"]
    # REAL_SIZES without a tokenizer: a random row of 256 ids in place of the text, then per seed a random
    # row of 64 ids and a packed row of 48 + 16 + 64 tokens
    assert report["num_tokens"] == 256 + 2 * (64 + 128)


def test_real_text_rows_come_from_the_checkpoint_tokenizer(tmp_path: Path) -> None:
    """With a tokenizer beside the weights, the text row is BUILTIN_TEXT through it (bos first, repeated
    to length); a tokenizer that emits ids past the model's vocabulary, or none at all, gives no text row."""
    from transformers import AutoTokenizer

    from posttrain.data.embedded_tokenizer import embedded_tokenizer_dir
    from posttrain.models.verify_inputs import BUILTIN_TEXT, text_ids

    tokenizer = AutoTokenizer.from_pretrained(str(embedded_tokenizer_dir()))
    tokenizer.save_pretrained(str(tmp_path))
    encoded = tokenizer.encode(BUILTIN_TEXT, add_special_tokens=False)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ids = text_ids(tmp_path, vocab_size=len(tokenizer), num_tokens=len(encoded) + 40)
    assert ids == (bos + encoded + encoded)[: len(encoded) + 40]
    assert text_ids(tmp_path, vocab_size=10, num_tokens=40) is None
    assert text_ids(tmp_path / "missing", vocab_size=10**6, num_tokens=40) is None
