"""From `model:` config to a trainable model, and back out to an HF directory.

`build_single_device` reads the job's ModelConfig and returns a `BuiltModel`: the module, its
architecture config, and what export needs to know (backend, the vocabulary size config.json must
carry, whether LoRA adapters exist). The order is fixed and visible here:

    load (model.path) or build (model.arch)  ->  fit the vocabulary to the tokenizer (padded to 64)
    ->  LoRA adapters  ->  train-only-new-rows freezing

Parallelism is applied from outside (posttrain/parallel/build.py `build_model_for`, which recipes
call): under data/tensor parallelism every rank builds the same single-device model (same seed, same
init), then shards it; the weightless (meta-device) twin of the unsharded model it keeps lets export
gather the full state on rank 0 and write it with the single-process code.

`export_hf` writes OUTPUT/hf (full weights, LoRA merged, vocabulary trimmed to the export size so that
config.json and the tokenizer agree) and, with LoRA, OUTPUT/adapter (a PEFT adapter directory).
"""

from __future__ import annotations

import copy
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
from posttrain.errors import ConfigError
from posttrain.models import lora, vocab
from posttrain.models.flops import lora_params_per_token, train_flops
from posttrain.models.hf_io import (
    build_model,
    load_pretrained,
    save_lora_adapter,
    save_pretrained,
    save_sequence_classifier,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class BuiltModel:
    module: nn.Module
    config: Any  # our architecture dataclass (native) or the transformers config (hf backend)
    backend: str  # "native" or "hf"
    export_vocab_size: int  # config.json's vocab_size on export
    source_path: str | None  # model.path, recorded in the PEFT adapter config
    notes: list[str] = field(default_factory=list)  # what was done to the model, for the run summary
    world: Any = None  # posttrain.parallel.world.World when the module is sharded over ranks
    twin: nn.Module | None = None  # unsharded meta-device copy (distributed runs), for export
    classifier_head: str | None = None  # export as a sequence classifier with this head (reward models)

    @property
    def has_lora(self) -> bool:
        return bool(lora.lora_modules(self.module))


def with_score_head(built: BuiltModel, name: str | None, seed: int) -> BuiltModel:
    """Attach a scalar ScoreHead `name` (seeded init) unless the loaded checkpoint brought one."""
    from posttrain.models.heads import ScoreHead, add_head

    if name is None:
        return built
    if name not in getattr(built.module, "heads", {}):
        torch.manual_seed(seed)
        add_head(built.module, name, ScoreHead(built.module.output_weight().shape[1], 1))
        built.notes.append(f"added a scalar head {name!r} (exported as the sequence-classification score)")
    built.classifier_head = name
    return built


def with_task_heads(built: BuiltModel, sizes: dict[str, int], seed: int) -> BuiltModel:
    """Attach a ScoreHead per name (seeded init) unless the loaded checkpoint brought one of that size."""
    from posttrain.models.heads import ScoreHead, add_head

    existing = getattr(built.module, "heads", {})
    for i, (name, num_outputs) in enumerate(sizes.items()):
        if name in existing:
            if existing[name].num_outputs != num_outputs:
                raise ConfigError(
                    f"the checkpoint's head {name!r} has {existing[name].num_outputs} outputs, the job needs "
                    f"{num_outputs}"
                )
            continue
        torch.manual_seed(seed + 1 + i)
        add_head(built.module, name, ScoreHead(built.module.output_weight().shape[1], num_outputs))
        built.notes.append(f"added a head {name!r} with {num_outputs} outputs")
    return built


def head_counts(cfg: ModelConfig) -> dict[str, int | None]:
    """Attention and key/value head counts from model.arch or the checkpoint's config.json, read before
    any weight is loaded (the parallel layout must divide them)."""
    if cfg.arch is not None:
        return {"num_heads": cfg.arch.num_attention_heads, "num_kv_heads": cfg.arch.num_key_value_heads}
    config_path = Path(cfg.path) / "config.json"
    hf = json.loads(config_path.read_text()) if config_path.is_file() else {}
    hf = hf.get("text_config", hf)
    heads = hf.get("num_attention_heads")
    return {"num_heads": heads, "num_kv_heads": hf.get("num_key_value_heads", heads)}


def meta_twin(module: nn.Module) -> nn.Module:
    """A structural copy of `module` whose parameters and buffers are on the meta device (no memory)."""
    memo: dict[int, Any] = {}
    for p in module.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in module.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(module, memo)


def build_single_device(cfg: ModelConfig, tokenizer: Tokenizer, seed: int) -> BuiltModel:
    dtype = DTYPES[cfg.dtype]
    if cfg.backend == "hf":
        return _build_hf_backend(cfg, tokenizer, seed, dtype)

    notes: list[str] = []
    if cfg.path is not None:
        model, mcfg = load_pretrained(cfg.path, dtype=dtype)
        checkpoint_vocab = mcfg.vocab_size
    else:
        torch.manual_seed(seed)
        fields = _arch_fields(cfg.family, cfg.arch.model_dump())
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
            native = build_single_device(cfg.model_copy(update={"backend": "native"}), tokenizer, seed)
            path = export_hf(native, tokenizer, Path(tmp))
        checkpoint_vocab = json.loads((Path(path) / "config.json").read_text()).get("vocab_size")
        module = load_hf_backend(path, dtype, tokenizer.vocab_size)
    export_size = vocab.export_vocab_size(tokenizer.vocab_size, checkpoint_vocab)
    return BuiltModel(module, module.config, "hf", export_size, cfg.path, notes=[NOTICE])


def _arch_fields(family: str, arch: dict[str, Any]) -> dict[str, Any]:
    """model.arch -> the family config's fields (unset values keep the family default). GPT-OSS names
    its MoE fields as HF does: every layer is sparse, so intermediate_size is one expert's width."""
    fields = {k: v for k, v in arch.items() if v is not None}
    if family == "gpt_oss":
        if "num_experts" in fields:
            fields["num_local_experts"] = fields.pop("num_experts")
        if "moe_intermediate_size" in fields:
            fields["intermediate_size"] = fields.pop("moe_intermediate_size")
        if fields.pop("norm_topk_prob", None) is False:
            raise ConfigError("model.arch.norm_topk_prob: gpt_oss always renormalises its top-k weights")
    return fields


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


def export_hf(
    built: BuiltModel, tokenizer: Tokenizer, out_dir: Path, progress: str = "quiet", dtype: str = "auto"
) -> Path | None:
    """See `_export_hf`. dtype: training.export_dtype (auto = the parameters' dtype). Distributed: every
    rank takes part in gathering the full state; rank 0 loads it into the unsharded twin and writes the
    export (other ranks return None). progress: rank 0's mode."""
    if built.world is None or not built.world.distributed:
        return _export_hf(built, tokenizer, out_dir, progress, _export_dtype(built.module, dtype))
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(
        built.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    path = None
    if built.world.is_main:
        twin = built.twin.to_empty(device="cpu")
        twin.load_state_dict(full)
        if hasattr(twin, "rebuild_buffers"):
            twin.rebuild_buffers()
        plain = dataclasses.replace(built, module=twin, world=None, twin=None)
        path = _export_hf(plain, tokenizer, out_dir, progress, _export_dtype(built.module, dtype))
        built.notes[:] = plain.notes
        built.twin = twin.to("meta")  # release the gathered copy
    built.world.barrier()
    return path


def _export_dtype(module: nn.Module, name: str) -> torch.dtype:
    """training.export_dtype -> a torch dtype; auto = the dtype most parameters are held in (LoRA
    adapters and heads may differ from the base weights, the base weights decide)."""
    if name != "auto":
        return getattr(torch, name)
    counts: dict[torch.dtype, int] = {}
    for p in module.parameters():
        counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    return max(counts, key=counts.get) if counts else torch.float32


def _export_hf(
    built: BuiltModel,
    tokenizer: Tokenizer,
    out_dir: Path,
    progress: str = "quiet",
    dtype: torch.dtype = torch.float32,
) -> Path:
    """OUTPUT/hf: weights (LoRA merged, vocabulary trimmed) in `dtype`, config.json (its `dtype` says
    which), generation_config.json, tokenizer.

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

        save_hf_backend(built.module, out_dir, built.export_vocab_size, dtype)
    else:
        sd = lora.merged_state_dict(built.module) if built.has_lora else built.module.state_dict()
        sd = vocab.trimmed_state_dict(sd, built.export_vocab_size)
        config = dataclasses.replace(built.config, vocab_size=built.export_vocab_size)
        if built.classifier_head is not None:  # a reward model: transformers' ...ForSequenceClassification
            save_sequence_classifier(
                built.module,
                config,
                built.classifier_head,
                out_dir,
                pad_token_id=tokenizer.pad_id,
                dtype=dtype,
                state_dict=sd,
            )
        else:
            save_pretrained(
                built.module,
                config,
                out_dir,
                dtype=dtype,
                token_ids=ids,
                generation_config=gen,
                state_dict=sd,
                progress=progress,
            )
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
