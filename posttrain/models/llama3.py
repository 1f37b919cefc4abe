"""Llama 3 (3, 3.1, 3.2, 3.3) dense decoder: our definition, its config, and the mapping to/from HF names.

Same contract as qwen3.py: forward() returns FINAL-NORMED hidden states (the loss applies `output_weight()`
in vocabulary chunks), packed rows work through `position_ids_BT` and `doc_ids_BT`, and module names are
the unified ones (tok_embeddings, layers.{i}.attention.q_proj, ..., norm, lm_head). Differences from Qwen3:
no q/k norm, optional biases, and Llama 3.1's RoPE frequency scaling (rope_type "llama3"). Parity with
`transformers.LlamaForCausalLM` is pinned by tests/parity/test_llama3_logits.py.

Shape legend:
    B  batch size (rows)      T  tokens per row      D  hidden_size      V  vocab_size
    Dh head_dim
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from posttrain.errors import ModelError
from posttrain.models import decoder
from posttrain.models.components import (
    Attention,
    RotaryEmbedding,
    SwiGLU,
    TransformerBlock,
    llama3_scale_inv_freq,
)
from posttrain.models.decoder import DecoderLM


@dataclass
class Llama3RopeScaling:
    """Llama 3.1 RoPE scaling (HF rope_type "llama3"). Llama 3.1/3.2/3.3 ship 8.0, 1.0, 4.0, 8192."""

    factor: float  # long wavelengths are divided by this (context extension factor)
    low_freq_factor: float  # wavelengths above original_max / low_freq_factor (tokens) are fully scaled
    high_freq_factor: float  # wavelengths below original_max / high_freq_factor (tokens) are left alone
    original_max_position_embeddings: int  # pre-training context length (tokens)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Llama3RopeScaling:
        """From a YAML / HF-style dict; rope_type must be "llama3", unknown keys name the closest valid one."""
        valid = [f.name for f in fields(cls)]
        rope_type = d.get("rope_type", d.get("type", "llama3"))
        if rope_type != "llama3":
            raise ModelError(f"Llama3 rope_scaling: rope_type {rope_type!r} is not supported (only 'llama3')")
        for key in d:
            if key not in (*valid, "rope_type", "type"):
                close = difflib.get_close_matches(key, valid, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {valid}"
                raise ModelError(f"Llama3 rope_scaling: unknown key {key!r}{hint}")
        try:
            return cls(
                factor=float(d["factor"]),
                low_freq_factor=float(d["low_freq_factor"]),
                high_freq_factor=float(d["high_freq_factor"]),
                original_max_position_embeddings=int(d["original_max_position_embeddings"]),
            )
        except KeyError as e:
            raise ModelError(f"Llama3 rope_scaling is missing required key {e.args[0]!r}") from None


@dataclass
class Llama3Config:
    """Architecture of a Llama 3 dense model. Field names and meanings are HF's LlamaConfig's."""

    vocab_size: int  # number of token embeddings (rows of the embedding / output matrix)
    hidden_size: int  # model width D
    intermediate_size: int  # SwiGLU inner width F
    num_hidden_layers: int  # number of transformer blocks
    num_attention_heads: int  # query heads H
    num_key_value_heads: int  # key/value heads K (GQA); H % K == 0
    head_dim: int | None = None  # per-head width Dh; None derives hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-5  # epsilon inside every RMSNorm (Llama 3's value)
    rope_theta: float = 500_000.0  # RoPE base wavelength (Llama 3's value)
    rope_scaling: Llama3RopeScaling | None = None  # Llama 3.1 frequency scaling; None = plain RoPE
    max_position_embeddings: int = 8192  # longest context the model is meant for (tokens); informational
    attention_bias: bool = False  # biases on q/k/v/o projections
    mlp_bias: bool = False  # biases on gate/up/down projections
    tie_word_embeddings: bool = False  # output matrix is the embedding matrix (Llama 3.2 1B/3B: true)

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if isinstance(self.rope_scaling, dict):  # from YAML / build_model
            self.rope_scaling = Llama3RopeScaling.from_dict(self.rope_scaling)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> Llama3Config:
        """Read an HF config.json dict (transformers 4 or 5 style); refuse features we do not implement.

        Defaults for absent keys are HF LlamaConfig's (rope_theta 10000, eps 1e-6, 2048 positions), so a
        checkpoint means here what it means in transformers.
        """
        model_type = d.get("model_type", "llama")
        if model_type != "llama":
            raise ModelError(f"config model_type is {model_type!r}, expected 'llama'")
        # transformers 5 lets an old-style `rope_scaling` win over `rope_parameters`; so do we.
        rope = d.get("rope_scaling") or d.get("rope_parameters") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise ModelError(
                f"unsupported Llama3 feature: rope_type {rope_type!r} (only 'default', 'llama3')"
            )
        if rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0)) != 1.0:
            raise ModelError("unsupported Llama3 feature: partial_rotary_factor != 1")
        if d.get("hidden_act", "silu") != "silu":
            raise ModelError(f"unsupported Llama3 feature: hidden_act {d['hidden_act']!r} (only 'silu')")
        try:
            scaling = None
            if rope_type == "llama3":
                # As HF: a top-level original_max_position_embeddings wins, then the rope dict's, then max.
                original = d.get("original_max_position_embeddings") or rope.get(
                    "original_max_position_embeddings", d.get("max_position_embeddings", 2048)
                )
                scaling = Llama3RopeScaling.from_dict(
                    {k: rope[k] for k in ("factor", "low_freq_factor", "high_freq_factor")}
                    | {"original_max_position_embeddings": original}
                )
            num_heads = d["num_attention_heads"]
            return cls(
                vocab_size=d["vocab_size"],
                hidden_size=d["hidden_size"],
                intermediate_size=d["intermediate_size"],
                num_hidden_layers=d["num_hidden_layers"],
                num_attention_heads=num_heads,
                num_key_value_heads=d.get("num_key_value_heads") or num_heads,
                head_dim=d.get("head_dim") or d["hidden_size"] // num_heads,
                rms_norm_eps=d.get("rms_norm_eps", 1e-6),
                rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10_000.0))),
                rope_scaling=scaling,
                max_position_embeddings=d.get("max_position_embeddings", 2048),
                attention_bias=bool(d.get("attention_bias", False)),
                mlp_bias=bool(d.get("mlp_bias", False)),
                tie_word_embeddings=d.get("tie_word_embeddings", False),
            )
        except KeyError as e:
            raise ModelError(f"Llama3 config is missing required key {e.args[0]!r}") from None

    def to_hf_dict(
        self,
        *,
        torch_dtype: str = "float32",
        bos_token_id: int | None = None,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
    ) -> dict[str, Any]:
        """A config.json that transformers loads as LlamaForCausalLM.

        RoPE is written both as transformers 5's `rope_parameters` and as the older `rope_theta` +
        `rope_scaling`, so older readers (vLLM, transformers 4) load it too.
        """
        rope_scaling = None
        if self.rope_scaling is not None:
            rope_scaling = {"rope_type": "llama3", **asdict(self.rope_scaling)}
        d: dict[str, Any] = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **asdict(self)}
        d.update(
            hidden_act="silu",
            attention_dropout=0.0,
            pretraining_tp=1,
            rope_parameters={"rope_theta": self.rope_theta, "rope_type": "default", **(rope_scaling or {})},
            rope_scaling=rope_scaling,
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
        """Parameter count, norms and biases included; embedding accounting as Qwen3Config.num_params."""
        D, Dh, F, L = self.hidden_size, self.head_dim, self.intermediate_size, self.num_hidden_layers
        H, K = self.num_attention_heads, self.num_key_value_heads
        assert Dh is not None  # set by __post_init__
        attn = D * Dh * (2 * H + 2 * K) + (Dh * (H + 2 * K) + D if self.attention_bias else 0)
        mlp = 3 * D * F + (2 * F + D if self.mlp_bias else 0)
        total = L * (attn + mlp + 2 * D) + D  # + final norm
        embedding = self.vocab_size * D
        if include_embedding:
            total += embedding
        if not self.tie_word_embeddings:
            total += embedding  # the separate lm_head is a matmul weight, counted even without embeddings
        return total


class Llama3ForCausalLM(DecoderLM):
    """Llama 3 causal LM: pre-norm blocks, GQA without q/k norms, SwiGLU, optional llama3 RoPE scaling."""

    def __init__(self, config: Llama3Config) -> None:
        c = config
        assert c.head_dim is not None  # set by __post_init__
        scale = None
        if c.rope_scaling is not None:
            scale = functools.partial(llama3_scale_inv_freq, **asdict(c.rope_scaling))
        super().__init__(
            c,
            RotaryEmbedding(c.head_dim, c.rope_theta, scale_inv_freq=scale),
            lambda i: TransformerBlock(
                Attention(
                    c.hidden_size,
                    c.num_attention_heads,
                    c.num_key_value_heads,
                    c.head_dim,
                    qk_norm=False,
                    norm_eps=c.rms_norm_eps,
                    bias=c.attention_bias,
                ),
                SwiGLU(c.hidden_size, c.intermediate_size, bias=c.mlp_bias),
                c.hidden_size,
                c.rms_norm_eps,
            ),
        )


# Our parameter names <-> HF names. "{i}" is the layer index. Bias entries apply only when the config has them.
HF_KEY_MAP: dict[str, str] = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
    "layers.{i}.attention_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "layers.{i}.mlp_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    **{
        f"layers.{{i}}.attention.{p}.{w}": f"model.layers.{{i}}.self_attn.{p}.{w}"
        for p in ("q_proj", "k_proj", "v_proj", "o_proj")
        for w in ("weight", "bias")
    },
    **{
        f"layers.{{i}}.mlp.{p}.{w}": f"model.layers.{{i}}.mlp.{p}.{w}"
        for p in ("gate_proj", "up_proj", "down_proj")
        for w in ("weight", "bias")
    },
}


def _bias_enabled(config: Llama3Config) -> Callable[[str], bool]:
    def keep(name: str) -> bool:
        if not name.endswith(".bias"):
            return True
        return config.attention_bias if ".attention." in name else config.mlp_bias

    return keep


def expected_keys(config: Llama3Config) -> list[str]:
    """Every parameter name our model has (lm_head only when untied, biases only when enabled)."""
    return decoder.expected_keys(HF_KEY_MAP, config, _bias_enabled(config))


def to_hf_state_dict(sd: dict[str, torch.Tensor], config: Llama3Config) -> dict[str, torch.Tensor]:
    return decoder.to_hf(sd, config, HF_KEY_MAP, "Llama3")


def from_hf_state_dict(
    sd: dict[str, torch.Tensor], config: Llama3Config, *, strict: bool = True
) -> dict[str, torch.Tensor]:
    """Rename an HF Llama state dict to our names (see decoder.from_hf for the rules)."""
    return decoder.from_hf(
        sd, HF_KEY_MAP, expected_keys(config), "Llama", strict=strict, tied=config.tie_word_embeddings
    )
