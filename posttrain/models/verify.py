"""The logit verifier: proves our model definition computes what `transformers` computes, at real scales.

Three precisions, three questions (ref = transformers in fp64, the ground truth):
  * fp64, "same function?": ours in fp64 vs ref. Both run the same operations (transformers keeps some in
    fp32 even then: RMSNorm, the attention softmax, the RoPE tables; so do we), so any difference means an
    operation differs. Gate: max|ours - ref| <= FP64_REL_TOL (1e-9) x logit scale (max|ref|); identical
    code agrees to ~1e-15, while one fp32 rounding step in a different place already shows as ~1e-7.
  * fp32, "as accurate as transformers itself?": max|ours_fp32 - ref| <= 2 x max|hf_fp32 - ref| +
    FP32_FLOOR_REL (1e-6) x scale. An absolute bound cannot work: at SmolLM2's |logit| ~ 40,
    transformers' own fp32 logits are up to 1.7e-4 from its fp64 ones. The factor 2 leaves room for a different
    but equally good summation order; the floor (~8 fp32 ulps of the largest logit) covers models whose
    HF error happens to be tiny.
  * bf16, "as close to transformers as two bf16 runs can be?": per token, KL(hf_bf16 || ours_bf16) and
    top-1 agreement. If both err independently with the size of HF's own bf16 error e = KL(ref || hf_bf16),
    KL(hf || ours) ~ 2e in expectation; the gate allows 4e + BF16_KL_FLOOR. Likewise top-1 disagreement
    with HF is at most ~2x HF's own disagreement with ref; the gate allows 4x + 2% of the tokens + 3
    tokens (near-ties flip either way). Both load the same bf16-rounded weights, so the shared rounding
    keeps the measured KL(hf || ours) below the independent-error estimate (tiny models ~0.7e, SmolLM2
    ~1.4e). Max and mean |diff| are reported, not gated (they follow the logit scale and bf16's 2^-8 ulp).
Inputs (verify_inputs.py): real text through the checkpoint's tokenizer when it has one, random ids per
seed, and packed rows (several documents in one row, per-document positions and doc ids) whose pieces must
match transformers on each document alone, gated like the rows. MoE models must route every token to the
same experts in fp64. On failure the report names the first diverging module (verify_compare.py).

`verify_family` checks tiny random models (tied and untied) saved by us; `verify_dir` a real checkpoint.
CLI: `posttrain verify-model [--family F | --hf-dir DIR] [--seed N ...] [--no-bf16] [--device D] [--json]`
(exit code 0 = passed). `posttrain run` runs a short version on a checkpoint's first load (verify_on_load.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from posttrain.models import verify_compare as vc
from posttrain.models.hf_io import (
    FAMILIES,
    MODEL_TYPES,
    build_model,
    load_pretrained,
    read_checkpoint_config,
    save_pretrained,
)
from posttrain.models.verify_inputs import (
    QUICK_SIZES,
    REAL_SIZES,
    TINY_CONFIGS,
    TINY_SIZES,
    InputSizes,
    make_inputs,
    text_ids,
)

__all__ = ["QUICK_SIZES", "TINY_CONFIGS", "main", "verify_dir", "verify_family", "VerifyReport"]

FP64_REL_TOL = 1e-9  # fp64: max|ours - ref| / logit scale
FP32_HF_FACTOR = 2.0  # fp32: ours may be this many times as far from ref as transformers' fp32 is ...
FP32_FLOOR_REL = 1e-6  # ... plus this fraction of the logit scale
BF16_KL_FACTOR = 4.0  # bf16: mean KL(hf || ours) <= this x mean KL(ref || hf_bf16) + BF16_KL_FLOOR (nats)
BF16_KL_FLOOR = 1e-6
# bf16: top-1 disagreement with hf <= BF16_KL_FACTOR x hf's own + this fraction + BF16_TOP1_TOKENS tokens
# (a few near-ties, top-2 logits within bf16 noise, flip either way in a small sample)
BF16_TOP1_SLACK = 0.02
BF16_TOP1_TOKENS = 3

PACKED_DOC_LENS = TINY_SIZES.packed_doc_lens  # kept for tests that build the same packed row
_routing_mismatches = vc.routing_in_run  # kept for tests that check routing on their own forward


@dataclass
class VerifyReport:
    """Every number of one verification (max diffs are over all logits compared, in fp64)."""

    family: str
    seeds: list[int]
    num_tokens: int  # logit rows compared per implementation and precision
    logit_scale: float  # max |logit| of the reference (transformers in fp64)
    fp64_rel_diff: float  # max |ours_fp64 - ref| / logit_scale over the rows run as they are
    # the same for our packed rows vs ref on each document alone; reported, not gated: transformers' fp32
    # softmax sums a document's keys in another SIMD order when they sit elsewhere in a longer row (~1e-7)
    fp64_rel_diff_packed: float
    fp32_ours_err: float  # max |ours_fp32 - ref| (rows)
    fp32_hf_err: float  # max |hf_fp32 - ref| (rows): transformers' own fp32 error
    fp32_bound: float  # FP32_HF_FACTOR * fp32_hf_err + FP32_FLOOR_REL * logit_scale
    packed_ours_err: float  # max |ours_fp32 packed - ref alone|
    packed_hf_err: float  # max |hf_fp32 alone - ref alone|
    packed_bound: float
    max_abs_diff_logits: float  # max |ours_fp32 - hf_fp32| (rows); reported
    max_abs_diff_packed: float  # max |ours_fp32 packed - hf_fp32 alone|; reported
    routing_mismatches: int | None  # MoE, fp64: tokens routed to other experts than transformers' (gated: 0)
    routing_mismatches_fp32: int | None  # the same in fp32; reported (the fp32 logit gate covers its effect)
    bf16: dict[str, float] | None  # ours vs hf in bf16 (token_stats) + hf_* / ours_* vs ref, bounds
    gates: dict[str, bool] = field(default_factory=dict)
    passed: bool = False
    first_diverging: str | None = None  # e.g. "untied: layers.1.mlp.up_proj"; None when passed
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def format(self) -> str:
        status = "PASSED" if self.passed else "FAILED"
        mark = {k: "ok" if v else "FAIL" for k, v in self.gates.items()}
        lines = [
            f"verify-model {self.family}: {status}  (seeds {self.seeds}, {self.num_tokens} tokens, "
            f"logit scale {self.logit_scale:.3g}, {self.seconds:.1f}s)",
            f"  fp64 max |ours - ref| / scale:     {self.fp64_rel_diff:.3e}  packed {self.fp64_rel_diff_packed:.3e}"
            f"  (<= {FP64_REL_TOL:.0e}) [{mark.get('fp64', '-')}]",
            f"  fp32 max |ours - ref|:             {self.fp32_ours_err:.3e}  (transformers {self.fp32_hf_err:.3e};"
            f" bound {self.fp32_bound:.3e}) [{mark.get('fp32', '-')}]",
            f"  fp32 packed max |ours - ref|:      {self.packed_ours_err:.3e}  (transformers {self.packed_hf_err:.3e};"
            f" bound {self.packed_bound:.3e}) [{mark.get('fp32_packed', '-')}]",
            f"  max |logits diff| vs transformers: {self.max_abs_diff_logits:.3e}  (fp32; packed {self.max_abs_diff_packed:.3e})",
        ]
        if self.routing_mismatches is not None:
            lines.append(
                f"  MoE tokens routed differently:    {self.routing_mismatches} in fp64 (must be 0), "
                f"{self.routing_mismatches_fp32} in fp32 [{mark.get('routing', '-')}]"
            )
        if self.bf16 is not None:
            b = self.bf16
            lines.append(
                f"  bf16 vs transformers bf16:        KL mean {b['kl_mean']:.2e} (bound {b['kl_bound']:.2e}), top-1 "
                f"{b['top1_agreement']:.4f} (>= {b['top1_bound']:.4f}), max |diff| {b['max_abs_diff']:.3e}, "
                f"mean {b['mean_abs_diff']:.2e} [{mark.get('bf16', '-')}]"
            )
        if self.first_diverging is not None:
            lines.append(f"  first diverging module: {self.first_diverging}")
        return "\n".join(lines)


def _load_hf(path: Path, dtype: torch.dtype, device: str = "cpu") -> nn.Module:
    from transformers import AutoModelForCausalLM  # heavy import, only when verifying
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the report is the output; a per-load progress bar is noise
    # eager attention and experts: the plainest reference, independent of SDPA / grouped-GEMM kernels
    # (which also refuse fp64).
    kw: dict[str, Any] = {"attn_implementation": "eager"}
    config = json.loads((Path(path) / "config.json").read_text())
    if config.get("model_type") in ("qwen3_moe", "gpt_oss"):
        kw["experts_implementation"] = "eager"
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, **kw)
    return hf.to(device).eval()


def _load_ours(path: Path, dtype: torch.dtype, device: str = "cpu") -> nn.Module:
    model, _ = load_pretrained(path, dtype=dtype, device=device)
    return model.eval()


def _bf16_stats(ours: vc.Outputs, hf: vc.Outputs, ref: vc.Outputs, keys: list[str]) -> dict[str, float]:
    """token_stats of ours vs hf in bf16, HF's and ours' own vs ref, and the gate's bounds."""
    stats = vc.token_stats(hf.logits, ours.logits, keys)
    hf_own = vc.token_stats(ref.logits, hf.logits, keys)
    ours_own = vc.token_stats(ref.logits, ours.logits, keys)
    stats |= {f"hf_{k}_vs_ref": v for k, v in hf_own.items() if k in ("kl_mean", "top1_agreement")}
    stats |= {f"ours_{k}_vs_ref": v for k, v in ours_own.items() if k in ("kl_mean", "top1_agreement")}
    stats["kl_bound"] = BF16_KL_FACTOR * hf_own["kl_mean"] + BF16_KL_FLOOR
    disagree = (
        BF16_KL_FACTOR * (1 - hf_own["top1_agreement"]) + BF16_TOP1_SLACK + BF16_TOP1_TOKENS / stats["tokens"]
    )
    stats["top1_bound"] = max(0.0, 1 - disagree)
    return stats


def verify_dir(
    path: str | Path,
    seed: int | Sequence[int] = 0,
    *,
    sizes: InputSizes | None = None,
    bf16: bool = True,
    device: str = "cpu",
    family: str | None = None,
) -> VerifyReport:
    """Verify the checkpoint at `path`: ours (load_pretrained) vs transformers, both loaded from it.

    seed: one seed or several (their random and packed rows are stacked into one batch); sizes: tokens
    per kind of row (default REAL_SIZES, the text row stretched past any sliding window); bf16=False skips
    the bf16 check (the slowest on CPU)."""
    start = time.perf_counter()
    path = Path(path)
    seeds = [seed] if isinstance(seed, int) else list(seed)
    config, _, _ = read_checkpoint_config(path)
    family = family or _family_name(config)
    sizes = sizes or InputSizes.for_config(config, REAL_SIZES)
    inputs = make_inputs(
        config.vocab_size, sizes, tuple(seeds), text_ids(path, config.vocab_size, sizes.text_tokens)
    )
    rows, packed = list(inputs.rows), [f"packed.{i}" for i in range(len(inputs.docs))]

    def run(load: Callable, runner: Callable, dtype: torch.dtype) -> vc.Outputs:
        model = load(path, dtype, device)
        out = runner(model, inputs)
        del model  # one model in memory at a time
        return out

    ref = run(_load_hf, vc.run_hf, torch.float64)
    scale = max(t.abs().max().item() for t in ref.logits.values())
    o64 = run(_load_ours, vc.run_ours, torch.float64)
    h32, o32 = run(_load_hf, vc.run_hf, torch.float32), run(_load_ours, vc.run_ours, torch.float32)
    L = ref.logits
    r = VerifyReport(
        family=family,
        seeds=seeds,
        num_tokens=inputs.num_tokens(),
        logit_scale=scale,
        fp64_rel_diff=vc.max_abs(o64.logits, L, rows) / scale,
        fp64_rel_diff_packed=vc.max_abs(o64.logits, L, packed) / scale,
        fp32_ours_err=vc.max_abs(o32.logits, L, rows),
        fp32_hf_err=vc.max_abs(h32.logits, L, rows),
        fp32_bound=0.0,
        packed_ours_err=vc.max_abs(o32.logits, L, packed),
        packed_hf_err=vc.max_abs(h32.logits, L, packed),
        packed_bound=0.0,
        max_abs_diff_logits=vc.max_abs(o32.logits, h32.logits, rows),
        max_abs_diff_packed=vc.max_abs(o32.logits, h32.logits, packed),
        routing_mismatches=vc.routing_mismatches(o64.experts, ref.experts),
        routing_mismatches_fp32=vc.routing_mismatches(o32.experts, h32.experts),
        bf16=None,
    )
    del o64, o32, h32
    r.fp32_bound = FP32_HF_FACTOR * r.fp32_hf_err + FP32_FLOOR_REL * scale
    r.packed_bound = FP32_HF_FACTOR * r.packed_hf_err + FP32_FLOOR_REL * scale
    r.gates = {
        "fp64": r.fp64_rel_diff <= FP64_REL_TOL,
        "fp32": r.fp32_ours_err <= r.fp32_bound,
        "fp32_packed": r.packed_ours_err <= r.packed_bound,
    }
    if r.routing_mismatches is not None:
        r.gates["routing"] = r.routing_mismatches == 0
    if bf16:
        hb, ob = run(_load_hf, vc.run_hf, torch.bfloat16), run(_load_ours, vc.run_ours, torch.bfloat16)
        r.bf16 = _bf16_stats(ob, hb, ref, rows + packed)
        r.gates["bf16"] = (
            r.bf16["kl_mean"] <= r.bf16["kl_bound"] and r.bf16["top1_agreement"] >= r.bf16["top1_bound"]
        )
    r.passed = all(r.gates.values())
    if not r.passed:
        r.first_diverging = _locate(path, r, inputs, config, device)
    r.seconds = time.perf_counter() - start
    return r


def _locate(path: Path, r: VerifyReport, inputs: Any, config: Any, device: str) -> str:
    """The first diverging module for the first failed gate, in the order fp64, routing, fp32, packing,
    bf16 (each later check is only informative when the earlier ones pass)."""
    g = r.gates
    ids = next(iter(inputs.rows.values()))[:1]  # the text row when there is one (it comes first)
    if g["fp64"] and g.get("routing", True) and g["fp32"] and not g["fp32_packed"]:
        return "packing (attention mask or per-document positions)"
    if g["fp64"] and g.get("routing", True) and g["fp32"]:
        dtype, prefix, floor = torch.bfloat16, "bf16 only: ", 1e-2
    elif g["fp64"] and g.get("routing", True):
        dtype, prefix, floor = torch.float32, "fp32 only: ", FP32_FLOOR_REL
    else:
        dtype, prefix, floor = torch.float64, "", 0.0
    ours, hf = _load_ours(path, dtype, device), _load_hf(path, dtype, device)
    ref = None if dtype == torch.float64 else _load_hf(path, torch.float64, device)
    names = vc.hf_module_names(ours, _to_hf(config), config)
    where = vc.first_diverging(
        vc.Runs(ours, hf, ref), ids, config.num_hidden_layers, names, FP64_REL_TOL, floor
    )
    if g["fp64"] and not g.get("routing", True):
        where = f"MoE router (top-k experts differ; first diverging: {where})"
    return prefix + where


def _to_hf(config: Any) -> Callable[[dict, Any], dict]:
    return next(f[3] for f in FAMILIES.values() if type(config) is f[0])


def _family_name(config: Any) -> str:
    """`model.family`'s name for a config (llama3, qwen3_moe, ...)."""
    model_type = next(t for t, f in FAMILIES.items() if type(config) is f[0])
    return next(name for name, t in MODEL_TYPES.items() if t == model_type)


def verify_family(
    family: str = "qwen3",
    seed: int | Sequence[int] = 0,
    *,
    report_bf16: bool = True,
    device: str = "cpu",
    overrides: dict[str, Any] | None = None,
) -> VerifyReport:
    """Tiny random models (untied, then tied; new weights per seed), saved by us and verified as
    checkpoints; the worst numbers are reported and the first failure names its model ("tied: ...").

    overrides: TINY_CONFIGS fields to change (e.g. a longer context for a test)."""
    reports = []
    for s in [seed] if isinstance(seed, int) else seed:
        for tied in (False, True):
            torch.manual_seed(s)
            cfg = {**TINY_CONFIGS[family], **(overrides or {}), "tie_word_embeddings": tied}
            model, config = build_model(MODEL_TYPES[family], cfg)
            with tempfile.TemporaryDirectory() as tmp:
                save_pretrained(model, config, tmp)
                rep = verify_dir(tmp, s, sizes=TINY_SIZES, bf16=report_bf16, device=device, family=family)
            if rep.first_diverging is not None:
                rep.first_diverging = f"{'tied' if tied else 'untied'}: {rep.first_diverging}"
            reports.append(rep)
    out = _worst(reports)
    out.seeds = [seed] if isinstance(seed, int) else list(seed)
    return out


def _worst(reports: list[VerifyReport]) -> VerifyReport:
    """One report for several: the max of every error, the min of agreements, all gates and-ed."""
    out = dataclasses.replace(reports[0])
    for rep in reports[1:]:
        for f in dataclasses.fields(VerifyReport):
            a, b = getattr(out, f.name), getattr(rep, f.name)
            if isinstance(a, float) and f.name != "seconds":
                setattr(out, f.name, max(a, b))
        out.seconds += rep.seconds
        out.num_tokens += rep.num_tokens
        if rep.routing_mismatches is not None:
            out.routing_mismatches = (out.routing_mismatches or 0) + abs(rep.routing_mismatches)
            out.routing_mismatches_fp32 = (out.routing_mismatches_fp32 or 0) + abs(
                rep.routing_mismatches_fp32 or 0
            )
        if rep.bf16 is not None and out.bf16 is not None:
            worse_when_low = (
                "top1_agreement",
                "hf_top1_agreement_vs_ref",
                "ours_top1_agreement_vs_ref",
                "top1_bound",
            )
            out.bf16 = {k: (min if k in worse_when_low else max)(v, rep.bf16[k]) for k, v in out.bf16.items()}
        out.gates = {k: v and rep.gates.get(k, True) for k, v in out.gates.items()}
        out.first_diverging = out.first_diverging or rep.first_diverging
    out.passed = all(out.gates.values())
    return out


def main(argv: list[str]) -> int:
    """`posttrain verify-model`: print the report (or --json); exit code 0 when it passed, 1 otherwise."""
    parser = argparse.ArgumentParser(prog="posttrain verify-model", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--family", default="qwen3", choices=sorted(TINY_CONFIGS), help="model family to check"
    )
    parser.add_argument(
        "--hf-dir", default=None, help="verify this HF checkpoint directory instead of a tiny random model"
    )
    parser.add_argument(
        "--seed", type=int, nargs="+", default=[0], help="seeds for the random weights, ids and packed rows"
    )
    parser.add_argument("--no-bf16", action="store_true", help="skip the bf16 check (slow on CPU)")
    parser.add_argument("--device", default="cpu", help="torch device to run both implementations on")
    parser.add_argument("--json", action="store_true", help="print one JSON object with every number")
    args = parser.parse_args(argv)
    if args.hf_dir:
        report = verify_dir(args.hf_dir, args.seed, bf16=not args.no_bf16, device=args.device)
    else:
        report = verify_family(args.family, args.seed, report_bf16=not args.no_bf16, device=args.device)
    print(json.dumps(report.to_json()) if args.json else report.format())
    return 0 if report.passed else 1
