"""The rollout engine's lean decode step (posttrain/rl/fast_decode.py) against model.forward.

What it pins: one token per step through LeanDecodeState gives the logits of one full no-cache forward over
left-padded prompts + continuation (and of the generic KVCache stepper) within 1e-5, with biases and
Llama-3 RoPE scaling, before and after rows are dropped mid-generation; which models take the lean path.
"""

from __future__ import annotations

import pytest
import torch

from posttrain.models.hf_io import build_model
from posttrain.models.kv_cache import KVCache
from posttrain.models.lora import apply_lora
from posttrain.models.verify import TINY_CONFIGS
from posttrain.rl.fast_decode import LeanDecodeState, ModelDecodeState, lean_decode_supported

PAD = 0
LENS = (3, 17, 9, 12, 1, 20)
STEPS = 9


def _model(family: str, **overrides):
    torch.manual_seed(0)
    model, _ = build_model(family, {**TINY_CONFIGS[family], **overrides})
    with torch.no_grad():  # non-trivial norm weights and biases, so their handling is tested too
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.normal_(1.0 if "norm" in name else 0.0, 0.3)
    return model.eval()


def _inputs(num_steps: int = STEPS):
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 500, (n,), generator=gen).tolist() for n in LENS]
    L = max(LENS)
    pad = torch.tensor([L - n for n in LENS])
    ids = torch.tensor([[PAD] * (L - len(p)) + p for p in prompts])
    ids = torch.cat([ids, torch.randint(1, 500, (len(LENS), num_steps), generator=gen)], dim=1)
    cols = torch.arange(L + num_steps).expand(len(LENS), -1)
    return ids, (cols - pad[:, None]).clamp(min=0), (cols >= pad[:, None]).long(), L


def _prefill(model, ids, pos, doc, L, cache_len):
    cache = KVCache.for_model(model, ids.shape[0], cache_len)
    h = model(ids[:, :L], pos[:, :L], doc[:, :L], kv_cache=cache)[:, -1]
    return cache, h


@pytest.mark.parametrize(
    "family,overrides",
    [("qwen3", {}), ("llama3", {}), ("llama3", {"attention_bias": True, "mlp_bias": True})],
)
@torch.inference_mode()
def test_lean_step_logits_equal_full_forward_and_model_step(family, overrides):
    model = _model(family, **overrides)
    assert lean_decode_supported(model)
    ids, pos, doc, L = _inputs()
    full = model.logits(model(ids, pos, doc)).float()
    cache, _ = _prefill(model, ids, pos, doc, L, L)
    lean = LeanDecodeState(model, cache, L + STEPS, max_position=int(pos.max()))
    ref_cache, _ = _prefill(model, ids, pos, doc, L, L + STEPS)
    ref = ModelDecodeState(model, ref_cache)
    got, want = [], []
    for t in range(L, L + STEPS):
        got.append(model.logits(lean.step(ids[:, t], pos[:, t])).float())
        want.append(model.logits(ref.step(ids[:, t], pos[:, t])).float())
    got = torch.stack(got, dim=1)
    worst_full = (got - full[:, L:]).abs().max().item()  # NaN fails the comparison below
    worst_ref = (got - torch.stack(want, dim=1)).abs().max().item()
    assert worst_full <= 1e-5 and worst_ref <= 1e-5, (worst_full, worst_ref)
    assert lean.length == L + STEPS


@torch.inference_mode()
def test_lean_step_after_dropping_rows():
    """Rows dropped (and reordered) after 3 steps keep their logits; the skipped all-padding prefix moves
    once the longest prompt's row is gone."""
    model = _model("qwen3")
    ids, pos, doc, L = _inputs()
    full = model.logits(model(ids, pos, doc)).float()
    cache, _ = _prefill(model, ids, pos, doc, L, L)
    lean = LeanDecodeState(model, cache, L + STEPS, max_position=int(pos.max()))
    assert lean.first == 0  # the 20-token prompt has no padding
    rows = torch.arange(len(LENS))
    for t in range(L, L + STEPS):
        if t == L + 3:
            rows = torch.tensor([3, 0, 2])  # the 20-token row (5) leaves; 12-token row 3 first
            lean.select_rows(rows)
            assert lean.first == L - 12
        got = model.logits(lean.step(ids[rows, t], pos[rows, t])).float()
        assert (got - full[rows, t]).abs().max().item() <= 1e-5


def test_which_models_take_the_lean_path():
    assert lean_decode_supported(_model("qwen3")) and lean_decode_supported(_model("llama3"))
    for family in ("gemma3", "gpt_oss", "qwen3_moe"):  # other norms, sinks, windows, MoE
        assert not lean_decode_supported(_model(family)), family
    lora = _model("qwen3")
    apply_lora(lora, rank=2, alpha=4.0, dropout=0.0, targets=["attention"])
    assert not lean_decode_supported(lora)
    assert not lean_decode_supported(_model("qwen3").to(torch.float64))  # fp32 only
