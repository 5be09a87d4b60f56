"""What a user sets for Ray: where the cluster is, how many workers, how actor state travels."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Literal

from render.errors import RetargetError

ACTOR_STATES = ("ship", "recompute")


@dataclass
class RayOptions:
    """`--ray` and its companions (the same for `retarget run` and `retarget batch`).

    address: "auto" (RAY_ADDRESS, else the cluster `ray start` made on this machine, else a new
    local one), "local" (always a new local one), or a cluster address (HOST:6379, ray://HOST:10001).
    workers: Ray actors to start; 0: one per GPU of the cluster (no GPU: one per
    `cpus_per_worker` CPUs). cpus_per_worker: CPUs (torch threads) of a CPU actor; 0: 4, at most
    the cluster's. actor_state: "ship" prepares the actor (identity, reference latent, bank) once
    on one worker and sends it to the others through the object store; "recompute" has every
    worker prepare it from the photo (the same numbers: the preparation is deterministic).
    in_flight: batches queued on each actor, so a GPU does not wait for the driver between batches.
    max_restarts: how often Ray restarts a dead actor (and retries its batches) before the driver
    hands its batches to the others. worker_threads: CPU threads (torch, OpenCV) of a GPU actor for
    its host-side work (face alignment on the photo, per-batch copies); 0: min(4, the cluster's CPUs
    per GPU). Ray reserves one CPU per GPU actor and sets OMP_NUM_THREADS to it, which alone would
    leave torch one thread; the threads are not reserved (so a GPU actor needs one free CPU to be
    scheduled, as before), and at most CPUs/GPUs keeps a full node of GPU actors within its cores.
    CPU actors use `cpus_per_worker` threads instead. Frames do not depend on it (the GPU does the math).
    """

    address: str = "auto"
    workers: int = 0
    cpus_per_worker: int = 0
    actor_state: Literal["ship", "recompute"] = "ship"
    in_flight: int = 2
    max_restarts: int = 2
    worker_threads: int = 0

    def __post_init__(self):
        if self.actor_state not in ACTOR_STATES:
            raise RetargetError(f"--ray-actor-state must be one of {', '.join(ACTOR_STATES)}, got {self.actor_state!r}")
        for name in ("workers", "cpus_per_worker", "max_restarts", "worker_threads"):
            if getattr(self, name) < 0:
                raise RetargetError(f"--ray-{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.in_flight < 1:
            raise RetargetError(f"in_flight must be >= 1, got {self.in_flight}")


def add_ray_options(parser: argparse.ArgumentParser) -> None:
    """Add `--ray [ADDRESS]`, `--ray-workers`, `--ray-cpus-per-worker`, `--ray-worker-threads`,
    `--ray-actor-state` to `parser`."""
    g = parser.add_argument_group("ray options (render on a Ray cluster; see README 'Scale out')")
    g.add_argument("--ray", nargs="?", const="auto", default=None, metavar="ADDRESS",
                   help="render on Ray actors: auto (default; RAY_ADDRESS, a `ray start` cluster here, "
                        "else a local one), local, or HOST:6379 / ray://HOST:10001")
    g.add_argument("--ray-workers", type=int, default=0, metavar="N",
                   help="Ray actors to start (default 0: one per GPU; CPU-only: one per 4 CPUs)")
    g.add_argument("--ray-cpus-per-worker", type=int, default=0, metavar="N",
                   help="CPUs (threads) of each CPU actor (default 0: 4, at most the cluster's)")
    g.add_argument("--ray-worker-threads", type=int, default=0, metavar="N",
                   help="CPU threads of each GPU actor for its host-side work (default 0: min(4, CPUs per GPU))")
    g.add_argument("--ray-actor-state", default="ship", choices=ACTOR_STATES,
                   help="ship: prepare the actor once and send it through the object store (default); "
                        "recompute: every worker prepares it from the photo (same frames)")


def ray_options_from_args(args: argparse.Namespace) -> RayOptions | None:
    """RayOptions from the parsed `add_ray_options` flags, or None without `--ray`."""
    if getattr(args, "ray", None) is None:
        return None
    return RayOptions(address=args.ray, workers=args.ray_workers, cpus_per_worker=args.ray_cpus_per_worker,
                      actor_state=args.ray_actor_state, worker_threads=args.ray_worker_threads)
