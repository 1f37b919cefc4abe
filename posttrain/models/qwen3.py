"""Qwen3 dense decoder: our definition, its config, and the mapping to/from HF checkpoint names.

The model returns FINAL-NORMED hidden states, not logits: the loss applies `output_weight()` in vocabulary
chunks so the [B, T, V] logits tensor is never materialised. `logits()` exists for generation and eval.
Packed rows are supported through `position_ids_BT` (per-document positions) and `doc_ids_BT` (block-diagonal
causal mask). Parity with `transformers.Qwen3ForCausalLM` is pinned by tests/parity/test_qwen3_logits.py.

Shape legend:
    B  batch size (rows)      T  tokens per row      D  hidden_size      V  vocab_size
    Dh head_dim
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from posttrain.errors import ModelError
from posttrain.models import decoder
from posttrain.models.components import (
    Attention,
    RotaryEmbedding,
    SwiGLU,
    TransformerBlock,
)
from posttrain.models.decoder import DecoderLM


@dataclass
class Qwen3Config:
    """Architecture of a Qwen3 dense model. Field names and meanings are HF's Qwen3Config's."""

    vocab_size: int  # number of token embeddings (rows of the embedding / output matrix)
    hidden_size: int  # model width D
    intermediate_size: int  # SwiGLU inner width F
    num_hidden_layers: int  # number of transformer blocks
    num_attention_heads: int  # query heads H
    num_key_value_heads: int  # key/value heads K (GQA); H % K == 0
    head_dim: int  # per-head width Dh (Qwen3 decouples it from D / H)
    rms_norm_eps: float = 1e-6  # epsilon inside every RMSNorm
    rope_theta: float = 1_000_000.0  # RoPE base wavelength
    max_position_embeddings: int = 4096  # longest context the model is meant for (tokens); informational
    tie_word_embeddings: bool = True  # output matrix is the embedding matrix (no separate lm_head)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> Qwen3Config:
        """Read an HF config.json dict (transformers 4 or 5 style); refuse features we do not implement."""
        return cls(**_hf_common_fields(d, "qwen3"))

    def to_hf_dict(
        self,
        *,
        torch_dtype: str = "float32",
        bos_token_id: int | None = None,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
    ) -> dict[str, Any]:
        """A config.json that transformers loads as Qwen3ForCausalLM.

        rope_theta and torch_dtype are written in both the transformers-5 and the older spelling so that
        older readers (vLLM, transformers 4) load it too.
        """
        d: dict[str, Any] = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", **asdict(self)}
        d.update(
            hidden_act="silu",
            attention_bias=False,
            attention_dropout=0.0,
            use_sliding_window=False,
            sliding_window=None,
            max_window_layers=self.num_hidden_layers,
            rope_parameters={"rope_theta": self.rope_theta, "rope_type": "default"},
            rope_scaling=None,
            initializer_range=0.02,
            use_cache=True,
            dtype=torch_dtype,
            torch_dtype=torch_dtype,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
        )
        return d

    def num_params(self, include_embedding: bool = True) -> int:
        """Parameter count, norm weights included.

        include_embedding=False drops the input embedding table (a lookup, not a matmul); a separate
        (untied) lm_head is still counted. A tied output matrix counts once, as the embedding.
        """
        D, Dh, L = self.hidden_size, self.head_dim, self.num_hidden_layers
        attn = D * Dh * (2 * self.num_attention_heads + 2 * self.num_key_value_heads) + 2 * Dh
        per_layer = attn + 3 * D * self.intermediate_size + 2 * D
        total = L * per_layer + D  # + final norm
        embedding = self.vocab_size * D
        if include_embedding:
            total += embedding
        if not self.tie_word_embeddings:
            total += embedding  # the separate lm_head is a matmul weight, counted even without embeddings
        return total


def _hf_common_fields(d: dict[str, Any], expected_model_type: str) -> dict[str, Any]:
    """The Qwen3 attention/shape fields of an HF config dict, shared by Qwen3 and Qwen3-MoE."""
    model_type = d.get("model_type", expected_model_type)
    if model_type != expected_model_type:
        raise ModelError(f"config model_type is {model_type!r}, expected {expected_model_type!r}")
    rope_theta = d.get("rope_theta")
    rope_params = d.get("rope_parameters") or d.get("rope_scaling")
    if rope_params:
        rope_type = rope_params.get("rope_type", rope_params.get("type", "default"))
        if rope_type != "default":
            raise ModelError(f"unsupported Qwen3 feature: rope_type {rope_type!r} (only 'default' RoPE)")
        rope_theta = rope_params.get("rope_theta", rope_theta)
    if d.get("attention_bias", False):
        raise ModelError("unsupported Qwen3 feature: attention_bias=true")
    if d.get("use_sliding_window", False) or "sliding_attention" in (d.get("layer_types") or []):
        raise ModelError("unsupported Qwen3 feature: sliding-window attention (use_sliding_window=true)")
    if d.get("hidden_act", "silu") != "silu":
        raise ModelError(f"unsupported Qwen3 feature: hidden_act {d['hidden_act']!r} (only 'silu')")
    try:
        num_heads = d["num_attention_heads"]
        return dict(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=num_heads,
            num_key_value_heads=d.get("num_key_value_heads") or num_heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // num_heads,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta if rope_theta is not None else 1_000_000.0),
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            tie_word_embeddings=d.get("tie_word_embeddings", False),  # HF's Qwen3Config default
        )
    except KeyError as e:
        raise ModelError(f"Qwen3 config is missing required key {e.args[0]!r}") from None


class Qwen3ForCausalLM(DecoderLM):
    """Qwen3 dense causal LM: pre-norm blocks with q/k RMSNorm before RoPE, GQA and SwiGLU."""

    def __init__(self, config: Qwen3Config) -> None:
        c = config
        super().__init__(
            c,
            RotaryEmbedding(c.head_dim, c.rope_theta),
            lambda i: TransformerBlock(
                Attention(
                    c.hidden_size,
                    c.num_attention_heads,
                    c.num_key_value_heads,
                    c.head_dim,
                    qk_norm=True,
                    norm_eps=c.rms_norm_eps,
                ),
                SwiGLU(c.hidden_size, c.intermediate_size),
                c.hidden_size,
                c.rms_norm_eps,
            ),
        )


# Our parameter names <-> HF names. "{i}" is the layer index. Explicit data, read in both directions.
HF_KEY_MAP: dict[str, str] = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
    "layers.{i}.attention_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "layers.{i}.attention.q_proj.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "layers.{i}.attention.k_proj.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "layers.{i}.attention.v_proj.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "layers.{i}.attention.o_proj.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "layers.{i}.attention.q_norm.weight": "model.layers.{i}.self_attn.q_norm.weight",
    "layers.{i}.attention.k_norm.weight": "model.layers.{i}.self_attn.k_norm.weight",
    "layers.{i}.mlp_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "layers.{i}.mlp.gate_proj.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "layers.{i}.mlp.up_proj.weight": "model.layers.{i}.mlp.up_proj.weight",
    "layers.{i}.mlp.down_proj.weight": "model.layers.{i}.mlp.down_proj.weight",
}


def expected_keys(config: Qwen3Config) -> list[str]:
    """Every parameter name our model has for this config (lm_head only when untied)."""
    return decoder.expected_keys(HF_KEY_MAP, config)


def to_hf_state_dict(sd: dict[str, torch.Tensor], config: Qwen3Config) -> dict[str, torch.Tensor]:
    return decoder.to_hf(sd, config, HF_KEY_MAP, "Qwen3")


def from_hf_state_dict(
    sd: dict[str, torch.Tensor], config: Qwen3Config, *, strict: bool = True
) -> dict[str, torch.Tensor]:
    """Rename an HF Qwen3 state dict to our names (see decoder.from_hf for the rules)."""
    return decoder.from_hf(
        sd, HF_KEY_MAP, expected_keys(config), "Qwen3", strict=strict, tied=config.tie_word_embeddings
    )
