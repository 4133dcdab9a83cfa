"""The local Ray of :mod:`pipeline.ray_local` and of the evaluate stage: loopback only, nothing left behind,
never a hang when the actors do not fit."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.ray_local import is_loopback, listening_sockets, local_ray

ray = pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture
def no_ray_session():
    if ray.is_initialized():
        pytest.skip("a Ray session is already open in this process")
    yield
    assert not ray.is_initialized()


def test_is_loopback():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("::ffff:127.0.0.1")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("192.0.2.2")


@pytest.mark.slow
def test_local_ray_never_joins_a_cluster_registered_by_ray_start(no_ray_session, monkeypatch):
    # `ray start` leaves its address in <RAY_TMPDIR>/ray/ray_current_cluster; a plain ray.init() would join
    # it (here: nothing listens there, so it would fail) instead of starting the stage's own node
    import shutil
    import tempfile

    ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    (ray_tmp / "ray").mkdir()
    (ray_tmp / "ray" / "ray_current_cluster").write_text("127.0.0.1:9\n")
    monkeypatch.setenv("RAY_TMPDIR", str(ray_tmp))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with local_ray(num_cpus=1, object_store_mb=80) as r:
        assert r.node_ip == "127.0.0.1"
        assert ray.get(ray.remote(lambda: 7).remote()) == 7
    shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.slow
def test_local_ray_binds_every_listening_socket_to_loopback_and_leaves_no_process(no_ray_session):
    with local_ray(num_cpus=1, object_store_mb=80) as r:
        assert r.node_ip == "127.0.0.1"
        assert ray.nodes()[0]["NodeManagerAddress"] == "127.0.0.1"

        @ray.remote(num_cpus=0)
        class Probe:
            def pid(self) -> int:
                return os.getpid()

        probe = Probe.remote()  # kept referenced: the actor exits when its handle goes
        worker_pid = ray.get(probe.pid.remote())  # a core worker with its own gRPC server
        procs = r.processes()
        pids = {p.pid for p in procs}
        assert worker_pid in pids
        names = {p.name() for p in procs}
        assert {"gcs_server", "raylet"} <= names
        assert any("DashboardAgent" in n for n in names) and any("RuntimeEnvAgent" in n for n in names)
        sockets = listening_sockets(procs)
        assert worker_pid in {s[0] for s in sockets}
        exposed = [s for s in sockets if not is_loopback(s[2])]
        assert not exposed, f"Ray sockets not on loopback: {exposed}"
        assert 8265 not in {s[3] for s in sockets}  # no dashboard unless asked
    time.sleep(0.2)
    alive = [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"Ray processes outlived the shutdown: {alive}"


def _stage_params(path: Path, root: Path, out: Path, **overrides) -> None:
    section = {
        "backbone": str(root / "models" / "backbone"),
        "models_dir": str(root / "models"),
        "data_dir": str(root / "data" / "prepared"),
        "out_dir": str(out),
        "variants": ["TSW"],
        "conditions": ["base_no_context", "deltamem_only", "deltamem_shuffled"],
        "tasks": [{"dataset": "synthetic", "split": "test"}],
        "shard_conversations": 2,
        "threads": 1,
        "max_new_tokens_cap": 3,
        "bootstrap": 0,
        **overrides,
    }
    path.write_text(yaml.safe_dump({"evaluate": section}))


@pytest.mark.slow
def test_stage_with_more_workers_than_cpus_finishes_on_loopback_and_leaves_no_ray(eval_root, tmp_path):
    """Today's hang: 3 workers on a 2-CPU Ray stopped at 5/6 shards forever. Now the stage fits 2 actors
    (warning), computes all 6 shards, every socket of its Ray is on loopback, and none of its processes
    survives the stage."""
    params, out = tmp_path / "params.yaml", tmp_path / "results"
    _stage_params(params, eval_root, out, workers=3, ray={"num_cpus": 2, "object_store_mb": 80})
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "pipeline.stages.evaluate", "--params", str(params), "--no-tracking"]
    stage = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: dict[int, str] = {}
    sockets: set[tuple[int, str, str, int]] = set()
    deadline = time.monotonic() + 180
    try:
        root = psutil.Process(stage.pid)
        while stage.poll() is None:
            assert time.monotonic() < deadline, "the evaluate stage hangs"
            try:
                kids = root.children(recursive=True)
            except psutil.Error:
                break
            for k in kids:
                with contextlib.suppress(psutil.Error):
                    seen[k.pid] = k.name()  # the agents set their title after start: keep the latest
            sockets |= set(listening_sockets(kids))
            time.sleep(0.3)
        stdout, stderr = stage.communicate(timeout=60)
    finally:
        if stage.poll() is None:
            stage.kill()
    assert stage.returncode == 0, stderr
    assert "6 shards computed" in stdout
    assert "3 worker actors of 1 CPU do not fit the Ray cluster" in stderr and "using 2" in stderr
    names = set(seen.values())
    assert {"gcs_server", "raylet"} <= names, names
    assert any("RuntimeEnvAgent" in n for n in names), names
    assert sockets and {s[1] for s in sockets} >= {"gcs_server", "raylet"}
    exposed = sorted(s for s in sockets if not is_loopback(s[2]))
    assert not exposed, f"sockets of the stage's Ray not on loopback: {exposed}"
    alive = [f"{pid} {name}" for pid, name in seen.items() if psutil.pid_exists(pid)]
    alive = [a for a in alive if psutil.Process(int(a.split()[0])).status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"processes of the stage's Ray outlived it: {alive}"


_DRIVER = """
import json, sys, time
import ray
from pipeline.ray_local import start_local_ray
r = start_local_ray(num_cpus=1, object_store_mb=80)

@ray.remote(num_cpus=1)
class A:
    def ping(self):
        return 1

a = A.remote()
ray.get(a.ping.remote())
time.sleep(1.5)  # the watchdog's next scan sees the actor's worker too
print(json.dumps([[p.pid, p.create_time()] for p in r.processes()]), flush=True)
time.sleep(600)
"""


@pytest.mark.slow
def test_a_killed_driver_leaves_no_ray_process_behind(tmp_path):
    """SIGKILL of the driver: the watchdog kills that cluster's processes (before: the agents lingered
    for minutes)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    driver = subprocess.Popen([sys.executable, "-c", _DRIVER], env=env, stdout=subprocess.PIPE, text=True)
    try:
        line = driver.stdout.readline()
        assert line, "the driver did not start its Ray"
        procs = []
        for pid, ctime in json.loads(line):
            with contextlib.suppress(psutil.Error):
                p = psutil.Process(pid)
                if abs(p.create_time() - ctime) < 0.01:
                    procs.append(p)
        names = {p.name() for p in procs}
        assert {"gcs_server", "raylet"} <= names and any("RuntimeEnvAgent" in n for n in names), names
        driver.kill()
        driver.wait(timeout=10)
        _, alive = psutil.wait_procs(procs, timeout=30)
        alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert not alive, f"Ray processes outlived the killed driver: {[(p.pid, p.name()) for p in alive]}"
    finally:
        if driver.poll() is None:
            driver.kill()
