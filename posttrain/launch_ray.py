"""`posttrain run CONFIG --nproc N --launcher ray`: the job's N SPMD workers as Ray actors.

The workers are the same as under the local launcher (posttrain/launch.py): `posttrain run CONFIG
OVERRIDES...` with torchrun's environment variables set. Ray only decides *where* they run: a placement
group reserves one bundle per worker ({"CPU": 1}, plus {"GPU": 1} on GPU jobs), on a local Ray or on any
node of an existing cluster, and one actor per bundle starts its rank.

Each actor runs its worker as a subprocess instead of calling the recipe in-process. The actor is a
long-lived Ray worker; a training process leaves CUDA contexts, NCCL/gloo groups and threads behind, and
a worker that is SIGKILLed (OOM killer, the POSTTRAIN_FAULT test hook) must be seen as an exit code
rather than as a lost actor. The subprocess's output is copied line by line to the actor's stdout, which
Ray forwards to the driver prefixed with the rank.

Failure handling is torch elastic's: when any worker fails, every worker is stopped, and with
`max_restarts` left all of them start again with TORCHELASTIC_RESTART_COUNT=<attempt>, which makes
`posttrain run` resume from the latest complete checkpoint (posttrain/cli.py). Every attempt gets new
actors and a new rendezvous port, so nothing from a failed attempt (a half-open store, a stuck
collective) can leak into the next.

Ray is imported only inside these functions: `import posttrain` and the local launcher never need it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable

from posttrain.launch import RESTART_ENV, worker_command
from posttrain.parallel.ray_cluster import connect_ray

# Driver environment variables that reach the workers even on a remote cluster, where the actors do not
# inherit the driver's environment (a local Ray does: its processes are the driver's children).
FORWARDED_ENV_PREFIX = "POSTTRAIN_"
STOP_GRACE_S = 5.0


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn that makes the kernel SIGKILL the worker when its actor dies (Linux only).

    `ray.kill` and a node's OOM killer end the actor with SIGKILL, which gives it no chance to stop its
    subprocess; without this the worker would live on, holding its GPU and blocking the next attempt's
    rendezvous. The libc function is looked up here, before the fork, so the child only calls it."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    pr_set_pdeathsig = 1
    return lambda: prctl(pr_set_pdeathsig, signal.SIGKILL)


class _RankWorker:
    """One rank of the job: a Ray actor that runs `posttrain run ...` in a subprocess.

    Created with max_concurrency=2 so that `stop` can run while `run` is blocked on the subprocess."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.proc: subprocess.Popen | None = None
        self.stopped = False
        self.lock = threading.Lock()

    def __repr__(self) -> str:
        return f"rank{self.rank}"  # Ray prefixes the forwarded output with this: "(rank1 pid=..., ip=...)"

    def placement(self) -> dict:
        """Where Ray put this actor: node id and IP, and the GPUs of its bundle (physical ids)."""
        import ray

        return {
            "node_id": ray.get_runtime_context().get_node_id(),
            "ip": ray.util.get_node_ip_address(),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
        }

    def free_port(self) -> int:
        """A free TCP port on this node, for rank 0's rendezvous store (bound on all interfaces, since
        the other ranks connect from other nodes)."""
        with socket.socket() as s:
            s.bind(("", 0))
            return s.getsockname()[1]

    def run(self, cmd: list[str], env: dict[str, str], cwd: str | None) -> int:
        """Run the worker to completion, streaming its output; returns its exit code (-N: signal N)."""
        with self.lock:
            if self.stopped:  # the driver gave up on this attempt before the worker started
                return -int(signal.SIGTERM)
            self.proc = subprocess.Popen(
                cmd,
                env={**os.environ, **env},
                # The driver's directory, so relative paths in the job mean the same as on the driver;
                # a node that does not have it runs the worker in the actor's own directory.
                cwd=cwd if cwd and os.path.isdir(cwd) else None,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
                start_new_session=True,  # its own process group: `stop` also reaches its children
                preexec_fn=_die_with_parent(),
            )
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
        return self.proc.wait()

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """SIGTERM the worker's process group, SIGKILL it after `grace_s` (no-op once it has exited)."""
        with self.lock:
            self.stopped = True
            proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(timeout=grace_s)
                return
            except subprocess.TimeoutExpired:
                continue


def _bundle(resources_per_worker: dict | None, use_gpu: bool | None) -> dict[str, float]:
    if resources_per_worker is not None:
        return {k: float(v) for k, v in resources_per_worker.items()}
    if use_gpu is None:
        import torch

        use_gpu = torch.cuda.is_available()
    return {"CPU": 1.0, **({"GPU": 1.0} if use_gpu else {})}


def _rank_envs(
    places: list[dict], port: int, attempt: int, node_cpus: dict[str, float], extra: dict[str, str]
) -> list[dict[str, str]]:
    """torchrun's variables for every rank, from where Ray placed the actors.

    LOCAL_RANK is the rank's index among this job's actors on its node. On GPUs, Ray shows each actor
    only its own bundle's GPU (CUDA_VISIBLE_DEVICES); every rank of a node sees the node's GPUs of this
    job instead, in local-rank order, so that `cuda:LOCAL_RANK` is its own GPU and NCCL can use
    peer-to-peer paths between them. OMP_NUM_THREADS divides the node's Ray CPUs among its ranks."""
    by_node: dict[str, list[int]] = {}
    for rank, place in enumerate(places):
        by_node.setdefault(place["node_id"], []).append(rank)
    envs = []
    for rank, place in enumerate(places):
        peers = by_node[place["node_id"]]
        env = {
            "OMP_NUM_THREADS": str(max(1, int(node_cpus.get(place["node_id"], 1) // len(peers)))),
            "PYTHONUNBUFFERED": "1",  # the output goes through a pipe: line by line, not in 8 KiB blocks
            **extra,
            "RANK": str(rank),
            "WORLD_SIZE": str(len(places)),
            "LOCAL_RANK": str(peers.index(rank)),
            "LOCAL_WORLD_SIZE": str(len(peers)),
            "MASTER_ADDR": places[0]["ip"],
            "MASTER_PORT": str(port),
            RESTART_ENV: str(attempt),
        }
        gpus = [g for peer in peers for g in places[peer]["gpu_ids"]]
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
        envs.append(env)
    return envs


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _attempt(
    ray, pg, bundle: dict[str, float], cmd: list[str], extra: dict[str, str], nproc: int, attempt: int
) -> tuple[int, str] | None:
    """Start one actor per bundle, run every rank, wait; None on success, else (rank, what happened).

    The first failure ends the attempt: the other ranks would only block in a collective until the
    process-group timeout. Whatever happens, every actor and worker of the attempt is stopped."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    options: dict = {"num_cpus": bundle.get("CPU", 0.0), "num_gpus": bundle.get("GPU", 0.0)}
    custom = {k: v for k, v in bundle.items() if k not in ("CPU", "GPU")}
    if custom:
        options["resources"] = custom
    worker_cls = ray.remote(_RankWorker)
    actors = [
        worker_cls.options(
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i),
            max_concurrency=2,
            max_restarts=0,
            **options,
        ).remote(i)
        for i in range(nproc)
    ]
    try:
        try:
            places = ray.get([a.placement.remote() for a in actors])
            port = ray.get(actors[0].free_port.remote())
        except ray.exceptions.RayError as err:
            return 0, f"could not start its actor ({type(err).__name__}: {err})"
        node_cpus = {n["NodeID"]: n["Resources"].get("CPU", 1.0) for n in ray.nodes() if n.get("Alive")}
        envs = _rank_envs(places, port, attempt, node_cpus, extra)
        pending = {actors[r].run.remote(cmd, envs[r], os.getcwd()): r for r in range(nproc)}
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            rank = pending.pop(ref)
            try:
                code = ray.get(ref)
            except ray.exceptions.RayActorError as err:
                return rank, f"lost its actor ({type(err).__name__}: the actor process or its node died)"
            except ray.exceptions.RayError as err:
                return rank, f"could not run ({err})"
            if code != 0:
                return rank, _describe(code)
        return None
    finally:
        _stop(ray, actors)


def _stop(ray, actors: list) -> None:
    """Stop every worker (SIGTERM, then SIGKILL), then the actors; dead actors are skipped quietly."""
    refs = [a.stop.remote() for a in actors]
    ray.wait(refs, num_returns=len(refs), timeout=STOP_GRACE_S + 10)
    for actor in actors:
        try:
            ray.kill(actor)
        except Exception:  # already gone
            pass


def launch_ray(
    config: str,
    overrides: list[str],
    nproc: int,
    *,
    max_restarts: int = 0,
    address: str | None = None,
    resources_per_worker: dict | None = None,
    use_gpu: bool | None = None,
    placement_strategy: str = "PACK",
    env: dict[str, str] | None = None,
    placement_timeout_s: float = 600.0,
) -> int:
    """Run `posttrain run CONFIG OVERRIDES...` as `nproc` Ray actors; 0 when every worker succeeded.

    address: an existing cluster ("ray://" or "host:port"); None starts a local Ray (or joins
      RAY_ADDRESS). A Ray this call started is shut down at the end; one it found running is left alone.
    resources_per_worker: one placement-group bundle, e.g. {"CPU": 8, "GPU": 1}; by default {"CPU": 1},
      plus {"GPU": 1} when `use_gpu` (default: whether this driver sees CUDA).
    placement_strategy: Ray's PACK (few nodes, default), SPREAD, STRICT_PACK or STRICT_SPREAD.
    env: extra environment for every worker, over the driver's POSTTRAIN_* variables (forwarded too).
    placement_timeout_s: how long to wait for the cluster to have room for all bundles.
    """
    # Ray's `uv run` hook would package the working directory and ship it to the workers; they run on
    # the driver's filesystem instead. Must be set before Ray is imported.
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    started = connect_ray(ray, address, nproc)
    pg = None
    try:
        bundle = _bundle(resources_per_worker, use_gpu)
        pg = placement_group([dict(bundle) for _ in range(nproc)], strategy=placement_strategy)
        ready, _ = ray.wait([pg.ready()], timeout=placement_timeout_s)
        if not ready:
            print(
                f"error: Ray could not place {nproc} worker(s) of {bundle} with strategy "
                f"{placement_strategy} within {placement_timeout_s:.0f}s; the cluster has "
                f"{ray.cluster_resources()} in all, {ray.available_resources()} free",
                file=sys.stderr,
            )
            return 1
        cmd = worker_command(config, overrides)
        extra = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIX)}
        extra.update({k: str(v) for k, v in (env or {}).items()})
        for attempt in range(max(0, max_restarts) + 1):
            failure = _attempt(ray, pg, bundle, cmd, extra, nproc, attempt)
            if failure is None:
                return 0
            rank, what = failure
            if attempt < max_restarts:
                print(
                    f"posttrain ray: worker rank {rank} {what}; restarting all {nproc} worker(s) from the "
                    f"latest checkpoint (restart {attempt + 1} of {max_restarts})",
                    file=sys.stderr,
                    flush=True,
                )
        print(
            f"error: worker rank {rank} {what} after {max_restarts} restart(s) allowed; see its output above",
            file=sys.stderr,
            flush=True,
        )
        return 1
    finally:
        if pg is not None:
            remove_placement_group(pg)
        if started:
            ray.shutdown()
