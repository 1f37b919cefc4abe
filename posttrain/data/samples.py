"""Reading JSONL sources into tokenised samples, with errors that name `file:line`.

A sample is a `Sample(input_ids, labels)`: aligned lists, `labels[i] == input_ids[i]` where the
token bears loss and -100 where it does not (the shift to next-token targets happens at collation,
per document, so packing never lets one document predict the next).

Bad input follows the source's `on_error` policy: `raise` fails on the first bad line with
`path:line: reason`; `skip` drops it and counts it per reason in `SkipCounter`, which ends up in
`summary.json`. Samples longer than a row follow `data.overlong` (truncate, drop, or split), also
counted. Nothing is lost silently.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from posttrain.config import SourceConfig
from posttrain.data.tokenizer import Tokenizer
from posttrain.errors import DataError

IGNORE = -100


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]

    @property
    def num_loss_tokens(self) -> int:
        # Targets are shifted by one inside the document, so the first label never bears loss.
        return sum(1 for y in self.labels[1:] if y != IGNORE)


class SkipCounter(Counter):
    """Counts of dropped or altered samples, keyed by `reason` (e.g. `malformed_json`)."""


def _parse_line(raw: bytes) -> dict:
    """One JSONL line -> object; DataError(reason message, reason key) when it is not one."""
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


def iter_records(path: Path) -> Iterator[tuple[int, dict | DataError]]:
    """Yield (line number, object or the DataError that line raised) for each non-blank line."""
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                yield lineno, _parse_line(raw)
            except DataError as err:
                yield lineno, err


def _field(obj: dict, name: str, kind: type) -> object:
    if name not in obj:
        raise DataError(f"missing field '{name}'", "missing_field")
    value = obj[name]
    if not isinstance(value, kind):
        raise DataError(f"field '{name}' must be {kind.__name__}, got {type(value).__name__}", "wrong_type")
    return value


def renderer(fmt: str, tokenizer: Tokenizer, mask: str) -> Callable[[dict], Sample]:
    """The function that turns one JSON object of a source format into a Sample."""
    if fmt == "chat":
        return lambda obj: Sample(*tokenizer.render_chat(_field(obj, "messages", list), mask=mask))
    if fmt == "prompt_completion":
        return lambda obj: Sample(
            *tokenizer.render_prompt_completion(_field(obj, "prompt", str), _field(obj, "completion", str))
        )
    if fmt == "text":
        return lambda obj: Sample(*tokenizer.render_text(_field(obj, "text", str)))
    raise DataError(f"unknown data format {fmt!r}")


def fit_length(sample: Sample, max_len: int, policy: str, skips: SkipCounter) -> list[Sample]:
    """Apply the overlong policy: the result is zero, one, or (split) several samples."""
    n = len(sample.input_ids)
    if n <= max_len:
        return [sample]
    if policy == "drop":
        skips["overlong_dropped"] += 1
        return []
    if policy == "split":
        skips["overlong_split"] += 1
        parts = [
            Sample(sample.input_ids[i : i + max_len], sample.labels[i : i + max_len])
            for i in range(0, n, max_len)
        ]
        return [p for p in parts if p.num_loss_tokens > 0 and len(p.input_ids) > 1]
    cut = Sample(sample.input_ids[:max_len], sample.labels[:max_len])
    if cut.num_loss_tokens == 0:  # the loss-bearing part was cut away entirely
        skips["overlong_no_loss_left"] += 1
        return []
    skips["overlong_truncated"] += 1
    return [cut]


def load_samples(
    source: SourceConfig, tokenizer: Tokenizer, *, max_len: int, overlong: str, mask: str = "all_assistant"
) -> tuple[list[Sample], SkipCounter]:
    """Read, validate and tokenise a whole source (issue 4 replaces this with a streaming reader)."""
    path = Path(source.path)
    render = renderer(source.format, tokenizer, mask)
    skips = SkipCounter()
    out: list[Sample] = []
    for lineno, record in iter_records(path):
        if source.max_samples is not None and len(out) >= source.max_samples:
            break
        try:
            if isinstance(record, DataError):
                raise record
            sample = render(record)
        except DataError as err:
            if source.on_error == "raise":
                raise DataError(f"{path}:{lineno}: {err}", err.reason) from None
            skips[err.reason] += 1
            continue
        out.extend(fit_length(sample, max_len, overlong, skips))
    if not out:
        raise DataError(f"{path}: no usable samples (skipped: {dict(skips) or 'none'})")
    return out, skips
