"""Load and save standard Hugging Face checkpoints (config.json + safetensors) for our model families.

A checkpoint we save loads with `transformers.AutoModelForCausalLM.from_pretrained`, and an HF checkpoint
loads into our definitions. Loading builds the model on the meta device and fills it one tensor at a time
from the safetensors files (memory-mapped by `safe_open`), so a model never exists twice in memory.
Saving writes one `model.safetensors`, or shards plus `model.safetensors.index.json` past
`max_shard_bytes`, in HF's layout.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from posttrain.errors import ModelError
from posttrain.models import llama3, qwen3

# model_type (as in config.json) -> (config class, model class, from_hf_state_dict, to_hf_state_dict).
# A config class provides from_hf_dict / to_hf_dict; a model class provides rebuild_buffers / init_weights.
FAMILIES: dict[str, tuple[type, type[nn.Module], Callable[..., dict], Callable[..., dict]]] = {
    "qwen3": (qwen3.Qwen3Config, qwen3.Qwen3ForCausalLM, qwen3.from_hf_state_dict, qwen3.to_hf_state_dict),
    "llama": (
        llama3.Llama3Config,
        llama3.Llama3ForCausalLM,
        llama3.from_hf_state_dict,
        llama3.to_hf_state_dict,
    ),
}

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def _family(
    model_type: str, where: str
) -> tuple[type, type[nn.Module], Callable[..., dict], Callable[..., dict]]:
    if model_type not in FAMILIES:
        raise ModelError(
            f"{where}: model_type {model_type!r} is not supported (supported: {sorted(FAMILIES)})"
        )
    return FAMILIES[model_type]


# Family names users write in job files (`model.family`) -> model_type in HF's config.json.
MODEL_TYPES = {"qwen3": "qwen3", "llama3": "llama"}


def build_model(family: str, config_dict: dict[str, Any]) -> tuple[nn.Module, Any]:
    """A from-scratch model with init_weights() applied; config_dict holds our config's fields.

    `family` is a family name (`llama3`) or an HF model_type (`llama`)."""
    config_cls, model_cls, _, _ = _family(MODEL_TYPES.get(family, family), "build_model")
    try:
        config = config_cls(**config_dict)
    except TypeError as e:  # unknown or missing field: the dataclass message names it
        raise ModelError(f"build_model({family!r}): bad config: {e}") from None
    model = model_cls(config)
    model.init_weights()
    return model, config


def load_pretrained(
    path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[nn.Module, Any]:
    """Load an HF-format checkpoint directory into our model definition. Returns (model, config)."""
    path = Path(path)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ModelError(f"no config.json in {path} (expected an HF checkpoint directory)")
    hf_config = json.loads(config_path.read_text())
    config_cls, model_cls, from_hf, _ = _family(hf_config.get("model_type", "<missing>"), str(config_path))
    config = config_cls.from_hf_dict(hf_config)

    # Meta init allocates nothing; to_empty then allocates once, directly in the target dtype and device.
    with torch.device("meta"):
        model = model_cls(config)
    model = model.to(dtype=dtype).to_empty(device=device)
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    for file in _weight_files(path):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for hf_name in f.keys():
                ours = from_hf({hf_name: f.get_tensor(hf_name)}, config, strict=False)
                for name, tensor in ours.items():
                    if tensor.shape != params[name].shape:
                        raise ModelError(
                            f"{file}: {hf_name} has shape {tuple(tensor.shape)}, "
                            f"config expects {tuple(params[name].shape)}"
                        )
                    with torch.no_grad():
                        params[name].copy_(tensor)  # copy_ converts dtype and moves device
                    loaded.add(name)
    missing = sorted(set(params) - loaded)
    if missing:
        raise ModelError(f"{path}: checkpoint is missing weights {missing}")
    model.rebuild_buffers()  # inv_freq is non-persistent: recompute it in fp32 on the device
    return model, config


def _weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the single file, or the shards its index names."""
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    index_path = path / INDEX_FILE
    if index_path.is_file():
        weight_map = json.loads(index_path.read_text())["weight_map"]
        return [path / name for name in sorted(set(weight_map.values()))]
    raise ModelError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path}")


def save_pretrained(
    model: nn.Module,
    config: Any,
    out_dir: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    max_shard_bytes: int = 5 * 2**30,
    generation_config: dict[str, Any] | None = None,
    token_ids: dict[str, Any] | None = None,
) -> Path:
    """Write config.json (+ generation_config.json) and safetensors weights with HF names.

    token_ids: optional {"bos_token_id", "eos_token_id", "pad_token_id"} written into config.json.
    Tied models omit lm_head.weight, as HF does. Returns out_dir.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_type = config.to_hf_dict()["model_type"]
    _, _, _, to_hf = _family(model_type, "save_pretrained")
    dtype_name = str(dtype).removeprefix("torch.")
    hf_config = config.to_hf_dict(torch_dtype=dtype_name, **(token_ids or {}))
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    if generation_config is not None:
        (out_dir / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n")

    hf_sd = to_hf(model.state_dict(), config)
    shards = _plan_shards(hf_sd, dtype, max_shard_bytes)
    # Remove weights of an earlier save so a loader never mixes the two layouts.
    for stale in [out_dir / SINGLE_FILE, out_dir / INDEX_FILE, *out_dir.glob("model-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)
    if len(shards) == 1:
        _write_shard(hf_sd, shards[0], dtype, out_dir / SINGLE_FILE)
        return out_dir
    weight_map: dict[str, str] = {}
    for i, names in enumerate(shards):
        file_name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _write_shard(hf_sd, names, dtype, out_dir / file_name)
        weight_map.update({name: file_name for name in names})
    total_size = sum(t.numel() * dtype.itemsize for t in hf_sd.values())
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return out_dir


def _plan_shards(sd: dict[str, torch.Tensor], dtype: torch.dtype, max_shard_bytes: int) -> list[list[str]]:
    """Greedy split in state-dict order; a tensor larger than the limit gets a shard of its own."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, tensor in sd.items():
        nbytes = tensor.numel() * dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _write_shard(sd: dict[str, torch.Tensor], names: list[str], dtype: torch.dtype, file: Path) -> None:
    # Only one shard's converted copy exists at a time; contiguous() because safetensors needs it.
    tensors = {name: sd[name].detach().to(device="cpu", dtype=dtype).contiguous() for name in names}
    save_file(tensors, str(file), metadata={"format": "pt"})
