"""On-the-fly sequence packing and collation into model-ready batches.

`BestFitPacker` streams samples into rows of `max_tokens_per_pack` tokens. It keeps a few rows open
and puts each sample into the open row with the least free space that still fits it (best fit);
when too many rows are open, the fullest one is emitted. Document boundaries are preserved: a row
is a list of whole samples, never a sample cut in two. Its whole state (the open rows) is plain
data, so it goes into checkpoints and a resumed run packs exactly the same rows.

`collate` turns rows into a batch dict:

  input_ids    [B, T]  token ids, padded with pad_id
  targets      [B, T]  next-token labels shifted *within* each document, -100 where ignored
                       (padding, masked prompt tokens, and each document's last position)
  position_ids [B, T]  restart at 0 for every document
  doc_ids      [B, T]  document index within the row (-1 on padding); omitted when no row holds
                       more than one document, so attention can use the plain causal fast path
  doc_lens     [N]     lengths of all documents in the batch (for per-document FLOPs)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from posttrain.data.samples import IGNORE, Sample

Row = list[Sample]


class BestFitPacker:
    """Streaming best-fit packing into rows of a fixed token budget."""

    def __init__(self, max_tokens_per_pack: int, max_open_rows: int = 16):
        self.capacity = max_tokens_per_pack
        self.max_open_rows = max_open_rows
        self.open_rows: list[Row] = []
        self._free: list[int] = []  # free tokens per open row, parallel to open_rows

    def add(self, sample: Sample) -> list[Row]:
        """Place one sample; returns the rows that became final (possibly none)."""
        n = len(sample.input_ids)
        if n > self.capacity:
            raise ValueError(f"sample of {n} tokens exceeds max_tokens_per_pack={self.capacity}")
        best = -1
        for i, free in enumerate(self._free):
            if free >= n and (best < 0 or free < self._free[best]):
                best = i
        if best >= 0:
            self.open_rows[best].append(sample)
            self._free[best] -= n
            if self._free[best] == 0:
                return [self._pop(best)]
            return []
        self.open_rows.append([sample])
        self._free.append(self.capacity - n)
        if len(self.open_rows) > self.max_open_rows:
            fullest = min(range(len(self._free) - 1), key=lambda i: self._free[i])
            return [self._pop(fullest)]
        return []

    def flush(self) -> list[Row]:
        """Emit every open row (end of a finite stream)."""
        rows, self.open_rows, self._free = self.open_rows, [], []
        return rows

    def _pop(self, i: int) -> Row:
        self._free.pop(i)
        return self.open_rows.pop(i)

    # The state is the open rows themselves; samples are small lists of ints.
    def state_dict(self) -> dict:
        return {"open_rows": [[(s.input_ids, s.labels) for s in row] for row in self.open_rows]}

    def load_state_dict(self, state: dict) -> None:
        self.open_rows = [[Sample(list(i), list(y)) for i, y in row] for row in state["open_rows"]]
        self._free = [self.capacity - sum(len(s.input_ids) for s in row) for row in self.open_rows]


def fill_rate(rows: Sequence[Row], row_len: int) -> float:
    """Share of row slots that hold real tokens (1.0 = no padding)."""
    used = sum(len(s.input_ids) for row in rows for s in row)
    return used / max(1, row_len * len(rows))


def collate(rows: Sequence[Row], pad_id: int, row_len: int | None = None) -> dict[str, torch.Tensor]:
    """Rows of whole documents -> padded tensors (see the module docstring for the layout)."""
    lengths = [sum(len(s.input_ids) for s in row) for row in rows]
    T = row_len if row_len is not None else max(lengths)
    B = len(rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    targets = torch.full((B, T), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((B, T), dtype=torch.long)
    doc_ids = torch.full((B, T), -1, dtype=torch.long)
    doc_lens: list[int] = []
    for b, row in enumerate(rows):
        start = 0
        for d, sample in enumerate(row):
            n = len(sample.input_ids)
            end = start + n
            input_ids[b, start:end] = torch.tensor(sample.input_ids)
            # Next-token targets within the document; the last position predicts nothing.
            targets[b, start : end - 1] = torch.tensor(sample.labels[1:])
            position_ids[b, start:end] = torch.arange(n)
            doc_ids[b, start:end] = d
            doc_lens.append(n)
            start = end
    batch = {
        "input_ids": input_ids,
        "targets": targets,
        "position_ids": position_ids,
        "doc_lens": torch.tensor(doc_lens, dtype=torch.long),
    }
    if max(len(row) for row in rows) > 1:
        batch["doc_ids"] = doc_ids
    return batch
