"""Mixture-of-experts feed-forward layer shared by the MoE families (Qwen3-MoE today).

A router scores every token against E experts, keeps the top k, and the token's output is the
routing-weighted sum of those k experts' SwiGLU outputs. Experts are ordinary `SwiGLU` modules in a
ModuleList, so their linears carry the unified names (`mlp.experts.{j}.gate_proj`, ...) that LoRA,
TP plans and HF key maps address, exactly as in a dense MLP.

Compute loops over the experts that received tokens and gathers only their tokens (HF's eager order:
ascending expert index, `index_add_` into the output), so the work is the active parameters', not all
E experts'. A grouped-GEMM kernel is a later optimisation; numerics would not change beyond summation
order.

Each forward keeps its router logits and chosen experts (`last_router_logits`, `last_expert_ids`) so the
model can compute the Switch-Transformer load-balancing loss over all sparse layers at once, as HF's
`load_balancing_loss_func` does (tokens of every layer concatenated), and a recipe can add
`router_aux_loss_coef * aux_loss` to its loss.

Shape legend: N tokens (B*T flattened), D hidden size, E experts, k experts per token, F expert width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from posttrain.models.components import SwiGLU


class TopKRouter(nn.Module):
    """Linear scores -> softmax over all experts (fp32) -> top k -> optional renormalisation of the k weights.

    This is Qwen3-MoE's order (softmax before top-k). `norm_topk_prob=True` makes the k weights sum to 1.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, *, norm_topk_prob: bool) -> None:
        super().__init__()
        if not 0 < top_k <= num_experts:
            raise ValueError(f"num_experts_per_tok={top_k} must be in 1..num_experts={num_experts}")
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))

    def forward(self, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (router logits [N, E], top-k weights [N, k] in x's dtype, top-k expert ids [N, k])."""
        logits_NE = F.linear(x_ND, self.weight)
        probs_NE = torch.softmax(logits_NE, dim=-1, dtype=torch.float32)
        weights_Nk, experts_Nk = torch.topk(probs_NE, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights_Nk = weights_Nk / weights_Nk.sum(dim=-1, keepdim=True)
        return logits_NE, weights_Nk.to(logits_NE.dtype), experts_Nk

    def init_weights(self, std: float) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=std)


def load_balancing_loss(logits_NE: torch.Tensor, experts_Nk: torch.Tensor) -> torch.Tensor:
    """E * sum_e (share of top-k slots routed to e) * (mean router probability of e); k when balanced.

    Pass the rows of every sparse layer concatenated (HF's definition, without a padding mask: packed
    rows have no padding inside documents, and pad rows are few)."""
    num_experts = logits_NE.shape[-1]
    probs_NE = torch.softmax(logits_NE, dim=-1, dtype=torch.float32)
    routed_NkE = F.one_hot(experts_Nk, num_experts).float()
    tokens_per_expert_kE = routed_NkE.mean(dim=0)
    prob_per_expert_E = probs_NE.mean(dim=0)
    return num_experts * (tokens_per_expert_kE * prob_per_expert_E.unsqueeze(0)).sum()


class MoE(nn.Module):
    """Top-k routed SwiGLU experts. Names: `router`, `experts.{j}.{gate,up,down}_proj`."""

    def __init__(
        self, hidden_size: int, expert_size: int, num_experts: int, top_k: int, *, norm_topk_prob: bool
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.router = TopKRouter(hidden_size, num_experts, top_k, norm_topk_prob=norm_topk_prob)
        self.experts = nn.ModuleList(SwiGLU(hidden_size, expert_size) for _ in range(num_experts))
        self.last_router_logits: torch.Tensor | None = None  # [N, E] of the last forward (aux loss)
        self.last_expert_ids: torch.Tensor | None = None  # [N, k] of the last forward (aux loss, tests)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(-1, D)
        logits_NE, weights_Nk, experts_Nk = self.router(x_ND)
        self.last_router_logits, self.last_expert_ids = logits_NE, experts_Nk.detach()
        out_ND = torch.zeros_like(x_ND)
        # One pass over the experts that got tokens, ascending (HF's order, so index_add_ sums alike).
        hit = torch.bincount(experts_Nk.flatten(), minlength=self.num_experts).nonzero().flatten().tolist()
        for e in hit:
            token_idx, slot = torch.where(experts_Nk == e)
            y = self.experts[e](x_ND[token_idx]) * weights_Nk[token_idx, slot, None]
            out_ND.index_add_(0, token_idx, y.to(out_ND.dtype))
        return out_ND.reshape(B, T, D)


def model_aux_loss(model: nn.Module) -> torch.Tensor | None:
    """Load-balancing loss of the model's last forward over all sparse layers (HF's aux_loss, unscaled).

    Reads every submodule that recorded `last_router_logits` and `last_expert_ids` (MoE, GPT-OSS's MLP)."""
    layers = [m for m in model.modules() if getattr(m, "last_router_logits", None) is not None]
    if not layers:
        return None
    logits_NE = torch.cat([m.last_router_logits for m in layers])
    experts_Nk = torch.cat([m.last_expert_ids for m in layers])
    return load_balancing_loss(logits_NE, experts_Nk)
