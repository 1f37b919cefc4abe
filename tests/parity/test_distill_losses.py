"""Our distillation losses == TRL GKD's `generalized_jsd_loss` (trl.experimental.gkd), values and
gradients w.r.t. the student's hidden states and output matrix, at temperatures 1 and 2, for forward KL
(TRL beta 0), reverse KL (beta 1) and JSD (beta 0.5, 0.1). Chunking changes nothing; padded vocabulary
rows cannot influence anything; the offline top-k loss equals a naive full-logits reference and, with k
covering the vocabulary, the forward KL against the same teacher. All fp32.

TRL is called with reduction="sum": it masks positions with labels == IGNORE and sums the divergence over
the remaining positions and the vocabulary, which is what we return (its "batchmean" is that sum divided
by the unmasked count, the division our trainer does)."""

from __future__ import annotations

import pytest
import torch

from posttrain.data.labels import IGNORE
from posttrain.train.distill import distill_loss, topk_distill_loss

V, D, DT = 50, 16, 24  # vocab, student hidden, teacher hidden (teachers may be wider)


def _inputs(seed: int = 0, vocab: int = V):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(2, 9, D, generator=g, requires_grad=True)
    w = (torch.randn(vocab, D, generator=g) * 0.5).requires_grad_()
    th = torch.randn(2, 9, DT, generator=g)
    tw = torch.randn(vocab, DT, generator=g) * 0.5
    targets = torch.randint(0, vocab, (2, 9), generator=g)
    targets[0, :3] = -100  # a prompt
    targets[1, -2:] = -100  # padding
    return h, w, th, tw, targets


def _grads(loss: torch.Tensor, *leaves: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, leaves))


def _rel_grad_diff(mine: torch.Tensor, ref: torch.Tensor) -> float:
    return float((mine - ref).abs().max()) / float(ref.abs().max())


@pytest.mark.filterwarnings("ignore:You are importing from 'trl.experimental'")
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("kind,beta", [("forward_kl", 0.0), ("reverse_kl", 1.0), ("jsd", 0.5), ("jsd", 0.1)])
def test_equals_trl_generalized_jsd_loss_and_gradients(kind, beta, temperature):
    from trl.experimental.gkd import GKDTrainer

    h, w, th, tw, targets = _inputs()
    ours, n = distill_loss(h, w, th, tw, targets, kind=kind, beta=beta, temperature=temperature, chunk_size=4)
    g_ours = _grads(ours, h, w)
    trl = GKDTrainer.generalized_jsd_loss(
        h @ w.T, th @ tw.T, labels=targets, beta=beta, temperature=temperature, reduction="sum"
    )
    g_trl = _grads(trl, h, w)
    trl_mean = GKDTrainer.generalized_jsd_loss(
        h @ w.T, th @ tw.T, labels=targets, beta=beta, temperature=temperature, reduction="batchmean"
    )
    assert n == int((targets != IGNORE).sum())
    rel = abs(ours.item() - trl.item()) / abs(trl.item())
    gh, gw = (_rel_grad_diff(m, r) for m, r in zip(g_ours, g_trl))
    print(f"{kind} beta={beta} T={temperature}: loss rel {rel:.1e}, grad h {gh:.1e}, grad w {gw:.1e}")
    assert rel <= 1e-5
    assert abs(ours.item() / n - trl_mean.item()) <= 1e-5 * abs(trl_mean.item())
    assert gh <= 1e-5 and gw <= 1e-5


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_chunking_changes_nothing(kind):
    h, w, th, tw, targets = _inputs(1)
    a, _ = distill_loss(h, w, th, tw, targets, kind=kind, temperature=2.0, chunk_size=3)
    ga = _grads(a, h, w)
    b, _ = distill_loss(h, w, th, tw, targets, kind=kind, temperature=2.0, chunk_size=None)
    gb = _grads(b, h, w)
    assert abs(a.item() - b.item()) <= 1e-6 * abs(b.item())
    for x, y in zip(ga, gb):  # weight gradients are summed in another order: measured ~5e-7
        assert _rel_grad_diff(x, y) <= 5e-6


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_padded_vocabulary_rows_change_nothing(kind):
    real = 40
    h, w, th, tw, targets = _inputs(2)
    targets = targets.clamp(max=real - 1).masked_fill(targets == IGNORE, -100)
    g = torch.Generator().manual_seed(3)
    # Huge logits in the padding columns (|logit| ~ 1e5): they would swamp any softmax that saw them.
    w_pad = torch.cat([w.detach(), torch.randn(V - real, D, generator=g) * 1e4]).requires_grad_()
    tw_pad = torch.cat([tw[:real], torch.randn(V - real, DT, generator=g) * 1e4])
    w_real = w.detach()[:real].clone().requires_grad_()
    a, _ = distill_loss(h, w_pad, th, tw_pad, targets, kind=kind, chunk_size=5, num_real_vocab=real)
    ga = _grads(a, h, w_pad)
    b, _ = distill_loss(h, w_real, th, tw[:real], targets, kind=kind, chunk_size=5)
    gb = _grads(b, h, w_real)
    assert abs(a.item() - b.item()) <= 1e-6 * abs(b.item())
    assert _rel_grad_diff(ga[0], gb[0]) <= 1e-6
    assert _rel_grad_diff(ga[1][:real], gb[1]) <= 1e-6
    assert not ga[1][real:].any()  # padded rows get no gradient
    # Student and teacher matrices may be padded differently (the teacher here has no padding at all).
    c, _ = distill_loss(h, w_pad, th, tw[:real], targets, kind=kind, num_real_vocab=real)
    assert abs(c.item() - b.item()) <= 1e-6 * abs(b.item())


def _teacher_logprobs(th, tw, targets, temperature: float) -> torch.Tensor:
    keep = targets.reshape(-1) != IGNORE
    return ((th.reshape(-1, th.shape[-1])[keep] @ tw.T) / temperature).log_softmax(-1)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_equals_naive_full_logits_reference(temperature):
    h, w, th, tw, targets = _inputs(4)
    vals, ids = _teacher_logprobs(th, tw, targets, temperature).topk(5, dim=-1)
    vals[0, -1] = float("-inf")  # a row that stored only four candidates
    ours, n = topk_distill_loss(h, w, targets, ids, vals, temperature=temperature, chunk_size=3)
    g_ours = _grads(ours, h, w)
    keep = targets.reshape(-1) != IGNORE
    s_logp = ((h.reshape(-1, D)[keep] @ w.T) / temperature).log_softmax(-1)
    terms = vals.exp() * (vals - s_logp.gather(-1, ids))
    ref = torch.where(vals.isneginf(), 0.0, terms).sum()
    g_ref = _grads(ref, h, w)
    rel = abs(ours.item() - ref.item()) / abs(ref.item())
    gh, gw = (_rel_grad_diff(m, r) for m, r in zip(g_ours, g_ref))
    print(f"top-5 T={temperature}: loss rel {rel:.1e}, grad h {gh:.1e}, grad w {gw:.1e}")
    assert n == int(keep.sum()) and rel <= 1e-5 and gh <= 1e-5 and gw <= 1e-5


def test_topk_over_the_whole_vocabulary_is_forward_kl():
    h, w, th, tw, targets = _inputs(5)
    t_logp = _teacher_logprobs(th, tw, targets, 2.0)
    ids = torch.arange(V).expand(t_logp.shape[0], V)
    topk, n = topk_distill_loss(h, w, targets, ids, t_logp, temperature=2.0, chunk_size=4)
    g_topk = _grads(topk, h, w)
    full, m = distill_loss(h, w, th, tw, targets, kind="forward_kl", temperature=2.0)
    g_full = _grads(full, h, w)
    rel = abs(topk.item() - full.item()) / abs(full.item())
    gh, gw = (_rel_grad_diff(a, b) for a, b in zip(g_topk, g_full))
    print(f"top-V vs forward KL: loss rel {rel:.1e}, grad h {gh:.1e}, grad w {gw:.1e}")
    assert n == m and rel <= 1e-5 and gh <= 1e-5 and gw <= 1e-5


def test_no_loss_positions_and_no_grad():
    h, w, th, tw, targets = _inputs(6)
    none = torch.full_like(targets, -100)
    loss, n = distill_loss(h, w, th, tw, none, kind="jsd")
    loss.backward()  # still connected to the graph
    assert n == 0 and loss.item() == 0.0 and not h.grad.any()
    empty = torch.zeros(0, 3, dtype=torch.long)
    loss, n = topk_distill_loss(h, w, none, empty, empty.float())
    assert n == 0 and loss.item() == 0.0
    with_grad, _ = distill_loss(h, w, th, tw, targets, kind="reverse_kl", chunk_size=4)
    with torch.no_grad():
        without, _ = distill_loss(h, w, th, tw, targets, kind="reverse_kl", chunk_size=4)
    assert with_grad.item() == without.item() and not without.requires_grad
