"""The GRPO controller in one process: weight-sync versions, the logprob setup check, packing
invariance of the loss, dealing micro-batches to ranks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from posttrain.config import validate_job
from posttrain.rl.controller import GRPOController, LogprobMismatchError
from posttrain.rl.engine import StaleWeightsError
from posttrain.rl.groups import LocalGroup, deal, undeal
from posttrain.rl.grpo import GRPOLossConfig, collate_episodes, grpo_loss_fn
from posttrain.rl.prompts import PromptStream
from posttrain.rl.types import Episode, SamplingParams
from posttrain.rl.workers import PolicyWorker, RewardWorker, RolloutWorker
from posttrain.train.setup import build_tokenizer

ROOT = Path(__file__).resolve().parents[2]


def job(tmp_path, **rl):
    tmp_path.mkdir(parents=True, exist_ok=True)
    reward = tmp_path / "varied_reward.py"
    reward.write_text("def varied(ctx):\n    return float(sum(ctx.completion_ids) % 7)\n")
    raw = {
        "recipe": "grpo",
        "output_dir": str(tmp_path / "run"),
        "model": {
            "family": "qwen3",
            "arch": {
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "head_dim": 16,
            },
        },
        "tokenizer": {"path": "builtin"},
        "data": {
            "train": {"path": str(ROOT / "data/tiny/rl_train.jsonl"), "format": "rl_prompt"},
            "max_tokens_per_pack": 128,
        },
        "optim": {"lr": 1e-3},
        "training": {"global_batch_size": 4, "micro_batch_size_per_device": 4, "max_steps": 3},
        "rl": {
            "prompts_per_step": 3,
            "group_size": 3,
            "max_new_tokens": 8,
            "rewards": [{"kind": "function", "function": f"{reward}:varied"}],
            **rl,
        },
    }
    return validate_job(raw)


def controller_for(cfg):
    tok = build_tokenizer(cfg.tokenizer)
    torch.manual_seed(0)
    policy = LocalGroup([PolicyWorker(cfg, total_steps=cfg.training.max_steps)])
    rollout = LocalGroup([RolloutWorker(cfg)])
    prompts = PromptStream(cfg.data, tok, seed=0, max_prompt_tokens=100)
    ctl = GRPOController(cfg, tok, policy, rollout, None, LocalGroup([RewardWorker(cfg)]), prompts)
    return ctl, policy.workers[0], rollout.workers[0]


def test_weight_sync_carries_a_version_the_engine_checks(tmp_path):
    ctl, policy, rollout = controller_for(job(tmp_path))
    ctl.sync_weights()
    assert ctl.version == 1 and rollout.engine.version == 1
    params = SamplingParams(max_new_tokens=2)
    with pytest.raises(StaleWeightsError):
        rollout.engine.generate([[1, 2, 3]], params, expected_version=0)
    before = {k: v.clone() for k, v in policy.model.state_dict().items()}
    metrics = ctl.step(1)
    assert metrics["weight_version"] == 2 and rollout.engine.version == 2
    # The update changed the policy, and the engine now holds exactly the policy's weights.
    after = policy.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in after)
    engine_sd = rollout.engine.model.state_dict()
    assert all(torch.equal(engine_sd[k], after[k]) for k in after)
    # A generate call that names an older version is refused, the current one works.
    with pytest.raises(StaleWeightsError, match="1"):
        rollout.generate(ctl.prompts.next(1), seed=0, version=1)
    assert len(rollout.generate(ctl.prompts.next(1), seed=0, version=2)) == 3


def test_setup_check_compares_trainer_and_engine_logprobs(tmp_path, capsys):
    ctl, policy, rollout = controller_for(job(tmp_path))
    ctl.sync_weights()
    metrics = ctl.step(1)
    printed = capsys.readouterr().out
    assert "setup check: max |trainer - engine| logprob" in printed
    assert metrics["mismatch/max_abs_logprob_diff"] <= 1e-4  # same weights, fp32: only kernel differences
    assert metrics["is_ratio/max"] == pytest.approx(1.0, abs=2e-4)

    # An engine whose weights differ from the trainer's (a broken sync) fails the check before any update.
    ctl2, policy2, rollout2 = controller_for(job(tmp_path / "b"))
    ctl2.sync_weights()
    with torch.no_grad():
        for p in rollout2.engine.model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    before = {k: v.clone() for k, v in policy2.model.state_dict().items()}
    with pytest.raises(LogprobMismatchError, match="rl.logprob_check_max_abs_diff=0.05"):
        ctl2.step(1)
    assert all(torch.equal(before[k], v) for k, v in policy2.model.state_dict().items())  # no update ran


def test_packed_episodes_give_the_unpacked_loss(tmp_path):
    """The loss and gradients of a rollout batch do not depend on how episodes are packed into rows."""
    torch.manual_seed(0)
    cfg = job(tmp_path)
    worker = PolicyWorker(cfg, total_steps=1)
    model = worker.model
    g = torch.Generator().manual_seed(0)
    episodes = []
    for i in range(5):
        n_p, n_c = 4 + i, 3 + (i * 2) % 5
        ids = torch.randint(5, 200, (n_p + n_c,), generator=g).tolist()
        lp = (-torch.rand(n_p + n_c, generator=g)).tolist()
        episodes.append(
            Episode(
                ids,
                [0] * n_p + [1] * n_c,
                lp,
                fields={
                    "advantages": [float(i) - 2.0] * (n_p + n_c),
                    "old_logprobs": [x + 0.1 for x in lp],
                },
            )
        )
    loss_fn = grpo_loss_fn(GRPOLossConfig(), num_real_vocab=worker.tokenizer.vocab_size)

    def loss_and_grads(row_len, rows_per_batch):
        model.zero_grad()
        batches = collate_episodes(
            episodes, 0, row_len, aggregation="sequence", max_new_tokens=8, rows_per_batch=rows_per_batch
        )
        total = sum(loss_fn(model, b)[0] for b in batches)
        total.backward()
        return float(total), [p.grad.clone() for p in model.parameters()], len(batches)

    packed, g_packed, n_packed = loss_and_grads(row_len=40, rows_per_batch=2)
    alone, g_alone, n_alone = loss_and_grads(row_len=16, rows_per_batch=1)
    assert n_packed < n_alone == 5
    assert abs(packed - alone) <= 1e-5
    assert max(float((a - b).abs().max()) for a, b in zip(g_packed, g_alone)) <= 1e-5


def test_deal_pads_ranks_to_equal_counts_and_undeal_restores_order():
    batches = [{"input_ids": torch.full((2, 8), i)} for i in range(5)]
    shares = deal(batches, 2, pad_id=0, row_len=8)
    assert [len(s) for s in shares] == [3, 3]
    assert int(shares[1][2]["targets"].ne(-100).sum()) == 0  # the padding micro-batch bears no loss
    results = [[int(b["input_ids"][0, 0]) for b in s] for s in shares]
    assert undeal(results, 5) == [0, 1, 2, 3, 4]
