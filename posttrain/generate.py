"""Batched greedy decoding on our model definitions, used for exact-match evaluation.

Prompts are left-padded into one batch. Padding is its own "document" (doc id 0) and the prompt
and its continuation another (doc id 1), so real tokens never attend to padding, and position ids
start at 0 at each prompt's first real token, exactly as if the prompt were run alone.
This recomputes the whole prefix at every step (no KV cache): fine for short evaluation answers;
the RL rollout engine adds a KV cache and sampling.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


@torch.no_grad()
def greedy_generate(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    stop_ids: Sequence[int],
    pad_id: int,
    num_real_vocab: int,
    batch_size: int = 64,
    progress: str = "quiet",
) -> list[list[int]]:
    """Greedy continuations of each prompt (without the prompt), each ending at a stop id.
    progress: a progress mode (posttrain/metrics/progress.py), counted in prompts."""
    from posttrain.metrics.progress import Progress

    shown = Progress(len(prompts), "generate", progress, unit="prompts")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    stops = torch.tensor(sorted(set(stop_ids)), device=device)
    outputs: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        L = max(len(p) for p in chunk)
        pad_lens = torch.tensor([L - len(p) for p in chunk], device=device)
        ids = torch.tensor([[pad_id] * (L - len(p)) + list(p) for p in chunk], device=device)
        cols = torch.arange(L, device=device).expand(len(chunk), L)
        pos = (cols - pad_lens[:, None]).clamp(min=0)
        doc = (cols >= pad_lens[:, None]).long()
        done = torch.zeros(len(chunk), dtype=torch.bool, device=device)
        new = []
        for _ in range(max_new_tokens):
            h = model(ids, pos, doc)
            logits = model.logits(h[:, -1]).float()
            logits[:, num_real_vocab:] = float("-inf")
            nxt = torch.where(done, torch.full_like(done, pad_id, dtype=torch.long), logits.argmax(-1))
            new.append(nxt)
            done |= torch.isin(nxt, stops)
            if bool(done.all()):
                break
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            pos = torch.cat([pos, pos[:, -1:] + 1], dim=1)
            doc = torch.cat([doc, torch.ones_like(doc[:, :1])], dim=1)
        gen = torch.stack(new, dim=1).tolist()
        for row in gen:
            out = []
            for t in row:
                out.append(t)
                if t in stop_ids:
                    break
            outputs.append(out)
        shown.advance(len(chunk))
    shown.close()
    model.train(was_training)
    return outputs
