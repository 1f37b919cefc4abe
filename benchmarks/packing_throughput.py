"""Packer throughput on one CPU core: posttrain's streaming best-fit packer against TRL's
`pack_dataset(..., strategy="bfd")` on the same samples, with the fill rate each achieves.

    .venv/bin/python benchmarks/packing_throughput.py                 # ~1 minute
    .venv/bin/python benchmarks/packing_throughput.py --samples 200000 --row-len 4096

Samples are token-id lists with a long-tailed (log-normal) length distribution like chat data:
median `--median-len`, sigma `--sigma`, clipped to [8, row_len]. Both sides get the same lists; only
the packing is timed (building the Python samples or the `datasets.Dataset` is not), best of
`--repeats`. posttrain is timed twice: placement alone (rows of sample references: what TRL's BFD
decides) and placement plus collation into the tensors the model consumes (what TRL's concatenated
Arrow rows still lack). posttrain packs online (a stream, a few rows open at a time, exact resumable state);
TRL's BFD sorts each 1,000-sample `datasets.map` batch and packs it offline. tokens/s = real tokens /
packing seconds; fill rate = real tokens / (rows x row_len). The process is pinned to one core.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np


def lengths(n: int, median: int, sigma: float, row_len: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(np.log(median), sigma, n).astype(int), 8, row_len)


def bench_posttrain(
    ids: list[list[int]], row_len: int, open_rows: int, repeats: int, collate_rows: int
) -> dict:
    """Best-fit placement alone, or placement plus collation into model-ready tensors
    (input_ids, targets, position_ids, doc_ids, doc_lens) in micro-batches of `collate_rows` rows."""
    from posttrain.data.packing import BestFitPacker, collate
    from posttrain.data.samples import Sample

    samples = [Sample(x, x) for x in ids]
    best, rows = float("inf"), []
    for _ in range(repeats):
        packer = BestFitPacker(row_len, open_rows)
        t0 = time.perf_counter()
        rows = []
        for s in samples:
            rows.extend(packer.add(s))
        rows.extend(packer.flush())
        if collate_rows:
            for i in range(0, len(rows), collate_rows):
                collate(rows[i : i + collate_rows], 0, row_len)
        best = min(best, time.perf_counter() - t0)
    tokens = sum(len(x) for x in ids)
    assert sum(len(s.input_ids) for r in rows for s in r) == tokens  # nothing lost or duplicated
    fill = tokens / (len(rows) * row_len)
    return {"seconds": best, "tokens_per_s": tokens / best, "rows": len(rows), "fill_rate": fill}


def bench_trl(ids: list[list[int]], row_len: int, repeats: int) -> dict:
    import datasets
    from trl.data_utils import pack_dataset

    datasets.disable_progress_bars()
    ds = datasets.Dataset.from_dict({"input_ids": ids})
    best, packed = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        packed = pack_dataset(ds, row_len, strategy="bfd", map_kwargs={"load_from_cache_file": False})
        best = min(best, time.perf_counter() - t0)
    tokens = sum(len(x) for x in ids)
    packed_tokens = sum(packed.with_format("arrow")["seq_lengths"].combine_chunks().values.to_numpy())
    assert packed_tokens == tokens
    return {
        "seconds": best,
        "tokens_per_s": tokens / best,
        "rows": len(packed),
        "fill_rate": tokens / (len(packed) * row_len),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=100_000)
    ap.add_argument("--row-len", type=int, default=2048)
    ap.add_argument("--median-len", type=int, default=200)
    ap.add_argument("--sigma", type=float, default=1.0)
    ap.add_argument("--open-rows", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="runs/bench/packing_throughput.json")
    args = ap.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core for both sides
    os.environ["OMP_NUM_THREADS"] = "1"
    import pyarrow as pa

    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    lens = lengths(args.samples, args.median_len, args.sigma, args.row_len, seed=0)
    rng = np.random.default_rng(1)
    ids = [rng.integers(1, 50_000, n).tolist() for n in lens]
    p = np.percentile(lens, [50, 90, 99])
    print(
        f"{args.samples} samples, {int(lens.sum()):,} tokens, lengths p50={p[0]:.0f} p90={p[1]:.0f} "
        f"p99={p[2]:.0f} max={lens.max()}; rows of {args.row_len}; 1 core ({platform.processor() or platform.machine()})"
    )
    results = {"trl_bfd": bench_trl(ids, args.row_len, args.repeats)}
    for k in args.open_rows:
        results[f"posttrain_open{k}"] = bench_posttrain(ids, args.row_len, k, args.repeats, 0)
        results[f"posttrain_open{k}+collate"] = bench_posttrain(ids, args.row_len, k, args.repeats, 8)
    trl = results["trl_bfd"]
    print(f"{'packer':<28}{'tokens/s':>14}{'fill rate':>11}{'rows':>9}{'vs TRL':>9}")
    for name, r in results.items():
        ratio = r["tokens_per_s"] / trl["tokens_per_s"]
        print(f"{name:<28}{r['tokens_per_s']:>14,.0f}{r['fill_rate']:>11.4f}{r['rows']:>9}{ratio:>8.2f}x")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
