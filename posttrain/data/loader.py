"""Stateful loaders: an endless, seeded, resumable stream of training micro-batches, and a
finite one for evaluation.

The training stream walks the samples in a per-epoch permutation (seed + epoch), feeds them to the
packer (or, without packing, takes them one per row) and hands out micro-batches. Its state is the
epoch, the cursor in that epoch's permutation, the packer's open rows and the rows already packed
but not yet served, so a checkpointed run resumes on exactly the batch it would have seen next.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from posttrain.data.packing import BestFitPacker, Row, collate, fill_rate
from posttrain.data.samples import Sample


class TrainLoader:
    """Endless stream of micro-batches over `samples`, epoch after epoch."""

    def __init__(
        self,
        samples: list[Sample],
        *,
        row_len: int,
        micro_batch_size: int,
        pad_id: int,
        packing: bool = True,
        open_rows: int = 16,
        shuffle: bool = True,
        seed: int = 0,
    ):
        self.samples = samples
        self.row_len = row_len
        self.micro_batch_size = micro_batch_size
        self.pad_id = pad_id
        self.packing = packing
        self.shuffle = shuffle
        self.seed = seed
        self.packer = BestFitPacker(row_len, open_rows)
        self.epoch = 0
        self.cursor = 0
        self.ready: list[Row] = []
        self._order = self._permutation(0)
        self.rows_served = 0
        self.tokens_served = 0  # real (non-pad) tokens in served rows

    def _permutation(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.samples)))
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(len(self.samples), generator=g).tolist()

    def _next_row(self) -> Row:
        while not self.ready:
            if self.cursor == len(self._order):
                self.epoch += 1
                self.cursor = 0
                self._order = self._permutation(self.epoch)
            sample = self.samples[self._order[self.cursor]]
            self.cursor += 1
            self.ready.extend(self.packer.add(sample) if self.packing else [[sample]])
        return self.ready.pop(0)

    def next_rows(self, n: int) -> list[Row]:
        rows = [self._next_row() for _ in range(n)]
        self.rows_served += n
        self.tokens_served += sum(len(s.input_ids) for row in rows for s in row)
        return rows

    def next_micro_batch(self) -> dict[str, torch.Tensor]:
        rows = self.next_rows(self.micro_batch_size)
        return collate(rows, self.pad_id, self.row_len if self.packing else None)

    @property
    def fill_rate(self) -> float:
        return self.tokens_served / max(1, self.rows_served * self.row_len)

    def count_rows(self, num_epochs: int) -> int:
        """Rows that `num_epochs` epochs pack into (a dry run of a fresh loader's packer)."""
        dry = TrainLoader(
            self.samples,
            row_len=self.row_len,
            micro_batch_size=1,
            pad_id=self.pad_id,
            packing=self.packing,
            open_rows=self.packer.max_open_rows,
            shuffle=self.shuffle,
            seed=self.seed,
        )
        rows = 0
        while dry.epoch < num_epochs:
            dry._next_row()
            rows += 1
        return rows

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "cursor": self.cursor,
            "packer": self.packer.state_dict(),
            "ready": [[(s.input_ids, s.labels) for s in row] for row in self.ready],
            "rows_served": self.rows_served,
            "tokens_served": self.tokens_served,
        }

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self._order = self._permutation(self.epoch)
        self.packer.load_state_dict(state["packer"])
        self.ready = [[Sample(list(i), list(y)) for i, y in row] for row in state["ready"]]
        self.rows_served, self.tokens_served = state["rows_served"], state["tokens_served"]


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
