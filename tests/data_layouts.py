"""Shared by the data tests: the same records written in every file layout a source can have."""

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
from helpers import ROOT

ROWS = [json.loads(line) for line in (ROOT / "data/tiny/sft_train.jsonl").read_text().splitlines()[:90]]


def write_layouts(root, rows=ROWS):
    """The same records as JSONL, JSONL.gz, Parquet (3 row groups), a folder of shards, a save_to_disk dir."""
    root.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (root / "all.jsonl").write_text(text)
    with gzip.open(root / "all.jsonl.gz", "wt") as f:
        f.write(text)
    pq.write_table(pa.Table.from_pylist(rows), root / "all.parquet", row_group_size=len(rows) // 3 + 1)
    shards = root / "shards"
    shards.mkdir()
    third = len(rows) // 3
    (shards / "part-0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:third]))
    with gzip.open(shards / "part-1.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows[third : 2 * third]))
    pq.write_table(pa.Table.from_pylist(rows[2 * third :]), shards / "part-2.parquet")
    import datasets

    datasets.Dataset.from_list(rows).save_to_disk(str(root / "hf"), num_shards=2)
    return root
