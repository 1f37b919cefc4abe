"""A preallocated key/value cache for generation on our model definitions (the rollout engine's).

`DecoderLM.forward(..., kv_cache=cache)` runs only the new tokens (a prompt prefill, then one token per
step): each attention layer writes the new keys/values into its slots of the cache and attends over every
slot filled so far. The training path never passes a cache and is unchanged.

Rows are left-padded so that all rows share one write position per step. Every slot carries a doc id, as
in packing: padding is doc 0 and a prompt with its continuation doc 1, so a query attends only keys of its
own doc, and padding attends only padding (no empty softmax rows). Real tokens of a row are contiguous
slots, so slot distance equals position distance and a sliding window can be applied on slot indices.
Sliding-window layers keep all slots and mask the old ones: simple, and exact; a ring buffer would only
save memory.

Rows that finish can be dropped (`select_rows`), so they stop costing compute; the same call repeats a
prompt's row n times after one shared prefill. Prompts of similar length can be prefilled as separate
groups through `rows_view`, so a short prompt does not pay for the longest one's padding.

Shape legend: B rows, T new tokens this step, S slots (max tokens per row), K kv heads, Dh head dim.
"""

from __future__ import annotations

import torch
from torch import nn


class LayerKVCache:
    """One attention layer's keys and values, [B, K, S, Dh] each; writes go to the owner's current slots."""

    def __init__(self, owner: KVCache, k_BKSDh: torch.Tensor, v_BKSDh: torch.Tensor) -> None:
        self.owner = owner
        self.k_BKSDh = k_BKSDh
        self.v_BKSDh = v_BKSDh

    def update(self, k_BKTDh: torch.Tensor, v_BKTDh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new tokens' keys/values; return the keys/values of every filled slot, [B, K, end, Dh]."""
        start, end = self.owner.step_start, self.owner.length
        self.k_BKSDh[:, :, start:end] = k_BKTDh
        self.v_BKSDh[:, :, start:end] = v_BKTDh
        return self.k_BKSDh[:, :, :end], self.v_BKSDh[:, :, :end]


class KVCache:
    """Keys/values of every layer for B rows of up to S tokens, plus the doc id of every slot.

    Protocol (DecoderLM.forward drives it): `begin_step(doc_ids_BT, T)` claims slots
    [length, length + T) for the new tokens; `attention_mask(window)` is the keep-mask of those queries over
    slots [0, length); `layers[i].update(k, v)` stores layer i's new keys/values.
    """

    def __init__(
        self,
        num_kv_heads: list[int],
        head_dims: list[int],
        batch_size: int,
        max_len: int,
        *,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.max_len = max_len
        self.length = 0  # slots filled so far (the same for every row)
        self.step_start = 0  # first slot of the current step's tokens
        self.doc_ids_BS = torch.zeros(batch_size, max_len, dtype=torch.long, device=device)
        self.layers = [
            LayerKVCache(
                self,
                torch.zeros(batch_size, K, max_len, Dh, dtype=dtype, device=device),
                torch.zeros(batch_size, K, max_len, Dh, dtype=dtype, device=device),
            )
            for K, Dh in zip(num_kv_heads, head_dims)
        ]

    @classmethod
    def for_model(cls, model: nn.Module, batch_size: int, max_len: int) -> KVCache:
        """A cache shaped for `model` (a DecoderLM): one entry per block, in the weights' dtype and device."""
        weight = model.output_weight()
        attns = [block.attention for block in model.layers]
        return cls(
            [a.num_kv_heads for a in attns],
            [a.head_dim for a in attns],
            batch_size,
            max_len,
            dtype=weight.dtype,
            device=weight.device,
        )

    @property
    def batch_size(self) -> int:
        return self.doc_ids_BS.shape[0]

    def begin_step(self, doc_ids_BT: torch.Tensor | None, T: int) -> None:
        """Claim slots [length, length + T) for T new tokens per row (doc ids None = all doc 1)."""
        if self.length + T > self.max_len:
            raise ValueError(f"KV cache overflow: {self.length} + {T} tokens > {self.max_len} slots")
        self.step_start, self.length = self.length, self.length + T
        self.doc_ids_BS[:, self.step_start : self.length] = 1 if doc_ids_BT is None else doc_ids_BT

    def attention_mask(self, sliding_window: int | None) -> torch.Tensor:
        """Bool keep-mask [B, 1, T, length] of the current step's queries over every filled slot.

        Query slot i keeps key slot j iff j <= i, their doc ids match and (with a window) i - j < window:
        build_attention_mask's rule, offset by the slots already filled.
        """
        device = self.doc_ids_BS.device
        q_T = torch.arange(self.step_start, self.length, device=device)
        k_S = torch.arange(self.length, device=device)
        keep_TS = k_S[None, :] <= q_T[:, None]
        if sliding_window is not None:
            keep_TS = keep_TS & (q_T[:, None] - k_S[None, :] < sliding_window)
        docs_BS = self.doc_ids_BS[:, : self.length]
        same_doc_BTS = docs_BS[:, self.step_start :, None] == docs_BS[:, None, :]
        return (same_doc_BTS & keep_TS).unsqueeze(1)

    def rows_view(self, rows: slice, first_slot: int) -> KVCache:
        """An empty cache over rows `rows` whose slot 0 is this cache's slot `first_slot`, sharing storage.

        Running a forward on the view fills those rows of this cache: prompts of similar length are
        prefilled together (little padding), each group right-aligned at the same last slot; then
        `set_length` makes the filled slots visible here. Slots before first_slot stay doc 0 (padding).
        """
        view = KVCache.__new__(KVCache)
        view.max_len = self.max_len - first_slot
        view.length = view.step_start = 0
        view.doc_ids_BS = self.doc_ids_BS[rows, first_slot:]
        view.layers = [
            LayerKVCache(view, layer.k_BKSDh[rows, :, first_slot:], layer.v_BKSDh[rows, :, first_slot:])
            for layer in self.layers
        ]
        return view

    def set_length(self, length: int) -> None:
        """Declare slots [0, length) filled (after prefilling through rows_view)."""
        self.length = self.step_start = length

    def select_rows(self, index_B: torch.Tensor) -> None:
        """Keep rows `index_B` (in that order, repeats allowed): drops finished rows, fans out samples."""
        self.doc_ids_BS = self.doc_ids_BS.index_select(0, index_B)
        for layer in self.layers:
            layer.k_BKSDh = layer.k_BKSDh.index_select(0, index_B)
            layer.v_BKSDh = layer.v_BKSDh.index_select(0, index_B)
