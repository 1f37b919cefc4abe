"""Synthetic but structured interaction data: a catalogue with latent item features and users whose
tastes drift, so that a sequence model has something real to learn (and baselines something to miss).

The world, all drawn from one seed (numpy's PCG64, so the files are identical on every machine):

* **Catalogue.** Items belong to genres. An item's latent vector is its genre's centre plus noise,
  and it has a popularity (log-normal) and a quality. Its *observed* features (what semantic IDs are
  built from) are a random linear view of the latent vector and the quality, plus noise.
* **Users.** A user has a long-term taste (a Dirichlet draw over genres, concentrated on a few) and a
  favourite genre. Activity comes in sessions: minutes apart inside a session, about a day and a half
  between sessions. Each session follows one genre drawn from the current taste, which then drifts
  towards what was watched, and sometimes towards a new genre.
* **Events.** `view`: an item of the session's genre, favouring popular items close (in latent space)
  to the previous one. `play`: mostly the last item viewed, else a fresh view-like pick. `rate`: the
  last played item again. `purchase`: a high-quality item of the user's favourite genre, whatever the
  session is about (the "target behaviour" of the fine-tuning example in docs/events.md).

So the next item depends on the recent items (genre, similarity, repeats), the time since the last
event (a new session may switch genre) and long-term taste: popularity and "repeat the last item"
each capture only part of it. `write_synthetic_events` writes `catalogue.jsonl.gz`
({"item", "features"}) and `events.jsonl.gz` ({"user", "timestamp", "item", "event", "context"},
sorted by time across users, as a log would be).
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

EVENT_TYPES = ("view", "play", "rate", "purchase")
DEVICES = ("tv", "mobile", "web")


@dataclass(frozen=True)
class SyntheticSpec:
    """Sizes and rates of the synthetic world (defaults: the tiny config's data)."""

    num_items: int = 1000
    num_genres: int = 20
    latent_dim: int = 8
    feature_dim: int = 16
    num_users: int = 800
    min_events_per_user: int = 24
    max_events_per_user: int = 96
    genre_separation: float = 4.0  # distance of genre centres from the origin in latent space
    item_spread: float = 0.5  # std of an item's latent vector around its genre centre (per dimension)
    mean_session_events: float = 6.0  # session lengths are geometric with this mean
    mean_session_gap_s: float = 1.5 * 86400  # between sessions (exponential)
    mean_event_gap_s: float = 150.0  # between events of one session (exponential)
    similarity_scale: float = 4.0  # views favour items within ~this squared latent distance of the last
    rate_prob: float = 0.12  # an event rates the session's last played item (when there is one)
    purchase_prob: float = 0.12  # an event buys a high-quality item of the favourite genre
    play_prob: float = 0.28  # an event plays an item; the rest are views
    replay_prob: float = 0.35  # a play is of the last viewed item (else a fresh pick)
    explore_prob: float = 0.15  # a session picks a genre uniformly instead of from the taste
    new_interest_prob: float = 0.1  # after a session, the taste takes on a random new genre
    start_time_s: int = 1_700_000_000  # first possible timestamp (unix seconds)
    seed: int = 0


@dataclass
class Catalogue:
    ids: list[str]  # item ids, index = item number
    genre: np.ndarray  # [N] genre of each item
    latent: np.ndarray  # [N, latent_dim]
    popularity: np.ndarray  # [N] > 0
    quality: np.ndarray  # [N]
    features: np.ndarray  # [N, feature_dim], what semantic IDs see


def make_catalogue(spec: SyntheticSpec, rng: np.random.Generator) -> Catalogue:
    n, g = spec.num_items, spec.num_genres
    centres = rng.normal(size=(g, spec.latent_dim))
    centres *= spec.genre_separation / np.linalg.norm(centres, axis=1, keepdims=True)
    genre = rng.integers(0, g, size=n)
    latent = centres[genre] + spec.item_spread * rng.normal(size=(n, spec.latent_dim))
    popularity = np.exp(rng.normal(size=n))
    quality = rng.normal(size=n)
    view = rng.normal(size=(spec.latent_dim + 1, spec.feature_dim)) / np.sqrt(spec.latent_dim)
    features = np.concatenate([latent, quality[:, None]], axis=1) @ view
    features += 0.1 * rng.normal(size=features.shape)
    ids = [f"i{i:04d}" for i in range(n)]
    return Catalogue(ids, genre, latent, popularity, quality, features)


def _pick(rng: np.random.Generator, weights: np.ndarray) -> int:
    return int(rng.choice(len(weights), p=weights / weights.sum()))


class _User:
    """One simulated user: taste, sessions and the event rules of the module docstring."""

    def __init__(self, spec: SyntheticSpec, cat: Catalogue, rng: np.random.Generator):
        self.spec, self.cat, self.rng = spec, cat, rng
        self.taste = rng.dirichlet(np.full(spec.num_genres, 0.25))
        self.favourite = int(np.argmax(self.taste))
        self.device = DEVICES[int(rng.integers(len(DEVICES)))]
        self.by_genre = [np.flatnonzero(cat.genre == k) for k in range(spec.num_genres)]

    def _view(self, genre: int, last: int | None, seen: set[int]) -> int:
        """A fresh item (not yet seen this session) of the genre, popular and close to the last one."""
        cat, rng = self.cat, self.rng
        if rng.random() < 0.05:  # a globally popular detour
            return _pick(rng, cat.popularity)
        pool = self.by_genre[genre]
        w = cat.popularity[pool] ** 0.7
        if last is not None:
            d2 = ((cat.latent[pool] - cat.latent[last]) ** 2).sum(axis=1)
            w = w * np.exp(-d2 / self.spec.similarity_scale)
        w = w * np.array([i not in seen for i in pool.tolist()])
        return int(pool[_pick(rng, w)]) if w.sum() > 0 else _pick(rng, cat.popularity)

    def _purchase(self) -> int:
        pool = self.by_genre[self.favourite]
        return int(
            pool[_pick(self.rng, np.exp(1.5 * self.cat.quality[pool]) * self.cat.popularity[pool] ** 0.3)]
        )

    def events(self, num_events: int) -> list[tuple[int, int, str, str]]:
        """(timestamp, item, event type, device) for this user, in time order."""
        spec, rng = self.spec, self.rng
        t = spec.start_time_s + float(rng.uniform(0, 30 * 86400))
        out: list[tuple[int, int, str, str]] = []
        while len(out) < num_events:
            explore = rng.random() < spec.explore_prob
            genre = int(rng.integers(spec.num_genres)) if explore else _pick(rng, self.taste)
            last_view = last_play = last = None
            seen: set[int] = set()
            for _ in range(int(rng.geometric(1.0 / spec.mean_session_events))):
                u = rng.random()
                if u < spec.rate_prob and last_play is not None:
                    kind, item = "rate", last_play
                elif spec.rate_prob <= u < spec.rate_prob + spec.purchase_prob:
                    kind, item = "purchase", self._purchase()
                elif u < spec.rate_prob + spec.purchase_prob + spec.play_prob:
                    reuse = last_view is not None and rng.random() < spec.replay_prob
                    kind, item = "play", last_view if reuse else self._view(genre, last, seen)
                    last_play = item
                else:  # also a rate with nothing played yet
                    kind, item = "view", self._view(genre, last, seen)
                    last_view = item
                if kind != "purchase":
                    last = item
                seen.add(item)
                device = self.device if rng.random() < 0.8 else DEVICES[int(rng.integers(len(DEVICES)))]
                out.append((int(t), item, kind, device))
                t += float(rng.exponential(spec.mean_event_gap_s)) + 1.0
                if len(out) == num_events:
                    break
            t += float(rng.exponential(spec.mean_session_gap_s))
            drift = np.eye(spec.num_genres)[genre]
            if rng.random() < spec.new_interest_prob:
                drift = 0.5 * drift + 0.5 * np.eye(spec.num_genres)[int(rng.integers(spec.num_genres))]
            self.taste = 0.8 * self.taste + 0.2 * drift
        return out


def generate(spec: SyntheticSpec) -> tuple[Catalogue, list[dict]]:
    """The catalogue and the event log (dicts in the event schema, sorted by time, then user)."""
    rng = np.random.default_rng(spec.seed)
    cat = make_catalogue(spec, rng)
    rows = []
    for u in range(spec.num_users):
        n = int(rng.integers(spec.min_events_per_user, spec.max_events_per_user + 1))
        for ts, item, kind, device in _User(spec, cat, rng).events(n):
            rows.append(
                {"user": f"u{u:04d}", "timestamp": ts, "item": cat.ids[item], "event": kind,
                 "context": {"device": device}}
            )  # fmt: skip
    rows.sort(key=lambda r: (r["timestamp"], r["user"]))
    return cat, rows


def _write_gz_jsonl(path: Path, rows: list[dict]) -> None:
    # mtime=0: the same rows give the same bytes, so the bundled files can be checked against the seed.
    with path.open("wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
        for row in rows:
            f.write((json.dumps(row, separators=(",", ":")) + "\n").encode())


def write_synthetic_events(out_dir: str | Path, spec: SyntheticSpec = SyntheticSpec()) -> dict[str, Path]:
    """Write catalogue.jsonl.gz and events.jsonl.gz under out_dir; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cat, rows = generate(spec)
    paths = {"catalogue": out / "catalogue.jsonl.gz", "events": out / "events.jsonl.gz"}
    items = [{"item": i, "features": [round(float(x), 4) for x in f]} for i, f in zip(cat.ids, cat.features)]
    _write_gz_jsonl(paths["catalogue"], items)
    _write_gz_jsonl(paths["events"], rows)
    return paths
