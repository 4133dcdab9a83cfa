"""Two Ray nodes on one machine, no shared filesystem: `dvc repro` submitted as a Ray job (issue 13 item 4).

A head (2 CPUs, custom resource ``head``, the job server) and a second raylet (2 CPUs, custom resource
``node2``, its own temp dir), both with node IP 127.0.0.1 (``ray.cluster_utils.Cluster``), stopped by the
cluster's own shutdown and then by killing the leftovers among this test's descendants (``ray stop`` would
stop every Ray on the machine). A shrunken copy of the embedded
default (tests/pipeline/test_workflow.py's shrinking) runs as ``deltamem submit --working-dir <clone> --
dvc repro`` with ``train.launcher: ray`` (2 Ray Train workers, pinned to the head) and evaluation actors
pinned to the second node (``evaluate.ray.resources: {node2: 1}``, ``shared_storage: false``). Then the
same pipeline runs in one process (``launcher: local``, one episode per micro-batch and the same global
batch by accumulation, ``evaluate.workers: 0``) on a copy of the job's working dir, and the test checks: the
losses agree step by step and the adapters to float32 rounding (≤ 1e-6 relative), every
``predictions.jsonl`` is byte-identical, every shard's meta names the second node, the second node got its
own copy of the project (under its own temp dir) without ``models/`` or ``data/``, and the backbone went
through the object store.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tests.e2e import probe
from tests.pipeline.test_workflow import _copy_project, _shrink
from tests.ports import free_ports

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(sys.platform != "linux", reason="two raylets on one Linux machine"),
]
CONDITIONS = ["base_no_context", "deltamem_only", "deltamem_shuffled"]


def _ray_descendants() -> list:
    import psutil

    from pipeline.ray_local import _is_ray_process

    return [p for p in psutil.Process().children(recursive=True) if _is_ray_process(p)]


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """Ray's ``cluster_utils.Cluster``: both raylets are started with node IP 127.0.0.1 as given (``ray start
    --node-ip-address 127.0.0.1`` turns it into the machine's external address, see pipeline/ray_local.py,
    unless ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, with which ``ray start`` refuses a second node)."""
    import psutil
    from ray.cluster_utils import Cluster
    from ray.job_submission import JobSubmissionClient

    temps = [Path(tempfile.mkdtemp(prefix=f"rn{i}_", dir="/tmp")) for i in (1, 2)]  # short: unix sockets
    ray_bin = Path(sys.executable).with_name("ray")
    env = {
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        # every process that connects (job agent, job driver, the stages' ray.init) takes 127.0.0.1 as its
        # node IP, as pipeline/ray_local.py does; else it looks for a raylet on the external address and hangs
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "TQDM_DISABLE": "1",
        # the job's entrypoint runs with the head's PATH: the venv's dvc/python
        "PATH": f"{ray_bin.parent}{os.pathsep}{os.environ.get('PATH', '')}",
        probe.ENV: str(tmp_path_factory.mktemp("probe") / "imports.log"),
    }
    common = {"node_ip_address": "127.0.0.1", "num_cpus": 2, "num_gpus": 0, "object_store_memory": 700 * 2**20}
    names = ("dashboard_agent_listen_port", "metrics_export_port", "runtime_env_agent_port")
    dash, client, *free = free_ports(2 + 2 * len(names))  # never Ray's defaults (another Ray may hold them)

    def ports(node: int) -> dict[str, int]:
        return dict(zip(names, free[node * len(names) : (node + 1) * len(names)], strict=True))

    with pytest.MonkeyPatch.context() as mp:  # what the cluster's processes inherit
        for key, value in env.items():
            mp.setenv(key, value)
        for key in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "PYTHONPATH", "MLFLOW_TRACKING_URI"):
            mp.delenv(key, raising=False)
        cluster = Cluster(shutdown_at_exit=False)
        try:
            cluster.add_node(
                **common,
                **ports(0),
                ray_client_server_port=client,
                temp_dir=str(temps[0]),
                resources={"head": 2},
                include_dashboard=True,
                dashboard_host="127.0.0.1",
                dashboard_port=dash,
            )
            node2 = cluster.add_node(**common, **ports(1), temp_dir=str(temps[1]), resources={"node2": 2})
            address = f"http://127.0.0.1:{dash}"
            deadline = time.monotonic() + 120
            while True:
                with contextlib.suppress(Exception):
                    JobSubmissionClient(address).list_jobs()
                    break
                assert time.monotonic() < deadline, f"no job server at {address} after 120 s"
                time.sleep(1)
            yield {
                "address": address,
                "env": {**os.environ},
                "temps": temps,
                "node2": node2.node_id,
                "gcs": cluster.address,
            }
        finally:
            procs = _ray_descendants()
            cluster.shutdown()
            _, alive = psutil.wait_procs(procs, timeout=15)
            for proc in alive:  # only processes this cluster started (descendants of this test)
                with contextlib.suppress(psutil.Error):
                    proc.kill()
            for t in temps:
                shutil.rmtree(t, ignore_errors=True)


def _edit(params_file: Path, **sections) -> None:
    p = yaml.safe_load(params_file.read_text())
    for name, update in sections.items():
        for key, value in update.items():
            if isinstance(value, dict) and isinstance(p[name].get(key), dict):
                p[name][key].update(value)
            else:
                p[name][key] = value
    params_file.write_text(yaml.safe_dump(p, sort_keys=False))


def _adapter_vector(folder: Path):
    import torch
    from safetensors.torch import load_file

    t = load_file(str(folder / "adapter.safetensors"))
    return torch.cat([t[k].double().flatten() for k in sorted(t)])


@pytest.mark.timeout(900)
def test_dvc_repro_on_two_nodes_equals_the_single_process_run(two_nodes, tmp_path):
    env = two_nodes["env"]
    repo = tmp_path / "repo"
    repo.mkdir()
    _copy_project(repo)
    probe.install(repo)
    _shrink(repo / "params.yaml")
    optim = yaml.safe_load((repo / "params.yaml").read_text())["train"]["optim"]
    batch, accum = optim["batch_size"], optim["grad_accum"]
    assert batch % 2 == 0
    _edit(
        repo / "params.yaml",
        train={
            "launcher": "ray",
            "nproc": 2,
            # per worker: the same global batch as one process; clipping never active (see the adapter check)
            "optim": {"batch_size": batch // 2, "max_grad_norm": 1e9},
            "ray": {"resources_per_worker": {"CPU": 1, "head": 1}},
        },
        evaluate={
            "workers": 2,
            "conditions": CONDITIONS,
            "ray": {"resources": {"node2": 1}, "actor_num_cpus": 1, "shared_storage": False},
        },
    )
    deltamem = Path(sys.executable).with_name("deltamem")
    t0 = time.monotonic()
    res = subprocess.run(
        [str(deltamem), "submit", "--address", two_nodes["address"], "--working-dir", str(repo), "--timeout", "720",
         "--submission-id", "two-nodes-repro", "--entrypoint", "dvc repro && echo JOB_DIR=$PWD"],
        cwd=repo, env=env, capture_output=True, text=True, timeout=780,
    )  # fmt: skip
    out = res.stdout + res.stderr
    assert res.returncode == 0, f"deltamem submit failed ({res.returncode}) after {time.monotonic() - t0:.0f}s:\n{out}"
    assert "submit: job two-nodes-repro SUCCEEDED" in res.stdout, out
    assert "sending the backbone folder to the workers through the object store" in out, out

    head_tmp, node2_tmp = two_nodes["temps"]
    (job_dir,) = [Path(line[len("JOB_DIR=") :]) for line in res.stdout.splitlines() if line.startswith("JOB_DIR=")]
    assert head_tmp in job_dir.parents, job_dir  # the entrypoint ran on the head
    # node 2 has its own copy of the project (its own temp dir), without the models or the data
    node2_copies = list(node2_tmp.glob("session_*/runtime_resources/working_dir_files/*"))
    assert node2_copies, "the second node never unpacked the project"
    for copy in node2_copies:
        assert not (copy / "models").exists() and not (copy / "data" / "prepared").exists()
    imports = probe.read(Path(env[probe.ENV]))
    assert any(str(node2_tmp) in path for path, argv in imports if "default_worker.py" in argv), imports
    # only the submitting CLI (which runs from the clone) imports the clone; every job process its own copy
    local = [argv for path, argv in imports if str(repo) in path and " submit " not in f"{argv} "]
    assert not local, local

    metas = list((job_dir / "results" / "eval").rglob("shard-*.meta.json"))
    assert metas and {json.loads(m.read_text()).get("node_id") for m in metas} == {two_nodes["node2"]}
    summary = json.loads((job_dir / "models" / "TSW" / "training_summary.json").read_text())
    assert summary["world_size"] == 2

    # the single-process run: a copy of the job's folder (prepared data and backbone reused), launcher local
    ref = tmp_path / "ref"
    shutil.copytree(job_dir, ref, ignore=shutil.ignore_patterns("mlflow.db", "mlruns", ".deltamem"))
    shutil.rmtree(ref / "models" / "TSW")
    shutil.rmtree(ref / "results")
    _edit(
        ref / "params.yaml",
        # one episode per micro-batch like each Ray worker, the global batch by accumulation: the same objective
        # (a mean over episodes) on the same tensor shapes
        train={
            "launcher": "local",
            "nproc": 1,
            "optim": {"batch_size": batch // 2, "grad_accum": 2 * accum},
            "ray": {"resources_per_worker": {}},
        },
        evaluate={"workers": 0, "ray": {"resources": {}}},
    )
    local_env = {k: v for k, v in env.items() if k != probe.ENV}
    done = subprocess.run(
        ["dvc", "repro", "evaluate"], cwd=ref, env=local_env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Running stage 'train@TSW'" in done.stdout and "Running stage 'prepare'" not in done.stdout
    single = json.loads((ref / "models" / "TSW" / "training_summary.json").read_text())
    assert single.get("world_size", 1) == 1 and single["steps"] == summary["steps"]
    assert single["episodes_seen"] == summary.get("episodes_seen", single["episodes_seen"])

    # the same optimisation: the same episodes, shapes and objective, so the same float32 sums (DeepSpeed's
    # all-reduce of two halves is exact): bit-identical over 2 torchrun ranks. With clipping active (max_grad_norm 1) the
    # adapters differ by 1.4e-6 after 3 steps: DeepSpeed's partitioned fp32 gradient norm differs from
    # torch's by 1.3e-7, and the clip coefficient carries that into a trajectory that amplifies it. A wrong
    # data split or loss normalisation moves it far more (the earlier token-weighted loss: 7.7e-5).
    for got, want in zip(summary["history"], single["history"], strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-6)
    a, b = _adapter_vector(job_dir / "models" / "TSW" / "adapter"), _adapter_vector(ref / "models" / "TSW" / "adapter")
    assert float((a - b).norm() / b.norm()) <= 1e-6
    preds = sorted(p.relative_to(ref) for p in (ref / "results" / "eval").rglob("predictions.jsonl"))
    assert len(preds) == len(CONDITIONS)
    for rel in preds:
        assert (job_dir / rel).read_bytes() == (ref / rel).read_bytes(), rel
    assert not any("node_id" in json.loads(m.read_text()) for m in (ref / "results" / "eval").rglob("*.meta.json"))
