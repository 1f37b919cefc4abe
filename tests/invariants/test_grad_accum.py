"""1 micro-batch of 8 rows == 8 micro-batches of 1 row: the trainer normalises by the loss tokens
of the whole optimizer step, so how a step is split cannot change the update."""

import torch
from helpers import ROOT, job_config, make_trainer, tiny_model, tokenizer

from posttrain.data.labels import IGNORE
from posttrain.data.packing import collate
from posttrain.data.samples import load_samples
from posttrain.train.setup import lm_loss_fn


def _trainer(model, tmp_path, cfg):
    return make_trainer(model, lm_loss_fn(64, tokenizer().vocab_size), cfg, tmp_path, total_steps=3)


def test_one_by_eight_equals_eight_by_one(tmp_path):
    cfg = job_config(tmp_path, ROOT / "data/tiny/sft_train.jsonl")
    tok = tokenizer()
    samples, _ = load_samples(
        cfg.data.train.model_copy(update={"max_samples": 8}), tok, max_len=128, overlong="truncate"
    )
    rows = [[s] for s in samples[:8]]
    # Rows with very different loss-token counts: a per-micro-batch mean would weight them wrongly.
    assert len({sum(1 for y in r[0].labels if y != IGNORE) for r in rows}) > 1
    one = collate(rows, tok.pad_id, row_len=128)
    eight = [collate([r], tok.pad_id, row_len=128) for r in rows]

    results = []
    for micro in ([one], eight):
        model, _ = tiny_model(seed=1)
        trainer = _trainer(model, tmp_path, cfg)
        losses = [trainer.train_step(micro)["loss"] for _ in range(3)]
        results.append((losses, {k: v.detach().clone() for k, v in model.state_dict().items()}))
    (l1, p1), (l8, p8) = results
    for a, b in zip(l1, l8):
        assert abs(a - b) < 1e-5, (l1, l8)
    # Weights after 3 AdamW steps at lr 3e-3. Only fp32 summation order differs between the splits (the fused
    # loss scales its gradients after the chunk matmuls); Adam's m/sqrt(v) magnifies that for near-zero
    # gradients to ~1.5e-5 at most here, while a wrong normalisation moves weights by ~lr (3e-3).
    for k in p1:
        torch.testing.assert_close(p1[k], p8[k], rtol=0, atol=5e-5, msg=k)
    assert l1[2] < l1[0]  # and it learns


def test_mean_of_micro_means_would_differ(tmp_path):
    """Guard the test above: the naive per-micro-batch mean gives a different loss on this data."""
    cfg = job_config(tmp_path, ROOT / "data/tiny/sft_train.jsonl")
    tok = tokenizer()
    samples, _ = load_samples(
        cfg.data.train.model_copy(update={"max_samples": 8}), tok, max_len=128, overlong="truncate"
    )
    model, _ = tiny_model(seed=1)
    loss_fn = lm_loss_fn(64, tok.vocab_size)
    per = []
    for s in samples[:8]:
        b = collate([[s]], tok.pad_id, 128)
        with torch.no_grad():
            loss, _ = loss_fn(model, b)
        per.append((float(loss), int((b["targets"] != IGNORE).sum())))
    token_mean = sum(x for x, _ in per) / sum(n for _, n in per)
    mean_of_means = sum(x / n for x, n in per) / len(per)
    assert abs(token_mean - mean_of_means) > 1e-3
