"""GRPO on packed rows: group-normalised advantages, the clipped surrogate with separate low and high
bounds, an optional KL to the reference (k1 or k3), truncated importance-sampling correction for the
rollout engine's logprobs, and three ways to aggregate token losses.

Episodes (prompt + the policy's tokens, plus any observation tokens of a multi-turn environment) are
packed into rows like every other recipe's documents (`collate_episodes`). Per-token quantities ride in
the batch aligned with `targets`: position j of a row carries the values of token j + 1, the token it
predicts. A token the policy did not generate (prompt, observations, padding) has target -100 and bears
no loss.

Aggregation (`rl.loss_aggregation`), in TRL 1.16's terms (`GRPOTrainer._compute_loss`):

  token     sum of token losses / completion tokens of the whole step       (TRL "dapo", DAPO)
  sequence  mean over sequences of each sequence's mean token loss          (TRL "grpo")
  constant  sum of token losses / (sequences x max_new_tokens)              (TRL "dr_grpo", Dr. GRPO)

Each is a sum of weighted token losses divided by loss units that the trainer counts over the whole
optimizer step before any backward: token weight 1 and units = tokens; weight 1 / len(sequence) and
units = sequences; weight 1 / max_new_tokens and units = sequences. So gradient accumulation and data
parallelism stay exact, as for SFT (posttrain/train/trainer.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from posttrain.data.labels import IGNORE
from posttrain.data.packing import BestFitPacker
from posttrain.data.samples import Sample
from posttrain.rl.types import Episode
from posttrain.train.losses import AUTO_CHUNK_BYTES
from posttrain.train.preference import _chunk_logits, _ChunkedTokenLogprobs

AGGREGATIONS = ("token", "sequence", "constant")
TOKEN_FIELDS = ("advantages", "old_logprobs", "ref_logprobs", "rollout_logprobs", "token_weight")


# ------------------------------------------------------------------------------ advantages


def group_advantages(rewards: torch.Tensor, group_size: int, *, scale: str = "group", eps: float = 1e-4):
    """(advantages, std_is_zero) for rewards laid out group-major ([prompt0 x n, prompt1 x n, ...]).

    advantage = reward - group mean, divided by (std + eps) unless scale == "none"; "batch" divides by the
    std of the whole batch instead. std is the unbiased one, as in TRL. std_is_zero marks groups whose
    rewards are all equal (no learning signal: the recipe can drop them)."""
    grouped = rewards.view(-1, group_size)
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(mean)
    std_is_zero = torch.isclose(std, torch.zeros_like(std)).expand_as(grouped).reshape(-1)
    adv = (grouped - mean).reshape(-1)
    if scale == "group":
        adv = adv / (std.expand_as(grouped).reshape(-1) + eps)
    elif scale == "batch":
        adv = adv / (rewards.std() + eps)
    elif scale != "none":
        raise ValueError(f"unknown advantage scale {scale!r} (group, batch or none)")
    return adv, std_is_zero


# ------------------------------------------------------------------------------ per-token loss


def grpo_token_losses(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip_low: float,
    clip_high: float,
    ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    kl_bias_correction: bool = True,
    is_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token loss -min(r A, clip(r, 1 - low, 1 + high) A) [* IS weight] [+ kl_coef * KL] and stats.

    All inputs are aligned 1-D tensors over loss tokens; r = exp(logp - old_logp). KL estimators of
    KL(policy || reference) from samples of the policy: k1 = logp - ref_logp, k3 = exp(ref - logp) -
    (ref - logp) - 1 (non-negative, low variance; TRL's). kl_bias_correction multiplies the KL term by r
    (differentiable), which makes its gradient the unbiased reverse-KL gradient also off-policy
    (DeepSeek-V3.2; TRL's default `use_bias_correction_kl`). The IS weight (truncated exp(old - rollout))
    is applied to the surrogate, before the KL term, as in TRL."""
    ratio = torch.exp(logp - old_logp)
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss = -torch.min(ratio * advantages, clipped * advantages)
    if is_weight is not None:
        loss = loss * is_weight
    stats = {
        "clipped_low": ((ratio < 1.0 - clip_low) & (advantages < 0)).detach(),
        "clipped_high": ((ratio > 1.0 + clip_high) & (advantages > 0)).detach(),
        "ratio": ratio.detach(),
    }
    if kl_estimator not in ("k1", "k3"):
        raise ValueError(f"unknown KL estimator {kl_estimator!r} (k1 or k3)")
    if ref_logp is not None:
        delta = ref_logp - logp
        kl = delta.exp() - delta - 1.0 if kl_estimator == "k3" else -delta
        stats["kl"] = kl.detach()
        if kl_bias_correction:
            kl = kl * ratio
        if kl_coef != 0.0:
            loss = loss + kl_coef * kl
    return loss, stats


def truncated_is_weight(old_logp: torch.Tensor, rollout_logp: torch.Tensor, cap: float) -> torch.Tensor:
    """min(exp(trainer - rollout logprob), cap): corrects for the rollout engine sampling from a slightly
    different distribution than the trainer computes (kernels, precision); TRL's token_truncate."""
    return torch.clamp(torch.exp(old_logp - rollout_logp), max=cap)


# ------------------------------------------------------------------------------ logprobs on packed rows


def token_logprobs(
    h_BTD: torch.Tensor,
    w_VD: torch.Tensor,
    targets_BT: torch.Tensor,
    *,
    temperature: float = 1.0,
    num_real_vocab: int | None = None,
    chunk_size: int | None = None,
    allowed_NV: torch.Tensor | None = None,
) -> torch.Tensor:
    """log softmax(h w^T / temperature)[target] at every loss position (targets != IGNORE), flattened in
    row-major order; exact gradients, never more than one [chunk, vocab] block of logits.

    With `allowed_NV` (bool [loss positions, real vocab], a sampling constraint's mask, `constraint_mask`)
    the softmax runs over the allowed tokens only, as the rollout engine sampled. That path keeps the
    [N, V] logits for backward (plain autograd): constrained completions are a few tokens each."""
    keep_N = targets_BT.reshape(-1) != IGNORE
    h_ND = h_BTD.reshape(-1, h_BTD.shape[-1])[keep_N]
    if temperature != 1.0:
        h_ND = h_ND / temperature
    if chunk_size is None:
        chunk_size = max(64, AUTO_CHUNK_BYTES // (4 * w_VD.shape[0]))
    vocab = num_real_vocab if num_real_vocab is not None else w_VD.shape[0]
    if h_ND.shape[0] == 0:
        return (h_BTD.sum() * 0.0 + w_VD.sum() * 0.0).float().reshape(1)[:0]
    t_N = targets_BT.reshape(-1)[keep_N]
    if allowed_NV is not None:
        logp_NV = _masked_logits(h_ND, w_VD, vocab, allowed_NV).log_softmax(-1)
        return logp_NV.gather(-1, t_N[:, None]).squeeze(-1)
    return _ChunkedTokenLogprobs.apply(h_ND, w_VD, t_N, chunk_size, vocab)


def _masked_logits(
    h_ND: torch.Tensor, w_VD: torch.Tensor, vocab: int, allowed_NV: torch.Tensor
) -> torch.Tensor:
    """fp32 logits over the real vocabulary with the disallowed tokens at -inf."""
    if tuple(allowed_NV.shape) != (h_ND.shape[0], vocab):
        raise ValueError(
            f"allowed mask of shape {tuple(allowed_NV.shape)}, expected {(h_ND.shape[0], vocab)}"
        )
    logits_NV = (h_ND @ w_VD[:vocab].T).float()
    return logits_NV.masked_fill(~allowed_NV.to(logits_NV.device), float("-inf"))


def constraint_mask(
    targets_BT: torch.Tensor, episode_index_BT: torch.Tensor, constraint, vocab_size: int
) -> torch.Tensor:
    """bool [loss positions, vocab_size], row-major like `token_logprobs`: what `constraint` (a
    posttrain.rl.types.TokenConstraint) allowed when each sampled token was drawn. A position's
    generated prefix is the earlier loss tokens of its episode (an episode's tokens are consecutive in
    one row, in order; single-turn: the rollout engine's whole generate call)."""
    keep = targets_BT != IGNORE
    seen: dict[int, list[int]] = {}
    prefixes = []
    for ep, tok in zip(episode_index_BT[keep].tolist(), targets_BT[keep].tolist()):
        done = seen.setdefault(ep, [])
        prefixes.append(list(done))
        done.append(tok)
    if not prefixes:
        return torch.zeros((0, vocab_size), dtype=torch.bool)
    return constraint.allowed(prefixes, vocab_size)


@torch.no_grad()
def token_entropy(
    h_BTD: torch.Tensor,
    w_VD: torch.Tensor,
    targets_BT: torch.Tensor,
    *,
    temperature: float = 1.0,
    num_real_vocab: int | None = None,
    chunk_size: int = 256,
    allowed_NV: torch.Tensor | None = None,
) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) at every loss position (a metric: no gradient); over the
    allowed tokens only when a constraint's mask is given (as token_logprobs)."""
    keep_N = targets_BT.reshape(-1) != IGNORE
    h_ND = h_BTD.reshape(-1, h_BTD.shape[-1])[keep_N] / temperature
    vocab = num_real_vocab if num_real_vocab is not None else w_VD.shape[0]
    out = []
    for start in range(0, h_ND.shape[0], chunk_size):
        h_cD = h_ND[start : start + chunk_size]
        if allowed_NV is None:
            logits_cV = _chunk_logits(h_cD, w_VD, vocab)
        else:
            logits_cV = _masked_logits(h_cD, w_VD, vocab, allowed_NV[start : start + chunk_size])
        logp = torch.log_softmax(logits_cV, dim=-1)
        p = logp.exp()
        out.append(-(p * logp.nan_to_num(neginf=0.0)).sum(-1))
    return torch.cat(out) if out else h_ND.new_zeros(0, dtype=torch.float32)


# ------------------------------------------------------------------------------ episodes -> batches


def collate_episodes(
    episodes: Sequence[Episode],
    pad_id: int,
    row_len: int,
    *,
    aggregation: str,
    max_new_tokens: int,
    rows_per_batch: int = 1,
) -> list[dict[str, torch.Tensor]]:
    """Pack episodes into rows of `row_len` tokens (best fit); micro-batches of `rows_per_batch` rows.

    Per-token fields (Episode.fields: advantages, old/ref logprobs; and the rollout logprobs) are shifted
    onto the target positions like the labels. Adds `token_weight` (the aggregation weight, see the module
    docstring), `episode_index` [B, T] (each loss position's episode, -1 elsewhere) and `num_sequences`
    (episodes with loss tokens in the micro-batch)."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {aggregation!r} ({', '.join(AGGREGATIONS)})")
    packer = BestFitPacker(row_len, max_open_rows=max(16, len(episodes)))
    rows = []
    for i, ep in enumerate(episodes):
        if len(ep.token_ids) > row_len:
            raise ValueError(
                f"an episode of {len(ep.token_ids)} tokens does not fit data.max_tokens_per_pack={row_len}; "
                "raise it above the longest prompt + rl.max_new_tokens x rl.max_turns (+ observations)"
            )
        rows += packer.add(Sample(ep.token_ids, ep.policy_mask, source=i))
    rows += packer.flush()
    rows.sort(key=lambda row: row[0].source)  # deterministic order, independent of the packer's internals
    weight_of = {
        "token": lambda n: 1.0,
        "sequence": lambda n: 1.0 / n,
        "constant": lambda n: 1.0 / max_new_tokens,
    }
    batches = []
    for first in range(0, len(rows), rows_per_batch):
        chunk = rows[first : first + rows_per_batch]
        batch = empty_batch(pad_id, row_len, len(chunk))
        doc_lens, num_seq = [], 0
        for b, row in enumerate(chunk):
            start = 0
            for d, sample in enumerate(row):
                ep = episodes[sample.source]
                n = len(ep.token_ids)
                sl = slice(start, start + n - 1)  # position j predicts token j + 1
                batch["input_ids"][b, start : start + n] = torch.tensor(ep.token_ids)
                batch["position_ids"][b, start : start + n] = torch.arange(n)
                batch["doc_ids"][b, start : start + n] = d
                mask = torch.tensor(ep.policy_mask[1:], dtype=torch.bool)
                batch["targets"][b, sl] = torch.where(mask, torch.tensor(ep.token_ids[1:]), IGNORE)
                batch["episode_index"][b, sl] = torch.where(mask, sample.source, -1)
                for k, v in ep.fields.items():
                    batch[k][b, sl] = torch.tensor(v[1:], dtype=torch.float32)
                batch["rollout_logprobs"][b, sl] = torch.tensor(ep.rollout_logprobs[1:], dtype=torch.float32)
                batch["token_weight"][b, sl] = weight_of[aggregation](max(1, ep.num_policy_tokens))
                num_seq += int(ep.num_policy_tokens > 0)
                doc_lens.append(n)
                start += n
        batch["doc_lens"] = torch.tensor(doc_lens, dtype=torch.long)
        batch["num_sequences"] = torch.tensor(num_seq)
        batches.append(batch)
    return batches


def empty_batch(pad_id: int, row_len: int, rows: int = 1) -> dict[str, torch.Tensor]:
    """A micro-batch of padding only (no loss tokens): what a data-parallel rank with fewer rows than the
    others runs, so that every rank makes the same number of forward/backward passes."""
    return {
        "input_ids": torch.full((rows, row_len), pad_id),
        "position_ids": torch.zeros((rows, row_len), dtype=torch.long),
        "doc_ids": torch.full((rows, row_len), -1),
        "targets": torch.full((rows, row_len), IGNORE),
        "episode_index": torch.full((rows, row_len), -1),
        "doc_lens": torch.zeros(0, dtype=torch.long),
        "num_sequences": torch.tensor(0),
        **{k: torch.zeros((rows, row_len)) for k in TOKEN_FIELDS},
    }


def loss_units_for(aggregation: str):
    """The trainer's loss units for an aggregation: completion tokens, or sequences."""
    if aggregation == "token":
        return lambda batch: int((batch["targets"] != IGNORE).sum())
    return lambda batch: int(batch["num_sequences"])


# ------------------------------------------------------------------------------ the trainer's loss_fn


@dataclass(frozen=True)
class GRPOLossConfig:
    clip_low: float = 0.2
    clip_high: float = 0.2
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    kl_bias_correction: bool = True
    temperature: float = 1.0
    is_cap: float | None = 2.0  # truncated importance sampling cap; None = no correction
    chunk_size: int | None = None


def grpo_loss_fn(cfg: GRPOLossConfig, num_real_vocab: int, constraint=None):
    """loss_fn(model, batch) -> (sum of weighted token losses, summed metrics) for the shared trainer.
    `constraint` (the rollout engine's TokenConstraint, if any) masks the policy's softmax as it did the
    sampling, so the ratio and KL are those of the distribution that was sampled."""

    def loss_fn(model, batch):
        keep = batch["targets"] != IGNORE
        allowed = None
        if constraint is not None:
            allowed = constraint_mask(batch["targets"], batch["episode_index"], constraint, num_real_vocab)

        def head(h_BTD, w_VD):
            return token_logprobs(
                h_BTD,
                w_VD,
                batch["targets"],
                temperature=cfg.temperature,
                num_real_vocab=num_real_vocab,
                chunk_size=cfg.chunk_size,
                allowed_NV=allowed,
            )

        logp = model(batch["input_ids"], batch["position_ids"], batch.get("doc_ids"), head_fn=head)
        old = batch["old_logprobs"][keep]
        is_weight = None
        if cfg.is_cap is not None:
            is_weight = truncated_is_weight(old, batch["rollout_logprobs"][keep], cfg.is_cap)
        losses, stats = grpo_token_losses(
            logp,
            old,
            batch["advantages"][keep],
            clip_low=cfg.clip_low,
            clip_high=cfg.clip_high,
            ref_logp=batch["ref_logprobs"][keep] if cfg.kl_coef else None,
            kl_coef=cfg.kl_coef,
            kl_estimator=cfg.kl_estimator,
            kl_bias_correction=cfg.kl_bias_correction,
            is_weight=is_weight,
        )
        weight = batch["token_weight"][keep]
        # Metrics are summed by the trainer and divided by the step's loss units: weighting each token by
        # its aggregation weight makes them means in the same units as the loss.
        metrics = {
            "clip_fraction/low": (stats["clipped_low"].float() * weight).sum(),
            "clip_fraction/high": (stats["clipped_high"].float() * weight).sum(),
            "ratio/mean": (stats["ratio"] * weight).sum(),
        }
        if "kl" in stats:
            metrics["kl"] = (stats["kl"] * weight).sum()
        return (losses * weight).sum(), metrics

    return loss_fn
