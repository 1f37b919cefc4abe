"""Progress with ETA: a live bar on a terminal, periodic plain lines in CI logs."""

from __future__ import annotations

import sys
import time


class Progress:
    """`update(step, **fields)` after each step; shows step/total, ETA and the given fields."""

    def __init__(self, total: int, desc: str, mode: str = "auto", every_s: float = 10.0, start: int = 0):
        self.total, self.desc, self.start_step = total, desc, start
        self.mode = ("bar" if sys.stderr.isatty() else "plain") if mode == "auto" else mode
        self.every_s = every_s
        self.t0 = time.perf_counter()
        self._last_print = 0.0
        self._bar = None
        if self.mode == "bar":
            from rich.progress import BarColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total}"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
                transient=False,
            )
            self._task = self._bar.add_task(desc, total=total, completed=start, info="")
            self._bar.start()

    def update(self, step: int, **fields) -> None:
        info = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items())
        if self._bar is not None:
            self._bar.update(self._task, completed=step, info=info)
            return
        now = time.perf_counter()
        if self.mode == "plain" and (now - self._last_print >= self.every_s or step >= self.total):
            self._last_print = now
            done = step - self.start_step
            eta = (now - self.t0) / max(1, done) * (self.total - step)
            print(f"[{self.desc}] {step}/{self.total}  eta {eta:.0f}s  {info}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
