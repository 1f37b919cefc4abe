"""Dataset kinds: one schema per kind, validated record by record, with errors that name the field.

Every source declares a `format`. A record (one JSONL line, one Parquet or Arrow row) is checked
against that format's schema before anything else touches it, so a bad record fails with the field
at fault (`missing field 'chosen'`, `field 'answer' must be str, got int`) and a `reason` key under
which `on_error: skip` counts it. Formats and their fields:

  chat               messages: [{role, content}, ...] with at least one assistant turn
  prompt_completion  prompt: str, completion: str
  text               text: str                              (pretraining; every token bears loss)
  tokens             input_ids: [int], labels?: [int]       (pre-tokenised; -100 = no loss)
  preference         chosen, rejected: str or messages; prompt?: str or messages
                     (without a prompt, chosen and rejected are whole conversations)
  rl_prompt          messages or prompt (or prompt_ids: [int], already token ids, e.g. an event
                     history: docs/events.md), answer: str | number, metadata?: {...} (what a reward needs)
  distill            messages or prompt, completion: str (the teacher's),
                     teacher_topk?: {ids: [[int] * k] * T, logprobs: [[float] * k] * T}
                     (T = the completion's loss-bearing tokens; see posttrain/data/topk.py)

SFT and pretraining render the first four into token samples (`posttrain/data/render.py`); the other three are
validated into small dataclasses (`validate`) for the DPO, GRPO and distillation recipes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from posttrain.data.chat import validate_messages
from posttrain.data.labels import IGNORE
from posttrain.errors import DataError

SFT_FORMATS = ("chat", "prompt_completion", "text", "tokens")


@dataclass
class PreferencePair:
    prompt: list[dict]  # shared context; empty when chosen/rejected are whole conversations
    chosen: list[dict]  # the preferred continuation (assistant turns)
    rejected: list[dict]


@dataclass
class RLPrompt:
    messages: list[dict]  # the conversation to generate from (no final assistant answer)
    answer: str  # reference answer the reward compares against (numbers are kept as their text)
    metadata: dict = field(default_factory=dict)  # anything else a reward function needs
    prompt_ids: list[int] | None = None  # the prompt as token ids (then `messages` is empty): not rendered


@dataclass
class DistillRecord:
    messages: list[dict]  # prompt conversation
    completion: str  # the teacher's completion
    teacher_ids: list[list[int]] | None = None  # [T][k] top-k token ids per completion token
    teacher_logprobs: list[list[float]] | None = None  # [T][k] their log-probabilities


def _kind_name(kind: type | tuple) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join("number" if k is float else k.__name__ for k in kinds)


def field_of(obj: dict, name: str, kind: type | tuple, *, required: bool = True) -> Any:
    """obj[name] checked against `kind`; DataError names the field (bools are not numbers)."""
    if name not in obj or (obj[name] is None and not required):
        if required:
            raise DataError(f"missing field '{name}'", "missing_field")
        return None
    value = obj[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise DataError(
            f"field '{name}' must be {_kind_name(kind)}, got {type(value).__name__}", "wrong_type"
        )
    return value


def _int_list(obj: dict, name: str, *, required: bool = True) -> list[int] | None:
    value = field_of(obj, name, list, required=required)
    if value is None:
        return None
    if not value:
        raise DataError(f"field '{name}' is empty", "empty_sequence")
    for i, x in enumerate(value):
        if not isinstance(x, int) or isinstance(x, bool):
            raise DataError(f"field '{name}'[{i}] must be int, got {type(x).__name__}", "wrong_type")
    return value


def _conversation(obj: dict, name: str, *, assistant: bool, required: bool = True) -> list[dict] | None:
    """A str (one user or assistant message) or a list of messages, checked message by message."""
    value = field_of(obj, name, (str, list), required=required)
    if value is None:
        return None
    if isinstance(value, str):
        return [{"role": "assistant" if assistant else "user", "content": value}]
    try:
        return validate_messages(value, require_assistant=assistant)
    except DataError as err:
        raise DataError(f"field '{name}': {err}", err.reason) from None


def _prompt(obj: dict) -> list[dict]:
    """`messages` (a conversation) or `prompt` (a string or conversation), without assistant turns required."""
    if "messages" in obj:
        return _conversation(obj, "messages", assistant=False)
    if "prompt" in obj:
        return _conversation(obj, "prompt", assistant=False)
    raise DataError("missing field 'messages' (or 'prompt')", "missing_field")


def _preference(obj: dict) -> PreferencePair:
    prompt = _conversation(obj, "prompt", assistant=False, required=False) or []
    chosen = _conversation(obj, "chosen", assistant=True)
    rejected = _conversation(obj, "rejected", assistant=True)
    if chosen == rejected:
        raise DataError("fields 'chosen' and 'rejected' are identical", "identical_pair")
    return PreferencePair(prompt, chosen, rejected)


def _rl_prompt(obj: dict) -> RLPrompt:
    prompt_ids = _int_list(obj, "prompt_ids", required=False)
    if prompt_ids is not None and ("messages" in obj or "prompt" in obj):
        raise DataError("give 'prompt_ids' or 'messages'/'prompt', not both", "ambiguous_prompt")
    messages = [] if prompt_ids is not None else _prompt(obj)
    answer = field_of(obj, "answer", (str, int, float))
    metadata = field_of(obj, "metadata", dict, required=False) or {}
    return RLPrompt(messages, str(answer), metadata, prompt_ids)


def _distill(obj: dict) -> DistillRecord:
    messages = _prompt(obj)
    completion = field_of(obj, "completion", str)
    topk = field_of(obj, "teacher_topk", dict, required=False)
    if topk is None:
        return DistillRecord(messages, completion)
    ids = field_of(topk, "ids", list)
    logprobs = field_of(topk, "logprobs", list)
    if len(ids) != len(logprobs):
        raise DataError(
            f"field 'teacher_topk': {len(ids)} rows of ids but {len(logprobs)} rows of logprobs",
            "shape_mismatch",
        )
    k = len(ids[0]) if ids else 0
    for t, (row_ids, row_lp) in enumerate(zip(ids, logprobs)):
        if (
            not (isinstance(row_ids, list) and isinstance(row_lp, list))
            or not len(row_ids) == len(row_lp) == k
        ):
            raise DataError(
                f"field 'teacher_topk' row {t}: expected {k} ids and {k} logprobs", "shape_mismatch"
            )
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in row_ids):
            raise DataError(f"field 'teacher_topk.ids' row {t}: ids must be int", "wrong_type")
        if not all(isinstance(x, int | float) and not isinstance(x, bool) and x <= 0 for x in row_lp):
            raise DataError(
                f"field 'teacher_topk.logprobs' row {t}: logprobs must be numbers <= 0", "wrong_type"
            )
    return DistillRecord(messages, completion, ids, logprobs)


def _tokens(obj: dict) -> tuple[list[int], list[int]]:
    ids = _int_list(obj, "input_ids")
    labels = _int_list(obj, "labels", required=False)
    if labels is None:
        return ids, list(ids)
    if len(labels) != len(ids):
        raise DataError(f"field 'labels' has {len(labels)} entries, 'input_ids' {len(ids)}", "shape_mismatch")
    if all(y == IGNORE for y in labels[1:]):
        raise DataError("no loss-bearing tokens: every label is -100", "no_loss_tokens")
    return ids, labels


VALIDATORS: dict[str, Callable[[dict], Any]] = {
    "chat": lambda obj: validate_messages(field_of(obj, "messages", list)),
    "prompt_completion": lambda obj: (field_of(obj, "prompt", str), field_of(obj, "completion", str)),
    "text": lambda obj: field_of(obj, "text", str),
    "tokens": _tokens,
    "preference": _preference,
    "rl_prompt": _rl_prompt,
    "distill": _distill,
}


def validate(fmt: str, obj: dict) -> Any:
    """Check one record against its format's schema; returns the validated value (see VALIDATORS)."""
    check = VALIDATORS.get(fmt)
    if check is None:
        raise DataError(f"unknown data format {fmt!r} (expected one of {', '.join(VALIDATORS)})")
    return check(obj)
