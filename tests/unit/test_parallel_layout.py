"""Parallel layout arithmetic, activation checkpointing and row sharding, in one process."""

from __future__ import annotations

import pytest
import torch

from posttrain.config import ParallelismConfig
from posttrain.errors import ConfigError
from posttrain.parallel.parallelize import apply_activation_checkpointing, clip_grad_norm
from posttrain.parallel.world import plan_layout
from tests.helpers import tiny_model


def test_layout_resolves_the_shard_degree():
    lay = plan_layout(ParallelismConfig(tp=2), 8, num_heads=4, num_kv_heads=2)
    assert (lay.dp_replicate, lay.dp_shard, lay.tp, lay.dp) == (1, 4, 2, 4)
    lay = plan_layout(ParallelismConfig(dp_replicate=2, dp_shard=2), 4)
    assert (lay.dp_replicate, lay.dp_shard, lay.tp, lay.dp) == (2, 2, 1, 4)


@pytest.mark.parametrize(
    "par,world,message",
    [
        (ParallelismConfig(tp=3), 4, "world size 4 is not divisible by dp_replicate (1) x tp (3) = 3"),
        (
            ParallelismConfig(dp_shard=2, tp=2),
            8,
            "dp_replicate (1) x dp_shard (2) x tp (2) = 4, but the world size is 8",
        ),
        (ParallelismConfig(tp=4), 4, "parallelism.tp=4 does not divide the model's num_key_value_heads=2"),
        (ParallelismConfig(tp=0), 4, "parallelism.tp=0 must be >= 1"),
    ],
)
def test_bad_layouts_fail_with_the_arithmetic(par, world, message):
    with pytest.raises(ConfigError) as err:
        plan_layout(par, world, num_heads=4, num_kv_heads=2)
    assert message in str(err.value)


def _loss_and_grads(model):
    ids = torch.randint(0, 800, (2, 24), generator=torch.Generator().manual_seed(1))
    model.zero_grad()
    h = model(ids)
    loss = model.logits(h).logsumexp(-1).sum()
    loss.backward()
    return float(loss.detach()), {
        n.replace("._checkpoint_wrapped_module", ""): p.grad.clone() for n, p in model.named_parameters()
    }


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_changes_no_number_and_no_name(mode):
    plain, _ = tiny_model(num_hidden_layers=4)
    wrapped, _ = tiny_model(num_hidden_layers=4)
    n = apply_activation_checkpointing(wrapped, mode, every_n=2)
    assert n == (4 if mode == "full" else 2)
    assert list(wrapped.state_dict()) == list(plain.state_dict())  # checkpoints keep unified names
    loss_a, grads_a = _loss_and_grads(plain)
    loss_b, grads_b = _loss_and_grads(wrapped)
    assert loss_a == loss_b
    assert grads_a.keys() == grads_b.keys()
    assert all(torch.equal(grads_a[k], grads_b[k]) for k in grads_a)


def test_clip_grad_norm_matches_torch_on_plain_tensors():
    a, _ = tiny_model()
    b, _ = tiny_model()
    for m in (a, b):
        _loss_and_grads(m)
    ref = float(torch.nn.utils.clip_grad_norm_(list(a.parameters()), 0.5))
    ours = clip_grad_norm(list(b.parameters()), 0.5)
    assert abs(ours - ref) <= 1e-5 * ref
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-6, atol=1e-9)


def test_rows_sharding_splits_each_step_without_overlap(tmp_path):
    """dp ranks of one step together hold exactly the single-process rows of that step."""
    from posttrain.train.setup import build_tokenizer, make_loader
    from tests.helpers import ROOT, job_config

    cfg = job_config(tmp_path, ROOT / "data/tiny/sft_train.jsonl")
    cfg = cfg.model_copy(
        update={
            "training": cfg.training.model_copy(
                update={"global_batch_size": 8, "micro_batch_size_per_device": 2}
            )
        }
    )
    tok = build_tokenizer(cfg.tokenizer)

    def rows_of(loader, n):
        out = []
        for _ in range(n):
            b = loader.next_micro_batch()
            out += [tuple(r[r != tok.pad_id].tolist()) for r in b["input_ids"]]
        return out

    single = make_loader(cfg.data, cfg.training, tok, 0)
    want = rows_of(single, 2 * 4)  # 2 steps of 4 micro-batches
    ranks = [make_loader(cfg.data, cfg.training, tok, 0, rank=r, world_size=2) for r in range(2)]
    got_steps = [[rows_of(ld, 2) for ld in ranks] for _ in range(2)]  # per step: 2 micro-batches a rank
    for step, per_rank in enumerate(got_steps):
        assert per_rank[0] + per_rank[1] == want[step * 8 : (step + 1) * 8]
    assert (
        ranks[0].state_dict()["pipeline"]
        == ranks[1].state_dict()["pipeline"]
        == single.state_dict()["pipeline"]
    )
    for ld in (single, *ranks):
        ld.close()
