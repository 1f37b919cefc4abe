"""SFT throughput, side by side: posttrain against TRL's `SFTTrainer` in its fastest packing mode.

Both sides train the same from-scratch tiny Qwen3 (configs/tiny/sft.yaml's architecture, one checkpoint
written by posttrain and loaded by both) on the same chat data (data/tiny/sft_train.jsonl, loss on
assistant tokens only), on CPU in fp32, in this one process, one after the other:

  posttrain  `posttrain.recipes.sft.train`: streaming best-fit packing into rows of 256 tokens (padded),
             block-diagonal attention per row, chunked cross-entropy; step timing from its metrics.jsonl.
  TRL        `SFTTrainer` with `packing=True, packing_strategy="bfd", padding_free=True`: offline
             best-fit-decreasing packing, each micro-batch flattened into one padding-free row whose
             `position_ids` restart at 0 per document (transformers derives the block-diagonal mask from
             them), fused LM head; step timing from a callback (on_step_begin -> on_step_end).

Matched: weights at step 0, rows of 256 tokens, 16 rows per optimizer step as 2 micro-batches of 8,
AdamW (lr 3e-3, betas 0.9/0.95, eps 1e-8, weight decay 0.01, constant lr), clipping at 1.0, torch threads.
Step time excludes data loading on both sides. Throughput = real (non-padding) tokens per second of
step time, over the steps after `--warmup-steps` (step 1 is always excluded); loss tokens/s counts the
positions with a next-token target.

A speed counts only when the runs agree: first-step losses within 2% (same weights, same kind of data),
every gradient norm finite and non-zero, the same share of loss-bearing tokens (both mask the same
tokens) and comparable real tokens per step. The script prints the checks and exits 1 when one fails.

Read the ratio with its caveats (benchmarks/README.md has the recorded numbers):
* TRL's padding-free mode is its fastest on GPUs with a varlen flash-attention kernel. On CPU, SDPA gets a
  dense block-diagonal [N, N] mask over the flattened micro-batch (N = 8 x 256 = 2048), i.e. 8x the
  attention work of posttrain's per-row [256, 256] masks; at this model size most of the gap is that.
* posttrain pads its rows (fill rate ~95%) and computes on the padding; TRL's rows carry none. Tokens/s
  counts real tokens only, so padding is posttrain's cost.
* The two sides see different rows in a different order (own packer, own shuffle), so per-step losses
  differ by data; at a from-scratch init the first-step check mainly catches a wrong loss normalisation,
  and the loss-token-share check catches a different loss mask.
* On a shared machine other processes skew timings; the header prints the load average, and
  `--threads 1` avoids the thread oversubscription that slows 2-thread runs on 2 busy cores.

    .venv/bin/python benchmarks/sft_vs_trl.py [--steps 30] [--threads N] [--output-dir runs/bench/sft_vs_trl]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

# No network: everything (model, tokenizer, data) is local.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from posttrain.config import load_job  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "tiny" / "sft.yaml"
DATA = REPO / "data" / "tiny" / "sft_train.jsonl"

# The shared recipe; both sides read these. Weight decay skips norm weights on both (no biases here).
ROW_LEN_TOKENS = 256  # tokens per packed row
GLOBAL_BATCH_ROWS = 16  # rows per optimizer step
MICRO_BATCH_ROWS = 8  # rows per forward/backward (-> 2 accumulation steps)
LR, BETA1, BETA2, EPS, WEIGHT_DECAY, MAX_GRAD_NORM, SEED = 3e-3, 0.9, 0.95, 1e-8, 0.01, 1.0, 0

# Acceptance checks (relative tolerances).
FIRST_LOSS_RTOL = 0.02
LOSS_SHARE_RTOL = 0.05  # loss tokens / real tokens, over the timed steps
TOKENS_PER_STEP_RTOL = 0.10  # real tokens per optimizer step, over the timed steps


@dataclass
class Run:
    """Per-optimizer-step records of one side: loss, grad_norm, tokens, loss_tokens, step_time_s."""

    side: str
    steps: list[dict]
    warmup_steps: int
    notes: dict = field(default_factory=dict)

    @property
    def timed(self) -> list[dict]:
        return self.steps[self.warmup_steps :]

    def total(self, key: str) -> float:
        return sum(s[key] for s in self.timed)

    @property
    def tokens_per_s(self) -> float:
        return self.total("tokens") / self.total("step_time_s")

    @property
    def loss_tokens_per_s(self) -> float:
        return self.total("loss_tokens") / self.total("step_time_s")

    @property
    def loss_share(self) -> float:
        return self.total("loss_tokens") / self.total("tokens")

    @property
    def tokens_per_step(self) -> float:
        return self.total("tokens") / len(self.timed)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.output_dir).resolve()
    total_steps = args.warmup_steps + args.steps

    load_before = os.getloadavg()[0]
    init_dir = write_initial_checkpoint(fresh_dir(out / "init"))
    runs = [
        run_posttrain(init_dir, fresh_dir(out / "posttrain"), total_steps, args.warmup_steps),
        run_trl(init_dir, fresh_dir(out / "trl"), total_steps, args.warmup_steps),
    ]
    checks = acceptance_checks(*runs, expected_steps=total_steps)
    # Other processes on the machine skew both sides; the load average says how busy it was.
    load = (load_before, os.getloadavg()[0])
    report(runs, checks, args, load)
    (out / "results.json").write_text(json.dumps(results_dict(runs, checks, args, load), indent=2) + "\n")
    print(f"\nresults: {out / 'results.json'}")
    return 0 if all(ok for _, ok, _ in checks) else 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30, help="timed optimizer steps per side (default 30)")
    p.add_argument(
        "--warmup-steps", type=int, default=3, help="untimed optimizer steps before them (>= 1; default 3)"
    )
    p.add_argument("--output-dir", default=str(REPO / "runs" / "bench" / "sft_vs_trl"))
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads, both sides")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup_steps < 1:
        p.error("--steps and --warmup-steps must be >= 1 (step 1 is never timed)")
    return args


def fresh_dir(path: Path) -> Path:
    """An empty directory owned by this benchmark (only its own sub-directories are ever removed)."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


# ---------------------------------------------------------------------------------- the common start


def write_initial_checkpoint(out_dir: Path) -> Path:
    """posttrain's from-scratch init of the tiny config, exported as an HF checkpoint + tokenizer."""
    from posttrain.data.tokenizer import Tokenizer
    from posttrain.models.build import build_model_for, export_hf

    cfg = load_job(CONFIG)
    tokenizer = Tokenizer.from_dir(cfg.tokenizer.path)
    return export_hf(build_model_for(cfg.model, tokenizer, cfg.seed), tokenizer, out_dir)


# ---------------------------------------------------------------------------------- posttrain


def run_posttrain(init_dir: Path, out_dir: Path, total_steps: int, warmup_steps: int) -> Run:
    from posttrain.recipes.sft import train

    overrides = {
        "output_dir": out_dir,
        "seed": SEED,
        "model.arch": "null",
        "model.path": init_dir,
        "tokenizer.path": init_dir,
        "data.train.path": DATA,
        "data.eval": "null",
        "data.max_tokens_per_pack": ROW_LEN_TOKENS,
        "optim.lr": LR,
        "optim.beta1": BETA1,
        "optim.beta2": BETA2,
        "optim.eps": EPS,
        "optim.weight_decay": WEIGHT_DECAY,
        "schedule.kind": "constant",
        "schedule.warmup_steps": 0,
        "training.global_batch_size": GLOBAL_BATCH_ROWS,
        "training.micro_batch_size_per_device": MICRO_BATCH_ROWS,
        "training.max_steps": total_steps,
        "training.max_grad_norm": MAX_GRAD_NORM,
        "training.eval_every_steps": 0,
        "training.save_every_steps": 0,
        "training.export_hf": "false",
        "metrics.progress": "quiet",
        "metrics.peak_flops_per_s": 1.0e12,  # MFU is not reported here; skip the CPU peak measurement
    }
    # Floats keep a dot and an exponent: PyYAML reads a bare `1e-08` as a string.
    cfg = load_job(
        CONFIG, [f"{k}={v:.6e}" if isinstance(v, float) else f"{k}={v}" for k, v in overrides.items()]
    )
    train(cfg)
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [
        {
            "loss": r["loss"],
            "grad_norm": r["grad_norm"],
            "tokens": r["num_tokens"],  # sum of document lengths: padding excluded
            "loss_tokens": r["num_loss_tokens"],
            "step_time_s": r["step_time_s"],
        }
        for r in rows
        if "loss" in r
    ]
    return Run("posttrain", steps, warmup_steps, {"threads": torch.get_num_threads()})


# ---------------------------------------------------------------------------------- TRL


def run_trl(init_dir: Path, out_dir: Path, total_steps: int, warmup_steps: int) -> Run:
    import datasets
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import SFTConfig, SFTTrainer

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    datasets.disable_progress_bars()

    class StepMeter(TrainerCallback):
        """Times each optimizer step and collects the tokens the trainer counted inside it."""

        def __init__(self):
            self.steps: list[dict] = []
            self.tokens = self.loss_tokens = 0
            self.t0 = 0.0
            self.threads: set[int] = set()

        def count(self, inputs: dict) -> None:
            # Padding-free batches are [1, total tokens] with no padding (pad_to_multiple_of is None).
            self.tokens += int(inputs["input_ids"].numel())
            self.loss_tokens += int((inputs["labels"][..., 1:] != -100).sum())

        def on_step_begin(self, args, state, control, **kwargs):
            # Called after the step's micro-batches were fetched, so data loading is not timed.
            self.tokens = self.loss_tokens = 0
            self.threads.add(torch.get_num_threads())
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            # Called after backward, clipping, optimizer and scheduler steps and zero_grad; before logging.
            dt = time.perf_counter() - self.t0
            self.steps.append({"tokens": self.tokens, "loss_tokens": self.loss_tokens, "step_time_s": dt})

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs and self.steps:
                self.steps[-1].update(loss=float(logs["loss"]), grad_norm=float(logs["grad_norm"]))

    class CountingSFTTrainer(SFTTrainer):
        """SFTTrainer that reports each training micro-batch to the meter (compute_loss is public API)."""

        def __init__(self, *a, meter: StepMeter, **kw):
            super().__init__(*a, **kw)
            self.meter = meter

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                if "attention_mask" in inputs:  # the comparison is against padding-free packing only
                    raise RuntimeError("TRL batch has an attention_mask: padding-free packing is not active")
                self.meter.count(inputs)
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    tokenizer = AutoTokenizer.from_pretrained(str(init_dir))
    model = AutoModelForCausalLM.from_pretrained(str(init_dir), dtype=torch.float32)
    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    dataset = datasets.Dataset.from_list([{"messages": r["messages"]} for r in rows])
    config = SFTConfig(
        output_dir=str(out_dir),
        # data: rows of 256 tokens, BFD packing, padding-free (TRL's fastest packing mode)
        max_length=ROW_LEN_TOKENS,
        packing=True,
        packing_strategy="bfd",
        padding_free=True,
        assistant_only_loss=True,
        # batch: 16 rows per optimizer step as 2 x 8
        per_device_train_batch_size=MICRO_BATCH_ROWS,
        gradient_accumulation_steps=GLOBAL_BATCH_ROWS // MICRO_BATCH_ROWS,
        max_steps=total_steps,
        # optimisation, as posttrain's
        optim="adamw_torch",
        learning_rate=LR,
        adam_beta1=BETA1,
        adam_beta2=BETA2,
        adam_epsilon=EPS,
        weight_decay=WEIGHT_DECAY,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=MAX_GRAD_NORM,
        seed=SEED,
        # CPU fp32, no recomputation (SFTConfig defaults to bf16 and gradient checkpointing)
        use_cpu=True,
        bf16=False,
        fp16=False,
        activation_checkpointing=False,  # the new name; it overrides TRL's gradient_checkpointing=True
        # quiet: no saving, no reporting, no workers, log every step (the meter reads loss/grad_norm)
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        logging_steps=1,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    meter = StepMeter()
    trainer = CountingSFTTrainer(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[meter],
        meter=meter,
    )
    if trainer.data_collator.pad_to_multiple_of is not None:
        raise RuntimeError(
            "pad_to_multiple_of is set: TRL batches would hold padding the meter counts as tokens"
        )
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)
    trainer.train()
    if model.is_activation_checkpointing:
        raise RuntimeError("TRL model has activation checkpointing on; posttrain runs without it")
    notes = {
        "threads": sorted(meter.threads),
        "attn_implementation": model.config._attn_implementation,
        "packed_rows": len(trainer.train_dataset),
    }
    return Run("trl", meter.steps, warmup_steps, notes)


# ---------------------------------------------------------------------------------- checks and report


def rel_diff(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def acceptance_checks(pt: Run, tr: Run, expected_steps: int) -> list[tuple[str, bool, str]]:
    """(name, passed, detail) for each condition under which the speed comparison counts."""
    checks = []
    for run in (pt, tr):
        n = len(run.steps)
        checks.append((f"{run.side}: ran all steps", n == expected_steps, f"{n} of {expected_steps}"))
        norms = [s.get("grad_norm", float("nan")) for s in run.steps]
        good = all(math.isfinite(g) and g > 0 for g in norms)
        checks.append((f"{run.side}: grad norms finite and > 0", good, f"min {min(norms):.4g}"))
    d = rel_diff(pt.steps[0]["loss"], tr.steps[0]["loss"])
    checks.append(
        (
            "first-step losses agree",
            d <= FIRST_LOSS_RTOL,
            f"{pt.steps[0]['loss']:.4f} vs {tr.steps[0]['loss']:.4f}, "
            f"rel diff {d:.2%} (tol {FIRST_LOSS_RTOL:.0%})",
        )
    )
    d = rel_diff(pt.loss_share, tr.loss_share)
    checks.append(
        (
            "same loss-token share",
            d <= LOSS_SHARE_RTOL,
            f"{pt.loss_share:.3f} vs {tr.loss_share:.3f}, rel diff {d:.2%} (tol {LOSS_SHARE_RTOL:.0%})",
        )
    )
    d = rel_diff(pt.tokens_per_step, tr.tokens_per_step)
    checks.append(
        (
            "comparable tokens per step",
            d <= TOKENS_PER_STEP_RTOL,
            f"{pt.tokens_per_step:.0f} vs "
            f"{tr.tokens_per_step:.0f}, rel diff {d:.2%} (tol {TOKENS_PER_STEP_RTOL:.0%})",
        )
    )
    return checks


def report(
    runs: list[Run], checks: list[tuple[str, bool, str]], args: argparse.Namespace, load: tuple[float, float]
) -> None:
    pt, tr = runs
    print(
        f"\nSFT throughput, CPU fp32, {args.threads} torch threads: {GLOBAL_BATCH_ROWS} rows x {ROW_LEN_TOKENS} "
        f"tokens per step ({GLOBAL_BATCH_ROWS // MICRO_BATCH_ROWS} x {MICRO_BATCH_ROWS}), "
        f"{args.steps} timed steps after {args.warmup_steps} warmup; 1-min load average "
        f"{load[0]:.1f} before, {load[1]:.1f} after ({os.cpu_count()} CPUs)\n"
    )
    header = (
        f"{'side':<10} {'steps':>5} {'tok/step':>8} {'s/step':>7} {'tokens/s':>9} {'loss tok/s':>10} "
        f"{'loss@1':>7} {'gnorm@1':>8}"
    )
    print(header)
    print("-" * len(header))
    for r in runs:
        print(
            f"{r.side:<10} {len(r.timed):>5} {r.tokens_per_step:>8.0f} {r.total('step_time_s') / len(r.timed):>7.3f} "
            f"{r.tokens_per_s:>9.0f} {r.loss_tokens_per_s:>10.0f} {r.steps[0]['loss']:>7.4f} "
            f"{r.steps[0]['grad_norm']:>8.4f}"
        )
    print(
        f"\nposttrain / TRL: tokens/s {pt.tokens_per_s / tr.tokens_per_s:.2f}x, "
        f"loss tokens/s {pt.loss_tokens_per_s / tr.loss_tokens_per_s:.2f}x"
    )
    print(f"TRL: {tr.notes}")
    print("\nchecks:")
    for name, ok, detail in checks:
        print(f"  [{'ok' if ok else 'FAIL'}] {name}: {detail}")
    if not all(ok for _, ok, _ in checks):
        print("\nthe speed comparison does not count: a check failed")


def results_dict(
    runs: list[Run], checks: list[tuple[str, bool, str]], args: argparse.Namespace, load: tuple[float, float]
) -> dict:
    pt, tr = runs
    return {
        "setup": {
            "threads": args.threads,
            "load_avg_1min_before_after": load,
            "cpu_count": os.cpu_count(),
            "timed_steps": args.steps,
            "warmup_steps": args.warmup_steps,
            "row_len_tokens": ROW_LEN_TOKENS,
            "global_batch_rows": GLOBAL_BATCH_ROWS,
            "micro_batch_rows": MICRO_BATCH_ROWS,
            "versions": {"torch": torch.__version__, **_versions()},
        },
        "sides": {
            r.side: {
                "tokens_per_s": r.tokens_per_s,
                "loss_tokens_per_s": r.loss_tokens_per_s,
                "tokens_per_step": r.tokens_per_step,
                "loss_token_share": r.loss_share,
                "first_step_loss": r.steps[0]["loss"],
                "first_step_grad_norm": r.steps[0]["grad_norm"],
                "notes": r.notes,
                "steps": r.steps,
            }
            for r in runs
        },
        "ratio_tokens_per_s": pt.tokens_per_s / tr.tokens_per_s,
        "ratio_loss_tokens_per_s": pt.loss_tokens_per_s / tr.loss_tokens_per_s,
        "checks": [{"name": n, "ok": ok, "detail": d} for n, ok, d in checks],
    }


def _versions() -> dict:
    import transformers
    import trl

    return {"transformers": transformers.__version__, "trl": trl.__version__}


if __name__ == "__main__":
    sys.exit(main())
