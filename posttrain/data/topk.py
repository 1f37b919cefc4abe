"""Offline teacher top-k stored with `distill` records, aligned to the tokens they describe.

A `distill` record may carry `teacher_topk: {ids: [[int] * k] * L, logprobs: [[float] * k] * L}`: one
row per loss-bearing token of the rendered record, in order (the completion, i.e. the last assistant
turn, and the template's end-of-turn token), each the teacher's k most likely ids for that token and
their log-probabilities at `distill.temperature`. `posttrain teacher-topk` writes them
(posttrain/train/offline.py) by rendering the record exactly as training does, so L always matches.

Here the L rows become [len(input_ids), k] arrays aligned with the tokens (row i describes the token at
position i), so truncation and splitting cut them with the tokens (`Sample.cut`) and collation picks
them at the loss positions, whatever the packing (`packing.collate_topk`).
"""

from __future__ import annotations

import numpy as np

from posttrain.data.labels import IGNORE
from posttrain.data.schemas import DistillRecord, validate
from posttrain.errors import DataError


def distill_messages(record: DistillRecord) -> list[dict]:
    """The conversation a distill record trains on: its prompt, then the teacher's completion."""
    return [*record.messages, {"role": "assistant", "content": record.completion}]


def loss_positions(labels: list[int]) -> np.ndarray:
    """Positions whose token bears loss (the first token never does: nothing predicts it)."""
    y = np.asarray(labels, dtype=np.int64)
    return 1 + np.flatnonzero(y[1:] != IGNORE)


def render_distill(tokenizer, obj: dict) -> tuple:
    """A `distill` record -> (ids, labels), or (ids, labels, (), topk_ids, topk_logprobs) when it stores
    teacher top-k (the tail is what `Sample` takes after `source`)."""
    record = validate("distill", obj)
    ids, labels = tokenizer.render_chat(distill_messages(record), mask="last_assistant")
    if record.teacher_ids is None:
        return ids, labels
    topk_ids, topk_logprobs = align_topk(
        labels, record.teacher_ids, record.teacher_logprobs, tokenizer.vocab_size
    )
    return ids, labels, (), topk_ids, topk_logprobs


def align_topk(
    labels: list[int], ids_rows: list[list[int]], logprob_rows: list[list[float]], vocab_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """The stored rows (one per loss token) as [len(labels), k] arrays aligned with the positions;
    rows at positions without loss are id 0 at log-probability -inf (never read)."""
    at = loss_positions(labels)
    if len(ids_rows) != len(at):
        raise DataError(
            f"field 'teacher_topk' has {len(ids_rows)} rows, but the record renders to {len(at)} "
            "loss-bearing tokens (its completion and end-of-turn token); write it with `posttrain "
            "teacher-topk` and the tokenizer this job uses",
            "shape_mismatch",
        )
    ids_LK = np.asarray(ids_rows, dtype=np.int64).reshape(len(at), -1)
    if ids_LK.shape[1] == 0:
        raise DataError("field 'teacher_topk': rows hold no candidates (k = 0)", "empty_sequence")
    if ids_LK.min() < 0 or ids_LK.max() >= vocab_size:
        raise DataError(
            f"field 'teacher_topk.ids': ids must lie in [0, {vocab_size}) (the tokenizer's vocabulary), "
            f"got [{ids_LK.min()}, {ids_LK.max()}]",
            "bad_token_id",
        )
    logprobs_LK = np.asarray(logprob_rows, dtype=np.float32).reshape(ids_LK.shape)
    empty = np.flatnonzero(~np.isfinite(logprobs_LK).any(axis=1))
    if empty.size:  # renormalising a row with no finite entry gives NaN
        raise DataError(
            f"field 'teacher_topk.logprobs' row {empty[0]}: no finite log-probability", "wrong_type"
        )
    topk_ids = np.zeros((len(labels), ids_LK.shape[1]), dtype=np.int64)
    topk_logprobs = np.full(topk_ids.shape, -np.inf, dtype=np.float32)
    topk_ids[at] = ids_LK
    topk_logprobs[at] = logprobs_LK
    return topk_ids, topk_logprobs
