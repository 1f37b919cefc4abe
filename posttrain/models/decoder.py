"""What every dense decoder family shares: the causal-LM shell and the HF key-map mechanics.

A family (qwen3.py, llama3.py) supplies its config, how to build one block, and a table of
parameter names (ours <-> HF). `DecoderLM` owns the embeddings -> blocks -> final norm -> output
weight flow and its API (forward returns final-normed hidden states; the loss applies
`output_weight()` in chunks). The key-map functions rename state dicts through a family's table.

Shape legend: B batch, T sequence, D hidden size, Dh head dim, V vocabulary.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from posttrain.errors import ModelError
from posttrain.models.components import RMSNorm, RotaryEmbedding, build_attention_mask

if TYPE_CHECKING:
    from posttrain.models.kv_cache import KVCache


class DecoderLM(nn.Module):
    """Causal decoder LM shell; families subclass it once and only build their blocks.

    Per-layer variation (Gemma3 and GPT-OSS alternate sliding-window and full attention, Gemma3 with a
    RoPE base of its own per kind) is data: `layer_types[i]` names layer i's attention kind, `rotary` is
    one RotaryEmbedding shared by all layers or a dict keyed by layer type, and layers of kind
    "sliding_attention" see at most `sliding_window` keys. A block is called as
    block(x_BTD, cos_BTDh, sin_BTDh, mask_B1TT) with the tables and mask of its kind; in generation also
    with `kv_cache=` its layer's slice of a KVCache.
    """

    def __init__(
        self,
        config: Any,
        rotary: RotaryEmbedding | dict[str, RotaryEmbedding],
        make_block: Callable[[int], nn.Module],
        *,
        layer_types: list[str] | None = None,
        sliding_window: int | None = None,
        make_norm: Callable[[int, float], nn.Module] = RMSNorm,
        embed_scale: float | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        c = config
        self.layer_types = list(layer_types or ["full_attention"] * c.num_hidden_layers)
        if len(self.layer_types) != c.num_hidden_layers:
            raise ModelError(
                f"layer_types has {len(self.layer_types)} entries for {c.num_hidden_layers} layers"
            )
        self.sliding_window = sliding_window
        # "sdpa" (a dense bool mask per layer kind) or "flex" (a BlockMask; models/flex.py): set from
        # model.attention when the job builds the model. Generation (kv_cache) and fp64 always use SDPA.
        self.attention_backend = "sdpa"
        self.embed_scale = embed_scale  # Gemma multiplies embeddings by sqrt(D) (in the weights' dtype)
        # Registration order fixes the init RNG stream: embeddings, rotary, layers, norm, lm_head.
        self.tok_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.rotary = nn.ModuleDict(rotary) if isinstance(rotary, dict) else rotary
        self.layers = nn.ModuleList(make_block(i) for i in range(c.num_hidden_layers))
        self.norm = make_norm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = None if c.tie_word_embeddings else nn.Linear(c.hidden_size, c.vocab_size, bias=False)

    def forward(
        self,
        input_ids_BT: torch.Tensor,
        position_ids_BT: torch.Tensor | None = None,
        doc_ids_BT: torch.Tensor | None = None,
        *,
        return_hidden_states: bool = False,
        head_fn: Callable[[torch.Tensor, torch.Tensor], Any] | None = None,
        kv_cache: KVCache | None = None,
    ) -> Any:
        """Final-normed hidden states h_BTD, or head_fn(h_BTD, output_weight()) when given.

        head_fn lets a loss use the output matrix *inside* forward: under FSDP the root's parameters
        (embeddings, LM head) are only gathered while forward runs, so a chunked loss that reads
        output_weight() afterwards would see a shard.

        position_ids_BT defaults to arange(T) per row; doc_ids_BT (int, same shape) restricts attention to
        tokens of the same document (packing). With return_hidden_states=True also return
        [embeddings, block 0 output, ..., block L-1 output] for locating numerical divergence.

        kv_cache (generation, see kv_cache.py): input_ids_BT are only the new tokens; they are appended to
        the cache and attend over every cached token. position_ids_BT then defaults to the slot indices.
        """
        B, T = input_ids_BT.shape
        x_BTD = self.embed(input_ids_BT)
        offset = 0
        if kv_cache is not None:
            offset = kv_cache.length
            kv_cache.begin_step(doc_ids_BT, T)
        if position_ids_BT is None:
            position_ids_BT = torch.arange(offset, offset + T, device=input_ids_BT.device).expand(B, T)
        per_type = {}  # layer type -> (cos, sin, mask), computed once per kind, not per layer
        for layer_type in dict.fromkeys(self.layer_types):
            rotary = self.rotary[layer_type] if isinstance(self.rotary, nn.ModuleDict) else self.rotary
            window = self.sliding_window if layer_type == "sliding_attention" else None
            if kv_cache is None and self.attention_backend == "flex" and x_BTD.dtype != torch.float64:
                from posttrain.models import flex

                mask = flex.block_mask(doc_ids_BT, B, T, window, input_ids_BT.device)
            elif kv_cache is None:
                mask = build_attention_mask(doc_ids_BT, T, window, device=input_ids_BT.device)
            else:
                mask = kv_cache.attention_mask(window)
            per_type[layer_type] = (*rotary(x_BTD, position_ids_BT), mask)
        hidden: list[torch.Tensor] = [x_BTD]
        for i, (layer, layer_type) in enumerate(zip(self.layers, self.layer_types)):
            if kv_cache is None:
                x_BTD = layer(x_BTD, *per_type[layer_type])
            else:
                x_BTD = layer(x_BTD, *per_type[layer_type], kv_cache=kv_cache.layers[i])
            if return_hidden_states:
                hidden.append(x_BTD)
        h_BTD = self.norm(x_BTD)
        if head_fn is not None:
            return head_fn(h_BTD, self.output_weight())
        return (h_BTD, hidden) if return_hidden_states else h_BTD

    def embed(self, input_ids_BT: torch.Tensor) -> torch.Tensor:
        """Token embeddings x_BTD, scaled where the family scales them."""
        x_BTD = self.tok_embeddings(input_ids_BT)
        if self.embed_scale is not None:
            x_BTD = x_BTD * torch.tensor(self.embed_scale, dtype=x_BTD.dtype)
        return x_BTD

    def output_weight(self) -> torch.Tensor:
        """The [V, D] output matrix: lm_head.weight, or the embedding matrix when tied."""
        return self.tok_embeddings.weight if self.lm_head is None else self.lm_head.weight

    def logits(self, h_BTD: torch.Tensor) -> torch.Tensor:
        """Full [B, T, V] logits; for generation/eval only (training applies output_weight in chunks)."""
        return h_BTD @ self.output_weight().T

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """normal(0, std) for linears and embeddings, zeros for biases, a module's own reset_parameters()
        for the rest (norms, experts); seed-deterministic."""
        owned: set[int] = set()  # submodules of a module that initialises itself
        for module in self.modules():  # registration order is fixed, so the RNG stream is too
            if module is self or id(module) in owned or isinstance(module, RotaryEmbedding):
                continue  # rotary holds buffers only: rebuilt below
            if hasattr(module, "init_weights"):
                module.init_weights(std)  # parameter holders of a family's own (experts, sinks, LoRA)
                owned.update(id(m) for m in module.modules())
            elif isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif hasattr(module, "reset_parameters"):
                module.reset_parameters()  # norms (ones, or zeros for Gemma's 1 + w)
        self.rebuild_buffers()

    def rebuild_buffers(self) -> None:
        """Recompute RoPE inv_freq (non-persistent, so garbage after meta-device init + to_empty)."""
        for module in self.modules():
            if isinstance(module, RotaryEmbedding):
                module.reset_parameters()


# ------------------------------------------------------------------------------ HF key maps

_INDEX_RE = re.compile(r"(?<=\.)(\d+)(?=\.)")
_PLACEHOLDERS = ("{i}", "{j}")  # layer index, then expert index (Qwen3-MoE's experts.{j}.gate_proj)


def rename(name: str, table: dict[str, str]) -> str | None:
    """Map one name through a template table ("{i}" = layer, "{j}" = expert index); None when no entry."""
    indices = _INDEX_RE.findall(name)
    if len(indices) > len(_PLACEHOLDERS):
        return None
    template = name
    for placeholder in _PLACEHOLDERS[: len(indices)]:
        template = _INDEX_RE.sub(placeholder, template, count=1)
    target = table.get(template)
    if target is None:
        return None
    for placeholder, index in zip(_PLACEHOLDERS, indices):
        target = target.replace(placeholder, index)
    return target


def expected_keys(
    key_map: dict[str, str], config: Any, keep: Callable[[str], bool] = lambda k: True
) -> list[str]:
    """Every parameter name our model has: lm_head only when untied, templates the family `keep`s.

    "{i}" expands over config.num_hidden_layers, "{j}" over config.num_experts."""
    keys = []
    for ours in key_map:
        if (ours == "lm_head.weight" and config.tie_word_embeddings) or not keep(ours):
            continue
        names = [ours]
        if "{i}" in ours:
            names = [n.replace("{i}", str(i)) for n in names for i in range(config.num_hidden_layers)]
        if "{j}" in ours:
            names = [n.replace("{j}", str(j)) for n in names for j in range(config.num_experts)]
        keys += names
    return keys


def to_hf(
    sd: dict[str, torch.Tensor], config: Any, key_map: dict[str, str], family: str
) -> dict[str, torch.Tensor]:
    """Rename our state dict to HF names (tensors shared, not copied). Tied models carry no lm_head."""
    out: dict[str, torch.Tensor] = {}
    unexpected = []
    for name, tensor in sd.items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        hf = rename(name, key_map)
        if hf is None:
            unexpected.append(name)
        else:
            out[hf] = tensor
    if unexpected:
        raise ModelError(f"{family} state dict has keys with no HF name: {sorted(unexpected)}")
    return out


def from_hf(
    sd: dict[str, torch.Tensor],
    key_map: dict[str, str],
    expected: list[str],
    family: str,
    *,
    strict: bool,
    tied: bool,
) -> dict[str, torch.Tensor]:
    """Rename an HF state dict to our names.

    A tied model ignores HF's lm_head.weight (some exports write it anyway). Keys outside `expected`
    (unknown names, layers past the config, biases it does not enable) always raise; missing keys raise
    unless strict=False (hf_io loads one tensor at a time and checks completeness itself).
    """
    wanted = set(expected)
    inverse = {hf: ours for ours, hf in key_map.items()}
    out: dict[str, torch.Tensor] = {}
    unexpected = []
    for name, tensor in sd.items():
        if (name == "lm_head.weight" and tied) or name.endswith("rotary_emb.inv_freq"):
            continue  # inv_freq: a buffer some old exports saved; we recompute it
        ours = rename(name, inverse)
        if ours is None or ours not in wanted:
            unexpected.append(name)
        else:
            out[ours] = tensor
    missing = sorted(wanted - set(out)) if strict else []
    if unexpected or missing:
        raise ModelError(
            f"HF {family} checkpoint does not match the config: missing keys {missing}, "
            f"unexpected keys {sorted(unexpected)}"
        )
    return out
