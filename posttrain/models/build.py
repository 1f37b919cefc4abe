"""From `model:` config to a trainable model, and back out to an HF directory.

`build_model_for` reads the job's ModelConfig and returns a `BuiltModel`: the module, its architecture
config, and what export needs to know (backend, the vocabulary size config.json must carry, whether
LoRA adapters exist). The order is fixed and visible here:

    load (model.path) or build (model.arch)  ->  fit the vocabulary to the tokenizer (padded to 64)
    ->  LoRA adapters  ->  train-only-new-rows freezing

`export_hf` writes OUTPUT/hf (full weights, LoRA merged, vocabulary trimmed to the export size so that
config.json and the tokenizer agree) and, with LoRA, OUTPUT/adapter (a PEFT adapter directory).
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from posttrain.config import ModelConfig
from posttrain.data.tokenizer import Tokenizer
from posttrain.models import lora, vocab
from posttrain.models.flops import lora_params_per_token, train_flops
from posttrain.models.hf_io import build_model, load_pretrained, save_lora_adapter, save_pretrained

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class BuiltModel:
    module: nn.Module
    config: Any  # our architecture dataclass (native) or the transformers config (hf backend)
    backend: str  # "native" or "hf"
    export_vocab_size: int  # config.json's vocab_size on export
    source_path: str | None  # model.path, recorded in the PEFT adapter config
    notes: list[str] = field(default_factory=list)  # what was done to the model, for the run summary

    @property
    def has_lora(self) -> bool:
        return bool(lora.lora_modules(self.module))


def build_model_for(cfg: ModelConfig, tokenizer: Tokenizer, seed: int) -> BuiltModel:
    """Load `model.path` or build `model.arch`, then apply the vocabulary, LoRA and freezing options."""
    dtype = DTYPES[cfg.dtype]
    if cfg.backend == "hf":
        return _build_hf_backend(cfg, tokenizer, seed, dtype)

    notes: list[str] = []
    if cfg.path is not None:
        model, mcfg = load_pretrained(cfg.path, dtype=dtype)
        checkpoint_vocab = mcfg.vocab_size
    else:
        torch.manual_seed(seed)
        fields = {k: v for k, v in cfg.arch.model_dump().items() if v is not None}
        model, mcfg = build_model(cfg.family, {"vocab_size": tokenizer.padded_vocab_size(), **fields})
        model.init_weights(cfg.init_std)
        model = model.to(dtype)
        model.rebuild_buffers()
        checkpoint_vocab = None

    export_size = vocab.export_vocab_size(tokenizer.vocab_size, checkpoint_vocab)
    real_rows = checkpoint_vocab or tokenizer.vocab_size  # rows that hold trained (or initial) values
    old_size = vocab.resize_vocab(model, vocab.padded(export_size), num_init_rows=real_rows)
    if checkpoint_vocab is not None and tokenizer.vocab_size > checkpoint_vocab:
        notes.append(
            f"vocabulary grown {checkpoint_vocab} -> {tokenizer.vocab_size} tokens "
            f"({tokenizer.vocab_size - checkpoint_vocab} new rows, mean-initialised; "
            f"{vocab.padded(export_size)} rows in training, padded to a multiple of 64)"
        )
    elif old_size != vocab.padded(export_size):
        notes.append(f"vocabulary rows padded {old_size} -> {vocab.padded(export_size)} (multiple of 64)")

    if cfg.lora is not None:
        wrapped = lora.apply_lora(
            model,
            rank=cfg.lora.rank,
            alpha=cfg.lora.alpha,
            dropout=cfg.lora.dropout,
            targets=cfg.lora.targets,
        )
        counts = lora.count_params(model)
        notes.append(
            f"LoRA r={cfg.lora.rank} alpha={cfg.lora.alpha} on {len(wrapped)} linears: "
            f"{counts['trainable_params']:,} of {counts['total_params']:,} parameters trainable"
        )
    if cfg.train_new_token_rows_only:
        first_new = checkpoint_vocab if checkpoint_vocab is not None else tokenizer.vocab_size
        rows = vocab.train_new_rows_only(model, first_new_row=first_new)
        notes.append(f"training only vocabulary rows >= {first_new} ({rows} rows incl. padding)")
    return BuiltModel(model, mcfg, "native", export_size, cfg.path, notes)


def _build_hf_backend(cfg: ModelConfig, tokenizer: Tokenizer, seed: int, dtype: torch.dtype) -> BuiltModel:
    """transformers' model for model.path; for model.arch, our init saved and loaded by transformers
    (so native and hf runs of one job start from the same weights)."""
    from posttrain.models.hf_backend import NOTICE, load_hf_backend

    path = cfg.path
    with tempfile.TemporaryDirectory() as tmp:
        if path is None:
            native = build_model_for(cfg.model_copy(update={"backend": "native"}), tokenizer, seed)
            path = export_hf(native, tokenizer, Path(tmp))
        checkpoint_vocab = json.loads((Path(path) / "config.json").read_text()).get("vocab_size")
        module = load_hf_backend(path, dtype, tokenizer.vocab_size)
    export_size = vocab.export_vocab_size(tokenizer.vocab_size, checkpoint_vocab)
    return BuiltModel(module, module.config, "hf", export_size, cfg.path, notes=[NOTICE])


def flops_fn_for(built: BuiltModel) -> Callable[[list[int], int], float]:
    """FLOPs of a step: the LM head runs only on loss tokens (the chunked loss drops the rest)."""
    if built.backend == "hf":
        from posttrain.models.hf_backend import hf_backend_flops_fn

        return hf_backend_flops_fn(built.module)
    adapters = lora_params_per_token(built.module, built.config) if built.has_lora else None
    config = built.config
    return lambda doc_lens, num_loss_tokens: float(
        train_flops(config, doc_lens, num_loss_tokens, lora_params_per_token=adapters)
    )


def export_hf(built: BuiltModel, tokenizer: Tokenizer, out_dir: Path) -> Path:
    """OUTPUT/hf: weights (LoRA merged, vocabulary trimmed), config.json, generation_config.json, tokenizer.

    With LoRA also OUTPUT/adapter, a PEFT adapter for the base model at model.path (not for adapters on
    MoE experts, which PEFT cannot address in transformers' fused experts: a note says so instead)."""
    out_dir = Path(out_dir)
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
    if built.backend == "hf":
        from posttrain.models.hf_backend import save_hf_backend

        save_hf_backend(built.module, out_dir, built.export_vocab_size)
    else:
        sd = lora.merged_state_dict(built.module) if built.has_lora else built.module.state_dict()
        sd = vocab.trimmed_state_dict(sd, built.export_vocab_size)
        config = dataclasses.replace(built.config, vocab_size=built.export_vocab_size)
        save_pretrained(built.module, config, out_dir, token_ids=ids, generation_config=gen, state_dict=sd)
        expert_adapters = [name for name in lora.lora_modules(built.module) if ".experts." in name]
        if expert_adapters:
            # PEFT has no layout for per-expert adapters (transformers fuses experts): OUTPUT/hf, with the
            # adapters merged, is the export. Raising here would fail the run after training finished.
            built.notes.append(
                f"no PEFT adapter exported: {len(expert_adapters)} adapters sit on MoE experts, which "
                "transformers fuses; OUTPUT/hf holds the merged model"
            )
        elif built.has_lora:
            save_lora_adapter(built.module, built.config, out_dir.parent / "adapter", built.source_path)
    tokenizer.save(out_dir)
    return out_dir
