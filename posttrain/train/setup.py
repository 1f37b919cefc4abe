"""Building blocks recipes share: seeding, model construction, step counts, evaluation, export
and the run summary. Each takes only the config section it needs."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
import torch

from posttrain.config import DataConfig, TokenizerConfig, TrainingConfig, gradient_accumulation_steps
from posttrain.data.loader import TrainLoader, eval_batches
from posttrain.data.pipeline import build_pipeline
from posttrain.data.samples import Sample
from posttrain.data.tokenizer import Tokenizer
from posttrain.errors import ConfigError
from posttrain.train.losses import chunked_cross_entropy


def build_tokenizer(cfg: TokenizerConfig) -> Tokenizer:
    """The HF tokenizer at tokenizer.path plus the configured special and semantic-ID tokens."""
    sids = [f"<sid_{i}>" for i in range(cfg.semantic_id_tokens)]
    return Tokenizer.from_dir(cfg.path, [*cfg.extra_special_tokens, *sids])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def total_steps_for(training: TrainingConfig, loader: TrainLoader, world=None) -> int:
    """max_steps as given, or the optimizer steps that num_epochs of packed rows make.

    With per-rank shards (data.shard_by=samples) each rank counts its own rows and the run takes the
    smallest count, so no rank waits for a step the others never take."""
    if training.max_steps is not None:
        return training.max_steps
    rows = loader.count_rows()
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
) -> TrainLoader:
    """The streaming loader of data.train for data-parallel rank `rank` of `world_size`.

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
    model, samples: list[Sample], data: DataConfig, micro_batch_size: int, pad_id: int, loss_fn
) -> dict:
    """Token-weighted mean loss over every eval sample."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    for batch in eval_batches(
        samples,
        row_len=data.max_tokens_per_pack,
        micro_batch_size=micro_batch_size,
        pad_id=pad_id,
        packing=data.packing,
    ):
        loss, _ = loss_fn(model, batch)
        total += float(loss)
        tokens += int((batch["targets"] != -100).sum())
    model.train(was_training)
    return {"eval_loss": total / max(tokens, 1), "eval_tokens": tokens}


def write_summary(out_dir: Path, summary: dict) -> Path:
    path = Path(out_dir) / "summary.json"
    path.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return path


class Timer:
    def __init__(self):
        self.t0 = time.perf_counter()

    @property
    def elapsed_s(self) -> float:
        return time.perf_counter() - self.t0
