"""Gemma 3 text decoder (HF `Gemma3ForCausalLM`, model_type "gemma3_text"): definition, config, HF names.

Same contract as qwen3.py: forward() returns FINAL-NORMED hidden states, packed rows work through
`position_ids_BT` and `doc_ids_BT`, module names are the unified ones. What Gemma 3 does differently:
  * RMSNorm scales by (1 + w), in fp32, with w initialised to zeros (`GemmaRMSNorm`);
  * embeddings are multiplied by sqrt(hidden_size), rounded to the weights' dtype first;
  * four norms per block: the attention and MLP outputs are normed again before the residual add;
  * q/k norms before RoPE, softmax scale query_pre_attn_scalar**-0.5 (not head_dim**-0.5);
  * gated MLP with tanh-approximated GELU ("gelu_pytorch_tanh");
  * layers alternate sliding-window ("sliding_attention") and global ("full_attention") attention, each kind
    with its own RoPE: base rope_local_base_freq for sliding layers, rope_theta (optionally with linear
    scaling, as Gemma 3 4B/12B/27B ship) for global ones.
Parity with `transformers.Gemma3ForCausalLM` is pinned by tests/parity/test_gemma3_logits.py.

Shape legend:
    B  batch size (rows)      T  tokens per row      D  hidden_size      V  vocab_size
    Dh head_dim
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from posttrain.errors import ModelError
from posttrain.models import decoder
from posttrain.models.components import Attention, RotaryEmbedding, SwiGLU
from posttrain.models.decoder import DecoderLM

if TYPE_CHECKING:
    from posttrain.models.kv_cache import LayerKVCache

LAYER_TYPES = ("sliding_attention", "full_attention")


class GemmaRMSNorm(nn.Module):
    """RMSNorm with Gemma's (1 + w) scale; the whole computation, weight multiply included, is in fp32.

    This is HF Gemma3RMSNorm op for op: Llama/Qwen cast to the input dtype before the weight multiply,
    Gemma casts after it, which differs by an ulp in bf16. Zero-initialised weights make it the identity scale.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_fp32 = x.float()
        out = x_fp32 * torch.rsqrt(x_fp32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * (1.0 + self.weight.float())).type_as(x)

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """HF "gelu_pytorch_tanh": torch's fused tanh-GELU (the python formula differs by rounding)."""
    return F.gelu(x, approximate="tanh")


def _linear_scale(inv_freq: torch.Tensor, factor: float) -> torch.Tensor:
    return inv_freq / factor  # HF `_compute_linear_scaling_rope_parameters`: positions / factor


class Gemma3Block(nn.Module):
    """Sandwich-norm block: h = x + post_attn_norm(attn(attn_norm(x))); h + post_mlp_norm(mlp(mlp_norm(h))).

    HF names: attention_norm = input_layernorm, post_attention_norm = post_attention_layernorm,
    mlp_norm = pre_feedforward_layernorm, post_mlp_norm = post_feedforward_layernorm.
    """

    def __init__(self, attention: Attention, mlp: nn.Module, hidden_size: int, norm_eps: float) -> None:
        super().__init__()
        self.attention_norm = GemmaRMSNorm(hidden_size, norm_eps)
        self.attention = attention
        self.post_attention_norm = GemmaRMSNorm(hidden_size, norm_eps)
        self.mlp_norm = GemmaRMSNorm(hidden_size, norm_eps)
        self.mlp = mlp
        self.post_mlp_norm = GemmaRMSNorm(hidden_size, norm_eps)

    def forward(
        self,
        x_BTD: torch.Tensor,
        cos_BTDh: torch.Tensor,
        sin_BTDh: torch.Tensor,
        mask_B1TT: torch.Tensor | None,
        kv_cache: LayerKVCache | None = None,
    ) -> torch.Tensor:
        attn_in_BTD = self.attention_norm(x_BTD)
        attn_BTD = self.attention(attn_in_BTD, cos_BTDh, sin_BTDh, mask_B1TT, kv_cache=kv_cache)
        h_BTD = x_BTD + self.post_attention_norm(attn_BTD)
        return h_BTD + self.post_mlp_norm(self.mlp(self.mlp_norm(h_BTD)))


@dataclass
class Gemma3Config:
    """Architecture of a Gemma 3 text model. Field names, meanings and defaults are HF Gemma3TextConfig's."""

    vocab_size: int  # number of token embeddings (rows of the embedding / output matrix)
    hidden_size: int  # model width D
    intermediate_size: int  # gated-MLP inner width F
    num_hidden_layers: int  # number of transformer blocks
    num_attention_heads: int  # query heads H
    num_key_value_heads: int  # key/value heads K (GQA); H % K == 0
    head_dim: int  # per-head width Dh (decoupled from D / H)
    query_pre_attn_scalar: int = 256  # softmax scale is query_pre_attn_scalar**-0.5
    sliding_window: int | None = 4096  # keys a sliding layer sees, the query's own included (tokens)
    layer_types: list[str] | None = None  # per layer "sliding_attention" | "full_attention"; None = pattern
    sliding_window_pattern: int = 6  # every pattern-th layer is global (used only when layer_types is None)
    rms_norm_eps: float = 1e-6  # epsilon inside every norm
    rope_theta: float = 1_000_000.0  # RoPE base of global (full_attention) layers
    rope_local_base_freq: float = 10_000.0  # RoPE base of sliding layers
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "linear", "factor": f}: global layers only
    max_position_embeddings: int = 131_072  # longest context the model is meant for (tokens); informational
    attention_bias: bool = False  # biases on q/k/v/o projections
    tie_word_embeddings: bool = True  # output matrix is the embedding matrix (all Gemma 3 releases)

    def __post_init__(self) -> None:
        if self.layer_types is None:  # HF's rule: layer i is global iff (i + 1) % pattern == 0
            p = self.sliding_window_pattern
            self.layer_types = [LAYER_TYPES[(i + 1) % p == 0] for i in range(self.num_hidden_layers)]
        self.layer_types = list(self.layer_types)
        unknown = sorted(set(self.layer_types) - set(LAYER_TYPES))
        if unknown:
            raise ModelError(f"Gemma3 layer_types: unknown kinds {unknown} (only {list(LAYER_TYPES)})")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ModelError(
                f"Gemma3 layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers"
            )
        if "sliding_attention" in self.layer_types and not self.sliding_window:
            raise ModelError("Gemma3 config has sliding_attention layers but no sliding_window")
        if self.rope_scaling is not None:
            rs = dict(self.rope_scaling)
            rope_type = rs.get("rope_type", rs.get("type", "default"))
            if rope_type != "linear":
                raise ModelError(
                    f"unsupported Gemma3 feature: rope_type {rope_type!r} on full_attention layers "
                    "(only 'default' and 'linear')"
                )
            if "factor" not in rs:
                raise ModelError("Gemma3 linear rope scaling is missing required key 'factor'")
            self.rope_scaling = {"rope_type": "linear", "factor": float(rs["factor"])}

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> Gemma3Config:
        """Read an HF config.json dict (transformers 4 or 5 style); refuse features we do not implement.

        Absent keys take HF Gemma3TextConfig's defaults, so a checkpoint means here what it means there.
        """
        model_type = d.get("model_type", "gemma3_text")
        if model_type != "gemma3_text":
            hint = " (multimodal Gemma3: only the text model is supported)" if model_type == "gemma3" else ""
            raise ModelError(f"config model_type is {model_type!r}, expected 'gemma3_text'{hint}")
        for key in ("final_logit_softcapping", "attn_logit_softcapping"):
            if d.get(key) is not None:
                raise ModelError(f"unsupported Gemma3 feature: {key}={d[key]} (only null)")
        if d.get("use_bidirectional_attention"):
            raise ModelError("unsupported Gemma3 feature: use_bidirectional_attention=true")
        act = d.get("hidden_activation") or "gelu_pytorch_tanh"
        if act != "gelu_pytorch_tanh":
            raise ModelError(
                f"unsupported Gemma3 feature: hidden_activation {act!r} (only 'gelu_pytorch_tanh')"
            )
        if d.get("attention_dropout") or 0.0:
            raise ModelError(
                f"unsupported Gemma3 feature: attention_dropout={d['attention_dropout']} (only 0)"
            )
        # transformers 5: rope_parameters keyed by layer type. Older: rope_theta (global), rope_local_base_freq
        # (sliding), rope_scaling (global only). As HF does, an old rope_scaling is merged over the new dict.
        params = d.get("rope_parameters") or {}
        if params and not set(params) & set(LAYER_TYPES):
            raise ModelError(
                f"Gemma3 rope_parameters must be keyed by layer type {list(LAYER_TYPES)}, got {sorted(params)}"
            )
        full = dict(params.get("full_attention") or {}) | dict(d.get("rope_scaling") or {})
        sliding = dict(params.get("sliding_attention") or {})
        full.setdefault("rope_theta", d["rope_theta"] if d.get("rope_theta") is not None else 1_000_000.0)
        sliding.setdefault("rope_theta", d.get("rope_local_base_freq") or 10_000.0)
        for kind, rope in (("full_attention", full), ("sliding_attention", sliding), ("config", d)):
            if rope.get("partial_rotary_factor") not in (None, 1.0):
                raise ModelError(f"unsupported Gemma3 feature: partial_rotary_factor != 1 ({kind})")
        sliding_type = sliding.get("rope_type", sliding.get("type", "default"))
        if sliding_type != "default":
            raise ModelError(
                f"unsupported Gemma3 feature: rope_type {sliding_type!r} on sliding_attention layers "
                "(only 'default')"
            )
        full_type = full.get("rope_type", full.get("type", "default"))
        try:
            num_heads = d["num_attention_heads"]
            return cls(
                vocab_size=d["vocab_size"],
                hidden_size=d["hidden_size"],
                intermediate_size=d["intermediate_size"],
                num_hidden_layers=d["num_hidden_layers"],
                num_attention_heads=num_heads,
                num_key_value_heads=d.get("num_key_value_heads") or 4,
                head_dim=d.get("head_dim") or 256,
                query_pre_attn_scalar=d.get("query_pre_attn_scalar") or 256,
                sliding_window=d.get("sliding_window", 4096),
                layer_types=d.get("layer_types"),
                sliding_window_pattern=d.get("sliding_window_pattern") or 6,
                rms_norm_eps=d.get("rms_norm_eps", 1e-6),
                rope_theta=float(full["rope_theta"]),
                rope_local_base_freq=float(sliding["rope_theta"]),
                rope_scaling=None if full_type == "default" else {**full, "rope_type": full_type},
                max_position_embeddings=d.get("max_position_embeddings", 131_072),
                attention_bias=bool(d.get("attention_bias", False)),
                tie_word_embeddings=d.get("tie_word_embeddings", True),
            )
        except KeyError as e:
            raise ModelError(f"Gemma3 config is missing required key {e.args[0]!r}") from None

    def to_hf_dict(
        self,
        *,
        torch_dtype: str = "float32",
        bos_token_id: int | None = None,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
    ) -> dict[str, Any]:
        """A config.json that transformers loads as Gemma3ForCausalLM.

        RoPE is written both as transformers 5's per-layer-type `rope_parameters` and as the older
        `rope_theta` + `rope_local_base_freq` + `rope_scaling`, so older readers (vLLM, transformers 4) load it.
        Readers older than `layer_types` use `sliding_window_pattern`, which agrees unless layer_types was
        given explicitly with a different layout.
        """
        full = {"rope_type": "default", **(self.rope_scaling or {}), "rope_theta": self.rope_theta}
        d: dict[str, Any] = {
            "architectures": ["Gemma3ForCausalLM"],
            "model_type": "gemma3_text",
            **asdict(self),
        }
        d.update(
            hidden_activation="gelu_pytorch_tanh",
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": self.rope_local_base_freq},
                "full_attention": full,
            },
            attention_dropout=0.0,
            final_logit_softcapping=None,
            attn_logit_softcapping=None,
            use_bidirectional_attention=False,
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
        D, Dh, L = self.hidden_size, self.head_dim, self.num_hidden_layers
        H, K = self.num_attention_heads, self.num_key_value_heads
        attn = D * Dh * (2 * H + 2 * K) + 2 * Dh  # + q/k norms
        if self.attention_bias:
            attn += Dh * (H + 2 * K) + D
        total = L * (attn + 3 * D * self.intermediate_size + 4 * D) + D  # 4 block norms; + final norm
        embedding = self.vocab_size * D
        if include_embedding:
            total += embedding
        if not self.tie_word_embeddings:
            total += embedding  # the separate lm_head is a matmul weight, counted even without embeddings
        return total


class Gemma3ForCausalLM(DecoderLM):
    """Gemma 3 causal LM: sandwich-norm blocks, q/k norms, GeGLU, alternating sliding/global attention."""

    def __init__(self, config: Gemma3Config) -> None:
        c = config
        scale = None
        if c.rope_scaling is not None:  # partial, not a lambda: configs and models stay picklable
            scale = functools.partial(_linear_scale, factor=c.rope_scaling["factor"])
        rotary = {
            "sliding_attention": RotaryEmbedding(c.head_dim, c.rope_local_base_freq),
            "full_attention": RotaryEmbedding(c.head_dim, c.rope_theta, scale_inv_freq=scale),
        }
        super().__init__(
            c,
            rotary,
            lambda i: Gemma3Block(
                Attention(
                    c.hidden_size,
                    c.num_attention_heads,
                    c.num_key_value_heads,
                    c.head_dim,
                    qk_norm=True,
                    norm_eps=c.rms_norm_eps,
                    bias=c.attention_bias,
                    scale=c.query_pre_attn_scalar**-0.5,
                    make_norm=GemmaRMSNorm,
                ),
                SwiGLU(c.hidden_size, c.intermediate_size, activation=gelu_tanh),
                c.hidden_size,
                c.rms_norm_eps,
            ),
            layer_types=c.layer_types,
            sliding_window=c.sliding_window,
            make_norm=GemmaRMSNorm,
            # HF multiplies by a tensor(sqrt(D)) cast to the weights' dtype (55.43 -> 55.5 in bf16); so do we.
            embed_scale=c.hidden_size**0.5,
        )


# Our parameter names <-> HF names. "{i}" is the layer index. Bias entries apply only with attention_bias.
HF_KEY_MAP: dict[str, str] = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
    "layers.{i}.attention_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "layers.{i}.post_attention_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "layers.{i}.mlp_norm.weight": "model.layers.{i}.pre_feedforward_layernorm.weight",
    "layers.{i}.post_mlp_norm.weight": "model.layers.{i}.post_feedforward_layernorm.weight",
    **{
        f"layers.{{i}}.attention.{p}.{w}": f"model.layers.{{i}}.self_attn.{p}.{w}"
        for p in ("q_proj", "k_proj", "v_proj", "o_proj")
        for w in ("weight", "bias")
    },
    "layers.{i}.attention.q_norm.weight": "model.layers.{i}.self_attn.q_norm.weight",
    "layers.{i}.attention.k_norm.weight": "model.layers.{i}.self_attn.k_norm.weight",
    **{
        f"layers.{{i}}.mlp.{p}.weight": f"model.layers.{{i}}.mlp.{p}.weight"
        for p in ("gate_proj", "up_proj", "down_proj")
    },
}


def expected_keys(config: Gemma3Config) -> list[str]:
    """Every parameter name our model has (lm_head only when untied, biases only with attention_bias)."""
    return decoder.expected_keys(
        HF_KEY_MAP, config, lambda k: config.attention_bias or not k.endswith(".bias")
    )


def to_hf_state_dict(sd: dict[str, torch.Tensor], config: Gemma3Config) -> dict[str, torch.Tensor]:
    return decoder.to_hf(sd, config, HF_KEY_MAP, "Gemma3")


def from_hf_state_dict(
    sd: dict[str, torch.Tensor], config: Gemma3Config, *, strict: bool = True
) -> dict[str, torch.Tensor]:
    """Rename an HF Gemma3 state dict to our names (see decoder.from_hf for the rules)."""
    return decoder.from_hf(
        sd, HF_KEY_MAP, expected_keys(config), "Gemma3", strict=strict, tied=config.tie_word_embeddings
    )
