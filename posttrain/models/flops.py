"""FLOPs accounting for throughput and MFU (model FLOPs utilisation).

Convention (the PaLM / nanoGPT one, stated so numbers are comparable across runs):
  * A matmul with an [m, n] weight costs 2*m*n FLOPs per token forward (a multiply and an add), and the
    backward costs twice the forward, so training costs 6 FLOPs per matmul parameter per token.
  * Matmul parameters are all linear layers, the LM head included (it is a matmul even when tied to the
    embedding). The embedding lookup, norms and elementwise ops are not counted.
  * Attention scores (Q K^T) and the weighted sum (A V) are counted per document, causally: a document of
    s tokens has s*(s+1)/2 query-key pairs, each costing 2 (QK^T and AV) * 2 (mul + add) * head_dim per
    head per layer forward, times 3 for forward + backward. Packing does not add cross-document work,
    because the block-diagonal mask lets kernels skip it in principle; we count the useful FLOPs.
  * Recomputation (activation checkpointing) is NOT counted: MFU measures useful model FLOPs.
  * The LM head is charged only for the positions whose logits are computed. posttrain's loss drops
    ignored positions (prompt tokens, padding) before the LM head, so in SFT, where a small share of
    tokens bear loss, charging it for every token would overstate MFU.

Config duck typing: any config with hidden_size, intermediate_size, num_hidden_layers,
num_attention_heads, num_key_value_heads, head_dim and vocab_size (dense families) works.
"""

from __future__ import annotations

from typing import Protocol


class DenseConfig(Protocol):
    """The fields FLOPs accounting reads from a dense decoder config."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int


def body_matmul_params(config: DenseConfig) -> int:
    """Weights of the decoder layers that take part in a matmul for every token: q/k/v/o and the MLP."""
    D, Dh = config.hidden_size, config.head_dim
    attention = D * Dh * (2 * config.num_attention_heads + 2 * config.num_key_value_heads)  # q, o, k, v
    mlp = 3 * D * config.intermediate_size  # gate, up, down
    return config.num_hidden_layers * (attention + mlp)


def matmul_params(config: DenseConfig) -> int:
    """Matmul weights of one token that goes through the whole model, LM head included."""
    return body_matmul_params(config) + config.vocab_size * config.hidden_size


def flops_per_token_dense(config: DenseConfig) -> int:
    """Training (forward + backward) FLOPs per token from the weight matmuls: 6 * matmul_params."""
    return 6 * matmul_params(config)


def attention_flops(config: DenseConfig, doc_lens: list[int]) -> int:
    """Training FLOPs of causal attention scores + weighted sums, counted per document (see module doc)."""
    per_pair = 3 * 2 * 2 * config.num_hidden_layers * config.num_attention_heads * config.head_dim
    return sum(per_pair * s * (s + 1) // 2 for s in doc_lens)


def train_flops(config: DenseConfig, doc_lens: list[int], num_lm_head_tokens: int | None = None) -> int:
    """Total training FLOPs for a batch whose documents have these token counts.

    num_lm_head_tokens: positions the LM head is applied to (None = every token).
    """
    tokens = sum(doc_lens)
    head_tokens = tokens if num_lm_head_tokens is None else num_lm_head_tokens
    head = 6 * config.vocab_size * config.hidden_size * head_tokens
    return 6 * body_matmul_params(config) * tokens + head + attention_flops(config, doc_lens)
