"""LoRA applied from outside the model definitions, addressed by unified module names.

`apply_lora(model, cfg)` swaps each targeted `nn.Linear` (e.g. every `q_proj`, or the `gate_proj` of
every expert) for a `LoRALinear` that keeps the same `weight`/`bias` parameters under the same names (so
checkpoints, HF key maps and FSDP see the base model unchanged) and adds `lora_a` [r, in] and `lora_b`
[out, r]. Everything else is frozen: only adapter weights require grad, so only they reach the optimiser.

    y = x W^T + b + (alpha / r) * dropout(x) A^T B^T        (PEFT's LoRA, init A ~ kaiming, B = 0)

Exports: `peft_adapter_state_dict` + `peft_adapter_config` give a PEFT adapter directory that
`peft.PeftModel.from_pretrained` loads onto the `transformers` model; `merged_state_dict` folds the
adapters into plain weights for a full HF export. `merge_lora` / `unmerge_lora` do the same in place
(for fast inference, then back to training).

Target names: the leaf names q_proj k_proj v_proj o_proj gate_proj up_proj down_proj, or the groups
"attention" (the four projections), "mlp" (dense MLP gate/up/down), "experts" (the same inside MoE
experts). A target that matches nothing is an error naming the valid names.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from posttrain.errors import ConfigError

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
GROUPS = {"attention": ATTENTION, "mlp": MLP, "experts": MLP}
LEAVES = ATTENTION + MLP


class LoRALinear(nn.Module):
    """A frozen linear (same parameter names as nn.Linear) plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # shared Parameter: same tensor, same name, frozen below
        self.bias = base.bias
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        self.disabled = False  # adapters_disabled(): the frozen base alone (DPO's reference model)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device, dtype = base.weight.device, base.weight.dtype
        self.lora_a = nn.Linear(self.in_features, rank, bias=False, device=device, dtype=dtype)
        self.lora_b = nn.Linear(rank, self.out_features, bias=False, device=device, dtype=dtype)
        self.merged = False
        self.init_weights(0.0)

    @torch.no_grad()
    def init_weights(self, std: float) -> None:
        """PEFT's default: A kaiming-uniform(a=sqrt(5)), B zeros, so the adapted model starts as the base.

        `std` is the base init's and is ignored: an adapter must start as a zero update whatever the base."""
        nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.merged or self.disabled:
            return y
        return y + self.lora_b(self.lora_a(self.dropout(x))) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """The [out, in] update the adapter adds to the weight: scaling * B @ A."""
        return (self.lora_b.weight @ self.lora_a.weight) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.weight += self.delta_weight().to(self.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight -= self.delta_weight().to(self.weight.dtype)
            self.merged = False

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, alpha={self.alpha}"


def _wanted_leaves(targets: list[str]) -> dict[str, set[str]]:
    """target spec -> {"dense": leaf names outside experts, "experts": leaf names inside experts}."""
    dense: set[str] = set()
    experts: set[str] = set()
    for t in targets:
        if t == "experts":
            experts |= set(MLP)
        elif t in GROUPS:
            dense |= set(GROUPS[t])
        elif t in LEAVES:
            dense.add(t)
            if t in MLP:
                experts.add(t)
        else:
            raise ConfigError(
                f"model.lora.targets: unknown target {t!r}; valid: {sorted(GROUPS) + list(LEAVES)}"
            )
    return {"dense": dense, "experts": experts}


def apply_lora(model: nn.Module, *, rank: int, alpha: float, dropout: float, targets: list[str]) -> list[str]:
    """Wrap the targeted linears and freeze everything else. Returns the names of the wrapped modules."""
    if rank <= 0:
        raise ConfigError(f"model.lora.rank must be positive, got {rank}")
    wanted = _wanted_leaves(targets)
    names = []
    for name, module in list(model.named_modules()):
        leaf = name.rsplit(".", 1)[-1]
        kind = "experts" if ".experts." in name else "dense"
        if isinstance(module, nn.Linear) and leaf in wanted[kind]:
            parent = model.get_submodule(name.rsplit(".", 1)[0])
            setattr(parent, leaf, LoRALinear(module, rank, alpha, dropout))
            names.append(name)
    if not names:
        raise ConfigError(f"model.lora.targets {targets} matched no linear layer of this model")
    for pname, param in model.named_parameters():
        param.requires_grad_(".lora_a." in pname or ".lora_b." in pname)
    return names


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Within the block the model computes its frozen base (every adapter off): a reference model
    for preference losses without a second copy of the weights."""
    modules = list(lora_modules(model).values())
    if any(m.merged for m in modules):
        raise ConfigError("adapters_disabled: the adapters are merged into the weights; unmerge first")
    for m in modules:
        m.disabled = True
    try:
        yield model
    finally:
        for m in modules:
            m.disabled = False


def merge_lora(model: nn.Module) -> None:
    for m in lora_modules(model).values():
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    for m in lora_modules(model).values():
        m.unmerge()


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state dict with every adapter folded into its weight; no lora_* keys.

    Leaves the model untouched (works on copies of the adapted weights only)."""
    sd = {k: v for k, v in model.state_dict().items() if ".lora_a." not in k and ".lora_b." not in k}
    for name, m in lora_modules(model).items():
        if not m.merged:
            with torch.no_grad():
                sd[f"{name}.weight"] = m.weight + m.delta_weight().to(m.weight.dtype)
    return sd


def peft_adapter_state_dict(model: nn.Module, to_hf_name: Any) -> dict[str, torch.Tensor]:
    """Adapter weights under PEFT's saved names: base_model.model.<hf module>.lora_A/B.weight.

    to_hf_name maps one of our parameter names (e.g. layers.0.attention.q_proj.weight) to its HF name."""
    out = {}
    for name, m in lora_modules(model).items():
        if ".experts." in name:
            raise ConfigError(
                f"LoRA on MoE experts ({name}) has no PEFT adapter layout in transformers 5 (experts are "
                "fused there); export the merged model instead (training.export_hf)"
            )
        hf_module = to_hf_name(f"{name}.weight").removesuffix(".weight")
        out[f"base_model.model.{hf_module}.lora_A.weight"] = m.lora_a.weight.detach()
        out[f"base_model.model.{hf_module}.lora_B.weight"] = m.lora_b.weight.detach()
    return out


def peft_adapter_config(model: nn.Module, base_model_path: str | None) -> dict[str, Any]:
    """adapter_config.json content for PEFT: one rank/alpha for all wrapped modules."""
    modules = lora_modules(model)
    first = next(iter(modules.values()))
    dropout = first.dropout.p if isinstance(first.dropout, nn.Dropout) else 0.0
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_path,
        "r": first.rank,
        "lora_alpha": first.alpha,
        "lora_dropout": dropout,
        "target_modules": sorted({name.rsplit(".", 1)[-1] for name in modules}),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def count_params(model: nn.Module) -> dict[str, int]:
    """Trainable and total parameter counts (for the run log)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable_params": trainable, "total_params": total}
