"""GRPO over recommended items, piece by piece on a tiny random event model: the semantic-ID trie as a
sampling constraint (every sample a real item; masked tokens get probability 0; the engine's log-probs
are the renormalised ones, and the trainer's equal them only with the same mask), token-id prompts
(the `prompt_ids` rl_prompt rows) and the prompt builder's time split."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from test_events_model import model_for, world

from posttrain.config import JobConfig, SourceConfig
from posttrain.data.schemas import validate
from posttrain.errors import DataError
from posttrain.events.rl import INVALID, ItemCodeConstraint, heldout_rows, training_rows
from posttrain.rl.engine import LocalEngine
from posttrain.rl.grpo import collate_episodes, constraint_mask, token_entropy, token_logprobs
from posttrain.rl.prompts import load_eval_prompts
from posttrain.rl.types import Episode, SamplingParams

ITEM_CODES = 2  # levels in test_events_model.world()


def setup(seed: int = 0):
    vocab, tok, table, enc, users = world()
    torch.manual_seed(seed)
    model = model_for(vocab, tok).eval()
    with torch.no_grad():  # a random model puts little mass on codes: spread the logits so both matter
        model.output_weight().mul_(20.0)
    return vocab, tok, table, enc, users, model, ItemCodeConstraint(vocab, table)


def real_items(vocab, table) -> set[tuple[int, ...]]:
    return {tuple(row) for row in table.item_code_ids.tolist()}


def test_trie_allows_exactly_the_codes_that_lead_to_items():
    vocab, tok, table, _, _, _, trie = setup()
    items = real_items(vocab, table)
    V = tok.vocab_size
    root = trie.allowed([[]], V)[0]
    assert set(root.nonzero().squeeze(1).tolist()) == {c[0] for c in items}
    for first in {c[0] for c in items}:
        # a slate: after a whole item the next one starts again at the root
        level1, again = trie.allowed([[first], [*next(iter(items))]], V)
        assert set(level1.nonzero().squeeze(1).tolist()) == {c[1] for c in items if c[0] == first}
        assert torch.equal(again, root)
    with pytest.raises(ValueError, match="not the first codes of any catalogue item"):
        trie.allowed([[tok.pad_id]], V)
    code = next(iter(items))
    assert trie.decode([*code, *code]) == " ".join([vocab.items[trie_index(table, code)]] * 2)
    assert trie.decode([code[0]]) == INVALID  # cut short
    assert trie.items([code[1], code[0]]) == [None]


def trie_index(table, code) -> int:
    return [tuple(r) for r in table.item_code_ids.tolist()].index(tuple(code))


def test_constrained_samples_are_always_real_items_and_unconstrained_ones_are_not():
    vocab, tok, table, enc, users, model, trie = setup()
    prompts = [q.input_ids for q in heldout_rows_queries(users, enc)]
    params = SamplingParams(max_new_tokens=2 * ITEM_CODES, temperature=1.0, n=64, seed=0)  # slates of 2
    kw = {"pad_id": tok.pad_id, "num_real_vocab": tok.vocab_size}
    constrained = LocalEngine(model, constraint=trie, **kw).generate(prompts, params)
    free = LocalEngine(model, **kw).generate(prompts, params)
    invalid = lambda outs: sum(INVALID in trie.decode(o.token_ids).split() for o in outs)  # noqa: E731
    print(f"invalid slates: constrained {invalid(constrained)}, free {invalid(free)} of {len(free)}")
    assert invalid(constrained) == 0 and len(constrained) == len(prompts) * 64
    assert invalid(free) > len(free) // 4  # the random model's free samples mostly name no item
    assert len({o.token_ids[0] for o in constrained}) > 1  # it samples, not just argmax


def heldout_rows_queries(users, enc):
    from posttrain.events.sequences import heldout_queries

    return heldout_queries(users, enc, max_events=4)


def test_engine_logprobs_are_renormalised_over_the_allowed_tokens_and_the_trainer_matches_with_the_mask():
    vocab, tok, table, enc, users, model, trie = setup()
    prompts = [q.input_ids for q in heldout_rows_queries(users, enc)]
    T = 0.7
    params = SamplingParams(max_new_tokens=ITEM_CODES, temperature=T, top_k=3, n=4, seed=1)
    outs = LocalEngine(model, pad_id=tok.pad_id, num_real_vocab=tok.vocab_size, constraint=trie).generate(
        prompts, params
    )
    V = tok.vocab_size
    # By hand: at each step, softmax over the allowed codes of the masked logits / T (top-k comes after
    # and does not change the log-prob), so masked tokens have probability exactly 0.
    for out in outs[:6]:
        ids = list(out.prompt_ids)
        for step, (token, lp) in enumerate(zip(out.token_ids, out.logprobs)):
            with torch.no_grad():
                logits = model.logits(model(torch.tensor([ids])))[0, -1, :V].float()
            allowed = trie.allowed([out.token_ids[:step]], V)[0]
            probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")) / T, -1)
            assert float(probs[~allowed].sum()) == 0.0 and math.isclose(float(probs.sum()), 1.0, rel_tol=1e-6)
            assert lp == pytest.approx(math.log(float(probs[token])), abs=1e-5)
            free = float(torch.log_softmax(logits / T, -1)[token])
            assert lp - free > 1e-3  # the renormalised log-prob is higher: the mask removed mass
            ids.append(token)

    # The trainer's log-probs of the same tokens: equal with the constraint's mask, not without it.
    episodes = [
        Episode(o.prompt_ids + o.token_ids, [0] * len(o.prompt_ids) + [1] * len(o.token_ids),
                [0.0] * len(o.prompt_ids) + o.logprobs)
        for o in outs
    ]  # fmt: skip
    [batch] = collate_episodes(episodes, tok.pad_id, 64, aggregation="token", max_new_tokens=ITEM_CODES,
                               rows_per_batch=len(episodes))  # fmt: skip
    engine_lp = torch.tensor([lp for o in outs for lp in o.logprobs])
    mask = constraint_mask(batch["targets"], batch["episode_index"], trie, V)

    def head(allowed):
        return lambda h, w: token_logprobs(
            h, w, batch["targets"], temperature=T, num_real_vocab=V, allowed_NV=allowed
        )

    with torch.no_grad():
        masked = model(batch["input_ids"], batch["position_ids"], batch["doc_ids"], head_fn=head(mask))
        full = model(batch["input_ids"], batch["position_ids"], batch["doc_ids"], head_fn=head(None))
        ent = model(batch["input_ids"], batch["position_ids"], batch["doc_ids"],
                    head_fn=lambda h, w: token_entropy(h, w, batch["targets"], temperature=T, num_real_vocab=V,
                                                       allowed_NV=mask))  # fmt: skip
    diff = float((masked - engine_lp).abs().max())
    print(
        f"max |trainer - engine| with the mask {diff:.2e}, without {float((full - engine_lp).abs().max()):.3f}"
    )
    assert diff < 1e-5
    assert float((full - engine_lp).abs().max()) > 0.05  # what the setup check would flag
    assert float(ent.max()) <= math.log(int(mask.sum(-1).max())) + 1e-5  # entropy over <= allowed codes

    # Gradients flow through the masked path (the policy loss trains on it) and are finite.
    model.train()
    masked = model(batch["input_ids"], batch["position_ids"], batch["doc_ids"], head_fn=head(mask))
    masked.sum().backward()
    grad = model.output_weight().grad
    assert grad is not None and torch.isfinite(grad).all() and float(grad.abs().sum()) > 0


def test_prompt_rows_keep_the_time_split(tmp_path: Path):
    vocab, tok, table, enc, users, _, _ = setup()
    ev = JobConfig.model_fields["events"].default.model_copy(
        update={"max_history_events": 4, "rl_prompts_per_user": 2, "rl_next_events": 2}
    )
    train = training_rows(users, enc, ev)
    held = heldout_rows(users, enc, ev)
    assert len(train) == 2 * len(users) and len(held) == len(users)
    for u, (a, b) in zip(users, zip(train[0::2], train[1::2])):
        # the last two training events are asked for, from the events before each (never a held-out one)
        assert [a["answer"], b["answer"]] == [e.item for e in u.train[-2:]]
        assert a["metadata"]["next_items"] == list(dict.fromkeys(e.item for e in u.train[-2:]))
        assert b["metadata"]["next_items"] == [u.train[-1].item]  # the horizon stops at the split
        assert b["metadata"]["history_items"] == list(dict.fromkeys(e.item for e in u.train[:-1]))
        history = u.train[-5:-1]  # max_history_events - 1 = 3 events, then the query's gap token
        ids, _ = enc.render(history[1:], history[0], [False] * 3)
        assert b["prompt_ids"] == [*ids, enc.gap_id(u.train[-2], u.train[-1])]
    for u, row in zip(users, held):
        assert row["answer"] == u.heldout[0].item
        assert row["metadata"]["history_items"] == list(dict.fromkeys(e.item for e in u.train))

    # The rows load as prompts: token ids used as they are; a foreign id fails with file:line.
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in held))
    data = JobConfig.model_fields["data"].annotation  # DataConfig
    prompts = load_eval_prompts(data(train=SourceConfig(path=str(path), format="rl_prompt"),
                                     eval=SourceConfig(path=str(path), format="rl_prompt"),
                                     max_tokens_per_pack=64), tok)  # fmt: skip
    assert [p.ids for p in prompts] == [r["prompt_ids"] for r in held]
    assert prompts[0].row.metadata == held[0]["metadata"] and prompts[0].row.messages == []
    bad = {**held[0], "prompt_ids": [*held[0]["prompt_ids"], tok.vocab_size]}
    path.write_text(json.dumps(held[0]) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(
        DataError, match=rf"p.jsonl:2: field 'prompt_ids' has token id {tok.vocab_size} outside"
    ):
        load_eval_prompts(data(train=SourceConfig(path=str(path), format="rl_prompt"),
                               eval=SourceConfig(path=str(path), format="rl_prompt"),
                               max_tokens_per_pack=64), tok)  # fmt: skip


def test_rl_prompt_schema_takes_token_ids():
    row = validate("rl_prompt", {"prompt_ids": [5, 6], "answer": "i1", "metadata": {"k": 1}})
    assert row.prompt_ids == [5, 6] and row.messages == [] and row.answer == "i1"
    with pytest.raises(DataError, match="give 'prompt_ids' or 'messages'/'prompt', not both"):
        validate("rl_prompt", {"prompt_ids": [5], "prompt": "hi", "answer": "1"})
    with pytest.raises(DataError, match=r"field 'prompt_ids'\[1\] must be int"):
        validate("rl_prompt", {"prompt_ids": [5, "6"], "answer": "1"})
