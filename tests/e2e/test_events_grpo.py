"""GRPO over recommended items end to end (configs/tiny-events/grpo.yaml, docs/events.md section 6): from
the tiny event model, prompts are users' histories, every sampled completion is a real catalogue item
(the semantic-ID trie constrains sampling and the trainer's log-probs alike), and the business metric of
examples/rewards_events.py rises; the held-out numbers before and after are pinned, including what the
reward costs in recall.

Observed on 2 CPU cores (runs/tiny-events/hf as the start): training reward first 6 steps 0.582, last 6
0.715 (step-to-step std of the first 6: 0.02); greedy held-out business value 0.534 -> 0.718 (margin
0.52 -> 0.98, novelty 0.53 -> 0.94, relevance 0.56 -> 0.16); beam-search held-out recall@10 0.224 -> 0.021.
"""

from __future__ import annotations

import json

import pytest

from posttrain.config import load_job
from tests.helpers import ROOT

pytestmark = pytest.mark.slow


def test_grpo_raises_the_business_metric_with_only_real_items(tiny_events_run, tmp_path):
    from posttrain.events.semantic_ids import EventVocab
    from posttrain.recipes import grpo

    events_out, _ = tiny_events_run
    hf = events_out / "hf"
    out = tmp_path / "grpo"
    cfg = load_job(
        ROOT / "configs/tiny-events/grpo.yaml",
        [f"output_dir={out}", f"model.path={hf}", f"tokenizer.path={hf}", "metrics.progress=quiet"],
    )
    summary = grpo.train(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward/mean" in r]
    evals = [r for r in rows if "eval_reward/mean" in r]

    # Prompts: 4 per user from the training events, one per held-out event.
    assert summary["events"]["num_rl_prompts"] == 3200 and summary["events"]["num_rl_heldout_prompts"] == 800

    # Every sampled completion (24 steps x 128) and every greedy held-out one names a catalogue item.
    assert len(steps) == 24
    assert all(
        r["reward/invalid_items"] == 0.0
        for r in steps + [{"reward/invalid_items": e["eval_reward/invalid_items"]} for e in evals]
    )
    # The engine and the trainer agree on the constrained log-probs (the setup check's number).
    assert max(r["mismatch/max_abs_logprob_diff"] for r in steps) < 1e-4

    # The business metric rises: last 6 steps vs first 6, far beyond the step-to-step noise.
    reward = [r["reward/mean"] for r in steps]
    first, last = sum(reward[:6]) / 6, sum(reward[-6:]) / 6
    noise = (sum((x - first) ** 2 for x in reward[:6]) / 5) ** 0.5
    print(f"training reward: first 6 steps {first:.3f}, last 6 {last:.3f} (std of the first 6: {noise:.3f})")
    assert last > first + 0.06 and last - first > 3 * noise
    before, after = evals[0], evals[-1]
    for key in ("eval_reward/mean", "eval_reward/hit", "eval_reward/relevance", "eval_reward/margin",
                "eval_reward/novelty", "eval_accuracy"):  # fmt: skip
        print(f"held-out greedy {key}: {before[key]:.4f} -> {after[key]:.4f}")
    assert after["eval_reward/mean"] > before["eval_reward/mean"] + 0.1
    assert after["eval_reward/margin"] > before["eval_reward/margin"] + 0.2

    # Held-out recall of the beam search, before and after: the reward pays for margin and novelty more
    # than for relevance, and the policy takes the trade (pinned, so a change in it is seen).
    ranks = summary["events_eval"]
    for k in ("recall@1", "recall@10", "ndcg@10", "recall@10/purchase"):
        print(f"held-out {k} (beam search): {ranks['before'][k]:.4f} -> {ranks['after'][k]:.4f}")
    assert ranks["before"]["recall@10"] > 0.15 and ranks["before"]["num_queries"] == 800
    assert ranks["after"]["recall@10"] < ranks["before"]["recall@10"]

    # The export is an event model again (its vocabulary beside the weights).
    assert EventVocab.load(out / "hf").items == EventVocab.load(hf).items
