"""AdamW and learning-rate schedules.

The schedule is a pure function of the optimizer step (`lr_at`), set on the param groups before
each step. There is no scheduler object with hidden state: resuming restores the step and nothing
else is needed.
"""

from __future__ import annotations

import math

import torch

from posttrain.config import OptimConfig, ScheduleConfig


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over trainable parameters; matrices decay, vectors (norms, biases) do not."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            wants_decay = p.ndim >= 2 and not getattr(p, "_posttrain_no_decay", False)  # see models/vocab.py
            (decay if wants_decay else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # foreach=False keeps the update bit-identical between runs that differ only in how the
    # step was split into micro-batches (the 1x8 == 8x1 test relies on it).
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, foreach=False)


def lr_at(step: int, total_steps: int, peak_lr: float, cfg: ScheduleConfig) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total_steps`."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return peak_lr * (step + 1) / cfg.warmup_steps
    if cfg.kind == "constant":
        return peak_lr
    floor = peak_lr * cfg.min_lr_ratio
    if cfg.kind == "cosine":
        span = max(1, total_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return floor + (peak_lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    # wsd: warmup, stable at peak, then linear decay over the last `decay_fraction` of the steps.
    decay_steps = max(1, round(total_steps * cfg.decay_fraction))
    decay_start = total_steps - decay_steps
    if step < decay_start:
        return peak_lr
    return peak_lr + (floor - peak_lr) * min(1.0, (step - decay_start + 1) / decay_steps)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
