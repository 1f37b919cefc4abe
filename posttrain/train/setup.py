"""Building blocks recipes share: seeding, model construction, step counts, evaluation, export
and the run summary. Each takes only the config section it needs."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from posttrain.config import DataConfig, ModelConfig, TrainingConfig, gradient_accumulation_steps
from posttrain.data.loader import TrainLoader, eval_batches
from posttrain.data.samples import Sample
from posttrain.data.tokenizer import Tokenizer
from posttrain.errors import ConfigError, ModelError
from posttrain.models.flops import train_flops
from posttrain.models.hf_io import build_model, load_pretrained, save_pretrained
from posttrain.train.losses import chunked_cross_entropy

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_model_for(cfg: ModelConfig, tokenizer: Tokenizer, seed: int) -> tuple[torch.nn.Module, object]:
    """Load `model.path`, or build `model.arch` from scratch with the tokenizer's padded vocab."""
    dtype = DTYPES[cfg.dtype]
    if cfg.path is not None:
        model, mcfg = load_pretrained(cfg.path, dtype=dtype)
        if mcfg.vocab_size < tokenizer.vocab_size:
            raise ModelError(
                f"model.path {cfg.path}: vocab_size {mcfg.vocab_size} is smaller than the tokenizer's "
                f"{tokenizer.vocab_size} tokens"
            )
        return model, mcfg
    torch.manual_seed(seed)
    fields = {k: v for k, v in cfg.arch.model_dump().items() if v is not None}
    model, mcfg = build_model(cfg.family, {"vocab_size": tokenizer.padded_vocab_size(), **fields})
    model.init_weights(cfg.init_std)
    return model.to(dtype), mcfg


def total_steps_for(training: TrainingConfig, loader: TrainLoader) -> int:
    """max_steps as given, or the optimizer steps that num_epochs of packed rows make."""
    if training.max_steps is not None:
        return training.max_steps
    rows = loader.count_rows(training.num_epochs)
    steps = rows // training.global_batch_size
    if steps == 0:
        raise ConfigError(
            f"training.num_epochs={training.num_epochs} packs into {rows} rows, fewer than one step of "
            f"training.global_batch_size={training.global_batch_size}"
        )
    return steps


def make_loader(
    data: DataConfig, training: TrainingConfig, samples: list[Sample], pad_id: int, seed: int
) -> TrainLoader:
    gradient_accumulation_steps(training)  # fail early with the arithmetic
    return TrainLoader(
        samples,
        row_len=data.max_tokens_per_pack,
        micro_batch_size=training.micro_batch_size_per_device,
        pad_id=pad_id,
        packing=data.packing,
        open_rows=data.pack_open_rows,
        shuffle=data.shuffle,
        seed=seed,
    )


def lm_loss_fn(chunk_size: int, num_real_vocab: int):
    """Next-token loss over a packed batch: sum of token losses (the trainer normalises)."""

    def loss_fn(model, batch):
        h = model(batch["input_ids"], batch["position_ids"], batch.get("doc_ids"))
        loss, _ = chunked_cross_entropy(
            h, model.output_weight(), batch["targets"], chunk_size=chunk_size, num_real_vocab=num_real_vocab
        )
        return loss, {}

    return loss_fn


def flops_fn_for(model_cfg) -> Callable[[list[int], int], float]:
    """FLOPs of a step: the LM head runs only on loss tokens (the chunked loss drops the rest)."""
    return lambda doc_lens, num_loss_tokens: float(train_flops(model_cfg, doc_lens, num_loss_tokens))


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


def export_hf(model, model_cfg, tokenizer: Tokenizer, out_dir: Path) -> Path:
    """OUTPUT/hf: weights, config.json, generation_config.json and the tokenizer files."""
    ids = {
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.end_of_turn_id,
        "pad_token_id": tokenizer.pad_id,
    }
    gen = {
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": sorted({tokenizer.end_of_turn_id, tokenizer.eos_id}),
        "pad_token_id": tokenizer.pad_id,
        "do_sample": False,
    }
    save_pretrained(model, model_cfg, out_dir, token_ids=ids, generation_config=gen)
    tokenizer.save(out_dir)
    return out_dir


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
