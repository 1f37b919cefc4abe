"""Stateful loaders: an endless (or epochs-long), seeded, resumable stream of training
micro-batches, and a finite one for evaluation.

`TrainLoader` pulls rows from a `Pipeline` (sources -> mixer -> tokenisation -> packer). With
`prefetch_rows > 0` the pipeline runs in a background thread that keeps a bounded queue of packed
rows ahead of the training loop, so reading, tokenising and packing overlap the model's work; the
time the loop still waits for data is reported per step (`data_wait_s`).

The checkpointed state always describes what the *training loop consumed*, not what the producer
prefetched: each queued row carries the pipeline snapshot taken right after it was produced, and the
loader keeps the snapshot of the last row it handed out. A resumed run therefore continues with
exactly the batch the uninterrupted run would have seen next, with or without the background thread.

Data parallelism, `data.shard_by: rows` (the default): every data-parallel rank runs the same pipeline,
reads each optimizer step's rows (all ranks' rows) and keeps its own contiguous slice of them. The rows
of a step, and the loader's state, are then the same whatever the number of ranks: a distributed run
trains on exactly the single-process batches, and a checkpoint resumes on any world size. The price is
that every rank reads and tokenises all records (`shard_by: samples` splits the records instead; its
pipeline is built per shard and its state is per rank).
"""

from __future__ import annotations

import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterator

import torch

from posttrain.data.packing import BestFitPacker, Row, collate, fill_rate
from posttrain.data.pipeline import Pipeline
from posttrain.data.samples import Sample
from posttrain.errors import DataError

_END = object()


def _produce(pipeline: Pipeline, q: queue.Queue, stop: threading.Event) -> None:
    """Producer thread: (row, snapshot after it) into q until the stream ends, fails or is stopped."""

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    try:
        while not stop.is_set():
            row = pipeline.next_row()
            if row is None:
                put(_END)
                return
            if not put((row, pipeline.snapshot())):
                return
    except BaseException as err:  # handed to the training loop, which raises it where it would have
        put(err)


class _Producer:
    """A background thread that runs `pipeline` ahead of the consumer, at most `maxsize` rows."""

    def __init__(self, pipeline: Pipeline, maxsize: int):
        self.queue: queue.Queue = queue.Queue(maxsize)
        self.stop = threading.Event()
        self.thread = threading.Thread(
            target=_produce, args=(pipeline, self.queue, self.stop), name="posttrain-packer", daemon=True
        )
        self.thread.start()

    def get(self):
        item = self.queue.get()
        if isinstance(item, BaseException):
            raise item
        return None if item is _END else item

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


class TrainLoader:
    """Micro-batches from a pipeline of `data.train`, with exact state and per-source counts."""

    def __init__(
        self,
        build: Callable[[], Pipeline],
        *,
        row_len: int,
        micro_batch_size: int,
        pad_id: int,
        packing: bool = True,
        prefetch_rows: int = 0,
        dp_rank: int = 0,
        dp_size: int = 1,
        rows_per_step: int | None = None,
        state_is_per_rank: bool = False,
    ):
        """dp_size > 1 with rows_per_step (all ranks' rows of one optimizer step): row sharding, see
        the module docstring. state_is_per_rank marks a pipeline that is itself one rank's shard."""
        if dp_size > 1 and (rows_per_step is None or rows_per_step % dp_size):
            raise ValueError(f"rows_per_step={rows_per_step} must be a multiple of dp_size={dp_size}")
        self.dp_rank, self.dp_size, self.rows_per_step = dp_rank, dp_size, rows_per_step
        self.state_is_per_rank = state_is_per_rank
        self._mine: list[Row] = []  # this rank's rows of the current step, not yet batched
        self.build = build
        self.row_len, self.micro_batch_size, self.pad_id = row_len, micro_batch_size, pad_id
        self.packing, self.prefetch_rows = packing, prefetch_rows
        self.pipeline = build()
        self.names = self.pipeline.names
        self._producer: _Producer | None = None
        self._snapshot = self.pipeline.snapshot()  # state after the last row the loop consumed
        self.rows_served = 0
        self.tokens_served = 0  # real (non-pad) tokens in served rows
        self.samples_by_source = [0] * len(self.names)
        self.tokens_by_source = [0] * len(self.names)
        self._step = {"samples": [0] * len(self.names), "tokens": [0] * len(self.names), "wait": 0.0}

    def _next_row(self) -> Row:
        if self.prefetch_rows <= 0:
            row = self.pipeline.next_row()
        else:
            if self._producer is None:
                self._producer = _Producer(self.pipeline, self.prefetch_rows)
                weakref.finalize(self, self._producer.close)
            t0 = time.perf_counter()
            item = self._producer.get()
            self._step["wait"] += time.perf_counter() - t0
            row, snapshot = item if item is not None else (None, None)
            if row is not None:
                self._snapshot = snapshot
        if row is None:
            raise DataError(
                f"training data ran out after {self.rows_served} rows: every data.train source finished "
                "its epochs; lower training.max_steps, or raise or unset the sources' `epochs`"
            )
        for s in row:
            self._step["samples"][s.source] += 1
            self._step["tokens"][s.source] += len(s.input_ids)
            self.samples_by_source[s.source] += 1
            self.tokens_by_source[s.source] += len(s.input_ids)
        return row

    def next_rows(self, n: int) -> list[Row]:
        rows = [self._next_row() for _ in range(n)]
        self.rows_served += n
        self.tokens_served += sum(len(s.input_ids) for row in rows for s in row)
        return rows

    def next_micro_batch(self) -> dict[str, torch.Tensor]:
        if self.dp_size > 1 and self.rows_per_step is not None:
            if not self._mine:  # a new step: read every rank's rows, keep this rank's slice
                step_rows = self.next_rows(self.rows_per_step)
                per = self.rows_per_step // self.dp_size
                self._mine = step_rows[self.dp_rank * per : (self.dp_rank + 1) * per]
            rows, self._mine = self._mine[: self.micro_batch_size], self._mine[self.micro_batch_size :]
            return collate(rows, self.pad_id, self.row_len if self.packing else None)
        rows = self.next_rows(self.micro_batch_size)
        return collate(rows, self.pad_id, self.row_len if self.packing else None)

    @property
    def fill_rate(self) -> float:
        return self.tokens_served / max(1, self.rows_served * self.row_len)

    def step_metrics(self) -> dict[str, float]:
        """Samples and tokens per source, and seconds waited for data, since the last call."""
        out: dict[str, float] = {"data_wait_s": self._step["wait"]}
        for i, name in enumerate(self.names):
            out[f"samples/{name}"] = self._step["samples"][i]
            out[f"tokens/{name}"] = self._step["tokens"][i]
        self._step = {"samples": [0] * len(self.names), "tokens": [0] * len(self.names), "wait": 0.0}
        return out

    def skips(self) -> dict[str, int]:
        """Skipped or altered samples by reason, over all sources, as of what the loop consumed."""
        total: dict[str, int] = {}
        for _, skips in self._current()[0]:
            for reason, n in skips.items():
                total[reason] = total.get(reason, 0) + n
        return total

    def summary(self) -> dict:
        """Per source: samples and tokens consumed, skips by reason (for summary.json)."""
        return {
            name: {"samples": self.samples_by_source[i], "tokens": self.tokens_by_source[i], "skipped": skips}
            for i, (name, (_, skips)) in enumerate(zip(self.names, self._current()[0]))
        }

    def count_rows(self, progress: str = "quiet") -> int:
        """Rows until every source has run its epochs (a dry run of a fresh pipeline). The total is
        what this finds out, so its progress shows the count and rate, not an ETA."""
        from posttrain.metrics.progress import Progress

        dry, rows = self.build(), 0
        if not all(s.epochs is not None for s in dry.streams):
            raise DataError("counting rows needs every data.train source to have a number of epochs")
        with Progress(None, "data: count rows", progress, unit="rows") as shown:
            while dry.next_row() is not None:
                rows += 1
                if rows % 256 == 0:
                    shown.update(rows)
            shown.update(rows)
        return rows

    def _current(self) -> tuple:
        return self.pipeline.snapshot() if self.prefetch_rows <= 0 else self._snapshot

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close()
            self._producer = None

    def state_dict(self) -> dict:
        if self._mine:
            raise RuntimeError("loader state taken in the middle of an optimizer step (rows still pending)")
        return {
            "pipeline": Pipeline.materialise(self._current()),
            "rows_served": self.rows_served,
            "tokens_served": self.tokens_served,
            "samples_by_source": list(self.samples_by_source),
            "tokens_by_source": list(self.tokens_by_source),
        }

    def load_state_dict(self, state: dict) -> None:
        self.close()  # the producer ran ahead of the checkpoint: restart it from there
        self._mine = []
        self.pipeline.load_state_dict(state["pipeline"])
        self._snapshot = self.pipeline.snapshot()
        self.rows_served, self.tokens_served = state["rows_served"], state["tokens_served"]
        self.samples_by_source = list(state["samples_by_source"])
        self.tokens_by_source = list(state["tokens_by_source"])


def eval_batches(
    samples: list[Sample], *, row_len: int, micro_batch_size: int, pad_id: int, packing: bool = True
) -> Iterator[dict[str, torch.Tensor]]:
    """Every eval sample exactly once, in file order, packed the same way as training."""
    if packing:
        packer = BestFitPacker(row_len)
        rows: list[Row] = []
        for s in samples:
            rows.extend(packer.add(s))
        rows.extend(packer.flush())
    else:
        rows = [[s] for s in samples]
    for i in range(0, len(rows), micro_batch_size):
        chunk = rows[i : i + micro_batch_size]
        yield collate(chunk, pad_id, row_len if packing else None)


__all__ = ["TrainLoader", "eval_batches", "fill_rate"]
