"""Joining a Ray cluster, for the two places that place work on one: the SPMD launcher
(posttrain/launch_ray.py) and the RL worker groups (posttrain/rl/groups.py). Ray is passed in by the
caller (imported lazily there), so `import posttrain` never imports it.
"""

from __future__ import annotations

import os


def connect_ray(ray, address: str | None, nproc: int) -> bool:
    """Join a Ray (existing, or a new local one); True when this call did, so must shut it down.

    A local Ray gets at least `nproc` CPUs so that the N one-CPU bundles fit on a small machine. No
    runtime_env is set: the workers run in the driver's filesystem (see posttrain/launch_ray.py `_RankWorker.run`), and each
    rank's environment is passed to its subprocess explicitly."""
    if ray.is_initialized():
        return False
    if address is None and not os.environ.get("RAY_ADDRESS"):
        ray.init(address="local", num_cpus=max(nproc, os.cpu_count() or 1), include_dashboard=False)
    else:  # an explicit address, or RAY_ADDRESS (e.g. set by `ray job submit` for its entrypoint)
        ray.init(address=address)
    return True
