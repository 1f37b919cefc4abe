"""Parallelism applied from outside the model: tensor parallel, activation checkpointing, compile, FSDP2.

Models are plain single-device modules with unified names (`layers.{i}.attention.q_proj`,
`layers.{i}.mlp.down_proj`, `layers.{i}.mlp.experts.{j}.up_proj`, ...). This module turns one into a
distributed model in torchtitan's order:

    tensor parallel (TP_PLAN, data over the unified names)  ->  activation checkpointing
    ->  torch.compile per block  ->  FSDP2 per block, then the root

Tensor parallel is Megatron-style: q/k/v and gate/up are column-parallel (each rank owns a slice of
the heads or of the MLP's inner width), o and down are row-parallel (partial sums all-reduced), so a
block needs two all-reduces forward and two backward. Embeddings, norms, routers and the LM head stay
replicated across the TP group, and so do GPT-OSS's fused expert tensors (not nn.Linear: no plan
yet, so every TP rank computes all experts). After sharding, each attention module is told its
*local* head counts, and GPT-OSS's per-head sink logits are sharded with the heads.

FSDP2 (`fully_shard`) shards every block's parameters over the data-parallel mesh (HSDP when
dp_replicate > 1) and gathers them just in time; with `mixed_precision: bfloat16` the gathered
parameters are bf16 while gradients are reduced in fp32.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from posttrain.config import ParallelismConfig
from posttrain.errors import ConfigError
from posttrain.parallel.world import World

# Within one block: unified module name -> Megatron style. Names a family lacks are skipped; `*` is
# every expert of an MoE layer (Qwen3-MoE's experts are ordinary SwiGLU modules).
TP_PLAN: dict[str, str] = {
    "attention.q_proj": "colwise",
    "attention.k_proj": "colwise",
    "attention.v_proj": "colwise",
    "attention.o_proj": "rowwise",
    "mlp.gate_proj": "colwise",
    "mlp.up_proj": "colwise",
    "mlp.down_proj": "rowwise",
    "mlp.experts.*.gate_proj": "colwise",
    "mlp.experts.*.up_proj": "colwise",
    "mlp.experts.*.down_proj": "rowwise",
}


def blocks_of(model: nn.Module) -> nn.ModuleList:
    """The repeated transformer blocks: ours (`layers`) or a transformers decoder's (`decoder.layers`)."""
    if isinstance(getattr(model, "layers", None), nn.ModuleList):
        return model.layers
    decoder = getattr(model, "decoder", None)
    if decoder is not None and isinstance(getattr(decoder, "layers", None), nn.ModuleList):
        return decoder.layers
    raise ConfigError(f"parallelism: {type(model).__name__} has no `layers` list of blocks to shard")


def check_supported(model: nn.Module, par: ParallelismConfig, *, backend: str) -> None:
    """Refuse combinations that would train wrongly, before any weight is moved."""
    if par.tp == 1:
        return
    if backend != "native":
        raise ConfigError("parallelism.tp > 1 needs model.backend=native (the hf backend has no TP plan)")
    names = [n for n, _ in model.named_modules()]
    if any(n.endswith(".lora_a") for n in names):
        raise ConfigError(
            "parallelism.tp > 1 with model.lora is not supported: use data parallelism (dp_shard)"
        )


def _expand(block: nn.Module) -> dict[str, str]:
    """TP_PLAN resolved against one block's actual submodules."""
    present = dict(block.named_modules())
    plan = {}
    for pattern, style in TP_PLAN.items():
        if "*" in pattern:
            head, tail = pattern.split(".*.")
            experts = present.get(head)
            for j in range(len(experts) if isinstance(experts, nn.ModuleList) else 0):
                name = f"{head}.{j}.{tail}"
                if isinstance(present.get(name), nn.Linear):
                    plan[name] = style
        elif isinstance(present.get(pattern), nn.Linear):
            plan[pattern] = style
    return plan


def apply_tp(model: nn.Module, tp_mesh) -> None:
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    tp = tp_mesh.size()
    for block in blocks_of(model):
        plan = _expand(block)
        parallelize_module(block, tp_mesh, {name: styles[style]() for name, style in plan.items()})
        attention = block.attention
        attention.num_heads //= tp  # local heads: the module reshapes by these counts
        attention.num_kv_heads //= tp
        if isinstance(getattr(attention, "sinks", None), nn.Parameter):  # GPT-OSS: one sink logit per head
            sinks = attention.sinks
            attention.sinks = nn.Parameter(
                distribute_tensor(sinks.data, tp_mesh, [Shard(0)]), requires_grad=sinks.requires_grad
            )


def apply_activation_checkpointing(model: nn.Module, mode: str, every_n: int) -> int:
    """Wrap blocks so their activations are recomputed in backward; returns how many were wrapped.

    The wrapper's state-dict hooks strip its `_checkpoint_wrapped_module.` prefix, so checkpoints and
    exports keep the unified names."""
    if mode == "none":
        return 0
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    blocks = blocks_of(model)
    wrapped = 0
    for i, block in enumerate(blocks):
        if mode == "full" or i % every_n == 0:
            blocks[i] = checkpoint_wrapper(block, preserve_rng_state=False)
            wrapped += 1
    return wrapped


def apply_compile(model: nn.Module, backend: str = "inductor") -> None:
    """torch.compile each block in place (names unchanged); one block's graph serves every block.

    Packed rows change their document layout every step, but only as values (positions, doc ids, the
    mask's contents), never as shapes: rows have max_tokens_per_pack columns and micro-batches a fixed
    row count, so a new layout reuses the graph. A new shape (a short last or eval batch) recompiles
    once and dynamo then marks that dimension dynamic (its automatic dynamic shapes), so a third shape
    reuses the graph (tests/unit/test_compile.py counts the graphs). backend: "eager" in tests."""
    for block in blocks_of(model):
        block.compile(backend=backend)


def apply_fsdp(model: nn.Module, dp_mesh, mixed_precision: str) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if mixed_precision == "bfloat16" else None, reduce_dtype=torch.float32
    )
    for block in blocks_of(model):
        fully_shard(block, mesh=dp_mesh, mp_policy=mp)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp)


def autocast_dtype(param_dtype: str, par: ParallelismConfig, world: World) -> torch.dtype | None:
    """The precision policy of one process: parallelism.mixed_precision=bfloat16 over fp32 parameters
    computes the forward under bf16 autocast, while parameters, gradients and AdamW's moments stay fp32
    (the master weights). Several processes get the same policy from FSDP's MixedPrecisionPolicy
    (`apply_fsdp`: bf16 gathers, fp32 reduction), so there it is None, as it is with nothing to do."""
    if world.distributed or par.mixed_precision != "bfloat16" or param_dtype != "float32":
        return None
    return torch.bfloat16


def parallelize(
    model: nn.Module, world: World, par: ParallelismConfig, *, backend: str = "native"
) -> list[str]:
    """Apply the configured parallelism in place; returns notes on what was applied (for the summary)."""
    check_supported(model, par, backend=backend)
    notes = []
    if not world.distributed and world.device.type != "cpu":
        # A world of one on a GPU: the model was built (or loaded) on the CPU. FSDP moves sharded
        # parameters itself; here the whole model moves, buffers included (rotary tables stay fp32).
        model.to(world.device)
        notes.append(f"on {world.device}")
    if world.distributed and world.layout.tp > 1:
        apply_tp(model, world.mesh["tp"])
        notes.append(f"tensor parallel over {world.layout.tp} ranks (attention heads and MLP columns split)")
    n = apply_activation_checkpointing(model, par.activation_checkpointing, par.ac_every_n_layers)
    if n:
        notes.append(f"activation checkpointing on {n} of {len(blocks_of(model))} blocks")
    if par.compile:
        apply_compile(model)
        notes.append("torch.compile per block")
    if world.distributed:
        dp_mesh = world.mesh["dp_replicate", "dp_shard"]
        apply_fsdp(model, dp_mesh, par.mixed_precision)
        lay = world.layout
        kind = "HSDP" if lay.dp_replicate > 1 else "FSDP2"
        notes.append(f"{kind} over dp_replicate={lay.dp_replicate} x dp_shard={lay.dp_shard} ranks")
    return notes


def _sq_sum_fp64(t: torch.Tensor, chunk_numel: int = 1 << 22) -> torch.Tensor:
    """sum(t ** 2) accumulated in float64, in chunks (an fp64 copy of a whole embedding gradient would
    be 8 bytes a parameter). Squares of fp32 values are exact in fp64, so how the sum is split (by shard,
    by chunk) changes it only at ~1e-16 relative."""
    flat = t.detach().reshape(-1)
    total = torch.zeros((), dtype=torch.float64, device=t.device)
    for part in flat.split(chunk_numel):
        total += part.to(torch.float64).square().sum()
    return total


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> float:
    """Global gradient norm over plain and distributed (DTensor) gradients, clipped to max_norm.

    The squared norm is accumulated in float64: each rank sums the squares of its local shards, and
    shards are summed over the mesh dimensions a gradient is sharded on (not those it is replicated
    on). In fp32 the sharded and the unsharded sums round differently, the clipping coefficient then
    differs in its last bit, and over a long run at a high learning rate that bit grows into a
    visibly different loss curve; in fp64 the coefficient (applied in fp32) comes out identical, so a
    data-parallel run follows the single-process run bit for bit (tests/distributed). Gradients that
    are still Partial (unreduced) fall back to DTensor's own norm."""
    from torch.distributed.tensor import DTensor, Partial

    groups: dict[object, list[torch.Tensor]] = defaultdict(list)
    for p in params:
        if p.grad is not None:
            g = p.grad
            key = (g.device_mesh, g.placements) if isinstance(g, DTensor) else None
            groups[key].append(g)
    total_sq = torch.zeros((), dtype=torch.float64)
    for key, grads in groups.items():
        if key is not None and any(isinstance(pl, Partial) for pl in key[1]):
            norm = torch.nn.utils.get_total_norm(grads, 2.0).full_tensor()
            total_sq += norm.detach().double().cpu() ** 2
            continue
        local = sum(_sq_sum_fp64(g.to_local() if key is not None else g) for g in grads)
        if key is not None:
            mesh, placements = key
            for dim, placement in enumerate(placements):
                # Shard, or FSDP-over-TP's _StridedShard (not a Shard subclass): every placement that
                # is neither replicated nor partial splits the tensor, so its pieces' squares add up.
                if not placement.is_replicate():
                    torch.distributed.all_reduce(local, group=mesh.get_group(dim))
        total_sq += local.cpu()
    total = float(total_sq.sqrt())
    if max_norm < float("inf") and total > max_norm:
        coef = max_norm / (total + 1e-6)
        for grads in groups.values():
            for g in grads:
                g.mul_(coef)
    return total
