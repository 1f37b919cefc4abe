"""The records RL passes between its parts, in one place: how to sample (`SamplingParams`), what an
engine returns for one sample (`Rollout`), which tokens a sample may emit (`TokenConstraint`) and one
trajectory as the trainer sees it (`Episode`). Engines, environments, the controller and the loss
import them from here, so none of them imports another for a type.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. Validated on construction; a bad value names the field."""

    max_new_tokens: int  # generated tokens per sample at most (the stop token included)
    temperature: float = 1.0  # logits are divided by it; 0 = greedy (argmax)
    top_p: float = 1.0  # nucleus: sample from the smallest set of tokens with this much mass; 1 = off
    top_k: int = 0  # sample from the k most likely tokens; 0 = off
    stop_ids: tuple[int, ...] = ()  # a sample ends after emitting one of these (kept in its tokens)
    n: int = 1  # samples per prompt
    seed: int | None = None  # reproducible sampling when set (a torch.Generator seeded per generate call)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"SamplingParams.temperature must be finite and >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.n < 1:
            raise ValueError(f"SamplingParams.n must be >= 1, got {self.n}")
        object.__setattr__(self, "stop_ids", tuple(self.stop_ids))  # a list from YAML stays hashable


@dataclass
class Rollout:
    """One sample: the prompt, the generated tokens and their log-probs (see the module doc)."""

    prompt_ids: list[int]
    token_ids: list[int]  # generated tokens only; includes the stop token when one ended it
    logprobs: list[float]  # one per generated token, under softmax(logits / T) before truncation
    finish_reason: str  # "stop" (a stop id was emitted) | "length" (max_new_tokens reached)


class TokenConstraint(Protocol):
    """Which tokens a sample may emit next, given the tokens it has generated so far in this generate
    call (not the prompt). Rows must allow at least one token."""

    def allowed(self, generated: Sequence[Sequence[int]], vocab_size: int) -> torch.Tensor:
        """bool [len(generated), vocab_size] on the CPU: True = may be sampled."""
        ...


@dataclass
class Episode:
    """One sampled trajectory, as tokens: the prompt, then the policy's tokens interleaved with any
    observation tokens from an environment. `policy_mask[i]` is 1 where the policy generated token i
    (those bear loss); `rollout_logprobs[i]` is the engine's log-prob of token i (0 elsewhere)."""

    token_ids: list[int]
    policy_mask: list[int]
    rollout_logprobs: list[float]
    reward: float = 0.0
    group: int = 0  # index of its prompt in the rollout batch
    fields: dict[str, list[float]] = field(default_factory=dict)  # per-token values filled by the controller

    @property
    def num_policy_tokens(self) -> int:
        return sum(self.policy_mask)
