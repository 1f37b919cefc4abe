"""Held-out exact match: greedy and sampled (mean@k, pass@k) agree where they must, and the sampled
numbers are the counts of the engine's own samples."""

import torch
from helpers import tiny_model, tokenizer

from posttrain.data.synthetic import exact_match
from posttrain.evaluate import exact_match_accuracy, sampled_exact_match_accuracy
from posttrain.generate import greedy_generate
from posttrain.rl.engine import LocalEngine
from posttrain.rl.types import SamplingParams


def _rows(tok, model, max_new_tokens: int = 24) -> list[dict]:
    """Eight questions; task "a" rows are answered with what the model greedily says, "b" rows never."""
    rows = [
        {"messages": [{"role": "user", "content": f"question {i}?"}], "task": "ab"[i % 2]} for i in range(8)
    ]
    prompts = [tok.render_prompt(r["messages"]) for r in rows]
    stops = [tok.end_of_turn_id, tok.eos_id, tok.doc_sep_id]
    outs = greedy_generate(
        model,
        prompts,
        max_new_tokens=max_new_tokens,
        stop_ids=stops,
        pad_id=tok.pad_id,
        num_real_vocab=tok.vocab_size,
    )
    for row, out in zip(rows, outs):
        said = tok.decode(out, skip_special_tokens=True)
        row["answer"] = said if row["task"] == "a" else said + " (not what it says)"
    return rows


def test_sampling_at_temperature_zero_is_the_greedy_accuracy():
    tok = tokenizer()
    model, _ = tiny_model(vocab_size=tok.vocab_size)
    rows = _rows(tok, model)
    greedy = exact_match_accuracy(model, tok, rows)
    sampled = sampled_exact_match_accuracy(model, tok, rows, samples_per_prompt=3, temperature=0.0)
    assert greedy["accuracy/a"] == 1.0 and greedy["accuracy/b"] == 0.0 and greedy["accuracy"] == 0.5
    assert {k: sampled[k] for k in ("accuracy", "accuracy/a", "accuracy/b")} == {
        k: greedy[k] for k in ("accuracy", "accuracy/a", "accuracy/b")
    }
    assert sampled["pass@3"] == 0.5 and sampled["num"] == 8


def test_sampled_accuracy_counts_the_engines_samples():
    tok = tokenizer()
    model, _ = tiny_model(vocab_size=tok.vocab_size)
    with torch.no_grad():
        model.output_weight().mul_(40.0)  # peaked: two sampled tokens sometimes repeat the greedy ones
    rows = _rows(tok, model, max_new_tokens=2)
    k = 4
    got = sampled_exact_match_accuracy(
        model, tok, rows, samples_per_prompt=k, temperature=1.0, seed=7, max_new_tokens=2
    )
    # The same engine, seed and settings by hand: per-question share of right answers, then the mean.
    engine = LocalEngine(model, pad_id=tok.pad_id, num_real_vocab=tok.vocab_size)
    params = SamplingParams(
        max_new_tokens=2,
        temperature=1.0,
        stop_ids=(tok.end_of_turn_id, tok.eos_id, tok.doc_sep_id),
        n=k,
        seed=7,
    )
    outs = engine.generate([tok.render_prompt(r["messages"]) for r in rows], params)
    right = [
        [
            exact_match(tok.decode(o.token_ids, skip_special_tokens=True), r["answer"])
            for o in outs[i * k : i * k + k]
        ]
        for i, r in enumerate(rows)
    ]
    a_rows = [sum(x) / k for x, r in zip(right, rows) if r["task"] == "a"]
    assert got["accuracy/a"] == sum(a_rows) / len(a_rows)
    assert got["accuracy/b"] == 0.0
    assert got["pass@4"] == sum(any(x) for x in right) / len(rows)
    # A random model at temperature 1 does not repeat its greedy answer every time, but sometimes does.
    assert 0.0 < got["accuracy/a"] < 1.0
    assert got["pass@4"] >= got["accuracy"]
