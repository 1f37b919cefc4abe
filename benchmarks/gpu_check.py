"""One device check for one short GPU lease: every GPU path posttrain has, measured in one invocation.

GPU machines are lent rarely and briefly (about 15 minutes a session), so this script is made to run
once, end to end, in under ~8 minutes on one H100/H200, and to never spend a lease on a crash: each step
runs on its own (a failing step records its error and the next one runs), and `--dry-run` runs every
step with tiny shapes on the CPU (GPU-only measurements skipped with their reason). `make test` runs
the dry run (tests/unit/test_gpu_check.py).

Steps (results as one JSON file and a table):
  preflight       device, versions, a bf16 matmul's TFLOP/s (8192^3) against the spec sheet
  verify          verify-model for the five families on the device, fp32 and bf16 gates
  lm_head         forward + backward time of the LM head at vocab 151,669 / 151,680 / 151,936
                  (not a multiple of 64 / of 64 / of 128: why the vocabulary is padded)
  flex            FlexAttention vs SDPA for the five families on packed rows: logits, gradients
                  (CUDA only: torch has no CPU flex backward) and forward + backward time
  sft             training tokens/s and MFU of Qwen3-shaped ~0.6B and ~1.7B models (random init,
                  fp32 master weights, bf16 autocast, FlexAttention, chunked loss), packed rows
                  vs one document per row
  generation      our engine vs transformers `generate` at batch 64 (tokens/s), and the share of the
                  HBM roofline (weights + KV cache read once per decode step)
  recipes         `configs/tiny/sft.yaml` and a GRPO run from its export through the recipes with
                  training.device=auto: the one-process GPU path end to end, with GRPO's time split

The GPU machine has torch 2.11 and transformers 5.17 but no pydantic: carry its wheels (the device
README's recipe), e.g. `pip download --no-deps --only-binary=:all: --python-version 3.12 ... -d .whl
pydantic==2.14.3 pydantic_core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5`, then run
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \\
    PYTHONPATH=/tmp/site:. python3 benchmarks/gpu_check.py --out $OUT/gpu_check.json
and record the table in BENCHMARKS.md with the date and the device.

    .venv/bin/python benchmarks/gpu_check.py --dry-run [--out FILE]      # CPU, tiny shapes, ~1 minute
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

FAMILIES = ("llama3", "qwen3", "qwen3_moe", "gemma3", "gpt_oss")
VOCABS = (151_669, 151_680, 151_936)
HBM_BYTES_PER_S = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}
# Qwen3-0.6B and Qwen3-1.7B shapes (vocab 151,936, head_dim 128, GQA 16/8, tied embeddings).
QWEN3_SHAPES = {
    "qwen3-0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28),
    "qwen3-1.7b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28),
}
QWEN3_COMMON = dict(
    vocab_size=151_936, num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True
)
TINY = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
)  # fmt: skip


class Skip(Exception):
    """A step (or part of one) that cannot run here; the message is the reason."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device, reps: int, warmup: int = 1) -> float:
    """Best wall time of `reps` calls after `warmup` (seconds)."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(reps):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def preflight(device: torch.device, dry: bool) -> dict:
    import transformers

    out = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }
    n, dtype = (256, torch.float32) if dry else (8192, torch.bfloat16)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = _timed(lambda: a @ b, device, reps=3 if dry else 10, warmup=1 if dry else 3)
    out[f"matmul_{str(dtype).removeprefix('torch.')}_tflops"] = 2 * n**3 / seconds / 1e12
    return out


def verify(device: torch.device, dry: bool) -> dict:
    from posttrain.models.verify import verify_family

    out = {}
    # the dry run checks the step's plumbing on one family; the parity tests cover all five on CPU
    for family in ("qwen3",) if dry else FAMILIES:
        report = verify_family(family, seed=0, device=str(device))
        out[family] = {"passed": report.passed, **{k: v for k, v in report.to_json().items() if _is_num(v)}}
    out["all_passed"] = all(v["passed"] for v in out.values() if isinstance(v, dict))
    return out


def _is_num(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def lm_head(device: torch.device, dry: bool) -> dict:
    """LM head forward + backward (logits and both gradients) in bf16 on the device; fp32 on the CPU."""
    tokens, hidden = (64, 32) if dry else (8192, 2048)
    dtype = torch.float32 if dry else torch.bfloat16
    out = {}
    for vocab in VOCABS:
        rows = vocab // 100 if dry else vocab
        h = torch.randn(tokens, hidden, device=device, dtype=dtype, requires_grad=True)
        w = torch.randn(rows, hidden, device=device, dtype=dtype, requires_grad=True)

        def step(h=h, w=w):
            (h @ w.t()).sum().backward()

        out[f"vocab_{vocab}_ms"] = 1e3 * _timed(step, device, reps=3 if dry else 10)
    return out


def flex(device: torch.device, dry: bool) -> dict:
    """FlexAttention vs SDPA on packed rows for every family: logits and (on CUDA) gradients, and time."""
    from posttrain.models.hf_io import MODEL_TYPES, build_model
    from posttrain.models.verify import TINY_CONFIGS

    out = {}
    dtype = torch.float32 if dry else torch.bfloat16
    # the dry run checks the plumbing on a dense and a sinked family; tests/parity covers all five
    for family in ("qwen3", "gpt_oss") if dry else FAMILIES:
        torch.manual_seed(0)
        model, config = build_model(
            MODEL_TYPES[family], {**TINY_CONFIGS[family], "max_position_embeddings": 4096}
        )
        model = model.to(device=device, dtype=dtype)
        model.rebuild_buffers()
        rows, T = (2, 48) if dry else (4, 2048)
        batch, _ = _packed_batch(rows, T, config.vocab_size, device, packed=True)
        args = (batch["input_ids"], batch["position_ids"], batch["doc_ids"])
        results = {}
        for backend in ("sdpa", "flex"):
            model.attention_backend = backend
            model.zero_grad(set_to_none=True)
            if dry:  # no FlexAttention backward on a CPU
                with torch.no_grad():
                    results[backend] = (model.logits(model(*args)).float(), None)
                continue
            logits = model.logits(model(*args)).float()
            logits.square().mean().backward()
            grads = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])
            results[backend] = (logits.detach(), grads)
            out[f"{family}/{backend}_fwd_bwd_ms"] = 1e3 * _timed(
                lambda m=model, a=args: m.logits(m(*a)).float().square().mean().backward(), device, reps=3
            )
        (ref, ref_g), (got, got_g) = results["sdpa"], results["flex"]
        out[f"{family}/logits_rel_diff"] = ((got - ref).abs().max() / ref.abs().max()).item()
        if ref_g is not None:
            out[f"{family}/grads_rel_diff"] = ((got_g - ref_g).abs().max() / ref_g.abs().max()).item()
    return out


def _packed_batch(rows: int, row_len: int, vocab: int, device: torch.device, packed: bool, seed: int = 0):
    """[rows, row_len] ids with targets; packed rows hold documents of random lengths (per-document
    positions and doc ids), unpacked rows one document each. Returns (batch, doc_lens)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, row_len), generator=g)
    pos, doc, doc_lens = torch.empty_like(ids), torch.empty_like(ids), []
    for r in range(rows):
        lens = []
        while sum(lens) < row_len:
            n = int(torch.randint(row_len // 16, row_len // 2, (1,), generator=g)) if packed else row_len
            lens.append(min(n, row_len - sum(lens)))
        doc_lens += lens
        pos[r] = torch.cat([torch.arange(n) for n in lens])
        doc[r] = torch.cat([torch.full((n,), i) for i, n in enumerate(lens)])
    targets = torch.roll(ids, -1, dims=1)
    targets[:, -1] = -100
    batch = {"input_ids": ids, "position_ids": pos, "doc_ids": doc, "targets": targets}
    return {k: v.to(device) for k, v in batch.items()}, doc_lens


def sft(device: torch.device, dry: bool) -> dict:
    """Tokens/s and MFU of one optimizer step (fp32 master weights, bf16 autocast on CUDA)."""
    from posttrain.metrics.mfu import peak_flops
    from posttrain.models.flex import resolve_backend
    from posttrain.models.flops import train_flops
    from posttrain.models.hf_io import build_model
    from posttrain.parallel.parallelize import apply_compile
    from posttrain.train.setup import lm_loss_fn

    shapes = {"tiny": {}} if dry else QWEN3_SHAPES
    rows, row_len = (2, 64) if dry else (8, 4096)
    peak = peak_flops(None, device)
    out = {}
    for name, shape in shapes.items():
        model, config = build_model("qwen3", {**(TINY if dry else QWEN3_COMMON), **shape})
        model = model.to(device)
        model.rebuild_buffers()
        model.attention_backend = resolve_backend("auto", device)  # flex on CUDA
        if not dry:  # compile each block, as parallelism.compile does (inductor on a CPU is slow to build)
            apply_compile(model)
        out[f"{name}/compiled"] = not dry
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
        loss_fn = lm_loss_fn(None, num_real_vocab=config.vocab_size)
        for layout in ("packed", "one_doc_per_row"):
            batch, doc_lens = _packed_batch(rows, row_len, config.vocab_size, device, layout == "packed")

            def step(batch=batch, model=model, opt=opt, loss_fn=loss_fn):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    loss, _ = loss_fn(model, batch)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            seconds = _timed(step, device, reps=2 if dry else 5, warmup=1 if dry else 2)
            tokens = rows * row_len
            flops = train_flops(config, doc_lens)
            out[f"{name}/{layout}/tokens_per_s"] = tokens / seconds
            out[f"{name}/{layout}/mfu"] = flops / seconds / peak
        out[f"{name}/packed_vs_unpacked"] = (
            out[f"{name}/packed/tokens_per_s"] / out[f"{name}/one_doc_per_row/tokens_per_s"]
        )
        if device.type == "cuda":
            out[f"{name}/peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        del model, opt
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def generation(device: torch.device, dry: bool) -> dict:
    """Our engine vs transformers generate on the same weights: batch 64 (4 on a dry run), bf16 on CUDA."""
    from transformers import AutoModelForCausalLM

    from posttrain.models.hf_io import build_model, save_pretrained
    from posttrain.rl.engine import LocalEngine
    from posttrain.rl.types import SamplingParams

    dtype = torch.float32 if dry else torch.bfloat16
    batch, prompt_len, new = (4, 16, 8) if dry else (64, 128, 256)
    model, config = build_model(
        "qwen3", {**(TINY if dry else {**QWEN3_COMMON, **QWEN3_SHAPES["qwen3-0.6b"]})}
    )
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, config, tmp)
        hf = AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype).to(device).eval()
    model = model.to(device=device, dtype=dtype).eval()
    model.rebuild_buffers()
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, config.vocab_size, (batch, prompt_len), generator=g)
    engine = LocalEngine(model, pad_id=0, num_real_vocab=config.vocab_size, max_batch_size=batch)
    params = SamplingParams(max_new_tokens=new, temperature=1.0, seed=0)
    ours_s = _timed(lambda: engine.generate(prompts.tolist(), params), device, reps=1 if dry else 3)
    ids = prompts.to(device)

    def hf_generate():
        with torch.no_grad():
            hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, max_new_tokens=new,
                        min_new_tokens=new, use_cache=True, pad_token_id=0)  # fmt: skip

    hf_s = _timed(hf_generate, device, reps=1 if dry else 3)
    out = {
        "batch": batch,
        "new_tokens": new,
        "ours_tokens_per_s": batch * new / ours_s,
        "transformers_tokens_per_s": batch * new / hf_s,
    }
    out["ours_vs_transformers"] = out["ours_tokens_per_s"] / out["transformers_tokens_per_s"]
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        bw = next((v for k, v in HBM_BYTES_PER_S.items() if k in name), None)
        if bw:
            # one decode step reads every weight once and, on average, half the final KV cache
            weights = sum(p.numel() * p.element_size() for p in model.parameters())
            kv_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 2
            kv = batch * (prompt_len + new / 2) * kv_per_token
            roofline = batch * bw / (weights + kv)
            out["hbm_roofline_tokens_per_s"] = roofline
            out["ours_share_of_roofline"] = out["ours_tokens_per_s"] / roofline
    return out


def recipes(device: torch.device, dry: bool) -> dict:
    """configs/tiny/sft.yaml, then GRPO from its export, through the recipes on `device`."""
    from posttrain.config import load_job
    from posttrain.metrics.jsonl import read_jsonl
    from posttrain.recipes import grpo, sft

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        common = [f"training.device={device.type}", "metrics.progress=quiet", "training.save_every_steps=0"]
        steps = 3 if dry else 50
        cfg = load_job(
            REPO / "configs/tiny/sft.yaml",
            [f"output_dir={tmp}/sft", f"training.max_steps={steps}", "training.eval_every_steps=0", *common],
        )
        s = sft.train(cfg)
        out["sft_final_loss"] = s["final"]["loss"]
        out["sft_tokens_per_s"] = s["tokens_seen"] / max(s["wall_time_s"], 1e-9)
        hf = s["hf_dir"]
        cfg = load_job(
            REPO / "configs/tiny/grpo.yaml",
            [f"output_dir={tmp}/grpo", f"model.path={hf}", f"tokenizer.path={hf}", "training.max_steps=2",
             "training.eval_every_steps=0", "data.eval=null", *common,
             *(["rl.prompts_per_step=2", "rl.group_size=2", "rl.max_new_tokens=4"] if dry else [])],
        )  # fmt: skip
        g = grpo.train(cfg)
        out["grpo_steps"] = g["steps"]
        rows = [r for r in read_jsonl(Path(tmp) / "grpo" / "metrics.jsonl") if "time/generate_s" in r]
        for key in sorted({k for r in rows for k in r if k.startswith("time/")}):
            out[f"grpo_{key}"] = sum(r.get(key, 0.0) for r in rows) / len(rows)
        mismatch = [r["mismatch/max_abs_logprob_diff"] for r in rows if "mismatch/max_abs_logprob_diff" in r]
        if mismatch:
            out["grpo_max_logprob_mismatch"] = max(mismatch)
    return out


STEPS: dict[str, Callable[[torch.device, bool], dict]] = {
    "preflight": preflight,
    "verify": verify,
    "lm_head": lm_head,
    "flex": flex,
    "sft": sft,
    "generation": generation,
    "recipes": recipes,
}
GPU_ONLY: dict[str, str] = {}  # step -> reason it cannot run without a GPU (none today: all scale down)


def run(dry: bool, only: list[str] | None = None) -> dict:
    if not dry and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device (use --dry-run on a CPU)")
    device = torch.device("cpu") if dry else torch.device("cuda", 0)
    torch.manual_seed(0)
    results = {"date": time.strftime("%Y-%m-%d %H:%M"), "dry_run": dry, "steps": {}}
    for name, fn in STEPS.items():
        if only and name not in only:
            continue
        t = time.perf_counter()
        try:
            if dry and name in GPU_ONLY:
                raise Skip(GPU_ONLY[name])
            entry = {"status": "ok", **fn(device, dry)}
        except Skip as why:
            entry = {"status": "skipped", "reason": str(why)}
        except Exception as err:  # one broken step must not cost the rest of the lease
            entry = {
                "status": "error",
                "error": f"{type(err).__name__}: {err}",
                "trace": traceback.format_exc()[-3000:],
            }
        entry["seconds"] = time.perf_counter() - t
        results["steps"][name] = entry
        print(f"[gpu_check] {name}: {entry['status']} in {entry['seconds']:.1f}s", flush=True)
    return results


def print_table(results: dict) -> None:
    print(f"\ngpu_check {'(dry run, CPU, tiny shapes)' if results['dry_run'] else ''} {results['date']}")
    for name, entry in results["steps"].items():
        print(f"== {name}: {entry['status']} ({entry['seconds']:.1f}s)")
        for key, value in entry.items():
            if key in ("status", "seconds", "trace"):
                continue
            if isinstance(value, dict):
                value = ", ".join(f"{k}={_fmt(v)}" for k, v in value.items())
            print(f"   {key:<44} {_fmt(value)}")


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return str(v)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: proves the script runs")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--only", nargs="*", default=None, choices=sorted(STEPS), help="run these steps")
    args = parser.parse_args(argv)
    results = run(args.dry_run, args.only)
    print_table(results)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0 if all(e["status"] != "error" for e in results["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
