"""Effective (loss-bearing) tokens/s of SFT with packing against padding to the longest sample in
the micro-batch, on a long-tailed length distribution; and the ceiling the two fill rates imply.

    .venv/bin/python benchmarks/packing_vs_padding.py               # ~30 s on 2 CPU cores
    .venv/bin/python benchmarks/packing_vs_padding.py --steps 30 --threads 2

Both runs train the tiny Qwen3 of `configs/tiny/sft.yaml` from the same seed with the `sft` recipe
on the same pre-tokenised samples (log-normal lengths, median `--median-len`, clipped to
[16, row_len]; the first 40% of each sample is prompt and bears no loss), 16 rows per optimizer step
in micro-batches of 8. Packing: best-fit rows of `--row-len` tokens with document masks. Padding:
one sample per row, padded to the longest in its micro-batch. Effective tokens/s = loss-bearing
tokens / step time over steps 2..N (step 1 is warm-up); fill rate = real tokens / (rows x padded
length). The ceiling is fill(packed) / fill(padded): the speed-up packing would give if step time
were proportional to the padded slots a step processes.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch

ARCH = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    tie_word_embeddings=True,
)


def write_data(path: Path, n: int, median: int, sigma: float, row_len: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    lens = np.clip(rng.lognormal(np.log(median), sigma, n).astype(int), 16, row_len)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for n_tok in lens:
            ids = rng.integers(10, 800, n_tok).tolist()
            cut = int(0.4 * n_tok)
            f.write(json.dumps({"input_ids": ids, "labels": [-100] * cut + ids[cut:]}) + "\n")
    return lens


def run(out: Path, data: Path, packing: bool, steps: int, row_len: int) -> dict:
    from posttrain.config import validate_job
    from posttrain.metrics.jsonl import read_jsonl
    from posttrain.recipes import sft
    from posttrain.train.setup import build_tokenizer, make_loader

    raw = {
        "recipe": "sft",
        "output_dir": str(out),
        "seed": 0,
        "model": {"arch": ARCH},
        "data": {
            "train": {"path": str(data), "format": "tokens"},
            "max_tokens_per_pack": row_len,
            "packing": packing,
        },
        "optim": {"lr": 1e-3},
        "schedule": {"kind": "constant"},
        "training": {
            "global_batch_size": 16,
            "micro_batch_size_per_device": 8,
            "max_steps": steps,
            "export_hf": False,
        },
        "metrics": {"progress": "quiet", "peak_flops_per_s": 1e11},
    }
    cfg = validate_job(raw)
    sft.train(cfg)
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r][1:]
    loss_tokens = sum(r["num_loss_tokens"] for r in rows)
    seconds = sum(r["step_time_s"] for r in rows)
    # Fill rate of exactly the batches trained on: replay the same loader.
    loader = make_loader(cfg.data, cfg.training, build_tokenizer(cfg.tokenizer), cfg.seed)
    real = slots = 0
    for _ in range(steps * 2):
        batch = loader.next_micro_batch()
        real += int(batch["doc_lens"].sum())
        slots += batch["input_ids"].numel()
    loader.close()
    return {
        "effective_tokens_per_s": loss_tokens / seconds,
        "tokens_per_s": sum(r["num_tokens"] for r in rows) / seconds,
        "fill_rate": real / slots,
        "loss_tokens_per_step": loss_tokens / len(rows),
        "step_time_s": seconds / len(rows),
        "final_loss": rows[-1]["loss"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--samples", type=int, default=4000)
    ap.add_argument("--row-len", type=int, default=512)
    ap.add_argument("--median-len", type=int, default=60)
    ap.add_argument("--sigma", type=float, default=0.9)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="runs/bench/packing_vs_padding")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    lens = write_data(out / "data.jsonl", args.samples, args.median_len, args.sigma, args.row_len)
    p = np.percentile(lens, [50, 90, 99])
    print(f"{args.samples} samples, lengths p50={p[0]:.0f} p90={p[1]:.0f} p99={p[2]:.0f} max={lens.max()}")
    results = {
        "packing": run(out / "packed", out / "data.jsonl", True, args.steps, args.row_len),
        "padding": run(out / "padded", out / "data.jsonl", False, args.steps, args.row_len),
    }
    pk, pd = results["packing"], results["padding"]
    print(f"{'':<9}{'effective tok/s':>16}{'tok/s':>10}{'fill rate':>11}{'loss tok/step':>15}{'s/step':>8}")
    for name, r in results.items():
        print(
            f"{name:<9}{r['effective_tokens_per_s']:>16,.0f}{r['tokens_per_s']:>10,.0f}{r['fill_rate']:>11.3f}"
            f"{r['loss_tokens_per_step']:>15,.0f}{r['step_time_s']:>8.3f}"
        )
    ratio = pk["effective_tokens_per_s"] / pd["effective_tokens_per_s"]
    ceiling = pk["fill_rate"] / pd["fill_rate"]
    print(f"packing / padding effective tokens/s: {ratio:.2f}x (fill-rate ceiling {ceiling:.2f}x)")
    results["ratio"], results["fill_ceiling"] = ratio, ceiling
    (out / "results.json").write_text(json.dumps({"args": vars(args), **results}, indent=2))
    os.sync()


if __name__ == "__main__":
    main()
