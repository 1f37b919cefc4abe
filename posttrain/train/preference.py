"""Pair losses on per-document log-probabilities: DPO (sigmoid, cDPO, IPO) and the Bradley-Terry reward
loss, with TRL 1.16's definitions (`DPOTrainer._compute_loss`, `RewardTrainer.compute_loss`).

`sequence_logprobs` turns a packed batch into one number per document: the sum (or mean) of log p(target)
over the document's loss-bearing positions. Like `losses.chunked_cross_entropy` it never materialises
[tokens, vocab] logits: it keeps only loss positions and applies the output matrix in chunks of rows. It
cannot reuse that function's trick of computing gradients in forward, though: its output is a vector (one
log-probability per token), and how much each token's gradient counts (DPO weights a pair by
sigmoid(-beta * delta)) is only known once the pair loss is computed. So backward recomputes each chunk's
logits from the saved hidden rows and the per-row log-sum-exp instead of storing them: one extra matmul
per chunk, and memory stays at one [chunk, vocab] block whatever the batch.

Padded vocabulary rows (ids >= `num_real_vocab`: the vocabulary is padded to a multiple of 64) are not
tokens and are excluded from every softmax, exactly as in `losses.py`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from posttrain.data.labels import IGNORE
from posttrain.train.losses import AUTO_CHUNK_BYTES

DPO_LOSS_TYPES = ("sigmoid", "ipo")


def _chunk_logits(h_cD: torch.Tensor, w_VD: torch.Tensor, num_real_vocab: int) -> torch.Tensor:
    """fp32 logits of one chunk, padded vocabulary columns at -inf (out of the softmax)."""
    logits_cV = (h_cD @ w_VD.T).float()
    if num_real_vocab < logits_cV.shape[-1]:
        logits_cV[:, num_real_vocab:] = float("-inf")
    return logits_cV


class _ChunkedTokenLogprobs(torch.autograd.Function):
    """logp_N[n] = log softmax(h_n @ w^T)[t_n], chunk by chunk; backward recomputes each chunk's logits.

    Saved for backward: the loss rows of h ([N, D], small next to [N, V] logits), the targets and one fp32
    log-sum-exp per row, so backward gets the softmax as exp(logits - lse) without a second reduction over
    the vocabulary."""

    @staticmethod
    def forward(ctx, h_ND, w_VD, t_N, chunk_size: int, num_real_vocab: int):  # noqa: ANN001
        logp_N = torch.empty(h_ND.shape[0], dtype=torch.float32, device=h_ND.device)
        lse_N = torch.empty_like(logp_N)
        for start in range(0, h_ND.shape[0], chunk_size):
            end = start + chunk_size
            logits_cV = _chunk_logits(h_ND[start:end], w_VD, num_real_vocab)
            lse_c = torch.logsumexp(logits_cV, dim=-1)
            lse_N[start:end] = lse_c
            logp_N[start:end] = logits_cV.gather(-1, t_N[start:end, None]).squeeze(-1) - lse_c
            del logits_cV
        ctx.save_for_backward(h_ND, w_VD, t_N, lse_N)
        ctx.chunk_size, ctx.num_real_vocab = chunk_size, num_real_vocab
        return logp_N

    @staticmethod
    def backward(ctx, grad_N):  # noqa: ANN001
        h_ND, w_VD, t_N, lse_N = ctx.saved_tensors
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (want_h or want_w):
            return None, None, None, None, None
        grad_h = torch.empty_like(h_ND) if want_h else None
        # fp32 accumulation whatever the weight dtype (bf16 sums over thousands of tokens lose bits).
        grad_w = torch.zeros(w_VD.shape, dtype=torch.float32, device=w_VD.device) if want_w else None
        grad_N = grad_N.float()
        for start in range(0, h_ND.shape[0], ctx.chunk_size):
            end = start + ctx.chunk_size
            h_cD, t_c, g_c = h_ND[start:end], t_N[start:end], grad_N[start:end]
            # d logp / d logits = one_hot(t) - softmax, scaled by the incoming gradient; in place on the
            # recomputed chunk so there is still one [chunk, V] buffer. Padded columns: exp(-inf) = 0.
            dlogits_cV = _chunk_logits(h_cD, w_VD, ctx.num_real_vocab)
            dlogits_cV.sub_(lse_N[start:end, None]).exp_().mul_(-g_c[:, None])
            rows = torch.arange(t_c.shape[0], device=t_c.device)
            dlogits_cV[rows, t_c] += g_c
            if want_h:
                grad_h[start:end] = (dlogits_cV.to(w_VD.dtype) @ w_VD).to(h_ND.dtype)
            if want_w:
                grad_w.addmm_(dlogits_cV.T, h_cD.float())
            del dlogits_cV
        return grad_h, None if grad_w is None else grad_w.to(w_VD.dtype), None, None, None


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
    """[num_docs] fp32: each document's summed (average=True: mean) log p(target) over its loss positions.

    targets_BT: the next token at each position, IGNORE (-100) where there is no loss (prompt, padding,
    document ends). doc_index_BT: each position's global document index in the batch (0..num_docs-1; -1 on
    padding); every loss position must belong to a document. A document without loss positions gets 0.
    chunk_size: loss positions per chunk; None sizes chunks to ~AUTO_CHUNK_BYTES of fp32 logits, as
    `chunked_cross_entropy` does.

    The gradient w.r.t. h and w is EXACT, not an approximation (tests/parity/test_preference_losses.py
    compares it with autograd through full logits): backward recomputes each chunk's logits from the same
    inputs, so only summation order differs. Unlike `chunked_cross_entropy`, the result supports repeated
    backward passes (retain_graph), since nothing is consumed in place."""
    if chunk_size is None:
        chunk_size = max(64, AUTO_CHUNK_BYTES // (4 * w_VD.shape[0]))
    keep_N = targets_BT.reshape(-1) != IGNORE
    out = torch.zeros(num_docs, dtype=torch.float32, device=h_BTD.device)
    num_tokens = int(keep_N.sum())
    if num_tokens == 0:
        # Keep the graph connected so backward() works on micro-batches without loss tokens.
        return out + (h_BTD.sum() * 0.0 + w_VD.sum() * 0.0).float()
    h_ND = h_BTD.reshape(-1, h_BTD.shape[-1])[keep_N]
    t_N = targets_BT.reshape(-1)[keep_N]
    d_N = doc_index_BT.reshape(-1)[keep_N].long()
    if int(d_N.min()) < 0 or int(d_N.max()) >= num_docs:
        raise ValueError(f"a loss position has a document index outside [0, {num_docs}) (padding is -1)")
    vocab = num_real_vocab if num_real_vocab is not None else w_VD.shape[0]
    logp_N = _ChunkedTokenLogprobs.apply(h_ND, w_VD, t_N, chunk_size, vocab)
    out = out.index_add(0, d_N, logp_N)
    if average:
        counts = torch.bincount(d_N, minlength=num_docs).to(torch.float32)
        out = out / counts.clamp(min=1.0)
    return out


def dpo_loss(
    policy_chosen_P: torch.Tensor,
    policy_rejected_P: torch.Tensor,
    ref_chosen_P: torch.Tensor,
    ref_rejected_P: torch.Tensor,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair losses, chosen rewards, rejected rewards), each [P]; the mean over pairs is TRL's loss.

    With delta = (pi_c - ref_c) - (pi_r - ref_r), the log-ratio margin of a pair:

    sigmoid: -log sigmoid(beta * delta), TRL's `loss_type="sigmoid"` (standard DPO).
    label_smoothing = eps > 0 makes it conservative DPO (cDPO, labels flipped with probability eps):
    -(1 - eps) log sigmoid(beta delta) - eps log sigmoid(-beta delta). NOTE: TRL 1.16's "sigmoid" IGNORES
    label_smoothing (it only feeds "robust", "exo_pair" and "aot"); this is the formula TRL < 1.0 used for
    sigmoid + label_smoothing, which 1.16 still applies inside "aot" (to sorted margins).
    ipo: (delta - 1 / (2 beta))^2. TRL 1.16 divides each log-ratio by its completion's token count before
    taking delta (length-normalised IPO, "confirmed with the IPO authors"), so callers must pass
    LENGTH-AVERAGED log-probabilities (`sequence_logprobs(..., average=True)`) for policy AND reference:
    avg(pi) - avg(ref) = (pi - ref) / n is TRL's per-completion score.

    Rewards are beta * (policy - reference), detached, as TRL logs them. For IPO they are then per-token
    (from the averaged log-probabilities), whereas TRL logs them from summed ones."""
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r} (one of {', '.join(DPO_LOSS_TYPES)})")
    chosen_logratios = policy_chosen_P - ref_chosen_P
    rejected_logratios = policy_rejected_P - ref_rejected_P
    delta = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * delta)
        if label_smoothing:
            losses = losses * (1.0 - label_smoothing) - F.logsigmoid(-beta * delta) * label_smoothing
    else:
        losses = (delta - 1.0 / (2.0 * beta)) ** 2
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def bradley_terry_loss(
    r_chosen_P: torch.Tensor,
    r_rejected_P: torch.Tensor,
    *,
    margin: torch.Tensor | None = None,
    center_rewards_coef: float = 0.0,
) -> torch.Tensor:
    """Per-pair reward-model loss [P]; its mean over pairs is TRL 1.16's `RewardTrainer.compute_loss`.

    -log sigmoid(r_c - r_r - margin), plus center_rewards_coef * (r_c + r_r)^2. TRL adds
    coef * mean((r_c + r_r)^2) to the batch-mean loss; written per pair, the mean over pairs is the same
    number, and per-pair losses are what lets the trainer normalise by pairs over a whole optimizer step
    (gradient accumulation and data parallelism stay exact). The centring term pulls each pair's rewards
    towards summing to zero (Eisenstein et al. 2023), so rewards stay comparable across prompts."""
    diff_P = r_chosen_P - r_rejected_P
    if margin is not None:
        diff_P = diff_P - margin
    losses = -F.logsigmoid(diff_P)
    if center_rewards_coef:
        losses = losses + center_rewards_coef * (r_chosen_P + r_rejected_P) ** 2
    return losses


def count_pairs(batch: dict) -> int:
    """Loss units of pair losses: chosen documents in the micro-batch."""
    return int((batch["doc_roles"] == 0).sum())
