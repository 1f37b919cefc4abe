"""Records to training tokens: the function that turns one record of a data format into
(input_ids, labels), with labels IGNORE where a token bears no loss (posttrain/data/labels.py).

It sits above the schemas (which only validate) and the pair and distillation renderers, so the
format table lives in one place and no module imports back down into schemas.
"""

from __future__ import annotations

from collections.abc import Callable

from posttrain.data.pairs import render_pair
from posttrain.data.schemas import SFT_FORMATS, validate
from posttrain.data.topk import render_distill
from posttrain.errors import DataError


def renderer(fmt: str, tokenizer, mask: str) -> Callable[[dict], tuple[list[int], list[int]]]:
    """The function that turns one record of an SFT/pretraining format into (input_ids, labels)."""
    if fmt == "chat":
        return lambda obj: tokenizer.render_chat(validate("chat", obj), mask=mask)
    if fmt == "prompt_completion":
        return lambda obj: tokenizer.render_prompt_completion(*validate("prompt_completion", obj))
    if fmt == "text":
        return lambda obj: tokenizer.render_text(validate("text", obj))
    if fmt == "tokens":
        return lambda obj: validate("tokens", obj)
    if fmt == "preference":  # (ids, labels, (len_chosen, len_rejected)): one sample, two documents
        return lambda obj: render_pair(tokenizer, obj)
    if fmt == "distill":  # the teacher's completion as the assistant turn, with any stored teacher top-k
        return lambda obj: render_distill(tokenizer, obj)
    raise DataError(
        f"format {fmt!r} does not render to training tokens (SFT formats: {', '.join(SFT_FORMATS)})"
    )
