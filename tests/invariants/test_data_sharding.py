"""Sharding: across N data-parallel ranks (or ranks x loader workers) every sample of an epoch is
seen by exactly one shard -- none duplicated, none lost -- for files of uneven sizes, several
sources, shuffling and packing."""

import json

import pytest

from posttrain.config import DataConfig
from posttrain.data.pipeline import build_pipeline


def _write(path, ids):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"input_ids": [i] * (3 + i % 11)}) + "\n" for i in ids))


@pytest.fixture()
def sources(tmp_path):
    # a folder of three uneven files (17, 5 and 30 records) and a single file of 23 records
    _write(tmp_path / "dir/a.jsonl", range(0, 17))
    _write(tmp_path / "dir/b.jsonl", range(100, 105))
    _write(tmp_path / "dir/c.jsonl", range(200, 230))
    _write(tmp_path / "one.jsonl", range(1000, 1023))
    all_ids = [*range(0, 17), *range(100, 105), *range(200, 230), *range(1000, 1023)]
    return tmp_path, sorted(all_ids)


def _epoch_ids(root, shard, num_shards):
    data = DataConfig(
        train=[
            {"path": str(root / "dir"), "format": "tokens", "weight": 2, "epochs": 1},
            {"path": str(root / "one.jsonl"), "format": "tokens", "epochs": 1},
        ],
        max_tokens_per_pack=32,
        shuffle_window_samples=4,
    )
    p = build_pipeline(data, tokenizer=None, seed=5, shard=shard, num_shards=num_shards)
    ids = []
    while (row := p.next_row()) is not None:
        ids.extend(s.input_ids[0] for s in row)
    return ids


@pytest.mark.parametrize("num_shards", [1, 2, 3, 4, 6])  # 6 = 3 ranks x 2 loader workers
def test_shards_are_disjoint_and_cover_the_epoch(sources, num_shards):
    root, all_ids = sources
    per_shard = [_epoch_ids(root, shard, num_shards) for shard in range(num_shards)]
    seen = [i for ids in per_shard for i in ids]
    assert sorted(seen) == all_ids  # nothing lost, nothing duplicated
    for a in range(num_shards):
        for b in range(a + 1, num_shards):
            assert not set(per_shard[a]) & set(per_shard[b])
    sizes = [len(ids) for ids in per_shard]
    assert max(sizes) - min(sizes) <= 4  # balanced to within a few records per file
