"""Sharded HF loading (posttrain.parallel.sharded_load) on 2 and 4 CPU ranks over gloo.

Each test saves a random model with save_pretrained (several safetensors shards + index), spawns ranks
that build it on meta, shard it (FSDP2, tensor parallel, or both) and load it, and compares against the
single-process `load_pretrained` model: logits on fixed ids, and the gathered full state dict (exact).
The memory test checks that a rank's peak RSS grows by well under the full model's size.
"""

from __future__ import annotations

import os
import resource
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from posttrain.errors import ModelError
from posttrain.models.heads import ScoreHead, add_head
from posttrain.models.hf_io import FAMILIES, build_model, load_pretrained, save_pretrained
from posttrain.models.verify import TINY_CONFIGS
from posttrain.parallel.sharded_load import (
    _apply_index,
    _local_index,
    build_sharded_from_hf,
    load_hf_into_sharded,
)

pytestmark = pytest.mark.distributed

IDS_BT = torch.randint(0, 509, (2, 17), generator=torch.Generator().manual_seed(3))


# ------------------------------------------------------------------------------ process plumbing


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, worker: Callable[..., None], args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)  # 2 cores for up to 4 ranks
    dist.init_process_group("gloo")
    try:
        worker(rank, *args)
    finally:
        dist.destroy_process_group()


def _spawn(worker: Callable[..., None], world: int, *args: Any) -> None:
    mp.spawn(_entry, args=(world, _free_port(), worker, args), nprocs=world, join=True)


def _save_tiny(family: str, out: Path, *, head: bool = False, **overrides: Any) -> Path:
    torch.manual_seed(0)
    model, config = build_model(family, {**TINY_CONFIGS[family], **overrides})
    if head:  # saved to heads.safetensors beside the weights
        add_head(model, "reward", ScoreHead(config.hidden_size, 1))
    # ~1/4 of the weights per shard: several files and an index, as large checkpoints have.
    size = sum(p.numel() * 4 for p in model.parameters())
    save_pretrained(model, config, out, max_shard_bytes=size // 4)
    return out


def _logits(model: nn.Module, ids_BT: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    with torch.no_grad():
        h_BTD = model(ids_BT)
        weight = model.output_weight()  # under FSDP a shard again once forward is over
        if isinstance(weight, DTensor):
            weight = weight.full_tensor()
        return h_BTD @ weight.T


def _full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {k: v.detach().clone() for k, v in sd.items()}


def _fsdp(mesh) -> Callable[[nn.Module], None]:
    from torch.distributed.fsdp import fully_shard

    def apply(model: nn.Module) -> None:
        for block in model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)

    return apply


def _tp(mesh) -> Callable[[nn.Module], None]:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    def apply(model: nn.Module) -> None:
        plan = {"attention.o_proj": RowwiseParallel(), "mlp.down_proj": RowwiseParallel()}
        for name in (
            "attention.q_proj",
            "attention.k_proj",
            "attention.v_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
        ):
            plan[name] = ColwiseParallel()
        for block in model.layers:
            parallelize_module(block, mesh, plan)
            block.attention.num_heads //= mesh.size()  # local heads, as torchtitan does
            block.attention.num_kv_heads //= mesh.size()

    return apply


def _reference(ckpt: Path) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model, _ = load_pretrained(ckpt)
    return _logits(model.eval(), IDS_BT), model.state_dict()


def _check(ckpt: Path, out: Path, world: int) -> None:
    ref_logits, ref_sd = _reference(ckpt)
    for rank in range(world):
        got = torch.load(out / f"rank{rank}.pt")
        diff = (got["logits"] - ref_logits).abs().max().item()
        print(f"rank {rank}: max |logits - load_pretrained logits| = {diff:.3g}")
        assert diff <= 1e-5
        sd = got["state_dict"]
        assert sorted(sd) == sorted(ref_sd)
        for name, tensor in ref_sd.items():
            assert torch.equal(sd[name], tensor), name


# ------------------------------------------------------------------------------ workers (module level: spawn pickles them)


def _fsdp_worker(rank: int, ckpt: Path, out: Path) -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model, config = build_sharded_from_hf(ckpt, torch.float32, "cpu", _fsdp(mesh))
    assert all(isinstance(p, DTensor) for p in model.parameters())
    result = {"logits": _logits(model.eval(), IDS_BT), "state_dict": _full_state_dict(model)}

    # Same load through a from_hf that copies its tensors: the transform path (full read, then slice).
    _, model_cls, from_hf, _ = FAMILIES[config.to_hf_dict()["model_type"]]
    calls = []

    def copying_from_hf(sd: dict, cfg: Any, *, strict: bool) -> dict:
        calls.append(next(iter(sd.values())).device.type)
        return {k: v.clone() for k, v in from_hf(sd, cfg, strict=strict).items()}

    with torch.device("meta"):
        again = model_cls(config)
    for i, block in enumerate(again.layers):  # names gain `_checkpoint_wrapped_module.`: still found
        again.layers[i] = checkpoint_wrapper(block)
    _fsdp(mesh)(again)
    again.to_empty(device="cpu")
    load_hf_into_sharded(again, ckpt, config, copying_from_hf)
    assert "cpu" in calls  # the stand-in was not returned as is, so real tensors were read
    assert torch.equal(_logits(again.eval(), IDS_BT), result["logits"])
    torch.save(result, out / f"rank{rank}.pt")


def _tp_worker(rank: int, ckpt: Path, out: Path) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model, _ = build_sharded_from_hf(ckpt, torch.float32, "cpu", _tp(mesh))
    q = model.layers[0].attention.q_proj.weight
    assert q.to_local().shape[0] == q.shape[0] // 2  # really sharded
    assert "reward" in model.heads  # attached from heads.json, filled from heads.safetensors
    result = {"logits": _logits(model.eval(), IDS_BT), "state_dict": _full_state_dict(model)}
    torch.save(result, out / f"rank{rank}.pt")


def _fsdp_tp_worker(rank: int, ckpt: Path, out: Path) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.placement_types import _StridedShard

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))

    def apply(model: nn.Module) -> None:
        _tp(mesh["tp"])(model)
        _fsdp(mesh["dp"])(model)

    model, _ = build_sharded_from_hf(ckpt, torch.float32, "cpu", apply)
    placements = model.layers[0].attention.q_proj.weight.placements
    assert isinstance(placements[0], _StridedShard), placements  # FSDP over TP on dim 0: strided
    # ... yet this rank's rows are one block of the file: TP rank t owns rows [32t, 32t + 32) of the 64,
    # and FSDP rank r the r-th half of those.
    dp, tp = mesh["dp"].get_local_rank(), mesh["tp"].get_local_rank()
    index = _local_index(model.layers[0].attention.q_proj.weight)
    assert index == (slice(32 * tp + 16 * dp, 32 * tp + 16 * dp + 16), slice(0, 64)), index
    result = {"logits": _logits(model.eval(), IDS_BT), "state_dict": _full_state_dict(model)}
    torch.save(result, out / f"rank{rank}.pt")


def _peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return _peak_rss_bytes()


def _memory_worker(rank: int, ckpt: Path, out: Path) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    # Warm-up: the first meta build + fully_shard costs ~35 MB of one-off RSS (lazy imports, meta kernels,
    # FSDP code paths) whatever the model's size; only what loading adds is measured below.
    config_cls, model_cls, _, _ = FAMILIES["qwen3"]
    with torch.device("meta"):
        warm = model_cls(config_cls(**{**TINY_CONFIGS["qwen3"], "num_hidden_layers": 1}))
    _fsdp(mesh)(warm)
    del warm
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    except OSError:
        pass  # VmHWM then counts from process start: the assertion only gets stricter
    start = _rss_bytes()
    model, _ = build_sharded_from_hf(ckpt, torch.float32, "cpu", _fsdp(mesh))
    growth = _peak_rss_bytes() - start
    local = sum(p.to_local().numel() * 4 for p in model.parameters())
    torch.save({"growth": growth, "local": local}, out / f"rank{rank}.pt")


# ------------------------------------------------------------------------------ tests


def test_fsdp_load_matches_load_pretrained(tmp_path: Path) -> None:
    # 509 rows (prime): FSDP2's dim-0 shards of the embedding and LM head are uneven (255 / 254).
    ckpt = _save_tiny("qwen3", tmp_path / "ckpt", tie_word_embeddings=False, vocab_size=509)
    assert len(list(ckpt.glob("model-*-of-*.safetensors"))) > 2
    _spawn(_fsdp_worker, 2, ckpt, tmp_path)
    _check(ckpt, tmp_path, 2)


def test_tensor_parallel_load_matches_load_pretrained(tmp_path: Path) -> None:
    ckpt = _save_tiny("qwen3", tmp_path / "ckpt", tie_word_embeddings=True, head=True)
    _spawn(_tp_worker, 2, ckpt, tmp_path)
    _check(ckpt, tmp_path, 2)


def test_fsdp_over_tensor_parallel_load(tmp_path: Path) -> None:
    """2 x 2 mesh: FSDP2 shards TP-sharded weights again on dim 0 (a strided shard)."""
    ckpt = _save_tiny("qwen3", tmp_path / "ckpt", tie_word_embeddings=False)
    _spawn(_fsdp_tp_worker, 4, ckpt, tmp_path)
    _check(ckpt, tmp_path, 4)


def test_gpt_oss_fsdp_load(tmp_path: Path) -> None:
    """GPT-OSS: fused expert tensors [E, D, 2F], biases and attention sinks, sharded on dim 0."""
    ckpt = _save_tiny("gpt_oss", tmp_path / "ckpt", tie_word_embeddings=False)
    _spawn(_fsdp_worker, 2, ckpt, tmp_path)
    _check(ckpt, tmp_path, 2)


def test_peak_memory_per_rank_is_a_fraction_of_the_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    arch = dict(
        vocab_size=8192,
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=False,
    )
    model, config = build_model("qwen3", arch)
    full = sum(p.numel() * 4 for p in model.parameters())
    save_pretrained(model, config, tmp_path / "ckpt", max_shard_bytes=64 * 2**20)
    del model
    _spawn(_memory_worker, 2, tmp_path / "ckpt", tmp_path)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        print(
            f"rank {rank}: peak RSS growth {got['growth'] / 2**20:.1f} MiB, local shards "
            f"{got['local'] / 2**20:.1f} MiB, full model {full / 2**20:.1f} MiB"
        )
        assert got["local"] <= full / 2 + 2**20
        assert got["growth"] < 0.75 * full


# ------------------------------------------------------------------------------ errors (one process)


def _meta_qwen3(**overrides: Any) -> tuple[nn.Module, Any, Callable[..., dict]]:
    """A tiny Qwen3 built on meta and allocated (unsharded: the plain-parameter path)."""
    config_cls, model_cls, from_hf, _ = FAMILIES["qwen3"]
    config = config_cls(**{**TINY_CONFIGS["qwen3"], **overrides})
    with torch.device("meta"):
        model = model_cls(config)
    return model.to_empty(device="cpu"), config, from_hf


def test_missing_weights_are_named(tmp_path: Path) -> None:
    ckpt = _save_tiny("qwen3", tmp_path, num_hidden_layers=2)
    model, config, from_hf = _meta_qwen3(num_hidden_layers=3)
    with pytest.raises(ModelError, match=r"missing weights \[.*'layers\.2\.attention\.k_norm\.weight'"):
        load_hf_into_sharded(model, ckpt, config, from_hf)


def test_shape_mismatch_names_the_file(tmp_path: Path) -> None:
    ckpt = _save_tiny("qwen3", tmp_path)
    model, config, from_hf = _meta_qwen3(intermediate_size=96)
    with pytest.raises(ModelError, match=r"model-\d+-of-\d+\.safetensors: .*gate_proj.weight has shape"):
        load_hf_into_sharded(model, ckpt, config, from_hf)


def test_gathered_index_reads_a_box_then_selects(tmp_path: Path) -> None:
    """A shard that is not one block (index tensors) reads its bounding box, then gathers the rows."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    full = torch.arange(48.0).view(8, 6)
    save_file({"w": full}, str(tmp_path / "w.safetensors"))
    index = (torch.tensor([1, 2, 5]), slice(2, 4))
    expected = full[[1, 2, 5], 2:4]
    assert torch.equal(_apply_index(full, index), expected)
    with safe_open(str(tmp_path / "w.safetensors"), framework="pt") as f:
        assert torch.equal(_apply_index(f.get_slice("w"), index), expected)
