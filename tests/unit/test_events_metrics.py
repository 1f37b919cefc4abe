"""recall@k and NDCG@k on hand-computed cases, and the baselines' rankings on a tiny log."""

from __future__ import annotations

import math

import pytest

from posttrain.events.metrics import (
    baseline_rankings,
    metrics_by_group,
    ndcg_at_k,
    ranking_metrics,
    recall_at_k,
)


def test_single_target_hits_and_discounts():
    # Query 1: target 7 at rank 1; query 2: target 3 at rank 3; query 3: target 9 not ranked.
    ranked = [[7, 1, 2, 5], [4, 8, 3, 0], [1, 2, 3, 4]]
    targets = [7, 3, 9]
    m = ranking_metrics(ranked, targets, ks=[1, 2, 3, 4])
    assert m["recall@1"] == pytest.approx(1 / 3)
    assert m["recall@2"] == pytest.approx(1 / 3)
    assert m["recall@3"] == pytest.approx(2 / 3)
    assert m["recall@4"] == pytest.approx(2 / 3)
    assert m["ndcg@1"] == pytest.approx(1 / 3)
    assert m["ndcg@2"] == pytest.approx(1 / 3)
    # rank 3 -> 1 / log2(4) = 0.5
    assert m["ndcg@3"] == pytest.approx((1.0 + 0.5 + 0.0) / 3)
    assert m["ndcg@4"] == pytest.approx(0.5)


def test_several_relevant_items_use_the_ideal_dcg():
    # Relevant {1, 2}; ranked [1, 9, 2]: DCG@3 = 1 + 1/log2(4) = 1.5, IDCG@3 = 1 + 1/log2(3).
    ranked, relevant = [[1, 9, 2]], [{1, 2}]
    assert recall_at_k(ranked, relevant, 1) == pytest.approx(0.5)
    assert recall_at_k(ranked, relevant, 3) == pytest.approx(1.0)
    assert ndcg_at_k(ranked, relevant, 3) == pytest.approx(1.5 / (1 + 1 / math.log2(3)))
    # Only one slot: IDCG@1 = 1, and the first item is relevant.
    assert ndcg_at_k(ranked, relevant, 1) == pytest.approx(1.0)
    # A perfect ranking scores 1 at every k.
    assert ndcg_at_k([[2, 1, 5]], [{1, 2}], 2) == pytest.approx(1.0)


def test_metrics_by_group_splits_queries():
    m = metrics_by_group([[1, 2], [3, 4], [5, 6]], [1, 4, 0], ["play", "view", "play"], ks=[1, 2])
    assert m["recall@2"] == pytest.approx(2 / 3)
    assert m["recall@1/play"] == pytest.approx(0.5) and m["recall@2/view"] == pytest.approx(1.0)
    assert m["ndcg@2/view"] == pytest.approx(1 / math.log2(3))
    assert m["num_queries"] == 3 and m["num_queries/play"] == 2


def test_baselines_on_a_tiny_log():
    train = [[1, 2, 3, 2], [2, 3, 4], [5, 2, 3]]  # counts: 2 x4, 3 x3, 1/4/5 x1; 2 -> 3 three times
    queries = [[1, 2, 3, 2], [5]]
    ranked = baseline_rankings(queries, train, k=4)
    assert ranked["popularity"] == [[2, 3, 1, 4], [2, 3, 1, 4]]  # ties broken by the lower item index
    # Most recent distinct items first, then popular ones not already listed.
    assert ranked["last_item"] == [[2, 3, 1, 4], [5, 2, 3, 1]]
    # What followed the last item in training: after 2 came 3 (x3); after 5 came 2.
    assert ranked["transition"] == [[3, 2, 1, 4], [2, 3, 1, 4]]
