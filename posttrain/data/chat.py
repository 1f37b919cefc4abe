"""Chat rendering and assistant loss masks, with the model's own chat template as the only renderer.

The token ids we train on must be exactly what `apply_chat_template` produces, or a fine-tuned model
sees a format at training time that it never sees at inference. So we never build chat ids ourselves;
we only decide which of the template's tokens carry loss:

* a template with `{% generation %}` markers tells us directly (`return_assistant_tokens_mask`);
* any other template is handled by rendering growing prefixes of the conversation and diffing the
  token ids: an assistant turn's loss span is the tokens it adds after the generation prompt, up to
  and including its first end-of-turn token. This needs the template to be prefix-stable (rendering
  a prefix yields a prefix of the ids); when it is not, we stop with a `DataError` rather than guess.

Labels are aligned with input_ids (labels[i] is input_ids[i] or IGNORE_INDEX); shifting happens in
the loss.
"""

from __future__ import annotations

import re
import threading
from typing import Any, Literal

from posttrain.errors import DataError

IGNORE_INDEX = -100
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


# transformers compiles each chat template once per process (an lru_cache) with ONE AssistantTracker for
# its `{% generation %}` markers, so two threads rendering at once (the background packer and the training
# loop, or an evaluation) raise "AssistantTracker should not be reused before closed" or record into each
# other's masks. Every render goes through this lock.
_TEMPLATE_LOCK = threading.Lock()


def render_ids(hf_tokenizer: Any, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    """The stock template rendering, as a plain list of ids."""
    with _TEMPLATE_LOCK:
        out = hf_tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, add_generation_prompt=add_generation_prompt
        )
    return list(out["input_ids"])


def spans_from_markers(hf_tokenizer: Any, messages: list[dict]) -> tuple[list[int], list[Span]]:
    """Ids and assistant spans from the template's `{% generation %}` markers (one span per run of 1s)."""
    with _TEMPLATE_LOCK:
        out = hf_tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
    ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    spans: list[Span] = []
    for i, bit in enumerate(mask):
        if bit and (i == 0 or not mask[i - 1]):
            spans.append((i, i + 1))
        elif bit:
            spans[-1] = (spans[-1][0], i + 1)
    return ids, spans


def spans_from_prefixes(
    hf_tokenizer: Any, messages: list[dict], end_of_turn_id: int
) -> tuple[list[int], list[Span]]:
    """Ids and assistant spans by diffing prefix renderings; works with any prefix-stable template."""
    full = render_ids(hf_tokenizer, messages)
    spans: list[Span] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render_ids(hf_tokenizer, messages[:i], add_generation_prompt=True) if i else []
        upto = render_ids(hf_tokenizer, messages[: i + 1])
        _check_prefix(prompt, upto, f"the generation prompt before message {i + 1}")
        _check_prefix(upto, full, f"messages 1..{i + 1}")
        start = len(prompt)
        new = upto[start:]
        # The turn ends at its first end-of-turn token; anything after (a newline, say) is template
        # glue the model never has to produce. No end-of-turn token: the whole turn is the span.
        end = start + new.index(end_of_turn_id) + 1 if end_of_turn_id in new else len(upto)
        if end > start:
            spans.append((start, end))
    return full, spans


def _check_prefix(prefix: list[int], ids: list[int], what: str) -> None:
    if ids[: len(prefix)] != prefix:
        at = next((k for k, (a, b) in enumerate(zip(prefix, ids)) if a != b), min(len(prefix), len(ids)))
        raise DataError(
            f"chat template is not prefix-stable: rendering {what} is not a prefix of the longer "
            f"rendering (ids differ at position {at}); add {{% generation %}} markers to the template"
        )


def assistant_labels(
    hf_tokenizer: Any,
    messages: list[dict],
    end_of_turn_id: int,
    mask: MaskPolicy = "all_assistant",
    method: Literal["auto", "markers", "prefixes"] = "auto",
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for a conversation; labels keep only assistant spans chosen by `mask`."""
    messages = validate_messages(messages)
    if mask not in ("all_assistant", "last_assistant"):
        raise DataError(f"unknown mask policy {mask!r} (expected all_assistant or last_assistant)")
    if method == "auto":
        method = "markers" if has_generation_markers(hf_tokenizer) else "prefixes"
    if method == "markers":
        ids, spans = spans_from_markers(hf_tokenizer, messages)
    else:
        ids, spans = spans_from_prefixes(hf_tokenizer, messages, end_of_turn_id)
    if mask == "last_assistant":
        spans = spans[-1:]
    labels = [IGNORE_INDEX] * len(ids)
    for start, end in spans:
        labels[start:end] = ids[start:end]
    if all(label == IGNORE_INDEX for label in labels):
        raise DataError("no loss-bearing tokens: the template rendered no assistant tokens", "no_loss_tokens")
    return ids, labels
