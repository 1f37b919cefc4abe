"""DPO with a precomputed reference (`posttrain precompute-reference`, then `dpo.reference: precomputed`)
trains exactly like DPO with a frozen reference copy, without building the second model, although the
file was written in file order and training reads two sources mixed by weight, shuffled and packed
several pairs to a row (entries join back by the tokenised pair's hash); a pair missing from the file,
or a file computed for another model, fails with the row or the key at fault."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from posttrain.cli import main as cli
from posttrain.config import load_job
from posttrain.errors import ConfigError, DataError
from tests.helpers import ROOT, write_jsonl

CONFIG = ROOT / "configs/tiny/dpo.yaml"


def _lines(path: Path, n: int) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()[:n]]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """48 training pairs of the tiny set in two sources mixed 1:2, 16 held-out pairs, and their
    reference file written by the CLI."""
    d = tmp_path_factory.mktemp("pref")
    rows = _lines(ROOT / "data/tiny/pref_train.jsonl", 48)
    a, b = write_jsonl(d / "a.jsonl", rows[:24]), write_jsonl(d / "b.jsonl", rows[24:])
    heldout = write_jsonl(d / "heldout.jsonl", _lines(ROOT / "data/tiny/pref_heldout.jsonl", 16))
    train = f"[{{path: {a}, format: preference}}, {{path: {b}, format: preference, weight: 2}}]"
    overrides = [f"data.train={train}", f"data.eval.path={heldout}"]
    assert cli(["precompute-reference", str(CONFIG), *overrides, "--out", f"{d}/"]) == 0
    return {"dir": d, "overrides": overrides, "ref": d / "reference_logps.jsonl"}


def _job(data: dict, out: Path, *overrides: str):
    return load_job(
        CONFIG,
        [
            f"output_dir={out}",
            "metrics.progress=quiet",
            *data["overrides"],
            "training.max_steps=3",
            "training.global_batch_size=4",
            "training.micro_batch_size_per_device=4",
            "metrics.peak_flops_per_s=1e11",  # no MFU calibration matmul
            "training.eval_every_steps=3",
            "training.save_every_steps=0",
            "training.export_hf=false",
            *overrides,
        ],
    )


def _run(cfg, monkeypatch) -> tuple[list[dict], int]:
    """(metrics.jsonl rows, models the recipe built)."""
    from posttrain.recipes import dpo

    built = []
    real = dpo.build_model_for
    monkeypatch.setattr(dpo, "build_model_for", lambda *a, **k: built.append(1) or real(*a, **k))
    dpo.train(cfg)
    rows = [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    return rows, len(built)


def test_the_file_holds_every_pair_once_with_a_header(data):
    lines = data["ref"].read_text().splitlines()
    header, entries = json.loads(lines[0]), [json.loads(x) for x in lines[1:]]
    assert header["posttrain"] == "reference_logps" and header["reference"]["seed"] == 0
    assert len(entries) == 48 + 16 and len({e["key"] for e in entries}) == 64
    rows = [e["row"].rsplit("/", 1)[1] for e in entries]
    assert (
        rows[:2] == ["a.jsonl:1", "a.jsonl:2"] and rows[24] == "b.jsonl:1" and rows[-1] == "heldout.jsonl:16"
    )
    assert all(e["chosen"] < 0 and e["rejected"] < 0 for e in entries)


def test_precomputed_reference_trains_exactly_like_a_frozen_copy(data, tmp_path, monkeypatch):
    copy, n_copy = _run(_job(data, tmp_path / "copy"), monkeypatch)
    pre, n_pre = _run(
        _job(data, tmp_path / "pre", "dpo.reference=precomputed", f"dpo.reference_logps={data['dir']}"),
        monkeypatch,
    )
    assert (n_copy, n_pre) == (2, 1)  # policy + reference copy vs the policy alone
    steps = [(a, b) for a, b in zip(copy, pre) if "loss" in a]
    assert len(steps) == 3 and abs(steps[0][0]["loss"] - 0.6931) < 1e-3
    assert steps[-1][0]["loss"] < steps[0][0]["loss"] - 0.05  # the steps differ: the comparison has teeth
    for a, b in steps:
        print(f"loss copy {a['loss']:.8f} precomputed {b['loss']:.8f} diff {abs(a['loss'] - b['loss']):.1e}")
        assert abs(a["loss"] - b["loss"]) <= 1e-6  # measured <= 7e-8
        assert abs(a["rewards/margin"] - b["rewards/margin"]) <= 1e-6
        assert a["num_loss_tokens"] == b["num_loss_tokens"]
    assert abs(copy[-1]["eval_loss"] - pre[-1]["eval_loss"]) <= 1e-6 and copy[-1]["eval_units"] == 16


def test_ipo_reads_length_averaged_reference_from_the_summed_values(data):
    """precomputed_reference(average=True) == the reference model's own length-averaged log-probs
    (and average=False its sums), on packed held-out pairs."""
    from posttrain.data.packing import BestFitPacker, collate, rows_from_state, rows_to_state
    from posttrain.data.reference import ReferenceLogps, reference_identity
    from posttrain.data.samples import load_samples
    from posttrain.parallel.build import build_model_for
    from posttrain.recipes.dpo import doc_logprobs, precomputed_reference
    from posttrain.train.setup import build_tokenizer

    cfg = _job(data, data["dir"] / "unused")
    tok = build_tokenizer(cfg.tokenizer)
    table = ReferenceLogps.load(data["ref"], reference_identity(cfg.model, cfg.tokenizer, cfg.seed))
    samples, _ = load_samples(cfg.data.eval, tok, max_len=256, overlong="drop", annotate=table.attach)
    packer = BestFitPacker(256, 4)
    rows = [r for s in samples for r in packer.add(s)] + packer.flush()
    batch = collate(rows, tok.pad_id, 256)
    restored = collate(rows_from_state(rows_to_state(rows)), tok.pad_id, 256)  # a checkpoint keeps them
    assert torch.equal(restored["ref_logps"], batch["ref_logps"])
    model = build_model_for(cfg.model, tok, cfg.seed).module.eval()
    for average in (False, True):
        with torch.no_grad():
            ours = doc_logprobs(model, batch, average=average, chunk_size=None, num_real_vocab=tok.vocab_size)
        stored = precomputed_reference(batch, average)
        assert stored.shape == ours.shape == (32,)
        assert float((stored - ours).abs().max()) <= 1e-5 * float(ours.abs().max())


def test_a_pair_missing_from_the_file_is_named_by_its_row(data, tmp_path):
    lines = data["ref"].read_text().splitlines()
    missing = [line for line in lines if not line.endswith('/a.jsonl:2"}')]
    assert len(missing) == len(lines) - 1
    (tmp_path / "partial.jsonl").write_text("\n".join(missing) + "\n")
    from posttrain.recipes import dpo

    cfg = _job(
        data,
        tmp_path / "out",
        "dpo.reference=precomputed",
        f"dpo.reference_logps={tmp_path / 'partial.jsonl'}",
        "data.shuffle=false",
    )
    with pytest.raises(DataError, match=r"a\.jsonl:2: no precomputed reference log-probabilities"):
        dpo.train(cfg)


def test_a_file_for_another_model_or_no_file_is_refused(data, tmp_path):
    from posttrain.recipes import dpo

    other = _job(
        data,
        tmp_path / "out",
        "dpo.reference=precomputed",
        f"dpo.reference_logps={data['ref']}",
        "seed=1",
    )
    with pytest.raises(ConfigError, match=r"another reference model \(seed: file 0, job 1\)"):
        dpo.train(other)
    with pytest.raises(ConfigError, match="does not exist; write it with `posttrain precompute-reference"):
        dpo.train(
            _job(data, tmp_path / "o", "dpo.reference=precomputed", f"dpo.reference_logps={tmp_path}/x")
        )
    with pytest.raises(ConfigError, match="reference=precomputed needs dpo.reference_logps"):
        _job(data, tmp_path / "o", "dpo.reference=precomputed")
