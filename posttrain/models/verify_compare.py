"""The measuring half of the logit verifier (verify.py): run both implementations, compare, locate.

`run_ours` / `run_hf` return every logit the verifier compares, keyed alike ("text", "random", and
"packed.{i}": our packed row's piece i vs transformers on document i alone), plus the MoE experts each
token was routed to. `gate` is the accuracy test used everywhere: ours must be as close to the fp64
reference as transformers is (or, with no lower-precision HF run to compare, within a relative
tolerance). `first_diverging` re-runs one row with forward hooks and names the first module whose input or
output fails that test: first by layer, then inside the first bad layer module by module, matching our
module names to HF's through the family's checkpoint key map.

Shape legend: B rows, T tokens per row, V vocabulary, N tokens (B*T), E experts, k experts per token.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from posttrain.models.verify_inputs import VerifyInputs

Tensors = dict[str, torch.Tensor]


@dataclass
class Outputs:
    """What one implementation computed: logits per key (kept in the run's dtype, on the CPU) and, for MoE
    models, the experts [N, k] chosen in each sparse layer for the rows (not the packed ones)."""

    logits: Tensors
    experts: list[torch.Tensor]


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def run_ours(model: nn.Module, inputs: VerifyInputs) -> Outputs:
    dev = _device(model)
    logits, experts = {}, []
    for key, ids in inputs.rows.items():
        logits[key] = model.logits(model(ids.to(dev))).cpu()
        experts += [
            m.last_expert_ids.cpu()
            for m in model.modules()
            if getattr(m, "last_expert_ids", None) is not None
        ]
    if inputs.docs:
        ids, positions, doc_ids = inputs.packed()
        packed = model.logits(model(ids.to(dev), positions.to(dev), doc_ids.to(dev))).cpu()
        start = 0
        for i, doc in enumerate(inputs.docs):
            logits[f"packed.{i}"] = packed[:, start : start + doc.shape[1]]
            start += doc.shape[1]
    return Outputs(logits, experts)


def _hook_hf_routers(hf: nn.Module, experts: list[torch.Tensor]) -> list:
    """HF's routers (`mlp.gate` in Qwen3-MoE, `mlp.router` in GPT-OSS) return (logits, weights, expert
    ids); append the ids of every call to `experts`. Returns the hook handles."""
    return [
        module.register_forward_hook(lambda _m, _i, out: experts.append(out[-1].cpu()))
        for name, module in hf.named_modules()
        if name.endswith((".mlp.gate", ".mlp.router")) and not isinstance(module, nn.Linear)
    ]


def routing_in_run(ours: nn.Module, hf: nn.Module, run: Callable[[], Any]) -> int | None:
    """routing_mismatches after `run()` has called ours and hf once each on the same ids."""
    hf_ids: list[torch.Tensor] = []
    hooks = _hook_hf_routers(hf, hf_ids)
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    ours_ids = [m.last_expert_ids for m in ours.modules() if getattr(m, "last_expert_ids", None) is not None]
    return routing_mismatches(ours_ids, hf_ids)


@torch.no_grad()
def run_hf(hf: nn.Module, inputs: VerifyInputs) -> Outputs:
    """HF on the same rows, its routing read through hooks (_hook_hf_routers)."""
    dev = _device(hf)
    logits: Tensors = {}
    experts: list[torch.Tensor] = []
    hooks = _hook_hf_routers(hf, experts)
    try:
        for key, ids in inputs.rows.items():
            logits[key] = hf(ids.to(dev)).logits.cpu()
    finally:
        for hook in hooks:
            hook.remove()
    for i, doc in enumerate(inputs.docs):
        logits[f"packed.{i}"] = hf(doc.to(dev)).logits.cpu()
    return Outputs(logits, experts)


def routing_mismatches(ours: list[torch.Tensor], hf: list[torch.Tensor]) -> int | None:
    """Tokens whose set of top-k experts differs in any sparse layer; None for dense models, -1 when the
    number of sparse layers differs (a structural mismatch)."""
    if not ours and not hf:
        return None
    if len(ours) != len(hf):
        return -1
    return sum(
        int((a.sort(dim=-1).values != b.reshape(a.shape).sort(dim=-1).values).any(dim=-1).sum())
        for a, b in zip(ours, hf)
    )


def max_abs(a: Tensors, b: Tensors, keys: list[str]) -> float:
    """max |a - b| over the given keys, computed in fp64."""
    return max((a[k].double() - b[k].double()).abs().max().item() for k in keys) if keys else 0.0


def gate(
    ours: torch.Tensor, ref: torch.Tensor, hf: torch.Tensor | None, rel_tol: float, floor: float
) -> bool:
    """Is `ours` accurate enough against the fp64 reference `ref`?

    With `hf` (transformers at ours' precision): max|ours - ref| <= 2 max|hf - ref| + floor * scale.
    Without: max|ours - ref| <= rel_tol * scale. scale = max|ref| (at least 1e-30)."""
    scale = max(ref.double().abs().max().item(), 1e-30)
    err = (ours.double() - ref.double()).abs().max().item()
    if hf is None:
        return err <= rel_tol * scale
    return err <= 2 * (hf.double() - ref.double()).abs().max().item() + floor * scale


# ------------------------------------------------------------------------------ bf16 statistics


@torch.no_grad()
def token_stats(p_logits: Tensors, q_logits: Tensors, keys: list[str]) -> dict[str, float]:
    """Per-token comparison of q against p over every logit row of `keys` (in fp64): max / mean |diff|,
    top-1 agreement (fraction of tokens whose argmax agrees) and KL(p || q) mean / max, in nats."""
    diffs, kls, agree, n, total_abs = [], [], 0, 0, 0.0
    for k in keys:
        p = p_logits[k].double().reshape(-1, p_logits[k].shape[-1])
        q = q_logits[k].double().reshape(-1, q_logits[k].shape[-1])
        d = (p - q).abs()
        diffs.append(d.max().item())
        total_abs += d.sum().item()
        logp, logq = p.log_softmax(-1), q.log_softmax(-1)
        kls.append((logp.exp() * (logp - logq)).sum(-1))
        agree += int((p.argmax(-1) == q.argmax(-1)).sum())
        n += p.shape[0]
    kl = torch.cat(kls).clamp(min=0)  # tiny negative values are rounding
    vocab = p_logits[keys[0]].shape[-1]
    return {
        "max_abs_diff": max(diffs),
        "mean_abs_diff": total_abs / (n * vocab),
        "top1_agreement": agree / n,
        "kl_mean": kl.mean().item(),
        "kl_max": kl.max().item(),
        "tokens": n,
    }


# ------------------------------------------------------------------------------ first diverging module


def _first_tensor(x: Any) -> torch.Tensor | None:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)) and x and isinstance(x[0], torch.Tensor):
        return x[0]
    return None


@torch.no_grad()
def capture(model: nn.Module, names: list[str], run: Callable[[], Any]) -> dict[str, tuple]:
    """(input, output) of each named module in its first call during run(), in firing order (CPU copies)."""
    modules = dict(model.named_modules())
    store: dict[str, tuple] = {}

    def hook(name: str) -> Callable:
        def fn(_m: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            if name not in store:  # HF passes some inputs by keyword (self_attn(hidden_states=...))
                x = _first_tensor(args) if args else _first_tensor(kwargs.get("hidden_states"))
                pair = (x, _first_tensor(out))
                store[name] = tuple(None if t is None else t.detach().cpu() for t in pair)

        return fn

    hooks = [modules[n].register_forward_hook(hook(n), with_kwargs=True) for n in names if n in modules]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return store


def hf_module_names(ours: nn.Module, to_hf: Callable[[dict, Any], dict], config: Any) -> dict[str, str]:
    """Our module name -> HF's, for every module that owns a parameter in the family's key map."""
    out = {}
    for name, param in ours.named_parameters():
        try:
            hf_names = list(to_hf({name: param}, config))
        except Exception:  # a name with no HF counterpart (added heads): nothing to compare it with
            continue
        if hf_names and "." in name:
            out[name.rsplit(".", 1)[0]] = hf_names[0].rsplit(".", 1)[0]
    return out


@dataclass
class Runs:
    """The models to compare on one row: ours and HF at the failing precision, and HF in fp64 (the
    reference) when that precision is lower; ref=None means ours and hf are both fp64."""

    ours: nn.Module
    hf: nn.Module
    ref: nn.Module | None


def _points(runs: Runs, ids: torch.Tensor, names: dict[str, str]) -> tuple[dict, dict, dict | None]:
    """Captured (input, output) per our module name, for ours, HF and the reference."""

    def on(model: nn.Module, which: list[str], keys: list[str]) -> dict:
        got = capture(model, which, lambda: model(ids.to(_device(model))))
        key_of = dict(zip(which, keys))
        return {key_of[w]: got[w] for w in got}  # firing order

    ours = on(runs.ours, list(names), list(names))
    hf = on(runs.hf, list(names.values()), list(names))
    ref = None if runs.ref is None else on(runs.ref, list(names.values()), list(names))
    return ours, hf, ref


def _align(o: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """`o` in `h`'s layout: as is, or with its dims permuted (HF applies Gemma's q/k norms to [B, H, T, Dh],
    we to [B, T, H, Dh]; the closest permutation wins when sizes repeat), or reshaped ([N, D] vs [B, T, D])."""
    if o.shape == h.shape:
        return o
    if o.dim() == h.dim():
        perms = [p for p in itertools.permutations(range(o.dim())) if o.permute(p).shape == h.shape]
        if perms:
            return min(
                (o.permute(p) for p in perms), key=lambda t: (t.double() - h.double()).abs().max().item()
            )
    return o.reshape(h.shape)


def _bad(
    o: torch.Tensor | None, h: torch.Tensor | None, r: torch.Tensor | None, tol: float, floor: float
) -> bool:
    if o is None or h is None or o.numel() != h.numel() or (r is not None and r.shape != h.shape):
        return False  # nothing comparable (a module whose call signature differs between the two)
    return (
        not gate(_align(o, h), h, None, tol, floor) if r is None else not gate(_align(o, h), r, h, tol, floor)
    )


def first_diverging(
    runs: Runs, ids: torch.Tensor, num_layers: int, all_names: dict[str, str], tol: float, floor: float
) -> str:
    """Name the first place where ours fails the gate on row `ids`, walking forward.

    Layer level first (layer 0's input is the embeddings, scale included); then, inside the first bad
    layer, every module with parameters in our firing order, input before output. A bad input with a good
    previous output means the parameter-free code between them (RoPE, mask, softmax, scale, activation,
    residual) differs."""
    layers = {f"layers.{i}": all_names.get(f"layers.{i}", f"model.layers.{i}") for i in range(num_layers)}
    layers["norm"] = all_names.get("norm", "model.norm")
    ours, hf, ref = _points(runs, ids, layers)
    bad_layer = None
    for name in layers:
        if name not in ours or name not in hf:
            continue
        o, h, r = ours[name], hf[name], None if ref is None else ref[name]
        if name == "layers.0" and _bad(o[0], h[0], r and r[0], tol, floor):
            return "tok_embeddings (embedding lookup or its scale)"
        if _bad(o[1], h[1], r and r[1], tol, floor):
            bad_layer = name
            break
    if bad_layer is None:
        return "lm_head / output weight (every layer and the final norm agree)"
    if bad_layer == "norm":
        return "norm (the final norm)"
    inner = {k: v for k, v in all_names.items() if k.startswith(bad_layer + ".")}
    ours, hf, ref = _points(runs, ids, inner)
    previous = f"the input of {bad_layer}"
    for name in ours:  # dicts keep firing order
        if name not in hf:
            continue
        o, h, r = ours[name], hf[name], None if ref is None else ref[name]
        if _bad(o[0], h[0], r and r[0], tol, floor):
            return f"{bad_layer}: between {previous} and {name} (parameter-free code: RoPE, mask, softmax, activation)"
        if _bad(o[1], h[1], r and r[1], tol, floor):
            return name
        previous = name
    return f"{bad_layer} (every module inside agrees: the residual adds)"
