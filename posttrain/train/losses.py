"""Losses that never materialise [batch, seq, vocab] logits.

`chunked_cross_entropy` first drops every position whose target is ignored (prompt tokens, padding,
document ends), then applies the output weight to the remaining hidden states in chunks of
`chunk_size` rows. It is a fused linear + cross-entropy (the Liger / Apple "cut" idea, in plain torch):
the forward pass computes each chunk's logits, its loss, AND its gradients at once (softmax minus
one-hot, in place on the chunk's logits), writes the hidden-state gradient rows and accumulates the
weight gradient into one preallocated buffer with `addmm_`. Backward only scales the two stored
gradients by the incoming grad. So at any time there is one [chunk, vocab] block, no recomputation,
and no per-chunk [vocab, hidden] temporary (which, at hidden 1024 and vocab 152k, is 600 MB a chunk).
Padded vocabulary rows (the model's vocab is padded to a multiple of 64; ids >= `num_real_vocab`
are not tokens) are masked out of the softmax. It returns the *sum* of token losses: the trainer
divides by the number of loss-bearing tokens of the whole optimizer step, which is what makes
gradient accumulation exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from posttrain.data.labels import IGNORE

AUTO_CHUNK_BYTES = 64 * 2**20  # fp32 logits per chunk when chunk_size is None (~110 rows at vocab 152k)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """sum_n CE(h_n @ w^T, t_n) with both gradients computed in forward, chunk by chunk."""

    @staticmethod
    def forward(ctx, h_ND, w_VD, t_N, chunk_size: int, num_real_vocab: int):  # noqa: ANN001
        want_h = ctx.needs_input_grad[0]
        want_w = ctx.needs_input_grad[1]  # False for a frozen output matrix (LoRA): skips its matmul
        grad_h = torch.empty_like(h_ND) if want_h else None
        # fp32 accumulation whatever the weight dtype: bf16 sums over thousands of tokens lose bits.
        grad_w = torch.zeros(w_VD.shape, dtype=torch.float32, device=w_VD.device) if want_w else None
        total = torch.zeros((), dtype=torch.float32, device=h_ND.device)
        for start in range(0, h_ND.shape[0], chunk_size):
            h_cD, t_c = h_ND[start : start + chunk_size], t_N[start : start + chunk_size]
            logits_cV = (h_cD @ w_VD.T).float()
            if num_real_vocab < logits_cV.shape[-1]:
                logits_cV[:, num_real_vocab:] = float("-inf")
            # One [chunk, V] buffer, transformed in place: shift by the row max, exp, normalise.
            rows = torch.arange(t_c.shape[0], device=t_c.device)
            max_c = logits_cV.max(dim=-1).values
            logits_cV.sub_(max_c[:, None])
            target_c = logits_cV[rows, t_c]  # shifted target logits (a copy: [chunk])
            sum_c = logits_cV.exp_().sum(dim=-1)
            total += (sum_c.log() - target_c).sum()  # CE = log sum exp(shifted) - shifted target
            if want_h or want_w:
                logits_cV.div_(sum_c[:, None])  # softmax, in the same buffer
                logits_cV[rows, t_c] -= 1.0  # d CE / d logits = softmax - one_hot
                if want_h:
                    grad_h[start : start + chunk_size] = (logits_cV.to(w_VD.dtype) @ w_VD).to(h_ND.dtype)
                if want_w:
                    grad_w.addmm_(logits_cV.T, h_cD.float())
            # Freed before the next chunk's buffer is allocated: a second name would keep it alive
            # through the next matmul and double the working memory.
            del logits_cV
        ctx.save_for_backward(grad_h, grad_w)
        ctx.w_dtype = w_VD.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001
        grad_h, grad_w = ctx.saved_tensors
        # In place: the buffers are ours, and the trainer's backward runs once per forward.
        if grad_h is not None:
            grad_h = grad_h.mul_(grad_out.to(grad_h.dtype))
        if grad_w is not None:
            grad_w = grad_w.mul_(grad_out).to(ctx.w_dtype)
        return grad_h, grad_w, None, None, None


def chunked_cross_entropy(
    h_BTD: torch.Tensor,
    w_VD: torch.Tensor,
    targets_BT: torch.Tensor,
    *,
    chunk_size: int | None = None,
    num_real_vocab: int | None = None,
) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over loss-bearing positions, and their count.

    chunk_size: rows per chunk; None sizes chunks to ~AUTO_CHUNK_BYTES of fp32 logits (110 rows at a
    152k vocabulary, the whole batch at a small one). The returned loss supports one backward (its
    gradients were computed in forward)."""
    if chunk_size is None:
        chunk_size = max(64, AUTO_CHUNK_BYTES // (4 * w_VD.shape[0]))
    keep = targets_BT.reshape(-1) != IGNORE
    num_tokens = int(keep.sum())
    if num_tokens == 0:
        # Keep the graph connected so backward() works on ranks/micro-batches without loss tokens.
        return (h_BTD.sum() * 0.0) + (w_VD.sum() * 0.0), 0
    h_ND = h_BTD.reshape(-1, h_BTD.shape[-1])[keep]
    t_N = targets_BT.reshape(-1)[keep]
    vocab = num_real_vocab if num_real_vocab is not None else w_VD.shape[0]
    if not torch.is_grad_enabled():
        with torch.no_grad():
            return _FusedLinearCrossEntropy.forward(
                _NoGradCtx(), h_ND, w_VD, t_N, chunk_size, vocab
            ), num_tokens
    return _FusedLinearCrossEntropy.apply(h_ND, w_VD, t_N, chunk_size, vocab), num_tokens


class _NoGradCtx:
    """Stand-in autograd context for evaluation: no input needs a gradient."""

    needs_input_grad = (False, False, False, False, False)

    def save_for_backward(self, *tensors) -> None:  # noqa: ANN002
        pass


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
