"""Bounded memory: the whole pipeline (reader -> shuffle window -> tokens -> packer -> background
queue -> collated batches) streams a JSONL file of ~240 MB while the process's peak resident memory
grows by less than 48 MB.

What is measured: the kernel's peak RSS of this process (VmHWM, reset through /proc/self/clear_refs
just before streaming) minus the RSS right before streaming. Page cache is not counted in RSS, so
the file's bytes sitting in the OS cache do not hide or inflate anything. Each record carries 512
token ids plus an 8 KB `note` field the schema ignores, so bytes (what a reader must not hold) are
large while the packing work stays fast enough for a test.
"""

import json
import time
from pathlib import Path

import pytest

from posttrain.config import DataConfig
from posttrain.data.loader import TrainLoader
from posttrain.data.pipeline import build_pipeline
from posttrain.errors import DataError

FILE_MB = 240
BOUND_MB = 48


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _write_big_jsonl(path: Path, target_bytes: int) -> tuple[int, int]:
    """Write records until the file reaches target_bytes; returns (records, tokens)."""
    lines = [
        json.dumps({"input_ids": [(k * 7 + j) % 800 + 1 for j in range(512)], "note": f"{k:04d}" * 2048})
        + "\n"
        for k in range(64)
    ]
    chunk = "".join(lines).encode()
    n = 0
    with path.open("wb") as f:
        while n * len(chunk) < target_bytes:
            f.write(chunk)
            n += 1
    return n * len(lines), n * len(lines) * 512


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_streaming_a_file_far_larger_than_the_memory_bound(tmp_path):
    path = tmp_path / "big.jsonl"
    records, tokens = _write_big_jsonl(path, FILE_MB * 2**20)
    size_mb = path.stat().st_size / 2**20
    data = DataConfig(
        train={"path": str(path), "format": "tokens", "epochs": 1},
        max_tokens_per_pack=2048,
        shuffle_window_samples=64,
        prefetch_rows=32,
    )
    loader = TrainLoader(
        lambda: build_pipeline(data, tokenizer=None, seed=0),
        row_len=2048,
        micro_batch_size=4,
        pad_id=0,
        prefetch_rows=data.prefetch_rows,
    )
    loader.next_micro_batch()  # warm up: imports, the thread, the first window
    baseline_kb = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    t0 = time.perf_counter()
    with pytest.raises(DataError, match="ran out"):
        while True:
            batch = loader.next_micro_batch()
            assert batch["input_ids"].shape == (4, 2048)
    seconds = time.perf_counter() - t0
    growth_mb = (_status_kb("VmHWM") - baseline_kb) / 1024
    print(
        f"streamed {size_mb:.0f} MB ({records} records, {tokens} tokens) in {seconds:.1f}s; "
        f"peak RSS growth {growth_mb:.1f} MB (bound {BOUND_MB} MB)"
    )
    assert size_mb >= FILE_MB and size_mb > 4 * BOUND_MB
    assert loader.tokens_served >= tokens - 4 * 2048  # everything went through (last partial batch aside)
    assert growth_mb < BOUND_MB
    loader.close()
