"""Progress with ETA: the plain lines CI logs get (ETA from the rate since start, a line every
`every_s` and one at the end), unknown totals, nested rich bars sharing one live display, and the
tasks that report progress (generation, data counting)."""

from __future__ import annotations

import json

import pytest
from helpers import ROOT, tiny_model, tokenizer

from posttrain.metrics import progress as progress_mod
from posttrain.metrics.progress import Progress, _SharedLive, format_duration


@pytest.fixture
def clock(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(progress_mod.time, "perf_counter", lambda: now[0])
    return now


def test_plain_lines_eta_and_cadence(clock, capsys):
    shown = Progress(10, "train", "plain", every_s=5.0, start=2)  # resumed at step 2
    clock[0] = 102.0
    shown.update(3, loss=1.5)  # 2 s since the last line: nothing yet
    assert capsys.readouterr().err == ""
    clock[0] = 106.0
    shown.update(4, loss=1.25)  # 2 steps in 6 s -> 3 s/step, 6 steps left -> 18 s
    assert capsys.readouterr().err == "[train] 4/10 steps (40%) 0.333 steps/s eta 18s elapsed 6s  loss 1.25\n"
    assert shown.eta_s() == pytest.approx(18.0)
    clock[0] = 124.0
    shown.update(10, loss=0.5)  # the end always prints, without an ETA
    assert capsys.readouterr().err == "[train] 10/10 steps (100%) 0.333 steps/s elapsed 24s  loss 0.5\n"
    shown.close()  # already printed at the end: no second line
    assert capsys.readouterr().err == ""


def test_unknown_total_shows_count_and_rate_and_the_end(clock, capsys):
    with Progress(None, "data: count rows", "plain", every_s=60.0, unit="rows") as shown:
        clock[0] = 104.0
        shown.update(512)
        assert shown.eta_s() is None and capsys.readouterr().err == ""
    assert capsys.readouterr().err == "[data: count rows] 512 rows 128 rows/s elapsed 4s\n"


def test_quiet_prints_nothing(capsys):
    with Progress(3, "eval", "quiet") as shown:
        shown.advance(3)
    assert capsys.readouterr().err == ""


def test_nested_bars_share_one_live_display():
    outer = Progress(5, "train", "bar")
    inner = Progress(3, "eval", "bar", unit="batches")
    display = _SharedLive.display
    assert display is not None and _SharedLive.users == 2 and len(display.tasks) == 2
    inner.advance(3)
    inner.close()  # a nested task leaves no bar behind
    assert _SharedLive.users == 1 and [t.description for t in display.tasks] == ["train"]
    outer.update(5, loss=0.1)
    assert display.tasks[0].completed == 5
    outer.close()
    assert _SharedLive.display is None and _SharedLive.users == 0


def test_format_duration():
    assert [format_duration(s) for s in (4.4, 65, 3599, 7620)] == ["4s", "1m05s", "59m59s", "2h07m"]


def test_generation_reports_prompts(capsys):
    from posttrain.generate import greedy_generate

    tok = tokenizer()
    model, _ = tiny_model(vocab_size=896)
    prompts = [tok.encode("What is 1 + 2?"), tok.encode("Sort: c a b"), tok.encode("Reverse: x y")]
    outs = greedy_generate(
        model, prompts, max_new_tokens=3, stop_ids=[tok.eos_id], pad_id=tok.pad_id,
        num_real_vocab=tok.vocab_size, batch_size=2, progress="plain",
    )  # fmt: skip
    assert len(outs) == 3
    lines = capsys.readouterr().err.splitlines()
    assert lines[-1].startswith("[generate] 3/3 prompts (100%)")


def test_data_counting_reports_rows(tmp_path, capsys):
    from helpers import job_config

    from posttrain.train.setup import make_loader

    rows = [json.loads(line) for line in (ROOT / "data/tiny/sft_train.jsonl").read_text().splitlines()[:40]]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = job_config(tmp_path, train, training={"num_epochs": 1, "max_steps": None})
    loader = make_loader(cfg.data, cfg.training, tokenizer(), seed=0)
    n = loader.count_rows("plain")
    assert n > 0
    assert capsys.readouterr().err.splitlines()[-1].startswith(f"[data: count rows] {n} rows ")
