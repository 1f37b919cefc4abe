"""The process's place in the job: rank, world size, device and the device mesh.

One process with no launcher is a world of one: no process group, no mesh, every helper here is a
no-op, and the recipes run the same code. Under `posttrain run --nproc N` (or the Ray launcher) the
torchrun environment variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) are set and
`init_world` joins the process group (gloo on CPU, NCCL on GPUs) and builds the mesh.

The mesh has three named dimensions, ("dp_replicate", "dp_shard", "tp"), whose sizes come from the
`parallelism` section; `plan_layout` checks the arithmetic before anything is built.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from posttrain.config import ParallelismConfig
from posttrain.errors import ConfigError

MESH_DIMS = ("dp_replicate", "dp_shard", "tp")


@dataclass(frozen=True)
class Layout:
    dp_replicate: int
    dp_shard: int
    tp: int

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def world_size(self) -> int:
        return self.dp * self.tp


def plan_layout(
    par: ParallelismConfig,
    world_size: int,
    *,
    num_heads: int | None = None,
    num_kv_heads: int | None = None,
) -> Layout:
    """Resolve dp_shard=-1 and check that the degrees fit the world and the model's heads."""
    for key in ("dp_replicate", "tp"):
        if getattr(par, key) < 1:
            raise ConfigError(f"parallelism.{key}={getattr(par, key)} must be >= 1")
    rest = par.dp_replicate * par.tp
    if par.dp_shard == -1:
        if world_size % rest:
            raise ConfigError(
                f"parallelism: world size {world_size} is not divisible by dp_replicate ({par.dp_replicate}) "
                f"x tp ({par.tp}) = {rest}, so dp_shard=-1 has no integer value"
            )
        dp_shard = world_size // rest
    else:
        dp_shard = par.dp_shard
        if dp_shard < 1 or dp_shard * rest != world_size:
            raise ConfigError(
                f"parallelism: dp_replicate ({par.dp_replicate}) x dp_shard ({dp_shard}) x tp ({par.tp}) "
                f"= {dp_shard * rest}, but the world size is {world_size}"
            )
    if par.tp > 1:
        for name, n in (("num_attention_heads", num_heads), ("num_key_value_heads", num_kv_heads)):
            if n is not None and n % par.tp:
                raise ConfigError(
                    f"parallelism.tp={par.tp} does not divide the model's {name}={n} "
                    f"({n} / {par.tp} = {n / par.tp:g} heads per rank)"
                )
    if par.activation_checkpointing == "selective" and par.ac_every_n_layers < 1:
        raise ConfigError(f"parallelism.ac_every_n_layers={par.ac_every_n_layers} must be >= 1")
    return Layout(par.dp_replicate, dp_shard, par.tp)


@dataclass
class World:
    """Where this process sits. `dp_rank`/`dp_size` index data-parallel groups (TP ranks share data)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    layout: Layout = Layout(1, 1, 1)
    mesh: object | None = None  # torch DeviceMesh with MESH_DIMS, None in a world of one

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def dp_size(self) -> int:
        return self.layout.dp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.layout.tp  # tp is the innermost mesh dimension

    def sum_over_dp(self, values: list[float]) -> list[float]:
        """Sum values over data-parallel ranks (every TP rank of a group holds the same values)."""
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return (t / self.layout.tp).tolist()

    def max_over_ranks(self, value: float) -> float:
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def launched() -> bool:
    """True inside a process started by `--nproc`, torchrun or the Ray launcher."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _store(world_size: int, timeout: datetime.timedelta):
    """The rendezvous store, namespaced by restart attempt.

    Under torch's elastic agent the workers share the agent's TCP store, which outlives a restart; the
    keys a process group writes there (each rank's address) would be read back stale by the next
    attempt's workers. A prefix per attempt keeps the attempts apart. Without the agent's store (Ray,
    plain torchrun-style env) rank 0 hosts a fresh store, as env:// would."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world_size,
        is_master=not agent_store and int(os.environ["RANK"]) == 0,
        timeout=timeout,
    )
    return dist.PrefixStore(f"posttrain/attempt_{attempt}", store)


def use_cuda(device: str, par: ParallelismConfig | None = None) -> bool:
    """training.device (auto | cpu | cuda) and parallelism.backend -> whether this process computes on a
    GPU. Asking for CUDA on a machine without one is a config error, not a silent CPU run."""
    if device == "cuda" or (par is not None and par.backend == "nccl"):
        if not torch.cuda.is_available():
            key = "training.device=cuda" if device == "cuda" else "parallelism.backend=nccl"
            raise ConfigError(f"{key}, but torch sees no CUDA device (use auto or cpu on this machine)")
        return True
    if device == "cpu" or (par is not None and par.backend == "gloo"):
        return False
    return torch.cuda.is_available()


def init_world(
    par: ParallelismConfig,
    *,
    device: str = "auto",
    num_heads: int | None = None,
    num_kv_heads: int | None = None,
) -> World:
    """Join the process group (when launched) and build the mesh; a world of one otherwise. device:
    training.device; a world of one computes on cuda:0 or the CPU, a launched worker on its local GPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1")) if launched() else 1
    layout = plan_layout(par, world_size, num_heads=num_heads, num_kv_heads=num_kv_heads)
    if world_size == 1:
        return World(
            device=torch.device("cuda", 0) if use_cuda(device, par) else torch.device("cpu"), layout=layout
        )
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda_ = use_cuda(device, par)
    if use_cuda_:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        timeout = datetime.timedelta(minutes=int(os.environ.get("POSTTRAIN_DIST_TIMEOUT_MIN", "30")))
        dist.init_process_group(
            "nccl" if use_cuda_ else "gloo",
            store=_store(world_size, timeout),
            rank=rank,
            world_size=world_size,
            timeout=timeout,
        )
    from torch.distributed.device_mesh import init_device_mesh

    # DTensor warns on every gradient-norm reduction over two mesh dimensions (two all-reduces instead
    # of one flattened one); correct, and per step, so keep it out of the training log.
    logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)

    mesh = init_device_mesh(
        device.type, (layout.dp_replicate, layout.dp_shard, layout.tp), mesh_dim_names=MESH_DIMS
    )
    return World(rank, world_size, local_rank, device, layout, mesh)


def close_world(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
