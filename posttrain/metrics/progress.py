"""Progress with ETA for every long task: training, eval, generation, data preparation, checkpoint
writing and the HF export.

Modes (`metrics.progress`): `bar` draws rich bars on a terminal; `plain` prints one line every
`every_s` seconds and one when the task ends, for CI logs; `quiet` prints nothing; `auto` is `bar`
when stderr is a terminal and `plain` otherwise. Only rank 0 should show progress: callers pass
`quiet` on the other ranks.

Tasks nest (an eval or a checkpoint inside training): rich allows one live display per process, so
all bars share one, started by the first open task and stopped by the last.
"""

from __future__ import annotations

import sys
import time

MODES = ("auto", "bar", "plain", "quiet")


def resolve_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown progress mode {mode!r} (one of {', '.join(MODES)})")
    if mode == "auto":
        return "bar" if sys.stderr.isatty() else "plain"
    return mode


class _SharedLive:
    """The one rich display that every open bar of this process draws into."""

    display = None
    users = 0

    @classmethod
    def acquire(cls):
        if cls.display is None:
            from rich.progress import BarColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            cls.display = RichProgress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                TextColumn("{task.completed}/{task.fields[total_text]} {task.fields[unit]}"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
                transient=False,
            )
            cls.display.start()
        cls.users += 1
        return cls.display

    @classmethod
    def release(cls) -> None:
        cls.users -= 1
        if cls.users == 0 and cls.display is not None:
            cls.display.stop()
            cls.display = None


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _count(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def format_duration(seconds: float) -> str:
    """12s, 3m05s, 2h07m."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    """`update(done, **fields)` or `advance(n, **fields)` as work completes; `close()` at the end (or use
    it as a context manager). `total=None` is a task of unknown length: count and rate, no ETA.

    The ETA is (elapsed / done since start) x remaining, so a resumed run (`start`) is not credited
    with the steps it skipped."""

    def __init__(
        self,
        total: float | None,
        desc: str,
        mode: str = "auto",
        every_s: float = 10.0,
        start: float = 0,
        unit: str = "steps",
    ):
        self.total, self.desc, self.unit = total, desc, unit
        self.start_count = self.done = start
        self.mode = resolve_mode(mode)
        self.every_s = every_s
        self.t0 = time.perf_counter()
        self._last_print = self.t0
        self._printed_at: int | None = None
        self._fields: dict = {}
        self._bar = None
        if self.mode == "bar":
            self._bar = _SharedLive.acquire()
            self._task = self._bar.add_task(
                desc,
                total=total,
                completed=start,
                info="",
                unit=unit,
                total_text="?" if total is None else str(total),
            )

    # ------------------------------------------------------------------------------ numbers
    @property
    def elapsed_s(self) -> float:
        return time.perf_counter() - self.t0

    def rate(self) -> float:
        """Units per second since the start (0 before the first one completes)."""
        return (self.done - self.start_count) / max(self.elapsed_s, 1e-9)

    def eta_s(self) -> float | None:
        """Seconds left at the current rate; None when the total is unknown or nothing is done yet."""
        done = self.done - self.start_count
        if self.total is None or done <= 0:
            return None
        return self.elapsed_s / done * max(self.total - self.done, 0)

    def line(self) -> str:
        """The plain-text progress line."""
        count = _count(self.done) + ("" if self.total is None else f"/{_count(self.total)}")
        parts = [f"[{self.desc}] {count} {self.unit}"]
        if self.total:
            parts.append(f"({100 * self.done / self.total:.0f}%)")
        parts.append(f"{self.rate():.3g} {self.unit}/s")
        eta = self.eta_s()
        if eta is not None and self.done < (self.total or 0):
            parts.append(f"eta {format_duration(eta)}")
        parts.append(f"elapsed {format_duration(self.elapsed_s)}")
        line = " ".join(parts)
        if self._fields:
            line += "  " + "  ".join(f"{k} {_fmt(v)}" for k, v in self._fields.items())
        return line

    # ------------------------------------------------------------------------------ updates
    def update(self, done: float, **fields) -> None:
        self.done = done
        self._fields = fields or self._fields
        if self._bar is not None:
            info = "  ".join(f"{k} {_fmt(v)}" for k, v in self._fields.items())
            self._bar.update(self._task, completed=done, info=info)
            return
        if self.mode != "plain":
            return
        now = time.perf_counter()
        finished = self.total is not None and done >= self.total
        if now - self._last_print >= self.every_s or finished:
            self._print(now)

    def advance(self, n: float = 1, **fields) -> None:
        self.update(self.done + n, **fields)

    def _print(self, now: float) -> None:
        self._last_print, self._printed_at = now, self.done
        print(self.line(), file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            if _SharedLive.users > 1:  # a nested task (an eval, a checkpoint) leaves no bar behind
                self._bar.remove_task(self._task)
            self._bar = None
            _SharedLive.release()
        elif self.mode == "plain" and self._printed_at != self.done:
            self._print(time.perf_counter())  # the end of every task shows in CI logs

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
