"""Output heads beside the LM head: scalar (reward / value), classification, and user-defined task heads.

A head reads the final-normed hidden states the model returns (h_BTD) and lives in `model.heads`, a
ModuleDict keyed by the head's name, so it trains, checkpoints and shards with the model:

    add_head(model, "reward", ScoreHead(D, 1))      # scalar: reward model, PPO value
    add_head(model, "topic", ScoreHead(D, 12))      # 12-way classifier
    add_head(model, "mine", my_module)              # any nn.Module taking h_BTD

Pooling: a sequence's score is the head's output at its LAST token (HF's sequence-classification
convention: the rightmost non-pad token). For packed rows, `last_token_index(doc_lens)` gives each
document's last position.

On disk, heads sit next to the HF weights in `heads.safetensors` + `heads.json` (name -> kind and
shape), which `hf_io.save_pretrained` / `load_pretrained` write and read, so a checkpoint round-trips
with its heads. `save_sequence_classifier` writes a single scalar/classification head as the family's
`transformers` `...ForSequenceClassification` (base weights + `score.weight`), which
`AutoModelForSequenceClassification` loads with the same scores.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from posttrain.errors import ModelError

HEADS_FILE = "heads.safetensors"
HEADS_INDEX = "heads.json"


class ScoreHead(nn.Module):
    """Linear D -> num_outputs without bias (HF's `score` layer): 1 output = scalar, N = classes."""

    def __init__(self, hidden_size: int, num_outputs: int) -> None:
        super().__init__()
        self.num_outputs = num_outputs
        self.weight = nn.Parameter(torch.empty(num_outputs, hidden_size))
        self.init_weights(0.02)

    @torch.no_grad()
    def init_weights(self, std: float) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=std)

    def forward(self, h_BTD: torch.Tensor) -> torch.Tensor:
        """Per-token outputs [B, T, num_outputs]."""
        return h_BTD @ self.weight.T


def add_head(model: nn.Module, name: str, head: nn.Module) -> nn.Module:
    """Attach `head` as model.heads[name] (created on first use) on the model's device and dtype."""
    if not hasattr(model, "heads"):
        model.heads = nn.ModuleDict()
    if name in model.heads:
        raise ModelError(f"the model already has a head named {name!r}")
    ref = model.output_weight()
    model.heads[name] = head.to(device=ref.device, dtype=ref.dtype)
    return model.heads[name]


def last_token_index(doc_lens_BN: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, position) of every document's last token, in row-major document order."""
    rows, cols = [], []
    for r, lens in enumerate(doc_lens_BN):
        end = 0
        for n in lens:
            end += n
            rows.append(r)
            cols.append(end - 1)
    return torch.tensor(rows), torch.tensor(cols)


def pooled_scores(values_BTK: torch.Tensor, doc_lens_BN: list[list[int]]) -> torch.Tensor:
    """[num_docs, K]: each document's head output at its last token."""
    rows, cols = last_token_index(doc_lens_BN)
    return values_BTK[rows, cols]


# ------------------------------------------------------------------------------ save / load


def head_names(state_dict: dict[str, torch.Tensor]) -> list[str]:
    return sorted({k.split(".")[1] for k in state_dict if k.startswith("heads.")})


def save_heads(model: nn.Module, out_dir: Path, dtype: torch.dtype) -> None:
    """Write heads.safetensors + heads.json when the model has heads (nothing otherwise)."""
    heads = getattr(model, "heads", None)
    if not heads:
        return
    index: dict[str, Any] = {}
    tensors = {}
    for name, head in heads.items():
        if not isinstance(head, ScoreHead):
            raise ModelError(
                f"head {name!r} is a {type(head).__name__}; only ScoreHead heads are saved with the HF "
                "export (save custom heads with torch.save(model.heads[name].state_dict()))"
            )
        index[name] = {"kind": "score", "num_outputs": head.num_outputs, "hidden_size": head.weight.shape[1]}
        tensors[f"{name}.weight"] = head.weight.detach().to("cpu", dtype).contiguous()
    save_file(tensors, str(out_dir / HEADS_FILE), metadata={"format": "pt"})
    (out_dir / HEADS_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def load_heads(model: nn.Module, path: Path) -> list[str]:
    """Attach and fill the heads saved in `path` (if any). Returns their names."""
    index_path = path / HEADS_INDEX
    if not index_path.is_file():
        return []
    index = json.loads(index_path.read_text())
    tensors = load_file(str(path / HEADS_FILE))
    for name, spec in index.items():
        if spec.get("kind") != "score":
            raise ModelError(f"{index_path}: head {name!r} has unknown kind {spec.get('kind')!r}")
        head = add_head(model, name, ScoreHead(spec["hidden_size"], spec["num_outputs"]))
        with torch.no_grad():
            head.weight.copy_(tensors[f"{name}.weight"])
    return list(index)


def sequence_classifier_architecture(causal_lm_architecture: str) -> str:
    """Qwen3ForCausalLM -> Qwen3ForSequenceClassification (Gemma3's text class has its own name)."""
    if causal_lm_architecture == "Gemma3ForCausalLM":
        return "Gemma3TextForSequenceClassification"
    return causal_lm_architecture.replace("ForCausalLM", "ForSequenceClassification")
