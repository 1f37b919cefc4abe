"""Resume == straight run: a run stopped after a checkpoint and resumed continues with exactly the
same batches, losses and final weights as one that never stopped."""

import pytest
from helpers import ROOT, job_config

from posttrain.data.loader import TrainLoader
from posttrain.metrics.jsonl import read_jsonl
from posttrain.models.hf_io import load_pretrained
from posttrain.recipes import sft


class Crash(Exception):
    pass


def _cfg(tmp_path, name, resume=False):
    return job_config(
        tmp_path / name,
        ROOT / "data/tiny/sft_train.jsonl",
        data={"max_tokens_per_pack": 96},
        training={"max_steps": 6, "save_every_steps": 3, "resume": resume},
    )


def test_resume_equals_straight_run(tmp_path, monkeypatch):
    straight = sft.train(_cfg(tmp_path, "a"))

    # Crash during step 5: step 4 was already logged but the last checkpoint is step 3, so the
    # resumed run must redo step 4 without logging it twice.
    real = TrainLoader.next_micro_batch
    calls = {"n": 0}

    def crashing(self):
        calls["n"] += 1
        if calls["n"] > 4 * 2:  # 4 steps x 2 micro-batches
            raise Crash
        return real(self)

    monkeypatch.setattr(TrainLoader, "next_micro_batch", crashing)
    with pytest.raises(Crash):
        sft.train(_cfg(tmp_path, "b"))
    assert [r["step"] for r in read_jsonl(tmp_path / "b/out/metrics.jsonl")] == [1, 2, 3, 4]
    monkeypatch.setattr(TrainLoader, "next_micro_batch", real)
    resumed = sft.train(_cfg(tmp_path, "b", resume=True))

    a = read_jsonl(tmp_path / "a/out/metrics.jsonl")
    b = read_jsonl(tmp_path / "b/out/metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]  # no duplicated or missing steps
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r["num_loss_tokens"] for r in a] == [r["num_loss_tokens"] for r in b]
    assert resumed["steps"] == straight["steps"] == 6
    wa, _ = load_pretrained(tmp_path / "a/out/hf")
    wb, _ = load_pretrained(tmp_path / "b/out/hf")
    for (k, x), (_, y) in zip(wa.state_dict().items(), wb.state_dict().items()):
        assert x.equal(y), k
