"""The fallback backend (`model.backend: hf`): train any local `AutoModelForCausalLM` with our recipes.

`HFCausalLM` wraps a transformers model behind the interface our recipes use (forward returns
final-normed hidden states; `output_weight()`; `logits()`), so the same packing, chunked loss,
trainer, checkpoints and export run on architectures we have no definition for. Packed rows pass
per-document position ids, `use_cache=False`, and a 4-D boolean block-diagonal causal mask through
SDPA (a dict of masks per layer kind when the model has sliding-window layers).

What does NOT apply, printed at start and kept in summary.json (NOTICE): our logit verifier, LoRA in the definitions
(use the native backend, or PEFT yourself), the MoE load-balancing loss, logit soft-capping or scaling
the HF head applies after the output matmul, tensor-parallel plans over unified names, and exact FLOPs
(MFU uses 6 x non-embedding parameters per token, no attention term).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from posttrain.errors import ModelError
from posttrain.models.components import build_attention_mask

NOTICE = (
    "model.backend=hf: training through transformers. Not applied: the logit verifier, LoRA in the "
    "definitions, the MoE load-balancing loss, output logit soft-capping/scaling, TP plans; MFU counts "
    "6 x non-embedding parameters per token (no attention term). Packing uses SDPA with a 4-D "
    "document mask."
)


class HFCausalLM(nn.Module):
    """A transformers causal LM seen through posttrain's model interface."""

    def __init__(self, hf_model: nn.Module) -> None:
        super().__init__()
        self.hf = hf_model
        self.config = hf_model.config
        self.decoder = hf_model.get_decoder()
        layer_types = getattr(self.config, "layer_types", None) or []
        self.sliding_window = getattr(self.config, "sliding_window", None) if layer_types else None
        self.mask_kinds = sorted(set(layer_types)) if "sliding_attention" in layer_types else []

    def _masks(self, doc_ids_BT: torch.Tensor | None, T: int, device: torch.device) -> Any:
        if doc_ids_BT is None:
            return None  # plain causal: transformers builds its own (with sliding windows)
        if not self.mask_kinds:
            return build_attention_mask(doc_ids_BT, T)
        return {
            kind: build_attention_mask(
                doc_ids_BT, T, self.sliding_window if kind == "sliding_attention" else None
            )
            for kind in self.mask_kinds
        }

    def forward(
        self,
        input_ids_BT: torch.Tensor,
        position_ids_BT: torch.Tensor | None = None,
        doc_ids_BT: torch.Tensor | None = None,
        *,
        head_fn: Any = None,
    ) -> Any:
        """Final-normed hidden states, or head_fn(h, output_weight()) (see DecoderLM.forward)."""
        B, T = input_ids_BT.shape
        if position_ids_BT is None:
            position_ids_BT = torch.arange(T, device=input_ids_BT.device).expand(B, T)
        out = self.decoder(
            input_ids=input_ids_BT,
            position_ids=position_ids_BT,
            attention_mask=self._masks(doc_ids_BT, T, input_ids_BT.device),
            use_cache=False,
        )
        if head_fn is not None:
            return head_fn(out.last_hidden_state, self.output_weight())
        return out.last_hidden_state

    def output_weight(self) -> torch.Tensor:
        return self.hf.get_output_embeddings().weight

    def logits(self, h_BTD: torch.Tensor) -> torch.Tensor:
        return h_BTD @ self.output_weight().T

    def flops_params(self) -> tuple[int, int, int]:
        """(non-embedding matmul parameters, vocab rows, hidden size) for the approximate FLOPs."""
        emb = self.hf.get_input_embeddings().weight
        out = self.output_weight()
        body = sum(p.numel() for p in self.decoder.parameters() if p.ndim >= 2) - emb.numel()
        return body, out.shape[0], out.shape[1]


def load_hf_backend(path: str | Path, dtype: torch.dtype, vocab_size: int) -> HFCausalLM:
    """Load `path` with AutoModelForCausalLM (SDPA attention), growing its vocabulary to `vocab_size`
    rows, padded to a multiple of 64 (mean-initialised, transformers' `mean_resizing`), when the
    tokenizer has more tokens than the checkpoint."""
    from transformers import AutoModelForCausalLM  # heavy: only for this backend

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelError(f"model.path {path}: no config.json (expected an HF checkpoint directory)")
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation="sdpa")
    if hf.get_input_embeddings().weight.shape[0] < vocab_size:
        hf.resize_token_embeddings(vocab_size, pad_to_multiple_of=64, mean_resizing=True)
    return HFCausalLM(hf)  # the recipe prints NOTICE with the other model notes


def hf_backend_flops_fn(model: HFCausalLM):
    """6 FLOPs per matmul parameter per token; the LM head only for loss tokens (see NOTICE)."""
    body, vocab, hidden = model.flops_params()
    return lambda doc_lens, num_loss_tokens: float(
        6 * body * sum(doc_lens) + 6 * vocab * hidden * num_loss_tokens
    )


def save_hf_backend(
    model: HFCausalLM, out_dir: Path, vocab_size: int, dtype: torch.dtype | None = None
) -> Path:
    """save_pretrained with the vocabulary trimmed to `vocab_size` rows, in `dtype` (None: as held).
    End of training: trims and casts in place."""
    if model.output_weight().shape[0] > vocab_size:
        model.hf.resize_token_embeddings(vocab_size, mean_resizing=False)
    if dtype is not None:
        model.hf.to(dtype)
    model.hf.save_pretrained(str(out_dir))
    return out_dir
