"""Bad input in streamed files: truncated gzip, truncated Parquet, bad rows inside Parquet, invalid
UTF-8 in gzip -- `raise` names the source file, line or row, and the reason; `skip` counts per
reason, and a training run reports the counts per source in summary.json."""

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import job_config, tokenizer

from posttrain.config import SourceConfig
from posttrain.data.samples import load_samples
from posttrain.errors import DataError
from posttrain.recipes import sft

GOOD = {"messages": [{"role": "user", "content": "Sort: 3 1 2"}, {"role": "assistant", "content": "1 2 3"}]}


def _load(path, on_error="raise", fmt="chat"):
    src = SourceConfig(path=str(path), format=fmt, on_error=on_error)
    samples, skips = load_samples(src, tokenizer(), max_len=64, overlong="drop")
    return len(samples), dict(skips)


def _truncated_gzip(path, n=400):
    raw = gzip.compress("".join(json.dumps(GOOD) + "\n" for _ in range(n)).encode())
    path.write_bytes(raw[: len(raw) // 2])
    return path


def test_truncated_gzip_raises_with_file_line_and_reason(tmp_path):
    path = _truncated_gzip(tmp_path / "cut.jsonl.gz")
    with pytest.raises(DataError, match=rf"{path}:\d+: truncated or corrupt gzip after line \d+") as err:
        _load(path)
    assert err.value.reason == "truncated_file"


def test_truncated_gzip_skip_keeps_the_lines_before_the_cut(tmp_path):
    path = _truncated_gzip(tmp_path / "cut.jsonl.gz")
    n, skips = _load(path, "skip")
    assert 0 < n < 400 and skips == {"truncated_file": 1}


def test_invalid_utf8_and_malformed_json_inside_gzip(tmp_path):
    path = tmp_path / "bad.jsonl.gz"
    with gzip.open(path, "wb") as f:
        f.write(json.dumps(GOOD).encode() + b"\n" + b'{"text": "\xff\xfe"}\n' + b'{"messages": [\n')
    with pytest.raises(DataError, match=rf"{path}:2: invalid UTF-8"):
        _load(path)
    assert _load(path, "skip") == (1, {"invalid_utf8": 1, "malformed_json": 1})


def _parquet(path, rows, **kw):
    pq.write_table(pa.Table.from_pylist(rows), path, **kw)
    return path


def test_truncated_parquet_raises_and_skip_moves_on_to_the_next_file(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    good = _parquet(folder / "a.parquet", [GOOD] * 10)
    cut = _parquet(folder / "b.parquet", [GOOD] * 50)
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    _parquet(folder / "c.parquet", [GOOD] * 7)
    with pytest.raises(DataError, match=rf"{cut}:row 1: truncated or corrupt Parquet file") as err:
        _load(folder)
    assert err.value.reason == "truncated_file"
    assert _load(folder, "skip") == (17, {"truncated_file": 1})
    assert _load(good) == (10, {})


def test_bad_parquet_rows_name_the_row(tmp_path):
    rows = [GOOD, GOOD, {"messages": []}, {"messages": [{"role": "user", "content": "no answer"}]}, GOOD]
    path = _parquet(tmp_path / "rows.parquet", rows, row_group_size=2)
    with pytest.raises(DataError, match=rf"{path}:row 3: empty conversation"):
        _load(path)
    assert _load(path, "skip") == (3, {"empty_conversation": 1, "no_assistant_turn": 1})
    other = _parquet(tmp_path / "other.parquet", [{"conversation": "x"}, {"conversation": "y"}])
    with pytest.raises(DataError, match=rf"{other}:row 1: missing field 'messages'"):
        _load(other)
    typed = _parquet(tmp_path / "typed.parquet", [{"messages": "hello"}])
    with pytest.raises(DataError, match=rf"{typed}:row 1: field 'messages' must be list, got str"):
        _load(typed)


def test_summary_reports_skips_per_reason_and_per_source(tmp_path):
    long = {
        "messages": [
            {"role": "user", "content": " ".join(["word"] * 200)},
            {"role": "assistant", "content": "x"},
        ]
    }
    lines = [json.dumps(GOOD), "{not json", json.dumps({"messages": []}), json.dumps(long)]
    chats = tmp_path / "chats.jsonl"
    chats.write_text("\n".join(lines + [json.dumps(GOOD)] * 60) + "\n")
    cut = _truncated_gzip(tmp_path / "cut.jsonl.gz", 400)
    cfg = job_config(
        tmp_path,
        chats,
        data={
            "train": [
                {"path": str(chats), "format": "chat", "on_error": "skip"},
                {"path": str(cut), "format": "chat", "on_error": "skip", "weight": 0.0},
            ],
            "overlong": "drop",
            "shuffle": False,
            "max_tokens_per_pack": 128,
        },
        training={"max_steps": 2, "export_hf": False},
    )
    summary = sft.train(cfg)
    saved = json.loads((tmp_path / "out/summary.json").read_text())
    expected = {"malformed_json": 1, "empty_conversation": 1, "overlong_dropped": 1}
    assert saved["skipped_samples"]["train"] == summary["skipped_samples"]["train"] == expected
    assert saved["data_sources"]["chats"]["skipped"] == expected
    assert saved["data_sources"]["cut"] == {"samples": 0, "tokens": 0, "skipped": {}}  # weight 0: never read
