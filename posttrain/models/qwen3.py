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

import re
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from posttrain.errors import ModelError
from posttrain.models.components import (
    Attention,
    RMSNorm,
    RotaryEmbedding,
    SwiGLU,
    TransformerBlock,
    build_attention_mask,
)


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
        model_type = d.get("model_type", "qwen3")
        if model_type != "qwen3":
            raise ModelError(f"config model_type is {model_type!r}, expected 'qwen3'")
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
            return cls(
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


class Qwen3ForCausalLM(nn.Module):
    """Qwen3 dense causal LM. forward() returns final-normed hidden states; see the module docstring."""

    def __init__(self, config: Qwen3Config) -> None:
        super().__init__()
        self.config = config
        c = config
        self.tok_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.rotary = RotaryEmbedding(c.head_dim, c.rope_theta)
        self.layers = nn.ModuleList(
            TransformerBlock(
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
            )
            for _ in range(c.num_hidden_layers)
        )
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = None if c.tie_word_embeddings else nn.Linear(c.hidden_size, c.vocab_size, bias=False)

    def forward(
        self,
        input_ids_BT: torch.Tensor,
        position_ids_BT: torch.Tensor | None = None,
        doc_ids_BT: torch.Tensor | None = None,
        *,
        return_hidden_states: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Final-normed hidden states h_BTD.

        position_ids_BT defaults to arange(T) per row; doc_ids_BT (int, same shape) restricts attention to
        tokens of the same document (packing). With return_hidden_states=True also return
        [embeddings, block 0 output, ..., block L-1 output] for locating numerical divergence.
        """
        B, T = input_ids_BT.shape
        x_BTD = self.tok_embeddings(input_ids_BT)
        if position_ids_BT is None:
            position_ids_BT = torch.arange(T, device=input_ids_BT.device).expand(B, T)
        cos_BTDh, sin_BTDh = self.rotary(x_BTD, position_ids_BT)
        mask_B1TT = None if doc_ids_BT is None else build_attention_mask(doc_ids_BT)
        hidden: list[torch.Tensor] = [x_BTD]
        for layer in self.layers:
            x_BTD = layer(x_BTD, cos_BTDh, sin_BTDh, mask_B1TT)
            if return_hidden_states:
                hidden.append(x_BTD)
        h_BTD = self.norm(x_BTD)
        return (h_BTD, hidden) if return_hidden_states else h_BTD

    def output_weight(self) -> torch.Tensor:
        """The [V, D] output matrix: lm_head.weight, or the embedding matrix when tied."""
        return self.tok_embeddings.weight if self.lm_head is None else self.lm_head.weight

    def logits(self, h_BTD: torch.Tensor) -> torch.Tensor:
        """Full [B, T, V] logits; for generation/eval only (training applies output_weight in chunks)."""
        return h_BTD @ self.output_weight().T

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """normal(0, std) for linears and embeddings, ones for norms; deterministic under torch.manual_seed."""
        for module in self.modules():  # registration order is fixed, so the RNG stream is too
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                module.reset_parameters()
        self.rebuild_buffers()

    def rebuild_buffers(self) -> None:
        """Recompute RoPE inv_freq (non-persistent, so garbage after meta-device init + to_empty)."""
        self.rotary.reset_parameters()


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
_LAYER_RE = re.compile(r"(?<=layers\.)(\d+)(?=\.)")
_OURS_TO_HF = HF_KEY_MAP
_HF_TO_OURS = {hf: ours for ours, hf in HF_KEY_MAP.items()}


def _rename(name: str, table: dict[str, str]) -> str | None:
    """Map one name through a template table; None when it has no entry."""
    m = _LAYER_RE.search(name)
    template = _LAYER_RE.sub("{i}", name, count=1) if m else name
    target = table.get(template)
    if target is None:
        return None
    return target.replace("{i}", m.group(1)) if m else target


def expected_keys(config: Qwen3Config) -> list[str]:
    """Every parameter name our model has for this config (lm_head only when untied)."""
    keys = []
    for ours in HF_KEY_MAP:
        if ours == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if "{i}" in ours:
            keys += [ours.replace("{i}", str(i)) for i in range(config.num_hidden_layers)]
        else:
            keys.append(ours)
    return keys


def to_hf_state_dict(sd: dict[str, torch.Tensor], config: Qwen3Config) -> dict[str, torch.Tensor]:
    """Rename our state dict to HF names (tensors are shared, not copied). Tied models carry no lm_head."""
    out: dict[str, torch.Tensor] = {}
    unexpected = []
    for name, tensor in sd.items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        hf = _rename(name, _OURS_TO_HF)
        if hf is None:
            unexpected.append(name)
        else:
            out[hf] = tensor
    if unexpected:
        raise ModelError(f"Qwen3 state dict has keys with no HF name: {sorted(unexpected)}")
    return out


def from_hf_state_dict(
    sd: dict[str, torch.Tensor], config: Qwen3Config, *, strict: bool = True
) -> dict[str, torch.Tensor]:
    """Rename an HF Qwen3 state dict to our names.

    A tied model ignores HF's lm_head.weight (some exports write it anyway). Unknown keys always raise;
    missing keys raise unless strict=False (hf_io loads one tensor at a time and checks completeness itself).
    """
    out: dict[str, torch.Tensor] = {}
    unexpected = []
    for name, tensor in sd.items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if name.endswith("rotary_emb.inv_freq"):
            continue  # a buffer some old exports saved; we recompute it
        ours = _rename(name, _HF_TO_OURS)
        if ours is None or not _layer_in_range(ours, config):
            unexpected.append(name)
        else:
            out[ours] = tensor
    missing = sorted(set(expected_keys(config)) - set(out)) if strict else []
    if unexpected or missing:
        raise ModelError(
            f"HF Qwen3 checkpoint does not match the config: missing keys {missing}, unexpected keys {sorted(unexpected)}"
        )
    return out


def _layer_in_range(name: str, config: Qwen3Config) -> bool:
    m = _LAYER_RE.search(name)
    return m is None or int(m.group(1)) < config.num_hidden_layers
