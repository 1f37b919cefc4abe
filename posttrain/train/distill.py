"""Distillation losses on next-token distributions that never materialise [tokens, vocab] logits.

`distill_loss` distils from an online teacher (its final hidden states and output matrix, computed
under no_grad). The per-position divergence is TRL GKD's `generalized_jsd_loss`
(trl 1.16, `trl.experimental.gkd.GKDTrainer.generalized_jsd_loss`), with both logits divided by a
temperature first. Writing p = student and q = teacher probabilities at that temperature, TRL's beta
means (F.kl_div(input, target, log_target=True) is target * (log target - input), i.e. KL(target || input)):

  kind         TRL beta   divergence per position
  forward_kl   0          KL(q || p) = sum q (log q - log p)   mass-covering: the student spreads over
                                                              everything the teacher finds likely
  reverse_kl   1          KL(p || q) = sum p (log p - log q)   mode-seeking
  jsd          beta       beta KL(q || m) + (1 - beta) KL(p || m),  m = beta q + (1 - beta) p

Eq. (1) of the GKD paper (arXiv 2306.13649). As in TRL, beta = 0 and beta = 1 are special-cased to the
two plain KLs, not taken as limits of the JSD formula (which would be 0 at both ends), so `kind="jsd"`
with beta 0 or 1 is forward or reverse KL exactly as TRL's function would compute it. No T**2 factor
(Hinton et al.) is applied, as in TRL: multiply the loss yourself if you want it. (TRL's GKDTrainer
itself calls the function at temperature 1; its `temperature` argument only drives generation.)

`topk_distill_loss` distils offline from stored teacher top-k log-probabilities.

Both losses are fused linear + divergence, like `chunked_cross_entropy` in losses.py: positions whose
target is ignored are dropped first, the rest are taken in chunks of rows, and each chunk's forward
computes its logits, its loss AND the analytic gradient with respect to the student logits, which is
immediately turned into rows of d/dh and accumulated into one fp32 d/dw buffer. Backward only scales
those two buffers. So there is never more than a handful of [chunk, vocab] blocks alive, no
recomputation, no per-chunk [vocab, hidden] gradient temporary, and the weight gradient is summed in
fp32 whatever the weight dtype (which a per-chunk torch.utils.checkpoint would not give). The price is
that the returned loss supports exactly one backward (no double backward), as with the cross-entropy.

Only the first `num_real_vocab` rows of each output matrix are used (the model's vocabulary is padded to
a multiple of 64; ids beyond are not tokens): the padded columns are never computed, so they cannot
influence the loss, and their weight-gradient rows are zero. The returned loss is the SUM over loss
positions; the trainer divides by the loss-token count of the whole step. That equals TRL's
reduction="batchmean" with labels (sum over unmasked positions / their count, despite the name) or its
num_items_in_batch path (sum / global token count).

Gradients (x = logits / T, s = log_softmax(x) of the student, t = that of the teacher, p = exp(s),
q = exp(t), all per row; d/dlogits = d/dx / T; derived from dL/dx = g - p * sum(g) with g = dL/ds):
  forward KL   p - q
  reverse KL   p * (s - t - KL(p || q))
  jsd          (1 - beta) * p * (s - log m - KL(p || m))   (the teacher-side term's gradient cancels)
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch

from posttrain.data.labels import IGNORE
from posttrain.errors import ConfigError
from posttrain.train.losses import AUTO_CHUNK_BYTES

DistillKind = Literal["forward_kl", "reverse_kl", "jsd"]
KIND_BETA: dict[str, float] = {"forward_kl": 0.0, "reverse_kl": 1.0}  # "jsd" uses the given beta

# chunk_fn(start, end, student log-probs of rows start:end [rows, vocab] fp32 (consumed), want_grad)
#   -> (summed loss of the rows, d loss / d(logits / T) [rows, vocab] fp32 or None)
ChunkFn = Callable[[int, int, torch.Tensor, bool], tuple[torch.Tensor, torch.Tensor | None]]


def _logprobs(h_cD: torch.Tensor, w_vD: torch.Tensor, temperature: float) -> torch.Tensor:
    """log_softmax(h @ w^T / T) in fp32: one fused kernel, two [chunk, vocab] blocks at its peak."""
    x_cV = (h_cD @ w_vD.T).float()
    if temperature != 1.0:
        x_cV.div_(temperature)
    return torch.log_softmax(x_cV, dim=-1)


def _divergence_and_grad(
    s_cV: torch.Tensor, t_cV: torch.Tensor, beta: float, want_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Summed generalised JSD of the rows (TRL's definition, see the module docstring) and its gradient
    with respect to the scaled student logits x = logits / T.

    Consumes both log-probability blocks (pass the teacher's without keeping a reference): every
    product is formed in place in a block that is no longer needed, so at most three (KLs) or four
    (JSD) [chunk, vocab] blocks are alive, the student's reused as the gradient."""
    if beta == 0.0:  # forward KL(q || p)
        q_cV = t_cV.exp()
        loss = t_cV.sub_(s_cV).mul_(q_cV).sum()  # sum q (t - s)
        del t_cV
        return loss, (s_cV.exp_().sub_(q_cV) if want_grad else None)  # p - q
    if beta == 1.0:  # reverse KL(p || q)
        p_cV = s_cV.exp()
        pd_cV = s_cV.sub_(t_cV).mul_(p_cV)  # p (s - t)
        del t_cV
        kl_c = pd_cV.sum(-1)
        # p (s - t - KL) = p (s - t) - p KL
        return kl_c.sum(), (pd_cV.sub_(p_cV.mul_(kl_c[:, None])) if want_grad else None)
    # log m = log(beta q + (1 - beta) p), elementwise: TRL's logsumexp over the stacked pair, without the
    # stack. Never log(exp + exp): both probabilities can underflow where m's log is still finite.
    log_m_cV = s_cV.add(math.log1p(-beta))
    q_cV = t_cV.add(math.log(beta))
    torch.logaddexp(log_m_cV, q_cV, out=log_m_cV)
    torch.exp(t_cV, out=q_cV)
    kl_t = t_cV.sub_(log_m_cV).mul_(q_cV).sum()  # KL(q || m), summed over rows
    del t_cV, q_cV
    p_cV = s_cV.exp()
    pd_cV = s_cV.sub_(log_m_cV).mul_(p_cV)  # p (s - log m)
    del log_m_cV
    kl_s_c = pd_cV.sum(-1)  # KL(p || m) per row
    loss = beta * kl_t + (1.0 - beta) * kl_s_c.sum()
    if not want_grad:
        return loss, None
    # (1 - beta) p (s - log m - KL(p || m))
    return loss, pd_cV.sub_(p_cV.mul_(kl_s_c[:, None])).mul_(1.0 - beta)


class _FusedLinearDivergence(torch.autograd.Function):
    """sum over rows of a divergence of softmax(h @ w^T / T), with d/dh and d/dw computed in forward."""

    @staticmethod
    def forward(ctx, h_ND, w_VD, chunk_fn: ChunkFn, chunk_size: int, vocab: int, temperature: float):  # noqa: ANN001
        grad_h, grad_w, total = _fused_forward(
            h_ND,
            w_VD,
            chunk_fn,
            chunk_size,
            vocab,
            temperature,
            want_h=ctx.needs_input_grad[0],
            want_w=ctx.needs_input_grad[1],  # False for a frozen output matrix (LoRA): skips its matmul
        )
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
        return grad_h, grad_w, None, None, None, None


def _fused_forward(
    h_ND: torch.Tensor,
    w_VD: torch.Tensor,
    chunk_fn: ChunkFn,
    chunk_size: int,
    vocab: int,
    temperature: float,
    *,
    want_h: bool,
    want_w: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """The chunk loop shared by both losses: chunk_fn gives each chunk's loss and d/dx (x = logits / T)."""
    w_vD = w_VD[:vocab]  # padded vocabulary rows are never multiplied
    grad_h = torch.empty_like(h_ND) if want_h else None
    # fp32 accumulation whatever the weight dtype: bf16 sums over thousands of tokens lose bits.
    grad_w = torch.zeros(w_VD.shape, dtype=torch.float32, device=w_VD.device) if want_w else None
    total = torch.zeros((), dtype=torch.float32, device=h_ND.device)
    for start in range(0, h_ND.shape[0], chunk_size):
        end = min(start + chunk_size, h_ND.shape[0])
        h_cD = h_ND[start:end]
        loss, g_cV = chunk_fn(start, end, _logprobs(h_cD, w_vD, temperature), want_h or want_w)
        total += loss
        if g_cV is None:
            continue
        if temperature != 1.0:
            g_cV.div_(temperature)  # d/dlogits = d/dx / T
        if want_h:
            grad_h[start:end] = (g_cV.to(w_vD.dtype) @ w_vD).to(h_ND.dtype)
        if want_w:
            grad_w[:vocab].addmm_(g_cV.T, h_cD.float())
        del g_cV
    return grad_h, grad_w, total


def _auto_chunk(chunk_size: int | None, vocab: int) -> int:
    """Rows per chunk: given, or ~AUTO_CHUNK_BYTES of fp32 logits per [chunk, vocab] block."""
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        return chunk_size
    return max(64, AUTO_CHUNK_BYTES // (4 * vocab))


def _run(
    h_BTD: torch.Tensor,
    w_VD: torch.Tensor,
    keep_N: torch.Tensor,
    chunk_fn: ChunkFn,
    chunk_size: int,
    vocab: int,
    temperature: float,
) -> torch.Tensor:
    h_ND = h_BTD.reshape(-1, h_BTD.shape[-1])[keep_N]
    if not torch.is_grad_enabled() or not (h_ND.requires_grad or w_VD.requires_grad):
        with torch.no_grad():
            return _fused_forward(
                h_ND, w_VD, chunk_fn, chunk_size, vocab, temperature, want_h=False, want_w=False
            )[2]
    return _FusedLinearDivergence.apply(h_ND, w_VD, chunk_fn, chunk_size, vocab, temperature)


def distill_loss(
    h_BTD: torch.Tensor,
    w_VD: torch.Tensor,
    teacher_h_BTD: torch.Tensor,
    teacher_w_VD: torch.Tensor,
    targets_BT: torch.Tensor,
    *,
    kind: DistillKind = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    num_real_vocab: int | None = None,
) -> tuple[torch.Tensor, int]:
    """Sum over loss positions (target != IGNORE) of the divergence between student and teacher
    next-token distributions, and the number of those positions. See the module docstring for the
    definitions (TRL GKD's generalized_jsd_loss; `kind` picks TRL beta 0 or 1, "jsd" uses `beta`).

    teacher_h_BTD / teacher_w_VD: the teacher's final hidden states at the same positions and its output
    matrix; its hidden size may differ, it gets no gradient. num_real_vocab: the real vocabulary; both
    matrices must have at least that many rows (None: all rows of `w_VD`, and the teacher must match).
    chunk_size: rows per chunk, None for ~AUTO_CHUNK_BYTES of fp32 logits per block. The returned loss
    supports one backward (its gradients are computed in forward)."""
    if kind not in ("forward_kl", "reverse_kl", "jsd"):
        raise ValueError(f"unknown distillation kind {kind!r} (forward_kl, reverse_kl or jsd)")
    b = KIND_BETA.get(kind, float(beta))
    if not 0.0 <= b <= 1.0:
        raise ValueError(f"jsd beta must lie in [0, 1], got {beta}")
    if temperature <= 0.0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if teacher_h_BTD.shape[:-1] != h_BTD.shape[:-1]:
        raise ValueError(f"teacher positions {tuple(teacher_h_BTD.shape[:-1])} != {tuple(h_BTD.shape[:-1])}")
    if num_real_vocab is None and teacher_w_VD.shape[0] != w_VD.shape[0]:
        raise ValueError(
            f"student ({w_VD.shape[0]}) and teacher ({teacher_w_VD.shape[0]}) vocabulary rows differ: "
            "pass num_real_vocab"
        )
    vocab = num_real_vocab if num_real_vocab is not None else w_VD.shape[0]
    if vocab > min(w_VD.shape[0], teacher_w_VD.shape[0]):
        raise ValueError(f"num_real_vocab {vocab} exceeds an output matrix's rows")

    keep_N = targets_BT.reshape(-1) != IGNORE
    num_tokens = int(keep_N.sum())
    if num_tokens == 0:
        # Keep the graph connected so backward() works on ranks/micro-batches without loss tokens.
        return (h_BTD.sum() * 0.0) + (w_VD.sum() * 0.0), 0
    th_ND = teacher_h_BTD.detach().reshape(-1, teacher_h_BTD.shape[-1])[keep_N]
    tw_vD = teacher_w_VD.detach()[:vocab]

    def chunk_fn(start: int, end: int, s_cV: torch.Tensor, want_grad: bool):
        with torch.no_grad():  # the teacher's block is passed without a name, so it is freed early
            return _divergence_and_grad(s_cV, _logprobs(th_ND[start:end], tw_vD, temperature), b, want_grad)

    return _run(h_BTD, w_VD, keep_N, chunk_fn, _auto_chunk(chunk_size, vocab), vocab, temperature), num_tokens


def topk_distill_loss(
    h_BTD: torch.Tensor,
    w_VD: torch.Tensor,
    targets_BT: torch.Tensor,
    teacher_ids_NK: torch.Tensor,
    teacher_logprobs_NK: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    num_real_vocab: int | None = None,
) -> tuple[torch.Tensor, int]:
    """Offline distillation from stored teacher top-k log-probabilities: the sum over loss positions of
    sum_k p_t(k) (log p_t(k) - log p_s(k)), and the number of positions.

    Row n of teacher_ids_NK / teacher_logprobs_NK belongs to the n-th loss position (target != IGNORE)
    in row-major [B, T] order. log p_s is the student's full-vocabulary log-softmax of logits / T; the
    stored log-probabilities are used as they are (produce them at the same temperature). An entry with
    log-probability -inf contributes nothing (a way to store fewer than k candidates for a row; its id
    must still be a valid token, e.g. 0).

    p_t = exp(stored) is NOT renormalised over the k ids. Writing Q = sum_k p_t(k) <= 1 for the stored
    mass and p' = p_t / Q, the loss is Q * sum_k p'(k) (log p'(k) - log p_s(k)) + Q log Q (the sum is
    the renormalised loss, >= 0, zero when p_s equals p' on the ids), and the gradient w.r.t. the logits is (Q p_s - p_t) / T = Q * (the renormalised loss's gradient): the student
    is still pulled towards p' on the top k (and away from the tail), but each position is weighted by
    how much teacher mass its top k holds, so confident positions count more. Note the value is not a
    divergence: it can be negative (down to Q log Q), so do not read it as a KL. Alternatives: renormalise
    (p' instead of p_t: a true KL of the truncated teacher, every position weighted equally); add a tail
    bucket (a (k+1)-th class with teacher mass 1 - Q and student mass 1 - sum_k p_s(k): a true KL that
    also matches how much mass the student leaves outside the top k); or renormalise the student over
    the k ids too (ignores the tail entirely, the cheapest, but the student's tail is then unconstrained).
    """
    if temperature <= 0.0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    keep_N = targets_BT.reshape(-1) != IGNORE
    num_tokens = int(keep_N.sum())
    if teacher_ids_NK.shape != teacher_logprobs_NK.shape or teacher_ids_NK.dim() != 2:
        raise ValueError(
            f"teacher ids {tuple(teacher_ids_NK.shape)} and logprobs {tuple(teacher_logprobs_NK.shape)} "
            "must both be [loss positions, k]"
        )
    if teacher_ids_NK.shape[0] != num_tokens:
        raise ValueError(f"{teacher_ids_NK.shape[0]} teacher rows for {num_tokens} loss positions")
    if num_tokens == 0:
        return (h_BTD.sum() * 0.0) + (w_VD.sum() * 0.0), 0
    vocab = num_real_vocab if num_real_vocab is not None else w_VD.shape[0]
    if vocab > w_VD.shape[0]:
        raise ValueError(f"num_real_vocab {vocab} exceeds the output matrix's {w_VD.shape[0]} rows")
    ids_NK = teacher_ids_NK.to(device=h_BTD.device, dtype=torch.long)
    if int(ids_NK.min()) < 0 or int(ids_NK.max()) >= vocab:  # a bad id would be a device-side assert on GPU
        raise ValueError(
            f"teacher ids must lie in [0, {vocab}), got [{int(ids_NK.min())}, {int(ids_NK.max())}]"
        )
    t_NK = teacher_logprobs_NK.detach().to(device=h_BTD.device, dtype=torch.float32)

    def chunk_fn(start: int, end: int, s_cV: torch.Tensor, want_grad: bool):
        ids_cK, t_cK = ids_NK[start:end], t_NK[start:end]
        q_cK = t_cK.exp()
        present = q_cK > 0  # -inf entries: 0 * (-inf - s) would be nan
        loss = torch.where(present, q_cK * (t_cK - s_cV.gather(-1, ids_cK)), 0.0).sum()
        if not want_grad:
            return loss, None
        # d/dx = Q p_s - scatter(p_t): sum_k p_t(k) d(-s_k)/dx = -onehot(k) p_t(k) + p_s p_t(k).
        g_cV = s_cV.exp_().mul_(q_cK.sum(-1, keepdim=True))
        return loss, g_cV.scatter_add_(-1, ids_cK, -q_cK)

    return _run(h_BTD, w_VD, keep_N, chunk_fn, _auto_chunk(chunk_size, vocab), vocab, temperature), num_tokens


def check_teacher_tokenizer(teacher_path: str | None, tokenizer) -> None:
    """The teacher must share the student's vocabulary: same token -> id map where the teacher ships a
    tokenizer, else a vocabulary at least as large as the student's tokenizer."""
    if teacher_path is None:
        return
    path = Path(teacher_path)
    if (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        theirs = AutoTokenizer.from_pretrained(str(path)).get_vocab()
        ours = tokenizer.hf.get_vocab()
        differ = sorted(set(theirs.items()) ^ set(ours.items()))
        if differ:
            raise ConfigError(
                f"distill.teacher: the tokenizer at {path} differs from tokenizer.path ({len(theirs)} vs "
                f"{len(ours)} tokens, {len(differ)} (token, id) entries differ, e.g. {differ[:3]}); "
                "distillation needs one vocabulary"
            )
        return
    vocab = json.loads((path / "config.json").read_text()).get("vocab_size", 0)
    if vocab < tokenizer.vocab_size:
        raise ConfigError(
            f"distill.teacher: {path} has {vocab} vocabulary rows, fewer than the tokenizer's "
            f"{tokenizer.vocab_size} tokens"
        )
