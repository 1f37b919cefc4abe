"""The logit verifier: proves our model definition computes what `transformers` computes.

`verify_family` builds tiny random models (tied and untied), saves them with our `save_pretrained`, loads
the directory with `transformers.AutoModelForCausalLM`, and compares logits on random ids. It also checks
packing: one row holding three documents (per-document positions + doc ids) must give the same logits as
each document run alone. `verify_dir` does the same for a real checkpoint directory. On failure the
report names the first module whose per-layer hidden states diverge, which is where to look.

CLI: `posttrain verify-model [--family qwen3|llama3] [--hf-dir DIR] [--seed N]` (exit code 0 = passed).
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from posttrain.models.hf_io import MODEL_TYPES, build_model, load_pretrained, save_pretrained

# Max |logit difference| allowed per dtype; fp32 differences come only from summation order.
TOLERANCES = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}

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


PACKED_DOC_LENS = (7, 13, 5)  # three documents of different lengths in one row


@dataclass
class VerifyReport:
    """Outcome of one verification; max diffs are max |ours - reference| over all logits compared."""

    family: str
    max_abs_diff_logits: float  # ours vs transformers on random ids [2, 33]
    max_abs_diff_packed: float  # packed row vs each document alone (through ours and through transformers)
    tolerance: float
    passed: bool
    first_diverging: str | None  # e.g. "untied: layers.1" when a check failed; None when passed
    routing_mismatches: int | None = None  # MoE: tokens whose top-k experts differ from HF's (must be 0)
    bf16_max_abs_diff: float | None = None  # the same comparison in bf16; reported, not gated

    def format(self) -> str:
        status = "PASSED" if self.passed else "FAILED"
        lines = [
            f"verify-model {self.family}: {status}",
            f"  max |logits diff| vs transformers: {self.max_abs_diff_logits:.3e}  (tolerance {self.tolerance:.0e})",
            f"  max |logits diff| packed vs alone: {self.max_abs_diff_packed:.3e}",
        ]
        if self.routing_mismatches is not None:
            lines.append(f"  MoE tokens routed differently:    {self.routing_mismatches}  (must be 0)")
        if self.bf16_max_abs_diff is not None:
            lines.append(f"  bf16 max |logits diff| (report):  {self.bf16_max_abs_diff:.3e}")
        if self.first_diverging is not None:
            lines.append(f"  first diverging module: {self.first_diverging}")
        return "\n".join(lines)


def _load_hf(path: Path, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM  # heavy import, only when verifying
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the report is the output; a per-load progress bar is noise

    # eager attention: the plainest reference, independent of SDPA kernel choices.
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation="eager")
    return hf.eval()


def _routing_mismatches(ours: nn.Module, hf: nn.Module, run: Callable[[], None]) -> int | None:
    """Tokens whose set of top-k experts differs between ours and HF in any MoE layer (None if dense).

    Ours: every module with `last_expert_ids` (moe.MoE and the GPT-OSS MLP) records [N, k] per forward.
    HF: its routers (`mlp.gate` in Qwen3-MoE, `mlp.router` in GPT-OSS) return (logits, weights, ids).
    """
    hf_ids: list[torch.Tensor] = []
    hooks = [
        module.register_forward_hook(lambda _m, _i, out: hf_ids.append(out[-1]))
        for name, module in hf.named_modules()
        if name.endswith((".mlp.gate", ".mlp.router")) and not isinstance(module, nn.Linear)
    ]
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    ours_ids = [m.last_expert_ids for m in ours.modules() if getattr(m, "last_expert_ids", None) is not None]
    if not ours_ids and not hf_ids:
        return None
    if len(ours_ids) != len(hf_ids):
        return -1  # different number of sparse layers: a structural mismatch
    return sum(
        int((a.sort(dim=-1).values != b.reshape(a.shape).sort(dim=-1).values).any(dim=-1).sum())
        for a, b in zip(ours_ids, hf_ids)
    )


@torch.no_grad()
def _compare(
    ours: nn.Module, hf: nn.Module, vocab_size: int, seed: int, tol: float
) -> tuple[float, float, str | None, int | None]:
    """Return (max logits diff, max packed diff, first diverging module or None, MoE routing mismatches)."""
    gen = torch.Generator().manual_seed(seed)
    ids_BT = torch.randint(0, vocab_size, (2, 33), generator=gen)
    h_BTD, ours_hidden = ours(ids_BT, return_hidden_states=True)
    outputs = []
    routing = _routing_mismatches(ours, hf, lambda: outputs.append(hf(ids_BT, output_hidden_states=True)))
    ref = outputs[0]
    diff_logits = (ours.logits(h_BTD).float() - ref.logits.float()).abs().max().item()

    first = None
    if diff_logits > tol:
        first = _first_diverging(ours_hidden, h_BTD, list(ref.hidden_states), tol)

    # Packed: documents concatenated, positions restart per document, doc ids separate them.
    docs = [torch.randint(0, vocab_size, (1, n), generator=gen) for n in PACKED_DOC_LENS]
    packed_ids = torch.cat(docs, dim=1)
    positions = torch.cat([torch.arange(n) for n in PACKED_DOC_LENS]).unsqueeze(0)
    doc_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(PACKED_DOC_LENS)]).unsqueeze(0)
    packed_logits = ours.logits(ours(packed_ids, positions, doc_ids)).float()
    diff_packed = 0.0
    start = 0
    for doc in docs:
        n = doc.shape[1]
        piece = packed_logits[:, start : start + n]
        alone_ours = ours.logits(ours(doc)).float()
        alone_hf = hf(doc).logits.float()
        diff_packed = max(
            diff_packed, (piece - alone_ours).abs().max().item(), (piece - alone_hf).abs().max().item()
        )
        start += n
    if first is None and diff_packed > tol:
        first = "packing (attention mask or per-document positions)"
    if first is None and routing:
        first = "MoE router (top-k experts differ)"
    return diff_logits, diff_packed, first, routing


def _first_diverging(
    ours_hidden: list[torch.Tensor], h_BTD: torch.Tensor, hf_hidden: list[torch.Tensor], tol: float
) -> str:
    """Walk the residual stream from the embeddings up and name the first point that differs.

    transformers 5 returns [embeddings, block 0, ..., block L-2, final norm(block L-1)], so the last entry
    is compared with our normed output and cannot separate the last block from the final norm.
    """
    num_layers = len(ours_hidden) - 1
    ours_points = ours_hidden[:num_layers] + [h_BTD]
    names = (
        ["tok_embeddings"]
        + [f"layers.{i}" for i in range(num_layers - 1)]
        + [f"layers.{num_layers - 1} or norm"]
    )
    for name, a, b in zip(names, ours_points, hf_hidden):
        if (a.float() - b.float()).abs().max().item() > tol:
            return name
    return "lm_head / output weight"  # the residual stream matches, so the output projection differs


def verify_family(
    family: str = "qwen3", seed: int = 0, dtype: torch.dtype = torch.float32, *, report_bf16: bool = True
) -> VerifyReport:
    """Tiny random tied and untied models, saved by us and loaded by transformers, must agree.

    report_bf16: also run the untied comparison in bf16 and report its max diff (not gated: bf16 rounding
    differs with any change of operation order)."""
    tol = TOLERANCES[dtype]
    worst_logits, worst_packed, first, routing = 0.0, 0.0, None, None
    for tied in (False, True):
        torch.manual_seed(seed)
        model, config = build_model(
            MODEL_TYPES[family], {**TINY_CONFIGS[family], "tie_word_embeddings": tied}
        )
        model = model.to(dtype).eval()
        model.rebuild_buffers()  # keep inv_freq fp32 after the dtype cast
        with tempfile.TemporaryDirectory() as tmp:
            save_pretrained(model, config, tmp, dtype=dtype)
            hf = _load_hf(Path(tmp), dtype)
            d_logits, d_packed, where, mismatches = _compare(model, hf, config.vocab_size, seed, tol)
        worst_logits, worst_packed = max(worst_logits, d_logits), max(worst_packed, d_packed)
        if mismatches is not None:
            routing = (routing or 0) + abs(mismatches)
        if first is None and where is not None:
            first = f"{'tied' if tied else 'untied'}: {where}"
    passed = worst_logits <= tol and worst_packed <= tol and not routing
    bf16 = None
    if report_bf16 and dtype == torch.float32:
        bf16 = verify_family(family, seed, torch.bfloat16, report_bf16=False).max_abs_diff_logits
    return VerifyReport(family, worst_logits, worst_packed, tol, passed, first, routing, bf16)


def verify_dir(path: str | Path, seed: int = 0, dtype: torch.dtype = torch.float32) -> VerifyReport:
    """Same checks for a real checkpoint: ours (load_pretrained) vs transformers, both from `path`."""
    tol = TOLERANCES[dtype]
    model, config = load_pretrained(path, dtype=dtype)
    model.eval()
    hf = _load_hf(Path(path), dtype)
    d_logits, d_packed, where, routing = _compare(model, hf, config.vocab_size, seed, tol)
    family = type(config).__name__.removesuffix("Config").lower()
    passed = d_logits <= tol and d_packed <= tol and not routing
    return VerifyReport(family, d_logits, d_packed, tol, passed, where, routing)


def main(argv: list[str]) -> int:
    """`posttrain verify-model`: print the report; exit code 0 when it passed, 1 otherwise."""
    parser = argparse.ArgumentParser(prog="posttrain verify-model", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--family", default="qwen3", choices=sorted(TINY_CONFIGS), help="model family to check"
    )
    parser.add_argument(
        "--hf-dir", default=None, help="verify this HF checkpoint directory instead of a tiny random model"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for the random weights and token ids")
    args = parser.parse_args(argv)
    report = (
        verify_dir(args.hf_dir, seed=args.seed) if args.hf_dir else verify_family(args.family, seed=args.seed)
    )
    print(report.format())
    return 0 if report.passed else 1
