"""Knowledge distillation: train a student on the teacher's full next-token distribution (forward
KL, reverse KL or generalised JSD at a temperature, TRL GKD's definitions), optionally mixed with the
plain next-token loss: loss = alpha * distillation + (1 - alpha) * cross-entropy.

Read `train()` top to bottom: world -> tokenizer -> data -> student + frozen teacher -> trainer.
The teacher is any supported checkpoint whose tokenizer is the student's (checked before loading
weights: distillation over different vocabularies is meaningless). Data is `distill` records (prompt
+ the teacher's completion) or any SFT format; the distribution is matched at every loss position.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from posttrain.config import JobConfig
from posttrain.errors import ConfigError
from posttrain.models.build import build_model_for
from posttrain.train.distill import distill_loss
from posttrain.train.losses import chunked_cross_entropy
from posttrain.train.setup import (
    Timer,
    build_tokenizer,
    check_formats,
    in_world,
    load_data,
    make_evaluate,
    make_trainer,
    print_notes,
    start_output,
    train_export_summarise,
)

FORMATS = ("distill", "chat", "prompt_completion", "tokens")


def check_teacher_tokenizer(teacher_path: str | None, tokenizer) -> None:
    """The teacher must share the student's vocabulary: same token -> id map where the teacher ships a
    tokenizer, else a vocabulary at least as large as the student's tokenizer."""
    if teacher_path is None:
        return
    path = Path(teacher_path)
    if (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        theirs = AutoTokenizer.from_pretrained(str(path)).get_vocab()
        ours = tokenizer.hf.get_vocab()
        differ = sorted(set(theirs.items()) ^ set(ours.items()))
        if differ:
            raise ConfigError(
                f"distill.teacher: the tokenizer at {path} differs from tokenizer.path ({len(theirs)} vs "
                f"{len(ours)} tokens, {len(differ)} (token, id) entries differ, e.g. {differ[:3]}); "
                "distillation needs one vocabulary"
            )
        return
    vocab = json.loads((path / "config.json").read_text()).get("vocab_size", 0)
    if vocab < tokenizer.vocab_size:
        raise ConfigError(
            f"distill.teacher: {path} has {vocab} vocabulary rows, fewer than the tokenizer's "
            f"{tokenizer.vocab_size} tokens"
        )


def distill_loss_fn(cfg: JobConfig, teacher, num_real_vocab: int, copy_teacher_head: bool):
    d, chunk = cfg.distill, cfg.training.loss_chunk_size_tokens

    def loss_fn(model, batch):
        inputs = (batch["input_ids"], batch["position_ids"], batch.get("doc_ids"))
        with torch.no_grad():  # FSDP gathers the teacher's output matrix only inside its forward: copy it
            t_h, t_w = teacher(
                *inputs, head_fn=lambda h, w: (h, w.detach().clone() if copy_teacher_head else w)
            )

        def head(h, w):
            kd, _ = distill_loss(
                h,
                w,
                t_h,
                t_w,
                batch["targets"],
                kind=d.kind,
                beta=d.beta,
                temperature=d.temperature,
                chunk_size=chunk,
                num_real_vocab=num_real_vocab,
            )
            if d.alpha >= 1.0:
                return kd, kd.detach(), None
            ce, _ = chunked_cross_entropy(
                h, w, batch["targets"], chunk_size=chunk, num_real_vocab=num_real_vocab
            )
            return d.alpha * kd + (1.0 - d.alpha) * ce, kd.detach(), ce.detach()

        loss, kd, ce = model(*inputs, head_fn=head)
        metrics = {"distill_loss": kd} | ({"ce_loss": ce} if ce is not None else {})
        return loss, metrics

    return loss_fn


def train(cfg: JobConfig) -> dict:
    check_formats(cfg, FORMATS)
    if cfg.distill is None:
        raise ConfigError("recipe distill needs a `distill:` section with a `teacher:` model")
    return in_world(cfg, lambda world: _train(cfg, world))


def _train(cfg: JobConfig, world) -> dict:
    timer = Timer()
    out, config_yaml = start_output(cfg, world)

    # 1. Tokenizer (the teacher must share it) and data.
    tokenizer = build_tokenizer(cfg.tokenizer)
    check_teacher_tokenizer(cfg.distill.teacher.path, tokenizer)
    loader, eval_samples, eval_skips = load_data(cfg, world, tokenizer)

    # 2. Student and frozen teacher (sharded the same way).
    built = build_model_for(cfg.model, tokenizer, cfg.seed, world=world, parallelism=cfg.parallelism)
    teacher = build_model_for(
        cfg.distill.teacher, tokenizer, cfg.seed, world=world, parallelism=cfg.parallelism
    )
    teacher.module.requires_grad_(False).eval()
    print_notes(built, world)
    loss_fn = distill_loss_fn(cfg, teacher.module, tokenizer.vocab_size, copy_teacher_head=world.distributed)

    # 3. Trainer.
    trainer = make_trainer(cfg, built, loss_fn, loader, world, out, config_yaml)
    evaluate = make_evaluate(built.module, eval_samples, cfg, tokenizer, loss_fn)

    # 4. Train, export, summarise.
    return train_export_summarise(cfg, world, built, tokenizer, trainer, loader, timer, evaluate, eval_skips)


main = train
