"""Reward modelling: a scalar head on the last token of each answer, trained with the Bradley-Terry
loss so that chosen answers score above rejected ones (TRL's RewardTrainer loss).

Read `train()` top to bottom: world -> tokenizer -> pairs -> model + head -> trainer -> export.
Pairs are packed like DPO's (one sample, two documents); each document is scored at its last token,
which is where transformers' ...ForSequenceClassification pools, so OUTPUT/hf loads there and gives
the same scores.
"""

from __future__ import annotations

import torch

from posttrain.config import JobConfig
from posttrain.parallel.build import build_model_for
from posttrain.train.preference import bradley_terry_loss, count_pairs
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


def last_positions(doc_index_BT: torch.Tensor, num_docs: int) -> torch.Tensor:
    """Flat index (into B*T) of every document's last token, in document order."""
    flat = doc_index_BT.reshape(-1)
    keep = flat >= 0
    positions = torch.arange(flat.numel(), device=flat.device)
    last = torch.full((num_docs,), -1, dtype=torch.long, device=flat.device)
    return last.scatter_reduce(0, flat[keep], positions[keep], reduce="amax")


def doc_scores(model, batch: dict, head_name: str) -> torch.Tensor:
    """The scalar head's output at each document's last token, [num_docs]."""

    def head(h, _w):
        last = last_positions(batch["doc_index"], batch["doc_lens"].numel())
        return model.heads[head_name](h.reshape(-1, h.shape[-1])[last]).squeeze(-1)

    return model(batch["input_ids"], batch["position_ids"], batch.get("doc_ids"), head_fn=head)


def rm_loss_fn(cfg: JobConfig):
    r = cfg.reward

    def loss_fn(model, batch):
        roles = batch["doc_roles"]
        scores = doc_scores(model, batch, r.head)
        chosen, rejected = scores[roles == 0], scores[roles == 1]
        losses = bradley_terry_loss(chosen, rejected, center_rewards_coef=r.center_rewards_coef)
        metrics = {
            "accuracy": (chosen > rejected).float().sum(),
            "margin": (chosen - rejected).detach().sum(),
            "score/chosen": chosen.detach().sum(),
            "score/rejected": rejected.detach().sum(),
        }
        return losses.sum(), metrics

    return loss_fn


def train(cfg: JobConfig) -> dict:
    check_formats(cfg, ("preference",))
    return in_world(cfg, lambda world, run: _train(cfg, world, run))


def _train(cfg: JobConfig, world, run: Run) -> dict:

    # 1. Tokenizer and preference pairs.
    tokenizer = build_tokenizer(cfg.tokenizer)
    loader, eval_samples, eval_skips = load_data(cfg, world, tokenizer)

    # 2. The model with a scalar head.
    built = build_model_for(
        cfg.model, tokenizer, cfg.seed, world=world, parallelism=cfg.parallelism, score_head=cfg.reward.head
    )
    print_notes(built, world)
    loss_fn = rm_loss_fn(cfg)

    # 3. Trainer (loss units: pairs); held-out pairwise accuracy as eval_accuracy.
    trainer = make_trainer(cfg, built, loss_fn, loader, world, run, loss_units=count_pairs)
    evaluate = make_evaluate(built.module, eval_samples, cfg, tokenizer, loss_fn, count_pairs)

    # 4. Train, export, summarise.
    return train_export_summarise(cfg, world, built, tokenizer, trainer, loader, run, evaluate, eval_skips)


main = train
