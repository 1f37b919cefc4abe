"""The rollout engine's decode step: one new token per row through the model, over a KV cache.

LocalEngine prefills prompts through `model.forward` with a KVCache, then decodes one token per step through
one of two steppers with the same interface (`step(tokens_B, positions_B) -> h_BD`, `select_rows(index_B)`):

- `LeanDecodeState`, for fp32 models on the CPU built only from the stock blocks (TransformerBlock of
  Attention + SwiGLU + RMSNorm, one RotaryEmbedding, full attention everywhere, no LoRA): Llama 3 and
  Qwen3. The same math as model.forward with fewer and cheaper ops per step:
  * attention is matmul + softmax over the filled slots, each row's left padding excluded by an additive
    -inf bias built once, instead of a boolean mask rebuilt every step and SDPA, whose CPU kernel is about
    2x slower for one query per row (2026-12 measurement). Keys AND values are cached transposed
    ([B, K, Dh, S]): q @ kT and vT @ p^T are the fastest batched-matmul forms for these tiny per-head
    matrices (the cache no longer fits in the CPU caches, so reading it dominates), which outweighs the
    strided one-column write per step; slots that are padding in every row are skipped;
  * q and k are normed and rotated together as one [B, H + K, Dh] tensor, with the cos/sin of every
    position computed once per batch by the model's own RotaryEmbedding (the values its forward uses).
  It reads the model's parameters at every step (nothing is copied), so it can never see stale weights.
- `ModelDecodeState`, everything else (sliding windows, MoE, Gemma's norms, GPT-OSS sinks, LoRA, CUDA):
  model.forward with the KVCache.

Fusing q/k/v and gate/up into single matmuls was measured too and not kept: on this CPU the separate
matmuls already run at the fused ones' FLOP rate (whole step within 1.5%), and fused copies would double
the weights' memory and have to be rebuilt after every weight change. Logits of the lean step equal
model.forward's within 1e-5 (tests/unit/test_fast_decode.py).

Shape legend: B rows, D hidden size, H query heads, K kv heads, G = H / K, Dh head dim, S cache slots,
P positions.
"""

from __future__ import annotations

import torch
from torch import nn

from posttrain.models.components import Attention, RMSNorm, RotaryEmbedding, SwiGLU, TransformerBlock
from posttrain.models.kv_cache import KVCache


def lean_decode_supported(model: nn.Module) -> bool:
    """fp32 on the CPU and stock blocks only (exact types: a family's subclass may mean other math)."""
    from posttrain.models.decoder import DecoderLM

    if not isinstance(model, DecoderLM) or type(model.norm) is not RMSNorm:
        return False
    weight = model.output_weight()
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        return False
    if type(model.rotary) is not RotaryEmbedding or model.embed_scale is not None:
        return False
    if any(kind != "full_attention" for kind in model.layer_types):
        return False
    for block in model.layers:
        attn, mlp = block.attention, block.mlp
        if type(block) is not TransformerBlock or type(attn) is not Attention or type(mlp) is not SwiGLU:
            return False
        if type(block.attention_norm) is not RMSNorm or type(block.mlp_norm) is not RMSNorm:
            return False
        linears = (
            attn.q_proj,
            attn.k_proj,
            attn.v_proj,
            attn.o_proj,
            mlp.gate_proj,
            mlp.up_proj,
            mlp.down_proj,
        )
        if any(type(lin) is not nn.Linear for lin in linears):  # LoRA wraps them
            return False
        if attn.q_norm is not None:
            if type(attn.q_norm) is not RMSNorm or type(attn.k_norm) is not RMSNorm:
                return False
            if attn.q_norm.eps != attn.k_norm.eps:
                return False
    return True


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """components.RMSNorm.forward: the same ops in the same order (fp32 normalise, cast, weight * x)."""
    x_fp32 = x.float()
    return weight * (x_fp32 * torch.rsqrt(x_fp32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class ModelDecodeState:
    """The generic stepper: model.forward over a KVCache holding slots for every decoded token."""

    def __init__(self, model: nn.Module, cache: KVCache) -> None:
        self.model = model
        self.cache = cache

    def select_rows(self, index_B: torch.Tensor) -> None:
        self.cache.select_rows(index_B)

    def step(self, tokens_B: torch.Tensor, positions_B: torch.Tensor) -> torch.Tensor:
        tok_B1 = tokens_B[:, None]
        return self.model(tok_B1, positions_B[:, None], torch.ones_like(tok_B1), kv_cache=self.cache)[:, -1]


class LeanDecodeState:
    """The lean stepper (see the module doc), taking over a prefilled KVCache: keys transposed
    [B, K, Dh, S], values transposed too, and a bias [B, S] that is -inf on each row's left padding."""

    def __init__(self, model: nn.Module, cache: KVCache, max_len: int, max_position: int) -> None:
        """cache: prefilled (slots [0, cache.length)); max_len: slots to hold in all; max_position: the
        largest RoPE position a decoded token will have."""
        self.model = model
        L, B = cache.length, cache.batch_size
        attn = model.layers[0].attention
        self.H, self.K, self.Dh, self.scale = attn.num_heads, attn.num_kv_heads, attn.head_dim, attn.scale
        self.kT_BKDS, self.vT_BKDS = [], []
        for layer in cache.layers:  # slots past L are written before they are read
            kT = layer.k_BKSDh.new_empty(B, self.K, self.Dh, max_len)
            kT[..., :L] = layer.k_BKSDh[:, :, :L].transpose(-1, -2)
            vT = layer.v_BKSDh.new_empty(B, self.K, self.Dh, max_len)
            vT[..., :L] = layer.v_BKSDh[:, :, :L].transpose(-1, -2)
            self.kT_BKDS.append(kT)
            self.vT_BKDS.append(vT)
        weight = model.output_weight()
        pad_BL = cache.doc_ids_BS[:, :L] == 0  # padding is each row's prefix
        self.bias_BS = torch.zeros(B, max_len, dtype=weight.dtype, device=weight.device)
        self.bias_BS[:, :L].masked_fill_(pad_BL, float("-inf"))
        self.first_B = pad_BL.sum(-1)  # first real slot of each row
        self.first = int(self.first_B.min())  # slots before it are padding in every row
        self.length = L
        # The sign of rotate_half folded into sin: rotate_half(x) * sin == x.roll(Dh / 2) * sin_signed.
        cos_1PDh, sin_1PDh = model.rotary(weight, torch.arange(max_position + 1, device=weight.device)[None])
        half = self.Dh // 2
        self.cos_PDh = cos_1PDh[0]
        self.sin_PDh = torch.cat([-sin_1PDh[0, :, :half], sin_1PDh[0, :, half:]], dim=-1)
        self.qk_norm_XDh = None  # q_norm's weight per query head, then k_norm's per kv head: X = H + K
        if attn.q_norm is not None:
            self.qk_norm_eps = attn.q_norm.eps
            self.qk_norm_XDh = [
                torch.cat(
                    [
                        b.attention.q_norm.weight.expand(self.H, -1),
                        b.attention.k_norm.weight.expand(self.K, -1),
                    ]
                )
                for b in model.layers
            ]

    def select_rows(self, index_B: torch.Tensor) -> None:
        """Keep rows index_B (in that order): drops finished rows, as KVCache.select_rows."""
        self.kT_BKDS = [t.index_select(0, index_B) for t in self.kT_BKDS]
        self.vT_BKDS = [t.index_select(0, index_B) for t in self.vT_BKDS]
        self.bias_BS = self.bias_BS.index_select(0, index_B)
        self.first_B = self.first_B.index_select(0, index_B)
        self.first = int(self.first_B.min())

    def step(self, tokens_B: torch.Tensor, positions_B: torch.Tensor) -> torch.Tensor:
        """Feed one token per row at the next slot; return the final-normed hidden states h_BD."""
        model, H, K, Dh = self.model, self.H, self.K, self.Dh
        B, G, t, first = tokens_B.shape[0], H // K, self.length, self.first
        x_BD = model.embed(tokens_B)
        cos_B1Dh = self.cos_PDh[positions_B].unsqueeze(1)
        sin_B1Dh = self.sin_PDh[positions_B].unsqueeze(1)
        bias_B11S = self.bias_BS[:, None, None, first : t + 1]
        for i, block in enumerate(model.layers):
            attn, mlp = block.attention, block.mlp
            h_BD = _rms_norm(x_BD, block.attention_norm.weight, block.attention_norm.eps)
            q_BHDh = attn.q_proj(h_BD).view(B, H, Dh)
            k_BKDh = attn.k_proj(h_BD).view(B, K, Dh)
            qk_BXDh = torch.cat([q_BHDh, k_BKDh], dim=1)  # X = H + K
            if self.qk_norm_XDh is not None:
                qk_BXDh = _rms_norm(qk_BXDh, self.qk_norm_XDh[i], self.qk_norm_eps)
            qk_BXDh = qk_BXDh * cos_B1Dh + qk_BXDh.roll(Dh // 2, -1) * sin_B1Dh
            kT_BKDS, vT_BKDS = self.kT_BKDS[i], self.vT_BKDS[i]
            kT_BKDS[:, :, :, t] = qk_BXDh[:, H:]
            vT_BKDS[:, :, :, t] = attn.v_proj(h_BD).view(B, K, Dh)
            q_BKGDh = qk_BXDh[:, :H].view(B, K, G, Dh)  # query head h uses kv head h // G, as in SDPA's GQA
            scores_BKGS = torch.matmul(q_BKGDh, kT_BKDS[..., first : t + 1]).mul_(self.scale).add_(bias_B11S)
            probs_BKSG = torch.softmax(scores_BKGS, dim=-1).transpose(-1, -2)
            out_BKDhG = torch.matmul(vT_BKDS[..., first : t + 1], probs_BKSG)  # = (probs @ v) transposed
            x_BD = x_BD + attn.o_proj(out_BKDhG.transpose(-1, -2).reshape(B, H * Dh))
            h_BD = _rms_norm(x_BD, block.mlp_norm.weight, block.mlp_norm.eps)
            x_BD = x_BD + mlp.down_proj(mlp.activation(mlp.gate_proj(h_BD)) * mlp.up_proj(h_BD))
        self.length = t + 1
        return _rms_norm(x_BD, model.norm.weight, model.norm.eps)
