"""The Ray launcher (posttrain.launch_ray) on a simulated two-node Ray cluster, CPU only.

`ray.cluster_utils.Cluster` starts a head and a second node on this machine (one CPU each), so a
STRICT_SPREAD placement group must put the two ranks on different Ray nodes: the rendezvous goes
through rank 0's node address and a port its actor picked, as it would between machines. Every run
trains configs/tiny/sft.yaml for 4 steps and is compared with the same job in one process with no
launcher (a subprocess, as a user would run it). FSDP over 2 gloo ranks matches the single process
to below 1e-6 per step (see test_equivalence.py), so 1e-5 leaves room only for reduction-order noise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from posttrain.launch_ray import launch_ray  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "configs/tiny/sft.yaml")
STEPS = 4
BASE = [
    f"training.max_steps={STEPS}",
    "training.eval_every_steps=0",
    "training.save_every_steps=2",
    "training.export_hf=false",  # saves time; no loss depends on it
    "metrics.progress=plain",
    "data.prefetch_rows=0",
]
LOSS_ATOL = 1e-5
WORKER_ENV = {"OMP_NUM_THREADS": "1"}  # two ranks share this machine's cores

pytestmark = pytest.mark.distributed


def losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """The single-process job, started here and awaited in `reference`, so that it trains while the
    cluster boots (each takes ~7 s on this 2-core machine)."""
    out = tmp_path_factory.mktemp("single")
    cmd = [sys.executable, "-m", "posttrain.cli", "run", CONFIG, *BASE, f"output_dir={out}"]
    env = {**os.environ, **WORKER_ENV}
    env.pop("TORCHELASTIC_RESTART_COUNT", None)
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    yield proc, out
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def cluster(reference_run):
    """A head and one more node, one CPU each (Ray's own multi-node test harness)."""
    from ray.cluster_utils import Cluster

    small = {"num_cpus": 1, "object_store_memory": 100 * 2**20}
    c = Cluster(initialize_head=True, head_node_args={**small, "include_dashboard": False})
    c.add_node(**small)
    c.wait_for_nodes()
    yield c
    if ray.is_initialized():
        ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def reference(reference_run) -> dict[int, float]:
    """The uninterrupted single-process trajectory every Ray run must reproduce."""
    proc, out = reference_run
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-5000:]
    return losses(out)


def run_on_cluster(cluster, out: Path, *, env: dict | None = None, max_restarts: int = 0) -> int:
    return launch_ray(
        CONFIG,
        [*BASE, f"output_dir={out}"],
        2,
        max_restarts=max_restarts,
        address=cluster.address,
        use_gpu=False,
        placement_strategy="STRICT_SPREAD",
        env={**WORKER_ENV, **(env or {})},
    )


def workers_of(out: Path) -> list[int]:
    """Pids of live `posttrain run` processes writing to `out` (a leaked worker would show here)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "posttrain.cli" in cmdline and f"output_dir={out}" in cmdline:
            pids.append(int(proc.name))
    return pids


def test_two_nodes_equal_single_process(cluster, reference, tmp_path: Path):
    out = tmp_path / "ray"
    assert run_on_cluster(cluster, out) == 0
    got = losses(out)
    assert sorted(got) == sorted(reference) == list(range(1, STEPS + 1))
    diffs = {s: abs(got[s] - reference[s]) for s in reference}
    print("per-step |loss - single|:", {s: f"{d:.1e}" for s, d in diffs.items()})
    assert max(diffs.values()) <= LOSS_ATOL, diffs
    assert got == reference  # data parallelism is bit-identical to one process (test_equivalence.py)
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2


def test_killed_worker_restarts_and_finishes_with_the_uninterrupted_loss(
    cluster, reference, tmp_path: Path, capfd
):
    """Rank 0 SIGKILLs itself after step 3 (before the step-4 checkpoint): every worker is restarted
    with TORCHELASTIC_RESTART_COUNT=1, resumes from the step-2 checkpoint and ends on the same loss."""
    out = tmp_path / "restart"
    rc = run_on_cluster(cluster, out, env={"POSTTRAIN_FAULT": "train_step:3"}, max_restarts=1)
    captured = capfd.readouterr()
    text = captured.out + captured.err
    assert rc == 0, text[-5000:]
    assert "worker rank 0 was killed by SIGKILL; restarting all 2 worker(s)" in captured.err
    assert "resumed from" in text and "at step 2" in text, text[-5000:]
    final = json.loads((out / "summary.json").read_text())["final"]["loss"]
    print(f"final loss {final:.8f}, uninterrupted {reference[STEPS]:.8f}")
    assert abs(final - reference[STEPS]) <= LOSS_ATOL, (final, reference[STEPS])
    assert sorted(losses(out)) == list(range(1, STEPS + 1))


def test_failure_without_restarts_returns_1(cluster, tmp_path: Path, capfd):
    out = tmp_path / "fail"
    rc = run_on_cluster(cluster, out, env={"POSTTRAIN_FAULT": "train_step:1"}, max_restarts=0)
    err = capfd.readouterr().err
    assert rc == 1
    assert "error: worker rank 0 was killed by SIGKILL after 0 restart(s) allowed" in err, err[-3000:]
    assert workers_of(out) == []  # the surviving rank was stopped, not left blocked in a collective


def test_rank_envs_on_two_gpu_nodes():
    """torchrun's variables from a placement (no Ray needed): local ranks count per node, each rank of a
    node sees that node's GPUs of the job in local-rank order, and `env` cannot move a rank."""
    from posttrain.launch_ray import _rank_envs

    places = [
        {"node_id": "a", "ip": "10.0.0.1", "gpu_ids": ["3"]},
        {"node_id": "b", "ip": "10.0.0.2", "gpu_ids": ["0"]},
        {"node_id": "a", "ip": "10.0.0.1", "gpu_ids": ["5"]},
    ]
    envs = _rank_envs(places, 29500, 2, {"a": 16.0, "b": 8.0}, {"RANK": "7", "HF_HOME": "/cache"})
    assert [e["RANK"] for e in envs] == ["0", "1", "2"]
    assert [e["LOCAL_RANK"] for e in envs] == ["0", "0", "1"]
    assert [e["LOCAL_WORLD_SIZE"] for e in envs] == ["2", "1", "2"]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["3,5", "0", "3,5"]
    assert [e["OMP_NUM_THREADS"] for e in envs] == ["8", "8", "8"]
    assert {(e["MASTER_ADDR"], e["MASTER_PORT"], e["WORLD_SIZE"]) for e in envs} == {
        ("10.0.0.1", "29500", "3")
    }
    assert all(e["TORCHELASTIC_RESTART_COUNT"] == "2" and e["HF_HOME"] == "/cache" for e in envs)
