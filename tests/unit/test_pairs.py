"""Preference pairs as packed samples: labels only on the answers, both halves in one row, each half
its own document (positions restart, targets never cross, attention split)."""

from __future__ import annotations

import json

import pytest
import torch

from posttrain.data.labels import IGNORE
from posttrain.data.packing import BestFitPacker, collate, rows_from_state, rows_to_state
from posttrain.data.pairs import render_pair
from posttrain.data.samples import Sample
from posttrain.errors import DataError
from tests.helpers import ROOT, tokenizer

PAIRS = [json.loads(line) for line in (ROOT / "data/tiny/pref_train.jsonl").read_text().splitlines()[:40]]


def test_labels_cover_only_the_answers():
    tok = tokenizer()
    row = {"prompt": "What is 2 + 3?", "chosen": "5", "rejected": "It is 6."}
    ids, labels, (n_c, n_r) = render_pair(tok, row)
    assert len(ids) == n_c + n_r
    chosen = tok.decode([y for y in labels[:n_c] if y != IGNORE])
    rejected = tok.decode([y for y in labels[n_c:] if y != IGNORE])
    assert chosen.strip() == "5" and rejected.strip() == "It is 6."
    assert ids[:n_c][: n_c - 3] == ids[n_c:][: n_c - 3]  # same prompt rendering in both halves


def test_whole_conversations_share_their_leading_messages_as_prompt():
    tok = tokenizer()
    user = {"role": "user", "content": "Sort: 3 1 2"}
    row = {
        "chosen": [user, {"role": "assistant", "content": "1 2 3"}],
        "rejected": [user, {"role": "assistant", "content": "3 2 1"}],
    }
    ids, labels, (n_c, _) = render_pair(tok, row)
    assert tok.decode([y for y in labels[:n_c] if y != IGNORE]).strip() == "1 2 3"


def test_bad_pairs_name_the_problem():
    tok = tokenizer()
    with pytest.raises(DataError, match="identical"):
        render_pair(tok, {"prompt": "q", "chosen": "a", "rejected": "a"})
    with pytest.raises(DataError, match="missing field 'rejected'"):
        render_pair(tok, {"prompt": "q", "chosen": "a"})


def test_pairs_pack_whole_and_collate_into_two_documents():
    tok = tokenizer()
    samples = [Sample(*render_pair(tok, row)[:2], 0, render_pair(tok, row)[2]) for row in PAIRS]
    packer = BestFitPacker(256, 4)
    rows = [r for s in samples for r in packer.add(s)] + packer.flush()
    assert sorted(id(s) for r in rows for s in r) == sorted(id(s) for s in samples)  # whole, once
    assert rows_from_state(rows_to_state(rows)) == rows  # the checkpointed state keeps the parts
    batch = collate(rows[:2], tok.pad_id, 256)
    roles, lens, index = batch["doc_roles"], batch["doc_lens"], batch["doc_index"]
    assert roles.tolist() == [0, 1] * (len(roles) // 2)
    flat = [s for r in rows[:2] for s in r]
    assert lens.tolist() == [n for s in flat for n in s.parts]
    # Each document's positions restart at 0 and its last position predicts nothing.
    pos, tgt = batch["position_ids"].reshape(-1), batch["targets"].reshape(-1)
    idx = index.reshape(-1)
    for d in range(len(lens)):
        where = (idx == d).nonzero().squeeze(-1)
        assert pos[where].tolist() == list(range(int(lens[d])))
        assert int(tgt[where[-1]]) == IGNORE
    assert torch.equal(batch["doc_ids"] >= 0, index >= 0)


def test_an_overlong_pair_is_dropped_and_counted():
    from posttrain.data.samples import SkipCounter, fit_length

    skips = SkipCounter()
    pair = Sample([1] * 30, [1] * 30, 0, (10, 20))
    assert fit_length(pair, 16, "truncate", skips) == []
    assert skips == {"overlong_pair_dropped": 1}
