"""Streaming sources: records flow out of files one at a time, from local disk or object storage.

A source's `path` resolves to an ordered list of files: a single file, a directory (searched
recursively; a `datasets.save_to_disk` folder yields its Arrow shards in order), a glob, or the same
under any fsspec URL (`s3://bucket/prefix/*.parquet`). Readers stream every format without loading a
whole file: JSONL line by line (plain or gzip), Parquet batch by batch within row groups, Arrow IPC
streams batch by batch.

`SourceStream` turns the files into an endless (or `epochs`-long) stream of records for one
data-parallel shard. Its position is small plain data -- epoch, the file and record (and byte offset
for plain JSONL, so a resume seeks instead of re-reading) where the current shuffle window started,
and how far into the window it is -- so a checkpoint stores where the stream is, not what it read.
Shuffling is seeded and reproducible from that position: the file order is permuted per epoch and
records are permuted within windows of `shuffle_window_samples`; a resume re-reads the current
window and permutes it the same way. Memory is bounded by the window, not the dataset.

Sharding: record `i` of file `f` (in the epoch's file order) belongs to shard `(f + i) % num_shards`,
so shards are disjoint and together cover every record exactly once per epoch.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from posttrain.config import SourceConfig, source_name
from posttrain.errors import DataError

SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".jsonl.gz": "jsonl.gz", ".ndjson.gz": "jsonl.gz"}
SUFFIXES |= {".parquet": "parquet", ".arrow": "arrow"}
BATCH_ROWS = 256  # Parquet/Arrow rows converted to Python at a time
Record = dict | DataError  # a parsed record, or the error that reading it raised


def _kind(path: str) -> str | None:
    for suffix in sorted(SUFFIXES, key=len, reverse=True):
        if path.endswith(suffix):
            return SUFFIXES[suffix]
    return None


@dataclass(frozen=True)
class DataFile:
    path: str  # as the filesystem names it (no protocol)
    kind: str  # jsonl | jsonl.gz | parquet | arrow
    display: str  # as errors name it (with the protocol for remote files)


def resolve_files(path: str, storage_options: dict | None = None) -> tuple[object, list[DataFile]]:
    """(filesystem, files) that `path` names, in a stable order; DataError when it names none."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(path, **(storage_options or {}))
    proto = path.split("://", 1)[0] + "://" if "://" in path else ""
    if any(c in root for c in "*?["):
        found = sorted(fs.glob(root))
    elif fs.isdir(root):
        found = _dir_files(fs, root)
    elif fs.isfile(root):
        found = [root]
        if _kind(root) is None:
            raise DataError(f"{path}: unknown file type (expected {', '.join(sorted(SUFFIXES))})")
    else:
        raise DataError(f"data file not found: {path}")
    files = [DataFile(p, _kind(p), proto + p) for p in found if _kind(p) is not None]
    if not files:
        raise DataError(f"{path}: no data files found (looked for {', '.join(sorted(SUFFIXES))})")
    return fs, files


def _dir_files(fs, root: str) -> list[str]:
    """A `datasets.save_to_disk` folder's Arrow shards in order, else every data file below root."""
    state = root.rstrip("/") + "/state.json"
    if fs.isfile(state):
        with fs.open(state, "rb") as f:
            shards = json.load(f).get("_data_files", [])
        return [root.rstrip("/") + "/" + s["filename"] for s in shards]
    return sorted(p for p in fs.find(root) if _kind(p) is not None)


# ------------------------------------------------------------------------------- readers
# Each reader yields (index, next_offset, location, record) for the records of one shard, starting at
# record `start` (and byte `offset` when the format can seek). `index` counts every record in the
# file; `next_offset` is where the record after it starts (None when the format cannot seek).


def _parse_line(raw: bytes) -> dict:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"invalid UTF-8 ({err.reason} at byte {err.start})", "invalid_utf8") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"malformed JSON: {err.msg} (column {err.colno})", "malformed_json") from None
    if not isinstance(obj, dict):
        raise DataError(f"expected a JSON object, got {type(obj).__name__}", "not_an_object")
    return obj


def _read_jsonl(fs, file: DataFile, start: int, offset: int | None, keep) -> Iterator:
    with fs.open(file.path, "rb") as raw_f:
        gz = file.kind == "jsonl.gz"
        f = gzip.GzipFile(fileobj=raw_f) if gz else raw_f
        index = 0
        if offset is not None and not gz:
            raw_f.seek(offset)
            index = start
        pos = offset or 0
        try:
            for raw in f:
                pos += len(raw)
                i, index = index, index + 1
                if i < start or not keep(i) or not raw.strip():
                    continue
                try:
                    record: Record = _parse_line(raw)
                except DataError as err:
                    record = err
                yield i, (None if gz else pos), f"{file.display}:{i + 1}", record
        except (EOFError, OSError, zlib.error) as err:  # gzip cut short or corrupt
            yield (
                index,
                None,
                f"{file.display}:{index + 1}",
                DataError(f"truncated or corrupt gzip after line {index} ({err})", "truncated_file"),
            )


def _read_batches(file: DataFile, batches, start: int, keep, index: int = 0) -> Iterator:
    """Rows of record batches; `index` is the file row number of the first batch's first row."""
    for batch in batches:
        n = batch.num_rows
        wanted = [j for j in range(max(0, start - index), n) if keep(index + j)]
        if wanted:
            rows = batch.take(wanted).to_pylist()
            for j, row in zip(wanted, rows):
                yield index + j, None, f"{file.display}:row {index + j + 1}", row
        index += n


def _read_parquet(fs, file: DataFile, start: int, offset: int | None, keep) -> Iterator:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with fs.open(file.path, "rb") as f:
        try:
            pf = pq.ParquetFile(f)
        except (pa.ArrowException, OSError) as err:
            yield (
                0,
                None,
                f"{file.display}:row 1",
                DataError(f"truncated or corrupt Parquet file ({err})", "truncated_file"),
            )
            return
        # Skip whole row groups before `start` without reading them.
        first, before = 0, 0
        while first < pf.num_row_groups and before + pf.metadata.row_group(first).num_rows <= start:
            before += pf.metadata.row_group(first).num_rows
            first += 1
        groups = list(range(first, pf.num_row_groups))
        batches = pf.iter_batches(batch_size=BATCH_ROWS, row_groups=groups) if groups else []
        try:
            yield from _read_batches(file, batches, start, keep, index=before)
        except (pa.ArrowException, OSError) as err:
            yield (
                before,
                None,
                f"{file.display}",
                DataError(f"corrupt Parquet data ({err})", "truncated_file"),
            )


def _read_arrow(fs, file: DataFile, start: int, offset: int | None, keep) -> Iterator:
    import pyarrow as pa

    with fs.open(file.path, "rb") as f:
        try:
            reader = pa.ipc.open_stream(f)
        except pa.ArrowInvalid:
            f.seek(0)
            try:
                ipc = pa.ipc.open_file(f)
            except pa.ArrowException as err:
                yield (
                    0,
                    None,
                    f"{file.display}:row 1",
                    DataError(f"truncated or corrupt Arrow file ({err})", "truncated_file"),
                )
                return
            reader = (ipc.get_batch(i) for i in range(ipc.num_record_batches))
        try:
            yield from _read_batches(file, reader, start, keep)
        except (pa.ArrowException, OSError) as err:
            yield 0, None, f"{file.display}", DataError(f"corrupt Arrow data ({err})", "truncated_file")


READERS = {"jsonl": _read_jsonl, "jsonl.gz": _read_jsonl, "parquet": _read_parquet, "arrow": _read_arrow}


def read_records(fs, file: DataFile, start: int = 0, offset: int | None = None, keep=None) -> Iterator:
    """(index, next_offset, location, record or DataError) for the records of one file."""
    return READERS[file.kind](fs, file, start, offset, keep or (lambda i: True))


# ------------------------------------------------------------------------------- the stream


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([abs(int(k)) for k in key])


class SourceStream:
    """One source's records for one shard, epoch after epoch, with a small resumable position."""

    def __init__(
        self,
        cfg: SourceConfig,
        index: int = 0,
        *,
        seed: int = 0,
        shard: int = 0,
        num_shards: int = 1,
        shuffle: bool = False,
        window: int = 1024,
        epochs: int | None = None,
    ):
        self.cfg, self.index, self.name = cfg, index, source_name(cfg)
        self.seed, self.shard, self.num_shards = seed, shard, num_shards
        self.shuffle, self.window = shuffle, max(1, window)
        self.epochs = cfg.epochs if cfg.epochs is not None else epochs
        self.fs, self.files = resolve_files(cfg.path, cfg.storage_options)
        self.skips: Counter = Counter()  # bad records of this source, by reason
        self.exhausted = False
        self._start_epoch(0)

    # The position: epoch, where the current window starts (file, record, byte offset), the window's
    # number in the epoch, how many of its records were handed out, and usable samples this epoch.
    def state(self) -> tuple:
        return (self.epoch, self.block_no, self.block_start, self.taken, self.good, self.exhausted)

    def state_dict(self) -> dict:
        return {"position": list(self.state()), "skips": dict(self.skips)}

    def load_state_dict(self, state: dict) -> None:
        epoch, block_no, block_start, taken, good, exhausted = state["position"]
        self.skips = Counter(state["skips"])
        self._start_epoch(epoch)
        self.exhausted, self.good = exhausted, good
        if block_no >= 0:  # re-read the current window and permute it the same way
            self.block_no = block_no - 1  # _fill_block counts it again
            self._cursor, self._records = tuple(block_start), None
            self._fill_block()
            self.taken = taken

    def _start_epoch(self, epoch: int) -> None:
        self.epoch, self.block_no, self.taken, self.good = epoch, -1, 0, 0
        order = list(range(len(self.files)))
        if self.shuffle and len(order) > 1:
            order = _rng(self.seed, self.index, epoch, 1).permutation(len(order)).tolist()
        self._order = order
        self._cursor = (0, 0, 0)  # (position in the epoch's file order, record index, byte offset)
        self._records: Iterator | None = None
        self.block: list[tuple[str, Record]] = []
        self.block_start = self._cursor

    def _iter_from(self, cursor: tuple) -> Iterator:
        """(cursor after, location, record) from `cursor` to the end of the epoch."""
        file_pos, start, offset = cursor
        for f in range(file_pos, len(self._order)):
            file = self.files[self._order[f]]
            keep = lambda i, f=f: (f + i) % self.num_shards == self.shard  # noqa: E731
            for i, next_offset, loc, record in read_records(self.fs, file, start, offset or None, keep):
                yield (f, i + 1, next_offset or 0), loc, record
            start, offset = 0, 0
        yield (len(self._order), 0, 0), None, None

    def _fill_block(self) -> None:
        """Read the next window of records (from self._cursor) and permute it for this epoch."""
        self.block_start = self._cursor
        self.block_no += 1
        if self._records is None:  # kept open across windows: a gzip file is never re-read
            self._records = self._iter_from(self._cursor)
        block = []
        for cursor, loc, record in self._records:
            self._cursor = cursor
            if loc is None:
                break
            block.append((loc, record))
            if len(block) == self.window:
                break
        if self.shuffle and len(block) > 1:
            perm = _rng(self.seed, self.index, self.epoch, 2, self.block_no).permutation(len(block))
            block = [block[i] for i in perm]
        self.block, self.taken = block, 0

    def next_record(self) -> tuple[str, Record] | None:
        """The next (location, record or DataError); None once the source has run all its epochs."""
        while not self.exhausted:
            cap = self.cfg.max_samples
            if cap is not None and self.good >= cap:
                self._end_epoch()
            elif self.taken < len(self.block):
                self.taken += 1
                return self.block[self.taken - 1]
            else:
                self._fill_block()
                if not self.block:
                    self._end_epoch()
        return None

    def _end_epoch(self) -> None:
        if self.good == 0:
            where = f" (shard {self.shard} of {self.num_shards})" if self.num_shards > 1 else ""
            raise DataError(
                f"{self.cfg.path}: no usable samples{where} (skipped: {dict(self.skips) or 'none'})"
            )
        if self.epochs is not None and self.epoch + 1 >= self.epochs:
            self.exhausted = True
            self.block = []
            return
        self._start_epoch(self.epoch + 1)

    def count_good(self) -> None:
        self.good += 1

    def count_skip(self, reason: str) -> None:
        if self.epoch == 0:  # count each bad record once, not once per pass
            self.skips[reason] += 1
