"""The shared training core: the mechanics no recipe may re-implement.

A recipe hands the trainer a model, a data loader and a `loss_fn(model, batch) -> (loss_sum,
metrics)` whose `loss_sum` is the *sum* of per-unit losses (units are loss-bearing tokens by
default). The trainer owns everything that must never drift between recipes:

* gradient accumulation normalised by the loss units of the whole optimizer step, counted before
  any backward pass, so one micro-batch of 8 rows and 8 micro-batches of 1 row give the same update;
* gradient clipping, the learning-rate schedule, the optimizer step;
* non-finite detection: a step with a NaN/inf loss or gradient is skipped and counted, and the run
  aborts once `max_nonfinite_steps` is reached;
* periodic full-state checkpoints and exact resume;
* metrics per optimizer step (loss, lr, grad norm, tokens/s, MFU, peak memory), which `fit` hands to
  the run (posttrain/train/run.py: trackers, status.json, progress, the log/eval/save cadence).

Distributed runs use the same loop. The loss units are summed over data-parallel ranks before any
backward, and each rank's loss is scaled so that FSDP's gradient average becomes the global
token-weighted mean: the update equals a single process training on all ranks' rows. Loss, tokens
and FLOPs are summed over ranks for the metrics, and only rank 0 writes metrics and progress.
"""

from __future__ import annotations

import math
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from posttrain.config import OptimConfig, ScheduleConfig, TrainingConfig
from posttrain.data.labels import IGNORE
from posttrain.errors import PosttrainError
from posttrain.parallel.parallelize import clip_grad_norm
from posttrain.parallel.world import World
from posttrain.train import checkpoint as ckpt
from posttrain.train.optim import build_optimizer, lr_at, set_lr
from posttrain.train.run import Run

LossFn = Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict]]


def count_loss_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Default loss units: positions with a real next-token target."""
    return int((batch["targets"] != IGNORE).sum())


class NonFiniteError(PosttrainError):
    pass


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken (skipped non-finite steps count: their data is consumed)
    nonfinite_steps: int = 0
    tokens_seen: int = 0
    wall_s: float = 0.0
    last_metrics: dict = field(default_factory=dict)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class Trainer:
    """Runs optimizer steps over a loader; see the module docstring for what it guarantees."""

    def __init__(
        self,
        model: torch.nn.Module,
        loss_fn: LossFn,
        *,
        training: TrainingConfig,
        optim: OptimConfig,
        schedule: ScheduleConfig,
        total_steps: int,
        grad_accum_steps: int,
        output_dir: Path,
        config_yaml: str,
        flops_fn: Callable[[list[int], int], float],  # (document lengths, loss units) -> FLOPs
        peak_flops_per_s: float,
        progress: str = "auto",
        loss_units: Callable[[dict], int] = count_loss_tokens,
        world: World | None = None,
        autocast_dtype: torch.dtype | None = None,  # forward under autocast (parallelize.autocast_dtype)
    ):
        self.model, self.loss_fn, self.loss_units = model, loss_fn, loss_units
        self.training, self.optim_cfg, self.schedule = training, optim, schedule
        self.total_steps, self.grad_accum_steps = total_steps, grad_accum_steps
        self.output_dir, self.config_yaml = Path(output_dir), config_yaml
        self.flops_fn, self.peak_flops = flops_fn, peak_flops_per_s
        self.progress_mode = progress
        self.optimizer = build_optimizer(model, optim)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.world = world or World()
        self.device = next(model.parameters()).device
        self.autocast_dtype = autocast_dtype
        self.state = TrainState()

    # ------------------------------------------------------------------------------ one step
    def train_step(self, micro_batches: list[dict]) -> dict:
        """One optimizer step over `micro_batches`; returns its metrics."""
        t0 = time.perf_counter()
        world = self.world
        units = int(world.sum_over_dp([sum(self.loss_units(b) for b in micro_batches)])[0])
        # FSDP averages gradients over the dp ranks; scaling by their number makes that average a sum.
        scale = world.dp_size / max(units, 1)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum, summed = 0.0, {}
        for batch in micro_batches:
            batch = {k: v.to(self.device) for k, v in batch.items()}
            with torch.autocast(
                self.device.type, self.autocast_dtype, enabled=self.autocast_dtype is not None
            ):
                loss, metrics = self.loss_fn(self.model, batch)
            (loss * scale).backward()
            loss_sum += float(loss.detach())
            for k, v in metrics.items():
                summed[k] = summed.get(k, 0.0) + float(v)
        max_norm = self.training.max_grad_norm or float("inf")
        grad_norm = clip_grad_norm(self.params, max_norm)
        lr = lr_at(self.state.step, self.total_steps, self.optim_cfg.lr, self.schedule)
        doc_lens = [n for b in micro_batches for n in b["doc_lens"].tolist()]
        local_units = sum(self.loss_units(b) for b in micro_batches)
        names = sorted(summed)
        totals = world.sum_over_dp(
            [loss_sum, sum(doc_lens), self.flops_fn(doc_lens, local_units), *(summed[k] for k in names)]
        )
        loss_sum, tokens, flops = totals[0], int(totals[1]), totals[2]
        summed = dict(zip(names, totals[3:]))
        loss_value = loss_sum / max(units, 1)
        finite = math.isfinite(loss_value) and math.isfinite(grad_norm)
        if finite:
            set_lr(self.optimizer, lr)
            self.optimizer.step()
        else:
            self.state.nonfinite_steps += 1
            self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        dt = world.max_over_ranks(time.perf_counter() - t0)
        self.state.tokens_seen += tokens
        self.state.wall_s += dt
        out = {
            "loss": loss_value,
            "lr": lr,
            "grad_norm": grad_norm,
            "num_loss_tokens": units,
            "num_tokens": tokens,
            "tokens_per_s": tokens / dt,
            "mfu": flops / dt / (self.peak_flops * world.world_size),
            "peak_memory_mb": world.max_over_ranks(peak_memory_mb(self.device)),
            "step_time_s": dt,
            "skipped_nonfinite": int(not finite),
            **{k: v / max(units, 1) for k, v in summed.items()},
        }
        if not finite and self.state.nonfinite_steps >= self.training.max_nonfinite_steps:
            raise NonFiniteError(
                f"aborting: {self.state.nonfinite_steps} steps had a non-finite loss or gradient "
                f"(training.max_nonfinite_steps={self.training.max_nonfinite_steps}); last: loss={loss_value}, "
                f"grad_norm={grad_norm} at step {self.state.step}"
            )
        return out

    # ------------------------------------------------------------------------------ the loop
    def fit(self, loader, run: Run, evaluate: Callable[[], dict] | None = None) -> dict:
        """Train to `total_steps` on the run's loop, resuming first if training.resume; returns the final
        metrics (the last step's and the last evaluation's)."""
        resumed = self.training.resume and self.resume(loader)
        run.open(self.state.step if resumed else None)

        def step(n: int) -> dict:
            micro = [loader.next_micro_batch() for _ in range(self.grad_accum_steps)]
            metrics = self.train_step(micro)
            metrics["fill_rate"] = loader.fill_rate
            metrics.update(getattr(loader, "step_metrics", dict)())  # per-source counts, data wait
            ckpt.fault_point("train_step", n)  # test hook (POSTTRAIN_FAULT), a no-op otherwise
            self.state.last_metrics = metrics
            return metrics

        _, eval_metrics = run.loop(
            self.training,
            start=self.state.step,
            total=self.total_steps,
            step=step,
            evaluate=evaluate,
            save=lambda: self.save(loader),
            show=lambda m: {"loss": m["loss"], "tok_s": round(m["tokens_per_s"])},
        )
        return {**self.state.last_metrics, **eval_metrics}

    # ------------------------------------------------------------------------------ state
    @property
    def checkpoint_dir(self) -> Path:
        return self.output_dir / "checkpoints"

    def save(self, loader) -> Path:
        """A full checkpoint under OUTPUT/checkpoints (collective: every rank calls it), with the loader's
        state (any object with state_dict/load_state_dict); see posttrain/train/checkpoint.py."""
        per_rank_data = getattr(loader, "state_is_per_rank", False)
        trainer_state = {
            "trainer": vars(self.state).copy(),
            "world_size": self.world.world_size,
            "dp_size": self.world.dp_size,
            "data": None if per_rank_data else loader.state_dict(),
        }
        rank_state = {"data": loader.state_dict()} if per_rank_data else {}
        return ckpt.save_checkpoint(
            self.checkpoint_dir,
            self.state.step,
            self.model,
            self.optimizer,
            trainer_state,
            rank_state,
            self.config_yaml,
            self.training.keep_last_checkpoints,
            progress=self.progress_mode if self.world.is_main else "quiet",
        )

    def resume(self, loader) -> bool:
        """Load the latest checkpoint under OUTPUT/checkpoints into the model, optimizer, trainer state,
        RNGs and `loader`; False when there is none (a fresh run)."""
        path = ckpt.latest_checkpoint(self.checkpoint_dir)
        if path is None:
            return False
        saved, mine = ckpt.load_into(path, self.model, self.optimizer)
        self.state = TrainState(**saved["trainer"])
        if saved["data"] is not None:
            loader.load_state_dict(saved["data"])
        elif saved["dp_size"] != self.world.dp_size:
            raise PosttrainError(
                f"{path}: data.shard_by=samples checkpoints hold one data state per data-parallel rank "
                f"({saved['dp_size']} ranks); this run has {self.world.dp_size}. Resume on "
                f"{saved['dp_size']} data-parallel ranks, or use data.shard_by=rows (world-size independent)"
            )
        else:
            loader.load_state_dict(mine["data"])
        ckpt.set_rng_state(mine["rng"])
        if self.world.is_main:
            print(
                f"resumed from {path} at step {self.state.step} (saved on {saved['world_size']} "
                f"process{'es' if saved['world_size'] > 1 else ''}, now {self.world.world_size})",
                flush=True,
            )
        return True
