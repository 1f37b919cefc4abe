"""Weighted mixing: sources are drawn in proportion to their weights, a weight schedule moves the
mix over steps, per-source epochs end a source (the others take over), and it is all reproducible
from the seed."""

import json

import pytest

from posttrain.config import DataConfig, WeightPoint
from posttrain.data.mixing import Mixer
from posttrain.data.pipeline import build_pipeline


def _tokens_file(path, first_id, n, length=5):
    """n pre-tokenised records; record i is [first_id + i] * length, so every sample is identifiable."""
    path.write_text("".join(json.dumps({"input_ids": [first_id + i] * length}) + "\n" for i in range(n)))
    return str(path)


def _pipeline(tmp_path, sources, seed=0, **data):
    cfg = DataConfig(
        train=[{"format": "tokens", **s} for s in sources],
        max_tokens_per_pack=64,
        packing=False,
        prefetch_rows=0,
        **data,
    )
    return build_pipeline(cfg, tokenizer=None, seed=seed, rows_per_step=10)


def _draw(pipeline, n):
    out = []
    for _ in range(n):
        row = pipeline.next_row()
        if row is None:
            break
        out.append(row[0].source)
    return out


def test_sources_are_drawn_in_proportion_to_their_weights(tmp_path):
    a = _tokens_file(tmp_path / "a.jsonl", 1000, 50)
    b = _tokens_file(tmp_path / "b.jsonl", 5000, 50)
    drawn = _draw(_pipeline(tmp_path, [{"path": a, "weight": 3}, {"path": b, "weight": 1}]), 4000)
    share = drawn.count(0) / len(drawn)
    assert abs(share - 0.75) < 0.03, share  # 4000 draws: 3 sigma is ~0.02


def test_same_seed_same_mix_other_seed_other_mix(tmp_path):
    a = _tokens_file(tmp_path / "a.jsonl", 1000, 50)
    b = _tokens_file(tmp_path / "b.jsonl", 5000, 50)
    srcs = [{"path": a}, {"path": b}]

    def ids(seed):
        p = _pipeline(tmp_path, srcs, seed=seed)
        return [p.next_row()[0].input_ids[0] for _ in range(300)]

    assert ids(0) == ids(0) and ids(0) != ids(1)


def test_weight_schedule_interpolates_linearly_between_points():
    schedule = [
        WeightPoint(step=0, weights={"a": 1, "b": 0}),
        WeightPoint(step=100, weights={"a": 0, "b": 1}),
    ]
    mixer = Mixer(["a", "b"], [1.0, 1.0], schedule)
    assert mixer.weights_at(0) == [1.0, 0.0]
    assert mixer.weights_at(25) == pytest.approx([0.75, 0.25])
    assert mixer.weights_at(100) == mixer.weights_at(10_000) == [0.0, 1.0]


def test_weight_schedule_moves_the_mix_over_steps(tmp_path):
    a = _tokens_file(tmp_path / "a.jsonl", 1000, 50)
    b = _tokens_file(tmp_path / "b.jsonl", 5000, 50)
    schedule = [{"step": 0, "weights": {"a": 1, "b": 0}}, {"step": 100, "weights": {"a": 0, "b": 1}}]
    # 10 rows per step: rows 0-99 are steps 0-9 (almost all a), rows 1000+ are past step 100 (all b)
    drawn = _draw(_pipeline(tmp_path, [{"path": a}, {"path": b}], weight_schedule=schedule), 1400)
    assert drawn[:100].count(0) >= 88  # b's weight ramps 0 -> 0.09 over steps 0-9: ~4.5 expected
    assert drawn[1000:].count(1) == 400
    assert 0.35 < drawn[400:600].count(1) / 200 < 0.65  # around step 50 the mix is half and half


def test_a_source_with_epochs_runs_out_and_the_others_take_over(tmp_path):
    a = _tokens_file(tmp_path / "a.jsonl", 1000, 50)
    b = _tokens_file(tmp_path / "b.jsonl", 5000, 10)
    p = _pipeline(tmp_path, [{"path": a, "weight": 1}, {"path": b, "weight": 9, "epochs": 2}])
    drawn = _draw(p, 500)
    assert drawn.count(1) == 20  # exactly two passes over b's 10 records
    assert drawn[-100:] == [0] * 100


def test_stream_ends_when_every_source_ran_its_epochs(tmp_path):
    a = _tokens_file(tmp_path / "a.jsonl", 1000, 7)
    b = _tokens_file(tmp_path / "b.jsonl", 5000, 5)
    p = _pipeline(tmp_path, [{"path": a, "epochs": 3}, {"path": b, "epochs": 1}])
    drawn = _draw(p, 1000)
    assert sorted(drawn) == [0] * 21 + [1] * 5 and p.next_row() is None


def test_config_rejects_unknown_names_and_duplicates(tmp_path):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="unknown source"):
        DataConfig(
            train=[{"path": "a.jsonl", "format": "tokens"}],
            max_tokens_per_pack=64,
            weight_schedule=[{"step": 0, "weights": {"nope": 1}}],
        )
    with pytest.raises(ValidationError, match="must be unique"):
        DataConfig(
            train=[{"path": "x/a.jsonl", "format": "tokens"}, {"path": "y/a.jsonl", "format": "tokens"}],
            max_tokens_per_pack=64,
        )
