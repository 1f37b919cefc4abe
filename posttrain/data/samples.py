"""Tokenised samples, the overlong policy, and reading a whole (small) source into a list.

A sample is a `Sample(input_ids, labels, source)`: aligned lists, `labels[i] == input_ids[i]` where
the token bears loss and -100 where it does not (the shift to next-token targets happens at
collation, per document, so packing never lets one document predict the next); `source` is the
index of the `data.train` source it came from (for per-source metrics). A preference pair is ONE
sample whose `parts` are the lengths of its two documents (chosen, then rejected): the packer moves it
as a unit, so both halves always land in the same row, and collation splits it into two documents.
Samples can carry what offline recipes stored beside the data: a distillation record's teacher top-k
(`topk_ids` / `topk_logprobs`, one row per position, cut together with the tokens) and a pair's
precomputed reference log-probabilities (`ref_logps`, one per document); collation turns both into
batch tensors (posttrain/data/packing.py).

Bad input follows the source's `on_error` policy: `raise` fails on the first bad record with
`path:line: reason`; `skip` drops it and counts it per reason, which ends up in `summary.json`.
Samples longer than a row follow `data.overlong` (truncate, drop, or split), also counted. Nothing
is lost silently. Training streams sources (posttrain/data/pipeline.py); `load_samples` is for
small finite sets: evaluation, `data inspect`, tests.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from posttrain.config import SourceConfig
from posttrain.data.labels import IGNORE
from posttrain.data.render import renderer
from posttrain.data.sources import SourceStream
from posttrain.data.tokenizer import Tokenizer
from posttrain.errors import DataError


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]
    source: int = 0  # index of the data.train source it came from
    parts: tuple[int, ...] = ()  # lengths of the documents it holds when more than one (a preference pair)
    # Offline teacher, [len(input_ids), k] int64 / float32: row i is the teacher's top-k ids and their
    # log-probabilities for the token AT position i (the one labels[i] names); rows where labels[i] bears
    # no loss are padding. None when the record stored no teacher top-k.
    topk_ids: np.ndarray | None = None
    topk_logprobs: np.ndarray | None = None
    # Precomputed reference: the summed log-probability of each document's labelled tokens (one per part).
    ref_logps: tuple[float, ...] = ()

    def cut(self, start: int, end: int) -> Sample:
        """Positions [start, end) as a sample of one document (per-position rows cut alongside)."""
        ids = self.topk_ids[start:end] if self.topk_ids is not None else None
        logps = self.topk_logprobs[start:end] if self.topk_logprobs is not None else None
        return Sample(self.input_ids[start:end], self.labels[start:end], self.source, (), ids, logps)

    @property
    def num_loss_tokens(self) -> int:
        # Targets are shifted by one inside the document, so the first label never bears loss.
        return sum(1 for y in self.labels[1:] if y != IGNORE)


class SkipCounter(Counter):
    """Counts of dropped or altered samples, keyed by `reason` (e.g. `malformed_json`)."""


def fit_length(sample: Sample, max_len: int, policy: str, skips: SkipCounter) -> list[Sample]:
    """Apply the overlong policy: the result is zero, one, or (split) several samples."""
    n = len(sample.input_ids)
    if n <= max_len:
        return [sample]
    if sample.parts:  # cutting a pair would leave one half or a truncated comparison: drop it, counted
        skips["overlong_pair_dropped"] += 1
        return []
    if policy == "drop":
        skips["overlong_dropped"] += 1
        return []
    if policy == "split":
        skips["overlong_split"] += 1
        parts = [sample.cut(i, i + max_len) for i in range(0, n, max_len)]
        return [p for p in parts if p.num_loss_tokens > 0 and len(p.input_ids) > 1]
    cut = sample.cut(0, max_len)
    if cut.num_loss_tokens == 0:  # the loss-bearing part was cut away entirely
        skips["overlong_no_loss_left"] += 1
        return []
    skips["overlong_truncated"] += 1
    return [cut]


# A recipe's check or completion of each rendered sample (e.g. attach precomputed reference
# log-probabilities); a DataError it raises is reported with the record's `path:line`.
Annotate = Callable[[Sample], Sample]


def load_samples(
    source: SourceConfig,
    tokenizer: Tokenizer,
    *,
    max_len: int,
    overlong: str,
    mask: str = "all_assistant",
    annotate: Annotate | None = None,
) -> tuple[list[Sample], SkipCounter]:
    """Every sample of one pass over `source`, in file order (for small sets: eval, inspect, tests)."""
    stream = SourceStream(source, epochs=1)
    render = renderer(source.format, tokenizer, mask)
    out: list[Sample] = []
    while (item := stream.next_record()) is not None:
        out.extend(render_record(stream, item, render, max_len, overlong, annotate))
        if source.max_samples is not None and len(out) >= source.max_samples:
            break
    return out[: source.max_samples] if source.max_samples is not None else out, SkipCounter(stream.skips)


def render_record(
    stream, item, render, max_len: int, overlong: str, annotate: Annotate | None = None
) -> list[Sample]:
    """One (location, record) of `stream` -> samples, applying its on_error and the overlong policy."""
    loc, record = item
    try:
        if isinstance(record, DataError):
            raise record
        # A pair renderer adds the lengths of its two halves; a distill renderer (), then top-k arrays.
        ids, labels, *extra = render(record)
        sample = Sample(ids, labels, stream.index, *extra)
        if annotate is not None:
            sample = annotate(sample)
    except DataError as err:
        if stream.cfg.on_error == "raise":
            raise DataError(f"{loc}: {err}", err.reason) from None
        stream.count_skip(err.reason)
        return []
    kept = fit_length(sample, max_len, overlong, stream.skips if stream.epoch == 0 else SkipCounter())
    if kept:
        stream.count_good()
    return kept
