"""Knowledge distillation: train a student on the teacher's full next-token distribution (forward
KL, reverse KL or generalised JSD at a temperature, TRL GKD's definitions), optionally mixed with the
plain next-token loss: loss = alpha * distillation + (1 - alpha) * cross-entropy.

Read `train()` top to bottom: world -> tokenizer -> data -> student + teacher -> trainer.
The teacher is either online, any supported checkpoint whose tokenizer is the student's (checked before
loading weights: distillation over different vocabularies is meaningless), run on every batch; or
offline, the top-k log-probabilities it stored with each `distill` record (`posttrain teacher-topk`
writes them, posttrain/data/topk.py carries them through packing): no teacher in memory, forward KL
only. Online data is `distill` records (prompt + the teacher's completion) or any SFT format; the
distribution is matched at every loss position.
"""

from __future__ import annotations

import torch

from posttrain.config import JobConfig
from posttrain.data.samples import Sample
from posttrain.errors import ConfigError, DataError
from posttrain.parallel.build import build_model_for
from posttrain.train.distill import check_teacher_tokenizer, distill_loss, topk_distill_loss
from posttrain.train.losses import chunked_cross_entropy
from posttrain.train.run import Run
from posttrain.train.setup import (
    build_tokenizer,
    check_formats,
    in_world,
    load_data,
    make_evaluate,
    make_trainer,
    print_notes,
    train_export_summarise,
)

FORMATS = ("distill", "chat", "prompt_completion", "tokens")


def online_teacher(cfg: JobConfig, teacher, num_real_vocab: int, copy_teacher_head: bool):
    """prepare(batch) -> divergence(h, w): runs the teacher on the batch, then the summed divergence of
    the student's next-token distributions from the teacher's (distill.kind, at distill.temperature)."""
    d, chunk = cfg.distill, cfg.training.loss_chunk_size_tokens

    def prepare(batch):
        inputs = (batch["input_ids"], batch["position_ids"], batch.get("doc_ids"))
        with torch.no_grad():  # FSDP gathers the teacher's output matrix only inside its forward: copy it
            t_h, t_w = teacher(
                *inputs, head_fn=lambda h, w: (h, w.detach().clone() if copy_teacher_head else w)
            )
        return lambda h, w: distill_loss(
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
        )[0]

    return prepare


def offline_topk(cfg: JobConfig, num_real_vocab: int):
    """prepare(batch) -> divergence(h, w) from the teacher top-k rows stored with the data.

    The stored log-probabilities are renormalised over their k ids first, so the loss is the forward KL
    from the truncated teacher (k ids, mass 1) to the student: >= 0, every position weighted alike,
    and with k = the whole vocabulary exactly the online forward KL. (Unrenormalised, each position
    would count by the mass its top k holds; see `topk_distill_loss`.)"""
    d, chunk = cfg.distill, cfg.training.loss_chunk_size_tokens

    def prepare(batch):
        if "teacher_topk_ids" not in batch:
            raise DataError("distill.source=offline_topk: a batch holds samples without teacher_topk rows")
        logprobs = batch["teacher_topk_logprobs"]
        logprobs = logprobs - logprobs.logsumexp(-1, keepdim=True)
        return lambda h, w: topk_distill_loss(
            h,
            w,
            batch["targets"],
            batch["teacher_topk_ids"],
            logprobs,
            temperature=d.temperature,
            chunk_size=chunk,
            num_real_vocab=num_real_vocab,
        )[0]

    return prepare


def distill_loss_fn(cfg: JobConfig, teacher_divergence, num_real_vocab: int):
    """loss_fn(model, batch): alpha * distillation + (1 - alpha) * cross-entropy, both summed over loss
    tokens (the trainer normalises); `teacher_divergence` is `online_teacher(...)` or `offline_topk(...)`."""
    d, chunk = cfg.distill, cfg.training.loss_chunk_size_tokens

    def loss_fn(model, batch):
        divergence = teacher_divergence(batch)

        def head(h, w):
            kd = divergence(h, w)
            if d.alpha >= 1.0:
                return kd, kd.detach(), None
            ce, _ = chunked_cross_entropy(
                h, w, batch["targets"], chunk_size=chunk, num_real_vocab=num_real_vocab
            )
            return d.alpha * kd + (1.0 - d.alpha) * ce, kd.detach(), ce.detach()

        loss, kd, ce = model(batch["input_ids"], batch["position_ids"], batch.get("doc_ids"), head_fn=head)
        metrics = {"distill_loss": kd} | ({"ce_loss": ce} if ce is not None else {})
        return loss, metrics

    return loss_fn


def require_topk(sample: Sample) -> Sample:
    """Pipeline annotation for source=offline_topk: every record must store its teacher top-k."""
    if sample.topk_ids is None:
        raise DataError(
            "no field 'teacher_topk' (distill.source=offline_topk reads the teacher from the data; "
            "`posttrain teacher-topk CONFIG --k K --out FILE` writes it)",
            "missing_teacher_topk",
        )
    return sample


def train(cfg: JobConfig) -> dict:
    check_formats(cfg, FORMATS)
    if cfg.distill is None:
        raise ConfigError(
            "recipe distill needs a `distill:` section: a `teacher:` model (online), or `source: "
            "offline_topk` for teacher top-k stored with the data"
        )
    if cfg.distill.resolved_source == "offline_topk":
        stored = [("data.train", s) for s in cfg.data.train_sources] + [("data.eval", cfg.data.eval)]
        for key, source in stored:
            if source is not None and source.format != "distill":
                raise ConfigError(
                    f"{key}.format={source.format!r} stores no teacher top-k: with no distill.teacher, "
                    "distillation reads `distill` records with teacher_topk (`posttrain teacher-topk` "
                    "writes them); or set distill.teacher for an online teacher"
                )
    return in_world(cfg, lambda world, run: _train(cfg, world, run))


def _train(cfg: JobConfig, world, run: Run) -> dict:
    online = cfg.distill.resolved_source == "online"

    # 1. Tokenizer (the teacher must share it) and data (offline: every record with its teacher top-k).
    tokenizer = build_tokenizer(cfg.tokenizer)
    if online:
        check_teacher_tokenizer(cfg.distill.teacher.path, tokenizer)
    loader, eval_samples, eval_skips = load_data(
        cfg, world, tokenizer, annotate=None if online else require_topk
    )

    # 2. Student, and the teacher: a frozen model sharded like the student, or the stored top-k rows.
    built = build_model_for(cfg.model, tokenizer, cfg.seed, world=world, parallelism=cfg.parallelism)
    print_notes(built, world)
    if online:
        teacher = build_model_for(
            cfg.distill.teacher, tokenizer, cfg.seed, world=world, parallelism=cfg.parallelism
        ).module
        teacher.requires_grad_(False).eval()
        divergence = online_teacher(cfg, teacher, tokenizer.vocab_size, copy_teacher_head=world.distributed)
    else:
        divergence = offline_topk(cfg, tokenizer.vocab_size)
    loss_fn = distill_loss_fn(cfg, divergence, tokenizer.vocab_size)

    # 3. Trainer.
    trainer = make_trainer(cfg, built, loss_fn, loader, world, run)
    evaluate = make_evaluate(built.module, eval_samples, cfg, tokenizer, loss_fn)

    # 4. Train, export, summarise.
    return train_export_summarise(cfg, world, built, tokenizer, trainer, loader, run, evaluate, eval_skips)


main = train
