"""Ray execution of evaluation shards: worker actors that load the backbone once, a retrying scheduler.

* :func:`init_ray` connects to ``evaluate.ray.address`` / ``$RAY_ADDRESS`` when set, else starts a local
  cluster on 127.0.0.1 (no dashboard, object store capped at ``ray.object_store_mb``, ``ray.num_cpus``
  CPUs). A session that is already initialised (e.g. by a test) is reused and left running.
* :func:`run_ray` starts ``min(workers, shards)`` :class:`~pipeline.eval.runner.EvalWorker` actors
  (``ray.actor_num_cpus`` / ``ray.actor_num_gpus`` each) and hands each idle actor the next shard. A
  shard whose task raises is queued again until it has failed ``max_retries + 1`` times; an actor that
  dies is replaced. Results come back to the driver, which writes each shard as soon as it arrives, so a
  stage that fails keeps every finished shard for the next run.

On a remote cluster every node needs the project installed and the backbone, adapter and data paths
(the driver sends absolute paths); results travel back through the object store.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

from pipeline.eval.runner import EvalParams, EvalWorker, ShardSpec, worker_threads

LOCAL_HOST = "127.0.0.1"


def init_ray(p: EvalParams) -> bool:
    """Initialise Ray for the evaluation; True when this call started it (the caller shuts it down)."""
    import ray

    if ray.is_initialized():
        return False
    address = p.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level="warning")
    else:
        ray.init(
            num_cpus=p.ray.num_cpus or os.cpu_count() or 1,
            object_store_memory=p.ray.object_store_mb * 2**20,
            include_dashboard=False,
            _node_ip_address=LOCAL_HOST,
            logging_level="warning",
        )
    return True


# Actors kept between runs of one driver session (same cluster, same worker settings), so a second
# run_evaluate in a notebook or a test does not load the backbone again. Emptied when Ray is shut down
# by run_ray, when the settings change, or by shutdown_pool().
_POOL: dict[str, Any] = {"key": None, "actors": []}


def _pool_key(p: EvalParams, backbone: str, threads: int | None) -> tuple:
    import ray

    node = ray.get_runtime_context().get_node_id()
    return (
        node,
        backbone,
        p.dtype,
        p.attn_implementation,
        p.device,
        threads,
        p.ray.actor_num_cpus,
        p.ray.actor_num_gpus,
    )


def shutdown_pool() -> None:
    """Kill the pooled worker actors (they hold their CPU/GPU reservations while alive)."""
    import ray

    actors, _POOL["actors"], _POOL["key"] = _POOL["actors"], [], None
    if ray.is_initialized():
        for actor in actors:
            ray.kill(actor, no_restart=True)


def run_ray(
    specs: Sequence[ShardSpec],
    p: EvalParams,
    backbone: str,
    on_result: Callable[[ShardSpec, dict[str, Any]], None],
) -> dict[str, str]:
    """Compute ``specs`` on Ray worker actors; returns ``{shard key: last error}`` of the shards that
    failed ``max_retries + 1`` times (the others have been passed to ``on_result``).

    When this call started Ray it shuts it down at the end; otherwise the actors stay alive for the
    next call with the same settings (see :func:`shutdown_pool`).
    """
    import ray
    from ray.exceptions import RayActorError

    failures: dict[str, str] = {}
    if not specs:
        return failures
    started = init_ray(p)
    try:
        actor_cls = ray.remote(EvalWorker).options(
            num_cpus=p.ray.actor_num_cpus, num_gpus=p.ray.actor_num_gpus, max_concurrency=1
        )
        threads = worker_threads(p, in_process=False)

        def new_actor() -> Any:
            return actor_cls.remote(backbone, p.dtype, p.device, threads, p.attn_implementation)

        key = _pool_key(p, backbone, threads)
        if _POOL["key"] != key:
            shutdown_pool()
            _POOL["key"] = key
        actors: list[Any] = _POOL["actors"]
        wanted = min(p.workers, len(specs))
        while len(actors) < wanted:
            actors.append(new_actor())
        queue: deque[tuple[ShardSpec, int]] = deque((s, 0) for s in specs)
        idle = list(range(wanted))
        running: dict[Any, tuple[ShardSpec, int, int]] = {}
        while queue or running:
            while queue and idle:
                spec, attempt = queue.popleft()
                slot = idle.pop()
                ref = actors[slot].run_shard.remote(asdict(spec), attempt)
                running[ref] = (spec, attempt, slot)
            ready, _ = ray.wait(list(running), num_returns=1)
            ref = ready[0]
            spec, attempt, slot = running.pop(ref)
            try:
                result = ray.get(ref)
            except RayActorError as err:  # the actor died (e.g. out of memory): replace it
                ray.kill(actors[slot], no_restart=True)
                actors[slot] = new_actor()
                error = f"worker died: {err}"
            except Exception as err:  # RayTaskError wrapping the shard's exception
                cause = getattr(err, "cause", None) or err
                error = f"{type(cause).__name__}: {cause}"
            else:
                idle.append(slot)
                on_result(spec, result)
                continue
            idle.append(slot)
            if attempt < p.max_retries:
                queue.append((spec, attempt + 1))
            else:
                failures[spec.key] = error
    finally:
        if started:
            shutdown_pool()
            ray.shutdown()
    return failures
