"""Worker groups: the same role classes (posttrain/rl/workers.py) in this process or as Ray actors.

A group is a list of workers of one role and two ways to call them: `call(method, *args)` runs the
same call on every worker (SPMD: the policy's ranks), `call_each(method, per_worker_args)` gives each
worker its own arguments (a share of the prompts or micro-batches). Locally the calls are plain method
calls; on Ray they are actor calls whose results are gathered with `ray.get`, so every worker of a
group runs concurrently.

Placement (`rl.placement`), with resource pools made of Ray placement groups:

  separate   the policy's ranks get one bundle each; the rollout workers another pool; the reference
             and reward workers a third. Roles overlap in time only through the controller.
  colocated  one pool, one bundle per policy rank; rollout, reference and reward workers take
             fractions of the same bundles (on GPUs: the same devices, as in verl's hybrid engine).

Ray is imported only here, and only when `rl.local` is false.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from dataclasses import dataclass

from posttrain.rl.grpo import empty_batch


class LocalGroup:
    def __init__(self, workers: list):
        self.workers = workers

    def __len__(self) -> int:
        return len(self.workers)

    def call(self, method: str, *args, **kwargs) -> list:
        return [getattr(w, method)(*args, **kwargs) for w in self.workers]

    def call_each(self, method: str, per_worker: Sequence[tuple], **kwargs) -> list:
        return [getattr(w, method)(*args, **kwargs) for w, args in zip(self.workers, per_worker)]

    def put(self, value):
        return value

    def shutdown(self) -> None:
        for w in self.workers:
            if hasattr(w, "close"):
                w.close()


class RayGroup:
    def __init__(self, actors: list):
        self.workers = actors

    def __len__(self) -> int:
        return len(self.workers)

    def call(self, method: str, *args, **kwargs) -> list:
        import ray

        return ray.get([getattr(a, method).remote(*args, **kwargs) for a in self.workers])

    def call_each(self, method: str, per_worker: Sequence[tuple], **kwargs) -> list:
        import ray

        return ray.get(
            [getattr(a, method).remote(*args, **kwargs) for a, args in zip(self.workers, per_worker)]
        )

    def put(self, value):
        import ray

        return ray.put(value)  # one copy in the object store for every worker

    def shutdown(self) -> None:
        import ray

        try:
            ray.get([a.close.remote() for a in self.workers if hasattr(a, "close")], timeout=60)
        except Exception:  # noqa: BLE001 - best effort: the actors are killed next anyway
            pass
        for a in self.workers:
            ray.kill(a)


@dataclass
class WorkerGroups:
    """The four roles of a GRPO job, local or on Ray; `shutdown` frees them (and the Ray pools)."""

    policy: LocalGroup | RayGroup
    rollout: LocalGroup | RayGroup
    reference: LocalGroup | RayGroup | None  # only with the KL term
    reward: LocalGroup | RayGroup
    pools: Pools | None = None

    def shutdown(self) -> None:
        for group in (self.policy, self.rollout, self.reference, self.reward):
            if group is not None:
                group.shutdown()
        if self.pools is not None:
            self.pools.remove()


def make_groups(cfg, total_steps: int, semantic_ids=None) -> WorkerGroups:
    """The policy (SPMD trainer of `total_steps` optimizer steps), rollout, reference (rl.kl_coef != 0)
    and reward groups: plain objects in this process with rl.local, else Ray actors placed by pools.
    `semantic_ids`: the event hook's constraint builder (posttrain/rl/workers.py build_constraint)."""
    from posttrain.rl import workers

    need_reference = cfg.rl.kl_coef != 0.0
    if not cfg.rl.local:
        return WorkerGroups(*ray_groups(cfg, total_steps, need_reference, semantic_ids))
    return WorkerGroups(
        LocalGroup([workers.PolicyWorker(cfg, total_steps, semantic_ids=semantic_ids)]),
        LocalGroup([workers.RolloutWorker(cfg, semantic_ids) for _ in range(cfg.rl.rollout_workers)]),
        LocalGroup([workers.ReferenceWorker(cfg, semantic_ids)]) if need_reference else None,
        LocalGroup([workers.RewardWorker(cfg)]),
    )


def deal(batches: list[dict], ranks: int, pad_id: int, row_len: int) -> list[list[dict]]:
    """Micro-batches to data-parallel ranks, round robin, padded with empty micro-batches so that every
    rank runs the same number of forward/backward passes (FSDP's collectives need it)."""
    shares = [batches[r::ranks] for r in range(ranks)]
    most = max(len(s) for s in shares)
    for s in shares:
        rows = s[0]["input_ids"].shape[0] if s else batches[0]["input_ids"].shape[0] if batches else 1
        s.extend(empty_batch(pad_id, row_len, rows) for _ in range(most - len(s)))
    return shares


def undeal(shares: list[list], count: int) -> list:
    """Inverse of `deal` for per-micro-batch results (drops the padding's)."""
    out = [None] * count
    for r, share in enumerate(shares):
        for j, value in enumerate(share):
            i = r + j * len(shares)
            if i < count:
                out[i] = value
    return out


# ------------------------------------------------------------------------------ Ray


def _node_address() -> tuple[str, int]:
    """(IP, a free port) of the node this runs on: where the policy's rank 0 hosts its store."""
    import ray

    with socket.socket() as s:
        s.bind(("", 0))
        return ray.util.get_node_ip_address(), s.getsockname()[1]


class Pools:
    """Ray placement groups for the roles, from rl.placement."""

    def __init__(self, cfg, use_gpu: bool):
        import ray
        from ray.util.placement_group import placement_group

        r = cfg.rl
        bundle = {"CPU": 1.0, **({"GPU": 1.0} if use_gpu else {})}
        self.use_gpu, self.colocated = use_gpu, r.placement == "colocated"
        self.policy = placement_group([dict(bundle)] * r.policy_workers, strategy="PACK")
        groups = [self.policy]
        if not self.colocated:
            self.rollout = placement_group([dict(bundle)] * r.rollout_workers, strategy="PACK")
            self.aux = placement_group([{"CPU": 1.0}], strategy="PACK")
            groups += [self.rollout, self.aux]
        ray.get([g.ready() for g in groups], timeout=600)
        self.groups = groups

    def options(self, role: str, index: int) -> dict:
        """Actor options: where a role's worker `index` goes and what share of its bundle it takes."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if self.colocated:
            pg, bundle = self.policy, index % self.policy.bundle_count
            share = {"policy": 0.5, "rollout": 0.25, "reference": 0.125, "reward": 0.125}[role]
        elif role == "policy":
            pg, bundle, share = self.policy, index, 1.0
        elif role == "rollout":
            pg, bundle, share = self.rollout, index, 1.0
        else:
            pg, bundle, share = self.aux, 0, 0.5
        opts = {
            "num_cpus": share,
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                placement_group=pg, placement_group_bundle_index=bundle
            ),
        }
        if self.use_gpu and role != "reward" and (self.colocated or role != "reference"):
            opts["num_gpus"] = share
        return opts

    started_ray = False  # this job started the (local) Ray, so it shuts it down

    def remove(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for g in self.groups:
            remove_placement_group(g)
        if self.started_ray:
            ray.shutdown()


def ray_groups(cfg, total_steps: int, need_reference: bool, semantic_ids=None):
    """(policy, rollout, reference or None, reward) groups as Ray actors, and the pools to free
    (`semantic_ids`: the event hook's constraint builder, see workers.build_constraint)."""
    import ray
    import torch

    from posttrain.parallel.ray_cluster import connect_ray
    from posttrain.rl import workers

    r = cfg.rl
    bundles = r.policy_workers + (0 if r.placement == "colocated" else r.rollout_workers + 1)
    started = connect_ray(ray, r.ray_address, bundles)  # a local Ray gets enough logical CPUs for the pools

    use_gpu = torch.cuda.is_available() and ray.cluster_resources().get("GPU", 0) > 0
    pools = Pools(cfg, use_gpu)
    actor = lambda cls: ray.remote(cls)  # noqa: E731
    n = cfg.rl.policy_workers
    # The policy's ranks rendezvous like torchrun workers; rank 0's node hosts the store.
    master, port = ray.get(ray.remote(_node_address).options(**pools.options("policy", 0)).remote())
    policy = [
        actor(workers.PolicyWorker)
        .options(**pools.options("policy", r))
        .remote(
            cfg,
            total_steps,
            {
                "RANK": str(r),
                "LOCAL_RANK": "0",  # each actor sees only its bundle's device
                "WORLD_SIZE": str(n),
                "MASTER_ADDR": master,
                "MASTER_PORT": str(port),
            }
            if n > 1
            else None,
            semantic_ids,
        )
        for r in range(n)
    ]
    rollout = [
        actor(workers.RolloutWorker).options(**pools.options("rollout", i)).remote(cfg, semantic_ids)
        for i in range(cfg.rl.rollout_workers)
    ]
    reference = None
    if need_reference:
        reference = RayGroup(
            [
                actor(workers.ReferenceWorker)
                .options(**pools.options("reference", 0))
                .remote(cfg, semantic_ids)
            ]
        )
    reward = RayGroup([actor(workers.RewardWorker).options(**pools.options("reward", 0)).remote(cfg)])
    pools.started_ray = started
    return RayGroup(policy), RayGroup(rollout), reference, reward, pools
