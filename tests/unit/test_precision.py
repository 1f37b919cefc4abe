"""The precision policy in one process: parallelism.mixed_precision=bfloat16 over fp32 parameters computes
the forward in bf16 (autocast) while parameters, gradients and AdamW's moments stay fp32 (master
weights); the loss tracks the fp32 run within bf16's rounding. GRPO computes trainer, old/reference
log-probs and rollouts in that same precision, and its setup log-prob check passes under it."""

import json

import pytest
import torch
from helpers import ROOT, cli_run, job_config, make_trainer, tiny_model

from posttrain.config import ParallelismConfig
from posttrain.parallel.parallelize import autocast_dtype
from posttrain.parallel.world import World
from posttrain.train.setup import lm_loss_fn

# bf16 keeps 8 bits of mantissa (relative rounding 2^-9 ~ 0.2% per operation); over a 2-layer model's
# few dozen roundings the summed token loss moves by well under 1%. The bound below is 1%.
LOSS_RTOL = 0.01


def test_policy():
    bf16 = ParallelismConfig(mixed_precision="bfloat16")
    assert autocast_dtype("float32", bf16, World()) is torch.bfloat16
    assert autocast_dtype("float32", ParallelismConfig(), World()) is None  # fp32 compute
    assert autocast_dtype("bfloat16", bf16, World()) is None  # pure bf16: the parameters' own dtype
    assert autocast_dtype("float32", bf16, World(world_size=2)) is None  # FSDP's MixedPrecisionPolicy


def _batch(vocab: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, 32), generator=g)
    targets = torch.roll(ids, -1, 1)
    targets[:, -1] = -100
    pos = torch.arange(32).repeat(2, 1)
    return {"input_ids": ids, "position_ids": pos, "doc_ids": torch.zeros_like(ids), "targets": targets,
            "doc_lens": torch.tensor([32, 32])}  # fmt: skip


def _train(tmp_path, dtype, steps=4):
    model, _ = tiny_model()
    cfg = job_config(tmp_path, tmp_path / "unused.jsonl")
    trainer = make_trainer(model, lm_loss_fn(None, num_real_vocab=896), cfg, tmp_path, total_steps=steps)
    trainer.autocast_dtype = dtype
    losses = [trainer.train_step([_batch(896, s)])["loss"] for s in range(steps)]
    return model, trainer, losses


def test_bf16_compute_keeps_fp32_master_weights_and_tracks_the_fp32_loss(tmp_path):
    _, _, fp32 = _train(tmp_path / "a", None)
    model, trainer, bf16 = _train(tmp_path / "b", torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert {p.grad.dtype for p in model.parameters() if p.grad is not None} == {torch.float32}
    moments = [s[k] for s in trainer.optimizer.state.values() for k in ("exp_avg", "exp_avg_sq")]
    assert moments and {m.dtype for m in moments} == {torch.float32}
    for a, b in zip(fp32, bf16):
        assert b == pytest.approx(a, rel=LOSS_RTOL)
    assert bf16 != fp32  # the forward really ran in bf16


@pytest.mark.slow
def test_grpo_setup_check_passes_under_bf16_compute(tmp_path):
    """A from-scratch tiny policy (as tests/e2e/test_grpo.py), 2 steps with bf16 compute."""
    arch = (
        "model.arch={hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, num_attention_heads: 4, "
        "num_key_value_heads: 2, head_dim: 16}"
    )
    cli_run(
        ROOT / "configs/tiny/grpo.yaml",
        tmp_path,
        "model.path=null", arch, "tokenizer.path=builtin",
        "rl.rewards=[{kind: function, function: examples/rewards.py:digit_fraction}]",
        "training.max_steps=2", "training.eval_every_steps=0", "training.save_every_steps=0",
        "data.eval=null", "rl.prompts_per_step=4", "rl.group_size=4", "rl.max_new_tokens=6",
        "parallelism.mixed_precision=bfloat16", "metrics.progress=quiet",
    )  # fmt: skip
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    diffs = [r["mismatch/max_abs_logprob_diff"] for r in rows if "mismatch/max_abs_logprob_diff" in r]
    # trainer and engine both in bf16: they agree to bf16 rounding, far inside the 0.05 check
    assert diffs and max(diffs) < 0.05
