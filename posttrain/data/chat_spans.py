"""Where the assistant answers are in a rendered chat, as character spans of the template's text.

Two ways to find them, both in characters so that token merges across a boundary do not matter:

* markers: a template with `{% generation %}` blocks reports their character offsets while rendering
  (transformers' AssistantTracker); each non-empty block is a span.
* prefixes: any other template. Answer i starts where the rendering of messages[:i] with the
  generation prompt ends, which must be a string prefix of the full rendering (or, for a reasoning
  template whose prompt prefills `<think>\n` that the history does not show, part ways with it only
  inside the generation prompt: the answer then starts where they part). It ends with its first
  end-of-turn marker (`<|im_end|>`, `<|eot_id|>`, ...), found in the rendering of messages[:i+1] when
  that is a prefix of the full text, else (a template that rewrites earlier turns once more messages
  follow, e.g. Qwen3 dropping `<think>` blocks from earlier answers) in the full text itself: the mask
  is always that of the final rendering, the text the model is trained on. Template glue after the
  end-of-turn marker (a newline) is not part of the answer: the model never has to produce it.

A template whose earlier renderings are not text prefixes of the full one (it numbers the messages,
reorders them, ...) cannot be masked without markers: that is a DataError naming the message.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from posttrain.errors import DataError

CharSpan = tuple[int, int]  # [start, end) character offsets in the rendered text
NOT_PREFIX_STABLE = "template_not_prefix_stable"  # the DataError reason `on_error: skip` counts

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


def render_text(hf_tokenizer: Any, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The stock template rendering, as text (what `apply_chat_template(tokenize=True)` tokenises)."""
    with _TEMPLATE_LOCK:
        return hf_tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )


def char_spans_from_markers(hf_tokenizer: Any, messages: list[dict]) -> tuple[str, list[CharSpan]]:
    """Rendered text and the character spans of its non-empty `{% generation %}` blocks.

    `apply_chat_template` only returns these offsets already mapped to tokens (and stops at the first
    span whose start maps to no token), so we call the renderer it uses with the same inputs: the
    template it would pick, the special tokens as variables, messages without None-valued keys. The
    caller checks the tokenised text against the stock ids, so a drift in transformers cannot go unseen.
    """
    from transformers.utils.chat_template_utils import render_jinja_template

    chat = [{k: v for k, v in m.items() if v is not None} for m in messages]
    with _TEMPLATE_LOCK:
        texts, indices = render_jinja_template(
            conversations=[chat],
            chat_template=hf_tokenizer.get_chat_template(),
            return_assistant_tokens_mask=True,
            **hf_tokenizer.special_tokens_map,
        )
    return texts[0], [(start, end) for start, end in indices[0] if end > start]


def char_spans_from_prefixes(
    hf_tokenizer: Any, messages: list[dict], end_of_turn: Sequence[str]
) -> tuple[str, list[CharSpan]]:
    """Rendered text and each assistant answer's character span, by diffing growing renderings.

    `end_of_turn` are the texts of the tokens that close an answer (gpt-oss ends a turn in the history
    with `<|end|>` and the final one with `<|return|>`); empty when unknown: then an answer runs to the
    end of its turn's rendering, glue included.
    """
    markers = [m for m in end_of_turn if m]
    full = render_text(hf_tokenizer, messages)
    answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    starts = [_answer_start(hf_tokenizer, messages, i, full) for i in answers]
    spans: list[CharSpan] = []
    for n, (i, start) in enumerate(zip(answers, starts)):
        turn = render_text(hf_tokenizer, messages[: i + 1])
        if full.startswith(turn) and len(turn) >= start:
            at, marker = _first_marker(full, markers, start, len(turn))
            span = (start, at + len(marker) if at >= 0 else len(turn))
        else:
            # The template renders this turn differently once more messages follow (Qwen3 drops the
            # reasoning of earlier answers, gpt-oss closes them with <|end|> instead of <|return|>):
            # take the answer from the full text, which is what the model trains on, bounded by the
            # next answer; only an end-of-turn marker can say where it stops.
            limit = starts[n + 1] if n + 1 < len(starts) else len(full)
            at, marker = _first_marker(full, markers, start, limit)
            if at < 0:
                raise DataError(
                    f"cannot mask message {i + 1}: the chat template renders it differently once later "
                    f"messages follow, and no end-of-turn marker {markers} closes it in the full "
                    "rendering; add {% generation %} markers to the template",
                    NOT_PREFIX_STABLE,
                )
            span = (start, at + len(marker))
        if span[1] > span[0]:
            spans.append(span)
    return full, spans


def _answer_start(hf_tokenizer: Any, messages: list[dict], i: int, full: str) -> int:
    """Where answer i starts in the full text: the end of the generation prompt before it.

    A reasoning template's generation prompt may prefill text that the template does not write for
    that turn once it is history (`<think>\n`, where the history shows `<think></think>` or nothing).
    Then the answer starts where prompt and full text part ways, provided that is inside the
    generation prompt: the conversation before it must render the same either way.
    """
    if i == 0:  # no prompt to render: an empty conversation is not a template input
        return 0
    prompt = render_text(hf_tokenizer, messages[:i], add_generation_prompt=True)
    if full.startswith(prompt):
        return len(prompt)
    context = render_text(hf_tokenizer, messages[:i])
    at = next((k for k, (a, b) in enumerate(zip(prompt, full)) if a != b), min(len(prompt), len(full)))
    if full.startswith(context) and at >= len(context) and prompt.startswith(context):
        return at
    what = f"messages 1..{i} with the generation prompt (before message {i + 1})"
    if not full.startswith(context):
        at = next((k for k, (a, b) in enumerate(zip(context, full)) if a != b), min(len(context), len(full)))
        prompt, what = context, f"messages 1..{i} (before message {i + 1})"
    raise DataError(
        f"chat template is not prefix-stable: the rendering of {what} is not a text prefix of the full "
        f"rendering (they differ at character {at}: {prompt[at : at + 20]!r} vs {full[at : at + 20]!r}); "
        "add {% generation %} markers to the template",
        NOT_PREFIX_STABLE,
    )


def _first_marker(text: str, markers: Sequence[str], start: int, limit: int) -> tuple[int, str]:
    """Position and text of the earliest end-of-turn marker in text[start:limit]; (-1, "") if none."""
    found = [(at, m) for m in markers if (at := text.find(m, start, limit)) >= 0]
    return min(found) if found else (-1, "")
