"""A local Ray cluster confined to the loopback interface, and shut down without leftovers.

Used by the evaluate stage (:mod:`pipeline.eval.executors`) and the training launcher; the one place
where the project starts a Ray of its own.

Why passing ``_node_ip_address="127.0.0.1"`` to ``ray.init`` is not enough (Ray 2.60, read in
``ray/_private/worker.py`` and ``ray/_private/services.py``): ``ray.init`` hands that value to
``services.resolve_ip_for_localhost``, which on purpose turns any loopback address into "a remotely
reachable IP" via ``get_node_ip_address()``; on Linux that function returns the loopback address only
when ``ray_constants.ENABLE_RAY_CLUSTER`` is false (the ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` switch, true
by default off Windows/macOS), else the address of the default route. The node then comes up with the
external IP, and since ray-project/ray PR #55484 and its follow-ups bind the gRPC servers, the
runtime-env agent, the dashboard agent and the metrics exporters to the *node IP* (loopback-only only
when the node IP is 127.0.0.1), they listen on the external interface (and gRPC on ``*``).

:func:`start_local_ray` therefore clears that switch while Ray starts: in the driver (the module
constant, restored afterwards) and in the environment the Ray processes inherit (they read it when
they import Ray). Every listening socket of the cluster is then on 127.0.0.1 (gRPC servers show as the
IPv4-mapped ``::ffff:127.0.0.1``). :meth:`LocalRay.shutdown` stops Ray and then waits for every process
of that cluster (recorded while it runs: the driver's descendants), killing the ones that linger, so
nothing of it outlives the caller. A driver that is killed (SIGKILL, OOM) cannot do that, and Ray's own
fate-sharing then leaves the dashboard and runtime-env agents running for minutes (they try to report
to the dead GCS before exiting); a small watchdog process started with the cluster waits on a pipe from
the driver and, when the pipe closes without the clean-shutdown word, kills the processes of that
cluster it has seen (by pid, each checked against its start time so a recycled pid is never hit).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

LOOPBACK = "127.0.0.1"
# Ray's switch "clusters on this OS": when false, get_node_ip_address() is the loopback address.
_CLUSTER_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextlib.contextmanager
def _loopback_node_ip() -> Iterator[None]:
    """While Ray starts: make ``resolve_ip_for_localhost("127.0.0.1")`` return 127.0.0.1."""
    from ray._private import ray_constants

    saved_const = ray_constants.ENABLE_RAY_CLUSTER
    saved_env = os.environ.get(_CLUSTER_SWITCH)
    ray_constants.ENABLE_RAY_CLUSTER = False
    os.environ[_CLUSTER_SWITCH] = "0"  # the gcs/raylet/agents/workers started now inherit it
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_const
        if saved_env is None:
            os.environ.pop(_CLUSTER_SWITCH, None)
        else:
            os.environ[_CLUSTER_SWITCH] = saved_env


def _descendants() -> list[Any]:
    import psutil

    try:
        return psutil.Process().children(recursive=True)
    except psutil.Error:
        return []


# The watchdog (run as `python -c`): argv = driver-side snapshot of [pid, create_time] pairs; it adds the
# descendants of those processes every second, and on EOF of stdin without b"clean" kills them all.
_WATCHDOG = r"""
import json, os, select, sys, time
import psutil
seen = {}
def track(pid, ctime=None):
    try:
        p = psutil.Process(pid)
        if ctime is None or abs(p.create_time() - ctime) < 0.01:
            seen.setdefault(p.pid, p)
    except psutil.Error:
        pass
for pid, ctime in json.loads(sys.argv[1]):
    track(pid, ctime)
buf = b""
while True:
    ready, _, _ = select.select([sys.stdin], [], [], 1.0)
    if ready:
        chunk = os.read(sys.stdin.fileno(), 64)
        if not chunk:
            break
        buf += chunk
        if b"clean" in buf:
            sys.exit(0)
    for p in list(seen.values()):
        try:
            for c in p.children(recursive=True):
                seen.setdefault(c.pid, c)
        except psutil.Error:
            pass
time.sleep(float(sys.argv[2]))
alive = []
for p in seen.values():
    try:
        if p.is_running():
            p.kill()
            alive.append(p)
    except psutil.Error:
        pass
psutil.wait_procs(alive, timeout=5)
"""


@dataclass
class LocalRay:
    """A running local cluster started by :func:`start_local_ray` (shut it down with :meth:`shutdown`)."""

    node_ip: str
    session_dir: str
    _procs: dict[int, Any] = field(default_factory=dict, repr=False)
    _watchdog: Any = field(default=None, repr=False)

    def _start_watchdog(self, grace_s: float = 2.0) -> None:
        import json
        import subprocess
        import sys

        snapshot = []
        for proc in self.processes():
            with contextlib.suppress(Exception):
                snapshot.append([proc.pid, proc.create_time()])
        # its own session: a Ctrl-C / group kill of the stage must not take the watchdog with it
        self._watchdog = subprocess.Popen(
            [sys.executable, "-c", _WATCHDOG, json.dumps(snapshot), str(grace_s)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def _stop_watchdog(self) -> None:
        dog, self._watchdog = self._watchdog, None
        if dog is None:
            return
        with contextlib.suppress(OSError):
            dog.stdin.write(b"clean")
            dog.stdin.close()
        try:
            dog.wait(timeout=10)
        except Exception:
            dog.kill()

    def processes(self) -> list[Any]:
        """The live processes of this cluster (psutil): gcs, raylet, agents, monitors, workers.

        Found as the driver's descendants whose command line belongs to Ray; remembered, so that the
        ones re-parented when the raylet exits are still found by :meth:`shutdown`.
        """
        import psutil

        for proc in _descendants():
            if proc.pid not in self._procs and _is_ray_process(proc):
                self._procs[proc.pid] = proc
        alive = []
        for pid, proc in list(self._procs.items()):
            try:
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(proc)
                    continue
            except psutil.Error:
                pass
            del self._procs[pid]
        return alive

    def shutdown(self, timeout: float = 15.0) -> list[int]:
        """``ray.shutdown()``, then wait up to ``timeout`` s for every process of this cluster and kill
        those still alive (by pid: only processes this cluster started). Returns the killed pids."""
        import psutil
        import ray

        procs = self.processes()
        if ray.is_initialized():
            ray.shutdown()
        _, alive = psutil.wait_procs(procs, timeout=timeout)
        killed = []
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()
                killed.append(proc.pid)
        psutil.wait_procs(alive, timeout=5)
        self._procs.clear()
        self._stop_watchdog()
        return killed


def _is_ray_process(proc: Any) -> bool:
    import psutil

    try:
        cmd = " ".join(proc.cmdline())
    except psutil.Error:
        return False
    return cmd.startswith("ray::") or "/site-packages/ray/" in cmd or "/ray/core/src/ray/" in cmd


def start_local_ray(
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    object_store_mb: int = 200,
    *,
    resources: Mapping[str, float] | None = None,
    include_dashboard: bool = False,
    runtime_env: Mapping[str, Any] | None = None,
    logging_level: str = "warning",
) -> LocalRay:
    """Start a single-node Ray in this process, every server bound to 127.0.0.1.

    Args:
        num_cpus / num_gpus: resources of the node (None: Ray's detection).
        object_store_mb: object store size (MiB).
        resources: custom resources of the node.
        include_dashboard: start the dashboard (on 127.0.0.1); off by default.
        runtime_env: the job's runtime environment (e.g. ``{"env_vars": {...}}``).
        logging_level: Ray's driver logging level.

    Raises:
        RuntimeError: when Ray is already initialised in this process, or the node did not come up on
            the loopback address.
    """
    import ray

    if ray.is_initialized():
        raise RuntimeError("Ray is already initialised in this process; shut it down first")
    kwargs: dict[str, Any] = {
        # "local": always a new node of our own. Without it ray.init joins whatever `ray start` last
        # registered in <ray tmp>/ray_current_cluster (another user's cluster, where num_cpus is refused).
        "address": "local",
        "num_cpus": num_cpus,
        "num_gpus": num_gpus,
        "object_store_memory": object_store_mb * 2**20,
        "include_dashboard": include_dashboard,
        "_node_ip_address": LOOPBACK,
        "logging_level": logging_level,
    }
    if include_dashboard:
        kwargs["dashboard_host"] = LOOPBACK
    if resources:
        kwargs["resources"] = dict(resources)
    if runtime_env:
        kwargs["runtime_env"] = dict(runtime_env)
    with _loopback_node_ip():
        ray.init(**kwargs)
    node = ray._private.worker.global_worker.node
    local = LocalRay(node_ip=node.node_ip_address, session_dir=node.get_session_dir_path())
    local._start_watchdog()
    if not is_loopback(local.node_ip):
        local.shutdown()
        raise RuntimeError(f"the local Ray node came up on {local.node_ip}, not {LOOPBACK}")
    return local


@contextlib.contextmanager
def local_ray(**kwargs: Any) -> Iterator[LocalRay]:
    """``with local_ray(num_cpus=2) as r: ...``: :func:`start_local_ray`, always shut down at the end."""
    r = start_local_ray(**kwargs)
    try:
        yield r
    finally:
        r.shutdown()


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and IPv4-mapped loopback (``::ffff:127.0.0.1``)."""
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return host == "localhost"
    mapped = getattr(addr, "ipv4_mapped", None)
    return bool(addr.is_loopback or (mapped is not None and mapped.is_loopback))


def listening_sockets(procs: Iterable[Any]) -> list[tuple[int, str, str, int]]:
    """(pid, process name, ip, port) of every TCP socket in LISTEN state held by ``procs`` (psutil)."""
    import psutil

    out = []
    for proc in procs:
        try:
            name = proc.name()
            conns = proc.net_connections(kind="tcp")
        except psutil.Error:
            continue
        out += [(proc.pid, name, c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN]
    return out


__all__ = ["LOOPBACK", "LocalRay", "is_loopback", "listening_sockets", "local_ray", "start_local_ray"]
