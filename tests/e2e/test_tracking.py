"""Experiment tracking end to end: a tiny SFT run (configs/tiny/sft.yaml, 4 steps) logs to JSONL,
TensorBoard, MLflow (SQLite) and W&B (offline), and each is read back by its own reader; progress
lines reach the log; `posttrain report` and `posttrain runs` cover it next to a GRPO-like run; an
interrupted run is listed with its resume command, and that exact command finishes it."""

from __future__ import annotations

import glob
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, job

from posttrain.cli import main
from posttrain.data.loader import TrainLoader
from posttrain.metrics.jsonl import read_jsonl

pytestmark = pytest.mark.slow
STEPS = 4


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    out = root / "tiny-sft"
    cmd = [
        sys.executable, "-m", "posttrain.cli", "run", "configs/tiny/sft.yaml",
        f"output_dir={out}", f"training.max_steps={STEPS}", "training.eval_every_steps=2",
        "training.save_every_steps=2", "training.global_batch_size=8", "data.eval.max_samples=32",
        "metrics.progress=plain",
        "metrics.trackers=[jsonl, tensorboard, mlflow, wandb]", "metrics.mlflow.experiment_name=tiny",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root, out, proc.stderr, read_jsonl(out / "metrics.jsonl")


def test_jsonl_rows_and_progress_lines(sft_run):
    _, _, stderr, rows = sft_run
    assert [r["step"] for r in rows] == [1, 2, 2, 3, 4, 4]  # eval rows follow steps 2 and 4
    assert [r["step"] for r in rows if "eval_loss" in r] == [2, 4]
    lines = stderr.splitlines()
    for prefix in ("[train] 4/4 steps (100%)", "[eval] ", "[checkpoint step 2] 3/3 parts", "[export hf] "):
        assert any(line.startswith(prefix) for line in lines), (prefix, stderr[-2000:])


def test_tensorboard_reads_back(sft_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, out, _, rows = sft_run
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    steps = [r for r in rows if "loss" in r]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "peak_memory_mb", "samples/sft_train"):
        events = acc.Scalars(key)
        assert [e.step for e in events] == [1, 2, 3, 4]
        assert [e.value for e in events] == pytest.approx([r[key] for r in steps], rel=1e-6)  # float32
    evals = [r for r in rows if "eval_loss" in r]
    assert [(e.step, e.value) for e in acc.Scalars("eval_loss")] == [
        (r["step"], pytest.approx(r["eval_loss"], rel=1e-6)) for r in evals
    ]
    config = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "recipe: sft" in config and "max_steps: 4" in config
    hf = acc.Tensors("artifacts/hf/text_summary")[0].tensor_proto.string_val[0].decode()
    assert hf == str(out / "hf")


def test_mlflow_reads_back(sft_run):
    from mlflow import MlflowClient

    _, out, _, rows = sft_run
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tiny")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_id == json.loads((out / "trackers.json").read_text())["mlflow_run_id"]
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny-sft"
    params = run.data.params
    assert (
        params["recipe"] == "sft"
        and float(params["optim.lr"]) == 3e-3
        and params["training.max_steps"] == "4"
    )
    steps = [r for r in rows if "loss" in r]
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(r["step"], r["loss"]) for r in steps]  # exact: float64
    evals = client.get_metric_history(run.info.run_id, "eval_loss")
    assert [(m.step, m.value) for m in evals] == [
        (r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r
    ]
    tokens = client.get_metric_history(run.info.run_id, "tokens/sft_train")
    assert [m.value for m in tokens] == [r["tokens/sft_train"] for r in steps]
    assert run.data.tags["artifact.hf"] == str(out / "hf")
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id)) == ["config.yaml", "summary.json"]
    assert exp.artifact_location == (out / "mlflow-artifacts").as_uri()


def wandb_records(run_file: Path) -> list:
    """The records of an offline W&B run file: wandb's own protobuf Records, framed like a LevelDB log
    (a 7-byte file header, 32 KiB blocks, each chunk with a 7-byte header: crc, length, type)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = run_file.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, records, pending = 7, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # the block's tail is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:  # full
            records.append(chunk)
        elif kind in (2, 3):  # first, middle
            pending = (pending if kind == 3 else b"") + chunk
        elif kind == 4:  # last
            records.append(pending + chunk)
    out = []
    for raw in records:
        record = pb.Record()
        record.ParseFromString(raw)
        out.append(record)
    return out


def test_wandb_offline_run_reads_back(sft_run):
    _, out, _, rows = sft_run
    run_id = json.loads((out / "trackers.json").read_text())["wandb_run_id"]
    (run_file,) = glob.glob(str(out / "wandb" / f"offline-run-*-{run_id}" / f"run-{run_id}.wandb"))
    records = wandb_records(Path(run_file))
    history = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            history.append(
                {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            )
    by_step = {h["_step"]: h for h in history}
    steps = [r for r in rows if "loss" in r]
    assert sorted(by_step) == [1, 2, 3, 4]
    assert [by_step[r["step"]]["loss"] for r in steps] == [r["loss"] for r in steps]
    assert by_step[4]["eval_loss"] == [r for r in rows if "eval_loss" in r][-1]["eval_loss"]
    config = {
        i.key: json.loads(i.value_json) for r in records if r.HasField("config") for i in r.config.update
    }
    assert config["recipe"] == "sft" and config["training"]["max_steps"] == 4
    assert [r.exit.exit_code for r in records if r.HasField("exit")] == [0]


def test_report_and_runs_cover_the_sft_and_a_grpo_like_run(sft_run, capsys):
    from run_fixtures import grpo_rows, write_run

    root, out, _, rows = sft_run
    grpo = write_run(root, grpo_rows(), name="grpo")
    for run in (out, grpo):
        assert main(["report", str(run)]) == 0
        assert capsys.readouterr().out.strip() == str(run / "report" / "index.html")
    sft_pngs = {p.name for p in (out / "report").glob("*.png")}
    assert {"loss.png", "lr.png", "grad_norm.png", "throughput.png", "mfu.png", "memory.png"} <= sft_pngs
    assert {"data_mix_samples.png", "data_mix_tokens.png"} <= sft_pngs and "rl_reward.png" not in sft_pngs
    assert "rl_reward.png" in {p.name for p in (grpo / "report").glob("*.png")}
    assert main(["runs", str(root), "--json"]) == 0
    listed = {Path(r["path"]).name: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert set(listed) == {"tiny-sft", "grpo"}
    sft = listed["tiny-sft"]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert (sft["recipe"], sft["status"], sft["step"], sft["total_steps"]) == ("sft", "finished", 4, 4)
    assert sft["last_loss"] == [r for r in rows if "loss" in r][-1]["loss"]
    assert sft["best_eval"] == ["eval_loss", min(evals), 2 + 2 * evals.index(min(evals))]
    assert listed["grpo"]["recipe"] == "grpo" and listed["grpo"]["status"] == "finished"


def test_interrupted_run_resumes_with_the_listed_command(tmp_path, monkeypatch, capsys):
    """Ctrl-C during step 4 (step 3 logged, last checkpoint at step 2): the run is listed as interrupted
    with its resume command; running that command finishes it. TensorBoard drops the step-3 events
    of the first attempt; MLflow continues the same run (its history keeps both step-3 values)."""
    import yaml
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from posttrain.config import validate_job
    from posttrain.recipes import sft

    monkeypatch.chdir(tmp_path)
    raw = job(
        tmp_path,
        ROOT / "data/tiny/sft_train.jsonl",
        data={"max_tokens_per_pack": 96},
        training={"max_steps": 4, "save_every_steps": 2, "export_hf": False},
        metrics={"trackers": ["tensorboard", "mlflow"]},
    )
    out = tmp_path / "out"
    real, calls = TrainLoader.next_micro_batch, {"n": 0}

    def interrupted(self):
        calls["n"] += 1
        if calls["n"] > 3 * 2:  # 2 micro-batches per step: dies in step 4
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(TrainLoader, "next_micro_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sft.train(validate_job(raw))
    monkeypatch.setattr(TrainLoader, "next_micro_batch", real)
    first = [(r["step"], r["loss"]) for r in read_jsonl(out / "metrics.jsonl")]
    assert [s for s, _ in first] == [1, 2, 3]

    assert main(["runs", str(tmp_path), "--json"]) == 0
    (listed,) = map(json.loads, capsys.readouterr().out.splitlines())
    assert (listed["status"], listed["step"], listed["total_steps"]) == ("interrupted", 3, 4)
    assert listed["resume_command"] == "posttrain run out/config.yaml --resume"
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    run_id = json.loads((out / "trackers.json").read_text())["mlflow_run_id"]
    assert client.get_run(run_id).info.status == "KILLED"

    args = listed["resume_command"].split()[1:]
    assert yaml.safe_load((out / "config.yaml").read_text())["metrics"]["progress"] == "quiet"
    assert main(args) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("done: 4 steps")
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[2]["loss"] == first[2][1]  # resume == straight
    assert main(["runs", str(tmp_path), "--json"]) == 0
    (listed,) = map(json.loads, capsys.readouterr().out.splitlines())
    assert (listed["status"], listed["step"], listed["resume_command"]) == ("finished", 4, None)

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [
        (r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in rows
    ]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2, 3, 3, 4]


def test_a_tracker_that_cannot_start_fails_before_training(tmp_path, capsys):
    from posttrain.config import validate_job
    from posttrain.errors import TrackerError
    from posttrain.recipes import sft

    (tmp_path / "a_file").write_text("")
    bad = tmp_path / "a_file" / "mlflow.db"  # its folder cannot be created: a file is in the way
    raw = job(
        tmp_path,
        ROOT / "data/tiny/sft_train.jsonl",
        training={"max_steps": 2, "export_hf": False},
        metrics={"trackers": ["mlflow"], "mlflow": {"tracking_uri": f"sqlite:///{bad}"}},
    )
    with pytest.raises(
        TrackerError, match=r"tracker 'mlflow' could not start \(check metrics.mlflow.tracking_uri\)"
    ):
        sft.train(validate_job(raw))
    out = tmp_path / "out"
    assert read_jsonl(out / "metrics.jsonl") == []  # no step ran
    status = json.loads((out / "status.json").read_text())
    assert status["status"] == "failed" and "metrics.mlflow.tracking_uri" in status["error"]
