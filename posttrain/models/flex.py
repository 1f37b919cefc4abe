"""FlexAttention: packed-row attention without a dense [B, 1, T, T] mask (model.attention: flex).

SDPA needs the block-diagonal causal mask of a packed row as a dense bool tensor, O(T^2) memory per row,
and computes every masked-out block anyway. FlexAttention takes the same rule as a `mask_mod` (causal,
same document, within the sliding window) compiled into a BlockMask that skips whole empty blocks.
The BlockMask is built once per forward and per layer kind (full / sliding) and reused by every layer,
like the dense mask it replaces (DecoderLM.forward).

GPT-OSS's attention sinks (a learned logit per head that joins each softmax and is then dropped) are not
a score_mod: they change the normaliser. With the log-sum-exp that flex returns, the sinked output is
the plain one rescaled: out * exp(lse) / (exp(lse) + exp(sink)) = out * sigmoid(lse - sink).

On CUDA the kernel is `torch.compile`d once per process (flex's fused Triton kernel); on a CPU flex runs
its forward unfused (for tests: logits equal SDPA's) and has no backward, so model.attention: auto picks
flex on CUDA and SDPA on CPU.

Shape legend: B batch, H query heads, K key/value heads, T queries, S keys, Dh head dim.
"""

from __future__ import annotations

import functools

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

BACKENDS = ("auto", "sdpa", "flex")


def resolve_backend(name: str, device: torch.device) -> str:
    """model.attention -> the backend used: auto = flex on CUDA, sdpa elsewhere."""
    if name not in BACKENDS:
        raise ValueError(f"model.attention={name!r}: expected one of {BACKENDS}")
    if name == "auto":
        return "flex" if device.type == "cuda" else "sdpa"
    return name


def block_mask(
    doc_ids_BT: torch.Tensor | None, B: int, T: int, sliding_window: int | None, device
) -> BlockMask:
    """The BlockMask of build_attention_mask's rule: j <= i, same document, i - j < window."""
    window = sliding_window if sliding_window is not None and T > sliding_window else None

    def mask_mod(b, h, q_idx, kv_idx):
        keep = kv_idx <= q_idx
        if doc_ids_BT is not None:
            keep = keep & (doc_ids_BT[b, q_idx] == doc_ids_BT[b, kv_idx])
        if window is not None:
            keep = keep & (q_idx - kv_idx < window)
        return keep

    rows = B if doc_ids_BT is not None else None  # one mask for every row when rows do not differ
    return create_block_mask(mask_mod, rows, None, T, T, device=device)


@functools.cache
def _compiled() -> object:
    return torch.compile(flex_attention, dynamic=False)


def attention(
    q_BHTDh: torch.Tensor,
    k_BKSDh: torch.Tensor,
    v_BKSDh: torch.Tensor,
    mask: BlockMask,
    scale: float,
    sinks_H: torch.Tensor | None = None,
) -> torch.Tensor:
    """FlexAttention with GQA; with sinks_H, GPT-OSS's sink-normalised softmax. Returns [B, H, T, Dh]."""
    fn = _compiled() if q_BHTDh.device.type == "cuda" else flex_attention
    gqa = k_BKSDh.shape[1] != q_BHTDh.shape[1]
    if sinks_H is None:
        return fn(q_BHTDh, k_BKSDh, v_BKSDh, block_mask=mask, scale=scale, enable_gqa=gqa)
    try:  # torch >= 2.9 returns auxiliary outputs through AuxRequest; older ones through return_lse
        from torch.nn.attention.flex_attention import AuxRequest

        out_BHTDh, aux = fn(
            q_BHTDh,
            k_BKSDh,
            v_BKSDh,
            block_mask=mask,
            scale=scale,
            enable_gqa=gqa,
            return_aux=AuxRequest(lse=True),
        )
        lse_BHT = aux.lse
    except ImportError:
        out_BHTDh, lse_BHT = fn(
            q_BHTDh, k_BKSDh, v_BKSDh, block_mask=mask, scale=scale, enable_gqa=gqa, return_lse=True
        )
    keep_BHT = torch.sigmoid(lse_BHT.float() - sinks_H.float()[None, :, None])
    return out_BHTDh * keep_BHT[..., None].to(out_BHTDh.dtype)
