"""Residual k-means semantic IDs: deterministic, unique per item, collision handling, and the event
vocabulary's round trip through save/load and through a saved tokenizer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import tokenizer

from posttrain.data.tokenizer import Tokenizer
from posttrain.errors import ConfigError, ModelError
from posttrain.events.semantic_ids import EventVocab, build_vocab, residual_kmeans, resolve_collisions
from posttrain.events.sequences import token_table


def features(n: int = 300, seed: int = 0) -> np.ndarray:
    """Clustered vectors: 6 centres, each item a centre plus noise."""
    rng = np.random.default_rng(seed)
    centres = 3.0 * rng.normal(size=(6, 8))
    return centres[rng.integers(0, 6, n)] + rng.normal(size=(n, 8))


def vocab(item_tokens: str = "semantic_ids", n: int = 300, **kw) -> EventVocab:
    args = dict(levels=3, codes=8, kmeans_iters=20, seed=0) | kw
    return build_vocab(
        item_tokens=item_tokens,
        items=[f"i{i}" for i in range(n)],
        features=features(n),
        event_types=["play", "view"],
        gap_edges_s=[60.0, 3600.0],
        **args,
    )


def test_residual_levels_shrink_the_quantisation_error_and_are_seeded():
    x = features()
    codes, centroids = residual_kmeans(x, levels=3, codes=8, iters=20, seed=0)
    again, _ = residual_kmeans(x, levels=3, codes=8, iters=20, seed=0)
    assert np.array_equal(codes, again)
    errors, recon = [], np.zeros_like(x)
    for level, c in enumerate(centroids):
        recon = recon + c[codes[:, level]]
        errors.append(float(((x - recon) ** 2).sum(1).mean()))
    print("mean squared error after each level:", [round(e, 3) for e in errors])
    assert errors[0] < 0.2 * float(((x - x.mean(0)) ** 2).sum(1).mean())  # the 6 clusters are found
    assert errors[0] > errors[1] > errors[2]
    assert all(len(np.unique(codes[:, level])) == 8 for level in range(3))  # no dead codes


def test_every_item_gets_a_unique_code_even_with_identical_features():
    v = vocab()
    assert len({tuple(c) for c in v.codes.tolist()}) == 300
    # Three items with the same features must still get three codes, differing at the last level only.
    x = np.vstack([features(50), np.repeat(features(1, seed=9), 3, axis=0)])
    same = build_vocab(
        item_tokens="semantic_ids", items=[f"i{i}" for i in range(53)], features=x, event_types=["play"],
        gap_edges_s=[60.0], levels=2, codes=8, kmeans_iters=10, seed=0,
    )  # fmt: skip
    last3 = same.codes[-3:]
    assert len({tuple(c) for c in last3.tolist()}) == 3 and len(set(last3[:, 0])) == 1
    assert same.collisions_resolved >= 2


def test_collisions_move_to_the_nearest_free_code_even_under_another_prefix():
    # 1-D features, 2 levels of 2 codes: level 0 centres 0 and 10, level 1 centres -1 and +1.
    centroids = [np.array([[0.0], [10.0]]), np.array([[-1.0], [1.0]])]
    x = np.array([[1.0], [1.2], [0.5]])
    codes = np.array([[0, 1], [0, 1], [0, 1]])  # all three land on (0, 1)
    fixed, moved = resolve_collisions(x, codes, centroids)
    # 1.0 sits on (0, 1) exactly and keeps it; 1.2 takes the free (0, 0); 0.5 finds prefix 0 full and
    # moves to the nearest code under prefix 1: residual 0.5 - 10 = -9.5 is nearest -1, so (1, 0).
    assert fixed.tolist() == [[0, 1], [0, 0], [1, 0]] and moved == 2
    with pytest.raises(ConfigError, match=r"5 items but only 2\^2 = 4 codes"):
        resolve_collisions(np.zeros((5, 1)), np.zeros((5, 2), dtype=np.int64), centroids)


def test_vocab_round_trips_and_encodes_new_items(tmp_path: Path):
    v = vocab()
    v.save(tmp_path)
    back = EventVocab.load(tmp_path)
    assert back.items == v.items and np.array_equal(back.codes, v.codes)
    assert back.tokens() == v.tokens() and back.gap_edges_s == v.gap_edges_s
    assert back.event_types == v.event_types and back.collisions_resolved == v.collisions_resolved
    # The saved quantiser reproduces the codes of items that kept their nearest-centroid codes.
    enc = back.encode_features(features())
    kept = np.all(enc == v.codes, axis=1)
    assert kept.sum() >= 300 - v.collisions_resolved
    assert v.tokens()[:4] == ["<gap_first>", "<gap_0>", "<gap_1>", "<gap_2>"]
    assert v.code_token(2, 5) == "<sid_21>" and v.gap_bucket(None) == 0
    assert [v.gap_bucket(s) for s in (0.0, 59.9, 60.0, 3599.0, 1e9)] == [1, 1, 2, 2, 3]
    with pytest.raises(ModelError, match="no event_vocab.json"):
        EventVocab.load(tmp_path / "missing")


def test_one_token_per_item_mode():
    v = vocab("one_per_item", n=40, levels=3, codes=8)
    assert v.codes.shape == (40, 1) and v.codes[:, 0].tolist() == list(range(40))
    assert v.code_token(0, 7) == "<item_7>" and v.quantiser is None


def test_tokens_go_through_the_vocabulary_service_and_survive_a_saved_tokenizer(tmp_path: Path):
    v = vocab()
    base = tokenizer().vocab_size
    tok = Tokenizer.from_dir("builtin", v.tokens())
    assert tok.vocab_size == base + len(v.tokens())  # 4 gaps + 2 event types + 3 x 8 codes
    table = token_table(v, tok)
    tok.save(tmp_path)
    again = token_table(EventVocab.load(v.save(tmp_path).parent), Tokenizer.from_dir(tmp_path, v.tokens()))
    assert np.array_equal(table.item_code_ids, again.item_code_ids) and table.gap_ids == again.gap_ids
    assert tok.decode(table.item_code_ids[0].tolist(), skip_special_tokens=False) == "".join(
        v.code_token(level, c) for level, c in enumerate(v.codes[0])
    )
    with pytest.raises(ModelError, match="lacks 30 event tokens"):
        token_table(v, tokenizer())
