"""The model of this rank: the single-device model from `model:` (posttrain/models/build.py), its
heads, then the `parallelism` section applied from outside. The order is fixed and visible here:

    verify model.path once (cached)  ->  build (load or init; vocabulary, LoRA, freezing)  ->  heads
    ->  parallelism (TP, AC, compile, FSDP2)  ->  attention backend

Plain fine-tuning of a checkpoint on several ranks skips the full load: a meta-device build is
sharded first and each rank reads only its shards from the safetensors (sharded_load.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from posttrain.config import ModelConfig
from posttrain.data.tokenizer import Tokenizer
from posttrain.errors import ConfigError
from posttrain.models import vocab
from posttrain.models.build import (
    DTYPES,
    BuiltModel,
    build_single_device,
    meta_twin,
    with_score_head,
    with_task_heads,
)
from posttrain.models.hf_io import read_checkpoint_config
from posttrain.parallel.parallelize import parallelize
from posttrain.parallel.sharded_load import build_sharded_from_hf


def build_model_for(
    cfg: ModelConfig,
    tokenizer: Tokenizer,
    seed: int,
    *,
    world: Any = None,
    parallelism: Any = None,
    score_head: str | None = None,
    task_heads: dict[str, int] | None = None,
) -> BuiltModel:
    """Load `model.path` or build `model.arch`, apply the vocabulary, LoRA and freezing options, add a
    scalar `score_head` (reward models; kept if the checkpoint has one) and `task_heads` (name -> outputs:
    ScoreHeads saved beside the HF export, e.g. the event model's; kept if the checkpoint has them), then
    the parallelism section (`world`, `parallelism`: posttrain.parallel; None = one process as is).

    A native-backend model.path is first verified against transformers (once per checkpoint, cached;
    models/verify_on_load.py) unless model.verify is false: a definition that fails raises ModelError."""
    verified = None
    if cfg.path is not None and cfg.backend == "native" and cfg.verify:
        from posttrain.models.verify_on_load import verify_on_load

        read_checkpoint_config(Path(cfg.path))  # a missing or foreign checkpoint: the loader's clear error
        verified = verify_on_load(cfg.path)
    built = _build(cfg, tokenizer, seed, world, parallelism, score_head, task_heads)
    _set_attention(built, cfg.attention, world)
    if verified is not None:
        built.notes.insert(0, verified)
    return built


def _set_attention(built: BuiltModel, name: str, world: Any) -> None:
    """model.attention -> the native model's kernel on its device (auto: flex on CUDA, sdpa on CPU)."""
    from posttrain.models.flex import resolve_backend

    if built.backend != "native":
        return
    device = world.device if world is not None else torch.device("cpu")
    backend = resolve_backend(name, device)
    if backend == "flex" and device.type != "cuda":
        raise ConfigError(
            "model.attention=flex needs a CUDA device to train (torch has no FlexAttention backward on "
            "CPU); use model.attention=auto or sdpa here"
        )
    built.module.attention_backend = backend
    if backend == "flex":
        built.notes.append("FlexAttention (BlockMasks from document ids, built once per layer kind)")


def _build(
    cfg: ModelConfig,
    tokenizer: Tokenizer,
    seed: int,
    world: Any,
    parallelism: Any,
    score_head: str | None,
    task_heads: dict[str, int] | None,
) -> BuiltModel:
    if parallelism is None or world is None:
        built = with_score_head(build_single_device(cfg, tokenizer, seed), score_head, seed)
        return with_task_heads(built, task_heads or {}, seed)
    if world.distributed and cfg.train_new_token_rows_only:
        raise ConfigError(
            "model.train_new_token_rows_only is not supported with several processes yet "
            "(its gradient hook does not survive FSDP's parameter swap)"
        )
    if world.distributed and score_head is None and not task_heads and _can_load_sharded(cfg, tokenizer):
        return _build_sharded(cfg, tokenizer, world, parallelism)
    built = with_score_head(build_single_device(cfg, tokenizer, seed), score_head, seed)
    built = with_task_heads(built, task_heads or {}, seed)
    if world.distributed:
        built.twin = meta_twin(built.module)
        built.world = world
        if cfg.path is not None:
            built.notes.append(
                "every rank loaded the full checkpoint before sharding (LoRA or a vocabulary change "
                "needs the whole model); plain fine-tuning loads straight into shards"
            )
    built.notes.extend(parallelize(built.module, world, parallelism, backend=built.backend))
    return built


def _can_load_sharded(cfg: ModelConfig, tokenizer: Tokenizer) -> bool:
    """Straight-into-shards loading needs the checkpoint as it is: no adapters, no vocabulary change."""
    if cfg.path is None or cfg.backend != "native" or cfg.lora is not None:
        return False
    checkpoint_vocab = json.loads((Path(cfg.path) / "config.json").read_text()).get("vocab_size")
    export = vocab.export_vocab_size(tokenizer.vocab_size, checkpoint_vocab)
    return checkpoint_vocab == vocab.padded(export)


def _build_sharded(cfg: ModelConfig, tokenizer: Tokenizer, world: Any, parallelism: Any) -> BuiltModel:
    """Meta-device build -> parallelize -> each rank reads only its shards from the safetensors."""

    notes: list[str] = []
    twins: list[nn.Module] = []

    def shard(model: nn.Module) -> None:
        twins.append(meta_twin(model))  # on meta already: the unsharded structure, for export
        notes.extend(parallelize(model, world, parallelism))

    model, mcfg = build_sharded_from_hf(cfg.path, DTYPES[cfg.dtype], world.device, shard)
    notes.append("weights loaded straight into each rank's shards (no rank held the full model)")
    export = vocab.export_vocab_size(tokenizer.vocab_size, mcfg.vocab_size)
    return BuiltModel(model, mcfg, "native", export, cfg.path, notes, world=world, twin=twins[0])
