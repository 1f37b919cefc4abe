"""Supervised fine-tuning: next-token loss on the assistant tokens of chat conversations (or on the
completions of prompt/completion pairs), packed into fixed-length rows with document masks.

Read `train()` top to bottom: world -> tokenizer -> data -> model -> trainer -> export -> summary.
The same code runs in one process or as one of N SPMD ranks (`posttrain run --nproc N`, Ray): the
`parallelism` section decides how the model is sharded, and only rank 0 writes files.
The pretrain recipe runs the same flow on raw text (every token bears loss).
"""

from __future__ import annotations

from pathlib import Path

from posttrain.config import JobConfig, dump_job, gradient_accumulation_steps
from posttrain.data.samples import load_samples
from posttrain.errors import ConfigError
from posttrain.metrics.mfu import peak_flops
from posttrain.models.build import build_model_for, export_hf, flops_fn_for, head_counts
from posttrain.parallel.world import close_world, init_world
from posttrain.train.setup import (
    Timer,
    build_tokenizer,
    evaluate_loss,
    lm_loss_fn,
    make_loader,
    seed_everything,
    total_steps_for,
    write_summary,
)
from posttrain.train.trainer import Trainer

FORMATS = ("chat", "prompt_completion", "tokens")


def train(cfg: JobConfig, formats: tuple[str, ...] = FORMATS) -> dict:
    """Run the job; returns the summary that is also written to OUTPUT/summary.json."""
    timer = Timer()
    sources = cfg.data.train_sources
    named = [(f"data.train[{i}]" if len(sources) > 1 else "data.train", s) for i, s in enumerate(sources)]
    for key, source in (*named, ("data.eval", cfg.data.eval)):
        if source is not None and source.format not in formats:
            raise ConfigError(
                f"{key}.format={source.format!r}: recipe {cfg.recipe!r} takes {' or '.join(formats)}"
            )
    # 0. Where this process sits (a world of one without a launcher); the layout is checked against
    #    the model's head counts before any weight is touched.
    world = init_world(cfg.parallelism, **head_counts(cfg.model))
    try:
        return _train(cfg, world, timer)
    finally:
        close_world(world)


def _train(cfg: JobConfig, world, timer: Timer) -> dict:
    out = Path(cfg.output_dir)
    config_yaml = dump_job(cfg)
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(config_yaml)
    seed_everything(cfg.seed)

    # 1. Tokenizer and data: training sources stream (mixed, sharded, packed in the background);
    #    the eval set is small and read once.
    tokenizer = build_tokenizer(cfg.tokenizer)
    loader = make_loader(
        cfg.data, cfg.training, tokenizer, cfg.seed, rank=world.dp_rank, world_size=world.dp_size
    )
    read = dict(
        tokenizer=tokenizer,
        max_len=cfg.data.max_tokens_per_pack,
        overlong=cfg.data.overlong,
        mask=cfg.data.mask,
    )
    eval_samples, eval_skips = load_samples(cfg.data.eval, **read) if cfg.data.eval else ([], {})

    # 2. Model and loss.
    built = build_model_for(cfg.model, tokenizer, cfg.seed, world=world, parallelism=cfg.parallelism)
    model = built.module
    for note in built.notes if world.is_main else []:
        print(f"[model] {note}")
    loss_fn = lm_loss_fn(
        cfg.training.loss_chunk_size_tokens,
        num_real_vocab=tokenizer.vocab_size,
        moe_aux_coef=getattr(built.config, "router_aux_loss_coef", 0.0),  # MoE families only
    )

    # 3. Trainer.
    total_steps = total_steps_for(cfg.training, loader, world)
    device = next(model.parameters()).device
    trainer = Trainer(
        model,
        loss_fn,
        training=cfg.training,
        optim=cfg.optim,
        schedule=cfg.schedule,
        total_steps=total_steps,
        grad_accum_steps=gradient_accumulation_steps(cfg.training, world.dp_size),
        output_dir=out,
        config_yaml=config_yaml,
        flops_fn=flops_fn_for(built),
        peak_flops_per_s=peak_flops(cfg.metrics.peak_flops_per_s, device),
        progress=cfg.metrics.progress,
        world=world,
    )
    evaluate = None
    if eval_samples:
        evaluate = lambda: evaluate_loss(  # noqa: E731
            model, eval_samples, cfg.data, cfg.training.micro_batch_size_per_device, tokenizer.pad_id, loss_fn
        )

    # 4. Train, export, summarise.
    final = trainer.fit(loader, evaluate)
    loader.close()
    hf_dir = export_hf(built, tokenizer, out / "hf") if cfg.training.export_hf else None
    summary = {
        "recipe": cfg.recipe,
        "status": "finished",
        "steps": trainer.state.step,
        "final": final,
        "skipped_samples": {"train": loader.skips(), "eval": dict(eval_skips)},
        "nonfinite_steps": trainer.state.nonfinite_steps,
        "num_train_samples": sum(loader.samples_by_source),  # samples consumed (with repeats)
        "data_sources": loader.summary(),  # per source: samples, tokens, skips by reason
        "num_params": sum(p.numel() for p in model.parameters()),
        "num_trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "model_notes": built.notes,
        "tokens_seen": trainer.state.tokens_seen,
        "fill_rate": loader.fill_rate,
        "wall_time_s": timer.elapsed_s,
        "hf_dir": str(hf_dir) if hf_dir else None,
        "world_size": world.world_size,
        "parallelism": {
            "dp_replicate": world.layout.dp_replicate,
            "dp_shard": world.layout.dp_shard,
            "tp": world.layout.tp,
        },
    }
    if world.is_main:
        write_summary(out, summary)
    return summary


main = train
