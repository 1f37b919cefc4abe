"""Next-item metrics and the baselines a sequence model has to beat.

For a query with relevant items R and a ranked list r_1, r_2, ... (best first):

    recall@k = |{r_1..r_k} ∩ R| / |R|
    DCG@k    = sum_{i <= k, r_i in R} 1 / log2(i + 1)
    NDCG@k   = DCG@k / IDCG@k,   IDCG@k = sum_{i <= min(k, |R|)} 1 / log2(i + 1)

and both are averaged over queries. With one held-out item per query (next-item prediction) recall@k is
the hit rate and NDCG@k is 1 / log2(rank + 1) when the item ranks within k, else 0.

Baselines (each returns the top `k` item indices per query, ties broken by lower item index):

* popularity -- the most frequent items of the training events, the same list for every query;
* last_item  -- the user's own items, most recent first (rank 1 = repeat the last item), then popular ones;
* transition -- items that most often followed the user's last item in training (first-order Markov),
  then popular ones.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence

import numpy as np


def recall_at_k(ranked: Sequence[Sequence[int]], relevant: Sequence[set[int]], k: int) -> float:
    """Mean over queries of the share of relevant items ranked in the top k."""
    if not ranked:
        return 0.0
    scores = [len(set(r[:k]) & rel) / len(rel) for r, rel in zip(ranked, relevant)]
    return float(np.mean(scores))


def ndcg_at_k(ranked: Sequence[Sequence[int]], relevant: Sequence[set[int]], k: int) -> float:
    """Mean over queries of DCG@k / IDCG@k with binary relevance (see the module docstring)."""
    if not ranked:
        return 0.0
    scores = []
    for r, rel in zip(ranked, relevant):
        dcg = sum(1.0 / np.log2(i + 2) for i, item in enumerate(r[:k]) if item in rel)
        idcg = sum(1.0 / np.log2(i + 2) for i in range(min(k, len(rel))))
        scores.append(dcg / idcg)
    return float(np.mean(scores))


def ranking_metrics(
    ranked: Sequence[Sequence[int]], targets: Sequence[int], ks: Sequence[int]
) -> dict[str, float]:
    """{"recall@k", "ndcg@k"} for each k, one target item per query."""
    relevant = [{int(t)} for t in targets]
    out: dict[str, float] = {}
    for k in ks:
        out[f"recall@{k}"] = recall_at_k(ranked, relevant, k)
        out[f"ndcg@{k}"] = ndcg_at_k(ranked, relevant, k)
    return out


def metrics_by_group(
    ranked: Sequence[Sequence[int]], targets: Sequence[int], groups: Sequence[str], ks: Sequence[int]
) -> dict[str, float]:
    """ranking_metrics over all queries, plus `recall@k/<group>` etc. over each group's queries."""
    out = ranking_metrics(ranked, targets, ks)
    for g in sorted(set(groups)):
        idx = [i for i, x in enumerate(groups) if x == g]
        sub = ranking_metrics([ranked[i] for i in idx], [targets[i] for i in idx], ks)
        out |= {f"{name}/{g}": value for name, value in sub.items()}
        out[f"num_queries/{g}"] = len(idx)
    out["num_queries"] = len(targets)
    return out


def _top(counts: Counter, k: int, exclude: Sequence[int] = ()) -> list[int]:
    skip = set(exclude)
    ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return [item for item, _ in ordered if item not in skip][:k]


def popularity_ranking(train_histories: Sequence[Sequence[int]], num_queries: int, k: int) -> list[list[int]]:
    counts = Counter(i for h in train_histories for i in h)
    top = _top(counts, k)
    return [list(top) for _ in range(num_queries)]


def last_item_ranking(
    query_histories: Sequence[Sequence[int]], train_histories: Sequence[Sequence[int]], k: int
) -> list[list[int]]:
    popular = _top(Counter(i for h in train_histories for i in h), 2 * k)  # k spare after exclusions
    out = []
    for history in query_histories:
        recent = list(dict.fromkeys(reversed(history)))[:k]  # distinct, most recent first
        out.append(recent + [i for i in popular if i not in set(recent)][: k - len(recent)])
    return out


def transition_ranking(
    query_histories: Sequence[Sequence[int]], train_histories: Sequence[Sequence[int]], k: int
) -> list[list[int]]:
    follows: dict[int, Counter] = defaultdict(Counter)
    for h in train_histories:
        for a, b in zip(h, h[1:]):
            follows[a][b] += 1
    popular = _top(Counter(i for h in train_histories for i in h), 2 * k)  # k spare after exclusions
    out = []
    for history in query_histories:
        nxt = _top(follows[history[-1]], k) if history else []
        out.append(nxt + [i for i in popular if i not in set(nxt)][: k - len(nxt)])
    return out


def baseline_rankings(
    query_histories: Sequence[Sequence[int]], train_histories: Sequence[Sequence[int]], k: int
) -> dict[str, list[list[int]]]:
    """Each baseline's top-k per query (see the module docstring)."""
    return {
        "popularity": popularity_ranking(train_histories, len(query_histories), k),
        "last_item": last_item_ranking(query_histories, train_histories, k),
        "transition": transition_ranking(query_histories, train_histories, k),
    }
