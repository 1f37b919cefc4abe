"""Event logs: the record schema, per-user time-ordered sequences and the time split.

An event record (one JSONL line, Parquet or Arrow row, read by posttrain/data/sources.py exactly like
text data, so files, globs, gzip, Parquet and s3:// all work):

    user       str | int                  who acted
    timestamp  number (unix seconds) | str (ISO 8601, e.g. "2026-01-31T12:00:00Z")
    item       str | int                  what they acted on
    event      str                        the event type: letters, digits, `_`, `-`, `.`
    context    {str: str | number | bool} optional; kept on the event, not tokenised

A catalogue record (`events.catalogue`, format `items`): {"item": str | int, "features": [number]}.

Bad records follow the source's `on_error`: `raise` fails with `file:line: reason`; `skip` drops the
record and counts it by reason (`missing_field`, `wrong_type`, `bad_timestamp`, `unknown_item`,
`unknown_event_type`, ...) in summary.json, like any other data. Records are grouped by user and
sorted by timestamp (ties keep file order); `time_split` holds out the last events of each user.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np

from posttrain.config import SourceConfig, source_name
from posttrain.data.schemas import field_of
from posttrain.data.sources import SourceStream
from posttrain.errors import DataError

EVENT_TYPE_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")  # event types become tokens: `<event_NAME>`


@dataclass(frozen=True)
class Event:
    user: str
    timestamp_s: float
    item: str
    event_type: str
    context: dict = field(default_factory=dict, hash=False, compare=False)


@dataclass
class UserSequence:
    user: str
    train: list[Event]  # time-ordered history used for training
    heldout: list[Event]  # the user's last events (evaluation targets), time-ordered


def _ident(obj: dict, name: str) -> str:
    value = field_of(obj, name, (str, int))
    text = str(value)
    if not text:
        raise DataError(f"field '{name}' is empty", "empty_field")
    return text


def _timestamp(obj: dict) -> float:
    value = field_of(obj, "timestamp", (int, float, str))
    if isinstance(value, str):
        try:
            dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise DataError(f"field 'timestamp': {value!r} is not ISO 8601", "bad_timestamp") from None
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=UTC)
        return dt.timestamp()
    if not np.isfinite(value):
        raise DataError(f"field 'timestamp' must be finite, got {value}", "bad_timestamp")
    return float(value)


def parse_event(obj: dict) -> Event:
    """One record in the event schema (see the module docstring) -> Event; DataError names the field."""
    user, item = _ident(obj, "user"), _ident(obj, "item")
    timestamp = _timestamp(obj)
    kind = field_of(obj, "event", str)
    if not EVENT_TYPE_RE.match(kind):
        raise DataError(
            f"field 'event': {kind!r} is not a valid event type (letters, digits, _ - . only)",
            "bad_event_type",
        )
    context = field_of(obj, "context", dict, required=False) or {}
    for key, value in context.items():
        if not isinstance(value, str | int | float | bool):
            raise DataError(f"field 'context.{key}' must be str, number or bool", "wrong_type")
    return Event(user, timestamp, item, kind, context)


def parse_item(obj: dict) -> tuple[str, list[float]]:
    """One catalogue record -> (item id, feature vector)."""
    item = _ident(obj, "item")
    features = field_of(obj, "features", list)
    if not features:
        raise DataError("field 'features' is empty", "empty_sequence")
    for i, x in enumerate(features):
        if not isinstance(x, int | float) or isinstance(x, bool) or not np.isfinite(x):
            raise DataError(f"field 'features'[{i}] must be a finite number", "wrong_type")
    return item, [float(x) for x in features]


def read_records(source: SourceConfig, parse: Callable[[dict], object], check=None) -> tuple[list, Counter]:
    """One pass over `source` through the shared streaming reader; returns (parsed records, skips).

    `check(value)` may raise DataError for records that parse but cannot be used (an unknown item).
    With on_error=raise the first bad record fails as `file:line: reason`; with skip it is counted."""
    stream = SourceStream(source, epochs=1)
    out = []
    while (item := stream.next_record()) is not None:
        loc, record = item
        try:
            if isinstance(record, DataError):
                raise record
            value = parse(record)
            if check is not None:
                check(value)
        except DataError as err:
            if source.on_error == "raise":
                raise DataError(f"{loc}: {err}", err.reason) from None
            stream.count_skip(err.reason)
            continue
        stream.count_good()
        out.append(value)
        if source.max_samples is not None and len(out) >= source.max_samples:
            break
    return out, Counter(stream.skips)


def read_catalogue(source: SourceConfig) -> tuple[list[str], np.ndarray, Counter]:
    """(item ids in file order, features [N, F] float64, skips). Duplicate ids and ragged feature
    lengths are bad records too (counted or raised like any other)."""
    seen: set[str] = set()
    width: list[int] = []

    def check(value) -> None:
        item, feats = value
        if item in seen:
            raise DataError(f"item {item!r} appears twice in the catalogue", "duplicate_item")
        if width and len(feats) != width[0]:
            raise DataError(
                f"field 'features' has {len(feats)} values, earlier items {width[0]}", "shape_mismatch"
            )
        seen.add(item)
        width[:] = width or [len(feats)]

    rows, skips = read_records(source, parse_item, check)
    return [r[0] for r in rows], np.asarray([r[1] for r in rows], dtype=np.float64), skips


def read_events(
    sources: Iterable[SourceConfig],
    known_items: set[str] | None = None,
    known_event_types: set[str] | None = None,
) -> tuple[list[Event], dict[str, dict[str, int]]]:
    """Every event of every source (file order), and skips per source name and reason.

    Events whose item is not in `known_items` (the catalogue, or a loaded model's vocabulary) or
    whose type is not in `known_event_types` are bad records (`unknown_item`, `unknown_event_type`)."""

    def check(event: Event) -> None:
        if known_items is not None and event.item not in known_items:
            raise DataError(f"item {event.item!r} is not in the catalogue", "unknown_item")
        if known_event_types is not None and event.event_type not in known_event_types:
            raise DataError(
                f"event type {event.event_type!r} is not in the model's vocabulary "
                f"({', '.join(sorted(known_event_types))})",
                "unknown_event_type",
            )

    events: list[Event] = []
    skips: dict[str, dict[str, int]] = {}
    for source in sources:
        rows, counts = read_records(source, parse_event, check)
        events.extend(rows)
        skips[source_name(source)] = dict(counts)
    return events, skips


def user_sequences(events: Iterable[Event]) -> dict[str, list[Event]]:
    """Events grouped by user, each user's in time order (a stable sort: ties keep file order).
    Users come in order of first appearance."""
    by_user: dict[str, list[Event]] = defaultdict(list)
    for event in events:
        by_user[event.user].append(event)
    return {user: sorted(evs, key=lambda e: e.timestamp_s) for user, evs in by_user.items()}


def time_split(
    sequences: dict[str, list[Event]], heldout_per_user: int, min_train_events: int = 1
) -> tuple[list[UserSequence], Counter]:
    """Hold out each user's last `heldout_per_user` events. Users with fewer than
    heldout_per_user + min_train_events events keep all of them for training and are counted under
    `too_few_events_for_heldout` (they have nothing to be evaluated on)."""
    out, counts = [], Counter()
    for user, evs in sequences.items():
        if len(evs) < heldout_per_user + min_train_events:
            out.append(UserSequence(user, list(evs), []))
            counts["too_few_events_for_heldout"] += 1
        else:
            cut = len(evs) - heldout_per_user
            out.append(UserSequence(user, evs[:cut], evs[cut:]))
    return out, counts
