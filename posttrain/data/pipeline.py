"""The training data pipeline: sources -> mixer -> validation and tokenisation -> packer -> rows.

One `Pipeline` produces the row stream of one data-parallel shard. It is deterministic: the same
config, seed and shard give the same rows, whatever thread runs it. After every row it can describe
itself as a `snapshot()` -- the sources' positions and skip counts, the mixer's draw count, the
packer's open rows and the rows already packed but not yet handed out -- cheaply (samples are shared,
not copied), so a background producer can attach to each row the exact state that follows it. The
loader keeps the snapshot of the last row the *training loop* consumed and checkpoints that one.

The stream ends only when every source has run its `epochs`; the packer's open rows are then
flushed as the final rows.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from posttrain.config import DataConfig, source_name
from posttrain.data.mixing import Mixer
from posttrain.data.packing import BestFitPacker, Row, rows_from_state, rows_to_state
from posttrain.data.samples import Annotate, Sample, render_record
from posttrain.data.sources import SourceStream


class Pipeline:
    """Rows for one shard (see the module docstring)."""

    def __init__(
        self,
        streams: list[SourceStream],
        renders: list[Callable[[dict], tuple[list[int], list[int]]]],
        mixer: Mixer,
        *,
        row_len: int,
        overlong: str = "truncate",
        packing: bool = True,
        open_rows: int = 16,
        rows_per_step: int = 1,
        annotate: Annotate | None = None,
    ):
        self.streams, self.renders, self.mixer = streams, renders, mixer
        self.annotate = annotate  # a recipe's per-sample check/completion (see samples.Annotate)
        self.row_len, self.overlong, self.packing = row_len, overlong, packing
        self.rows_per_step = max(1, rows_per_step)
        self.packer = BestFitPacker(row_len, open_rows)
        self.pending: deque[Row] = deque()  # packed rows not yet handed out
        self.active = [not s.exhausted for s in streams]
        self.rows_emitted = 0
        self.finished = False  # every source ran out and the packer was flushed

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.streams]

    def _next_samples(self) -> list[Sample] | None:
        """Samples of the next record of a mixer-chosen source; None when all sources ran out."""
        while any(self.active):
            i = self.mixer.choose(self.rows_emitted // self.rows_per_step, self.active)
            item = self.streams[i].next_record()
            if item is None:
                self.active[i] = False
                continue
            return render_record(
                self.streams[i], item, self.renders[i], self.row_len, self.overlong, self.annotate
            )
        return None

    def next_row(self) -> Row | None:
        """The next row of whole samples; None at the end of the stream."""
        while not self.pending:
            samples = self._next_samples()
            if samples is None:
                if self.finished:
                    return None
                self.pending.extend(self.packer.flush() if self.packing else [])
                self.finished = True
                continue
            for sample in samples:
                self.pending.extend(self.packer.add(sample) if self.packing else [[sample]])
        self.rows_emitted += 1
        return self.pending.popleft()

    # ---------------------------------------------------------------------------- state
    def snapshot(self) -> tuple:
        """The state after the last row handed out; shares samples with the live pipeline."""
        return (
            tuple((s.state(), dict(s.skips)) for s in self.streams),
            self.mixer.draws,
            [list(r) for r in self.packer.open_rows],
            list(self.pending),
            self.rows_emitted,
            self.finished,
        )

    @staticmethod
    def materialise(snapshot: tuple) -> dict:
        """A snapshot as plain data for a checkpoint."""
        streams, draws, open_rows, pending, rows_emitted, finished = snapshot
        return {
            "sources": [{"position": list(pos), "skips": skips} for pos, skips in streams],
            "mixer": {"draws": draws},
            "packer": {"open_rows": rows_to_state(open_rows)},
            "pending": rows_to_state(pending),
            "rows_emitted": rows_emitted,
            "finished": finished,
        }

    def state_dict(self) -> dict:
        return self.materialise(self.snapshot())

    def load_state_dict(self, state: dict) -> None:
        if len(state["sources"]) != len(self.streams):
            raise ValueError(
                f"checkpoint has {len(state['sources'])} data sources, the config {len(self.streams)}"
            )
        for stream, s in zip(self.streams, state["sources"]):
            stream.load_state_dict(s)
        self.active = [not s.exhausted for s in self.streams]
        self.mixer.load_state_dict(state["mixer"])
        self.packer.load_state_dict(state["packer"])
        self.pending = deque(rows_from_state(state["pending"]))
        self.rows_emitted, self.finished = state["rows_emitted"], state["finished"]

    def skips(self) -> dict[str, dict[str, int]]:
        return {s.name: dict(s.skips) for s in self.streams}


def build_pipeline(
    data: DataConfig,
    tokenizer,
    *,
    seed: int,
    shard: int = 0,
    num_shards: int = 1,
    rows_per_step: int = 1,
    default_epochs: int | None = None,
    annotate: Annotate | None = None,
) -> Pipeline:
    """The pipeline of `data.train` for one shard; `default_epochs` for sources that set none;
    `annotate` checks or completes every rendered sample (e.g. with precomputed reference log-probs)."""
    from posttrain.data.render import renderer

    sources = data.train_sources
    streams = [
        SourceStream(
            src,
            i,
            seed=seed,
            shard=shard,
            num_shards=num_shards,
            shuffle=data.shuffle,
            window=data.shuffle_window_samples,
            epochs=default_epochs,
        )
        for i, src in enumerate(sources)
    ]
    renders = [renderer(src.format, tokenizer, data.mask) for src in sources]
    mixer = Mixer([source_name(s) for s in sources], [s.weight for s in sources], data.weight_schedule, seed)
    return Pipeline(
        streams,
        renders,
        mixer,
        row_len=data.max_tokens_per_pack,
        overlong=data.overlong,
        packing=data.packing,
        open_rows=data.pack_open_rows,
        rows_per_step=rows_per_step,
        annotate=annotate,
    )
