"""GRPO over recommended items: event histories as token-id prompts, the semantic-ID trie as a sampling
constraint, and completions written as the item ids they name (docs/events.md, section 6).

    prompts     each user's history up to one of their last training events, as event tokens ending in
                that event's gap token (the query position), in `rl_prompt` rows with `prompt_ids`; the
                metadata holds what a reward needs: the items of the event(s) that followed (`next_items`)
                and the items already in the history (`history_items`). The time split is the events
                recipe's, so the held-out events are never in a training prompt; they are the eval rows.
    constraint  `ItemCodeConstraint`: at code level l only the code tokens that extend the sampled prefix
                towards a real item (the trie beam search walks, decode.py), so every sampled item is a
                catalogue item; after L codes the next item starts again at the root (a slate).
    decoding    `ItemCodeConstraint.decode` writes a completion as item ids ("i0042 i0007"), which is the
                RewardContext's `completion`: a reward is a plain function over recommended items.

The recipe wiring is in posttrain/recipes/grpo.py (`data.train` of format `events`); the policy samples
and the trainer scores under the same mask (posttrain/rl/engine.py, posttrain/rl/grpo.py).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from posttrain.config import JobConfig, SourceConfig, source_name
from posttrain.errors import ConfigError, DataError
from posttrain.events.data import Event, UserSequence
from posttrain.events.dataset import load_events  # the same reading and time split as the recipe
from posttrain.events.decode import code_trie
from posttrain.events.semantic_ids import EventVocab
from posttrain.events.sequences import EventEncoder, Query, TokenTable, heldout_queries, token_table

INVALID = "<invalid>"  # how `decode` writes codes that name no item (never, under the constraint)


class ItemCodeConstraint:
    """A TokenConstraint (posttrain/rl/engine.py) over an event vocabulary's item codes."""

    def __init__(self, vocab: EventVocab, table: TokenTable):
        self.num_levels = vocab.num_levels
        # prefix (code token ids of the levels so far) -> token ids allowed next
        self.next_ids: dict[tuple[int, ...], list[int]] = {}
        for prefix, allowed_K in code_trie(vocab).items():
            ids = tuple(int(table.code_ids[lv, c]) for lv, c in enumerate(prefix))
            self.next_ids[ids] = table.code_ids[len(prefix)][allowed_K].tolist()
        self.item_of = {tuple(row): item for row, item in zip(table.item_code_ids.tolist(), vocab.items)}

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, tokenizer) -> ItemCodeConstraint:
        vocab = EventVocab.load(model_dir)
        return cls(vocab, token_table(vocab, tokenizer))

    def allowed(self, generated: Sequence[Sequence[int]], vocab_size: int) -> torch.Tensor:
        """bool [rows, vocab_size]: the codes that continue each row's current item towards a real one."""
        out = torch.zeros((len(generated), vocab_size), dtype=torch.bool)
        L = self.num_levels
        for r, tokens in enumerate(generated):
            prefix = tuple(tokens[len(tokens) - len(tokens) % L :])
            ids = self.next_ids.get(prefix)
            if ids is None:
                raise ValueError(
                    f"sampled tokens {list(prefix)} are not the first codes of any catalogue item (tokens "
                    "sampled without this constraint, or with another model's vocabulary?)"
                )
            out[r, ids] = True
        return out

    def items(self, token_ids: Sequence[int]) -> list[str | None]:
        """The item each run of L tokens names (None: not an item, or cut short)."""
        L = self.num_levels
        return [self.item_of.get(tuple(token_ids[i : i + L])) for i in range(0, len(token_ids), L)]

    def decode(self, token_ids: Sequence[int]) -> str:
        """A completion as the text rewards read: its item ids, space-separated (INVALID for a non-item)."""
        return " ".join(item or INVALID for item in self.items(token_ids))


# ------------------------------------------------------------------------------ prompts


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def prompt_row(user: str, events: list[Event], j: int, encoder: EventEncoder, cfg_events) -> dict:
    """The rl_prompt row asking for event j of `events` from everything before it (the last
    max_history_events - 1 events as tokens, then event j's gap token)."""
    history = UserSequence(user, events[:j], [events[j]])
    query = heldout_queries([history], encoder, cfg_events.max_history_events)[0]
    nxt = _unique([e.item for e in events[j : j + cfg_events.rl_next_events]])
    return {
        "prompt_ids": query.input_ids,
        "answer": events[j].item,
        "metadata": {
            "user": user,
            "next_items": nxt,
            "next_event_type": events[j].event_type,
            "history_items": _unique([e.item for e in events[:j]]),
        },
    }


def training_rows(users: list[UserSequence], encoder: EventEncoder, cfg_events) -> list[dict]:
    """Prompts for each user's last rl_prompts_per_user training events (never a held-out one: the
    history and the next items come from `user.train` only)."""
    rows = []
    for u in users:
        first = max(1, len(u.train) - cfg_events.rl_prompts_per_user)
        rows += [prompt_row(u.user, u.train, j, encoder, cfg_events) for j in range(first, len(u.train))]
    return rows


def heldout_rows(users: list[UserSequence], encoder: EventEncoder, cfg_events) -> list[dict]:
    """A prompt per held-out event (its history: every earlier event), as the events recipe evaluates."""
    rows = []
    for u in users:
        full = u.train + u.heldout
        rows += [prompt_row(u.user, full, j, encoder, cfg_events) for j in range(len(u.train), len(full))]
    return rows


def item_code_constraint(model_dir: str, tokenizer) -> tuple[ItemCodeConstraint, object]:
    """`rl.constraint: semantic_ids` on event data: the trie of the event model at model_dir and its
    decoder (a completion -> the item ids it names). The grpo recipe hands
    `partial(item_code_constraint, model.path)` to the RL workers (posttrain/rl/workers.py)."""
    trie = ItemCodeConstraint.from_model_dir(model_dir, tokenizer)
    return trie, trie.decode


@dataclass
class EventPrompts:
    """What the grpo recipe needs from event data: the job with its prompt files, and for the final
    report the vocabulary and the held-out queries."""

    cfg: JobConfig  # data.train / data.eval now the rl_prompt files below
    vocab: EventVocab
    table: TokenTable
    queries: list[Query]  # the held-out events, for recall@k / NDCG@k of the beam search
    stats: dict
    semantic_ids: partial  # tokenizer -> (item-code trie, decoder): the workers' rl.constraint

    def finish(self, start_model: str | None, hf_dir: str | None, pad_id: int) -> dict:
        """After GRPO's export: the vocabulary beside it (the export is an event model again), and the
        summary's `events` counts and `events_eval`: held-out recall/NDCG of the constrained beam
        search, of the starting model and of the export."""
        from posttrain.models.hf_io import load_pretrained

        if hf_dir:
            self.vocab.save(hf_dir)
        report = {}
        for name, path in (("before", start_model), ("after", hf_dir)):
            if path is not None:
                report[name] = ranking_report(load_pretrained(path)[0], self, pad_id)
        for k in self.cfg.events.eval_ks:
            key = f"recall@{k}"
            shown = ", ".join(f"{n} {m[key]:.4f}" for n, m in report.items())
            print(f"[grpo] held-out {key} (beam search): {shown}")
        return {"events": self.stats, "events_eval": report}


def event_prompts(cfg: JobConfig, tokenizer, out: Path) -> EventPrompts | None:
    """The grpo recipe's event hook: prepare_grpo when data.train holds event logs, else None."""
    if not any(s.format == "events" for s in cfg.data.train_sources):
        return None
    return prepare_grpo(cfg, tokenizer, out)


def prepare_grpo(cfg: JobConfig, tokenizer, out: Path) -> EventPrompts:
    """Event logs in data.train -> OUTPUT/events/rl_train.jsonl (training prompts) and rl_heldout.jsonl
    (data.eval); the vocabulary is the event model's (model.path)."""

    if cfg.model.path is None:
        raise ConfigError(
            "recipe grpo on event data: model.path must be an event model (with event_vocab.json)"
        )
    if cfg.rl.constraint != "semantic_ids":
        raise ConfigError(
            f"recipe grpo on event data needs rl.constraint: semantic_ids (got {cfg.rl.constraint!r}): it keeps "
            "every sample a real item and writes completions as item ids for the rewards"
        )
    if cfg.data.eval is not None:
        raise ConfigError(
            "data.eval: grpo on event data evaluates on each user's held-out events "
            "(events.heldout_events_per_user); set data.eval: null"
        )
    events = load_events(cfg.events, cfg.data.train_sources, cfg.model.path, cfg.seed)
    vocab = events.vocab
    L = vocab.num_levels
    if cfg.rl.max_new_tokens % L:
        raise ConfigError(
            f"rl.max_new_tokens={cfg.rl.max_new_tokens} must be a multiple of the {L} codes of an item"
        )
    prompt_tokens = (cfg.events.max_history_events - 1) * (L + 2) + 1
    if prompt_tokens + cfg.rl.max_new_tokens > cfg.data.max_tokens_per_pack:
        raise ConfigError(
            f"data.max_tokens_per_pack={cfg.data.max_tokens_per_pack} cannot hold a prompt of "
            f"events.max_history_events={cfg.events.max_history_events} events ({prompt_tokens} tokens) plus "
            f"rl.max_new_tokens={cfg.rl.max_new_tokens}"
        )
    table = token_table(vocab, tokenizer)
    encoder = EventEncoder(vocab, table)
    files = {"train": out / "events" / "rl_train.jsonl", "heldout": out / "events" / "rl_heldout.jsonl"}
    rows = {"train": training_rows(events.users, encoder, cfg.events)}
    rows["heldout"] = heldout_rows(events.users, encoder, cfg.events)
    if not rows["train"]:
        raise DataError("no user has two training events: there is nothing to build RL prompts from")
    files["train"].parent.mkdir(parents=True, exist_ok=True)
    for name, path in files.items():
        path.write_text("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in rows[name]))
    sources = cfg.data.train_sources
    name = source_name(sources[0]) if len(sources) == 1 else "events"
    data = cfg.data.model_copy(
        update={
            "train": SourceConfig(
                path=str(files["train"]), format="rl_prompt", name=name, epochs=sources[0].epochs
            ),
            "eval": SourceConfig(path=str(files["heldout"]), format="rl_prompt") if rows["heldout"] else None,
        }
    )
    queries = heldout_queries(events.users, encoder, cfg.events.max_history_events)
    stats = {
        **events.stats,
        "num_rl_prompts": len(rows["train"]),
        "num_rl_heldout_prompts": len(rows["heldout"]),
    }
    print(
        f"[grpo] event data: {len(rows['train'])} training prompts from {len(events.users)} users' histories, "
        f"{len(rows['heldout'])} held-out prompts ({files['train'].parent})",
        flush=True,
    )
    constraint = partial(item_code_constraint, cfg.model.path)
    return EventPrompts(cfg.model_copy(update={"data": data}), vocab, table, queries, stats, constraint)


def ranking_report(model, prompts: EventPrompts, pad_id: int) -> dict:
    """recall@k / NDCG@k on the held-out events of the constrained beam search (the LM head: what GRPO
    trains), overall and per event type; `events.eval_ks`, `events.beam_size`."""
    from posttrain.events.decode import beam_search
    from posttrain.events.metrics import metrics_by_group

    ev = prompts.cfg.events
    items, _ = beam_search(
        model, prompts.queries, prompts.vocab, prompts.table, beam_size=ev.beam_size, top_k=max(ev.eval_ks),
        pad_id=pad_id,
    )  # fmt: skip
    groups = [prompts.vocab.event_types[q.event_type] for q in prompts.queries]
    return metrics_by_group(items.tolist(), [q.item for q in prompts.queries], groups, ev.eval_ks)
