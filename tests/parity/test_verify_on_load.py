"""`posttrain run` verifies a model.path checkpoint on first load: once per checkpoint (cached by content),
skipped with model.verify: false, and a definition that fails is refused with the module to look at."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from posttrain.config import ModelConfig
from posttrain.errors import ModelError
from posttrain.models import verify, verify_on_load
from posttrain.models.hf_io import build_model, save_pretrained
from posttrain.models.verify import TINY_CONFIGS
from posttrain.parallel.build import build_model_for


@pytest.fixture
def checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A tiny Qwen3 checkpoint, and an empty verify cache of its own."""
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    model, config = build_model("qwen3", {**TINY_CONFIGS["qwen3"], "tie_word_embeddings": False})
    save_pretrained(model, config, tmp_path / "ckpt")
    return tmp_path / "ckpt"


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Paths verify_dir actually ran on (a cache hit adds nothing)."""
    seen: list[Path] = []
    original = verify.verify_dir

    def counting(path, *args, **kwargs):
        seen.append(Path(path))
        return original(path, *args, **kwargs)

    monkeypatch.setattr(verify, "verify_dir", counting)
    return seen


def test_first_load_verifies_and_caches(checkpoint: Path, calls: list[Path], tmp_path: Path) -> None:
    note = verify_on_load.verify_on_load(checkpoint)
    assert calls == [checkpoint] and note.startswith("model definition verified against transformers")
    files = list((tmp_path / "cache" / "verify").glob("*.json"))
    assert len(files) == 1
    record = json.loads(files[0].read_text())
    assert record["passed"] is True and record["gates"] == {"fp64": True, "fp32": True, "fp32_packed": True}
    assert record["fp64_rel_diff"] <= verify.FP64_REL_TOL and record["bf16"] is None

    # The same content elsewhere is the same checkpoint: no second verification.
    copy = shutil.copytree(checkpoint, tmp_path / "copy")
    assert "cached verdict" in verify_on_load.verify_on_load(copy)
    assert calls == [checkpoint]
    assert verify_on_load.checkpoint_key(copy) == verify_on_load.checkpoint_key(checkpoint)


def test_changed_weights_are_verified_again(checkpoint: Path, calls: list[Path]) -> None:
    verify_on_load.verify_on_load(checkpoint)
    key = verify_on_load.checkpoint_key(checkpoint)
    torch.manual_seed(1)
    model, config = build_model("qwen3", {**TINY_CONFIGS["qwen3"], "tie_word_embeddings": False})
    save_pretrained(model, config, checkpoint)
    assert verify_on_load.checkpoint_key(checkpoint) != key
    verify_on_load.verify_on_load(checkpoint)
    assert len(calls) == 2


def test_broken_definition_is_refused(checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original = verify._load_ours

    def broken(path, dtype, device="cpu"):
        model = original(path, dtype, device)
        model.layers[2].attention_norm.eps = 0.1
        return model

    monkeypatch.setattr(verify, "_load_ours", broken)
    with pytest.raises(ModelError) as err:
        verify_on_load.verify_on_load(checkpoint)
    message = str(err.value)
    assert "first diverging module: layers.2.attention_norm" in message
    assert "model.verify: false" in message and "posttrain verify-model --hf-dir" in message
    with pytest.raises(ModelError):  # the failed verdict is cached too: refused again, without re-running
        monkeypatch.setattr(verify, "verify_dir", lambda *a, **k: pytest.fail("re-verified a cached verdict"))
        verify_on_load.verify_on_load(checkpoint)


def test_build_model_for_verifies_once_and_verify_false_skips(
    checkpoint: Path, calls: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from posttrain.data.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir("builtin")
    built = build_model_for(ModelConfig(path=str(checkpoint)), tokenizer, seed=0)
    assert calls == [checkpoint] and built.notes[0].startswith("model definition verified")
    build_model_for(ModelConfig(path=str(checkpoint)), tokenizer, seed=0)
    assert calls == [checkpoint]  # second load: cache hit

    monkeypatch.setattr(verify_on_load, "verify_on_load", lambda p: pytest.fail("verify: false must skip"))
    built = build_model_for(ModelConfig(path=str(checkpoint), verify=False), tokenizer, seed=0)
    assert not any("verified" in note for note in built.notes)
