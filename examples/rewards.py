"""Example user rewards for `rl.rewards: [{kind: function, function: examples/rewards.py:NAME}]`.

A reward is any function of a posttrain.rl.rewards.RewardContext (the decoded completion, its token ids,
the whole episode's ids, the row's reference answer, finish reason and metadata) returning a float.
"""

from __future__ import annotations


def digit_fraction(ctx) -> float:
    """Share of the completion's characters that are digits: learnable from scratch, so it is what the
    tests use to check that GRPO raises a reward in a few steps on a randomly initialised model."""
    text = ctx.completion.replace(" ", "")
    return sum(c.isdigit() for c in text) / max(1, len(text))


def concise(ctx) -> float:
    """1 for an answer of at most 8 tokens that ended on its own (not cut at max_new_tokens)."""
    return float(ctx.finish_reason == "stop" and len(ctx.completion_ids) <= 8)
