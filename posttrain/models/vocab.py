"""The vocabulary service: keep a model's embedding/output rows in step with its tokenizer.

Three sizes matter:
  * the tokenizer's size (`len(AutoTokenizer)`): ids that can occur;
  * the export size: what config.json says. For a from-scratch model it is the tokenizer's size; for a
    loaded checkpoint it is max(checkpoint vocab, tokenizer size), because released checkpoints often
    carry spare rows (Qwen3: 151,936 rows for 151,669 tokens) that must survive a round trip;
  * the training size: the export size padded up to a multiple of 64, so the output matmul has
    tensor-core friendly shapes. Padded logits are masked out of the loss (`num_real_vocab`) and of
    sampling (generate.py), and trimmed away on export.

Added tokens (special tokens, thousands of `<sid_N>` semantic IDs) get rows initialised to the mean of
the existing rows, which keeps their first logits at the average instead of at random. With
`train_new_rows_only` just those rows learn: every other parameter is frozen and a gradient hook zeroes
the old rows, which are also kept out of weight decay so AdamW leaves them bit-identical.
"""

from __future__ import annotations

import torch
from torch import nn


def padded(n: int, multiple: int = 64) -> int:
    return -(-n // multiple) * multiple


def export_vocab_size(tokenizer_size: int, checkpoint_vocab: int | None) -> int:
    """config.json's vocab_size after training (see the module doc)."""
    return max(tokenizer_size, checkpoint_vocab or 0)


@torch.no_grad()
def _resized(old: torch.Tensor, new_rows: int, num_init_rows: int) -> torch.Tensor:
    """[new_rows, D] with old's first rows copied and the rest set to the mean of old[:num_init_rows]."""
    keep = min(new_rows, old.shape[0])
    out = torch.empty(new_rows, old.shape[1], dtype=old.dtype, device=old.device)
    out[:keep] = old[:keep]
    if new_rows > keep:
        out[keep:] = old[:num_init_rows].float().mean(dim=0).to(old.dtype)
    return out


def resize_vocab(model: nn.Module, new_vocab_size: int, num_init_rows: int) -> int:
    """Give tok_embeddings and lm_head `new_vocab_size` rows; returns the old size.

    New rows get the mean of rows [0, num_init_rows) (pass the old real vocabulary, not its padding).
    model.config.vocab_size is updated, so HF export and FLOPs see the new size.
    """
    emb: nn.Embedding = model.tok_embeddings
    old_size = emb.weight.shape[0]
    if new_vocab_size == old_size:
        return old_size
    emb.weight = nn.Parameter(_resized(emb.weight, new_vocab_size, num_init_rows))
    emb.num_embeddings = new_vocab_size
    if model.lm_head is not None:
        head: nn.Linear = model.lm_head
        head.weight = nn.Parameter(_resized(head.weight, new_vocab_size, num_init_rows))
        head.out_features = new_vocab_size
    model.config.vocab_size = new_vocab_size
    return old_size


def vocab_weights(model: nn.Module) -> list[nn.Parameter]:
    """The embedding matrix, and the output matrix when it is a separate tensor."""
    weights = [model.tok_embeddings.weight]
    if model.lm_head is not None:
        weights.append(model.lm_head.weight)
    return weights


def train_new_rows_only(model: nn.Module, first_new_row: int) -> int:
    """Freeze everything except vocabulary rows >= first_new_row (and any LoRA adapters).

    Returns the number of trainable vocabulary rows. Old rows get zero gradient (hook) and no weight
    decay (`_posttrain_no_decay`, read by train/optim.py), so they stay exactly as loaded.
    """
    for name, p in model.named_parameters():
        if ".lora_a." not in name and ".lora_b." not in name:
            p.requires_grad_(False)
    for weight in vocab_weights(model):
        weight.requires_grad_(True)
        weight._posttrain_no_decay = True  # AdamW's decay would shrink the frozen rows

        def zero_old_rows(grad: torch.Tensor) -> torch.Tensor:
            grad = grad.clone()
            grad[:first_new_row] = 0
            return grad

        weight.register_hook(zero_old_rows)
    return model.tok_embeddings.weight.shape[0] - first_new_row


def trimmed_state_dict(state_dict: dict[str, torch.Tensor], vocab_size: int) -> dict[str, torch.Tensor]:
    """The state dict with embedding / output rows cut to the export size (drops the padding rows)."""
    out = dict(state_dict)
    for name in ("tok_embeddings.weight", "lm_head.weight"):
        if name in out:
            out[name] = out[name][:vocab_size]
    return out
