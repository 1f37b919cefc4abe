"""Model FLOPs utilisation: achieved training FLOP/s over the device's peak.

The peak is configured (`metrics.peak_flops_per_s`), or for a known GPU its nominal dense bf16
number, or on CPU measured once with a large fp32 matmul (the best this machine can do for the
dtype we train in on CPU). FLOPs per step come from the model's FLOPs accounting, with attention
counted per document (see posttrain.models.flops).
"""

from __future__ import annotations

import functools
import time

import torch

# Nominal dense bf16 peaks (FLOP/s) of common accelerators.
GPU_PEAKS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


@functools.cache
def measure_cpu_peak_flops(n: int = 1024, reps: int = 8) -> float:
    """Best observed fp32 matmul FLOP/s on this CPU (measured once per process)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def peak_flops(configured: float | None, device: torch.device) -> float:
    if configured:
        return configured
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAKS.items():
            if key in name:
                return value
        raise ValueError(f"unknown GPU {name!r}: set metrics.peak_flops_per_s")
    return measure_cpu_peak_flops()
