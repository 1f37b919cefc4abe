"""Items as tokens: residual k-means semantic IDs, and the event vocabulary saved with the model.

Semantic IDs (TIGER-style, with k-means instead of an RQ-VAE): item feature vectors are standardised,
clustered into K codes; the residuals (vector - its centroid) are clustered again, L times. An item's
code is the L cluster indices, coarse to fine, so items that share a prefix are similar and the model
can generalise across them. Codes must be unique per item: when several items land on the same L
codes, the one closest to its last centroid keeps it and the others move to the nearest *unused*
last-level code under the same prefix (an error names the prefix if it has more than K items).
`one_per_item` is the plain alternative for small catalogues: one level, one token per item.

Tokens (added to the tokenizer through the vocabulary service, posttrain/data/tokenizer.py +
posttrain/models/vocab.py, which pads the embedding to a multiple of 64):

    <gap_first>, <gap_0> ... <gap_G>   time since the user's previous event, bucketed by gap_edges_s
    <event_TYPE>                       one per event type
    <sid_N>                            level l, code c -> N = l * K + c   (semantic_ids)
    <item_N>                           item N                           (one_per_item)

`EventVocab.save(dir)` writes `event_vocab.json` (items, codes, event types, gap edges and the
quantiser: standardisation and centroids, so new items can be encoded later) next to the HF export;
`EventVocab.load(dir)` reads it back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from posttrain.errors import ConfigError, ModelError

VOCAB_FILE = "event_vocab.json"
FORMAT_VERSION = 1


# ------------------------------------------------------------------------------ k-means


def sq_dists(x_NF: np.ndarray, c_KF: np.ndarray) -> np.ndarray:
    """Squared distances [N, K] without an [N, K, F] temporary."""
    d = (x_NF**2).sum(1)[:, None] - 2.0 * x_NF @ c_KF.T + (c_KF**2).sum(1)[None]
    return np.maximum(d, 0.0)


def kmeans(x_NF: np.ndarray, k: int, iters: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(centroids [k, F], assignment [N]) by k-means++ seeding and Lloyd iterations. An empty cluster
    is re-seeded at the point farthest from its centroid, so all k codes stay in use when N >= k."""
    n = x_NF.shape[0]
    centroids = np.empty((k, x_NF.shape[1]))
    centroids[0] = x_NF[rng.integers(n)]
    d2 = ((x_NF - centroids[0]) ** 2).sum(1)
    for j in range(1, k):
        total = d2.sum()
        pick = rng.choice(n, p=d2 / total) if total > 0 else rng.integers(n)
        centroids[j] = x_NF[pick]
        d2 = np.minimum(d2, ((x_NF - centroids[j]) ** 2).sum(1))
    assign = np.zeros(n, dtype=np.int64)
    for _ in range(iters):
        dist_NK = sq_dists(x_NF, centroids)
        assign = dist_NK.argmin(1)
        counts = np.bincount(assign, minlength=k)
        for j in range(k):
            if counts[j]:
                centroids[j] = x_NF[assign == j].mean(0)
            elif n >= k:  # re-seed at the worst-fitted point
                far = int(dist_NK[np.arange(n), assign].argmax())
                centroids[j] = x_NF[far]
                assign[far] = j
    dist_NK = sq_dists(x_NF, centroids)
    return centroids, dist_NK.argmin(1)


def residual_kmeans(
    x_NF: np.ndarray, levels: int, codes: int, iters: int, seed: int
) -> tuple[np.ndarray, list[np.ndarray]]:
    """(codes [N, levels], centroids per level [codes, F])."""
    rng = np.random.default_rng(seed)
    residual = x_NF.copy()
    out = np.zeros((x_NF.shape[0], levels), dtype=np.int64)
    centroids = []
    for level in range(levels):
        c, a = kmeans(residual, codes, iters, rng)
        out[:, level] = a
        centroids.append(c)
        residual = residual - c[a]
    return out, centroids


def _nearest_free(
    x_F: np.ndarray, centroids: list[np.ndarray], used: set[tuple], prefix: tuple = ()
) -> tuple | None:
    """The first unused full code in a depth-first walk that tries, at every level, the codes nearest the
    residual first: the nearest free last-level code under the item's own prefix, else under the nearest
    alternative prefix, and so on up the levels."""
    level = len(prefix)
    order = np.argsort(sq_dists(x_F[None], centroids[level])[0], kind="stable")
    for c in order.tolist():
        code = (*prefix, c)
        if level == len(centroids) - 1:
            if code not in used:
                return code
        else:
            found = _nearest_free(x_F - centroids[level][c], centroids, used, code)
            if found is not None:
                return found
    return None


def resolve_collisions(
    x_NF: np.ndarray, codes_NL: np.ndarray, centroids: list[np.ndarray]
) -> tuple[np.ndarray, int]:
    """Unique codes: within each group of items sharing all L codes, the item nearest its last
    centroid keeps them and the others move to the nearest free code (`_nearest_free`: the same prefix
    when it has room). Returns (codes, number of items moved)."""
    n, L = codes_NL.shape
    k = centroids[-1].shape[0]
    if n > k**L:
        raise ConfigError(
            f"semantic IDs: {n} items but only {k}^{L} = {k**L} codes; raise events.semantic_id_codes or "
            "events.semantic_id_levels"
        )
    recon = sum(centroids[lv][codes_NL[:, lv]] for lv in range(L - 1)) if L > 1 else 0.0
    last_dist_N = ((x_NF - recon - centroids[-1][codes_NL[:, -1]]) ** 2).sum(1)
    codes = codes_NL.copy()
    groups: dict[tuple, list[int]] = {}
    for i, row in enumerate(codes.tolist()):
        groups.setdefault(tuple(row), []).append(i)
    used = set(groups)
    moved = 0
    for members in groups.values():
        members.sort(key=lambda i: (last_dist_N[i], i))
        for i in members[1:]:
            code = _nearest_free(x_NF[i], centroids, used)
            codes[i] = code
            used.add(code)
            moved += 1
    return codes, moved


# ------------------------------------------------------------------------------ the vocabulary


@dataclass
class EventVocab:
    """What turns events into tokens and back; saved beside the model (see the module docstring)."""

    item_tokens: str  # "semantic_ids" or "one_per_item"
    items: list[str]  # item ids; index = item number (the catalogue head's output index)
    codes: np.ndarray  # [N, L] int64: item -> code per level
    codes_per_level: int  # K (one_per_item: N)
    event_types: list[str]  # index = the event-type head's output index
    gap_edges_s: list[float]  # bucket i holds gaps in [edges[i-1], edges[i]) seconds
    quantiser: dict | None = None  # {"mean", "scale", "centroids"} of the semantic-ID k-means
    collisions_resolved: int = 0

    @property
    def num_items(self) -> int:
        return len(self.items)

    @property
    def num_levels(self) -> int:
        return self.codes.shape[1]

    def code_token(self, level: int, code: int) -> str:
        if self.item_tokens == "one_per_item":
            return f"<item_{code}>"
        return f"<sid_{level * self.codes_per_level + code}>"

    def gap_tokens(self) -> list[str]:
        return ["<gap_first>", *(f"<gap_{i}>" for i in range(len(self.gap_edges_s) + 1))]

    def event_token(self, event_type: str) -> str:
        return f"<event_{event_type}>"

    def tokens(self) -> list[str]:
        """Every token the vocabulary adds, in a fixed order (gaps, event types, codes by level)."""
        codes = [self.code_token(lv, c) for lv in range(self.num_levels) for c in range(self.codes_per_level)]
        return [*self.gap_tokens(), *(self.event_token(t) for t in self.event_types), *codes]

    def gap_bucket(self, gap_s: float | None) -> int:
        """Index into gap_tokens(): 0 for no previous event, else 1 + the bucket of gap_s."""
        if gap_s is None:
            return 0
        return 1 + int(np.searchsorted(np.asarray(self.gap_edges_s), gap_s, side="right"))

    def encode_features(self, features_NF: np.ndarray) -> np.ndarray:
        """Nearest-centroid codes of (new) feature vectors, level by level [N, L] (no collision
        resolution: two new items may share a code with each other or with a catalogue item)."""
        if self.quantiser is None:
            raise ModelError("this event vocabulary has no quantiser (item_tokens=one_per_item)")
        q = self.quantiser
        residual = (np.asarray(features_NF, dtype=np.float64) - np.asarray(q["mean"])) / np.asarray(
            q["scale"]
        )
        out = np.zeros((residual.shape[0], len(q["centroids"])), dtype=np.int64)
        for level, c in enumerate(q["centroids"]):
            c = np.asarray(c)
            a = sq_dists(residual, c).argmin(1)
            out[:, level] = a
            residual = residual - c[a]
        return out

    # -------------------------------------------------------------------------- save / load
    def to_json(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "item_tokens": self.item_tokens,
            "items": self.items,
            "codes": self.codes.tolist(),
            "codes_per_level": self.codes_per_level,
            "event_types": self.event_types,
            "gap_edges_s": self.gap_edges_s,
            "quantiser": self.quantiser,
            "collisions_resolved": self.collisions_resolved,
        }

    def save(self, out_dir: str | Path) -> Path:
        path = Path(out_dir) / VOCAB_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), separators=(",", ":")) + "\n")
        return path

    @classmethod
    def load(cls, model_dir: str | Path) -> EventVocab:
        path = Path(model_dir) / VOCAB_FILE
        if not path.is_file():
            raise ModelError(
                f"no {VOCAB_FILE} in {model_dir} (an event model export holds one beside config.json)"
            )
        d = json.loads(path.read_text())
        if d.get("format_version") != FORMAT_VERSION:
            raise ModelError(f"{path}: format_version {d.get('format_version')!r}, expected {FORMAT_VERSION}")
        return cls(
            item_tokens=d["item_tokens"],
            items=list(d["items"]),
            codes=np.asarray(d["codes"], dtype=np.int64).reshape(len(d["items"]), -1),
            codes_per_level=int(d["codes_per_level"]),
            event_types=list(d["event_types"]),
            gap_edges_s=[float(x) for x in d["gap_edges_s"]],
            quantiser=d["quantiser"],
            collisions_resolved=int(d.get("collisions_resolved", 0)),
        )


def build_vocab(
    *,
    item_tokens: str,
    items: list[str],
    features: np.ndarray | None,
    event_types: list[str],
    gap_edges_s: list[float],
    levels: int,
    codes: int,
    kmeans_iters: int,
    seed: int,
) -> EventVocab:
    """The vocabulary of a new event model: semantic IDs from `features` (rows aligned with `items`)
    or one token per item."""
    if list(gap_edges_s) != sorted(set(gap_edges_s)):
        raise ConfigError(f"events.gap_bucket_edges_s must increase strictly, got {list(gap_edges_s)}")
    if item_tokens == "one_per_item":
        n = len(items)
        return EventVocab(
            item_tokens, list(items), np.arange(n)[:, None], n, list(event_types), list(gap_edges_s)
        )
    if features is None:
        raise ConfigError("events.item_tokens=semantic_ids needs item features: set events.catalogue")
    mean = features.mean(0)
    scale = features.std(0)
    scale[scale < 1e-8] = 1.0  # a constant feature carries nothing: leave it at 0
    x = (features - mean) / scale
    raw, centroids = residual_kmeans(x, levels, codes, kmeans_iters, seed)
    unique, moved = resolve_collisions(x, raw, centroids)
    quantiser = {
        "mean": mean.tolist(),
        "scale": scale.tolist(),
        "centroids": [c.tolist() for c in centroids],
    }
    return EventVocab(
        item_tokens, list(items), unique, codes, list(event_types), list(gap_edges_s), quantiser, moved
    )
