"""Transformers over interaction events: train any supported family from scratch (or continue an event
model) to predict each user's next item and event type, then score it on held-out events against
popularity, last-item and transition baselines.

Read `train()` top to bottom: world -> events (read, grouped per user, split by time) -> item/event
vocabulary (semantic IDs or one token per item; a loaded model brings its own) -> tokenizer with the new
tokens -> training windows as `tokens` samples through the shared pipeline -> model + heads -> shared
trainer -> export (+ event_vocab.json) -> held-out recall/NDCG vs baselines -> summary.
The pieces live in posttrain/events/; docs/events.md walks through a whole run.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from posttrain.config import JobConfig, SourceConfig, source_name
from posttrain.data.tokenizer import Tokenizer
from posttrain.errors import ConfigError, DataError
from posttrain.events.dataset import EventSet, load_events
from posttrain.events.decode import beam_search, mix_with_history
from posttrain.events.metrics import baseline_rankings, metrics_by_group
from posttrain.events.model import ITEM_HEAD, Lookups, events_loss_fn, head_sizes, score_queries
from posttrain.events.semantic_ids import EventVocab
from posttrain.events.sequences import EventEncoder, Query, UserSequence, heldout_queries, token_table
from posttrain.models.build import export_hf
from posttrain.parallel.build import build_model_for
from posttrain.train.run import Run
from posttrain.train.setup import (
    check_formats,
    in_world,
    make_loader,
    make_trainer,
    print_notes,
    run_summary,
)


def train(cfg: JobConfig) -> dict:
    check_formats(cfg, ("events",))
    if cfg.data.eval is not None:
        raise ConfigError(
            "data.eval: the events recipe evaluates on each user's last events "
            "(events.heldout_events_per_user); set data.eval: null"
        )
    if cfg.model.backend != "native":
        raise ConfigError(
            "model.backend=hf: the events recipe needs model.backend=native (its heads run inside our "
            "models' forward, and beam search uses their KV cache)"
        )
    return in_world(cfg, lambda world, run: _train(cfg, world, run))


def _train(cfg: JobConfig, world, run: Run) -> dict:
    out = run.out
    ev = cfg.events

    # 1. Events -> per-user sequences -> time split, and the vocabulary that makes them tokens.
    events = load_events(cfg.events, cfg.data.train_sources, cfg.model.path, cfg.seed)
    tokenizer = Tokenizer.from_dir(
        cfg.tokenizer.path, [*cfg.tokenizer.extra_special_tokens, *events.vocab.tokens()]
    )
    table = token_table(events.vocab, tokenizer)
    encoder = EventEncoder(events.vocab, table)
    check_row_length(cfg, table.tokens_per_event)

    # 2. Training windows as `tokens` samples (shared pipeline: packing, data state, sharding); queries.
    train_file = out / "events" / "train_tokens.jsonl"
    if world.is_main:
        write_training_file(train_file, events.users, encoder, cfg)
        events.vocab.save(out / "events")
    world.barrier()
    data = cfg.data.model_copy(update={"train": training_source(cfg, train_file), "eval": None})
    loader = make_loader(
        data, cfg.training, tokenizer, cfg.seed, rank=world.dp_rank, world_size=world.dp_size
    )
    queries = heldout_queries(events.users, encoder, ev.max_history_events)

    # 3. Model + heads, and the loss (units: loss-bearing events).
    heads = head_sizes(events.vocab, ev.objective, ev.event_type_head, ev.repeat_head, hidden_size(cfg))
    built = build_model_for(
        cfg.model, tokenizer, cfg.seed, world=world, parallelism=cfg.parallelism, task_heads=heads
    )
    print_notes(built, world)
    if ITEM_HEAD in heads and ITEM_HEAD not in saved_heads(cfg):  # a new catalogue head starts as the
        with torch.no_grad():  # composed code embeddings: its per-item residual is zero
            built.module.heads[ITEM_HEAD].weight.zero_()
    lookups = Lookups.build(events.vocab, table, tokenizer.vocab_size)
    loss_fn = events_loss_fn(
        lookups,
        objective=ev.objective,
        type_weight=ev.event_type_loss_weight,
        chunk_size=cfg.training.loss_chunk_size_tokens,
        num_real_vocab=tokenizer.vocab_size,
    )
    trainer = make_trainer(cfg, built, loss_fn, loader, world, run, loss_units=lookups.count_events)
    evaluate = (
        periodic_evaluate(built.module, queries, lookups, ev.eval_ks, tokenizer.pad_id)
        if ITEM_HEAD in heads
        else None
    )

    # 4. Train, export with the vocabulary beside it, evaluate against the baselines, summarise.
    # (without eval_every_steps the report below is the only evaluation: fit would repeat part of it)
    final = trainer.fit(loader, run, evaluate if queries and cfg.training.eval_every_steps else None)
    loader.close()
    hf_dir = (
        export_hf(built, tokenizer, out / "hf", dtype=cfg.training.export_dtype)
        if cfg.training.export_hf
        else None
    )
    if hf_dir is not None and world.is_main:
        events.vocab.save(hf_dir)
    report = {}
    eval_model = final_eval_model(built, world, hf_dir)
    if eval_model is not None and queries:
        report = evaluate_heldout(eval_model, queries, events, encoder, cfg, tokenizer.pad_id)
        print_report(report, ev.eval_ks, events.vocab, ev.loss_event_types)
        (out / "events_eval.json").write_text(json.dumps(report, indent=2) + "\n")
    extra = {"events": {**events.stats, "eval": report}}
    summary = run_summary(cfg, world, built, trainer, loader, run, hf_dir, {}, final=final, **extra)
    return run.finish(summary, {"hf": hf_dir, "events_eval": out / "events_eval.json"})


main = train


def hidden_size(cfg: JobConfig) -> int:
    """The model's width, from model.arch or the checkpoint's config.json (sizes the history pointer)."""
    if cfg.model.arch is not None:
        return cfg.model.arch.hidden_size
    return int(json.loads((Path(cfg.model.path) / "config.json").read_text())["hidden_size"])


def saved_heads(cfg: JobConfig) -> set[str]:
    """Names of the heads model.path brings (heads.json beside its weights); empty from scratch."""
    index = Path(cfg.model.path or "") / "heads.json"
    return set(json.loads(index.read_text())) if cfg.model.path and index.is_file() else set()


def check_row_length(cfg: JobConfig, tokens_per_event: int) -> None:
    need = cfg.events.max_history_events * tokens_per_event
    if cfg.data.max_tokens_per_pack < need:
        raise ConfigError(
            f"data.max_tokens_per_pack={cfg.data.max_tokens_per_pack} cannot hold events.max_history_events="
            f"{cfg.events.max_history_events} events of {tokens_per_event} tokens ({need}); raise the first or "
            "lower the second"
        )


def write_training_file(path: Path, users: list[UserSequence], encoder: EventEncoder, cfg: JobConfig) -> int:
    """OUTPUT/events/train_tokens.jsonl: the training windows as `tokens` records; returns their number."""
    from posttrain.events.sequences import training_samples

    loss_types = set(cfg.events.loss_event_types) or None
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("w") as f:
        for record in training_samples(users, encoder, cfg.events.max_history_events, loss_types):
            f.write(json.dumps(record, separators=(",", ":")) + "\n")
            n += 1
    if n == 0:
        raise DataError(
            f"no training events bear loss (events.loss_event_types={cfg.events.loss_event_types})"
        )
    return n


def training_source(cfg: JobConfig, path: Path) -> SourceConfig:
    """The prepared windows as the one data.train source (the event sources' epochs carry over)."""
    sources = cfg.data.train_sources
    epochs = {s.epochs for s in sources}
    if len(epochs) > 1:
        raise ConfigError(
            f"data.train: the event sources are trained on together; give them one `epochs` (got {epochs})"
        )
    name = source_name(sources[0]) if len(sources) == 1 else "events"
    return SourceConfig(path=str(path), format="tokens", name=name, epochs=epochs.pop())


# ------------------------------------------------------------------------------ evaluation


def periodic_evaluate(model, queries: list[Query], lookups: Lookups, ks: list[int], pad_id: int):
    """Held-out recall/NDCG of the catalogue head (through forward, so it also runs on sharded models)."""

    def evaluate() -> dict:
        scored = score_queries(model, queries, lookups, pad_id=pad_id, top_k=max(ks))
        m = metrics_by_group(
            scored["item_topk"].tolist(), [q.item for q in queries], ["all"] * len(queries), ks
        )
        return {f"eval_{k}": v for k, v in m.items() if "/" not in k and k != "num_queries"}

    return evaluate


def final_eval_model(built, world, hf_dir: Path | None):
    """The model the final report runs on: the trained one in one process; on rank 0 of a distributed
    run, the exported one (beam search runs outside FSDP); None elsewhere."""
    if not world.distributed:
        return built.module
    if not world.is_main or hf_dir is None:
        return None
    from posttrain.models.hf_io import load_pretrained

    return load_pretrained(hf_dir)[0]


def evaluate_heldout(
    model, queries: list[Query], events: EventSet, encoder: EventEncoder, cfg: JobConfig, pad_id: int
) -> dict:
    """recall@k / NDCG@k (overall and per event type) of the model's rankings and the baselines'."""
    ev = cfg.events
    kmax = max(ev.eval_ks)
    rankings = {}
    lookups = Lookups.build(events.vocab, encoder.table, encoder.table.max_id + 1)
    scored = score_queries(model, queries, lookups, pad_id=pad_id, top_k=kmax)
    if "item_topk" in scored:
        rankings["model"] = scored["item_topk"].tolist()
    if ev.objective in ("semantic_ids", "both") or ITEM_HEAD not in getattr(model, "heads", {}):
        items, logp = beam_search(
            model,
            queries,
            events.vocab,
            encoder.table,
            beam_size=ev.beam_size,
            top_k=ev.beam_size,
            pad_id=pad_id,
        )
        if "repeat_gate" in scored:  # the same history pointer as the catalogue head's
            items = mix_with_history(items, logp, scored["repeat_gate"], scored["repeat_copy"], kmax)
        rankings["model_semantic_ids"] = items[:, :kmax].tolist()
    train_histories = [[encoder.item_index[e.item] for e in u.train] for u in events.users]
    rankings |= baseline_rankings([q.history_items for q in queries], train_histories, kmax)
    targets = [q.item for q in queries]
    groups = [events.vocab.event_types[q.event_type] for q in queries]
    report = {name: metrics_by_group(r, targets, groups, ev.eval_ks) for name, r in rankings.items()}
    if "type_logp" in scored:  # accuracy, and log-loss against the training events' type frequencies
        logp = scored["type_logp"]
        types = np.array([q.event_type for q in queries])
        counts = np.bincount([events.vocab.event_types.index(e.event_type) for u in events.users for e in u.train],
                             minlength=logp.shape[1]) + 1.0  # fmt: skip
        report["event_type"] = {
            "accuracy": float((logp.argmax(1) == types).mean()),
            "nll": float(-logp[np.arange(len(types)), types].mean()),
            "nll_of_training_frequencies": float(-np.log(counts / counts.sum())[types].mean()),
        }
    return report


def print_report(report: dict, ks: list[int], vocab: EventVocab, event_types: list[str]) -> None:
    """The held-out table: every ranking's recall@k and NDCG@k, overall and for `event_types`."""
    cols = [f"recall@{k}" for k in ks] + [f"ndcg@{k}" for k in ks]
    rankings = {name: m for name, m in report.items() if "num_queries" in m}
    for suffix in ["", *(f"/{t}" for t in event_types)]:
        n = next(iter(rankings.values())).get("num_queries" + suffix, 0)
        print(
            f"next item on {n} held-out {suffix[1:] + ' ' if suffix else ''}events ({vocab.num_items} items):"
        )
        print(f"  {'':<20}" + "".join(f"{c:>11}" for c in cols))
        for name, m in rankings.items():
            print(f"  {name:<20}" + "".join(f"{m.get(c + suffix, float('nan')):>11.4f}" for c in cols))
    if "event_type" in report:
        t = report["event_type"]
        print(
            f"next event type: accuracy {t['accuracy']:.4f}, log-loss {t['nll']:.4f} "
            f"(training frequencies: {t['nll_of_training_frequencies']:.4f})"
        )
