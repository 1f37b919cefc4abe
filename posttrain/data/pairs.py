"""Preference pairs as token samples: chosen and rejected rendered with the same prompt.

A pair becomes ONE `Sample` holding two documents back to back (`parts = (len_chosen, len_rejected)`),
so packing never separates the halves and collation gives each half its own positions, targets and
attention (see posttrain/data/packing.py). Labels cover only the continuation: the assistant turns
after the prompt. Without an explicit prompt, the leading messages that chosen and rejected share
are the prompt (TRL's convention for whole conversations).
"""

from __future__ import annotations

from posttrain.data.chat import render_ids
from posttrain.data.labels import IGNORE
from posttrain.data.schemas import PreferencePair, validate
from posttrain.errors import DataError


def split_shared_prompt(pair: PreferencePair) -> tuple[list[dict], list[dict], list[dict]]:
    """(prompt, chosen continuation, rejected continuation)."""
    if pair.prompt:
        return pair.prompt, pair.chosen, pair.rejected
    k = 0
    while k < min(len(pair.chosen), len(pair.rejected)) - 1 and pair.chosen[k] == pair.rejected[k]:
        k += 1
    return pair.chosen[:k], pair.chosen[k:], pair.rejected[k:]


def render_pair(tokenizer, record: dict) -> tuple[list[int], list[int], tuple[int, int]]:
    """A `preference` record -> (ids, labels, (len_chosen, len_rejected)) of the concatenated halves."""
    prompt, chosen, rejected = split_shared_prompt(validate("preference", record))
    prompt_len = len(render_ids(tokenizer.hf, prompt)) if prompt else 0
    ids: list[int] = []
    labels: list[int] = []
    lens = []
    for name, continuation in (("chosen", chosen), ("rejected", rejected)):
        try:
            half_ids, half_labels = tokenizer.render_chat(prompt + continuation, mask="all_assistant")
        except DataError as err:
            raise DataError(f"{name}: {err}", err.reason) from None
        if half_ids[:prompt_len] != render_ids(tokenizer.hf, prompt)[:prompt_len]:
            raise DataError(
                f"{name}: the prompt does not render as a prefix of the conversation", "bad_template"
            )
        half_labels = [IGNORE] * prompt_len + half_labels[prompt_len:]
        if all(y == IGNORE for y in half_labels[1:]):
            raise DataError(f"{name}: no assistant tokens after the prompt", "no_loss_tokens")
        ids += half_ids
        labels += half_labels
        lens.append(len(half_ids))
    return ids, labels, (lens[0], lens[1])
