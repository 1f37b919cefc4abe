"""Peak memory and time of the LM-head loss, side by side: naive, posttrain's chunked loss, TRL's.

One forward + backward of the next-token cross-entropy from final hidden states `h` [tokens, hidden]
and the output weight `w` [vocab, hidden], with gradients w.r.t. both, every position a loss token:

  naive  `posttrain.train.losses.naive_cross_entropy`: full [tokens, vocab] logits, then
         `F.cross_entropy(reduction="sum")`.
  ours   `posttrain.train.losses.chunked_cross_entropy(chunk_size=--chunk-size)`: rows of h in chunks,
         fused linear + cross-entropy: each chunk's gradients are computed in forward (softmax - onehot
         in place), grad_w accumulated in one buffer with addmm_; backward only scales them.
  trl    `trl.kernels.ChunkedLogProbFunction` (TRL 1.16), the autograd function behind TRL's fused LM
         head (`trl.trainer.utils.add_fused_lm_head`, used by SFT/DPO/GRPO/KTO/RLOO trainers). It takes
         hidden states and the weight, never full logits: tiles of 4,096 tokens x `--trl-chunk-size`
         vocab columns (32,768, TRL's `_CHUNKED_LOGPROB_CHUNK_SIZE`), an online logsumexp in forward,
         tiles recomputed in backward. Called with `outputs=("log_probs",)`; loss = -sum(log_probs).
         Without Triton (any CPU) its tiles are folded by the torch fallbacks `_forward_tile` /
         `_backward_tile`, which allocate several tile-sized fp32 temporaries; on a GPU with Triton the
         fold happens in place, so its CPU memory is not its GPU memory.

Method. Each variant runs in a fresh subprocess (`--_worker`), so no allocator cache or high-water
mark carries over. The worker allocates the inputs, runs the
loss once on tiny inputs (loads code pages, starts threads), then resets the kernel's peak-RSS counter
(writing "5" to /proc/self/clear_refs resets VmHWM to the current RSS) and records the RSS as the
baseline; "peak extra" is max VmHWM over all calls minus that baseline, read from /proc/self/status.
RSS counts pages actually touched, which is what torch's CPU allocator (malloc; big blocks are mmap'd
and returned on free) costs the machine. Where clear_refs is not writable it falls back to
`ru_maxrss` minus the same baseline. The gradients themselves (grad_h + grad_w, fp32) are part of the
peak for every variant; the table also shows peak minus their size ("work").
Time is the median wall time of `--reps` calls after `--warmup` calls (forward + backward).

Agreement. Each worker saves its loss and gradients; the parent compares them with naive's: loss to
rel 1e-5, gradients to max|diff| <= 1e-4 * max|naive grad|. It exits 1 if any disagree.

    .venv/bin/python benchmarks/loss_memory.py [--tokens 4096] [--vocab 151936] [--hidden 1024]
        [--chunk-size N (default auto)] [--trl-chunk-size 32768] [--reps 2] [--warmup 1] [--threads N]
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

VARIANTS = ("naive", "ours", "trl")
LOSS_RTOL = 1e-5  # relative loss agreement with naive
GRAD_RTOL = 1e-4  # max|grad - naive grad| relative to max|naive grad|
MIB = 2**20


# ---------------------------------------------------------------- worker (one variant, fresh process)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _loss_fn(variant: str, args: argparse.Namespace):
    """A function (h_BTD, w_VD, targets_BT) -> summed loss, for one variant."""
    from posttrain.train.losses import chunked_cross_entropy, naive_cross_entropy

    if variant == "naive":
        return lambda h, w, t: naive_cross_entropy(h, w, t)[0]
    if variant == "ours":
        return lambda h, w, t: chunked_cross_entropy(h, w, t, chunk_size=args.chunk_size)[0]
    from trl.kernels import ChunkedLogProbFunction

    def trl_loss(h, w, t):
        # Positional args: hidden, weight, bias, targets, temperature, vocab chunk, softcap, logit_scale, outputs
        logprobs = ChunkedLogProbFunction.apply(
            h.reshape(-1, h.shape[-1]),
            w,
            None,
            t.reshape(-1),
            1.0,
            args.trl_chunk_size,
            None,
            1.0,
            ("log_probs",),
        )[0]
        return -logprobs.sum()

    return trl_loss


def worker(args: argparse.Namespace) -> None:
    variant, out = args._worker, Path(args._out)
    loss_fn = _loss_fn(variant, args)  # imports (trl is heavy) happen before the baseline
    gen = torch.Generator().manual_seed(0)
    # Post-norm hidden states ~ N(0, 1); weight at the usual 0.02 init; random targets.
    h = torch.randn(1, args.tokens, args.hidden, generator=gen).requires_grad_()
    w = (torch.randn(args.vocab, args.hidden, generator=gen) * 0.02).requires_grad_()
    t = torch.randint(0, args.vocab, (1, args.tokens), generator=gen)
    # Prime on tiny inputs first: the first call loads code pages of torch's libraries, starts the
    # autograd and OpenMP threads and fills small caches; that RSS is not the loss's memory.
    small_v = min(args.vocab, 2048)
    loss_fn(
        h[:, :64].detach().requires_grad_(), w[:small_v].detach().requires_grad_(), t[:, :64] % small_v
    ).backward()
    gc.collect()

    exact = _reset_peak_rss()
    base_kib = _status_kib("VmRSS") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak_kib, times, loss = base_kib, [], None
    for i in range(args.warmup + args.reps):
        h.grad = w.grad = None
        start = time.perf_counter()
        loss = loss_fn(h, w, t)
        loss.backward()
        elapsed = time.perf_counter() - start
        peak_kib = max(
            peak_kib, _status_kib("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        )
        if i >= args.warmup:
            times.append(elapsed)
    torch.save({"loss": loss.detach(), "h_grad": h.grad, "w_grad": w.grad}, out / f"{variant}.pt")
    result = {
        "variant": variant,
        "peak_extra_mib": (peak_kib - base_kib) / 1024,
        "times_s": times,
        "loss": loss.item(),
        "rss_method": "VmHWM after clear_refs" if exact else "ru_maxrss",
    }
    (out / f"{variant}.json").write_text(json.dumps(result))


# ---------------------------------------------------------------- parent: run, compare, report


def run_variant(variant: str, args: argparse.Namespace, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--_worker", variant, "--_out", str(out)]
    for name in ("tokens", "vocab", "hidden", "chunk_size", "trl_chunk_size", "reps", "warmup", "threads"):
        if getattr(args, name) is not None:
            cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    print(f"  running {variant} ...", flush=True)
    subprocess.run(cmd, check=True)
    return json.loads((out / f"{variant}.json").read_text())


def compare(out: Path) -> tuple[bool, list[str]]:
    """Loss and gradients of every variant against naive's."""
    ref = torch.load(out / "naive.pt")
    ok, lines = True, []
    for variant in VARIANTS[1:]:
        got = torch.load(out / f"{variant}.pt")
        rel = abs(got["loss"].item() - ref["loss"].item()) / abs(ref["loss"].item())
        row_ok = rel <= LOSS_RTOL
        parts = [f"{variant} vs naive: loss rel diff {rel:.2e} (<= {LOSS_RTOL:g})"]
        for name in ("h_grad", "w_grad"):
            diff = (got[name] - ref[name]).abs().max().item()
            scale = ref[name].abs().max().item()
            row_ok &= diff <= GRAD_RTOL * scale
            parts.append(f"{name} max|diff| {diff:.2e} (max|ref| {scale:.2e})")
        lines.append(("OK   " if row_ok else "FAIL ") + ", ".join(parts))
        ok &= row_ok
        del got
    return ok, lines


def auto_chunk(vocab: int) -> int:
    """The rows per chunk chunked_cross_entropy picks when chunk_size is None."""
    from posttrain.train.losses import AUTO_CHUNK_BYTES

    return max(64, AUTO_CHUNK_BYTES // (4 * vocab))


def report(args: argparse.Namespace, results: dict[str, dict]) -> None:
    grads_mib = (args.tokens + args.vocab) * args.hidden * 4 / MIB
    logits_mib = args.tokens * args.vocab * 4 / MIB
    print(
        f"\n[tokens] {args.tokens}  [vocab] {args.vocab}  [hidden] {args.hidden}  fp32 CPU, "
        f"threads {torch.get_num_threads() if args.threads is None else args.threads}, "
        f"ours chunk {args.chunk_size or f'auto ({auto_chunk(args.vocab)} rows)'}, "
        f"trl vocab chunk {args.trl_chunk_size}"
    )
    print(
        f"one fp32 [tokens, vocab] logits = {logits_mib:,.0f} MiB; grad_h + grad_w = {grads_mib:,.0f} MiB "
        f"(in every variant's peak); RSS via {results['naive']['rss_method']}"
    )
    naive = results["naive"]
    naive_time = statistics.median(naive["times_s"])
    print(
        f"\n{'variant':<8}{'peak extra MiB':>16}{'work MiB':>10}{'time s':>9}{'loss':>16}"
        f"{'mem/naive':>11}{'time/naive':>12}"
    )
    for variant in VARIANTS:
        r = results[variant]
        med = statistics.median(r["times_s"])
        print(
            f"{variant:<8}{r['peak_extra_mib']:>16,.0f}{r['peak_extra_mib'] - grads_mib:>10,.0f}{med:>9.2f}"
            f"{r['loss']:>16.4f}{r['peak_extra_mib'] / naive['peak_extra_mib']:>11.3f}"
            f"{med / naive_time:>12.2f}"
        )
    ours, trl = results["ours"], results["trl"]
    ours_time = statistics.median(ours["times_s"])
    print("\ngoals:")
    print(
        f"  ours peak <= naive/10 : {ours['peak_extra_mib'] <= naive['peak_extra_mib'] / 10}  "
        f"({ours['peak_extra_mib']:,.0f} vs {naive['peak_extra_mib'] / 10:,.0f} MiB)"
    )
    print(
        f"  ours peak <= trl peak : {ours['peak_extra_mib'] <= trl['peak_extra_mib']}  "
        f"({ours['peak_extra_mib']:,.0f} vs {trl['peak_extra_mib']:,.0f} MiB)"
    )
    print(f"  ours time <= naive    : {ours_time <= naive_time}  ({ours_time:.2f} vs {naive_time:.2f} s)")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=4096, help="loss tokens (rows of h)")
    p.add_argument("--vocab", type=int, default=151_936, help="vocabulary size (Qwen3: 151,936)")
    p.add_argument("--hidden", type=int, default=1024, help="hidden size (Qwen3-0.6B: 1,024)")
    p.add_argument(
        "--chunk-size", type=int, default=None, help="rows per chunk in posttrain's loss (default: auto)"
    )
    p.add_argument("--trl-chunk-size", type=int, default=32_768, help="vocab columns per tile in TRL's loss")
    p.add_argument("--reps", type=int, default=2, help="timed calls per variant (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls before the timed ones")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--_worker", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--_out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.reps < 1:
        p.error("--reps must be >= 1")
    return args


def main() -> int:
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args._worker:
        worker(args)
        return 0
    out = Path(tempfile.mkdtemp(prefix="loss_memory_"))
    try:
        results = {variant: run_variant(variant, args, out) for variant in VARIANTS}
        ok, lines = compare(out)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    report(args, results)
    print("\nagreement with naive:")
    for line in lines:
        print("  " + line)
    if not ok:
        print("values disagree: exit 1")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
