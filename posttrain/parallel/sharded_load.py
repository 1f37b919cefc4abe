"""Load an HF checkpoint straight into an already-sharded model: each rank reads only its own slices.

`hf_io.load_pretrained` materialises the whole model on one device, which a model sharded over many
ranks must never do. Here the model is built on the meta device, parallelised from outside (FSDP2
`fully_shard`, tensor parallel `parallelize_module`, or both), so its parameters are DTensors whose local
tensors are this rank's shards, then `to_empty` allocates just those shards. Each safetensors tensor is
then visited once:

  * its HF name is mapped to ours through the family's `from_hf_state_dict`;
  * for a DTensor parameter the rank's slice of the global tensor is computed from the placements and
    only that slice is read from disk (`safe_open(...).get_slice(name)[slices]`) into `param.to_local()`;
    a plain (replicated) parameter is read whole.

Reading only a slice is valid when from_hf renames without touching the data. That is detected per
tensor by calling from_hf on a meta stand-in of the stored shape: a pure rename hands back the very same
tensor object. Anything else (a transpose, a split, a dtype change) is a transform, so the full tensor is
read, mapped and then sliced; at most one full tensor is in memory at a time either way.

Each tensor is read through a `safe_open` of its own. safetensors memory-maps the file and hands out
tensors that are views of the mapping, so `get_slice(...)[...]` copies nothing by itself and the
`copy_` into the shard touches only the slice's pages; but touched pages count towards the process's
RSS until the mapping closes. One handle kept open for a whole file would charge a rank for every page
it touched in that file (measured: reading half of every tensor of a 192 MB checkpoint in 4 files adds 62 MB of peak RSS
with a handle per file, 0 MB with a handle per tensor).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from posttrain.errors import ModelError
from posttrain.models import heads as heads_lib
from posttrain.models.hf_io import _weight_files, read_checkpoint_config

# safetensors dtype names -> torch dtypes, for the meta stand-ins (a transform may depend on the dtype).
_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}

# Wrappers that insert a path segment into parameter names but not into checkpoints.
_WRAPPER_SEGMENTS = ("_checkpoint_wrapped_module.", "_orig_mod.")

# index: one entry per dim, a slice or a LongTensor of global indices; None reads the whole tensor.
Index = tuple[slice | torch.Tensor, ...]
Reader = Callable[[Index | None], torch.Tensor]


def build_sharded_from_hf(
    path: str | Path,
    dtype: torch.dtype,
    device: str | torch.device,
    parallelize: Callable[[nn.Module], None],
) -> tuple[nn.Module, Any]:
    """Build the checkpoint's model on meta, let `parallelize(model)` shard it in place, allocate the
    shards on `device` and fill them from `path`. Returns (model, config).

    Heads saved beside the weights (heads.json) are attached before `parallelize`, so they are sharded
    (or not) with the rest of the model and filled from heads.safetensors.
    """
    path = Path(path)
    config, model_cls, from_hf = read_checkpoint_config(path)
    with torch.device("meta"):
        model = model_cls(config)
    model = model.to(dtype=dtype)
    heads_index = path / heads_lib.HEADS_INDEX
    if heads_index.is_file():
        for name, spec in json.loads(heads_index.read_text()).items():
            if spec.get("kind") != "score":
                raise ModelError(f"{heads_index}: head {name!r} has unknown kind {spec.get('kind')!r}")
            heads_lib.add_head(model, name, heads_lib.ScoreHead(spec["hidden_size"], spec["num_outputs"]))
    parallelize(model)
    model.to_empty(device=device)
    load_hf_into_sharded(model, path, config, from_hf)
    return model, config


def load_hf_into_sharded(
    model: nn.Module, path: str | Path, config: Any, from_hf: Callable[..., dict]
) -> None:
    """Fill every parameter of a meta-built, parallelised, `to_empty`-ed model from an HF checkpoint.

    Then rebuild the non-persistent buffers (RoPE inv_freq): `to_empty` left them uninitialised memory,
    and no checkpoint carries them. Raises ModelError naming the file on a shape mismatch, and naming
    every parameter the checkpoint did not provide.
    """
    path = Path(path)
    params = {_unwrapped_name(n): p for n, p in model.named_parameters()}
    loaded: set[str] = set()
    for file in _weight_files(path):
        for hf_name in _keys(file):
            # One call per tensor: a transform's full tensor is freed before the next one is read.
            for name in _load_one(params, file, hf_name, config, from_hf):
                if name in loaded:
                    raise ModelError(
                        f"{file}: {hf_name} maps to {name!r}, which another tensor already filled"
                    )
                loaded.add(name)
    heads_file = path / heads_lib.HEADS_FILE
    if heads_file.is_file():
        for key in _keys(heads_file):
            name = f"heads.{key}"
            if name not in params:
                raise ModelError(
                    f"{heads_file}: head weight {key!r} has no parameter {name!r}; attach the heads before "
                    "parallelising (build_sharded_from_hf does)"
                )
            with safe_open(str(heads_file), framework="pt", device="cpu") as f:
                shape = tuple(f.get_slice(key).get_shape())
            _copy_into(params, name, shape, _slice_reader(heads_file, key), f"{heads_file}: {key}")
            loaded.add(name)
    missing = sorted(set(params) - loaded)
    if missing:
        raise ModelError(f"{path}: checkpoint is missing weights {missing}")
    if hasattr(model, "rebuild_buffers"):
        model.rebuild_buffers()  # inv_freq: garbage after to_empty, recomputed in fp32 on its device


def _load_one(
    params: dict[str, nn.Parameter], file: Path, hf_name: str, config: Any, from_hf: Callable[..., dict]
) -> list[str]:
    """Copy one stored tensor into the parameters it maps to; returns their names."""
    mapped = _map_one(file, hf_name, config, from_hf)
    for name, (shape, read) in mapped.items():
        _copy_into(params, name, shape, read, f"{file}: {hf_name}")
    return list(mapped)


def _unwrapped_name(name: str) -> str:
    for segment in _WRAPPER_SEGMENTS:
        name = name.replace(segment, "")
    return name


def _keys(file: Path) -> list[str]:
    with safe_open(str(file), framework="pt", device="cpu") as f:
        return list(f.keys())


def _slice_reader(file: Path, hf_name: str) -> Reader:
    """Reads `index` of the stored tensor, touching only the bytes it covers (see the module docstring)."""

    def read(index: Index | None) -> torch.Tensor:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            if index is None:
                return f.get_tensor(hf_name)
            return _apply_index(f.get_slice(hf_name), index)

    return read


def _tensor_reader(tensor: torch.Tensor) -> Reader:
    return lambda index: tensor if index is None else _apply_index(tensor, index)


def _apply_index(source: Any, index: Index) -> torch.Tensor:
    """source[index] for a tensor or a safetensors slice, which only takes slices: index tensors are
    read as their bounding range, then gathered."""
    box = tuple(i if isinstance(i, slice) else slice(int(i.min()), int(i.max()) + 1) for i in index)
    out = source[box]
    for dim, i in enumerate(index):
        if not isinstance(i, slice):
            out = out.index_select(dim, i - box[dim].start)
    return out


def _map_one(
    file: Path, hf_name: str, config: Any, from_hf: Callable[..., dict]
) -> dict[str, tuple[tuple[int, ...], Reader]]:
    """Our names for one stored tensor -> (global shape, reader of a region of our tensor).

    A pure rename gets a reader that slices the file; a transform gets one over the mapped full tensor.
    """
    with safe_open(str(file), framework="pt", device="cpu") as f:
        stored = f.get_slice(hf_name)
        shape, dtype = tuple(stored.get_shape()), _DTYPES.get(stored.get_dtype(), torch.float32)
    stand_in = torch.empty(shape, dtype=dtype, device="meta")
    try:
        renamed = from_hf({hf_name: stand_in}, config, strict=False)
    except ModelError:
        raise  # an unexpected key: the real tensor would be refused the same way
    except Exception:  # a transform that cannot run on meta: treat as a transform
        renamed = None
    if renamed is not None and all(t is stand_in for t in renamed.values()):
        return {name: (shape, _slice_reader(file, hf_name)) for name in renamed}
    with safe_open(str(file), framework="pt", device="cpu") as f:
        full = f.get_tensor(hf_name)
    mapped = from_hf({hf_name: full}, config, strict=False)
    return {name: (tuple(t.shape), _tensor_reader(t)) for name, t in mapped.items()}


@torch.no_grad()
def _copy_into(
    params: dict[str, nn.Parameter], name: str, shape: tuple[int, ...], read: Reader, where: str
) -> None:
    """Copy this rank's part of the global tensor `read` gives into parameter `name`."""
    param = params.get(name)
    if param is None:
        raise ModelError(f"{where} maps to {name!r}, which the model does not have")
    if tuple(param.shape) != shape:  # a DTensor's shape is the global one
        raise ModelError(f"{where} has shape {shape}, the model expects {tuple(param.shape)} for {name!r}")
    if not isinstance(param, DTensor):
        param.copy_(read(None))  # copy_ converts dtype and moves device
        return
    local = param.to_local()
    if local.numel() == 0:
        return  # an uneven split can leave a rank with nothing of this tensor
    local.copy_(read(_local_index(param)))


def _local_index(param: DTensor) -> Index:
    """Which region of the global tensor this rank's local shard holds.

    Shard / Replicate placements always give a box (torch.chunk's split, as DCP computes it). Other
    shard kinds (FSDP2 over TP on the same dim uses a strided shard) are resolved by sharding an index
    vector per dim with the same placements, locally (src_data_rank=None: no communication)."""
    placements = param.placements
    if any(p.is_partial() for p in placements):
        raise ModelError(f"cannot load into a parameter with partial placement {placements}")
    shape = tuple(param.shape)
    if all(type(p) in (Shard, Replicate) for p in placements):
        local_shape, offset = compute_local_shape_and_global_offset(shape, param.device_mesh, placements)
        return tuple(slice(o, o + n) for o, n in zip(offset, local_shape))
    index: list[slice | torch.Tensor] = []
    for dim, size in enumerate(shape):
        # Shard and strided shards carry .dim (a strided shard's is_shard() is False).
        if not any(getattr(p, "dim", None) == dim for p in placements):
            index.append(slice(0, size))
            continue
        # [1, ..., 1, size]: dims before `dim` have size 1 and are not sharded by these placements.
        positions = torch.arange(size).view(*([1] * dim), size)
        only_dim = [p if getattr(p, "dim", None) == dim else Replicate() for p in placements]
        ids = distribute_tensor(positions, param.device_mesh, only_dim, src_data_rank=None)
        ids = ids.to_local().flatten().cpu()
        contiguous = bool((ids.diff() == 1).all())  # the usual case: still a plain slice of the file
        index.append(slice(int(ids[0]), int(ids[0]) + ids.numel()) if contiguous else ids)
    return tuple(index)
