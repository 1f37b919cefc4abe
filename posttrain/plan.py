"""`posttrain plan CONFIG [--assume DEVICE:COUNT] [--json]`: the execution plan of a job, without training.

What a user wants to know before spending a GPU hour: where the job runs (device, world size, mesh),
in which dtypes (parameters, compute, gradient reduction, optimiser state), with which attention backend,
compile and activation checkpointing, and whether it fits: an estimate of memory per device, term by
term, with the largest terms named. `--assume cuda:8` plans for hardware this machine lacks, so every
GPU decision is testable on a CPU.

The estimate counts parameters exactly (the model is built on the meta device, LoRA and vocabulary
padding included) and models the rest:
  parameters      every parameter in model.dtype, divided over the FSDP shards and TP ranks
  gradients       trainable parameters in the parameter dtype (FSDP reduces and keeps them in fp32)
  optimiser       AdamW's two moments per trainable parameter, in the parameter dtype
  activations     what autograd saves for one micro-batch's backward, counted on the meta device by
                  running the model once (`_saved_bytes_per_row`), in the compute dtype; full
                  checkpointing keeps only block inputs plus one block's worth
  attention mask  the dense block-diagonal [rows, 1, T, T] bool mask SDPA gets (FlexAttention: none;
                  model.attention: auto is flex on CUDA)
  loss chunk      one chunk of fp32 logits and their gradient (the chunked cross-entropy)
  runtime         the process itself: on a CPU the resident memory of the interpreter with torch,
                  transformers and posttrain imported (measured now); on a GPU the CUDA context
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
from typing import Any

import torch

from posttrain.config import JobConfig, load_job
from posttrain.errors import ConfigError

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CUDA_CONTEXT_BYTES = 600 * 2**20  # CUDA context + cuBLAS workspace, typical for torch on Hopper
LOSS_CHUNK_BYTES = 64 * 2**20  # the chunked loss's automatic chunk: ~64 MiB of fp32 logits


def parse_assume(text: str | None) -> tuple[str, int] | None:
    """'cuda:8' -> ('cuda', 8); 'cpu' -> ('cpu', 1)."""
    if text is None:
        return None
    kind, _, count = text.partition(":")
    if kind not in ("cpu", "cuda") or (count and not count.isdigit()) or (count and int(count) < 1):
        raise ConfigError(f"--assume {text!r}: expected cpu[:N] or cuda[:N], e.g. cuda:8")
    return kind, int(count or 1)


def plan(cfg: JobConfig, assume: tuple[str, int] | None = None, nproc: int = 1) -> dict[str, Any]:
    """The resolved plan as plain data (what `--json` prints)."""
    from posttrain.models.build import head_counts
    from posttrain.parallel.world import plan_layout, use_cuda

    kind, count = assume or ("cuda" if use_cuda(cfg.training.device) else "cpu", nproc)
    layout = plan_layout(cfg.parallelism, count, **head_counts(cfg.model))
    par, distributed = cfg.parallelism, count > 1
    param_dtype = cfg.model.dtype
    # FSDP gathers parameters in parallelism.mixed_precision; one process autocasts its forward to it
    compute_dtype = par.mixed_precision if param_dtype == "float32" else param_dtype
    from posttrain.models.flex import resolve_backend

    attention = resolve_backend(cfg.model.attention, torch.device(kind))
    model, config = _meta_model(cfg)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    shards = layout.dp_shard * layout.tp if distributed else 1
    pb, cb = DTYPE_BYTES[param_dtype], DTYPE_BYTES[compute_dtype]
    rows, T = cfg.training.micro_batch_size_per_device, cfg.data.max_tokens_per_pack
    saved = _saved_bytes_per_row(model.to(DTYPES[compute_dtype]), T) / layout.tp
    layers = config.num_hidden_layers
    block_inputs = T * config.hidden_size * cb * layers  # what full checkpointing keeps per row
    if par.activation_checkpointing == "full":
        act = rows * (block_inputs + saved / layers)
    elif par.activation_checkpointing == "selective":
        checkpointed = len(range(0, layers, par.ac_every_n_layers))
        act = rows * (block_inputs * checkpointed / layers + saved * (layers - checkpointed + 1) / layers)
    else:
        act = rows * saved
    vocab_rows = model.output_weight().shape[0]
    chunk = cfg.training.loss_chunk_size_tokens or max(64, LOSS_CHUNK_BYTES // (4 * vocab_rows))
    memory = {
        "parameters": total * pb / shards,
        "gradients": trainable * pb / shards,
        "optimizer_state": 2 * trainable * pb / shards,
        "activations": act,
        "attention_mask": rows * T * T if attention == "sdpa" else 0,  # bool, SDPA's dense mask
        "loss_chunk": 2 * min(chunk, rows * T) * vocab_rows * 4,
        "runtime": CUDA_CONTEXT_BYTES if kind == "cuda" else _process_rss(),
    }
    if distributed and compute_dtype != param_dtype:  # one block gathered in the compute dtype (+ prefetch)
        memory["fsdp_gathered_block"] = 2 * _largest_block_params(model) * cb / layout.tp
    total_bytes = sum(memory.values())
    largest = sorted(memory, key=memory.get, reverse=True)[:3]
    return {
        "recipe": cfg.recipe,
        "device": kind,
        "world_size": count,
        "mesh": {"dp_replicate": layout.dp_replicate, "dp_shard": layout.dp_shard, "tp": layout.tp},
        "dtypes": {
            "parameters": param_dtype,
            "compute": compute_dtype,
            "gradient_reduction": "float32",
            "optimizer_state": param_dtype,
        },
        "attention": "sdpa (dense block-diagonal mask)" if attention == "sdpa" else "flex (BlockMask)",
        "compile": par.compile,
        "activation_checkpointing": par.activation_checkpointing,
        "parameters": {"total": total, "trainable": trainable, "vocab_rows": vocab_rows},
        "rows_per_micro_batch": rows,
        "tokens_per_row": T,
        "memory_per_device_bytes": {k: int(v) for k, v in memory.items()},
        "memory_per_device_total_bytes": int(total_bytes),
        "largest_terms": largest,
    }


def _saved_bytes_per_row(model: torch.nn.Module, T: int) -> float:
    """Bytes autograd keeps for backward when the model (on the meta device) runs one row of T tokens:
    every tensor the forward saves is counted once, through saved_tensors_hooks, so this is the model's
    own answer rather than a formula (RoPE tables, norms' fp32 copies, SwiGLU's intermediates, MoE
    routing). Views saved by several ops count separately: a slight overestimate."""
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[id(t)] = t.numel() * t.element_size()
        return t

    ids = torch.zeros(1, T, dtype=torch.long, device="meta")
    positions = torch.arange(T, device="meta")[None]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, positions, torch.zeros_like(ids))
    return float(sum(saved.values()))


def _largest_block_params(model: torch.nn.Module) -> int:
    blocks = getattr(model, "layers", [])
    return max((sum(p.numel() for p in b.parameters()) for b in blocks), default=0)


def _meta_model(cfg: JobConfig) -> tuple[torch.nn.Module, Any]:
    """The job's model on the meta device: exact parameter counts, nothing allocated."""
    from posttrain.data.tokenizer import Tokenizer
    from posttrain.models import lora, vocab
    from posttrain.models.build import _arch_fields
    from posttrain.models.hf_io import FAMILIES, MODEL_TYPES, read_checkpoint_config

    tokenizer = Tokenizer.from_dir(cfg.tokenizer.path, cfg.tokenizer.extra_special_tokens)
    if cfg.model.path is not None:
        config, model_cls, _ = read_checkpoint_config(cfg.model.path)
        rows = vocab.padded(vocab.export_vocab_size(tokenizer.vocab_size, config.vocab_size))
    else:
        config_cls, model_cls, _, _ = FAMILIES[MODEL_TYPES[cfg.model.family]]
        rows = tokenizer.padded_vocab_size()
        config = config_cls(vocab_size=rows, **_arch_fields(cfg.model.family, cfg.model.arch.model_dump()))
    config = dataclasses.replace(config, vocab_size=rows)
    with torch.device("meta"):
        model = model_cls(config)
        if cfg.model.lora is not None:
            lc = cfg.model.lora
            lora.apply_lora(model, rank=lc.rank, alpha=lc.alpha, dropout=lc.dropout, targets=lc.targets)
    return model, config


def _process_rss() -> float:
    """This process's peak resident memory so far (Linux reports KiB): the interpreter, torch,
    transformers and posttrain, which every run carries."""
    import transformers  # noqa: F401  (a run imports it: count it)

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0


def format_plan(p: dict[str, Any]) -> str:
    gib = lambda b: f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"  # noqa: E731
    mesh = p["mesh"]
    d = p["dtypes"]
    lines = [
        f"plan: recipe {p['recipe']} on {p['world_size']} x {p['device']}",
        f"  mesh            dp_replicate={mesh['dp_replicate']} dp_shard={mesh['dp_shard']} tp={mesh['tp']}",
        f"  dtypes          parameters {d['parameters']}, compute {d['compute']}, gradient reduction "
        f"{d['gradient_reduction']}, optimizer state {d['optimizer_state']}",
        f"  attention       {p['attention']}",
        f"  compile         {p['compile']}   activation checkpointing {p['activation_checkpointing']}",
        f"  parameters      {p['parameters']['total']:,} ({p['parameters']['trainable']:,} trainable; "
        f"{p['parameters']['vocab_rows']:,} vocabulary rows)",
        f"  micro-batch     {p['rows_per_micro_batch']} rows x {p['tokens_per_row']} tokens",
        "  memory per device (estimate):",
    ]
    for key, value in sorted(p["memory_per_device_bytes"].items(), key=lambda kv: -kv[1]):
        lines.append(f"    {key:<22} {gib(value):>12}")
    lines.append(f"    {'total':<22} {gib(p['memory_per_device_total_bytes']):>12}")
    lines.append(f"  largest terms: {', '.join(p['largest_terms'])}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="posttrain plan", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="YAML job file")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, as for posttrain run")
    parser.add_argument("--assume", default=None, help="plan for this hardware, e.g. cuda:8 (default: here)")
    parser.add_argument("--nproc", type=int, default=1, help="processes, as for posttrain run")
    parser.add_argument("--json", action="store_true", help="one JSON object")
    args = parser.parse_intermixed_args(argv)  # overrides may follow the flags
    p = plan(load_job(args.config, args.overrides), parse_assume(args.assume), args.nproc)
    print(json.dumps(p, indent=2) if args.json else format_plan(p))
    return 0
