"""Supervised fine-tuning: next-token loss on the assistant tokens of chat conversations (or on the
completions of prompt/completion pairs), packed into fixed-length rows with document masks.

Read `train()` top to bottom: world -> tokenizer -> data -> model -> trainer -> export -> summary.
The same code runs in one process or as one of N SPMD ranks (`posttrain run --nproc N`, Ray): the
`parallelism` section decides how the model is sharded, and only rank 0 writes files.
The pretrain recipe runs the same flow on raw text (every token bears loss).
"""

from __future__ import annotations

from posttrain.config import JobConfig
from posttrain.parallel.build import build_model_for
from posttrain.train.run import Run
from posttrain.train.setup import (
    build_tokenizer,
    check_formats,
    in_world,
    lm_loss_fn,
    load_data,
    make_evaluate,
    make_trainer,
    print_notes,
    train_export_summarise,
)

FORMATS = ("chat", "prompt_completion", "tokens")


def train(cfg: JobConfig, formats: tuple[str, ...] = FORMATS) -> dict:
    """Run the job; returns the summary that is also written to OUTPUT/summary.json."""
    check_formats(cfg, formats)
    return in_world(cfg, lambda world, run: _train(cfg, world, run))


def _train(cfg: JobConfig, world, run: Run) -> dict:

    # 1. Tokenizer and data: training sources stream (mixed, sharded, packed in the background);
    #    the eval set is small and read once.
    tokenizer = build_tokenizer(cfg.tokenizer)
    loader, eval_samples, eval_skips = load_data(cfg, world, tokenizer)

    # 2. Model and loss.
    built = build_model_for(cfg.model, tokenizer, cfg.seed, world=world, parallelism=cfg.parallelism)
    print_notes(built, world)
    loss_fn = lm_loss_fn(
        cfg.training.loss_chunk_size_tokens,
        num_real_vocab=tokenizer.vocab_size,
        moe_aux_coef=getattr(built.config, "router_aux_loss_coef", 0.0),  # MoE families only
    )

    # 3. Trainer.
    trainer = make_trainer(cfg, built, loss_fn, loader, world, run)
    evaluate = make_evaluate(built.module, eval_samples, cfg, tokenizer, loss_fn)

    # 4. Train, export, summarise.
    return train_export_summarise(cfg, world, built, tokenizer, trainer, loader, run, evaluate, eval_skips)


main = train
