"""Events as tokens: each user's history becomes token samples the shared pipeline packs and trains on.

One event is L + 2 tokens:

    <gap_b>  c_1 ... c_L  <event_TYPE>

`<gap_b>` is the time since the user's previous event (known when a recommendation is requested), the
codes name the item (L semantic-ID codes, or one item token), and the type token follows the item.
The hidden state AT the gap token is the *query*: it has seen the whole history and the gap, and the
heads read it to predict the event's item (over the catalogue) and its type; the LM head predicts c_1
there and c_{l+1} at c_l (semantic-ID decoding).

Labels mark which events bear loss: an event's code tokens carry their ids, everything else -100. After
the packer's next-token shift the gap token's target is c_1, so "the query of a loss-bearing event" is
simply "a gap token whose target is not -100", and the item and type are read back from the tokens after
it: training samples are ordinary `tokens` samples ({"input_ids", "labels"}), and packing,
checkpointed data state and data parallelism are the shared ones.

Long histories are cut into windows of at most `max_history_events`: the first window's events all bear
loss; each later window starts with the previous `max_history_events // 2` events as context only.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from posttrain.data.labels import IGNORE
from posttrain.data.tokenizer import Tokenizer
from posttrain.errors import ModelError
from posttrain.events.data import Event, UserSequence
from posttrain.events.semantic_ids import EventVocab


@dataclass
class TokenTable:
    """Token ids of an EventVocab in a given tokenizer."""

    gap_ids: list[int]  # aligned with vocab.gap_tokens()
    event_ids: list[int]  # aligned with vocab.event_types
    code_ids: np.ndarray  # [L, K]: token id of code k at level l
    item_code_ids: np.ndarray  # [N, L]: token ids of each item's codes

    @property
    def tokens_per_event(self) -> int:
        return self.item_code_ids.shape[1] + 2

    @property
    def max_id(self) -> int:
        return max(max(self.gap_ids), max(self.event_ids), int(self.code_ids.max()))


def token_table(vocab: EventVocab, tokenizer: Tokenizer) -> TokenTable:
    """Resolve every vocabulary token to its id; fails if the tokenizer lacks one (a tokenizer that does
    not belong to this vocabulary)."""
    table = tokenizer.hf.get_vocab()
    missing = [t for t in vocab.tokens() if t not in table]
    if missing:
        raise ModelError(
            f"the tokenizer lacks {len(missing)} event tokens (first: {missing[0]}); it does not belong to "
            "this event vocabulary"
        )

    def ids(tokens: list[str]) -> list[int]:
        return [table[t] for t in tokens]

    L, K = vocab.num_levels, vocab.codes_per_level
    code_ids = np.asarray(ids([vocab.code_token(lv, c) for lv in range(L) for c in range(K)])).reshape(L, K)
    return TokenTable(
        gap_ids=ids(vocab.gap_tokens()),
        event_ids=ids([vocab.event_token(t) for t in vocab.event_types]),
        code_ids=code_ids,
        item_code_ids=code_ids[np.arange(L)[None, :], vocab.codes],
    )


class EventEncoder:
    """Turns time-ordered events into token ids with the vocabulary's tables."""

    def __init__(self, vocab: EventVocab, table: TokenTable):
        self.vocab, self.table = vocab, table
        self.item_index = {item: i for i, item in enumerate(vocab.items)}
        self.type_index = {t: i for i, t in enumerate(vocab.event_types)}

    def gap_id(self, prev: Event | None, event: Event) -> int:
        gap = None if prev is None else max(0.0, event.timestamp_s - prev.timestamp_s)
        return self.table.gap_ids[self.vocab.gap_bucket(gap)]

    def event_ids(self, prev: Event | None, event: Event) -> list[int]:
        codes = self.table.item_code_ids[self.item_index[event.item]].tolist()
        return [self.gap_id(prev, event), *codes, self.table.event_ids[self.type_index[event.event_type]]]

    def render(
        self, events: list[Event], prev: Event | None, bears_loss: list[bool]
    ) -> tuple[list[int], list[int]]:
        """(input_ids, labels) of consecutive events; `prev` is the event before the first (or None)."""
        ids: list[int] = []
        labels: list[int] = []
        for event, loss in zip(events, bears_loss):
            tokens = self.event_ids(prev, event)
            ids += tokens
            codes = tokens[1:-1]
            labels += [IGNORE, *(codes if loss else [IGNORE] * len(codes)), IGNORE]
            prev = event
        return ids, labels


def training_windows(events: list[Event], max_events: int) -> Iterator[tuple[int, int, int]]:
    """(start, first loss-bearing, end) event indices of each training window (module docstring)."""
    n = len(events)
    context = max_events // 2
    first_end = min(n, max_events)
    yield 0, 0, first_end
    start_loss = first_end
    while start_loss < n:
        end = min(n, start_loss + max_events - context)
        yield start_loss - context, start_loss, end
        start_loss = end


def training_samples(
    users: list[UserSequence], encoder: EventEncoder, max_events: int, loss_types: set[str] | None = None
) -> Iterator[dict]:
    """{"input_ids", "labels"} records (the `tokens` format) of every user's training events.
    Events whose type is not in `loss_types` (None = all) are context only; windows without a
    loss-bearing event are left out."""
    for user in users:
        evs = user.train
        for start, first, end in training_windows(evs, max_events):
            window = evs[start:end]
            loss = [i >= first and (loss_types is None or e.event_type in loss_types) for i, e in
                    enumerate(evs[start:end], start)]  # fmt: skip
            if not any(loss):
                continue
            ids, labels = encoder.render(window, evs[start - 1] if start > 0 else None, loss)
            yield {"input_ids": ids, "labels": labels}


@dataclass
class Query:
    """One held-out event to predict from everything before it."""

    user: str
    input_ids: list[int]  # the last events of the history, then the query's gap token
    item: int  # the target item's index
    event_type: int  # the target event type's index
    history_items: list[int]  # item indices of the whole history, oldest first (for baselines)


def heldout_queries(users: list[UserSequence], encoder: EventEncoder, max_events: int) -> list[Query]:
    """A query per held-out event: its history is every earlier event (training events and earlier
    held-out ones), of which the last max_events - 1 are tokenised before the query's gap token."""
    out = []
    for user in users:
        full = user.train + user.heldout
        for j in range(len(user.train), len(full)):
            event = full[j]
            start = max(0, j - (max_events - 1))
            ids, _ = encoder.render(
                full[start:j], full[start - 1] if start > 0 else None, [False] * (j - start)
            )
            ids.append(encoder.gap_id(full[j - 1] if j > 0 else None, event))
            out.append(
                Query(
                    user.user,
                    ids,
                    encoder.item_index[event.item],
                    encoder.type_index[event.event_type],
                    [encoder.item_index[e.item] for e in full[:j]],
                )
            )
    return out
