"""The token ids the logit verifier (verify.py) feeds both implementations.

Three kinds of rows, each chosen to exercise something a definition can get wrong:
  * "text": real English through the checkpoint's own tokenizer (when the directory has one), so attention
    sees the peaked patterns of language and logits reach their real scale (SmolLM2: |logit| ~ 30);
  * "random": uniform random ids, seeded, so every seed checks other embedding rows and other routing;
  * packed rows: several documents in one row with per-document positions and doc ids. Ours runs the row,
    transformers runs each document alone; the pieces must agree (the block-diagonal mask and the position
    restarts are ours alone: transformers has no packed-row path to compare them with).
Rows are long enough to cross sliding windows (tiny configs: 8 tokens; real ones: `InputSizes.for_config`).
Several seeds are stacked into one batch per kind, so a multi-seed check costs one forward per kind.

TINY_CONFIGS are the random models `verify-model --family F` checks (and many tests reuse).

Shape legend: S seeds, B rows, T tokens per row.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# Two paragraphs of plain English (written for this file), repeated when a check wants more tokens.
BUILTIN_TEXT = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, counting the steps out of habit "
    "rather than need. There were one hundred and twelve of them, worn smooth in the middle by a century "
    "of boots. At the top she trimmed the wick, polished the great lens with a soft cloth, and checked the "
    "clockwork that turned the light. Ships she would never meet depended on that slow, steady rotation, "
    "and she liked the thought that her small routine reached so far across the dark water. On clear "
    "nights she could see the lights of the town along the coast, and on foggy ones she listened to the "
    "horn and wrote the hours in her log.\n\n"
    "Scientists who study sleep have found that the brain is far from idle during the night. Memories "
    "formed during the day are replayed and sorted, and connections that proved useful are strengthened "
    "while others fade. Children spend more of the night in deep sleep than adults, which may help explain "
    "how quickly they learn new words and skills. A single night without rest slows reaction times about "
    "as much as a glass or two of wine, and the effect builds when short nights follow one another. Most "
    "adults need between seven and nine hours, although a few people seem to manage well on less."
)


# Small enough for a laptop CPU, big enough to exercise GQA (4 query heads share 2 kv heads) and several layers.
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    # 8 experts, top 2, renormalised; layer 1 dense (mlp_only_layers) so both MLP kinds are checked.
    "qwen3_moe": dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        norm_topk_prob=True,
        mlp_only_layers=[1],
        max_position_embeddings=256,
    ),
    "qwen3": dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
    ),
    # head_dim derived (64 / 4). RoPE scaling with a 32-token original context and theta 1e4 puts the
    # rotary frequencies in all three llama3 bands (kept, smoothed, divided), and the 33-token ids go past it.
    "llama3": dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=10_000.0,
        rope_scaling=dict(
            factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=32
        ),
        max_position_embeddings=256,
    ),
    # Layers S S F S S (pattern 3). An 8-token window is shorter than the 33-token ids and the 13-token
    # packed document; query_pre_attn_scalar != head_dim, non-default RoPE bases per kind, and a linear
    # scaling on the global layers check that each reaches transformers through config.json.
    "gemma3": dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=5,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=24,
        sliding_window=8,
        sliding_window_pattern=3,
        rope_theta=50_000.0,
        rope_local_base_freq=1_000.0,
        rope_scaling={"rope_type": "linear", "factor": 8.0},
        max_position_embeddings=256,
    ),
    # Layers S F S F with an 8-token window (shorter than the 33-token ids and the 13-token packed
    # document), 8 experts top 2, and YaRN over a 16-token original context (factor 4: 64 positions), so
    # sinks, windows, routing and the YaRN ramp all reach transformers through config.json.
    "gpt_oss": dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=8,
        num_experts_per_tok=2,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"] * 2,
        rope_theta=10_000.0,
        rope_scaling=dict(factor=4.0, original_max_position_embeddings=16, truncate=False),
        max_position_embeddings=64,
    ),
}


@dataclass(frozen=True)
class InputSizes:
    """How many tokens each kind of row gets (per seed for random and packed rows)."""

    text_tokens: int  # real-text tokens, one row shared by all seeds (0: no text row)
    random_rows: int  # random-id rows per seed
    random_tokens: int  # tokens per random row
    packed_doc_lens: tuple[int, ...]  # documents packed into one row per seed, their lengths in tokens

    @classmethod
    def for_config(cls, config: Any, base: InputSizes) -> InputSizes:
        """`base` with the text row stretched past the config's sliding window (capped at 1024 tokens), so a
        real checkpoint's windowed layers see keys drop out (the window is at most the row length - 32)."""
        window = getattr(config, "sliding_window", None)
        layer_types = getattr(config, "layer_types", None) or []
        if not window or "sliding_attention" not in layer_types:
            return base
        return InputSizes(
            max(base.text_tokens, min(window + 32, 1024)),
            base.random_rows,
            base.random_tokens,
            base.packed_doc_lens,
        )


# Tiny random models (no tokenizer): 33 ids pass the 8-token windows and llama3's 32-token original
# context; the 13-token packed document also crosses a window.
TINY_SIZES = InputSizes(text_tokens=0, random_rows=2, random_tokens=33, packed_doc_lens=(7, 13, 5))
# A real checkpoint from the CLI: a few hundred tokens of text, plus random and packed rows per seed.
REAL_SIZES = InputSizes(text_tokens=256, random_rows=1, random_tokens=64, packed_doc_lens=(48, 16, 64))
# The check `posttrain run` does on first load of a checkpoint: seconds for a 135M model.
QUICK_SIZES = InputSizes(text_tokens=128, random_rows=0, random_tokens=0, packed_doc_lens=(24, 40))


@dataclass
class VerifyInputs:
    """Rows to run: `rows` name -> ids [B, T] (both implementations run them as they are); `docs[i]` is
    document i of every packed row, [S, n_i] (transformers runs it alone, ours runs the packed row)."""

    rows: dict[str, torch.Tensor]
    docs: list[torch.Tensor]

    def packed(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids, position ids, doc ids), each [S, sum n_i]: positions restart at 0 in every document."""
        ids = torch.cat(self.docs, dim=1)
        S = ids.shape[0]
        positions = torch.cat([torch.arange(d.shape[1]) for d in self.docs]).expand(S, -1)
        doc_ids = torch.cat([torch.full((d.shape[1],), i) for i, d in enumerate(self.docs)]).expand(S, -1)
        return ids, positions, doc_ids

    def num_tokens(self) -> int:
        """Logit rows compared per implementation (packed rows counted once)."""
        return sum(r.numel() for r in self.rows.values()) + sum(d.numel() for d in self.docs)


def text_ids(path: str | Path | None, vocab_size: int, num_tokens: int) -> list[int] | None:
    """`num_tokens` ids of BUILTIN_TEXT (repeated as needed) through the tokenizer saved in `path`; None when
    there is none or it emits ids the model has no row for (a tokenizer that does not belong to it)."""
    if path is None or num_tokens <= 0:
        return None
    path = Path(path)
    if not ((path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()):
        return None
    from transformers import AutoTokenizer  # heavy import, only when verifying a checkpoint

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError):
        return None
    ids: list[int] = list(tokenizer.encode(BUILTIN_TEXT, add_special_tokens=False))
    if not ids or max(ids) >= vocab_size:
        return None
    bos = tokenizer.bos_token_id
    ids = ([bos] if bos is not None and bos < vocab_size else []) + ids * (num_tokens // len(ids) + 1)
    return ids[:num_tokens]


def make_inputs(
    vocab_size: int, sizes: InputSizes, seeds: tuple[int, ...], text: list[int] | None = None
) -> VerifyInputs:
    """Rows for `seeds`: the text row once; random rows and packed documents drawn per seed and stacked.

    Packed documents are windows of the text at seeded offsets when there is text (real language inside
    packed rows), random ids otherwise. Without text, a random row of the text row's length stands in."""
    rows: dict[str, torch.Tensor] = {}
    if text:
        rows["text"] = torch.tensor([text])
    elif sizes.text_tokens:  # no tokenizer: the text row's length goes to a random row ("random_long")
        gen = torch.Generator().manual_seed(seeds[0])
        rows["random_long"] = torch.randint(0, vocab_size, (1, sizes.text_tokens), generator=gen)
    random_rows, docs = [], [[] for _ in sizes.packed_doc_lens]
    for seed in seeds:
        gen = torch.Generator().manual_seed(seed)
        if sizes.random_rows and sizes.random_tokens:
            random_rows.append(
                torch.randint(0, vocab_size, (sizes.random_rows, sizes.random_tokens), generator=gen)
            )
        for i, n in enumerate(sizes.packed_doc_lens):
            if text and len(text) > n:
                start = int(torch.randint(0, len(text) - n + 1, (1,), generator=gen))
                docs[i].append(torch.tensor([text[start : start + n]]))
            else:
                docs[i].append(torch.randint(0, vocab_size, (1, n), generator=gen))
    if random_rows:
        rows["random"] = torch.cat(random_rows)
    return VerifyInputs(rows, [torch.cat(d) for d in docs])
