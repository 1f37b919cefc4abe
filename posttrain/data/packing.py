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

Batches holding preference pairs (samples with `parts`) also carry, per document, what the pair
losses need:

  doc_index    [B, T]  the document's index in doc_lens (-1 on padding)
  doc_roles    [N]     0 = chosen, 1 = rejected (a pair's two documents are adjacent), -1 = plain
  ref_logps    [N]     fp32 precomputed reference log-probability of each document (NaN for plain
                       ones); only when every pair in the batch carries them

Batches whose every sample carries offline teacher top-k rows (distillation records) also carry:

  teacher_topk_ids       [L, K]  int64, row l = the teacher's top-k ids for the l-th loss position
  teacher_topk_logprobs  [L, K]  fp32, their stored log-probabilities
                                 (L = (targets != IGNORE).sum(), loss positions in row-major [B, T] order:
                                 what topk_distill_loss reads; a sample with fewer than K candidates is
                                 padded with id 0 at log-probability -inf, which contributes nothing)
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

import numpy as np
import torch

from posttrain.data.labels import IGNORE
from posttrain.data.samples import Sample

Row = list[Sample]


class BestFitPacker:
    """Streaming best-fit packing into rows of a fixed token budget.

    Open rows are indexed by (free tokens, opening order) in a sorted list, so finding the row with
    the least free space that still fits a sample is a binary search, however many rows are open.
    Ties go to the row opened first.
    """

    def __init__(self, max_tokens_per_pack: int, max_open_rows: int = 16):
        self.capacity = max_tokens_per_pack
        self.max_open_rows = max_open_rows
        self._rows: dict[int, Row] = {}  # opening number -> row
        self._keys: list[tuple[int, int]] = []  # sorted (free tokens, opening number)
        self._opened = 0

    @property
    def open_rows(self) -> list[Row]:
        """The open rows in the order they were opened."""
        return [self._rows[k] for k in sorted(self._rows)]

    def add(self, sample: Sample) -> list[Row]:
        """Place one sample; returns the rows that became final (possibly none)."""
        n = len(sample.input_ids)
        if n > self.capacity:
            raise ValueError(f"sample of {n} tokens exceeds max_tokens_per_pack={self.capacity}")
        keys = self._keys
        i = bisect.bisect_left(keys, (n, -1))  # the row with the least free space >= n
        if i < len(keys):
            free, k = keys.pop(i)
            row = self._rows[k]
            row.append(sample)
            if free == n:
                del self._rows[k]
                return [row]
            bisect.insort(keys, (free - n, k))
            return []
        k = self._opened
        self._opened += 1
        self._rows[k] = [sample]
        bisect.insort(keys, (self.capacity - n, k))
        if len(self._rows) > self.max_open_rows:  # emit the fullest row other than the one just opened
            j = 0 if keys[0][1] != k else 1
            _, fullest = keys.pop(j)
            return [self._rows.pop(fullest)]
        return []

    def flush(self) -> list[Row]:
        """Emit every open row (end of a finite stream)."""
        rows = self.open_rows
        self._rows, self._keys = {}, []
        return rows

    # The state is the open rows themselves; samples are small lists of ints.
    def state_dict(self) -> dict:
        return {"open_rows": rows_to_state(self.open_rows)}

    def load_state_dict(self, state: dict) -> None:
        rows = rows_from_state(state["open_rows"])
        self._rows = dict(enumerate(rows))
        self._keys = sorted(
            (self.capacity - sum(len(s.input_ids) for s in row), k) for k, row in self._rows.items()
        )
        self._opened = len(rows)


def rows_to_state(rows: Sequence[Row]) -> list:
    """Rows as plain data for a checkpoint: [[(input_ids, labels, source, parts, topk_ids,
    topk_logprobs, ref_logps), ...], ...] (the top-k entries are numpy arrays or None)."""
    return [
        [
            (s.input_ids, s.labels, s.source, list(s.parts), s.topk_ids, s.topk_logprobs, list(s.ref_logps))
            for s in row
        ]
        for row in rows
    ]


def rows_from_state(state: list) -> list[Row]:
    # Checkpoints written before top-k and reference fields existed hold 3- or 4-tuples.
    return [
        [
            Sample(
                list(s[0]),
                list(s[1]),
                s[2],
                tuple(s[3]) if len(s) > 3 else (),
                *(s[4:6] if len(s) > 5 else (None, None)),
                tuple(s[6]) if len(s) > 6 else (),
            )
            for s in row
        ]
        for row in state
    ]


def fill_rate(rows: Sequence[Row], row_len: int) -> float:
    """Share of row slots that hold real tokens (1.0 = no padding)."""
    used = sum(len(s.input_ids) for row in rows for s in row)
    return used / max(1, row_len * len(rows))


def collate(rows: Sequence[Row], pad_id: int, row_len: int | None = None) -> dict[str, torch.Tensor]:
    """Rows of whole documents -> padded tensors (see the module docstring for the layout).

    Built from one flat list per field and a single array conversion each (building a tensor per
    document was the pipeline's bottleneck), then copied row by row into [B, T].
    """
    lengths = [sum(len(s.input_ids) for s in row) for row in rows]
    T = row_len if row_len is not None else max(lengths)
    B = len(rows)
    ids: list[int] = []
    tgt: list[int] = []
    doc_lens: list[int] = []
    doc_in_row: list[int] = []
    roles: list[int] = []
    ref: list[float] = []
    for row in rows:
        d = 0
        for sample in row:
            ids += sample.input_ids
            start = 0
            for role, n in enumerate(sample.parts) if sample.parts else [(-1, len(sample.input_ids))]:
                # Next-token targets within the document; the last position predicts nothing.
                tgt += sample.labels[start + 1 : start + n]
                tgt.append(IGNORE)
                doc_lens.append(n)
                doc_in_row.append(d)
                roles.append(role)
                ref.append(sample.ref_logps[role] if sample.ref_logps else math.nan)
                start, d = start + n, d + 1
    lens = np.asarray(doc_lens, dtype=np.int64)
    starts = np.cumsum(lens) - lens  # flat start of every document
    flat = {
        "input_ids": np.asarray(ids, dtype=np.int64),
        "targets": np.asarray(tgt, dtype=np.int64),
        "position_ids": np.arange(len(ids), dtype=np.int64) - np.repeat(starts, lens),
        "doc_ids": np.repeat(np.asarray(doc_in_row, dtype=np.int64), lens),
    }
    fills = {"input_ids": pad_id, "targets": IGNORE, "position_ids": 0, "doc_ids": -1}
    out = {k: np.full((B, T), fills[k], dtype=np.int64) for k in flat}
    offset = 0
    for b, n in enumerate(lengths):  # each row's documents are contiguous from position 0
        for k, values in flat.items():
            out[k][b, :n] = values[offset : offset + n]
        offset += n
    input_ids, targets, position_ids, doc_ids = (torch.from_numpy(out[k]) for k in flat)
    lens_t = torch.from_numpy(lens)
    batch = {
        "input_ids": input_ids,
        "targets": targets,
        "position_ids": position_ids,
        "doc_lens": lens_t,
    }
    if max(doc_in_row) > 0:
        batch["doc_ids"] = doc_ids
    if any(r >= 0 for r in roles):
        index = np.full((B, T), -1, dtype=np.int64)
        flat_index = np.repeat(np.arange(len(doc_lens), dtype=np.int64), lens)
        offset = 0
        for b, n in enumerate(lengths):
            index[b, :n] = flat_index[offset : offset + n]
            offset += n
        batch["doc_index"] = torch.from_numpy(index)
        batch["doc_roles"] = torch.tensor(roles, dtype=torch.int64)
        if all(s.ref_logps for row in rows for s in row if s.parts):
            batch["ref_logps"] = torch.tensor(ref, dtype=torch.float32)
    return batch | collate_topk(rows)


def collate_topk(rows: Sequence[Row]) -> dict[str, torch.Tensor]:
    """teacher_topk_ids / teacher_topk_logprobs of the rows' loss positions (see the module
    docstring); {} unless every sample carries top-k rows.

    A document's loss positions are j = start .. start + n - 2 with labels[j + 1] bearing loss (the
    shift collate applies), and the teacher row for target labels[j + 1] is the sample's row j + 1."""
    samples = [s for row in rows for s in row]
    if not samples or any(s.topk_ids is None for s in samples):
        return {}
    K = max(s.topk_ids.shape[1] for s in samples)
    ids, logps = [], []
    for s in samples:
        labels = np.asarray(s.labels, dtype=np.int64)
        start = 0
        for n in s.parts or (len(s.input_ids),):
            at = start + 1 + np.flatnonzero(labels[start + 1 : start + n] != IGNORE)
            pad = ((0, 0), (0, K - s.topk_ids.shape[1]))
            ids.append(np.pad(s.topk_ids[at], pad, constant_values=0))
            logps.append(np.pad(s.topk_logprobs[at], pad, constant_values=-np.inf))
            start += n
    return {
        "teacher_topk_ids": torch.from_numpy(np.concatenate(ids).astype(np.int64)),
        "teacher_topk_logprobs": torch.from_numpy(np.concatenate(logps).astype(np.float32)),
    }
