"""GPT-OSS (gpt-oss-20b, gpt-oss-120b): our definition, its config, and the mapping to/from HF names.

Same contract as qwen3.py (forward returns final-normed hidden states, packing through position/doc ids,
unified module names). What GPT-OSS adds, each matched to `transformers.GptOssForCausalLM` op for op:
  * attention with q/k/v/o biases and a learned per-head SINK logit: the softmax runs over
    [scores, sink_h] and the sink column is dropped, so a head can put weight "nowhere". SDPA has no sinks,
    so `SinkAttention` computes attention explicitly (O(T^2) scores per head, as HF's eager path);
  * layers alternating sliding-window (`sliding_window` keys, the query's own included) and full attention;
  * YaRN RoPE: blended inv_freq and an attention factor multiplied into cos/sin (`YarnRotaryEmbedding`);
  * a top-k MoE whose experts are stored FUSED as HF stores them (`mlp.experts.gate_up_proj` [E, D, 2F]
    with gate/up interleaved on the last dim, plus biases), with a clamped SwiGLU;
  * RMSNorm that multiplies the weight in fp32 before casting back (Llama's casts first).
Checkpoints must be dequantized (bf16/fp32): the Hub's MXFP4 ones are refused. Parity, routing included,
is pinned by tests/parity/test_gpt_oss_logits.py.

Shape legend:
    B batch   T tokens per row   D hidden_size   H query heads   K kv heads   Dh head_dim
    S keys (T; in generation every cached slot)   N tokens (B*T flattened)   E experts   k experts per token   F expert width (intermediate_size)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from posttrain.errors import ModelError
from posttrain.models import decoder
from posttrain.models.components import (
    Attention,
    RMSNorm,
    RotaryEmbedding,
    TransformerBlock,
    apply_rotary,
    is_block_mask,
)
from posttrain.models.decoder import DecoderLM
from posttrain.models.moe import model_aux_loss

if TYPE_CHECKING:
    from posttrain.models.kv_cache import LayerKVCache

LAYER_TYPES = ("sliding_attention", "full_attention")


@dataclass
class YarnRopeScaling:
    """YaRN RoPE (HF rope_type "yarn"). gpt-oss ships factor 32, betas 32/1, 4096 tokens, truncate false."""

    factor: float  # context extension factor: low frequencies are divided by it
    original_max_position_embeddings: int  # pre-training context length (tokens)
    beta_fast: float = 32.0  # rotations above which a frequency is kept (extrapolated)
    beta_slow: float = 1.0  # rotations below which a frequency is divided by factor (interpolated)
    truncate: bool = True  # round the correction range to whole dims (HF's default when absent)
    attention_factor: float | None = None  # cos/sin multiplier; None = 0.1 * ln(factor) + 1 (YaRN's)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> YarnRopeScaling:
        rope_type = d.get("rope_type", d.get("type", "yarn"))
        if rope_type != "yarn":
            raise ModelError(f"GPT-OSS rope_scaling: rope_type {rope_type!r} is not supported (only 'yarn')")
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - {*valid, "rope_type", "type"})
        if unknown:  # e.g. DeepSeek's mscale / mscale_all_dim: a different attention factor we do not do
            raise ModelError(f"GPT-OSS rope_scaling: unsupported keys {unknown} (valid: {valid})")
        try:
            return cls(**{k: d[k] for k in valid if d.get(k) is not None})
        except TypeError as e:
            raise ModelError(f"GPT-OSS rope_scaling: {e}") from None

    def get_attention_factor(self) -> float:
        if self.attention_factor is not None:
            return self.attention_factor
        return 1.0 if self.factor <= 1 else 0.1 * math.log(self.factor) + 1.0


def _default_rope_scaling() -> YarnRopeScaling:
    return YarnRopeScaling(factor=32.0, original_max_position_embeddings=4096, truncate=False)


@dataclass
class GptOssConfig:
    """Architecture of a GPT-OSS model. Field names, meanings and defaults are HF GptOssConfig's."""

    vocab_size: int  # number of token embeddings
    hidden_size: int  # model width D
    num_hidden_layers: int  # number of transformer blocks
    num_attention_heads: int  # query heads H
    intermediate_size: int = 2880  # inner width F of one expert
    num_key_value_heads: int = 8  # key/value heads K (GQA); H % K == 0
    num_local_experts: int = 128  # experts per layer E (every layer is sparse)
    num_experts_per_tok: int = 4  # experts each token is routed to k
    head_dim: int = 64  # per-head width Dh (decoupled from D / H: gpt-oss has 2880 / 64 heads)
    sliding_window: int | None = 128  # keys a sliding_attention layer sees, the query's own included
    layer_types: list[str] | None = None  # per layer; None = HF's default (sliding, full, sliding, ...)
    rms_norm_eps: float = 1e-5  # epsilon inside every RMSNorm
    rope_theta: float = 150_000.0  # RoPE base wavelength
    rope_scaling: YarnRopeScaling | None = field(default_factory=_default_rope_scaling)  # None = plain RoPE
    max_position_embeddings: int = 131_072  # longest context the model is meant for; informational
    attention_bias: bool = True  # biases on q/k/v/o projections
    swiglu_limit: float = 7.0  # clamp on the expert gate (above) and up projection (both sides)
    swiglu_alpha: float = 1.702  # sigmoid gain of the expert SwiGLU
    router_aux_loss_coef: float = 0.001  # weight of the load-balancing loss a recipe adds
    tie_word_embeddings: bool = False  # output matrix is the embedding matrix

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):  # from YAML / build_model
            self.rope_scaling = YarnRopeScaling.from_dict(self.rope_scaling)
        if self.layer_types is None:  # HF's default: sliding, full, sliding, ...
            self.layer_types = [LAYER_TYPES[i % 2] for i in range(self.num_hidden_layers)]
        self.layer_types = list(self.layer_types)
        bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
        if bad or len(self.layer_types) != self.num_hidden_layers:
            raise ModelError(
                f"GPT-OSS layer_types must be {self.num_hidden_layers} entries from {LAYER_TYPES}, "
                f"got {self.layer_types}"
            )
        if not 0 < self.num_experts_per_tok <= self.num_local_experts:
            raise ModelError(
                f"num_experts_per_tok={self.num_experts_per_tok} must be in 1..{self.num_local_experts}"
            )

    @property
    def num_experts(self) -> int:
        """E under the name shared code reads (HF's attribute_map alias too)."""
        return self.num_local_experts

    @property
    def moe_intermediate_size(self) -> int:
        """Expert width under the name FLOPs accounting reads (GPT-OSS's intermediate_size)."""
        return self.intermediate_size

    def is_sparse(self, layer: int) -> bool:
        """Every GPT-OSS layer routes to experts."""
        return True

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> GptOssConfig:
        """Read an HF config.json dict (transformers 4 or 5 style); refuse what we do not implement.

        Our field names are HF's and so are our defaults, so an absent key means what it means there.
        """
        if d.get("model_type", "gpt_oss") != "gpt_oss":
            raise ModelError(f"config model_type is {d['model_type']!r}, expected 'gpt_oss'")
        if d.get("quantization_config"):
            method = d["quantization_config"].get("quant_method", "unknown")
            raise ModelError(
                f"quantized GPT-OSS checkpoint (quant_method {method!r}) is not supported: use a "
                "dequantized bf16 checkpoint (e.g. load with transformers and Mxfp4Config(dequantize=True), "
                "then save_pretrained)"
            )
        required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
        if missing := [k for k in required if k not in d]:
            raise ModelError(f"GPT-OSS config is missing required keys {missing}")
        kw = {f.name: d[f.name] for f in fields(cls) if f.name in d and not f.name.startswith("rope_")}
        if "num_local_experts" not in d and "num_experts" in d:  # HF's attribute_map alias
            kw["num_local_experts"] = d["num_experts"]
        if kw.get("head_dim", 0) is None:
            kw["head_dim"] = d["hidden_size"] // d["num_attention_heads"]
        if kw.get("num_key_value_heads", 0) is None:
            kw["num_key_value_heads"] = d["num_attention_heads"]
        # As transformers 5: an old-style rope_scaling wins over rope_parameters, and a rope_theta inside
        # the chosen dict wins over the top-level one.
        default = {"rope_type": "yarn", **asdict(_default_rope_scaling())}  # HF's when none is named
        rope = dict(d.get("rope_scaling") or d.get("rope_parameters") or default)
        rope_type = rope.pop("rope_type", rope.pop("type", "default"))
        kw["rope_theta"] = float(rope.pop("rope_theta", d.get("rope_theta", 150_000.0)))
        if rope.pop("partial_rotary_factor", d.get("partial_rotary_factor", 1.0)) != 1.0:
            raise ModelError("unsupported GPT-OSS feature: partial_rotary_factor != 1")
        if rope_type not in ("default", "yarn"):
            raise ModelError(f"unsupported GPT-OSS feature: rope_type {rope_type!r} (only 'yarn', 'default')")
        kw["rope_scaling"] = None
        if rope_type == "yarn":
            # As HF: a top-level original_max_position_embeddings wins, then the rope dict's, then max.
            max_pos = d.get("max_position_embeddings", 131_072)
            original = d.get("original_max_position_embeddings") or rope.get(
                "original_max_position_embeddings", max_pos
            )
            factor = rope.get("factor") or max_pos / original
            kw["rope_scaling"] = YarnRopeScaling.from_dict(
                rope | {"original_max_position_embeddings": original, "factor": factor}
            )
        return cls(**kw)

    def to_hf_dict(self, *, torch_dtype: str = "float32", **token_ids: Any) -> dict[str, Any]:
        """A config.json that transformers loads as GptOssForCausalLM; token_ids: bos/eos/pad_token_id.

        RoPE is written both as transformers 5's `rope_parameters` and as the older `rope_theta` +
        `rope_scaling` (the Hub checkpoints' spelling), so older readers load it too.
        """
        rope_scaling = None
        if self.rope_scaling is not None:
            params = {k: v for k, v in asdict(self.rope_scaling).items() if v is not None}
            rope_scaling = {"rope_type": "yarn", **params}
        d: dict[str, Any] = {"architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", **asdict(self)}
        d["rope_parameters"] = {"rope_theta": self.rope_theta, **(rope_scaling or {"rope_type": "default"})}
        d["rope_scaling"] = rope_scaling
        # hidden_act is unused by the model (the experts' activation is fixed); written as HF writes it.
        d |= dict(
            hidden_act="silu", attention_dropout=0.0, initializer_range=0.02, output_router_logits=False
        )
        d |= dict(use_cache=True, dtype=torch_dtype, torch_dtype=torch_dtype)
        return d | dict(bos_token_id=None, eos_token_id=None, pad_token_id=None) | token_ids

    def num_params(self, include_embedding: bool = True) -> int:
        """Total parameters (all experts, sinks, biases, norms); embedding accounting as Qwen3Config's."""
        D, Dh, F_, E = self.hidden_size, self.head_dim, self.intermediate_size, self.num_local_experts
        H, K = self.num_attention_heads, self.num_key_value_heads
        attn = D * Dh * (2 * H + 2 * K) + H + (Dh * (H + 2 * K) + D if self.attention_bias else 0)
        moe = E * D + E + E * (D * 2 * F_ + 2 * F_ + F_ * D + D)  # router, then the fused experts
        total = self.num_hidden_layers * (attn + moe + 2 * D) + D  # + final norm
        embedding = self.vocab_size * D
        if include_embedding:
            total += embedding
        if not self.tie_word_embeddings:
            total += embedding
        return total


class YarnRotaryEmbedding(RotaryEmbedding):
    """RoPE with optional YaRN: inv_freq as HF's `_compute_yarn_parameters`, cos/sin times attention_factor.

    The factor is applied to cos/sin in fp32 before the cast, as HF does (so it also scales q.k by its
    square: YaRN's temperature). scaling=None is plain RoPE (factor 1.0, an exact no-op multiply).
    """

    def __init__(self, head_dim: int, rope_theta: float, scaling: YarnRopeScaling | None) -> None:
        self.scaling = scaling  # read by _compute_inv_freq, which RotaryEmbedding.__init__ calls
        self.attention_factor = 1.0 if scaling is None else scaling.get_attention_factor()
        super().__init__(head_dim, rope_theta)

    def _compute_inv_freq(self, device: torch.device | None) -> torch.Tensor:
        s, dim, base = self.scaling, self.head_dim, self.rope_theta
        if s is None:
            return super()._compute_inv_freq(device)

        def correction_dim(num_rotations: float) -> float:  # dim index whose wavelength fits that often
            return (dim * math.log(s.original_max_position_embeddings / (num_rotations * 2 * math.pi))) / (
                2 * math.log(base)
            )

        low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
        if s.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001  # HF's guard against a zero-width ramp
        ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
        pos_freqs = base ** (torch.arange(0, dim, 2).to(device=device, dtype=torch.float) / dim)
        inv_freq_extrapolation = 1.0 / pos_freqs
        inv_freq_interpolation = 1.0 / (s.factor * pos_freqs)
        extrapolation_factor = 1 - ramp.to(device=device, dtype=torch.float)
        return (
            inv_freq_interpolation * (1 - extrapolation_factor)
            + inv_freq_extrapolation * extrapolation_factor
        )

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.inv_freq.to(device=x.device, dtype=torch.float32)
        freqs_BTh = position_ids_BT[..., None].float() * inv_freq
        emb_BTDh = torch.cat((freqs_BTh, freqs_BTh), dim=-1)
        cos = emb_BTDh.cos() * self.attention_factor
        sin = emb_BTDh.sin() * self.attention_factor
        return cos.to(x.dtype), sin.to(x.dtype)


class GptOssRMSNorm(RMSNorm):
    """RMSNorm with the weight multiply in fp32, then the cast (HF GptOssRMSNorm; Llama casts first)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        x_fp32 = x.to(torch.float32)
        variance = x_fp32.pow(2).mean(-1, keepdim=True)
        x_fp32 = x_fp32 * torch.rsqrt(variance + self.eps)
        return (self.weight * x_fp32).to(input_dtype)


class SinkAttention(Attention):
    """GQA attention with biases and a learned sink logit per head (`sinks`, HF self_attn.sinks).

    Computed as HF's eager path: scores = q k^T * scale, masked with finfo.min, [scores, sink] shifted by
    the row max, softmax in the scores' dtype, sink column dropped, then probs @ v.
    """

    def __init__(
        self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, bias: bool
    ) -> None:
        super().__init__(hidden_size, num_heads, num_kv_heads, head_dim, qk_norm=False, bias=bias)
        self.sinks = nn.Parameter(torch.empty(num_heads))

    def init_weights(self, std: float) -> None:
        """HF's init: normal weights and sinks, zero biases. DecoderLM.init_weights leaves a module that has
        init_weights to initialise its own children, so the projections are done here too."""
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.o_proj):
            nn.init.normal_(proj.weight, mean=0.0, std=std)
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)
        nn.init.normal_(self.sinks, mean=0.0, std=std)

    def forward(
        self,
        x_BTD: torch.Tensor,
        cos_BTDh: torch.Tensor,
        sin_BTDh: torch.Tensor,
        mask_B1TT: torch.Tensor | None,
        kv_cache: LayerKVCache | None = None,
    ) -> torch.Tensor:
        """mask_B1TT: bool keep-mask from build_attention_mask, or None for plain causal attention.

        kv_cache: as Attention.forward's (keys become every cached slot, S of them; T == S without one)."""
        B, T, _ = x_BTD.shape
        H, K, Dh = self.num_heads, self.num_kv_heads, self.head_dim
        q_BHTDh = self.q_proj(x_BTD).view(B, T, H, Dh).transpose(1, 2)
        k_BKTDh = self.k_proj(x_BTD).view(B, T, K, Dh).transpose(1, 2)
        v_BKTDh = self.v_proj(x_BTD).view(B, T, K, Dh).transpose(1, 2)
        q_BHTDh, k_BKTDh = apply_rotary(q_BHTDh, k_BKTDh, cos_BTDh, sin_BTDh)
        if kv_cache is not None:
            k_BKTDh, v_BKTDh = kv_cache.update(k_BKTDh, v_BKTDh)
        sinks_H = self.sinks.to_local() if hasattr(self.sinks, "to_local") else self.sinks
        if is_block_mask(mask_B1TT):  # model.attention: flex, sinks through the log-sum-exp
            from posttrain.models import flex

            out_BHTDh = flex.attention(q_BHTDh, k_BKTDh, v_BKTDh, mask_B1TT, self.scale, sinks_H)
            return self.o_proj(out_BHTDh.transpose(1, 2).reshape(B, T, H * Dh))
        S = k_BKTDh.shape[2]  # keys: T, or every cached slot
        # Repeat K/V to H heads exactly as HF's repeat_kv (expand + reshape), so the matmuls are HF's.
        k_BHSDh = k_BKTDh[:, :, None].expand(B, K, H // K, S, Dh).reshape(B, H, S, Dh)
        v_BHSDh = v_BKTDh[:, :, None].expand(B, K, H // K, S, Dh).reshape(B, H, S, Dh)
        scores_BHTS = torch.matmul(q_BHTDh, k_BHSDh.transpose(2, 3)) * self.scale
        if mask_B1TT is None:
            mask_B1TT = torch.ones(T, T, dtype=torch.bool, device=x_BTD.device).tril()[None, None]
        scores_BHTS = scores_BHTS.masked_fill(~mask_B1TT, torch.finfo(scores_BHTS.dtype).min)
        # Under tensor parallel `sinks` is sharded by head (a DTensor); this rank uses its own heads' (above).
        sinks_BHT1 = sinks_H.reshape(1, H, 1, 1).expand(B, H, T, 1).to(scores_BHTS.dtype)
        logits = torch.cat([scores_BHTS, sinks_BHT1], dim=-1)
        logits = logits - logits.max(dim=-1, keepdim=True).values  # HF's overflow guard (bf16)
        probs_BHTS = torch.softmax(logits, dim=-1, dtype=logits.dtype)[..., :-1].to(v_BHSDh.dtype)
        out_BTHDh = torch.matmul(probs_BHTS, v_BHSDh).transpose(1, 2).reshape(B, T, H * Dh)
        return self.o_proj(out_BTHDh)


class TopKRouter(nn.Module):
    """Linear scores (with bias) -> top k -> softmax over the k values only (HF GptOssTopKRouter's order)."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.top_k = top_k
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.bias = nn.Parameter(torch.empty(num_experts))

    def forward(self, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (router logits [N, E], top-k weights [N, k], top-k expert ids [N, k])."""
        logits_NE = F.linear(x_ND, self.weight, self.bias)
        top_Nk, experts_Nk = torch.topk(logits_NE, self.top_k, dim=-1)
        return logits_NE, torch.softmax(top_Nk, dim=1, dtype=top_Nk.dtype), experts_Nk

    def init_weights(self, std: float) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=std)  # HF inits both normally
        nn.init.normal_(self.bias, mean=0.0, std=std)


class FusedExperts(nn.Module):
    """E clamped-SwiGLU experts in HF's fused layout (names are HF's, so the key map is a rename).

    gate_up_proj [E, D, 2F] holds gate and up INTERLEAVED on the last dim (gate = [..., ::2]); weights are
    applied as x @ W (transposed relative to nn.Linear). Compute visits only experts that got tokens.
    """

    def __init__(self, c: GptOssConfig) -> None:
        super().__init__()
        E, D, F_ = c.num_local_experts, c.hidden_size, c.intermediate_size
        self.num_experts, self.limit, self.alpha = E, c.swiglu_limit, c.swiglu_alpha
        self.gate_up_proj = nn.Parameter(torch.empty(E, D, 2 * F_))
        self.gate_up_proj_bias = nn.Parameter(torch.empty(E, 2 * F_))
        self.down_proj = nn.Parameter(torch.empty(E, F_, D))
        self.down_proj_bias = nn.Parameter(torch.empty(E, D))

    def init_weights(self, std: float) -> None:
        nn.init.normal_(self.gate_up_proj, mean=0.0, std=std)  # HF's init: normal weights, zero biases
        nn.init.zeros_(self.gate_up_proj_bias)
        nn.init.normal_(self.down_proj, mean=0.0, std=std)
        nn.init.zeros_(self.down_proj_bias)

    def _apply_gate(self, gate_up_n2F: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up_n2F[..., ::2], gate_up_n2F[..., 1::2]
        gate = gate.clamp(min=None, max=self.limit)  # only from above: the sigmoid tames large negatives
        up = up.clamp(min=-self.limit, max=self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))

    def forward(self, x_ND: torch.Tensor, experts_Nk: torch.Tensor, weights_Nk: torch.Tensor) -> torch.Tensor:
        k = experts_Nk.shape[-1]
        flat = experts_Nk.flatten()  # slot s of token n is entry n * k + s
        order = torch.argsort(flat, stable=True)  # slots grouped by expert, ascending
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()  # the one host sync
        out_ND = torch.zeros_like(x_ND)
        start = 0
        for e, n in enumerate(counts):  # ascending expert order, as HF, so index_add_ sums alike
            if n == 0:
                continue
            idx = order[start : start + n]
            start += n
            token_idx, slot = idx // k, idx % k
            gate_up = x_ND[token_idx] @ self.gate_up_proj[e] + self.gate_up_proj_bias[e]
            y_nD = self._apply_gate(gate_up) @ self.down_proj[e] + self.down_proj_bias[e]
            out_ND.index_add_(0, token_idx, (y_nD * weights_Nk[token_idx, slot, None]).to(out_ND.dtype))
        return out_ND


class GptOssMoE(nn.Module):
    """Router + fused experts. Records `last_router_logits` [N, E] and `last_expert_ids` [N, k] (as moe.MoE)."""

    def __init__(self, c: GptOssConfig) -> None:
        super().__init__()
        self.router = TopKRouter(c.hidden_size, c.num_local_experts, c.num_experts_per_tok)
        self.experts = FusedExperts(c)
        self.last_router_logits: torch.Tensor | None = None  # [N, E] of the last forward (aux loss)
        self.last_expert_ids: torch.Tensor | None = None  # [N, k] of the last forward (tests, stats)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(-1, D)
        logits_NE, weights_Nk, experts_Nk = self.router(x_ND)
        self.last_router_logits, self.last_expert_ids = logits_NE, experts_Nk.detach()
        return self.experts(x_ND, experts_Nk, weights_Nk).reshape(B, T, D)


class GptOssBlock(TransformerBlock):
    """The shared pre-norm block with GPT-OSS's norm convention."""

    def __init__(self, attention: SinkAttention, mlp: GptOssMoE, hidden_size: int, norm_eps: float) -> None:
        super().__init__(attention, mlp, hidden_size, norm_eps)
        self.attention_norm = GptOssRMSNorm(hidden_size, norm_eps)  # replaces in place: same names, order
        self.mlp_norm = GptOssRMSNorm(hidden_size, norm_eps)


class GptOssForCausalLM(DecoderLM):
    """GPT-OSS causal LM: sink attention alternating sliding/full, YaRN RoPE shared by all layers, MoE."""

    def __init__(self, config: GptOssConfig) -> None:
        c = config
        super().__init__(
            c,
            YarnRotaryEmbedding(c.head_dim, c.rope_theta, c.rope_scaling),
            lambda i: GptOssBlock(
                SinkAttention(
                    c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.attention_bias
                ),
                GptOssMoE(c),
                c.hidden_size,
                c.rms_norm_eps,
            ),
            layer_types=c.layer_types,
            sliding_window=c.sliding_window,
            make_norm=GptOssRMSNorm,
        )

    def aux_loss(self) -> torch.Tensor | None:
        """Load-balancing loss of the last forward over all layers (HF's aux_loss, unscaled)."""
        return model_aux_loss(self)


# Our parameter names <-> HF names ("{i}" = layer). Attention biases apply only when the config has them.
_MLP_TENSORS = ("router.weight", "router.bias") + tuple(
    f"experts.{t}" for t in ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")
)
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
    "layers.{i}.attention.sinks": "model.layers.{i}.self_attn.sinks",
    **{f"layers.{{i}}.mlp.{t}": f"model.layers.{{i}}.mlp.{t}" for t in _MLP_TENSORS},
}


def expected_keys(config: GptOssConfig) -> list[str]:
    """Every parameter name our model has (lm_head only when untied, attention biases when enabled)."""

    def keep(name: str) -> bool:
        return config.attention_bias or not (".attention." in name and name.endswith(".bias"))

    return decoder.expected_keys(HF_KEY_MAP, config, keep)


def to_hf_state_dict(sd: dict[str, torch.Tensor], config: GptOssConfig) -> dict[str, torch.Tensor]:
    return decoder.to_hf(sd, config, HF_KEY_MAP, "GPT-OSS")


def from_hf_state_dict(
    sd: dict[str, torch.Tensor], config: GptOssConfig, *, strict: bool = True
) -> dict[str, torch.Tensor]:
    """Rename an HF GPT-OSS state dict to our names (see decoder.from_hf for the rules).

    MXFP4 tensors (`*_blocks`, `*_scales`) are unexpected keys here; from_hf_dict refuses such configs first.
    """
    return decoder.from_hf(
        sd, HF_KEY_MAP, expected_keys(config), "GPT-OSS", strict=strict, tied=config.tie_word_embeddings
    )
