"""Heads: scalar and classification heads score like transformers' ...ForSequenceClassification for every
family, round-trip through our HF export, and pool per document in packed rows."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from posttrain.errors import ModelError
from posttrain.models import heads
from posttrain.models.hf_io import build_model, load_pretrained, save_pretrained, save_sequence_classifier
from posttrain.models.verify import TINY_CONFIGS

PAD = 0


def tiny_with_head(family: str, num_outputs: int, tied: bool = False):
    torch.manual_seed(0)
    model, config = build_model(family, {**TINY_CONFIGS[family], "tie_word_embeddings": tied})
    heads.add_head(model, "score", heads.ScoreHead(config.hidden_size, num_outputs))
    return model.eval(), config


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
@pytest.mark.parametrize("num_outputs", [1, 3])
def test_sequence_classifier_export_scores_like_transformers(tmp_path: Path, family: str, num_outputs: int):
    """Right-padded batch: HF pools at the last non-pad token; ours pools each document's last token."""
    from transformers import AutoModelForSequenceClassification

    model, config = tiny_with_head(family, num_outputs)
    save_sequence_classifier(model, config, "score", tmp_path, pad_token_id=PAD)
    hf = AutoModelForSequenceClassification.from_pretrained(
        tmp_path, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    assert hf.config.num_labels == num_outputs
    gen = torch.Generator().manual_seed(1)
    lens = [19, 12]
    ids = torch.full((2, 19), PAD)
    for r, n in enumerate(lens):
        ids[r, :n] = torch.randint(1, config.vocab_size, (n,), generator=gen)
    with torch.no_grad():
        ref = hf(ids).logits
        ours = torch.cat(
            [
                heads.pooled_scores(model.heads["score"](model(ids[r : r + 1, :n])), [[n]])
                for r, n in enumerate(lens)
            ]
        )
    assert ours.shape == ref.shape == (2, num_outputs)
    assert (ours - ref).abs().max().item() <= 1e-4


def test_packed_row_pools_each_document(tmp_path: Path):
    """Three documents packed in one row give the same scores as each document alone."""
    model, config = tiny_with_head("qwen3", 1)
    doc_lens = [7, 13, 5]
    gen = torch.Generator().manual_seed(2)
    docs = [torch.randint(1, config.vocab_size, (1, n), generator=gen) for n in doc_lens]
    positions = torch.cat([torch.arange(n) for n in doc_lens]).unsqueeze(0)
    doc_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(doc_lens)]).unsqueeze(0)
    with torch.no_grad():
        packed = heads.pooled_scores(
            model.heads["score"](model(torch.cat(docs, 1), positions, doc_ids)), [doc_lens]
        )
        alone = torch.cat([model.heads["score"](model(d))[:, -1] for d in docs])
    assert packed.shape == (3, 1)
    assert (packed - alone).abs().max().item() <= 1e-5
    rows, cols = heads.last_token_index([doc_lens, [4]])
    assert rows.tolist() == [0, 0, 0, 1] and cols.tolist() == [6, 19, 24, 3]


def test_heads_round_trip_with_the_checkpoint(tmp_path: Path):
    """save_pretrained writes heads.safetensors; load_pretrained re-attaches them bit for bit."""
    model, config = tiny_with_head("llama3", 4)
    heads.add_head(model, "value", heads.ScoreHead(config.hidden_size, 1))
    save_pretrained(model, config, tmp_path)
    assert (tmp_path / heads.HEADS_INDEX).is_file()
    loaded, _ = load_pretrained(tmp_path)
    assert sorted(loaded.heads) == ["score", "value"]
    for name in ("score", "value"):
        assert torch.equal(loaded.heads[name].weight, model.heads[name].weight)
    # The causal-LM weights themselves carry no head keys: transformers loads them without warnings.
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "heads" in k or k.startswith("score")]


def test_head_is_trainable_and_custom_heads_are_refused_on_export(tmp_path: Path):
    """A head gets gradients with the body; a custom module head cannot silently vanish on export."""
    model, config = tiny_with_head("qwen3", 1)
    model.train()
    ids = torch.randint(1, config.vocab_size, (2, 9))
    model.heads["score"](model(ids))[:, -1].sum().backward()
    assert model.heads["score"].weight.grad.abs().sum() > 0
    heads.add_head(model, "mine", nn.Linear(config.hidden_size, 2))
    with pytest.raises(ModelError, match="only ScoreHead"):
        save_pretrained(model, config, tmp_path)
    with pytest.raises(ModelError, match="already has a head named 'mine'"):
        heads.add_head(model, "mine", nn.Linear(config.hidden_size, 2))
