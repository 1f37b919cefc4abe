"""Semantic-ID decoding: constrained beam search over the codes of real items.

An item is L codes; decoding picks c_1 at the query (gap token), then c_2 given c_1, and so on, keeping
the `beam_size` best prefixes per query. Constrained: at each step only codes that extend the prefix
towards some catalogue item are allowed (a trie of the items' codes), and the step's log-probabilities
are normalised over those codes, so every finished beam is a real item and its score is a proper
log-probability over the catalogue. With beam_size >= N items the result ranks every item exactly.

The histories are prefilled once into the shared KV cache (posttrain/models/kv_cache.py, as the rollout
engine does: left-padded rows, padding doc 0, positions from each history's first token); each query's
row is then fanned out to its beams, and every further level costs one token per beam. Beams that are
dropped or duplicated move with `select_rows`.

Shape legend: R queries, B beams per query, K codes per level, D hidden.
"""

from __future__ import annotations

import numpy as np
import torch

from posttrain.events.semantic_ids import EventVocab
from posttrain.events.sequences import Query, TokenTable
from posttrain.models.kv_cache import KVCache


def code_trie(vocab: EventVocab) -> dict[tuple, np.ndarray]:
    """prefix (tuple of codes, possibly empty) -> bool [K] of the codes that may follow it."""
    trie: dict[tuple, np.ndarray] = {}
    for row in vocab.codes.tolist():
        for level in range(len(row)):
            allowed = trie.setdefault(tuple(row[:level]), np.zeros(vocab.codes_per_level, dtype=bool))
            allowed[row[level]] = True
    return trie


def _prefill(model, prompts: list[list[int]], extra_slots: int, pad_id: int):
    """KV cache of left-padded prompts; returns (cache, last hidden state [R, D], prompt lengths [R])."""
    device = model.output_weight().device
    L = max(len(p) for p in prompts)
    pad_R1 = torch.tensor([L - len(p) for p in prompts], device=device)[:, None]
    ids_RL = torch.tensor([[pad_id] * (L - len(p)) + list(p) for p in prompts], device=device)
    cols_RL = torch.arange(L, device=device).expand(len(prompts), L)
    cache = KVCache.for_model(model, len(prompts), L + extra_slots)
    h_RD = model(ids_RL, (cols_RL - pad_R1).clamp(min=0), (cols_RL >= pad_R1).long(), kv_cache=cache)[:, -1]
    return cache, h_RD, torch.tensor([len(p) for p in prompts], device=device)


def _step_logprobs(h_ND: torch.Tensor, w_KD: torch.Tensor, allowed_NK: torch.Tensor) -> torch.Tensor:
    """log p of each allowed code, normalised over the allowed codes; -inf elsewhere (and on rows that
    allow nothing: dead beams)."""
    logits = (h_ND @ w_KD.T).float()
    any_N1 = allowed_NK.any(-1, keepdim=True)
    logp = logits.masked_fill(~(allowed_NK | ~any_N1), float("-inf")).log_softmax(-1)
    return logp.masked_fill(~allowed_NK, float("-inf"))


@torch.no_grad()
def beam_search(
    model,
    queries: list[Query],
    vocab: EventVocab,
    table: TokenTable,
    *,
    beam_size: int,
    top_k: int,
    pad_id: int,
    batch_size: int = 32,
) -> tuple[np.ndarray, np.ndarray]:
    """(items [Q, top_k], log-probabilities [Q, top_k]) of the best finished beams per query, best first;
    -1 / -inf where fewer than top_k items exist."""
    was_training = model.training
    model.eval()
    trie = code_trie(vocab)
    item_of = {tuple(row): i for i, row in enumerate(vocab.codes.tolist())}
    w_VD = model.output_weight()
    device = w_VD.device
    L, K, B = vocab.num_levels, vocab.codes_per_level, beam_size
    code_ids_LK = torch.as_tensor(table.code_ids, device=device)
    dead = np.zeros(K, dtype=bool)
    items = np.full((len(queries), top_k), -1, dtype=np.int64)
    scores = np.full((len(queries), top_k), -np.inf)
    for start in range(0, len(queries), batch_size):
        chunk = queries[start : start + batch_size]
        R = len(chunk)
        cache, h_RD, lens_R = _prefill(model, [q.input_ids for q in chunk], L - 1, pad_id)
        root = torch.as_tensor(trie[()], device=device).expand(R, K)
        logp_RK = _step_logprobs(h_RD, w_VD[code_ids_LK[0]], root)
        score_RB, code_RB = logp_RK.topk(min(B, K), dim=-1)
        codes = code_RB[:, :, None]  # [R, B, level]
        B_now = codes.shape[1]
        cache.select_rows(torch.arange(R, device=device).repeat_interleave(B_now))
        pos_N = lens_R.repeat_interleave(B_now)
        for level in range(1, L):
            tok_N1 = code_ids_LK[level - 1][codes[:, :, -1].reshape(-1)][:, None]
            h_ND = model(tok_N1, (pos_N + level - 1)[:, None], torch.ones_like(tok_N1), kv_cache=cache)[:, -1]
            prefixes = codes.reshape(R * B_now, level).tolist()
            alive = torch.isfinite(score_RB).reshape(-1).tolist()
            allowed = np.stack([trie.get(tuple(p), dead) if ok else dead for p, ok in zip(prefixes, alive)])
            logp_NK = _step_logprobs(h_ND, w_VD[code_ids_LK[level]], torch.as_tensor(allowed, device=device))
            total_RX = (score_RB[:, :, None] + logp_NK.view(R, B_now, K)).view(R, B_now * K)
            score_RB, flat_RB = total_RX.topk(min(B, B_now * K), dim=-1)
            parent_RB = flat_RB // K
            codes = torch.cat([codes.gather(1, parent_RB[:, :, None].expand(-1, -1, level)),
                               (flat_RB % K)[:, :, None]], dim=-1)  # fmt: skip
            rows_N = (torch.arange(R, device=device)[:, None] * B_now + parent_RB).reshape(-1)
            B_now = codes.shape[1]
            cache.select_rows(rows_N)
            pos_N = pos_N[rows_N]
        for r, (row_codes, row_scores) in enumerate(zip(codes.tolist(), score_RB.tolist())):
            found = [(item_of[tuple(c)], s) for c, s in zip(row_codes, row_scores) if s > float("-inf")]
            for j, (item, s) in enumerate(found[:top_k]):
                items[start + r, j], scores[start + r, j] = item, s
    model.train(was_training)
    return items, scores


def mix_with_history(
    items_QK: np.ndarray, logp_QK: np.ndarray, gate_Q: np.ndarray, copy_QN: np.ndarray, top_k: int
) -> np.ndarray:
    """[Q, top_k] items ranked by p = (1 - g) p_beam + g p_copy: the beam's items with the model's
    history pointer (posttrain/events/model.py); an item outside the beam counts 0 for its beam part."""
    out = np.full((len(items_QK), top_k), -1, dtype=np.int64)
    for q in range(len(items_QK)):
        p: dict[int, float] = {}
        for item, lp in zip(items_QK[q].tolist(), logp_QK[q].tolist()):
            if item >= 0:
                p[item] = (1.0 - gate_Q[q]) * float(np.exp(lp))
        for item in np.flatnonzero(copy_QN[q]).tolist():
            p[item] = p.get(item, 0.0) + gate_Q[q] * float(copy_QN[q, item])
        ranked = sorted(p, key=lambda i: (-p[i], i))[:top_k]
        out[q, : len(ranked)] = ranked
    return out
