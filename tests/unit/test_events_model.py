"""Event sequences, the event loss and semantic-ID decoding on a tiny random model, checked against
direct computations: windows cover every event once, the loss equals hand-built cross-entropies, and
constrained beam search with a beam as wide as the catalogue is the exact ranking."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import TINY_ARCH

from posttrain.config import ModelConfig
from posttrain.data.labels import IGNORE
from posttrain.data.packing import BestFitPacker, collate
from posttrain.data.samples import Sample
from posttrain.data.tokenizer import Tokenizer
from posttrain.events.data import Event, UserSequence
from posttrain.events.decode import beam_search
from posttrain.events.model import ITEM_HEAD, TYPE_HEAD, Lookups, events_loss_fn, head_sizes, score_queries
from posttrain.events.semantic_ids import build_vocab
from posttrain.events.sequences import (
    EventEncoder,
    heldout_queries,
    token_table,
    training_samples,
    training_windows,
)
from posttrain.parallel.build import build_model_for

TYPES = ["play", "view"]


def world(item_tokens: str = "semantic_ids", n_items: int = 12):
    rng = np.random.default_rng(0)
    vocab = build_vocab(
        item_tokens=item_tokens, items=[f"i{i}" for i in range(n_items)], features=rng.normal(size=(n_items, 4)),
        event_types=TYPES, gap_edges_s=[60.0], levels=2, codes=4, kmeans_iters=10, seed=0,
    )  # fmt: skip
    tok = Tokenizer.from_dir("builtin", vocab.tokens())
    table = token_table(vocab, tok)
    users = []
    for u in range(4):
        evs = [
            Event(
                f"u{u}", 100.0 * t + (30 if t % 2 else 0), f"i{(3 * u + t * t) % n_items}", TYPES[(u + t) % 2]
            )
            for t in range(6 + u)
        ]
        users.append(UserSequence(f"u{u}", evs[:-1], evs[-1:]))
    return vocab, tok, table, EventEncoder(vocab, table), users


def model_for(vocab, tok, objective="both", repeat_head=True, family="qwen3"):
    cfg = ModelConfig(family=family, arch=dict(TINY_ARCH))
    heads = head_sizes(vocab, objective, True, repeat_head, TINY_ARCH["hidden_size"])
    return build_model_for(cfg, tok, seed=0, task_heads=heads).module


def test_windows_cover_every_event_once_with_context():
    evs = list(range(10))
    windows = list(training_windows(evs, max_events=4))
    assert windows == [(0, 0, 4), (2, 4, 6), (4, 6, 8), (6, 8, 10)]
    bearing = [i for _, first, end in windows for i in range(first, end)]
    assert bearing == evs
    assert list(training_windows(evs[:3], max_events=4)) == [(0, 0, 3)]


def test_event_tokens_and_labels():
    vocab, tok, table, enc, users = world()
    ids, labels = enc.render(users[0].train[:2], None, [True, False])
    e0, e1 = users[0].train[:2]
    codes0 = table.item_code_ids[enc.item_index[e0.item]].tolist()
    codes1 = table.item_code_ids[enc.item_index[e1.item]].tolist()
    assert ids == [table.gap_ids[0], *codes0, table.event_ids[TYPES.index(e0.event_type)],
                   table.gap_ids[vocab.gap_bucket(e1.timestamp_s - e0.timestamp_s)], *codes1,
                   table.event_ids[TYPES.index(e1.event_type)]]  # fmt: skip
    assert labels == [-100, *codes0, -100, -100, -100, -100, -100]
    # Only `view` events bear loss: windows of play-only users are dropped, labels mark views only.
    records = list(training_samples(users, enc, max_events=4, loss_types={"view"}))
    n_view = sum(e.event_type == "view" for u in users for e in u.train)
    gaps = set(table.gap_ids)
    queries = sum(
        1 for r in records for i, t in enumerate(r["input_ids"]) if t in gaps and r["labels"][i + 1] != IGNORE
    )
    assert queries == n_view


def test_queries_hold_the_last_history_events_then_the_gap_token():
    vocab, tok, table, enc, users = world()
    q = heldout_queries(users, enc, max_events=3)[1]  # user 1: 6 training events, 1 held out
    u = users[1]
    ids, _ = enc.render(u.train[-2:], u.train[-3], [False, False])
    assert q.input_ids == ids + [enc.gap_id(u.train[-1], u.heldout[0])]
    assert q.item == enc.item_index[u.heldout[0].item] and q.event_type == TYPES.index(
        u.heldout[0].event_type
    )
    assert q.history_items == [enc.item_index[e.item] for e in u.train]


def manual_item_probs(model, ids_T, docs_T, h_TD, p: int, table) -> torch.Tensor:
    """p(next item) at query position p, written out: the catalogue softmax, mixed with the history
    pointer over the earlier events of the same document when the model has one."""
    item_vectors = model.output_weight()[torch.as_tensor(table.item_code_ids)].sum(1)
    code_rows = {tuple(r): i for i, r in enumerate(table.item_code_ids.tolist())}
    L = table.item_code_ids.shape[1]
    hq = h_TD[p]
    probs = (hq @ item_vectors.T + model.heads[ITEM_HEAD](hq)).softmax(-1)
    past = [j for j in range(p) if int(ids_T[j]) in set(table.event_ids) and docs_T[j] == docs_T[p]]
    if past and "repeat_query" in model.heads:
        scores = torch.stack([model.heads["repeat_query"](hq) @ h_TD[j] for j in past]).softmax(0)
        copy = torch.zeros(len(item_vectors))
        for j, a in zip(past, scores):
            copy[code_rows[tuple(ids_T[j - L : j].tolist())]] += a
        g = torch.sigmoid(model.heads["repeat_gate"](hq))[0]
        probs = (1 - g) * probs + g * copy
    return probs


@pytest.mark.parametrize("item_tokens,repeat_head", [("semantic_ids", True), ("one_per_item", False)])
def test_event_loss_equals_hand_built_cross_entropies(item_tokens: str, repeat_head: bool):
    vocab, tok, table, enc, users = world(item_tokens)
    packer = BestFitPacker(64)
    rows = []
    for r in training_samples(users, enc, max_events=5):
        rows += packer.add(Sample(r["input_ids"], r["labels"]))
    batch = collate(rows + packer.flush(), tok.pad_id, 64)
    model = model_for(vocab, tok, repeat_head=repeat_head)
    lookups = Lookups.build(vocab, table, tok.vocab_size)
    loss_fn = events_loss_fn(
        lookups, objective="both", type_weight=0.5, chunk_size=None, num_real_vocab=tok.vocab_size
    )
    loss, metrics = loss_fn(model, batch)

    # Expected: every training event once, read from the events themselves (not from the tokens).
    events = [e for u in users for e in u.train]
    qb, qt, items, types = lookups.queries(batch["input_ids"], batch["targets"])
    assert lookups.count_events(batch) == len(events) == len(qt)
    assert sorted(items.tolist()) == sorted(enc.item_index[e.item] for e in events)
    with torch.no_grad():
        h = model(batch["input_ids"], batch["position_ids"], batch.get("doc_ids"))
        docs = batch.get("doc_ids", torch.zeros_like(batch["input_ids"]))
        item_ce = -sum(
            manual_item_probs(model, batch["input_ids"][b], docs[b], h[b], p, table)[i].log()
            for b, p, i in zip(qb.tolist(), qt.tolist(), items.tolist())
        )
        type_ce = F.cross_entropy(model.heads[TYPE_HEAD](h[qb, qt]), types, reduction="sum")
        logits = model.logits(h)[..., : tok.vocab_size]
        keep = batch["targets"] != IGNORE
        code_ce = F.cross_entropy(logits[keep], batch["targets"][keep], reduction="sum")
    assert int(keep.sum()) == len(events) * vocab.num_levels  # targets: exactly the code tokens
    assert float(metrics["item_loss"]) == pytest.approx(float(item_ce), rel=1e-5)
    assert float(metrics["type_loss"]) == pytest.approx(float(type_ce), rel=1e-5)
    assert float(metrics["code_loss"]) == pytest.approx(float(code_ce), rel=1e-5)
    assert float(loss) == pytest.approx(float(item_ce + code_ce + 0.5 * type_ce), rel=1e-5)
    loss.backward()
    assert model.heads[ITEM_HEAD].weight.grad.abs().sum() > 0


def exhaustive_scores(model, query, vocab, table, trie_mask) -> np.ndarray:
    """log p(item) of every item: teacher-forced codes, each step normalised over the allowed codes."""
    out = np.zeros(vocab.num_items)
    w = model.output_weight()
    for i, codes in enumerate(vocab.codes.tolist()):
        ids = torch.tensor([query.input_ids + table.item_code_ids[i, :-1].tolist()])
        with torch.no_grad():
            h = model(ids)[0, len(query.input_ids) - 1 :]
        total = 0.0
        for level, c in enumerate(codes):
            logits = (h[level] @ w[torch.as_tensor(table.code_ids[level])].T).float()
            allowed = torch.as_tensor(trie_mask[tuple(codes[:level])])
            total += float(logits.masked_fill(~allowed, float("-inf")).log_softmax(-1)[c])
        out[i] = total
    return out


@pytest.mark.parametrize(
    "item_tokens,family", [("semantic_ids", "qwen3"), ("one_per_item", "qwen3"), ("semantic_ids", "llama3"),
                           ("semantic_ids", "gemma3")]
)  # fmt: skip
def test_beam_search_as_wide_as_the_catalogue_is_the_exact_ranking(item_tokens: str, family: str):
    from posttrain.events.decode import code_trie

    vocab, tok, table, enc, users = world(item_tokens)
    model = model_for(vocab, tok, family=family).eval()
    queries = heldout_queries(users, enc, max_events=4)
    n = vocab.num_items
    items, scores = beam_search(
        model, queries, vocab, table, beam_size=n, top_k=n, pad_id=tok.pad_id, batch_size=3
    )
    narrow, narrow_scores = beam_search(model, queries, vocab, table, beam_size=3, top_k=3, pad_id=tok.pad_id)
    trie = code_trie(vocab)
    for q, row, row_scores, nrow, nscores in zip(queries, items, scores, narrow, narrow_scores):
        exact = exhaustive_scores(model, q, vocab, table, trie)
        order = np.argsort(-exact, kind="stable")
        assert sorted(row.tolist()) == list(range(n))  # every item exactly once
        np.testing.assert_allclose(row_scores, exact[row], atol=1e-5)  # scores are the exact log-probs
        np.testing.assert_allclose(row_scores, exact[order], atol=1e-5)  # ... in descending order
        assert np.exp(exact).sum() == pytest.approx(1.0, abs=1e-5)  # a distribution over the catalogue
        np.testing.assert_allclose(nscores, exact[nrow], atol=1e-5)  # a narrow beam: real items, true scores
        assert nrow[0] == order[0] or item_tokens == "semantic_ids"  # one level: the top-k is exact
    # The catalogue head, batched with padding, ranks like one query at a time through plain forward.
    lookups = Lookups.build(vocab, table, tok.vocab_size)
    scored = score_queries(model, queries, lookups, pad_id=tok.pad_id, top_k=3)
    for q, top, type_logp in zip(queries, scored["item_topk"], scored["type_logp"]):
        ids = torch.tensor(q.input_ids)
        with torch.no_grad():
            h = model(ids[None])[0]
            logits = manual_item_probs(model, ids, torch.zeros_like(ids), h, len(ids) - 1, table)
        h = h[-1]
        assert top.tolist() == logits.topk(3).indices.tolist()
        np.testing.assert_allclose(type_logp, model.heads[TYPE_HEAD](h).log_softmax(-1).detach(), atol=1e-5)


def test_beam_results_mix_with_the_history_pointer():
    from posttrain.events.decode import mix_with_history

    # Beam: item 3 (p 0.5), item 1 (p 0.3); history pointer: item 7 (0.8), item 1 (0.2); gate 0.5.
    items = np.array([[3, 1]])
    logp = np.log(np.array([[0.5, 0.3]]))
    copy = np.zeros((1, 10))
    copy[0, 7], copy[0, 1] = 0.8, 0.2
    # p: 3 -> 0.25, 1 -> 0.15 + 0.1 = 0.25 (tie: lower index first), 7 -> 0.4
    assert mix_with_history(items, logp, np.array([0.5]), copy, top_k=3).tolist() == [[7, 1, 3]]
    # Gate 0: the beam's order; fewer candidates than top_k leave -1.
    assert mix_with_history(items, logp, np.array([0.0]), np.zeros((1, 10)), top_k=3).tolist() == [[3, 1, -1]]
