"""Phase 5b of ``evaluate``: executors — where shards are computed; the only module that imports Ray.

Both executors take the shards still to compute and a callback ``on_result(spec, result)`` (the driver
writes each shard as soon as it arrives, so a stage that fails keeps every finished shard), retry a
failed shard up to ``max_retries`` times, never retry an :class:`~pipeline.eval.errors.EvalInputError`
(bad input fails the same way every time), and return ``{shard key: last error}`` of the shards that
failed every attempt (:class:`Executor`).

* :class:`LocalExecutor` (``workers: 0``): one :class:`~pipeline.eval.worker.EvalWorker` in this process.
* :class:`RayExecutor`: ``workers`` actors of that class.

  - :func:`init_ray` connects to ``evaluate.ray.address`` / ``$RAY_ADDRESS`` when set, else starts a
    local cluster confined to 127.0.0.1 (:func:`pipeline.ray_local.start_local_ray`: no dashboard,
    object store capped at ``ray.object_store_mb``, ``ray.num_cpus`` CPUs). A session that is already
    initialised (e.g. by a test) is reused and left running.
  - :func:`fit_workers` checks, before any actor is created, how many actors of ``ray.actor_num_cpus`` /
    ``ray.actor_num_gpus`` the cluster's nodes can hold: more ``workers`` than that are reduced with a
    warning; none at all is an :class:`~pipeline.eval.errors.EvalInputError` (exit 2), never a hang.
  - :func:`run_ray` hands a shard only to an actor that has started (its constructor returned); an
    actor that never starts gets no work, and if none starts within ``ray.actor_start_timeout_s`` the
    stage stops with a clear error. An actor that dies is replaced. Every retry and replacement is
    logged with the shard, the worker and the reason.

No shared filesystem is needed: shard data, adapter files and (unless ``evaluate.ray.shared_storage`` or
the stage started its own local Ray) a local backbone folder travel as bytes through the object store
(:mod:`pipeline.eval.shipping`), results come back as the calls' return values with the node id of the
actor that computed them, and ``evaluate.ray.resources`` pins the actors to nodes that offer them.
"""

from __future__ import annotations

import os
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pipeline.eval.errors import EvalInputError, describe_error
from pipeline.eval.params import EvalParams
from pipeline.eval.plan import ShardSpec
from pipeline.eval.shipping import Shipper, fit_workers, folder_files, folder_size, ships_backbone
from pipeline.eval.worker import EvalWorker
from pipeline.ray_local import LocalRay, start_local_ray

OnResult = Callable[[ShardSpec, dict[str, Any]], None]


class Executor(Protocol):
    """Computes shards; returns ``{shard key: last error}`` of those that failed every attempt."""

    def run(self, specs: Sequence[ShardSpec], on_result: OnResult) -> dict[str, str]: ...


@dataclass
class LocalExecutor:
    """In this process (``workers: 0``); ``worker``: an already loaded one (tests, notebooks)."""

    p: EvalParams
    backbone: str
    worker: EvalWorker | None = None

    def run(self, specs: Sequence[ShardSpec], on_result: OnResult) -> dict[str, str]:
        return run_local(specs, self.p, self.backbone, on_result, self.worker)


@dataclass
class RayExecutor:
    """On ``workers`` Ray actors."""

    p: EvalParams
    backbone: str

    def run(self, specs: Sequence[ShardSpec], on_result: OnResult) -> dict[str, str]:
        return run_ray(specs, self.p, self.backbone, on_result)


def executor_for(p: EvalParams, backbone: str, worker: EvalWorker | None = None) -> Executor:
    """:class:`LocalExecutor` for ``workers: 0``, else :class:`RayExecutor`."""
    if p.workers == 0:
        return LocalExecutor(p, backbone, worker)
    return RayExecutor(p, backbone)


def worker_threads(p: EvalParams, in_process: bool) -> int | None:
    if p.threads:
        return p.threads
    return None if in_process else max(1, int(p.ray.actor_num_cpus))


def run_local(
    specs: Sequence[ShardSpec],
    p: EvalParams,
    backbone: str,
    on_result: OnResult,
    worker: EvalWorker | None = None,
) -> dict[str, str]:
    """Compute shards in this process with retries; returns ``{shard key: error}`` of the failed ones."""
    failures: dict[str, str] = {}
    if not specs:
        return failures
    if worker is None:
        try:
            worker = EvalWorker(
                backbone,
                p.dtype,
                p.device,
                worker_threads(p, in_process=True),
                attn_implementation=p.attn_implementation,
            )
        except OSError as err:  # missing / unreadable backbone files, offline hub: an input problem
            raise EvalInputError(f"backbone {backbone}: {describe_error(err)}") from None
    shipper = Shipper()  # in-process: the same payloads as on Ray, without the object store
    for spec in specs:
        for attempt in range(p.max_retries + 1):
            try:
                sent, data, adapter, extras = shipper.payload(spec)
                result = worker.run_payload(sent, attempt, data, adapter, extras)
            except EvalInputError:
                raise  # bad input fails the same way on every attempt: stop now (finished shards are kept)
            except Exception as err:
                error = f"{type(err).__name__}: {err}"
                if attempt < p.max_retries:
                    print(
                        f"evaluate: retrying {spec.key} (attempt {attempt + 2} of {p.max_retries + 1}) after: "
                        f"{describe_error(err)}",
                        file=sys.stderr,
                        flush=True,
                    )
                continue
            on_result(spec, result)
            break
        else:
            failures[spec.key] = error
        shipper.release(spec)
    return failures


# the local cluster started by init_ray (None: none, or a session we did not start)
_LOCAL: dict[str, LocalRay | None] = {"ray": None}


def _log(msg: str) -> None:
    print(f"evaluate: {msg}", file=sys.stderr, flush=True)


def init_ray(p: EvalParams) -> bool:
    """Initialise Ray for the evaluation; True when this call started it (the caller shuts it down)."""
    import ray

    if ray.is_initialized():
        return False
    address = p.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level="warning")
    else:
        _LOCAL["ray"] = start_local_ray(
            num_cpus=p.ray.num_cpus or os.cpu_count() or 1, object_store_mb=p.ray.object_store_mb
        )
    return True


def _shutdown_ray() -> None:
    import ray

    local, _LOCAL["ray"] = _LOCAL["ray"], None
    if local is not None:
        local.shutdown()  # waits for (and if needed kills) every process of that cluster
    else:
        ray.shutdown()


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
        tuple(sorted(p.ray.resources.items())),
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
    on_result: OnResult,
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
        actor_cls = ray.remote(RayEvalWorker).options(
            num_cpus=p.ray.actor_num_cpus,
            num_gpus=p.ray.actor_num_gpus,
            resources=dict(p.ray.resources) or None,
            max_concurrency=1,
        )
        threads = worker_threads(p, in_process=False)
        ship = ships_backbone(p, backbone, own_cluster=_LOCAL["ray"] is not None)
        key = _pool_key(p, backbone + (" (shipped)" if ship else ""), threads)
        if _POOL["key"] != key:
            shutdown_pool()
            _POOL["key"] = key
        shipped: dict[str, Any] = {}

        def backbone_arg() -> Any:
            """The path or hub id, or the ref of the folder's files (put once, when an actor first needs it)."""
            if not ship:
                return backbone
            if "ref" not in shipped:
                try:
                    shipped["ref"] = ray.put(folder_files(Path(backbone)))  # each node fetches it once
                except OSError as err:
                    raise EvalInputError(f"backbone {backbone}: {describe_error(err)}") from None
                _log(f"sending the backbone folder to the workers through the object store ({folder_size(backbone)})")
            return shipped["ref"]

        def new_actor() -> Any:
            return actor_cls.remote(backbone_arg(), p.dtype, p.device, threads, p.attn_implementation)

        shipper = Shipper(put=ray.put)
        actors: list[Any] = _POOL["actors"]
        wanted = fit_workers(p, min(p.workers, len(specs)), ray.nodes())
        # pooled actors beyond the fitted number would hold resources for nothing
        for extra in actors[wanted:]:
            ray.kill(extra, no_restart=True)
        del actors[wanted:]
        while len(actors) < wanted:
            actors.append(new_actor())
        queue: deque[tuple[ShardSpec, int]] = deque((s, 0) for s in specs)
        # an actor gets work only once its constructor has returned (it holds its resources and its
        # backbone): a pending actor (no room on the cluster) must never hold a shard
        starting: dict[Any, int] = {actors[i].__ray_ready__.remote(): i for i in range(wanted)}
        idle: list[int] = []
        running: dict[Any, tuple[ShardSpec, int, int]] = {}
        ever_ready = False
        since = time.monotonic()
        timeout = p.ray.actor_start_timeout_s
        while queue or running:
            while queue and idle:
                spec, attempt = queue.popleft()
                slot = idle.pop()
                sent, data, adapter, extras = shipper.payload(spec)
                ref = actors[slot].run_payload.remote(sent, attempt, data, adapter, extras)
                running[ref] = (spec, attempt, slot)
            waiting = list(running) + list(starting)
            if not running:  # nothing computing: bound the wait for an actor to start
                left = timeout - (time.monotonic() - since)
                if left <= 0:
                    names = ", ".join(f"worker {i}" for i in sorted(starting.values()))
                    what = "no worker actor started" if not ever_ready else "no worker actor is left"
                    raise EvalInputError(
                        f"evaluate.ray: {what} within {timeout:g}s ({names} pending: the Ray cluster has no "
                        f"room for {p.ray.actor_num_cpus:g} CPU / {p.ray.actor_num_gpus:g} GPU, or the actor "
                        "cannot load the backbone); lower evaluate.workers or the per-actor resources"
                    )
                ready, _ = ray.wait(waiting, num_returns=1, timeout=left)
                if not ready:
                    continue
            else:
                ready, _ = ray.wait(waiting, num_returns=1)
            ref = ready[0]
            if ref in starting:
                slot = starting.pop(ref)
                try:
                    ray.get(ref)
                except Exception as err:  # the constructor raised, or the actor died while starting
                    cause = getattr(err, "cause", None) or err
                    _log(f"worker {slot} failed to start ({type(cause).__name__}: {cause}); not used")
                    if not starting and not idle and not running:
                        raise EvalInputError(
                            f"evaluate.ray: no worker actor could start: {type(cause).__name__}: {cause}"
                        ) from None
                    continue
                ever_ready = True
                idle.append(slot)
                if not starting:  # every actor has loaded it: free the object store (a replacement puts it again)
                    shipped.pop("ref", None)
                continue
            spec, attempt, slot = running.pop(ref)
            try:
                result = ray.get(ref)
            except RayActorError as err:  # the actor died (e.g. out of memory): replace it
                ray.kill(actors[slot], no_restart=True)
                actors[slot] = new_actor()
                starting[actors[slot].__ray_ready__.remote()] = slot
                since = time.monotonic()
                error = f"worker died: {err}"
                _log(f"worker {slot} died while computing {spec.key} ({_first_line(err)}); replacing it")
            except Exception as err:  # RayTaskError wrapping the shard's exception
                cause = getattr(err, "cause", None) or err
                if isinstance(cause, EvalInputError):
                    raise EvalInputError(str(cause)) from None  # bad input: the same on every attempt
                error = f"{type(cause).__name__}: {cause}"
                idle.append(slot)
            else:
                idle.append(slot)
                shipper.release(spec)
                on_result(spec, result)
                continue
            if attempt < p.max_retries:
                _log(
                    f"retrying {spec.key} (attempt {attempt + 2} of {p.max_retries + 1}) after it failed on "
                    f"worker {slot}: {_first_line(error)}"
                )
                queue.append((spec, attempt + 1))
            else:
                _log(
                    f"giving up on {spec.key} after {p.max_retries + 1} attempts (worker {slot}): {_first_line(error)}"
                )
                failures[spec.key] = error
                shipper.release(spec)
        # actors still starting at the end never got work: do not keep them pending in the pool
        for slot in starting.values():
            ray.kill(actors[slot], no_restart=True)
        if starting:
            dead = set(starting.values())
            actors[:] = [a for i, a in enumerate(actors) if i not in dead]
    except BaseException:
        if not started:
            shutdown_pool()
        raise
    finally:
        if started:
            shutdown_pool()
            _shutdown_ray()
    return failures


class RayEvalWorker(EvalWorker):
    """The actor class: an :class:`EvalWorker` whose results name the Ray node that computed them."""

    def run_payload(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        import ray

        result = super().run_payload(*args, **kwargs)
        result["node_id"] = ray.get_runtime_context().get_node_id()
        return result


def _first_line(error: Any) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
