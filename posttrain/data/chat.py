"""Chat rendering and assistant loss masks, with the model's own chat template as the only renderer.

The token ids we train on must be exactly what `apply_chat_template` produces, or a fine-tuned model
sees a format at training time that it never sees at inference. So we never build chat ids ourselves;
we only decide which of the template's tokens carry loss, in two steps:

1. Find each assistant answer as a CHARACTER span of the rendered text (posttrain/data/chat_spans.py):
   from the template's `{% generation %}` markers when it has them, otherwise by diffing the TEXT of
   growing renderings (the generation prompt before a turn ends where the answer starts; the answer
   ends with its first end-of-turn marker).
2. Tokenise the full rendering once, with character offsets, exactly as `apply_chat_template` does
   (no special tokens added; the ids are checked against the stock rendering), and label every token
   that overlaps an answer span.

Working in characters rather than token ids means a template only has to be prefix-stable as TEXT:
an answer starting with spaces, whose first token swallows the newline before it, is fine.

Labels are aligned with input_ids (labels[i] is input_ids[i] or IGNORE); shifting happens in
the loss.
"""

from __future__ import annotations

import re
from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from typing import Any, Literal

from posttrain.data.chat_spans import (
    _TEMPLATE_LOCK,
    CharSpan,
    char_spans_from_markers,
    char_spans_from_prefixes,
    render_ids,
    render_text,
)
from posttrain.data.labels import IGNORE
from posttrain.errors import DataError, ModelError

ROLES = ("system", "user", "assistant")
MaskPolicy = Literal["all_assistant", "last_assistant"]
Span = tuple[int, int]  # [start, end) token positions
GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")


def validate_messages(messages: Any, require_assistant: bool = True) -> list[dict]:
    """Check the conversation's shape; the DataError names the first message at fault (1-based)."""
    if not isinstance(messages, list) or not messages:
        raise DataError(
            "empty conversation"
            if isinstance(messages, list)
            else f"conversation must be a list of messages, got {type(messages).__name__}",
            "empty_conversation" if isinstance(messages, list) else "wrong_type",
        )
    for n, message in enumerate(messages, start=1):
        if not isinstance(message, dict):
            raise DataError(
                f"message {n}: must be a dict with 'role' and 'content', got {type(message).__name__}",
                "wrong_type",
            )
        role = message.get("role")
        if role not in ROLES:
            raise DataError(
                f"message {n}: unknown role {role!r} (expected system, user or assistant)", "unknown_role"
            )
        if not isinstance(message.get("content"), str):
            raise DataError(
                f"message {n}: content must be a string, got {type(message.get('content')).__name__}",
                "wrong_type",
            )
    if require_assistant and not any(m["role"] == "assistant" for m in messages):
        raise DataError("no assistant turn", "no_assistant_turn")
    return messages


def has_generation_markers(hf_tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template marks assistant content with `{% generation %}`."""
    template = hf_tokenizer.chat_template or ""
    if isinstance(template, dict):  # named templates: the default one is what apply_chat_template uses
        template = template.get("default", "")
    return GENERATION_TAG.search(template) is not None


def token_spans(offsets: list[tuple[int, int]], char_spans: list[CharSpan]) -> list[Span]:
    """Token spans covering each character span: every token that overlaps it is in.

    A token straddling a boundary is labelled: the SmolLM2/GPT-2 pre-tokenizer merges the newline that
    ends the generation prompt with an answer's leading spaces ("\n" + "  hi" -> "\n ", " hi"), and
    dropping that token would lose the answer's first character from the loss. This is also what
    `return_assistant_tokens_mask` does (first token = the one holding the span's first character,
    last = the one holding its last), so marker and prefix masks agree with TRL's training templates;
    except that transformers takes the FIRST token holding the last character, dropping the later
    byte pieces of a final emoji, which overlap and so are labelled here. Offsets of one sequence are non-decreasing, so both ends are binary searches. Spans that touch
    or share a token merge, so `last_assistant` keeps a whole answer.
    """
    starts = [a for a, _ in offsets]
    ends = [b for _, b in offsets]
    spans: list[Span] = []
    for char_start, char_end in char_spans:
        first = bisect_right(ends, char_start)  # first token ending after the span starts
        last = bisect_left(starts, char_end)  # one past the last token starting before it ends
        if first >= last:
            continue
        if spans and first <= spans[-1][1]:  # blocks that touch (content, then a closing eos) are one span
            spans[-1] = (spans[-1][0], max(last, spans[-1][1]))
        else:
            spans.append((first, last))
    return spans


def tokenise_rendering(hf_tokenizer: Any, text: str, messages: list[dict]) -> tuple[list[int], list]:
    """Ids and character offsets of the rendered text, tokenised as `apply_chat_template` does.

    apply_chat_template tokenises its rendering with `add_special_tokens=False` (the template writes
    any BOS itself); we do the same with offsets and check the ids against the stock call, so a text
    we rendered differently, or a transformers change, is an error rather than a silent format shift.
    """
    if not getattr(hf_tokenizer, "is_fast", False):
        raise ModelError(
            f"tokenizer {getattr(hf_tokenizer, 'name_or_path', '')!r} is not a fast tokenizer: chat loss "
            "masks need character offsets (save it with tokenizer.json)"
        )
    with _TEMPLATE_LOCK:  # a call sets the backend's truncation/padding state: not shared mid-render
        out = hf_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(out["input_ids"])
    stock = render_ids(hf_tokenizer, messages)
    if ids != stock:
        at = next((k for k, (a, b) in enumerate(zip(ids, stock)) if a != b), min(len(ids), len(stock)))
        raise DataError(
            f"tokenising the rendered chat gave ids that differ from apply_chat_template's at position "
            f"{at} ({len(ids)} vs {len(stock)} ids)",
            "template_tokenisation",
        )
    return ids, [tuple(o) for o in out["offset_mapping"]]


def assistant_labels(
    hf_tokenizer: Any,
    messages: list[dict],
    end_of_turn_id: int | Sequence[int],
    mask: MaskPolicy = "all_assistant",
    method: Literal["auto", "markers", "prefixes"] = "auto",
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for a conversation; labels keep only assistant spans chosen by `mask`.

    `end_of_turn_id` closes an answer for the prefix method (its text is searched in the rendering);
    several ids when a template closes answers differently (gpt-oss: `<|end|>`, finally `<|return|>`).
    Marker templates say where answers end themselves.
    """
    messages = validate_messages(messages)
    if mask not in ("all_assistant", "last_assistant"):
        raise DataError(f"unknown mask policy {mask!r} (expected all_assistant or last_assistant)")
    if method == "auto":
        method = "markers" if has_generation_markers(hf_tokenizer) else "prefixes"
    if method == "markers":
        text, char_spans = char_spans_from_markers(hf_tokenizer, messages)
    else:
        eot_ids = [end_of_turn_id] if isinstance(end_of_turn_id, int) else list(end_of_turn_id)
        end_of_turn = [hf_tokenizer.decode([i], skip_special_tokens=False) for i in eot_ids]
        text, char_spans = char_spans_from_prefixes(hf_tokenizer, messages, end_of_turn)
    ids, offsets = tokenise_rendering(hf_tokenizer, text, messages)
    spans = token_spans(offsets, char_spans)
    if mask == "last_assistant":
        spans = spans[-1:]
    labels = [IGNORE] * len(ids)
    for start, end in spans:
        labels[start:end] = ids[start:end]
    if all(label == IGNORE for label in labels):
        raise DataError("no loss-bearing tokens: the template rendered no assistant tokens", "no_loss_tokens")
    return ids, labels


__all__ = [
    "IGNORE",
    "MaskPolicy",
    "assistant_labels",
    "has_generation_markers",
    "render_ids",
    "render_text",
    "token_spans",
    "validate_messages",
]
