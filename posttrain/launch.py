"""One job interface from a process to a cluster: `posttrain run CONFIG [--nproc N] [--launcher ray]`.

Every launcher starts the same SPMD worker: `posttrain run CONFIG OVERRIDES...` with torchrun's
environment variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) set, which makes the
recipe join the process group (see posttrain/parallel/world.py). Nothing else differs between a
laptop run and a cluster run; the job file's `parallelism` section says how the model is sharded.

* no flag: this process is the job (a world of one, no process group).
* `--nproc N` (launcher `local`): torch's elastic agent (what `torchrun --standalone` runs) starts N
  local processes and, with `--max-restarts K`, restarts *all* of them when one dies.
* `--launcher ray`: N Ray actors in a placement group (one bundle per worker), on a local Ray or an
  existing cluster (`--ray-address`); see posttrain/launch_ray.py.

Restarts resume: a restarted worker sees TORCHELASTIC_RESTART_COUNT > 0 and continues from the latest
complete checkpoint in output_dir (so set `training.save_every_steps` when using `--max-restarts`).
"""

from __future__ import annotations

import os
import sys
import uuid

RESTART_ENV = "TORCHELASTIC_RESTART_COUNT"


def restart_count() -> int:
    """How many times this job's workers were restarted after a failure (0 on the first attempt)."""
    return int(os.environ.get(RESTART_ENV, "0"))


def worker_command(config: str, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "posttrain.cli", "run", config, *overrides]


def threads_per_worker(nproc: int) -> int:
    """CPU threads per worker so that N workers do not oversubscribe the machine's cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // nproc)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_local(config: str, overrides: list[str], nproc: int, max_restarts: int = 0) -> int:
    """Run N local workers under torch's elastic agent; returns 0 when every worker succeeded."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    os.environ.setdefault("OMP_NUM_THREADS", str(threads_per_worker(nproc)))
    launch = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=str(uuid.uuid4()),
        # One node: a static rendezvous on a free local port (node rank 0), as torchrun --nnodes 1.
        rdzv_backend="static",
        rdzv_endpoint=f"127.0.0.1:{free_port()}",
        rdzv_configs={"rank": 0},
        max_restarts=max_restarts,
        monitor_interval=0.5,
        start_method="spawn",
    )
    cmd = worker_command(config, overrides)
    try:
        elastic_launch(launch, cmd[0])(*cmd[1:])
    except ChildFailedError as err:
        rank, first = next(iter(err.failures.items()))  # keyed by global rank
        print(
            f"error: worker rank {rank} failed (exit code {first.exitcode}) after "
            f"{max_restarts} restart(s) allowed; see its output above",
            file=sys.stderr,
        )
        return 1
    return 0
