"""Exact data state: stopped at micro-batch k and resumed from the checkpointed state, the loader
produces token-for-token the batches of an uninterrupted run -- with several mixed sources (JSONL,
gzip, Parquet), a weight schedule, shuffle windows, per-source epochs and the background packer.
The state describes what the training loop consumed, never what the producer prefetched."""

import pickle
import time

import pytest
import torch
from data_layouts import write_layouts
from helpers import ROOT, job_config, tokenizer

from posttrain.data.loader import TrainLoader
from posttrain.metrics.jsonl import read_jsonl
from posttrain.recipes import sft
from posttrain.train.setup import make_loader


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_layouts(tmp_path_factory.mktemp("mix"))


def _sources(root):
    return [
        {"path": str(root / "all.jsonl"), "format": "chat", "name": "chat", "weight": 3.0},
        {"path": str(root / "all.jsonl.gz"), "format": "chat", "name": "gz", "weight": 1.0, "epochs": 2},
        {"path": str(root / "shards"), "format": "chat", "name": "mixed", "weight": 1.0},
    ]


def _cfg(tmp_path, root, prefetch_rows, **training):
    data = {
        "train": _sources(root),
        "max_tokens_per_pack": 96,
        "shuffle_window_samples": 16,
        "prefetch_rows": prefetch_rows,
        "weight_schedule": [{"step": 0, "weights": {"chat": 3.0}}, {"step": 10, "weights": {"chat": 0.5}}],
    }
    return job_config(tmp_path, ROOT / "unused.jsonl", data=data, training={"max_steps": 20, **training})


def _loader(cfg):
    return make_loader(cfg.data, cfg.training, tokenizer(), cfg.seed)


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("prefetch_rows", [0, 16])
def test_resumed_loader_gives_token_for_token_the_same_batches(tmp_path, data_dir, prefetch_rows):
    cfg = _cfg(tmp_path, data_dir, prefetch_rows)
    n, k = 60, 23  # 60 micro-batches of 2 rows cross both epochs of 'gz' and the schedule's ramp
    straight = _loader(cfg)
    batches = [straight.next_micro_batch() for _ in range(n)]
    counts = straight.step_metrics()
    assert all(counts[f"samples/{name}"] > 0 for name in ("chat", "gz", "mixed"))

    first = _loader(cfg)
    for _ in range(k):
        first.next_micro_batch()
    state = pickle.loads(pickle.dumps(first.state_dict()))
    first.close()
    resumed = _loader(cfg)
    resumed.load_state_dict(state)
    rest = [resumed.next_micro_batch() for _ in range(n - k)]
    assert all(_same(x, y) for x, y in zip(batches[k:], rest))
    assert resumed.state_dict() == straight.state_dict()
    straight.close()
    resumed.close()


def test_background_state_is_what_the_loop_consumed(tmp_path, data_dir):
    """After k micro-batches the async loader (which has packed far ahead) checkpoints exactly the
    state of a synchronous loader after the same k micro-batches."""
    sync, background = _loader(_cfg(tmp_path, data_dir, 0)), _loader(_cfg(tmp_path, data_dir, 64))
    for _ in range(17):
        sync.next_micro_batch()
        background.next_micro_batch()
    producer = background._producer
    for _ in range(200):  # let the producer run ahead (at most 2 s)
        if producer.queue.full():
            break
        time.sleep(0.01)
    assert producer.queue.qsize() > 0  # it really is ahead of the loop
    assert background.state_dict() == sync.state_dict()
    background.close()


class Crash(Exception):
    pass


def test_training_resumed_with_several_sources_and_background_packer(tmp_path, data_dir, monkeypatch):
    def cfg(name, resume=False):
        return _cfg(tmp_path / name, data_dir, 16, max_steps=8, save_every_steps=3, resume=resume)

    sft.train(cfg("a"))
    real = TrainLoader.next_micro_batch
    calls = {"n": 0}

    def crashing(self):
        calls["n"] += 1
        if calls["n"] > 5 * 2:  # dies during step 6; the last checkpoint is step 3
            raise Crash
        return real(self)

    monkeypatch.setattr(TrainLoader, "next_micro_batch", crashing)
    with pytest.raises(Crash):
        sft.train(cfg("b"))
    monkeypatch.setattr(TrainLoader, "next_micro_batch", real)
    summary = sft.train(cfg("b", resume=True))
    a = read_jsonl(tmp_path / "a/out/metrics.jsonl")
    b = read_jsonl(tmp_path / "b/out/metrics.jsonl")
    assert [r["step"] for r in b] == list(range(1, 9))
    keys = ["loss", "num_tokens", "num_loss_tokens", "samples/chat", "samples/gz", "tokens/mixed"]
    assert [[r[k] for k in keys] for r in a] == [[r[k] for k in keys] for r in b]
    assert summary["data_sources"]["chat"]["samples"] == sum(r["samples/chat"] for r in a)
    assert all("data_wait_s" in r for r in b)
