"""Distributed == single process, on gloo with 2 (and 4) CPU processes, through the real CLI.

Every run trains configs/tiny/sft.yaml for a few steps; the reference is the same job in one process
with no launcher. With `data.shard_by: rows` the ranks' rows of a step are exactly the single-process
rows, so the per-step losses must agree to fp32 reduction-order noise. Step 1 (before any update)
must agree to 1e-6. Later steps get 5e-5 (~1e-5 relative): tensor parallel splits the inner sums
of row-parallel matmuls, and Adam's normalised update turns 1e-7 gradient differences on near-zero
gradients into visible ones (TP stays below 1.3e-5). Data parallelism alone (FSDP, HSDP, with
activation checkpointing) is bit-identical to one process: each rank computes exactly the single
process's micro-batch, the power-of-two gradient scaling is exact, and the clipping norm is summed in
fp64 (parallelize.clip_grad_norm), so every logged loss is equal, not merely close. Runs are
subprocesses (`posttrain run ... --nproc N`), i.e. what a user types.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import cli_run

from posttrain.train import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "configs/tiny/sft.yaml")
STEPS = 6
BASE = [
    f"training.max_steps={STEPS}",
    "training.eval_every_steps=0",
    "training.save_every_steps=0",
    "training.export_hf=false",
    "metrics.progress=plain",
]
LOSS_ATOL = 5e-5
FIRST_STEP_ATOL = 1e-6

pytestmark = pytest.mark.distributed


def run(out: Path, *args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """`posttrain run CONFIG ...` in a fresh process; returns the finished process (output captured)."""
    return cli_run(CONFIG, out, *args, base=BASE, env=env, check=check)


def losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def reference_out(tmp_path_factory) -> Path:
    """The single-process run every distributed run must reproduce (its output directory)."""
    out = tmp_path_factory.mktemp("single")
    run(out)
    return out


@pytest.fixture(scope="module")
def reference(reference_out) -> dict[int, float]:
    """The single-process trajectory."""
    return losses(reference_out)


def grad_norm_at_step_1(out: Path) -> float:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return next(r["grad_norm"] for r in rows if r.get("step") == 1 and "grad_norm" in r)


def assert_same_trajectory(got: dict[int, float], ref: dict[int, float]) -> None:
    assert sorted(got) == sorted(ref), (sorted(got), sorted(ref))
    diffs = {s: abs(got[s] - ref[s]) for s in ref}
    print("per-step |loss - single|:", {s: f"{d:.1e}" for s, d in diffs.items()})
    assert max(diffs.values()) <= LOSS_ATOL, diffs
    if 1 in diffs:
        assert diffs[1] <= FIRST_STEP_ATOL, diffs


@pytest.mark.parametrize(
    "name,args",
    [
        ("fsdp", ["--nproc", "2"]),
        ("tp", ["parallelism.tp=2", "--nproc", "2"]),
        ("hsdp", ["parallelism.dp_replicate=2", "parallelism.dp_shard=1", "--nproc", "2"]),
        ("fsdp_ac", ["parallelism.activation_checkpointing=full", "--nproc", "2"]),
    ],
)
def test_two_processes_equal_single_process(tmp_path: Path, reference, name: str, args: list[str]):
    out = tmp_path / name
    run(out, *args)
    assert_same_trajectory(losses(out), reference)
    if name != "tp":  # pure data parallelism: bit for bit (see the module docstring)
        assert losses(out) == reference
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2


MOE = ["model.arch.num_experts=4", "model.arch.num_experts_per_tok=2", "model.arch.moe_intermediate_size=64"]


@pytest.mark.parametrize(
    "family,extra",
    [("gemma3", []), ("qwen3_moe", MOE), ("gpt_oss", MOE)],
)
def test_tensor_parallel_plan_of_every_family(tmp_path: Path, family: str, extra: list[str]):
    """The TP plan (data over unified names; Qwen3-MoE experts split too, GPT-OSS sinks split by head)
    on FSDP x TP: the same 3-step trajectory as one process for the other families."""
    args = [f"model.family={family}", *extra, "training.max_steps=3"]
    one, tp = tmp_path / "one", tmp_path / "tp"
    run(one, *args)
    run(tp, *args, "parallelism.tp=2", "--nproc", "2")
    assert_same_trajectory(losses(tp), losses(one))


def test_torch_compile_changes_no_number(tmp_path: Path, reference):
    """parallelism.compile compiles each block with inductor (~35 s on this CPU): same trajectory."""
    out = tmp_path / "compiled"
    run(out, "parallelism.compile=true")
    assert_same_trajectory(losses(out), reference)


def test_fsdp_x_tp_on_a_2d_mesh_equals_single_process(tmp_path: Path, reference, reference_out):
    out = tmp_path / "fsdp_tp"
    run(out, "parallelism.tp=2", "--nproc", "4")
    assert_same_trajectory(losses(out), reference)
    # The clipping norm sums every shard once (FSDP over TP shards with _StridedShard placements): a
    # missed reduction shows here before it shows in the losses.
    single = grad_norm_at_step_1(reference_out)
    assert grad_norm_at_step_1(out) == pytest.approx(
        single, rel=2e-5
    )  # TP: 4e-6 observed; a missed shard: 10%
    summary = json.loads((out / "summary.json").read_text())
    assert summary["parallelism"] == {"dp_replicate": 1, "dp_shard": 2, "tp": 2}


@pytest.mark.parametrize("first,second", [(2, 1), (1, 2)])
def test_resume_on_a_different_world_size(tmp_path: Path, reference, first: int, second: int):
    """Stopped after the step-3 checkpoint on `first` processes, resumed on `second`: steps 4-6 equal
    the straight single-process run (DCP reshards model and optimizer; the data state is world-free)."""
    out = tmp_path / "run"
    nproc = lambda n: ["--nproc", str(n)] if n > 1 else []  # noqa: E731
    died = run(
        out,
        "training.save_every_steps=3",
        *nproc(first),
        env={"POSTTRAIN_FAULT": "train_step:4"},
        check=False,
    )
    assert died.returncode != 0
    assert [p.name for p in ckpt.list_checkpoints(out / "checkpoints")] == ["step_000003"]
    proc = run(out, "training.save_every_steps=3", "--resume", *nproc(second))
    assert f"saved on {first} process" in proc.stdout
    got = losses(out)
    assert_same_trajectory({s: got[s] for s in (4, 5, 6)}, {s: reference[s] for s in (4, 5, 6)})


def test_kill_and_restart_finishes_with_the_uninterrupted_loss(tmp_path: Path, reference):
    """Rank 1 SIGKILLed right after step 4 (before its checkpoint): the agent restarts both workers,
    which resume from the step-2 checkpoint and finish with the uninterrupted run's loss."""
    out = tmp_path / "restart"
    proc = run(
        out,
        "training.save_every_steps=2",
        "--nproc",
        "2",
        "--max-restarts",
        "1",
        env={"POSTTRAIN_FAULT": "train_step:4", "POSTTRAIN_FAULT_RANK": "1"},
    )
    assert "resumed from" in proc.stdout and "at step 2" in proc.stdout
    final = json.loads((out / "summary.json").read_text())["final"]["loss"]
    assert abs(final - reference[STEPS]) <= LOSS_ATOL, (final, reference[STEPS])


def test_kill_during_checkpoint_write_keeps_the_previous_checkpoint(tmp_path: Path, reference):
    out = tmp_path / "torn"
    died = run(
        out,
        "training.save_every_steps=2",
        "--nproc",
        "2",
        env={"POSTTRAIN_FAULT": "checkpoint_write:4"},
        check=False,
    )
    assert died.returncode != 0
    root = out / "checkpoints"
    assert (root / ".tmp_step_000004").is_dir()  # the torn write is still there...
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step_000002"]  # ...and never listed
    proc = run(out, "training.save_every_steps=2", "--resume", "--nproc", "2")
    assert "at step 2" in proc.stdout
    assert not (root / ".tmp_step_000004").exists()  # cleaned by the next save
    assert abs(losses(out)[STEPS] - reference[STEPS]) <= LOSS_ATOL


def _export_logits(out: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def test_hf_export_from_sharded_state_matches_single_process(tmp_path: Path):
    """OUTPUT/hf gathered from FSDP shards after 3 trained steps loads in transformers with the
    single-process export's logits; gathered from FSDP x TP shards (lr 0, so training noise cannot hide
    a misplaced slice) it is bit-identical to the single-process export."""
    from safetensors.torch import load_file

    ids = torch.randint(0, 800, (2, 40), generator=torch.Generator().manual_seed(0))
    one, fsdp = tmp_path / "one", tmp_path / "fsdp"
    run(one, "training.export_hf=true", "training.max_steps=3")
    run(fsdp, "training.export_hf=true", "training.max_steps=3", "--nproc", "2")
    diff = float((_export_logits(one, ids) - _export_logits(fsdp, ids)).abs().max())
    print(f"max |logits(FSDP export) - logits(single-process export)| = {diff:.2e}")
    assert diff <= 1e-4

    frozen = ["training.export_hf=true", "training.max_steps=1", "optim.lr=0"]
    one0, tp0 = tmp_path / "one0", tmp_path / "tp0"
    run(one0, *frozen)
    run(tp0, *frozen, "parallelism.tp=2", "--nproc", "4")
    a, b = load_file(one0 / "hf/model.safetensors"), load_file(tp0 / "hf/model.safetensors")
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


def test_invalid_layout_fails_before_training_with_the_arithmetic(tmp_path: Path):
    proc = run(tmp_path / "bad", "parallelism.tp=3", "--nproc", "2", check=False)
    assert proc.returncode != 0
    assert "dp_replicate (1) x tp (3) = 3" in proc.stderr or "dp_replicate (1) x tp (3) = 3" in proc.stdout
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()


def test_fine_tuning_a_checkpoint_loads_straight_into_shards(tmp_path: Path):
    """model.path on 2 processes: meta build, FSDP, each rank reads only its slices of the safetensors;
    the trajectory equals the single-process fine-tune of the same checkpoint."""
    from posttrain.models.hf_io import save_pretrained
    from tests.helpers import tiny_model

    model, cfg = tiny_model(vocab_size=896)  # the builtin tokenizer's 843 tokens, padded to 64
    save_pretrained(model, cfg, tmp_path / "base")
    args = [f"model.path={tmp_path / 'base'}", "model.arch=null"]
    one, two = tmp_path / "one", tmp_path / "two"
    run(one, *args)
    run(two, *args, "--nproc", "2")
    assert_same_trajectory(losses(two), losses(one))
    notes = json.loads((two / "summary.json").read_text())["model_notes"]
    assert any("straight into each rank's shards" in n for n in notes), notes
