"""Rewards for RL: verifiable built-ins, user functions, and a reward model from the `rm` recipe.

Every reward is a function of one finished episode, `fn(ctx: RewardContext) -> float`:

  exact_answer  1.0 when the completion's answer equals the row's reference `answer`: numerically when
                both parse as numbers (the last number in the completion counts: "so it is 42" -> 42),
                else as text up to surrounding whitespace
  format        1.0 when the episode ended on a stop token (not cut at max_new_tokens) and the completion
                matches `pattern` (default: one non-empty line, no chatter around the answer)
  function      a user function given as `path/to/file.py:name`, called with the RewardContext
  model         a reward model exported by the `rm` recipe: its scalar head on prompt + completion tokens

`rl.rewards` lists them with weights; an episode's reward is the weighted sum, and each one's mean is
logged as `reward/<name>` (name: the entry's `name`, else the function's name, else the kind). Rewards run in the controller (functions) or in the reward worker (a model).
"""

from __future__ import annotations

import importlib.util
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from posttrain.errors import ConfigError

NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")
DEFAULT_FORMAT = r"^[^\n]*\S[^\n]*$"  # one non-empty line
CHATTER = re.compile(r"\b(sure|answer is|let me|hope|anything else)\b", re.IGNORECASE)


@dataclass
class RewardContext:
    """What a reward sees of one episode."""

    completion: str  # the policy's final answer, decoded without special tokens
    completion_ids: list[int]  # the policy's tokens of the final turn (with the stop token, if any)
    token_ids: list[int]  # the whole episode: prompt, policy turns, observations
    answer: str  # the row's reference answer
    finish_reason: str  # "stop" or "length"
    metadata: dict = field(default_factory=dict)  # the row's metadata (task, ...)


RewardFn = Callable[[RewardContext], float]


def parse_number(text: str) -> float | None:
    found = NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1])
    except ValueError:
        return None


def exact_answer(ctx: RewardContext) -> float:
    answer = ctx.answer.strip()
    if NUMBER.fullmatch(answer):
        got = parse_number(ctx.completion)
        return float(got is not None and math.isclose(got, float(answer), rel_tol=0.0, abs_tol=1e-9))
    return float(ctx.completion.strip() == answer)


def format_reward(pattern: str | None = None) -> RewardFn:
    regex = re.compile(pattern or DEFAULT_FORMAT)

    def reward(ctx: RewardContext) -> float:
        text = ctx.completion.strip()
        ok = ctx.finish_reason == "stop" and bool(regex.search(text))
        if pattern is None:  # the default also rejects the usual padding around an answer
            ok = ok and not CHATTER.search(text)
        return float(ok)

    return reward


def load_function(spec: str, key: str = "rl.rewards[].function") -> Callable:
    """`path/to/file.py:name` -> the function (the file is imported as a module of its own)."""
    path, sep, name = spec.rpartition(":")
    if not sep or not path.endswith(".py") or not name:
        raise ConfigError(f"{key}={spec!r}: expected 'path/to/file.py:function_name'")
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{key}={spec!r}: file {file} not found")
    module_spec = importlib.util.spec_from_file_location(f"posttrain_user_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"{key}={spec!r}: {file} has no function {name!r}")
    return fn


class RewardModelScorer:
    """A reward model from the `rm` recipe (an HF export with its scalar head), on token ids."""

    def __init__(self, path: str, head: str = "reward", batch_size: int = 32):
        from posttrain.models.hf_io import load_pretrained

        if not Path(path).is_dir():
            raise ConfigError(f"rl.rewards[].path={path!r}: not a directory (an `rm` recipe's hf export)")
        self.model, _ = load_pretrained(path)
        self.model.eval()
        heads = getattr(self.model, "heads", {})
        if head not in heads:
            raise ConfigError(f"rl.rewards[].head={head!r}: {path} has heads {sorted(heads) or 'none'}")
        self.head, self.batch_size = head, batch_size

    @torch.no_grad()
    def score(self, sequences: Sequence[Sequence[int]]) -> list[float]:
        out: list[float] = []
        for start in range(0, len(sequences), self.batch_size):
            chunk = sequences[start : start + self.batch_size]
            T = max(len(s) for s in chunk)
            ids = torch.zeros((len(chunk), T), dtype=torch.long)
            for i, s in enumerate(chunk):
                ids[i, : len(s)] = torch.tensor(list(s))
            h = self.model(ids)  # right padding: causal attention never lets a real token see it
            last = torch.tensor([len(s) - 1 for s in chunk])
            values = self.model.heads[self.head](h[torch.arange(len(chunk)), last]).squeeze(-1)
            out += values.float().tolist()
        return out


@dataclass
class WeightedReward:
    name: str
    weight: float
    fn: RewardFn | None = None  # per-episode function
    scorer: RewardModelScorer | None = None  # batched reward model


def build_rewards(specs) -> list[WeightedReward]:
    """rl.rewards entries -> weighted rewards (names are unique: kind, or kind_i when repeated)."""
    if not specs:
        raise ConfigError("rl.rewards is empty: give at least one reward (e.g. [{kind: exact_answer}])")
    out, seen = [], set()
    for i, s in enumerate(specs):
        default = s.function.rpartition(":")[2] if s.kind == "function" and s.function else s.kind
        name = s.name or default
        if name in seen:
            name = f"{name}_{i}"
        seen.add(name)
        if s.kind == "exact_answer":
            out.append(WeightedReward(name, s.weight, fn=exact_answer))
        elif s.kind == "format":
            out.append(WeightedReward(name, s.weight, fn=format_reward(s.pattern)))
        elif s.kind == "function":
            if not s.function:
                raise ConfigError(f"rl.rewards[{i}]: kind function needs `function: path/to/file.py:name`")
            out.append(
                WeightedReward(name, s.weight, fn=load_function(s.function, f"rl.rewards[{i}].function"))
            )
        elif s.kind == "model":
            if not s.path:
                raise ConfigError(f"rl.rewards[{i}]: kind model needs `path:` (an `rm` recipe's hf export)")
            out.append(WeightedReward(name, s.weight, scorer=RewardModelScorer(s.path, s.head)))
        else:
            raise ConfigError(f"rl.rewards[{i}].kind={s.kind!r} is not a reward kind")
    return out


def score_episodes(rewards: list[WeightedReward], contexts: list[RewardContext]) -> tuple[list[float], dict]:
    """(total reward per episode, {reward/<name>: mean}) for one batch of finished episodes."""
    totals = [0.0] * len(contexts)
    metrics = {}
    for r in rewards:
        if r.scorer is not None:
            values = r.scorer.score([c.token_ids for c in contexts])
        else:
            values = [float(r.fn(c)) for c in contexts]
        for i, v in enumerate(values):
            if not math.isfinite(v):
                raise ValueError(f"reward {r.name!r} returned {v} for episode {i}")
            totals[i] += r.weight * v
        metrics[f"reward/{r.name}"] = sum(values) / max(1, len(values))
    return totals, metrics
