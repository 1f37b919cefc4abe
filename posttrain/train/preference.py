"""Pair losses on per-document log-probabilities: DPO (sigmoid, cDPO, IPO) and the Bradley-Terry
reward-model loss, with TRL's definitions (trl 1.16 `DPOTrainer`, `RewardTrainer`).

`sequence_logprobs` turns a packed batch into one number per document (the sum, or mean, of its
labelled tokens' log-probabilities) without ever holding [tokens, vocab] logits: loss positions are
processed in chunks, and each chunk's logits are recomputed in backward (activation checkpointing per
chunk) instead of being kept, so memory is one chunk of logits at a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from posttrain.train.losses import AUTO_CHUNK_BYTES, IGNORE


def _chunk_logprobs(
    h_cD: torch.Tensor, w_VD: torch.Tensor, t_c: torch.Tensor, num_real_vocab: int
) -> torch.Tensor:
    logits_cV = (h_cD @ w_VD.T).float()
    if num_real_vocab < logits_cV.shape[-1]:
        logits_cV = logits_cV[:, :num_real_vocab]  # padded rows are not tokens: out of the softmax
    return logits_cV.gather(-1, t_c[:, None]).squeeze(-1) - logits_cV.logsumexp(-1)


def sequence_logprobs(
    h_BTD: torch.Tensor,
    w_VD: torch.Tensor,
    targets_BT: torch.Tensor,
    doc_index_BT: torch.Tensor,
    num_docs: int,
    *,
    chunk_size: int | None = None,
    num_real_vocab: int | None = None,
    average: bool = False,
) -> torch.Tensor:
    """[num_docs]: each document's summed (average=True: mean) log p(target) over its loss positions.

    doc_index_BT: the document of every position (-1 on padding). Exact gradients w.r.t. h and w (the
    chunks are checkpointed, i.e. recomputed in backward, not approximated)."""
    keep = targets_BT.reshape(-1) != IGNORE
    h_ND = h_BTD.reshape(-1, h_BTD.shape[-1])[keep]
    t_N = targets_BT.reshape(-1)[keep]
    d_N = doc_index_BT.reshape(-1)[keep]
    vocab = num_real_vocab if num_real_vocab is not None else w_VD.shape[0]
    if chunk_size is None:
        chunk_size = max(64, AUTO_CHUNK_BYTES // (4 * w_VD.shape[0]))
    parts = []
    for start in range(0, h_ND.shape[0], chunk_size):
        h_c, t_c = h_ND[start : start + chunk_size], t_N[start : start + chunk_size]
        if torch.is_grad_enabled():
            parts.append(checkpoint(_chunk_logprobs, h_c, w_VD, t_c, vocab, use_reentrant=False))
        else:
            parts.append(_chunk_logprobs(h_c, w_VD, t_c, vocab))
    logp_N = torch.cat(parts) if parts else h_BTD.new_zeros(0, dtype=torch.float32)
    out = torch.zeros(num_docs, dtype=torch.float32, device=h_BTD.device).index_add(0, d_N, logp_N)
    if average:
        counts = torch.zeros(num_docs, dtype=torch.float32, device=h_BTD.device)
        counts.index_add_(0, d_N, torch.ones_like(logp_N))
        out = out / counts.clamp(min=1.0)
    return out


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair losses, chosen rewards, rejected rewards); rewards = beta * (policy - reference), detached.

    sigmoid: -log sigmoid(beta * delta), delta = (pi_c - ref_c) - (pi_r - ref_r) (TRL's "sigmoid"); with
    label_smoothing = eps it is conservative DPO (cDPO): -(1 - eps) log sigmoid(beta delta) - eps log
    sigmoid(-beta delta), the form TRL < 1.0 used for its label_smoothing (1.16 keeps it for "aot").
    ipo: (delta - 1 / (2 beta))^2 on LENGTH-AVERAGED log-probabilities, as TRL 1.16 computes it (it divides
    each log-ratio by the completion's token count); callers pass averaged log-probabilities."""
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    delta = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = (
            -F.logsigmoid(beta * delta) * (1.0 - label_smoothing)
            - F.logsigmoid(-beta * delta) * label_smoothing
        )
    elif loss_type == "ipo":
        losses = (delta - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r} (sigmoid or ipo)")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def bradley_terry_loss(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    *,
    margin: torch.Tensor | None = None,
    center_rewards_coef: float = 0.0,
) -> torch.Tensor:
    """Per-pair -log sigmoid(r_c - r_r - margin) (+ coef * (r_c + r_r)^2 ... see below): TRL's RewardTrainer.

    TRL adds center_rewards_coefficient * mean((r_c + r_r)^2) to the batch mean; per pair that is
    coef * (r_c + r_r)^2, so the mean over pairs equals TRL's loss."""
    diff = r_chosen - r_rejected - (margin if margin is not None else 0.0)
    losses = -F.logsigmoid(diff)
    if center_rewards_coef:
        losses = losses + center_rewards_coef * (r_chosen + r_rejected) ** 2
    return losses
