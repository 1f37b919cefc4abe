"""Building blocks recipes share: seeding, model construction, step counts, evaluation, export
and the run summary. Each takes only the config section it needs."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from posttrain.config import DataConfig, TokenizerConfig, TrainingConfig, gradient_accumulation_steps
from posttrain.data.labels import IGNORE
from posttrain.data.loader import TrainLoader, eval_batches
from posttrain.data.pipeline import build_pipeline
from posttrain.data.samples import Annotate, Sample
from posttrain.data.tokenizer import Tokenizer
from posttrain.errors import ConfigError
from posttrain.train.losses import chunked_cross_entropy
from posttrain.train.run import Run


def build_tokenizer(cfg: TokenizerConfig) -> Tokenizer:
    """The HF tokenizer at tokenizer.path plus the configured special and semantic-ID tokens."""
    sids = [f"<sid_{i}>" for i in range(cfg.semantic_id_tokens)]
    return Tokenizer.from_dir(cfg.path, [*cfg.extra_special_tokens, *sids])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def total_steps_for(
    training: TrainingConfig, loader: TrainLoader, world=None, progress: str = "quiet"
) -> int:
    """max_steps as given, or the optimizer steps that num_epochs of packed rows make.

    With per-rank shards (data.shard_by=samples) each rank counts its own rows and the run takes the
    smallest count, so no rank waits for a step the others never take."""
    if training.max_steps is not None:
        return training.max_steps
    rows = loader.count_rows(progress)
    per_step = training.global_batch_size
    if loader.state_is_per_rank and world is not None:
        per_step //= world.dp_size
    steps = rows // per_step
    if world is not None and world.distributed:
        steps = -int(world.max_over_ranks(-steps))
    if steps == 0:
        raise ConfigError(
            f"training.num_epochs={training.num_epochs} packs into {rows} rows, fewer than one step of "
            f"training.global_batch_size={training.global_batch_size}"
        )
    return steps


def make_loader(
    data: DataConfig,
    training: TrainingConfig,
    tokenizer: Tokenizer,
    seed: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    annotate: Annotate | None = None,
) -> TrainLoader:
    """The streaming loader of data.train for data-parallel rank `rank` of `world_size` (`annotate`:
    a recipe's check or completion of every rendered sample, see posttrain/data/samples.py).

    data.shard_by=rows: every rank builds the whole pipeline and keeps its slice of each step's rows;
    samples: the pipeline itself reads only this rank's share of the records."""
    accum = gradient_accumulation_steps(training, world_size)  # fail early with the arithmetic
    by_samples = data.shard_by == "samples" and world_size > 1
    build = lambda: build_pipeline(  # noqa: E731 -- a fresh pipeline (count_rows dry-runs one)
        data,
        tokenizer,
        seed=seed,
        shard=rank if by_samples else 0,
        num_shards=world_size if by_samples else 1,
        rows_per_step=accum * training.micro_batch_size_per_device * (1 if by_samples else world_size),
        default_epochs=training.num_epochs,
        annotate=annotate,
    )
    return TrainLoader(
        build,
        row_len=data.max_tokens_per_pack,
        micro_batch_size=training.micro_batch_size_per_device,
        pad_id=tokenizer.pad_id,
        packing=data.packing,
        prefetch_rows=data.prefetch_rows,
        dp_rank=0 if by_samples else rank,
        dp_size=1 if by_samples else world_size,
        rows_per_step=None if by_samples else training.global_batch_size,
        state_is_per_rank=by_samples,
    )


def lm_loss_fn(chunk_size: int, num_real_vocab: int, moe_aux_coef: float = 0.0):
    """Next-token loss over a packed batch: sum of token losses (the trainer normalises).

    MoE models (those with `aux_loss()`) add moe_aux_coef * load-balancing loss in training, weighted by
    the micro-batch's loss tokens so the step's value is a token-weighted mean like the LM loss; the
    metrics then split `lm_loss` and `moe_aux_loss` out of the total `loss`.
    """

    def loss_fn(model, batch):
        def head(h, w):  # runs inside forward, where FSDP has the output matrix gathered
            return chunked_cross_entropy(
                h, w, batch["targets"], chunk_size=chunk_size, num_real_vocab=num_real_vocab
            )

        loss, num_tokens = model(
            batch["input_ids"], batch["position_ids"], batch.get("doc_ids"), head_fn=head
        )
        aux = model.aux_loss() if model.training and hasattr(model, "aux_loss") else None
        if aux is None or moe_aux_coef == 0.0:
            return loss, {}
        metrics = {"lm_loss": loss.detach(), "moe_aux_loss": aux.detach() * num_tokens}
        return loss + moe_aux_coef * aux * num_tokens, metrics

    return loss_fn


@torch.no_grad()
def evaluate_loss(
    model,
    samples: list[Sample],
    data: DataConfig,
    micro_batch_size: int,
    pad_id: int,
    loss_fn,
    loss_units=None,
    progress: str = "quiet",
) -> dict:
    """Loss and the loss function's metrics over every eval sample, weighted by loss units (tokens by
    default, pairs for preference losses): {"eval_loss", "eval_<metric>"..., "eval_units"}."""
    from posttrain.metrics.progress import Progress

    count = loss_units or (lambda b: int((b["targets"] != IGNORE).sum()))
    was_training = model.training
    model.eval()
    total, units, sums = 0.0, 0, {}
    batches = list(
        eval_batches(
            samples,
            row_len=data.max_tokens_per_pack,
            micro_batch_size=micro_batch_size,
            pad_id=pad_id,
            packing=data.packing,
        )
    )
    device = next(model.parameters()).device
    with Progress(len(batches), "eval", progress, unit="batches") as shown:
        for batch in batches:
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            loss, metrics = loss_fn(model, batch)
            total += float(loss)
            units += count(batch)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            shown.advance()
    model.train(was_training)
    out = {"eval_loss": total / max(units, 1), "eval_tokens" if loss_units is None else "eval_units": units}
    return out | {f"eval_{k}": v / max(units, 1) for k, v in sums.items()}


def check_formats(cfg, formats: tuple[str, ...]) -> None:
    """Every data source's format must be one the recipe takes; the error names the key."""
    sources = cfg.data.train_sources
    named = [(f"data.train[{i}]" if len(sources) > 1 else "data.train", s) for i, s in enumerate(sources)]
    for key, source in (*named, ("data.eval", cfg.data.eval)):
        if source is not None and source.format not in formats:
            raise ConfigError(
                f"{key}.format={source.format!r}: recipe {cfg.recipe!r} takes {' or '.join(formats)}"
            )


def in_world(cfg, body):
    """Run body(world, run) as this process's part of the job: join the process group (a world of one
    without a launcher; the layout is checked against the model's heads before any weight is
    touched), start the Run (start_run: OUTPUT/, status, seeds), and always leave the group. A body
    that raises marks the run failed or interrupted (posttrain/train/run.py)."""
    from posttrain.models.build import head_counts
    from posttrain.parallel.world import close_world, init_world

    world = init_world(cfg.parallelism, device=cfg.training.device, **head_counts(cfg.model))
    try:
        with start_run(cfg, world) as run:
            return body(world, run)
    finally:
        close_world(world)


def progress_mode(cfg, world=None) -> str:
    """metrics.progress on rank 0, quiet on the other ranks."""
    main = world.is_main if world is not None else int(os.environ.get("RANK", "0")) == 0
    return cfg.metrics.progress if main else "quiet"


def start_run(cfg, world) -> Run:
    """The job's Run (posttrain/train/run.py: OUTPUT/ with config.yaml and status.json, written by rank
    0; the trackers' packages checked) and every RNG seeded. Recipes use it as `with start_run(...)`."""
    from posttrain.config import dump_job

    run = Run(
        cfg.output_dir,
        cfg.recipe,
        dump_job(cfg),
        cfg.metrics,
        is_main=world.is_main,
        world_size=world.world_size,
    )
    seed_everything(cfg.seed)
    return run


def make_trainer(cfg, built, loss_fn, loader, world, run: Run, **kwargs):
    """The shared Trainer for a job: steps from training.max_steps/num_epochs, accumulation from the
    world's data-parallel size, FLOPs of the built model. kwargs: e.g. loss_units for pair losses."""
    from posttrain.metrics.mfu import peak_flops
    from posttrain.models.build import flops_fn_for
    from posttrain.parallel.parallelize import autocast_dtype
    from posttrain.train.trainer import Trainer

    device = next(built.module.parameters()).device
    return Trainer(
        built.module,
        loss_fn,
        training=cfg.training,
        optim=cfg.optim,
        schedule=cfg.schedule,
        total_steps=total_steps_for(cfg.training, loader, world, progress_mode(cfg, world)),
        grad_accum_steps=gradient_accumulation_steps(cfg.training, world.dp_size),
        output_dir=run.out,
        config_yaml=run.config_yaml,
        flops_fn=flops_fn_for(built),
        peak_flops_per_s=peak_flops(cfg.metrics.peak_flops_per_s, device),
        progress=cfg.metrics.progress,
        world=world,
        autocast_dtype=autocast_dtype(cfg.model.dtype, cfg.parallelism, world),
        **kwargs,
    )


def load_data(
    cfg, world, tokenizer, annotate: Annotate | None = None
) -> tuple[TrainLoader, list[Sample], dict]:
    """(the streaming train loader of this rank, the eval samples, the eval skip counts); `annotate`
    applies to train and eval samples alike."""
    from posttrain.data.samples import load_samples

    loader = make_loader(
        cfg.data,
        cfg.training,
        tokenizer,
        cfg.seed,
        rank=world.dp_rank,
        world_size=world.dp_size,
        annotate=annotate,
    )
    if cfg.data.eval is None:
        return loader, [], {}
    d = cfg.data
    samples, skips = load_samples(
        d.eval, tokenizer, max_len=d.max_tokens_per_pack, overlong=d.overlong, mask=d.mask, annotate=annotate
    )
    return loader, samples, skips


def print_notes(built, world) -> None:
    for note in built.notes if world.is_main else []:
        print(f"[model] {note}")


def make_evaluate(model, samples: list[Sample], cfg, tokenizer, loss_fn, loss_units=None):
    """The eval callback for Trainer.fit over data.eval (None when there is no eval set)."""
    if not samples:
        return None
    mb = cfg.training.micro_batch_size_per_device
    mode = progress_mode(cfg)
    return lambda: evaluate_loss(
        model, samples, cfg.data, mb, tokenizer.pad_id, loss_fn, loss_units, progress=mode
    )


def train_export_summarise(
    cfg, world, built, tokenizer, trainer, loader, run: Run, evaluate, eval_skips
) -> dict:
    """The end every supervised recipe shares: fit (resuming if asked), export OUTPUT/hf, then the
    run's summary.json and the artifacts handed to the trackers."""
    from posttrain.models.build import export_hf

    final = trainer.fit(loader, run, evaluate)
    loader.close()
    mode = progress_mode(cfg, world)
    hf_dir = (
        export_hf(built, tokenizer, run.out / "hf", progress=mode, dtype=cfg.training.export_dtype)
        if cfg.training.export_hf
        else None
    )
    summary = run_summary(cfg, world, built, trainer, loader, run, hf_dir, eval_skips, final=final)
    return run.finish(summary, {"hf": hf_dir})


def run_summary(cfg, world, built, trainer, loader, run: Run, hf_dir, eval_skips: dict, **extra) -> dict:
    """summary.json's common fields (Run.finish writes it); recipes add their own with `extra`."""
    model = built.module
    summary = {
        "recipe": cfg.recipe,
        "status": "finished",
        "steps": trainer.state.step,
        "final": trainer.state.last_metrics | extra.pop("final", {}),
        "skipped_samples": {"train": loader.skips(), "eval": dict(eval_skips)},
        "nonfinite_steps": trainer.state.nonfinite_steps,
        "num_train_samples": sum(loader.samples_by_source),  # samples consumed (with repeats)
        "data_sources": loader.summary(),  # per source: samples, tokens, skips by reason
        "num_params": sum(p.numel() for p in model.parameters()),
        "num_trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "model_notes": built.notes,
        "tokens_seen": trainer.state.tokens_seen,
        "fill_rate": loader.fill_rate,
        "wall_time_s": run.elapsed_s,
        "hf_dir": str(hf_dir) if hf_dir else None,
        "world_size": world.world_size,
        "parallelism": {
            "dp_replicate": world.layout.dp_replicate,
            "dp_shard": world.layout.dp_shard,
            "tp": world.layout.tp,
        },
        **extra,
    }
    return summary
