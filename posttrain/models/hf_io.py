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
from posttrain.models import gemma3, gpt_oss, heads, llama3, qwen3, qwen3_moe

# model_type (as in config.json) -> (config class, model class, from_hf_state_dict, to_hf_state_dict).
# A config class provides from_hf_dict / to_hf_dict; a model class provides rebuild_buffers / init_weights.
FAMILIES: dict[str, tuple[type, type[nn.Module], Callable[..., dict], Callable[..., dict]]] = {
    "qwen3": (qwen3.Qwen3Config, qwen3.Qwen3ForCausalLM, qwen3.from_hf_state_dict, qwen3.to_hf_state_dict),
    "qwen3_moe": (
        qwen3_moe.Qwen3MoeConfig,
        qwen3_moe.Qwen3MoeForCausalLM,
        qwen3_moe.from_hf_state_dict,
        qwen3_moe.to_hf_state_dict,
    ),
    "llama": (
        llama3.Llama3Config,
        llama3.Llama3ForCausalLM,
        llama3.from_hf_state_dict,
        llama3.to_hf_state_dict,
    ),
    "gemma3_text": (
        gemma3.Gemma3Config,
        gemma3.Gemma3ForCausalLM,
        gemma3.from_hf_state_dict,
        gemma3.to_hf_state_dict,
    ),
    "gpt_oss": (
        gpt_oss.GptOssConfig,
        gpt_oss.GptOssForCausalLM,
        gpt_oss.from_hf_state_dict,
        gpt_oss.to_hf_state_dict,
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
MODEL_TYPES = {
    "qwen3": "qwen3",
    "qwen3_moe": "qwen3_moe",
    "llama3": "llama",
    "gemma3": "gemma3_text",
    "gpt_oss": "gpt_oss",
}


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


def read_checkpoint_config(path: Path) -> tuple[Any, type[nn.Module], Callable[..., dict]]:
    """config.json of an HF checkpoint directory -> (our config, model class, from_hf key map)."""
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        raise ModelError(f"no config.json in {path} (expected an HF checkpoint directory)")
    hf_config = json.loads(config_path.read_text())
    config_cls, model_cls, from_hf, _ = _family(hf_config.get("model_type", "<missing>"), str(config_path))
    return config_cls.from_hf_dict(hf_config), model_cls, from_hf


def load_pretrained(
    path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[nn.Module, Any]:
    """Load an HF-format checkpoint directory into our model definition. Returns (model, config)."""
    path = Path(path)
    config, model_cls, from_hf = read_checkpoint_config(path)

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
    heads.load_heads(model, path)  # reward / classification heads saved beside the weights, if any
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
    state_dict: dict[str, torch.Tensor] | None = None,
    progress: str = "quiet",
) -> Path:
    """Write config.json (+ generation_config.json) and safetensors weights with HF names.

    token_ids: optional {"bos_token_id", "eos_token_id", "pad_token_id"} written into config.json.
    state_dict: what to write instead of model.state_dict() (e.g. LoRA merged into the weights).
    Tied models omit lm_head.weight, as HF does. progress: a progress mode (MiB written, per shard).
    Returns out_dir.
    """
    from posttrain.metrics.progress import Progress

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_type = config.to_hf_dict()["model_type"]
    _, _, _, to_hf = _family(model_type, "save_pretrained")
    dtype_name = str(dtype).removeprefix("torch.")
    hf_config = config.to_hf_dict(torch_dtype=dtype_name, **(token_ids or {}))
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    if generation_config is not None:
        (out_dir / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n")

    if state_dict is None:
        state_dict = model.state_dict()
        if any(".lora_a." in k for k in state_dict):
            raise ModelError(
                "save_pretrained: the model has LoRA adapters; pass lora.merged_state_dict(model)"
            )
    hf_sd = to_hf({k: v for k, v in state_dict.items() if not k.startswith("heads.")}, config)
    heads.save_heads(model, out_dir, dtype)
    shards = _plan_shards(hf_sd, dtype, max_shard_bytes)
    # Remove weights of an earlier save so a loader never mixes the two layouts.
    for stale in [out_dir / SINGLE_FILE, out_dir / INDEX_FILE, *out_dir.glob("model-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)
    total_size = sum(t.numel() * dtype.itemsize for t in hf_sd.values())
    mib = lambda names: round(sum(hf_sd[n].numel() * dtype.itemsize for n in names) / 2**20, 1)  # noqa: E731
    with Progress(mib(hf_sd), f"export {out_dir.name}", progress, unit="MiB") as shown:
        if len(shards) == 1:
            _write_shard(hf_sd, shards[0], dtype, out_dir / SINGLE_FILE)
            shown.advance(mib(shards[0]))
            return out_dir
        weight_map: dict[str, str] = {}
        for i, names in enumerate(shards):
            file_name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            _write_shard(hf_sd, names, dtype, out_dir / file_name)
            weight_map.update({name: file_name for name in names})
            shown.advance(mib(names))
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


def save_lora_adapter(
    model: nn.Module, config: Any, out_dir: str | Path, base_model_path: str | None
) -> Path:
    """A PEFT adapter directory (adapter_config.json + adapter_model.safetensors) for the HF model.

    `peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out_dir)` then computes
    what our adapted model computes."""
    from posttrain.models import lora  # local: only LoRA runs need it

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _, _, _, to_hf = _family(config.to_hf_dict()["model_type"], "save_lora_adapter")

    def hf_name(ours: str) -> str:
        return next(iter(to_hf({ours: torch.empty(0)}, config)))

    tensors = lora.peft_adapter_state_dict(model, hf_name)
    save_file(
        {k: v.to("cpu").contiguous() for k, v in tensors.items()},
        str(out_dir / "adapter_model.safetensors"),
        metadata={"format": "pt"},
    )
    adapter_config = lora.peft_adapter_config(model, base_model_path)
    (out_dir / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
    return out_dir


def save_sequence_classifier(
    model: nn.Module,
    config: Any,
    head_name: str,
    out_dir: str | Path,
    *,
    pad_token_id: int,
    dtype: torch.dtype = torch.float32,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the base model + heads[head_name] as the family's transformers ...ForSequenceClassification.

    `AutoModelForSequenceClassification.from_pretrained(out_dir)` then scores a sequence with the head's
    output at its last non-pad token, which is what `heads.pooled_scores` computes. pad_token_id is
    required: HF pools at the rightmost token that is not padding.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    head = model.heads[head_name]
    hf_config = config.to_hf_dict(torch_dtype=str(dtype).removeprefix("torch."), pad_token_id=pad_token_id)
    hf_config["architectures"] = [heads.sequence_classifier_architecture(hf_config["architectures"][0])]
    hf_config["num_labels"] = head.num_outputs
    hf_config["id2label"] = {str(i): f"LABEL_{i}" for i in range(head.num_outputs)}
    hf_config["label2id"] = {f"LABEL_{i}": i for i in range(head.num_outputs)}
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    _, _, _, to_hf = _family(hf_config["model_type"], "save_sequence_classifier")
    sd = state_dict if state_dict is not None else model.state_dict()
    hf_sd = to_hf({k: v for k, v in sd.items() if not k.startswith("heads.")}, config)
    hf_sd.pop("lm_head.weight", None)  # a classifier has no LM head
    hf_sd["score.weight"] = head.weight
    for stale in [out_dir / SINGLE_FILE, out_dir / INDEX_FILE]:
        stale.unlink(missing_ok=True)
    _write_shard(hf_sd, list(hf_sd), dtype, out_dir / SINGLE_FILE)
    return out_dir
