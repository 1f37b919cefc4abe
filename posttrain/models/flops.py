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

  * MoE layers count ACTIVE parameters: the router (E x D) plus the k experts a token is routed to, not
    all E experts (a config with `is_sparse(layer)`, `num_experts`, `num_experts_per_tok` and the expert
    width `moe_intermediate_size`).
  * Sliding-window layers (`layer_types[i] == "sliding_attention"`) count at most `sliding_window` keys
    per query.
  * LoRA: frozen base weights still cost the forward (2) and the activation gradient (2) but no weight
    gradient, so 4 FLOPs per parameter per token; adapter weights cost the usual 6. Attention scores
    and weighted sums keep their 3x (both operands are activations).

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


def mlp_matmul_params(config: DenseConfig, layer: int) -> int:
    """MLP weights one token multiplies in `layer`: gate/up/down, or router + its k routed experts."""
    D = config.hidden_size
    is_sparse = getattr(config, "is_sparse", None)
    if is_sparse is not None and is_sparse(layer):
        width = config.moe_intermediate_size
        return config.num_experts * D + config.num_experts_per_tok * 3 * D * width
    return 3 * D * config.intermediate_size


def body_matmul_params(config: DenseConfig) -> int:
    """Weights of the decoder layers that take part in a matmul for every token: q/k/v/o and the MLP."""
    D, Dh = config.hidden_size, config.head_dim
    attention = D * Dh * (2 * config.num_attention_heads + 2 * config.num_key_value_heads)  # q, o, k, v
    layers = range(config.num_hidden_layers)
    return config.num_hidden_layers * attention + sum(mlp_matmul_params(config, i) for i in layers)


def matmul_params(config: DenseConfig) -> int:
    """Matmul weights of one token that goes through the whole model, LM head included."""
    return body_matmul_params(config) + config.vocab_size * config.hidden_size


def flops_per_token_dense(config: DenseConfig) -> int:
    """Training (forward + backward) FLOPs per token from the weight matmuls: 6 * matmul_params."""
    return 6 * matmul_params(config)


def causal_pairs(s: int, window: int | None) -> int:
    """Query-key pairs of a causal document of s tokens, each query seeing at most `window` keys."""
    if window is None or s <= window:
        return s * (s + 1) // 2
    return window * (window + 1) // 2 + (s - window) * window


def attention_flops(config: DenseConfig, doc_lens: list[int]) -> int:
    """Training FLOPs of causal attention scores + weighted sums, counted per document (see module doc)."""
    per_pair_layer = 3 * 2 * 2 * config.num_attention_heads * config.head_dim
    layer_types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    total = 0
    for layer_type in layer_types:
        window = getattr(config, "sliding_window", None) if layer_type == "sliding_attention" else None
        total += per_pair_layer * sum(causal_pairs(s, window) for s in doc_lens)
    return total


def train_flops(
    config: DenseConfig,
    doc_lens: list[int],
    num_lm_head_tokens: int | None = None,
    *,
    lora_params_per_token: int | None = None,
) -> int:
    """Total training FLOPs for a batch whose documents have these token counts.

    num_lm_head_tokens: positions the LM head is applied to (None = every token).
    lora_params_per_token: None for full fine-tuning; with LoRA, the adapter weights one token multiplies
    (see lora_params_per_token()), and every base weight is frozen.
    """
    tokens = sum(doc_lens)
    head_tokens = tokens if num_lm_head_tokens is None else num_lm_head_tokens
    per_base_param = 6 if lora_params_per_token is None else 4
    head = per_base_param * config.vocab_size * config.hidden_size * head_tokens
    body = per_base_param * body_matmul_params(config) * tokens
    adapters = 6 * (lora_params_per_token or 0) * tokens
    return body + head + adapters + attention_flops(config, doc_lens)


def lora_params_per_token(model, config: DenseConfig) -> int:
    """Adapter weights one token multiplies: every adapted dense linear, and k/E of the adapted experts."""
    from posttrain.models.lora import lora_modules  # local: flops stays importable without torch.nn users

    total = 0.0
    for name, m in lora_modules(model).items():
        params = m.rank * (m.in_features + m.out_features)
        if ".experts." in name:
            params *= config.num_experts_per_tok / config.num_experts
        total += params
    return int(round(total))
