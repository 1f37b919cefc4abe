"""Qwen3-MoE decoder (Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen3's attention with a top-k routed expert MLP.

Same contract as qwen3.py (forward returns final-normed hidden states, packing through position/doc ids,
unified module names). The MLP of layer i is `moe.MoE` (router + `experts.{j}` SwiGLUs) when the layer is
sparse, HF's rule: i not in `mlp_only_layers` and (i + 1) % decoder_sparse_step == 0; otherwise a dense
SwiGLU of width intermediate_size. Checkpoints use the Hub layout (one tensor per expert:
`mlp.experts.{j}.gate_proj.weight`, router at `mlp.gate.weight`), which transformers 5 fuses on load.
Parity with `transformers.Qwen3MoeForCausalLM`, routing included, is pinned by
tests/parity/test_qwen3_moe_logits.py.

Shape legend: B batch, T tokens per row, D hidden_size, V vocab_size, E experts, k experts per token.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from posttrain.errors import ModelError
from posttrain.models import decoder
from posttrain.models.components import Attention, RotaryEmbedding, SwiGLU, TransformerBlock
from posttrain.models.decoder import DecoderLM
from posttrain.models.moe import MoE, model_aux_loss
from posttrain.models.qwen3 import HF_KEY_MAP as QWEN3_KEY_MAP
from posttrain.models.qwen3 import Qwen3Config, _hf_common_fields


@dataclass
class Qwen3MoeConfig(Qwen3Config):
    """Qwen3Config plus the expert fields (HF Qwen3MoeConfig's names; defaults are HF's)."""

    num_experts: int = 128  # experts per sparse layer E
    num_experts_per_tok: int = 8  # experts each token is routed to k
    moe_intermediate_size: int = 768  # SwiGLU inner width of one expert
    norm_topk_prob: bool = False  # renormalise the k routing weights to sum to 1 (Qwen3 checkpoints: true)
    decoder_sparse_step: int = 1  # every n-th layer is sparse
    mlp_only_layers: list[int] = field(default_factory=list)  # layers forced dense
    router_aux_loss_coef: float = 0.001  # weight of the load-balancing loss a recipe adds

    def is_sparse(self, layer: int) -> bool:
        """HF's rule for which layers get experts."""
        return (
            layer not in self.mlp_only_layers
            and self.num_experts > 0
            and (layer + 1) % self.decoder_sparse_step == 0
        )

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> Qwen3MoeConfig:
        """Read an HF config.json dict; refuse features we do not implement."""
        fields = _hf_common_fields(d, "qwen3_moe")
        try:
            return cls(
                **fields,
                # transformers 5 writes num_local_experts (its attribute_map alias); the Hub uses num_experts.
                num_experts=d["num_experts"] if "num_experts" in d else d["num_local_experts"],
                num_experts_per_tok=d["num_experts_per_tok"],
                moe_intermediate_size=d["moe_intermediate_size"],
                norm_topk_prob=bool(d.get("norm_topk_prob", False)),
                decoder_sparse_step=d.get("decoder_sparse_step", 1),
                mlp_only_layers=list(d.get("mlp_only_layers") or []),
                router_aux_loss_coef=d.get("router_aux_loss_coef", 0.001),
            )
        except KeyError as e:
            raise ModelError(f"Qwen3-MoE config is missing required key {e.args[0]!r}") from None

    def to_hf_dict(self, *, torch_dtype: str = "float32", **token_ids: Any) -> dict[str, Any]:
        """A config.json that transformers loads as Qwen3MoeForCausalLM."""
        d = super().to_hf_dict(torch_dtype=torch_dtype, **token_ids)
        d.update(asdict(self), architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe")
        d["output_router_logits"] = False
        return d

    def num_params(self, include_embedding: bool = True) -> int:
        """Total parameters (all experts), embedding accounting as Qwen3Config.num_params."""
        D = self.hidden_size
        sparse = sum(self.is_sparse(i) for i in range(self.num_hidden_layers))
        dense_mlp = 3 * D * self.intermediate_size
        moe_mlp = self.num_experts * 3 * D * self.moe_intermediate_size + self.num_experts * D
        return super().num_params(include_embedding) + sparse * (moe_mlp - dense_mlp)


class Qwen3MoeForCausalLM(DecoderLM):
    """Qwen3-MoE causal LM: Qwen3 blocks whose MLP is a routed mixture of SwiGLU experts."""

    def __init__(self, config: Qwen3MoeConfig) -> None:
        c = config

        def mlp(i: int) -> torch.nn.Module:
            if not c.is_sparse(i):
                return SwiGLU(c.hidden_size, c.intermediate_size)
            return MoE(
                c.hidden_size,
                c.moe_intermediate_size,
                c.num_experts,
                c.num_experts_per_tok,
                norm_topk_prob=c.norm_topk_prob,
            )

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
                mlp(i),
                c.hidden_size,
                c.rms_norm_eps,
            ),
        )

    def aux_loss(self) -> torch.Tensor | None:
        """Load-balancing loss of the last forward over all sparse layers (HF's aux_loss, unscaled)."""
        return model_aux_loss(self)


# Qwen3's table plus the router and per-expert linears (HF Hub layout).
HF_KEY_MAP: dict[str, str] = {
    **QWEN3_KEY_MAP,
    "layers.{i}.mlp.router.weight": "model.layers.{i}.mlp.gate.weight",
    **{
        f"layers.{{i}}.mlp.experts.{{j}}.{p}.weight": f"model.layers.{{i}}.mlp.experts.{{j}}.{p}.weight"
        for p in ("gate_proj", "up_proj", "down_proj")
    },
}


def expected_keys(config: Qwen3MoeConfig) -> list[str]:
    """Every parameter name our model has: dense MLP keys on dense layers, router + experts on sparse ones."""
    keys = decoder.expected_keys(HF_KEY_MAP, config)

    def wanted(name: str) -> bool:
        if ".mlp." not in name:
            return True
        layer = int(name.split(".")[1])
        sparse_key = ".mlp.router." in name or ".mlp.experts." in name
        return sparse_key == config.is_sparse(layer)

    return [k for k in keys if wanted(k)]


def to_hf_state_dict(sd: dict[str, torch.Tensor], config: Qwen3MoeConfig) -> dict[str, torch.Tensor]:
    return decoder.to_hf(sd, config, HF_KEY_MAP, "Qwen3-MoE")


def from_hf_state_dict(
    sd: dict[str, torch.Tensor], config: Qwen3MoeConfig, *, strict: bool = True
) -> dict[str, torch.Tensor]:
    """Rename an HF Qwen3-MoE state dict (Hub layout) to our names (see decoder.from_hf for the rules)."""
    return decoder.from_hf(
        sd, HF_KEY_MAP, expected_keys(config), "Qwen3-MoE", strict=strict, tied=config.tie_word_embeddings
    )
