"""Streaming sources: every file layout gives the same records and token ids as plain JSONL, and a
stream stopped anywhere resumes from its small position on exactly the next record."""

import json
import pickle

import pytest
from data_layouts import ROWS, write_layouts
from helpers import tokenizer

from posttrain.config import SourceConfig
from posttrain.data.samples import load_samples
from posttrain.data.sources import SourceStream, resolve_files
from posttrain.errors import DataError


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    return write_layouts(tmp_path_factory.mktemp("layouts"))


def _ids(path, **kw):
    src = SourceConfig(path=str(path), format="chat", **kw)
    samples, skips = load_samples(src, tokenizer(), max_len=256, overlong="truncate")
    return [s.input_ids for s in samples], dict(skips)


@pytest.mark.parametrize("name", ["all.jsonl.gz", "all.parquet", "shards", "shards/part-*", "hf"])
def test_every_layout_gives_the_same_token_ids(layouts, name):
    reference, _ = _ids(layouts / "all.jsonl")
    assert len(reference) == len(ROWS)
    assert _ids(layouts / name) == (reference, {})


def test_resolution_orders_files_and_names_what_is_missing(layouts):
    _, files = resolve_files(str(layouts / "shards"))
    assert [f.kind for f in files] == ["jsonl", "jsonl.gz", "parquet"]
    _, files = resolve_files(str(layouts / "hf"))
    assert [f.path.rsplit("/", 1)[-1] for f in files] == [
        "data-00000-of-00002.arrow",
        "data-00001-of-00002.arrow",
    ]
    with pytest.raises(DataError, match="data file not found: .*nope.jsonl"):
        resolve_files(str(layouts / "nope.jsonl"))
    with pytest.raises(DataError, match="no data files found"):
        resolve_files(str(layouts / "*.csv"))


def _records(stream, n):
    return [stream.next_record()[0] for _ in range(n)]


@pytest.mark.parametrize("name", ["all.jsonl", "all.jsonl.gz", "all.parquet", "shards", "hf"])
@pytest.mark.parametrize("shuffle", [False, True])
def test_stream_resumes_on_the_next_record(layouts, name, shuffle):
    """Stop after k records (mid-window, mid-file, in the second epoch), resume from the pickled state."""
    src = SourceConfig(path=str(layouts / name), format="chat")
    kw = dict(seed=3, shuffle=shuffle, window=16)
    straight = SourceStream(src, **kw)
    locs = []
    for _ in range(2 * len(ROWS) + 10):
        locs.append(straight.next_record()[0])
        straight.count_good()
    for k in (5, 41, len(ROWS) + 23):
        first = SourceStream(src, **kw)
        for _ in range(k):
            first.next_record()
            first.count_good()
        state = pickle.loads(pickle.dumps(first.state_dict()))
        resumed = SourceStream(src, **kw)
        resumed.load_state_dict(state)
        assert _records(resumed, 20) == locs[k : k + 20], (name, k)
    in_file_order = _records(SourceStream(src), len(ROWS))
    assert sorted(locs[: len(ROWS)]) == sorted(in_file_order)  # an epoch is every record exactly once
    assert len(set(in_file_order)) == len(ROWS)
    assert (locs[: len(ROWS)] != in_file_order) == shuffle


def test_plain_jsonl_resume_seeks_instead_of_rereading(layouts):
    src = SourceConfig(path=str(layouts / "all.jsonl"), format="chat")
    stream = SourceStream(src, window=10)
    for _ in range(25):
        stream.next_record()
    file_pos, record, offset = stream.state_dict()["position"][2]  # where the current window starts
    assert (file_pos, record) == (0, 20)
    assert offset == len("".join(json.dumps(r) + "\n" for r in ROWS[:20]).encode())


def test_epochs_and_max_samples_end_the_stream(layouts):
    src = SourceConfig(path=str(layouts / "all.parquet"), format="chat", epochs=2, max_samples=7)
    stream = SourceStream(src)
    seen = 0
    while stream.next_record() is not None:
        stream.count_good()
        seen += 1
    assert seen == 14 and stream.exhausted
