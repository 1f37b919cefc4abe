import math

import pytest
import torch
from helpers import ROOT, job_config, make_trainer, tiny_model, tokenizer

from posttrain.config import ScheduleConfig
from posttrain.data.packing import collate
from posttrain.data.samples import load_samples
from posttrain.train.optim import lr_at
from posttrain.train.trainer import NonFiniteError


def _batch(tmp_path, n=2):
    tok = tokenizer()
    cfg = job_config(tmp_path, ROOT / "data/tiny/sft_train.jsonl")
    samples, _ = load_samples(
        cfg.data.train.model_copy(update={"max_samples": n}), tok, max_len=128, overlong="drop"
    )
    return cfg, collate([[s] for s in samples], tok.pad_id, 128)


def test_nonfinite_steps_are_skipped_counted_then_abort(tmp_path):
    cfg, batch = _batch(tmp_path)
    model, _ = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def nan_loss(model, batch):
        h = model(batch["input_ids"])
        return h.sum() * float("nan"), {}

    training = cfg.training.model_copy(update={"max_nonfinite_steps": 2})
    trainer = make_trainer(model, nan_loss, cfg, tmp_path, total_steps=5, training=training)
    first = trainer.train_step([batch])
    assert first["skipped_nonfinite"] == 1 and trainer.state.nonfinite_steps == 1
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # no update applied
    with pytest.raises(NonFiniteError, match="2 steps had a non-finite loss"):
        trainer.train_step([batch])


def test_schedules():
    cos = ScheduleConfig(kind="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, 100, 1.0, cos) == pytest.approx(0.1)
    assert lr_at(9, 100, 1.0, cos) == pytest.approx(1.0)
    assert lr_at(55, 100, 1.0, cos) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(100, 100, 1.0, cos) == pytest.approx(0.1)
    wsd = ScheduleConfig(kind="wsd", warmup_steps=0, min_lr_ratio=0.0, decay_fraction=0.2)
    assert [lr_at(s, 10, 1.0, wsd) for s in (0, 7, 8, 9)] == pytest.approx([1.0, 1.0, 0.5, 0.0])
