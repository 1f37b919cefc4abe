"""Generation tokens/s, side by side: posttrain's LocalEngine against `transformers` `generate`.

Both sides run the same weights: a from-scratch Qwen3 (hidden 256, 6 layers, 8 query / 4 kv heads, the
builtin tokenizer's vocabulary; 5.2M parameters) is written once with posttrain's HF export and loaded
back with `AutoModelForCausalLM`. Same prompts (random token ids, lengths uniform in [20, 60], seeded),
same sampling settings (temperature 1, top_p 0.9, top_k off, max_new_tokens 64, KV cache on both sides,
all rows in one batch), fp32 on CPU, same torch threads. Four workloads of 64 rows each:

  distinct         64 different prompts, one sample each, no stop token: every row is 64 tokens long.
  grpo 8x8         8 prompts x 8 samples (GRPO's shape; transformers' num_return_sequences), no stop token.
  stops            the 64 prompts with every 20th token id as a stop id (transformers' eos_token_id list),
                   so rows end at different lengths, as RL responses do; a row's tokens count up to its stop.
  grpo 8x8 stops   both: 8 prompts x 8 samples that end at their first stop id, what a GRPO rollout is.

  posttrain      `posttrain.rl.engine.LocalEngine.generate`: prompts prefilled in groups of similar length
                 (one prefill per prompt, shared by its samples) into a preallocated KV cache, then one
                 token per step through the lean decode step (posttrain/rl/fast_decode.py), stopped rows
                 dropped from the batch; also returns per-token log-probs.
  transformers   `model.generate(do_sample=True, use_cache=True, ...)` on left-padded input with an
                 attention mask (its dynamic cache, SDPA attention); finished rows are padded, not dropped.

Before timing anything the script checks that the two compute the same model: logits of one batch agree
within 1e-4 and greedy continuations of 8 prompts (16 tokens) are identical. Tokens/s counts generated
tokens (prompts excluded) over the wall time of the whole generate call, prefill included. Each side is
warmed up once, then timed `--reps` times per workload, alternating sides; the best run of each is
reported (the machine is shared: the minimum is the least disturbed). Exits 1 when a check fails.

    .venv/bin/python benchmarks/generation.py [--reps 3] [--threads 1]     # ~2 minutes on 2 busy cores
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from posttrain.data.tokenizer import Tokenizer  # noqa: E402
from posttrain.models.hf_io import build_model, save_pretrained  # noqa: E402
from posttrain.rl.engine import LocalEngine  # noqa: E402
from posttrain.rl.types import SamplingParams

ARCH = dict(
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=6,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=32,
    tie_word_embeddings=False,
    max_position_embeddings=512,
)
LOGITS_ATOL = 1e-4


def _prompts(n: int, lo: int, hi: int, vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi + 1, (n,), generator=gen).tolist()
    return [torch.randint(0, vocab, (k,), generator=gen).tolist() for k in lens]


def _left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (L - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def _hf_generate(
    hf,
    prompts,
    pad_id: int,
    max_new_tokens: int,
    *,
    sample: bool,
    top_p: float,
    seed: int,
    n: int = 1,
    stops=(),
) -> list[list[int]]:
    """New tokens of each sample from transformers' generate, prompt-major, each cut after its first stop id
    (transformers pads a finished row until the whole batch is done; those pads are not counted)."""
    from transformers import GenerationConfig

    ids, mask = _left_pad(prompts, pad_id)
    config = GenerationConfig(
        do_sample=sample,
        temperature=1.0 if sample else None,
        top_p=top_p if sample else None,
        top_k=0 if sample else None,  # 0 = off (the default would be 50)
        max_new_tokens=max_new_tokens,
        num_return_sequences=n,
        eos_token_id=list(stops) or None,
        pad_token_id=pad_id,
        use_cache=True,
    )
    torch.manual_seed(seed)
    with torch.inference_mode():
        out = hf.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    rows = []
    for row in out[:, ids.shape[1] :].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
        rows.append(row[:cut])
    return rows


def _checks(ours, hf, engine: LocalEngine, prompts, pad_id: int) -> list[str]:
    """Same model on both sides: batch logits, then greedy continuations. Returns failures."""
    failures = []
    ids, mask = _left_pad(prompts[:8], pad_id)
    with torch.inference_mode():
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        ours_logits = ours.logits(ours(ids, pos, mask)).float()
        hf_logits = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float()
    diff = (ours_logits - hf_logits).abs().amax(-1)[mask.bool()].max().item()
    print(f"check: max |logits diff| ours vs transformers on real tokens = {diff:.2e} (<= {LOGITS_ATOL:.0e})")
    if diff > LOGITS_ATOL:
        failures.append(f"logits differ by {diff:.2e}")
    greedy = SamplingParams(max_new_tokens=16, temperature=0.0)
    ours_greedy = [r.token_ids for r in engine.generate(prompts[:8], greedy)]
    hf_greedy = _hf_generate(hf, prompts[:8], pad_id, 16, sample=False, top_p=1.0, seed=0)
    same = ours_greedy == hf_greedy
    print(f"check: greedy continuations of 8 prompts x 16 tokens identical: {same}")
    if not same:
        failures.append("greedy continuations differ")
    return failures


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--min-prompt-len", type=int, default=20)
    ap.add_argument("--max-prompt-len", type=int, default=60)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--grpo-samples", type=int, default=8, help="samples per prompt in the grpo workload")
    ap.add_argument("--stop-share", type=float, default=0.05, help="share of the vocabulary that stops a row")
    ap.add_argument("--reps", type=int, default=3, help="timed runs per side and workload, after a warm-up")
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads, both sides (1: no oversubscription)"
    )
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    tokenizer = Tokenizer.from_dir("builtin")
    vocab, pad_id = tokenizer.vocab_size, tokenizer.pad_id
    torch.manual_seed(args.seed)
    ours, config = build_model("qwen3", {"vocab_size": vocab, **ARCH})
    ours.eval()
    n_params = sum(p.numel() for p in ours.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(ours, config, Path(tmp))
        hf = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    engine = LocalEngine(ours, pad_id=pad_id, num_real_vocab=vocab, max_batch_size=args.num_prompts)
    prompts = _prompts(args.num_prompts, args.min_prompt_len, args.max_prompt_len, vocab, args.seed)
    load = os.getloadavg()[0]
    print(
        f"model: qwen3 {n_params / 1e6:.1f}M params ({ARCH['num_hidden_layers']} layers, hidden "
        f"{ARCH['hidden_size']}, vocab {vocab}), fp32 CPU, torch {torch.__version__}, {args.threads} threads, "
        f"1-min load {load:.1f}"
    )
    print(
        f"prompts: {args.num_prompts} of {args.min_prompt_len}-{args.max_prompt_len} tokens; sampling: at most "
        f"{args.max_new_tokens} new tokens, temperature 1.0, top_p {args.top_p}, top_k off; {args.num_prompts} rows"
    )
    failures = _checks(ours, hf, engine, prompts, pad_id)
    if failures:
        print("FAILED checks:", "; ".join(failures))
        return 1

    # (name, prompts, samples per prompt, stop ids): args.num_prompts rows each.
    grpo_prompts = prompts[: args.num_prompts // args.grpo_samples]
    every = round(1 / args.stop_share)
    stop_ids = tuple(range(1, vocab, every))  # ~stop_share of the vocabulary
    workloads = [
        ("distinct", prompts, 1, ()),
        (f"grpo {len(grpo_prompts)}x{args.grpo_samples}", grpo_prompts, args.grpo_samples, ()),
        ("stops", prompts, 1, stop_ids),
        (f"grpo {len(grpo_prompts)}x{args.grpo_samples} stops", grpo_prompts, args.grpo_samples, stop_ids),
    ]
    print(f"stops workload: {len(stop_ids)} stop ids (every {every}th id), so rows end at different lengths")
    w_all = 6 * args.reps + 2  # width of the column listing every timed run
    print(
        f"\n{'workload':<16}{'side':<14}{'tokens':>8}{'mean len':>9}{'best s':>8}{'all s':>{w_all}}{'tokens/s':>10}"
    )
    ratios = {}
    for i, (name, wprompts, n, stops) in enumerate(workloads):
        params = SamplingParams(
            max_new_tokens=args.max_new_tokens, temperature=1.0, top_p=args.top_p, stop_ids=stops, n=n, seed=1
        )
        times: dict[str, list[float]] = {"posttrain": [], "transformers": []}
        rate: dict[str, float] = {}
        count: dict[str, int] = {}
        for rep in range(args.reps + (i == 0)):  # the first workload's first round warms both sides up
            for side in times:  # alternate sides, so a load change on the shared machine hits both
                start = time.perf_counter()
                if side == "posttrain":
                    tokens = [r.token_ids for r in engine.generate(wprompts, params)]
                else:
                    tokens = _hf_generate(hf, wprompts, pad_id, args.max_new_tokens, sample=True,
                                          top_p=args.top_p, seed=1, n=n, stops=stops)  # fmt: skip
                elapsed = time.perf_counter() - start
                if len(tokens) != len(wprompts) * n or max(map(len, tokens)) > args.max_new_tokens:
                    print(f"FAILED: {side} returned {len(tokens)} rows, longest {max(map(len, tokens))}")
                    return 1
                if not (i == 0 and rep == 0):
                    times[side].append(elapsed)
                    count[side] = sum(map(len, tokens))  # the same every rep (seeded)
                    rate[side] = max(rate.get(side, 0.0), count[side] / elapsed)
        for side, ts in times.items():
            all_s = " ".join(f"{t:.2f}" for t in ts)
            mean_len = count[side] / (len(wprompts) * n)
            print(
                f"{name:<16}{side:<14}{count[side]:>8}{mean_len:>9.1f}{min(ts):>8.2f}{all_s:>{w_all}}{rate[side]:>10.0f}"
            )
        ratios[name] = rate["posttrain"] / rate["transformers"]
    print()
    for name, ratio in ratios.items():
        verdict = "met" if ratio >= 2 else "NOT met"
        print(f"posttrain / transformers tokens/s, {name}: {ratio:.2f}x (goal >= 2x: {verdict})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
