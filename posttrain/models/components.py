"""Building blocks shared by the decoder-only model families (Llama3, Qwen3, Qwen3-MoE, Gemma3, GPT-OSS): RMSNorm, rotary embeddings (default or Llama-3-scaled), grouped-query attention with an
optional per-head q/k norm, the SwiGLU MLP, the pre-norm transformer block, and the block-diagonal causal
mask used for packed rows.

Every block is plain single-device PyTorch. Numerics follow the HF reference implementations operation
by operation (same dtype casts, same order): in fp64 our logits equal transformers' fp64 ones (to ~1e-15
of their scale; attention then takes HF's eager path, see `eager_attention`), and in fp32 they are as
close to that fp64 reference as transformers' own fp32 logits (models/verify.py gates both). Module
names (q_proj, k_proj, v_proj, o_proj, q_norm, k_norm, gate_proj, up_proj, down_proj) are the
ones LoRA / TP / activation checkpointing target; keep them stable across families.

Shape legend:
    B  batch size (rows)
    T  sequence length (tokens per row)
    D  model width (hidden_size)
    H  number of query heads
    K  number of key/value heads (H % K == 0)
    Dh head dimension
    F  MLP intermediate width
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from posttrain.models.kv_cache import LayerKVCache


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dim, computed in fp32 and cast back before the weight multiply.

    The order (normalise in fp32, cast to the input dtype, then `weight * x`) is HF Qwen3/Llama's; doing the
    multiply in fp32 instead changes bf16 outputs by one ulp and breaks bitwise comparisons with HF.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        x_fp32 = x.to(torch.float32)
        variance = x_fp32.pow(2).mean(-1, keepdim=True)
        x_fp32 = x_fp32 * torch.rsqrt(variance + self.eps)
        return self.weight * x_fp32.to(input_dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


class RotaryEmbedding(nn.Module):
    """Default RoPE: cos/sin tables computed on the fly from position_ids [B, T].

    Computing from position ids (not from a cached [max_len] table) is what makes packed rows work: each
    document in a row restarts at position 0. `inv_freq` is a non-persistent buffer (not in checkpoints), so
    after meta-device construction + `to_empty()` it holds garbage: call `reset_parameters()` to rebuild it.
    """

    def __init__(
        self,
        head_dim: int,
        rope_theta: float,
        scale_inv_freq: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        """scale_inv_freq: optional map from the default inv_freq to a scaled one (e.g. a partial of
        `llama3_scale_inv_freq`); applied on every rebuild so meta init keeps the scaling."""
        super().__init__()
        self.head_dim = head_dim
        self.rope_theta = rope_theta
        self.scale_inv_freq = scale_inv_freq
        self.register_buffer("inv_freq", self._compute_inv_freq(device=None), persistent=False)

    def _compute_inv_freq(self, device: torch.device | None) -> torch.Tensor:
        # Same expression as HF's compute_default_rope_parameters, in fp32, so tables match exactly.
        exponents = (
            torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float() / self.head_dim
        )
        inv_freq = 1.0 / (self.rope_theta**exponents)
        return inv_freq if self.scale_inv_freq is None else self.scale_inv_freq(inv_freq)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Recompute inv_freq in fp32 on the buffer's current device (after meta init / to_empty)."""
        device = self.inv_freq.device
        if device.type == "meta":
            device = None  # nothing real to put it on yet; a later to_empty + reset fixes it
        self.inv_freq = self._compute_inv_freq(device=device)

    rebuild = reset_parameters

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (cos_BTDh, sin_BTDh) in x's dtype; the angles themselves are computed in fp32."""
        inv_freq = self.inv_freq.to(device=x.device, dtype=torch.float32)
        freqs_BTh = position_ids_BT[..., None].float() * inv_freq  # h = Dh / 2
        emb_BTDh = torch.cat((freqs_BTh, freqs_BTh), dim=-1)
        return emb_BTDh.cos().to(x.dtype), emb_BTDh.sin().to(x.dtype)


def llama3_scale_inv_freq(
    inv_freq: torch.Tensor,
    *,
    factor: float,
    low_freq_factor: float,
    high_freq_factor: float,
    original_max_position_embeddings: int,
) -> torch.Tensor:
    """Llama 3.1 RoPE scaling of default inv_freq (HF's `_compute_llama3_parameters`, same ops and order).

    Wavelengths shorter than original_max / high_freq_factor are kept, longer than original_max /
    low_freq_factor are divided by `factor`, and the band between is interpolated smoothly.
    """
    low_freq_wavelen = original_max_position_embeddings / low_freq_factor
    high_freq_wavelen = original_max_position_embeddings / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth_factor = (original_max_position_embeddings / wavelen - low_freq_factor) / (
        high_freq_factor - low_freq_factor
    )
    smoothed_inv_freq = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
    is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium_freq, smoothed_inv_freq, inv_freq_llama)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last dim (the HF/GPT-NeoX convention, not interleaved)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(
    q_BHTDh: torch.Tensor, k_BKTDh: torch.Tensor, cos_BTDh: torch.Tensor, sin_BTDh: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate queries and keys; cos/sin broadcast over the head dim."""
    cos_B1TDh = cos_BTDh.unsqueeze(1)
    sin_B1TDh = sin_BTDh.unsqueeze(1)
    q_out = (q_BHTDh * cos_B1TDh) + (rotate_half(q_BHTDh) * sin_B1TDh)
    k_out = (k_BKTDh * cos_B1TDh) + (rotate_half(k_BKTDh) * sin_B1TDh)
    return q_out, k_out


def is_block_mask(mask: object) -> bool:
    """A FlexAttention BlockMask (models/flex.py) rather than a dense bool mask; checked by name so that
    importing the models does not import flex_attention."""
    return type(mask).__name__ == "BlockMask"


def build_attention_mask(
    doc_ids_BT: torch.Tensor | None, T: int, sliding_window: int | None = None, device=None
) -> torch.Tensor | None:
    """Causal keep-mask, bool [B or 1, 1, T, T]: True where query i may attend key j; None = plain causal.

    i attends j iff j <= i, doc[i] == doc[j] when doc ids are given (packed rows), and i - j < sliding_window
    when a window is given (HF's convention: a window of W keys, the query's own included). Every query sees
    at least itself, so no softmax row is empty (no NaNs), whatever the doc ids of padding are. Returns None
    when nothing restricts plain causal attention, so SDPA can take its is_causal fast path.
    """
    windowed = sliding_window is not None and T > sliding_window
    if doc_ids_BT is None and not windowed:
        return None
    device = doc_ids_BT.device if doc_ids_BT is not None else device
    idx_T = torch.arange(T, device=device)
    keep_TT = idx_T[None, :] <= idx_T[:, None]
    if windowed:
        keep_TT = keep_TT & (idx_T[:, None] - idx_T[None, :] < sliding_window)
    if doc_ids_BT is None:
        return keep_TT[None, None]
    same_doc_BTT = doc_ids_BT[:, :, None] == doc_ids_BT[:, None, :]
    return (same_doc_BTT & keep_TT).unsqueeze(1)


def eager_attention(
    q_BHTDh: torch.Tensor,
    k_BKSDh: torch.Tensor,
    v_BKSDh: torch.Tensor,
    mask_B1TS: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """HF's `eager_attention_forward`, op for op: repeat K/V to H heads, scores * scale, mask, softmax
    IN FP32 cast back to q's dtype, probs @ v. Used for fp64 runs (see Attention.forward); S = keys."""
    B, H, T, Dh = q_BHTDh.shape
    K, S = k_BKSDh.shape[1], k_BKSDh.shape[2]
    k_BHSDh = k_BKSDh[:, :, None].expand(B, K, H // K, S, Dh).reshape(B, H, S, Dh)
    v_BHSDh = v_BKSDh[:, :, None].expand(B, K, H // K, S, Dh).reshape(B, H, S, Dh)
    scores_BHTS = torch.matmul(q_BHTDh, k_BHSDh.transpose(2, 3)) * scale
    if mask_B1TS is None:
        mask_B1TS = torch.ones(T, S, dtype=torch.bool, device=q_BHTDh.device).tril(S - T)[None, None]
    scores_BHTS = scores_BHTS.masked_fill(~mask_B1TS, torch.finfo(scores_BHTS.dtype).min)
    probs_BHTS = F.softmax(scores_BHTS, dim=-1, dtype=torch.float32).to(q_BHTDh.dtype)
    return torch.matmul(probs_BHTS, v_BHSDh)


class Attention(nn.Module):
    """Grouped-query self-attention through SDPA, with Qwen3's optional per-head RMSNorm on q and k.

    q_norm/k_norm act on each head's Dh vector and run BEFORE RoPE (as in HF Qwen3). The softmax scale is
    1/sqrt(head_dim) (SDPA's default for our Dh). K/V heads are shared via SDPA's `enable_gqa`, which
    avoids materialising repeated K/V.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        qk_norm: bool,
        norm_eps: float = 1e-6,
        bias: bool = False,
        scale: float | None = None,
        make_norm: Callable[[int, float], nn.Module] | None = None,
    ) -> None:
        """scale: softmax scale (None = head_dim**-0.5; Gemma3 uses query_pre_attn_scalar**-0.5).
        make_norm: the q/k norm class (RMSNorm unless the family has its own convention)."""
        super().__init__()
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=bias)
        self.scale = head_dim**-0.5 if scale is None else scale
        make_norm = make_norm or RMSNorm
        self.q_norm = make_norm(head_dim, norm_eps) if qk_norm else None
        self.k_norm = make_norm(head_dim, norm_eps) if qk_norm else None

    def forward(
        self,
        x_BTD: torch.Tensor,
        cos_BTDh: torch.Tensor,
        sin_BTDh: torch.Tensor,
        mask_B1TT: torch.Tensor | None,
        kv_cache: LayerKVCache | None = None,
    ) -> torch.Tensor:
        """mask_B1TT: bool keep-mask from build_attention_mask, or None for plain causal attention.

        kv_cache (generation only): the new keys/values are stored there and the queries attend over every
        cached slot, so mask_B1TT is then the cache's [B, 1, T, slots] mask (never None)."""
        B, T, _ = x_BTD.shape
        q_BTHDh = self.q_proj(x_BTD).view(B, T, self.num_heads, self.head_dim)
        k_BTKDh = self.k_proj(x_BTD).view(B, T, self.num_kv_heads, self.head_dim)
        v_BTKDh = self.v_proj(x_BTD).view(B, T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q_BTHDh = self.q_norm(q_BTHDh)
            k_BTKDh = self.k_norm(k_BTKDh)
        q_BHTDh, k_BKTDh = apply_rotary(q_BTHDh.transpose(1, 2), k_BTKDh.transpose(1, 2), cos_BTDh, sin_BTDh)
        v_BKTDh = v_BTKDh.transpose(1, 2)
        if kv_cache is not None:  # keys/values of all cached slots from here on (T -> S keys)
            k_BKTDh, v_BKTDh = kv_cache.update(k_BKTDh, v_BKTDh)
        enable_gqa = self.num_kv_heads != self.num_heads
        scale = self.scale
        if is_block_mask(mask_B1TT):  # model.attention: flex (DecoderLM built a BlockMask)
            from posttrain.models import flex

            out_BHTDh = flex.attention(q_BHTDh, k_BKTDh, v_BKTDh, mask_B1TT, scale)
        elif q_BHTDh.dtype == torch.float64:
            # fp64 is the verifier's ground truth (verify.py), not a training dtype: SDPA would take the
            # softmax in fp64, transformers takes it in fp32 whatever the input dtype, which alone moves
            # logits by ~1e-7 of their scale. Match HF's eager path op for op instead; speed is moot here.
            out_BHTDh = eager_attention(q_BHTDh, k_BKTDh, v_BKTDh, mask_B1TT, scale)
        elif mask_B1TT is None:
            # Fast path: lets SDPA pick flash / memory-efficient kernels.
            out_BHTDh = F.scaled_dot_product_attention(
                q_BHTDh, k_BKTDh, v_BKTDh, is_causal=True, scale=scale, enable_gqa=enable_gqa
            )
        else:
            out_BHTDh = F.scaled_dot_product_attention(
                q_BHTDh, k_BKTDh, v_BKTDh, attn_mask=mask_B1TT, scale=scale, enable_gqa=enable_gqa
            )
        out_BTHDh = out_BHTDh.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)
        return self.o_proj(out_BTHDh)


class SwiGLU(nn.Module):
    """Gated MLP: down(act(gate(x)) * up(x)); act is SiLU, or tanh-GELU for Gemma ("GeGLU")."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        bias: bool = False,
        activation: Callable[[torch.Tensor], torch.Tensor] = F.silu,
    ) -> None:
        super().__init__()
        self.activation = activation
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.activation(self.gate_proj(x_BTD)) * self.up_proj(x_BTD))


class TransformerBlock(nn.Module):
    """Pre-norm decoder block: x + attn(norm(x)), then h + mlp(norm(h)).

    Names (attention_norm, attention, mlp_norm, mlp) are the unified ones across families; activation
    checkpointing and FSDP wrap this module as one unit.
    """

    def __init__(self, attention: Attention, mlp: nn.Module, hidden_size: int, norm_eps: float) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(hidden_size, norm_eps)
        self.attention = attention
        self.mlp_norm = RMSNorm(hidden_size, norm_eps)
        self.mlp = mlp

    def forward(
        self,
        x_BTD: torch.Tensor,
        cos_BTDh: torch.Tensor,
        sin_BTDh: torch.Tensor,
        mask_B1TT: torch.Tensor | None,
        kv_cache: LayerKVCache | None = None,
    ) -> torch.Tensor:
        attn_in_BTD = self.attention_norm(x_BTD)
        h_BTD = x_BTD + self.attention(attn_in_BTD, cos_BTDh, sin_BTDh, mask_B1TT, kv_cache=kv_cache)
        return h_BTD + self.mlp(self.mlp_norm(h_BTD))
