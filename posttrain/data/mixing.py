"""Weighted mixing of several sources, reproducible from the seed and resumable from one integer.

Each next sample comes from source `i` with probability `w_i / sum(w)` over the sources that still
have data (a source that ran its `epochs` drops out and the others share its weight). Weights come
from each source's `weight`, or from `data.weight_schedule`: a list of (step, weights) points,
linear in between and constant after the last.

The random draws are counter-based: draw `d` is a fixed function of (seed, d), computed 4,096 at a
time. The mixer's whole state is therefore the number of draws made, so a checkpoint stores one
integer and a resumed run draws exactly the numbers the uninterrupted run would have.
"""

from __future__ import annotations

import bisect

import numpy as np

from posttrain.config import WeightPoint

DRAWS_PER_BLOCK = 4096


class Mixer:
    """Chooses the source of every next sample (see the module docstring)."""

    def __init__(
        self, names: list[str], weights: list[float], schedule: list[WeightPoint] = (), seed: int = 0
    ):
        self.names, self.base = list(names), [float(w) for w in weights]
        self.seed = seed
        self.points = [
            (p.step, [p.weights.get(n, w) for n, w in zip(self.names, self.base)]) for p in schedule
        ]
        self.draws = 0  # the whole state
        self._block, self._values = -1, np.empty(0)

    def weights_at(self, step: int) -> list[float]:
        """Source weights at optimizer step `step` (normalised to sum to 1)."""
        if not self.points:
            w = self.base
        else:
            steps = [s for s, _ in self.points]
            i = bisect.bisect_right(steps, step)
            if i == 0:
                w = self.points[0][1]
            elif i == len(self.points):
                w = self.points[-1][1]
            else:
                (s0, w0), (s1, w1) = self.points[i - 1], self.points[i]
                t = (step - s0) / (s1 - s0)
                w = [a + t * (b - a) for a, b in zip(w0, w1)]
        total = sum(w)
        return [x / total for x in w] if total > 0 else [0.0] * len(w)

    def _uniform(self) -> float:
        block, i = divmod(self.draws, DRAWS_PER_BLOCK)
        if block != self._block:
            self._values = np.random.default_rng([self.seed, 0x5EED, block]).random(DRAWS_PER_BLOCK).tolist()
            self._block = block
        self.draws += 1
        return self._values[i]

    def choose(self, step: int, active: list[bool]) -> int:
        """Index of the source to draw from; only `active` sources are eligible."""
        live = [i for i, a in enumerate(active) if a]
        if len(live) == 1:  # no randomness needed: keeps a single source's order and state trivial
            return live[0]
        weights = self.weights_at(step)
        w = [weights[i] for i in live]
        total = sum(w)
        if total <= 0:  # every remaining source is weighted 0 right now: draw uniformly among them
            w, total = [1.0] * len(live), float(len(live))
        u = self._uniform() * total
        acc = 0.0
        for i, x in zip(live, w):
            acc += x
            if u < acc:
                return i
        return live[-1]

    def state_dict(self) -> dict:
        return {"draws": self.draws}

    def load_state_dict(self, state: dict) -> None:
        self.draws = state["draws"]
