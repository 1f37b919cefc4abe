"""A job's events, ready to train on: the event sources (and catalogue) read, grouped per user and
split by time, with the vocabulary of a loaded event model or one built from the data. The events
recipe and event-data GRPO (posttrain/events/rl.py) read the same way through `load_events`.
"""

from __future__ import annotations

from dataclasses import dataclass

from posttrain.config import EventsConfig, SourceConfig
from posttrain.errors import ConfigError
from posttrain.events.data import read_catalogue, read_events, time_split, user_sequences
from posttrain.events.semantic_ids import EventVocab, build_vocab
from posttrain.events.sequences import UserSequence


@dataclass
class EventSet:
    """The prepared events of a job."""

    vocab: EventVocab
    users: list[UserSequence]
    stats: dict  # counts and skips, for summary.json


def load_events(ev: EventsConfig, sources: list[SourceConfig], model_path: str | None, seed: int) -> EventSet:
    """Read the event sources (and the catalogue), group per user, split by time; the vocabulary is a
    loaded model's (`model_path`, model.path) or built here (semantic IDs from the catalogue's features,
    k-means seeded by `seed`). `sources`: data.train's sources."""
    stats: dict = {"skipped": {}}
    if model_path is not None:
        vocab = EventVocab.load(model_path)
        items, types = set(vocab.items), set(vocab.event_types)
        events, stats["skipped"] = read_events(sources, items, types)
    else:
        features = None
        known = None
        if ev.catalogue is not None:
            ids, features, skips = read_catalogue(ev.catalogue)
            stats["skipped"]["catalogue"] = dict(skips)
            known = set(ids)
        events, skipped = read_events(sources, known)
        stats["skipped"] |= skipped
        if ev.catalogue is None:
            ids = sorted({e.item for e in events})
        vocab = build_vocab(
            item_tokens=ev.item_tokens,
            items=ids,
            features=features,
            event_types=sorted({e.event_type for e in events}),
            gap_edges_s=ev.gap_bucket_edges_s,
            levels=ev.semantic_id_levels,
            codes=ev.semantic_id_codes,
            kmeans_iters=ev.kmeans_iters,
            seed=seed,
        )
    unknown = sorted(set(ev.loss_event_types) - set(vocab.event_types))
    if unknown:
        raise ConfigError(
            f"events.loss_event_types: {unknown} are not event types of the data ({vocab.event_types})"
        )
    users, split_counts = time_split(user_sequences(events), ev.heldout_events_per_user)
    stats["skipped"]["users"] = dict(split_counts)
    stats |= {
        "num_users": len(users),
        "num_events": len(events),
        "num_train_events": sum(len(u.train) for u in users),
        "num_heldout_events": sum(len(u.heldout) for u in users),
        "num_items": vocab.num_items,
        "event_types": vocab.event_types,
        "item_tokens": vocab.item_tokens,
        "codes": f"{vocab.num_levels} levels x {vocab.codes_per_level} codes",
        "semantic_id_collisions_resolved": vocab.collisions_resolved,
    }
    return EventSet(vocab, users, stats)
