"""RL prompts: `data.train` sources of format `rl_prompt`, streamed, mixed by weight, resumable.

The same sources, mixer and skip policy as every other recipe (posttrain/data/); what differs is the
product: not packed training rows but prompts (the conversation, rendered with the chat template's
generation prompt, and the reference answer a reward compares against). A row with `prompt_ids` is
already tokens (an event history, posttrain/events/rl.py): used as is, after a range check. Prompts longer than
`data.max_tokens_per_pack - rl.max_new_tokens` cannot fit an episode in a row and are skipped, counted
as `prompt_too_long`. The state (source positions and skip counts, mixer draws) goes into checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass

from posttrain.data.mixing import Mixer
from posttrain.data.schemas import RLPrompt, validate
from posttrain.data.sources import SourceStream, source_name
from posttrain.errors import ConfigError, DataError


@dataclass
class Prompt:
    row: RLPrompt
    ids: list[int]
    source: int


def _render(tokenizer, row: RLPrompt) -> list[int]:
    if row.prompt_ids is None:
        return tokenizer.render_prompt(row.messages)
    bad = [t for t in row.prompt_ids if not 0 <= t < tokenizer.vocab_size]
    if bad:
        raise DataError(
            f"field 'prompt_ids' has token id {bad[0]} outside the tokenizer's vocabulary "
            f"(0..{tokenizer.vocab_size - 1}): ids made with another tokenizer?",
            "bad_token_id",
        )
    return list(row.prompt_ids)


class PromptStream:
    """Prompts from data.train (rl_prompt sources); `next(n)` hands out the next n."""

    state_is_per_rank = False  # the controller owns it: one stream per job

    def __init__(self, data, tokenizer, *, seed: int, max_prompt_tokens: int):
        sources = data.train_sources
        bad = [source_name(s) for s in sources if s.format != "rl_prompt"]
        if bad:
            raise ConfigError(f"recipe grpo reads data.train sources of format rl_prompt; not: {bad}")
        self.tokenizer, self.max_prompt_tokens = tokenizer, max_prompt_tokens
        self.streams = [
            SourceStream(s, i, seed=seed, shuffle=data.shuffle, window=data.shuffle_window_samples)
            for i, s in enumerate(sources)
        ]
        self.mixer = Mixer(
            [source_name(s) for s in sources], [s.weight for s in sources], data.weight_schedule, seed
        )
        self.active = [True] * len(self.streams)
        self.handed_out = 0
        self.fill_rate = 0.0  # the trainer's loop reads these of a loader; kept for the shared code

    def next(self, n: int, step: int = 0) -> list[Prompt]:
        out: list[Prompt] = []
        while len(out) < n:
            if not any(self.active):
                raise DataError("the rl_prompt sources ran out of prompts (set `epochs: null` to cycle)")
            i = self.mixer.choose(step, self.active)
            stream = self.streams[i]
            item = stream.next_record()
            if item is None:
                self.active[i] = False
                continue
            prompt = self._prompt(stream, *item)
            if prompt is not None:
                out.append(prompt)
        self.handed_out += len(out)
        return out

    def _prompt(self, stream: SourceStream, loc: str, record) -> Prompt | None:
        try:
            if isinstance(record, DataError):
                raise record
            row = validate("rl_prompt", record)
            ids = _render(self.tokenizer, row)
            if len(ids) > self.max_prompt_tokens:
                raise DataError(
                    f"prompt of {len(ids)} tokens leaves no room for rl.max_new_tokens in a row of "
                    f"data.max_tokens_per_pack (at most {self.max_prompt_tokens} prompt tokens)",
                    "prompt_too_long",
                )
        except DataError as err:
            if stream.cfg.on_error == "raise":
                raise DataError(f"{loc}: {err}", err.reason) from None
            stream.count_skip(err.reason)
            return None
        stream.count_good()
        return Prompt(row, ids, stream.index)

    def skips(self) -> dict[str, dict[str, int]]:
        return {s.name: dict(s.skips) for s in self.streams}

    def state_dict(self) -> dict:
        return {
            "sources": [s.state_dict() for s in self.streams],
            "mixer": {"draws": self.mixer.draws},
            "active": list(self.active),
            "handed_out": self.handed_out,
        }

    def load_state_dict(self, state: dict) -> None:
        for stream, s in zip(self.streams, state["sources"]):
            stream.load_state_dict(s)
        self.mixer.load_state_dict(state["mixer"])
        self.active, self.handed_out = list(state["active"]), state["handed_out"]


def load_eval_prompts(data, tokenizer) -> list[Prompt]:
    """data.eval (rl_prompt or chat rows with an `answer`) for greedy held-out exact match."""
    if data.eval is None:
        return []
    stream = SourceStream(data.eval, epochs=1)
    out = []
    while (item := stream.next_record()) is not None:
        loc, record = item
        if isinstance(record, DataError):
            raise DataError(f"{loc}: {record}", record.reason)
        try:
            row = validate("rl_prompt", record)
        except DataError as err:
            raise DataError(f"{loc}: {err} (data.eval of recipe grpo: rl_prompt rows)", err.reason) from None
        try:
            ids = _render(tokenizer, row)
        except DataError as err:
            raise DataError(f"{loc}: {err}", err.reason) from None
        stream.count_good()
        out.append(Prompt(row, ids, 0))
        if data.eval.max_samples is not None and len(out) >= data.eval.max_samples:
            break
    return out
