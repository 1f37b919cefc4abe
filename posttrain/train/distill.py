"""Distillation losses on full next-token distributions, chunked over loss positions.

Definitions are TRL GKD's `generalized_jsd_loss` (trl 1.16, trl.experimental.gkd), with logits
divided by a temperature first:

  forward_kl   KL(teacher || student)   (TRL beta = 0)   mass-covering: the student spreads over
                                                         everything the teacher finds likely
  reverse_kl   KL(student || teacher)   (TRL beta = 1)   mode-seeking
  jsd          beta * KL(teacher || m) + (1 - beta) * KL(student || m),
               m = (1 - beta) * student + beta * teacher

Loss positions (target != -100) are taken in chunks; each chunk's student and teacher logits are
recomputed in backward (checkpointing), so memory holds a few [chunk, vocab] blocks, never [tokens,
vocab]. The result is the SUM over positions (the trainer divides by loss tokens).
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from posttrain.train.losses import AUTO_CHUNK_BYTES, IGNORE

KIND_BETA = {"forward_kl": 0.0, "reverse_kl": 1.0}


def _divergence(s_logp: torch.Tensor, t_logp: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-position generalised JSD (beta 0 = forward KL, 1 = reverse KL), summed over the vocabulary."""
    if beta == 0.0:
        return (t_logp.exp() * (t_logp - s_logp)).sum(-1)
    if beta == 1.0:
        return (s_logp.exp() * (s_logp - t_logp)).sum(-1)
    b = torch.tensor(beta, dtype=s_logp.dtype, device=s_logp.device)
    m_logp = torch.logsumexp(torch.stack([s_logp + torch.log1p(-b), t_logp + torch.log(b)]), dim=0)
    kl_t = (t_logp.exp() * (t_logp - m_logp)).sum(-1)
    kl_s = (s_logp.exp() * (s_logp - m_logp)).sum(-1)
    return b * kl_t + (1 - b) * kl_s


def _chunk_loss(h_c, w, th_c, tw, beta: float, temperature: float, vocab: int) -> torch.Tensor:
    s = (h_c @ w.T).float()[:, :vocab] / temperature
    with torch.no_grad():
        t = (th_c @ tw.T).float()[:, :vocab] / temperature
    return _divergence(s.log_softmax(-1), t.log_softmax(-1), beta).sum()


def _keep(x_BTD: torch.Tensor, keep_N: torch.Tensor) -> torch.Tensor:
    return x_BTD.reshape(-1, x_BTD.shape[-1])[keep_N]


def distill_loss(
    h_BTD: torch.Tensor,
    w_VD: torch.Tensor,
    teacher_h_BTD: torch.Tensor,
    teacher_w_VD: torch.Tensor,
    targets_BT: torch.Tensor,
    *,
    kind: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    num_real_vocab: int | None = None,
) -> tuple[torch.Tensor, int]:
    """(sum over loss positions of the divergence, number of positions); see the module docstring.
    The teacher's hidden size may differ from the student's; both output matrices share the vocabulary."""
    if kind not in ("forward_kl", "reverse_kl", "jsd"):
        raise ValueError(f"unknown distillation kind {kind!r} (forward_kl, reverse_kl or jsd)")
    b = KIND_BETA.get(kind, beta)
    keep = targets_BT.reshape(-1) != IGNORE
    n = int(keep.sum())
    if n == 0:
        return (h_BTD.sum() + w_VD.sum()) * 0.0, 0
    h_ND, th_ND = _keep(h_BTD, keep), _keep(teacher_h_BTD, keep)
    vocab = min(num_real_vocab or w_VD.shape[0], w_VD.shape[0], teacher_w_VD.shape[0])
    if chunk_size is None:
        chunk_size = max(64, AUTO_CHUNK_BYTES // (4 * w_VD.shape[0]))
    total = h_ND.new_zeros((), dtype=torch.float32)
    for start in range(0, n, chunk_size):
        args = (h_ND[start : start + chunk_size], w_VD, th_ND[start : start + chunk_size], teacher_w_VD)
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss, *args, b, temperature, vocab, use_reentrant=False)
        else:
            total = total + _chunk_loss(*args, b, temperature, vocab)
    return total, n


def topk_distill_loss(
    h_BTD: torch.Tensor,
    w_VD: torch.Tensor,
    targets_BT: torch.Tensor,
    teacher_ids_NK: torch.Tensor,
    teacher_logprobs_NK: torch.Tensor,
    *,
    temperature: float = 1.0,
    num_real_vocab: int | None = None,
) -> tuple[torch.Tensor, int]:
    """Offline distillation from stored teacher top-k log-probabilities (rows = loss positions in order):
    sum_k p_t(k) (log p_t(k) - log p_s(k)), forward KL restricted to the teacher's top-k support, with
    p_t = exp(stored logprobs) as stored (not renormalised: the mass outside the top k contributes
    nothing) and log p_s the student's full-vocabulary log-softmax at `temperature`."""
    keep = targets_BT.reshape(-1) != IGNORE
    h_ND = _keep(h_BTD, keep)
    vocab = num_real_vocab or w_VD.shape[0]
    s_logp = ((h_ND @ w_VD.T).float()[:, :vocab] / temperature).log_softmax(-1)
    t_logp = teacher_logprobs_NK.float()
    loss = (t_logp.exp() * (t_logp - s_logp.gather(-1, teacher_ids_NK))).sum()
    return loss, int(keep.sum())
