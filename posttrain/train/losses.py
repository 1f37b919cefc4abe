"""Losses that never materialise [batch, seq, vocab] logits.

`chunked_cross_entropy` first drops every position whose target is ignored (prompt tokens, padding,
document ends), then applies the output weight to the remaining hidden states in chunks of
`chunk_size` rows. Each chunk is checkpointed, so neither the forward nor the backward pass holds
more than one [chunk, vocab] block of logits at a time. Padded vocabulary rows (the model's vocab
is padded to a multiple of 64; ids >= `num_real_vocab` are not tokens) are masked out of the
softmax. It returns the *sum* of token losses: the trainer divides by the number of loss-bearing
tokens of the whole optimizer step, which is what makes gradient accumulation exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE = -100


def _chunk_loss(
    h_ND: torch.Tensor, w_VD: torch.Tensor, t_N: torch.Tensor, num_real_vocab: int
) -> torch.Tensor:
    logits_NV = (h_ND @ w_VD.T).float()
    if num_real_vocab < logits_NV.shape[-1]:
        logits_NV[:, num_real_vocab:] = float("-inf")
    return F.cross_entropy(logits_NV, t_N, reduction="sum")


def chunked_cross_entropy(
    h_BTD: torch.Tensor,
    w_VD: torch.Tensor,
    targets_BT: torch.Tensor,
    *,
    chunk_size: int = 1024,
    num_real_vocab: int | None = None,
) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over loss-bearing positions, and their count."""
    keep = targets_BT.reshape(-1) != IGNORE
    num_tokens = int(keep.sum())
    if num_tokens == 0:
        # Keep the graph connected so backward() works on ranks/micro-batches without loss tokens.
        return (h_BTD.sum() * 0.0) + (w_VD.sum() * 0.0), 0
    h_ND = h_BTD.reshape(-1, h_BTD.shape[-1])[keep]
    t_N = targets_BT.reshape(-1)[keep]
    vocab = num_real_vocab if num_real_vocab is not None else w_VD.shape[0]
    total = h_ND.new_zeros((), dtype=torch.float32)
    for start in range(0, num_tokens, chunk_size):
        h_chunk, t_chunk = h_ND[start : start + chunk_size], t_N[start : start + chunk_size]
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss, h_chunk, w_VD, t_chunk, vocab, use_reentrant=False)
        else:
            total = total + _chunk_loss(h_chunk, w_VD, t_chunk, vocab)
    return total, num_tokens


def naive_cross_entropy(
    h_BTD: torch.Tensor, w_VD: torch.Tensor, targets_BT: torch.Tensor, num_real_vocab: int | None = None
) -> tuple[torch.Tensor, int]:
    """Reference: full logits then cross-entropy (for tests and the memory benchmark)."""
    logits = (h_BTD @ w_VD.T).float()
    if num_real_vocab is not None and num_real_vocab < logits.shape[-1]:
        logits[..., num_real_vocab:] = float("-inf")
    loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets_BT.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )
    return loss, int((targets_BT != IGNORE).sum())
