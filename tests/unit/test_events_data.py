"""Event logs through the shared sources: schema errors name file:line, skips are counted by reason,
users' events come back in time order and the last ones are held out."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from helpers import write_jsonl

from posttrain.config import SourceConfig
from posttrain.errors import DataError
from posttrain.events.data import read_catalogue, read_events, time_split, user_sequences


def ev(user, ts, item, kind="play", **extra) -> dict:
    return {"user": user, "timestamp": ts, "item": item, "event": kind, **extra}


def source(path: Path, on_error: str = "raise", fmt: str = "events") -> SourceConfig:
    return SourceConfig(path=str(path), format=fmt, on_error=on_error)


def test_events_group_per_user_in_time_order_and_split_by_time(tmp_path: Path):
    rows = [
        ev("a", 30, "x"),
        ev("b", 5, "y", "view"),
        ev("a", "1970-01-01T00:00:10Z", "y"),  # ISO 8601 = 10 s
        ev(7, 20, "z", context={"device": "tv"}),  # integer ids are ids too
        ev("a", 20, "z", "rate"),
        ev("b", 5, "x"),  # same timestamp as b's first: file order is kept
        ev("a", 40, "w"),
    ]
    events, skips = read_events([source(write_jsonl(tmp_path / "log.jsonl", rows))])
    assert skips == {"log": {}}
    seqs = user_sequences(events)
    assert list(seqs) == ["a", "b", "7"]  # first appearance
    assert [(e.timestamp_s, e.item) for e in seqs["a"]] == [
        (10.0, "y"),
        (20.0, "z"),
        (30.0, "x"),
        (40.0, "w"),
    ]
    assert [e.item for e in seqs["b"]] == ["y", "x"]
    assert seqs["7"][0].context == {"device": "tv"}

    users, counts = time_split(seqs, heldout_per_user=2)
    a, b, seven = users
    assert [e.item for e in a.train] == ["y", "z"] and [e.item for e in a.heldout] == ["x", "w"]
    # b has 2 events: holding out 2 would leave no history, so b trains on both; 7 likewise.
    assert b.heldout == [] and len(b.train) == 2 and seven.heldout == []
    assert counts == {"too_few_events_for_heldout": 2}


@pytest.mark.parametrize(
    "row, message, reason",
    [
        ('{"user": "a", "timestamp": 1, "item": "x"', "malformed JSON", "malformed_json"),
        (ev("a", 1, "x") | {"event": None}, "field 'event' must be str", "wrong_type"),
        ({"user": "a", "timestamp": 1, "event": "play"}, "missing field 'item'", "missing_field"),
        (ev("a", "yesterday", "x"), "'yesterday' is not ISO 8601", "bad_timestamp"),
        (ev("a", True, "x"), "field 'timestamp' must be", "wrong_type"),
        (ev("a", 1, "x", "add to list"), "not a valid event type", "bad_event_type"),
        (ev("a", 1, "x", context={"pos": [1, 2]}), "field 'context.pos'", "wrong_type"),
        (ev("a", 1, "nope"), "item 'nope' is not in the catalogue", "unknown_item"),
    ],
)
def test_a_bad_row_names_file_and_line_or_is_counted(tmp_path: Path, row, message: str, reason: str):
    rows = [ev("a", 0, "x"), row, ev("a", 2, "x")]
    path = write_jsonl(tmp_path / "log.jsonl", rows)
    with pytest.raises(DataError, match=rf"log\.jsonl:2: .*{message}") as err:
        read_events([source(path)], known_items={"x"})
    assert err.value.reason == reason
    events, skips = read_events([source(path, "skip")], known_items={"x"})
    assert len(events) == 2 and skips == {"log": {reason: 1}}


def test_unknown_event_types_are_bad_rows_for_a_loaded_vocabulary(tmp_path: Path):
    path = write_jsonl(tmp_path / "log.jsonl", [ev("a", 0, "x"), ev("a", 1, "x", "share")])
    events, skips = read_events([source(path, "skip")], known_event_types={"play"})
    assert len(events) == 1 and skips == {"log": {"unknown_event_type": 1}}


def test_catalogue_reads_gzip_and_rejects_duplicates_and_ragged_features(tmp_path: Path):
    path = tmp_path / "items.jsonl.gz"
    rows = [
        {"item": "x", "features": [1.0, 2]},
        {"item": "y", "features": [3.0]},  # ragged
        {"item": "x", "features": [0.0, 0.0]},  # duplicate
        {"item": 5, "features": [0.5, -1.0]},
    ]
    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    with pytest.raises(
        DataError, match=r"items\.jsonl\.gz:2: field 'features' has 1 values, earlier items 2"
    ):
        read_catalogue(source(path, fmt="items"))
    ids, feats, skips = read_catalogue(source(path, "skip", fmt="items"))
    assert ids == ["x", "5"] and feats.tolist() == [[1.0, 2.0], [0.5, -1.0]]
    assert skips == {"shape_mismatch": 1, "duplicate_item": 1}
