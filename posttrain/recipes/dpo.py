"""Direct preference optimisation: raise the policy's log-probability margin between chosen and
rejected answers relative to a frozen reference (TRL's sigmoid / cDPO / IPO losses).

Read `train()` top to bottom: world -> tokenizer -> pairs -> policy + reference -> trainer -> export.
The reference is a frozen copy of the starting weights, the policy with its LoRA adapters off, or
log-probabilities precomputed by `posttrain precompute-reference` and attached to each pair as it is
rendered (posttrain/data/reference.py): then no reference model is built at all.
A preference pair is one packed sample holding its two documents (posttrain/data/pairs.py), so a
row never splits a pair; the loss reads per-document log-probabilities out of packed rows. The
trainer normalises by pairs (its loss units), so accumulation and data parallelism stay exact.
"""

from __future__ import annotations

import torch

from posttrain.config import JobConfig
from posttrain.data.labels import IGNORE
from posttrain.data.reference import ReferenceLogps, reference_identity
from posttrain.errors import ConfigError
from posttrain.models import lora
from posttrain.parallel.build import build_model_for
from posttrain.train.preference import count_pairs, dpo_loss, sequence_logprobs
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


def doc_logprobs(model, batch: dict, *, average: bool, chunk_size, num_real_vocab: int) -> torch.Tensor:
    """Per-document log-probability of its labelled tokens, [num_docs] (computed inside forward)."""

    def head(h, w):
        n = batch["doc_lens"].numel()
        return sequence_logprobs(
            h,
            w,
            batch["targets"],
            batch["doc_index"],
            n,
            chunk_size=chunk_size,
            num_real_vocab=num_real_vocab,
            average=average,
        )

    return model(batch["input_ids"], batch["position_ids"], batch.get("doc_ids"), head_fn=head)


def precomputed_reference(batch: dict, average: bool) -> torch.Tensor:
    """The stored per-document reference log-probabilities; IPO's length average divides by each
    document's loss-token count, as `sequence_logprobs(average=True)` does."""
    ref = batch["ref_logps"]
    if not average:
        return ref
    keep = batch["targets"] != IGNORE
    counts = torch.bincount(batch["doc_index"][keep], minlength=ref.numel()).to(ref.dtype)
    return ref / counts.clamp(min=1.0)


def dpo_loss_fn(cfg: JobConfig, reference, num_real_vocab: int):
    """loss_fn(model, batch) -> (sum of pair losses, summed metrics); `reference(batch)` gives the
    reference log-probabilities of the same documents."""
    d = cfg.dpo
    kwargs = dict(
        average=d.loss_type == "ipo",
        chunk_size=cfg.training.loss_chunk_size_tokens,
        num_real_vocab=num_real_vocab,
    )

    def loss_fn(model, batch):
        roles = batch["doc_roles"]
        chosen, rejected = roles == 0, roles == 1
        logps = doc_logprobs(model, batch, **kwargs)
        with torch.no_grad():
            ref = reference(batch, kwargs)
        losses, r_chosen, r_rejected = dpo_loss(
            logps[chosen],
            logps[rejected],
            ref[chosen],
            ref[rejected],
            beta=d.beta,
            loss_type=d.loss_type,
            label_smoothing=d.label_smoothing,
        )
        if d.sft_weight:
            keep = batch["targets"] != IGNORE
            counts = torch.bincount(batch["doc_index"][keep], minlength=roles.numel()).clamp(min=1)
            nll = -logps[chosen] / (1.0 if kwargs["average"] else counts[chosen])  # per-token, per pair
            losses = losses + d.sft_weight * nll
        metrics = {
            "rewards/chosen": r_chosen.sum(),
            "rewards/rejected": r_rejected.sum(),
            "rewards/margin": (r_chosen - r_rejected).sum(),
            "rewards/accuracy": (r_chosen > r_rejected).float().sum(),
            "logps/chosen": logps[chosen].detach().sum(),
            "logps/rejected": logps[rejected].detach().sum(),
        }
        return losses.sum(), metrics

    return loss_fn


def train(cfg: JobConfig) -> dict:
    check_formats(cfg, ("preference",))
    if cfg.dpo.reference == "lora_disabled" and cfg.model.lora is None:
        raise ConfigError(
            "dpo.reference=lora_disabled needs model.lora (the reference is the base without adapters)"
        )
    return in_world(cfg, lambda world, run: _train(cfg, world, run))


def _train(cfg: JobConfig, world, run: Run) -> dict:

    # 1. Tokenizer and preference pairs (one packed sample per pair).
    tokenizer = build_tokenizer(cfg.tokenizer)
    precomputed = None
    if cfg.dpo.reference == "precomputed":  # attached to every pair as it is rendered
        identity = reference_identity(cfg.model, cfg.tokenizer, cfg.seed)
        precomputed = ReferenceLogps.load(cfg.dpo.reference_logps, identity)
    loader, eval_samples, eval_skips = load_data(
        cfg, world, tokenizer, annotate=precomputed.attach if precomputed else None
    )

    # 2. Policy and reference: a frozen copy of the starting model, the policy with adapters off, or
    #    the precomputed log-probabilities.
    built = build_model_for(cfg.model, tokenizer, cfg.seed, world=world, parallelism=cfg.parallelism)
    print_notes(built, world)
    policy = built.module
    if cfg.dpo.reference == "copy":
        ref_model = build_model_for(
            cfg.model, tokenizer, cfg.seed, world=world, parallelism=cfg.parallelism
        ).module
        ref_model.requires_grad_(False).eval()
        reference = lambda batch, kw: doc_logprobs(ref_model, batch, **kw)  # noqa: E731
    elif cfg.dpo.reference == "precomputed":
        reference = lambda batch, kw: precomputed_reference(batch, kw["average"])  # noqa: E731
    else:

        def reference(batch, kw):
            was_training = policy.training
            policy.eval()  # no adapter dropout in the reference pass
            with lora.adapters_disabled(policy):
                logps = doc_logprobs(policy, batch, **kw)
            policy.train(was_training)
            return logps

    loss_fn = dpo_loss_fn(cfg, reference, tokenizer.vocab_size)

    # 3. Trainer (loss units: pairs).
    trainer = make_trainer(cfg, built, loss_fn, loader, world, run, loss_units=count_pairs)
    evaluate = make_evaluate(built.module, eval_samples, cfg, tokenizer, loss_fn, count_pairs)

    # 4. Train, export, summarise.
    return train_export_summarise(cfg, world, built, tokenizer, trainer, loader, run, evaluate, eval_skips)


main = train
