"""Next-token sampling (posttrain/rl/sampling.py): truncation sets, the sampled distribution, log-probs.

What it pins: the threshold form of top-k / top-p keeps exactly the tokens an argsort + cumsum + scatter
reference keeps; sampled tokens follow the truncated, renormalised softmax(logits / T) (chi-square) and
never hit a dropped or -inf token; log-probs are log_softmax(logits / T) before truncation.
"""

from __future__ import annotations

import pytest
import torch

from posttrain.rl.sampling import sample_next, sorted_descending, truncate_logits
from posttrain.rl.types import SamplingParams


def _reference_keep(scaled: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Kept tokens by the textbook recipe (HF / vLLM): top-k by value, then argsort descending, softmax,
    exclusive cumsum < top_p, scattered back to vocabulary order."""
    keep = torch.ones_like(scaled, dtype=torch.bool)
    if 0 < top_k < scaled.shape[-1]:
        keep &= scaled >= torch.topk(scaled, top_k, dim=-1).values[:, -1:]
    masked = scaled.masked_fill(~keep, float("-inf"))
    values, order = masked.sort(dim=-1, descending=True)
    probs = torch.softmax(values, dim=-1)
    keep_sorted = probs.cumsum(-1) - probs < top_p
    return keep & torch.zeros_like(keep).scatter(-1, order, keep_sorted)


@pytest.mark.parametrize("top_k,top_p", [(0, 0.9), (0, 0.3), (20, 1.0), (20, 0.9), (1, 0.5), (0, 1e-6)])
@pytest.mark.parametrize("spread", [0.1, 3.0])  # near-uniform (a random model) and peaked logits
def test_truncation_keeps_what_the_sort_based_reference_keeps(top_k, top_p, spread):
    gen = torch.Generator().manual_seed(0)
    scaled = torch.randn(64, 843, generator=gen) * spread
    kept = truncate_logits(scaled, top_k, top_p) > float("-inf")
    want = _reference_keep(scaled, top_k, top_p)
    assert torch.equal(kept, want)
    assert kept.sum(-1).min() >= 1
    if top_k:
        assert kept.sum(-1).max() <= top_k


def test_no_truncation_when_both_are_off():
    scaled = torch.randn(4, 50)
    assert truncate_logits(scaled, 0, 1.0) is scaled


def test_sorted_descending_equals_torch_sort():
    x = torch.randn(8, 300)
    x[0, :5] = float("-inf")
    assert torch.equal(sorted_descending(x), x.sort(dim=-1, descending=True).values)


def test_samples_follow_the_truncated_distribution():
    """20,000 draws of one row's next token with T = 0.8, top_k = 6, top_p = 0.8 (one -inf token, as a
    constraint leaves it): chi-square over the kept tokens against the renormalised truncated softmax
    passes (threshold 25 at <= 5 dof: p < 1e-4 of failing by chance); dropped tokens are never drawn; the
    same counts against the untruncated softmax fail it."""
    logits = torch.tensor([2.0, 1.5, 1.2, 1.0, 0.7, 0.1, -0.5, float("-inf"), 0.9, -1.0])
    params = SamplingParams(max_new_tokens=1, temperature=0.8, top_k=6, top_p=0.8)
    n = 20_000
    gen = torch.Generator().manual_seed(0)
    tokens, logprobs = sample_next(logits.expand(n, -1).contiguous(), params, gen)
    scaled = logits / params.temperature
    probs = torch.softmax(scaled, -1).double()
    keep = _reference_keep(scaled[None], params.top_k, params.top_p)[0]
    assert 2 <= keep.sum() < 6  # the nucleus is tighter than the top-k here
    counts = torch.bincount(tokens, minlength=len(logits)).double()
    assert counts[~keep].sum() == 0
    expected = n * probs[keep] / probs[keep].sum()
    chi2 = float(((counts[keep] - expected) ** 2 / expected).sum())
    assert chi2 < 25.0, chi2
    untruncated = n * probs[keep]
    assert float(((counts[keep] - untruncated) ** 2 / untruncated).sum()) > 100.0
    # log-probs are under the untruncated softmax(logits / T)
    want = torch.log_softmax(scaled, -1)[tokens]
    assert (logprobs - want).abs().max().item() <= 1e-6


def test_greedy_takes_the_argmax_with_its_logprob():
    logits = torch.randn(16, 100)
    tokens, logprobs = sample_next(logits, SamplingParams(max_new_tokens=1, temperature=0.0), None)
    assert torch.equal(tokens, logits.argmax(-1))
    want = torch.log_softmax(logits, -1).gather(-1, tokens[:, None]).squeeze(-1)
    assert (logprobs - want).abs().max().item() <= 1e-6


def test_seeded_draws_repeat_and_differ_across_seeds():
    logits = torch.randn(32, 200)
    params = SamplingParams(max_new_tokens=1, top_p=0.95)
    draw = lambda seed: sample_next(logits, params, torch.Generator().manual_seed(seed))[0]  # noqa: E731
    assert torch.equal(draw(1), draw(1))
    assert not torch.equal(draw(1), draw(2))
