"""cluster/: the Ray cluster-launcher config (Ray's JSON schema), the KubeRay RayJob, submit.sh ≡ pipeline.submit,
and a real `dvc repro` submitted as a Ray job to a local head."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from pipeline import submit as sub
from tests.ports import free_port, free_ports

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"


def _ray_version() -> str:
    import ray

    return ray.__version__


# --- the cluster launcher config ------------------------------------------------------------------------
def test_aws_cluster_config_is_valid_against_rays_schema():
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = yaml.safe_load((CLUSTER / "ray-cluster.aws.yaml").read_text())
    jsonschema.validate(config, schema)  # raises ValidationError with the offending path

    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head is a CPU node"
    workers = {k: v for k, v in types.items() if k != config["head_node_type"]}
    assert workers and all(v["resources"].get("GPU", 0) >= 1 for v in workers.values())
    assert {v["node_config"]["InstanceType"] for v in workers.values()} >= {"g5.2xlarge", "p4d.24xlarge"}
    for name, v in workers.items():
        assert 0 <= v["min_workers"] <= v["max_workers"] <= config["max_workers"], name
    assert config["docker"]["image"].startswith(f"rayproject/ray:{_ray_version()}-"), "image Ray = client Ray"
    assert config["docker"]["image"].endswith("-gpu")
    assert any("pip install" in c and "deltamem" in c for c in config["setup_commands"])


def test_aws_cluster_config_passes_rays_own_validation():
    """What `ray up` does first: fill in the AWS defaults, then validate (offline: no AWS call)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load((CLUSTER / "ray-cluster.aws.yaml").read_text()))
    validate_config(config)
    assert config["docker"]["image"].endswith("-gpu")


def test_schema_check_catches_a_bad_config():
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = yaml.safe_load((CLUSTER / "ray-cluster.aws.yaml").read_text())
    config["available_node_types"]["gpu_a10g"]["min_worker"] = 1  # typo: not a schema property
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, schema)


# --- the KubeRay RayJob ---------------------------------------------------------------------------------
def _containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def test_rayjob_manifest_structure():
    docs = list(yaml.safe_load_all((CLUSTER / "rayjob.yaml").read_text()))
    assert len(docs) == 1
    job = docs[0]
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert job["metadata"]["name"]
    spec = job["spec"]
    assert "dvc repro" in spec["entrypoint"] or "pipeline.cli" in spec["entrypoint"]
    # the submitter shell must not split the && chain: it is quoted inside bash -c '...'
    words = shlex.split(spec["entrypoint"])
    assert words[:2] == ["bash", "-c"] and len(words) == 3
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int)
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["working_dir"].endswith(".zip"), "KubeRay needs a remote zip URI as working_dir"

    rc = spec["rayClusterSpec"]
    assert rc["rayVersion"] == _ray_version()
    head = rc["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    (head_c,) = _containers(head)
    assert head_c["image"].endswith(f"{_ray_version()}-gpu")
    assert {p["containerPort"] for p in head_c["ports"]} >= {6379, 8265}
    assert "nvidia.com/gpu" not in head_c["resources"]["limits"]
    assert {"cpu", "memory"} <= set(head_c["resources"]["limits"])

    groups = rc["workerGroupSpecs"]
    assert groups
    for g in groups:
        assert g["groupName"] and g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        assert isinstance(g["rayStartParams"], dict)
        for c in _containers(g):
            limits, requests = c["resources"]["limits"], c["resources"]["requests"]
            assert int(limits["nvidia.com/gpu"]) >= 1, f"{g['groupName']}: no GPU limit"
            assert requests.get("nvidia.com/gpu", limits["nvidia.com/gpu"]) == limits["nvidia.com/gpu"]
            assert {"cpu", "memory"} <= set(limits)


def test_dockerfile_uses_the_clients_ray():
    first = next(line for line in (CLUSTER / "Dockerfile").read_text().splitlines() if line.startswith("FROM"))
    assert first == f"FROM rayproject/ray:{_ray_version()}-py311-gpu"


# --- the submit helpers ---------------------------------------------------------------------------------
def test_job_entrypoint_marks_dvc_no_scm_without_git():
    assert sub.job_entrypoint("dvc repro") == "dvc config --local core.no_scm true && dvc repro"
    assert sub.job_entrypoint("dvc repro", with_git=True) == "dvc repro"
    assert sub.job_entrypoint("python -m pipeline.stages.evaluate") == "python -m pipeline.stages.evaluate"
    once = sub.job_entrypoint("dvc repro")
    assert sub.job_entrypoint(once) == once
    with pytest.raises(ValueError):
        sub.job_entrypoint("  ")


def test_runtime_env_excludes():
    env = sub.runtime_env("/repo", {"A": "1"})
    assert env["working_dir"] == "/repo" and env["env_vars"] == {"A": "1"}
    for big in ("/.venv/", "/.git/", "/mlflow.db", "/mlruns/", "/.dvc/cache/", "/models/", "/data/*"):
        assert big in env["excludes"]
    assert "/.git/" not in sub.runtime_env(with_git=True)["excludes"]
    assert "env_vars" not in sub.runtime_env()


def test_address_from_env(monkeypatch):
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert sub.address_from_env() == "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    assert sub.address_from_env() == "http://head:8265"


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["--no-wait", "--gpus", "1", "--env", "MLFLOW_TRACKING_URI=http://m:5000", "--", "dvc", "repro", "evaluate"],
        ["--with-git", "--address", "http://h:1", "--", "python", "-m", "pipeline.stages.evaluate", "--no-tracking"],
    ],
)
def test_submit_sh_is_the_python_command(args):
    """cluster/submit.sh --dry-run prints the command that pipeline.submit.ray_cli_command builds."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    res = subprocess.run(
        ["bash", str(CLUSTER / "submit.sh"), "--dry-run", *args], capture_output=True, text=True, env=env, timeout=30
    )
    assert res.returncode == 0, res.stderr
    got = shlex.split(res.stdout)
    assert Path(got[0]).name == "ray"

    opts, entry = (args[: args.index("--")], args[args.index("--") + 1 :]) if "--" in args else (args, [])
    env_vars = dict(opts[i + 1].split("=", 1) for i, a in enumerate(opts) if a == "--env")
    want = sub.ray_cli_command(
        shlex.join(entry) if entry else sub.DEFAULT_ENTRYPOINT,
        opts[opts.index("--address") + 1] if "--address" in opts else sub.DEFAULT_ADDRESS,
        sub.runtime_env(".", env_vars, with_git="--with-git" in opts),
        wait="--no-wait" not in opts,
        gpus=float(opts[opts.index("--gpus") + 1]) if "--gpus" in opts else None,
        with_git="--with-git" in opts,
    )
    i_env = got.index("--runtime-env-json") + 1
    j_env = want.index("--runtime-env-json") + 1
    assert json.loads(got[i_env]) == json.loads(want[j_env])
    got_rest = [w.replace("1.0", "1") for w in got[1:i_env] + got[i_env + 1 :]]
    want_rest = [w.replace("1.0", "1") for w in want[1:j_env] + want[j_env + 1 :]]
    assert sorted(got_rest[:-1]) == sorted(want_rest[:-1]) and got_rest[-1] == want_rest[-1]


# --- a real job on a local head -------------------------------------------------------------------------
def _session_pids(sid: int) -> list[int]:
    """Processes of session ``sid``: what `ray start` (run with start_new_session) spawned, workers included."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == sid:
                    pids.append(int(entry))
            except (ProcessLookupError, PermissionError):
                pass
    return pids


def _stop_head(sid: int) -> None:
    """Stop only this test's Ray processes (`ray stop` would stop every Ray of this user on the machine)."""
    for sig, wait_s in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 3.0)):
        for pid in _session_pids(sid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while _session_pids(sid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not _session_pids(sid):
            return


@pytest.fixture(scope="module")
def local_head():
    """One Ray head for this module on 127.0.0.1 with its own temp dir and ports, token auth off for head and client."""
    if sys.platform != "linux":
        pytest.skip("the process-session teardown reads /proc")
    ray_bin = Path(sys.executable).with_name("ray")
    temp_dir = tempfile.mkdtemp(prefix="rj_", dir="/tmp")  # short: Ray's unix sockets need < 108 chars
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "OMP_NUM_THREADS": "1",
        # the job's entrypoint runs with the head's PATH: the venv's dvc/python, as after `. .venv/bin/activate`
        "PATH": f"{ray_bin.parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    for key in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        env.pop(key, None)
    flags = (
        "--port",
        "--ray-client-server-port",
        "--dashboard-agent-listen-port",
        "--dashboard-agent-grpc-port",
        "--runtime-env-agent-port",
        "--metrics-export-port",
        "--node-manager-port",
        "--object-manager-port",
    )
    log = open(Path(temp_dir) / "ray-start.log", "w")  # noqa: SIM115 (closed in the finally)
    proc = None
    try:
        from ray.job_submission import JobSubmissionClient

        for attempt in range(1, 4):  # a port taken between the probe and Ray's bind: start again on new ones
            dash, *ports = free_ports(len(flags) + 1)
            cmd = [str(ray_bin), "start", "--head", "--block", "--node-ip-address", "127.0.0.1"]
            cmd += ["--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--include-dashboard", "true"]
            cmd += ["--num-cpus", "1", "--num-gpus", "0", "--temp-dir", temp_dir, "--disable-usage-stats"]
            for flag, port in zip(flags, ports, strict=True):
                cmd += [flag, str(port)]
            log.write(f"--- attempt {attempt}: {shlex.join(cmd)}\n")
            log.flush()
            proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            address = f"http://127.0.0.1:{dash}"
            deadline = time.monotonic() + 90
            while proc.poll() is None:
                try:
                    JobSubmissionClient(address).list_jobs()
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        pytest.fail(
                            f"no job server at {address} after 90 s:\n{(Path(temp_dir) / 'ray-start.log').read_text()}"
                        )
                    time.sleep(1)
            if proc.poll() is None:
                break
            _stop_head(proc.pid)  # what the failed start left behind
        else:
            pytest.fail(f"ray start failed 3 times:\n{(Path(temp_dir) / 'ray-start.log').read_text()}")
        yield {"address": address, "env": env, "temp_dir": Path(temp_dir)}
    finally:
        if proc is not None:
            _stop_head(proc.pid)
            proc.wait(timeout=10)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _tiny_dvc_repo(root: Path, env: dict) -> None:
    root.mkdir()
    (root / "in.txt").write_text("delta-mem says hi\n")
    (root / "dvc.yaml").write_text(
        "stages:\n  echo:\n    cmd: cat in.txt > out.txt && cat out.txt\n    deps: [in.txt]\n    outs: [out.txt]\n"
    )
    (root / "pipeline" / "data").mkdir(parents=True)  # an unanchored "data/" exclude would drop this one
    (root / "pipeline" / "data" / "keep.txt").write_text("kept\n")
    (root / "data").mkdir()
    (root / "data" / "big.bin").write_bytes(b"x" * 1024)  # excluded: /data/*
    (root / "data" / "raw").mkdir()
    (root / "data" / "raw" / "README.md").write_text("kept: data/raw is a dependency of prepare\n")
    (root / "mlflow.db").write_text("")  # excluded
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=root, env=env, check=True, capture_output=True, timeout=60)


@pytest.mark.slow
def test_dvc_repro_runs_as_a_ray_job(local_head, tmp_path):
    env = local_head["env"]
    repo = tmp_path / "repo"
    _tiny_dvc_repo(repo, env)
    deltamem = Path(sys.executable).with_name("deltamem")
    t0 = time.monotonic()
    res = subprocess.run(
        [str(deltamem), "submit", "--address", local_head["address"], "--working-dir", str(repo), "--timeout", "180",
         "--entrypoint", "dvc repro && ls -A . pipeline/data && ls -AR data && echo JOB_PATH=$PATH",
         "--submission-id", "deltamem-test-repro"],
        cwd=repo, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    wall = time.monotonic() - t0
    out = res.stdout + res.stderr
    assert res.returncode == 0, f"deltamem submit failed ({res.returncode}) after {wall:.0f}s:\n{out}"
    assert "submit: job deltamem-test-repro SUCCEEDED" in res.stdout, out
    assert "Running stage 'echo'" in res.stdout and "delta-mem says hi" in res.stdout, out

    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(local_head["address"])
    assert str(client.get_job_status("deltamem-test-repro").value) == "SUCCEEDED"
    logs = client.get_job_logs("deltamem-test-repro")
    assert "core.no_scm" in client.get_job_info("deltamem-test-repro").entrypoint
    listing = logs.split("Running stage", 1)[1]
    assert "keep.txt" in listing, logs  # pipeline/data/ uploaded
    assert "big.bin" not in listing and "README.md" in listing, logs  # data/ minus its data (dvc.yaml deps)
    for gone in ("mlflow.db", ".git\n"):
        assert gone not in listing.split("pipeline/data:")[0], f"{gone!r} was uploaded:\n{logs}"
    # the stage's output exists in the job's (unpacked) working dir on the node
    outs = list((local_head["temp_dir"]).glob("session_*/runtime_resources/working_dir_files/*/out.txt"))
    assert outs and outs[0].read_text() == "delta-mem says hi\n", logs
    assert (outs[0].parent / "dvc.lock").is_file()
    assert not (repo / "out.txt").exists(), "the job ran on the uploaded copy, not the local checkout"


@pytest.mark.slow
def test_submit_sh_runs_a_failing_job_and_reports_it(local_head, tmp_path):
    """cluster/submit.sh (ray CLI) waits for the job and exits 1 when the entrypoint fails."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "hello.txt").write_text("hi\n")
    res = subprocess.run(
        ["bash", str(CLUSTER / "submit.sh"), "--address", local_head["address"], "--working-dir", str(repo),
         "--env", "GREETING=hello", "--", "cat hello.txt && echo $GREETING-from-job && exit 3"],
        env=local_head["env"], capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    out = res.stdout + res.stderr
    assert res.returncode == 1, out
    assert "hello-from-job" in out and "failed" in out.lower(), out


def test_submit_reports_bad_input(tmp_path, capsys):
    assert sub.main(["--working-dir", str(tmp_path / "missing")]) == 2
    assert "working dir not found" in capsys.readouterr().err
    assert sub.main(["--working-dir", str(tmp_path), "--address", f"http://127.0.0.1:{free_port()}"]) == 2
    assert "cannot reach the Ray job server" in capsys.readouterr().err


@pytest.mark.slow
def test_submit_no_wait_returns_the_job_id(local_head, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    result = sub.submit("echo waited-for", address=local_head["address"], working_dir=repo, wait=False)
    assert result.status == "SUBMITTED" and result.submission_id
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(local_head["address"])
    deadline = time.monotonic() + 120
    while str(client.get_job_status(result.submission_id).value) not in sub.TERMINAL:
        assert time.monotonic() < deadline, client.get_job_logs(result.submission_id)
        time.sleep(1)
    assert str(client.get_job_status(result.submission_id).value) == "SUCCEEDED"
    assert "waited-for" in client.get_job_logs(result.submission_id)
