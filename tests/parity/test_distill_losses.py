"""Our distillation losses == TRL GKD's `generalized_jsd_loss` (trl.experimental.gkd), values and
gradients, at temperatures 1 and 2, for forward KL (beta 0), reverse KL (beta 1) and JSD (beta 0.5);
chunking changes nothing; padded vocabulary rows are ignored; the top-k offline loss equals forward
KL when k covers the vocabulary."""

from __future__ import annotations

import pytest
import torch

from posttrain.train.distill import distill_loss, topk_distill_loss

V, D, DT = 50, 16, 24  # vocab, student hidden, teacher hidden (teachers may be wider)


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(2, 9, D, generator=g, requires_grad=True)
    w = (torch.randn(V, D, generator=g) * 0.5).requires_grad_()
    th = torch.randn(2, 9, DT, generator=g)
    tw = torch.randn(V, DT, generator=g) * 0.5
    targets = torch.randint(0, V, (2, 9), generator=g)
    targets[0, :3] = -100  # a prompt
    targets[1, -2:] = -100  # padding
    return h, w, th, tw, targets


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("kind,beta", [("forward_kl", 0.0), ("reverse_kl", 1.0), ("jsd", 0.5)])
def test_equals_trl_gkd_loss_and_gradients(kind, beta, temperature):
    from trl.experimental.gkd import GKDTrainer

    h, w, th, tw, targets = _inputs()
    ours, n = distill_loss(h, w, th, tw, targets, kind=kind, beta=beta, temperature=temperature, chunk_size=4)
    ours.backward()
    g_ours = (h.grad.clone(), w.grad.clone())
    h.grad = w.grad = None
    # TRL masks by labels and, with reduction="sum", sums the divergence over positions and vocabulary.
    trl = GKDTrainer.generalized_jsd_loss(
        h @ w.T, th @ tw.T, labels=targets, beta=beta, temperature=temperature, reduction="sum"
    )
    trl.backward()
    assert n == int((targets != -100).sum())
    print(f"{kind} T={temperature}: ours {ours.item():.7f} TRL {trl.item():.7f}")
    assert abs(ours.item() - trl.item()) <= 1e-5 * max(1.0, abs(trl.item()))
    for mine, ref in zip(g_ours, (h.grad, w.grad)):
        assert float((mine - ref).abs().max()) <= 1e-5 * float(ref.abs().max())


def test_chunking_and_padded_rows_change_nothing():
    h, w, th, tw, targets = _inputs(1)
    a, _ = distill_loss(h, w, th, tw, targets, chunk_size=3, num_real_vocab=40)
    b, _ = distill_loss(h, w, th, tw, targets, chunk_size=None, num_real_vocab=40)
    w2, tw2 = w.detach().clone(), tw.clone()
    w2[40:] *= 100.0
    tw2[40:] *= 100.0  # huge logits in the padding rows
    c, _ = distill_loss(h, w2, th, tw2, targets, num_real_vocab=40)
    assert abs(a.item() - b.item()) <= 1e-6 * abs(b.item())
    assert abs(c.item() - b.item()) <= 1e-6 * abs(b.item())


def test_topk_with_the_whole_vocabulary_is_forward_kl():
    h, w, th, tw, targets = _inputs(2)
    keep = targets.reshape(-1) != -100
    t_logp = (th.reshape(-1, DT)[keep] @ tw.T).log_softmax(-1)
    ids = torch.arange(V).expand(t_logp.shape[0], V)
    topk, n = topk_distill_loss(h, w, targets, ids, t_logp)
    full, m = distill_loss(h, w, th, tw, targets, kind="forward_kl")
    assert n == m and abs(topk.item() - full.item()) <= 1e-5 * abs(full.item())
    # A real top-k (k=5) is the same sum restricted to the teacher's five likeliest tokens.
    vals, idx = t_logp.topk(5, dim=-1)
    k5, _ = topk_distill_loss(h, w, targets, idx, vals)
    s_logp = (h.reshape(-1, D)[keep] @ w.T).log_softmax(-1)
    expected = (vals.exp() * (vals - s_logp.gather(-1, idx))).sum()
    assert abs(k5.item() - expected.item()) <= 1e-5 * abs(expected.item())
