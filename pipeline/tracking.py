"""Minimal MLflow helpers shared by the stages.

* Tracking URI: ``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<repo>/mlflow.db`` where ``<repo>`` is the
  checkout this module was imported from — or, inside a temporary DVC experiment workspace
  (``<repo>/.dvc/tmp/exps/<tmp>/``, ``dvc exp run --temp/--queue``), the repository that owns it, so
  queued experiments log next to the others instead of into a folder DVC deletes afterwards.
* Experiment: ``MLFLOW_EXPERIMENT_NAME`` if set, else ``deltamem``. For a SQLite store, new experiments
  keep their artifacts in ``mlruns/<experiment>/`` next to the database file (not in the working
  directory).
* :func:`start_run` opens a run (nested inside the active one when ``nested=True``) with tags;
  :func:`log_params` flattens nested dicts to dotted keys; :func:`log_metrics`; :func:`log_dict`
  stores a dict as a JSON artifact.
* Pipeline runs: when a stage runs under ``dvc repro`` / ``dvc exp run`` (a ``dvc`` process among its
  ancestors) or with ``DELTAMEM_PIPELINE_ID`` set, its top-level run becomes the child of one *parent
  run per pipeline execution*, created by the first stage that runs (it logs the whole params.yaml) and
  closed by the report stage (:func:`finish_pipeline_run`). The parent's id lives in the pipeline's run
  state ``.deltamem/pipeline_run.json`` (``DELTAMEM_PIPELINE_STATE`` overrides), so the separate stage
  processes find it. A parent left open by an execution that stopped early is closed by the next one.
* Every run is tagged with the git commit (``mlflow.source.git.commit``), ``git.dirty``, the DVC
  experiment name when there is one, the tags the stage passes (stage, backbone, variant, seed) and the
  process that runs it (``deltamem.host``, ``deltamem.pid``, ``deltamem.pid_start``).
* Stale runs: a stage killed while its run is open leaves it RUNNING. The next top-level run started on the
  same host (any stage) closes, as KILLED, every RUNNING run of the experiment whose recorded process is
  gone (:func:`close_stale_runs`); runs of other hosts and of live processes (parallel ``dvc exp`` queues)
  are left alone.

``mlflow`` is imported only when a run starts, so importing this module is cheap.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.common import atomic_write_json

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_EXPERIMENT = "deltamem"
MAX_PARAM_LENGTH = 6000  # MLflow's limit for a parameter value
_BATCH = 100


def owning_repository(root: Path | None = None) -> Path:
    """``root`` (default: this checkout), or for a DVC temporary experiment workspace
    ``<repo>/.dvc/tmp/exps/...`` that ``<repo>``."""
    root = REPO_ROOT if root is None else root
    parts = root.parts
    for i in range(len(parts) - 3, 0, -1):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return root


def default_tracking_uri() -> str:
    """``sqlite:///<repo>/mlflow.db`` (``<repo>``: :func:`owning_repository` of this checkout)."""
    return f"sqlite:///{owning_repository() / 'mlflow.db'}"


def tracking_uri() -> str:
    """The URI in use: ``MLFLOW_TRACKING_URI`` or :func:`default_tracking_uri`."""
    return os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def experiment_name(name: str | None = None) -> str:
    """``name``, else ``MLFLOW_EXPERIMENT_NAME``, else ``deltamem``."""
    return name or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT


def _artifact_location(uri: str, experiment: str) -> str | None:
    """For ``sqlite:///path/x.db``: ``file:///path/mlruns/<experiment>``; None for other stores (their default)."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return None
    db = Path(uri[len(prefix) :])
    safe = re.sub(r"[^0-9A-Za-z_.-]", "_", experiment)
    return (db.parent / "mlruns" / safe).resolve().as_uri()


def flatten(data: Mapping[str, Any], prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """``{"a": {"b": 1}, "c": [{"d": 2}], "e": [1, 2]}`` → ``{"a.b": 1, "c.0.d": 2, "e": [1, 2]}``.

    Lists of dicts are flattened with their index; other lists stay whole values.
    """
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name, sep))
        elif isinstance(value, list | tuple) and value and all(isinstance(v, Mapping) for v in value):
            out.update(flatten({str(i): v for i, v in enumerate(value)}, name, sep))
        else:
            out[name] = value
    return out


def git_tags(root: Path = REPO_ROOT) -> dict[str, str]:
    """``mlflow.source.git.commit`` and ``git.dirty`` (tracked files changed) of ``root``; empty outside git."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"mlflow.source.git.commit": commit, "git.dirty": str(bool(status.strip())).lower()}


def run_tags(extra: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The tags every run carries: git, the DVC experiment (under ``dvc exp run``), then ``extra``."""
    tags = git_tags(Path.cwd()) or git_tags()
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc.exp_name"] = os.environ["DVC_EXP_NAME"]
    tags.update({str(k): str(v) for k, v in (extra or {}).items() if v is not None})
    return tags


# ------------------------------------------------------------------------------------------ pipeline runs
def pipeline_state_file() -> Path:
    """Where the open parent run of the current pipeline execution is recorded."""
    env = os.environ.get("DELTAMEM_PIPELINE_STATE")
    return Path(env) if env else Path.cwd() / ".deltamem" / "pipeline_run.json"


def execution_key() -> str | None:
    """What identifies the pipeline execution this process is part of, or None for a stage run by hand.

    ``DELTAMEM_PIPELINE_ID`` if set; else the nearest ancestor ``dvc`` process (its pid and start time),
    which is the same for every stage command of one ``dvc repro`` / ``dvc exp run``.
    """
    if os.environ.get("DELTAMEM_PIPELINE_ID"):
        return "id-" + os.environ["DELTAMEM_PIPELINE_ID"]
    try:
        import psutil
    except ImportError:  # psutil comes with ray/mlflow; without it stages are simply not grouped
        return None
    try:
        for proc in psutil.Process().parents():
            cmd = proc.cmdline()[:3]
            if any(Path(part).name in ("dvc", "dvc.exe") for part in cmd) or cmd[1:3] == ["-m", "dvc"]:
                return f"dvc-{proc.pid}-{proc.create_time():.3f}"
    except (psutil.Error, OSError):
        return None
    return None


@contextmanager
def _locked_state() -> Iterator[Path]:
    import fcntl

    path = pipeline_state_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield path
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _read_state(path: Path) -> dict[str, Any]:
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        return state if isinstance(state, dict) else {}
    except (OSError, ValueError):  # missing, unreadable, not UTF-8, not JSON: start afresh
        return {}


def _write_state(path: Path, state: Mapping[str, Any]) -> None:
    atomic_write_json(path, state)


def _ensure_experiment(uri: str, name: str) -> str:
    import mlflow

    mlflow.set_tracking_uri(uri)
    exp = mlflow.get_experiment_by_name(name)
    if exp is None:
        return mlflow.create_experiment(name, artifact_location=_artifact_location(uri, name))
    return exp.experiment_id


def _params_file_contents() -> dict[str, Any]:
    path = Path(os.environ.get("DELTAMEM_PARAMS_FILE", "params.yaml"))
    try:
        import yaml

        data = yaml.safe_load(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ImportError, ValueError):
        return {}


def pipeline_parent_run(experiment: str | None = None) -> str | None:
    """The id of this execution's parent run (created on first use), or None outside a pipeline execution."""
    key = execution_key()
    if key is None:
        return None
    from mlflow.tracking import MlflowClient

    uri, name = tracking_uri(), experiment_name(experiment)
    with _locked_state() as path:
        state = _read_state(path)
        client = MlflowClient(uri)
        if state.get("key") == key and state.get("tracking_uri") == uri and state.get("run_id"):
            try:
                if client.get_run(state["run_id"]).info.status == "RUNNING":
                    return state["run_id"]
            except Exception:  # deleted run or another store: start a new parent
                pass
        _close_stale(client, state, uri)
        exp_id = _ensure_experiment(uri, name)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        label = os.environ.get("DVC_EXP_NAME")
        tags = run_tags({"deltamem.kind": "pipeline", "pipeline.execution": key})
        run = client.create_run(exp_id, run_name=f"pipeline {label or stamp}", tags=tags)
        params = flatten(_params_file_contents())
        _log_params_client(client, run.info.run_id, params)
        _write_state(
            path, {"key": key, "run_id": run.info.run_id, "tracking_uri": uri, "experiment": name, "started": stamp}
        )
        return run.info.run_id


def _close_stale(client: Any, state: Mapping[str, Any], uri: str) -> None:
    """Close the parent run of an earlier execution that never reached the report stage."""
    if not state.get("run_id") or state.get("tracking_uri") != uri:
        return
    try:
        if client.get_run(state["run_id"]).info.status == "RUNNING":
            client.set_tag(state["run_id"], "deltamem.closed_by", "next pipeline execution")
            client.set_terminated(state["run_id"], "FINISHED")
    except Exception:
        pass


def _log_params_client(client: Any, run_id: str, params: Mapping[str, Any]) -> None:
    from mlflow.entities import Param

    items = sorted((k, _param_value(v)) for k, v in params.items())
    for start in range(0, len(items), _BATCH):
        client.log_batch(run_id, params=[Param(k, v) for k, v in items[start : start + _BATCH]])


def finish_pipeline_run(status: str = "FINISHED") -> str | None:
    """Close this execution's parent run (the report stage calls it); returns its id, or None."""
    key = execution_key()
    if key is None:
        return None
    from mlflow.tracking import MlflowClient

    with _locked_state() as path:
        state = _read_state(path)
        if state.get("key") != key or not state.get("run_id"):
            return None
        client = MlflowClient(state.get("tracking_uri") or tracking_uri())
        try:
            client.set_terminated(state["run_id"], status)
        except Exception:
            return None
        _write_state(path, {**state, "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "status": status})
        return state["run_id"]


@contextmanager
def start_run(
    run_name: str,
    *,
    experiment: str | None = None,
    tags: Mapping[str, Any] | None = None,
    nested: bool = False,
) -> Iterator[Any]:
    """Open an MLflow run (``mlflow.ActiveRun``) and close it on exit (status FAILED on an exception).

    With ``nested=True`` and a run already active, the new run is its child (same experiment). Before a
    top-level run starts, the stale runs of killed processes are closed (:func:`close_stale_runs`). A
    top-level run inside a pipeline execution becomes a child of the execution's parent run
    (:func:`pipeline_parent_run`); a failing stage marks that parent FAILED.
    """
    import mlflow

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    parent = None
    if not (nested and mlflow.active_run() is not None):
        name = experiment_name(experiment)
        _ensure_experiment(uri, name)
        mlflow.set_experiment(name)
        close_stale_runs(experiment)
        parent = pipeline_parent_run(experiment)
    str_tags = {**process_tags(), **run_tags(tags)}
    if parent:
        str_tags["mlflow.parentRunId"] = parent
    try:
        with mlflow.start_run(run_name=run_name, nested=nested, tags=str_tags) as run:
            yield run
    except BaseException:
        if parent:
            finish_pipeline_run("FAILED")
        raise


def process_tags() -> dict[str, str]:
    """Who runs this: host, pid and the pid's start time (so that a reused pid is not taken for it)."""
    try:
        import psutil

        start = f"{psutil.Process().create_time():.3f}"
    except (ImportError, OSError):  # psutil comes with ray/mlflow; without it runs are never taken for stale
        return {}
    return {"deltamem.host": socket.gethostname(), "deltamem.pid": str(os.getpid()), "deltamem.pid_start": start}


def process_alive(tags: Mapping[str, str]) -> bool:
    """Whether the process recorded by :func:`process_tags` still runs (unknown counts as alive)."""
    try:
        import psutil
    except ImportError:
        return True
    try:
        proc = psutil.Process(int(tags["deltamem.pid"]))
        return f"{proc.create_time():.3f}" == tags.get("deltamem.pid_start")
    except (KeyError, ValueError):
        return True  # not one of ours: never closed
    except (psutil.Error, OSError):
        return False


def close_stale_runs(experiment: str | None = None, **match: str) -> list[str]:
    """Close as KILLED the RUNNING runs of this host whose process is gone; returns their ids.

    ``match`` narrows it to runs with those tags (e.g. ``stage="train", variant="TSW"``). Runs without
    process tags (pipeline parents, runs logged by hand), of other hosts or of live processes stay open.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri())
    exp = client.get_experiment_by_name(experiment_name(experiment))
    if exp is None:
        return []
    host = socket.gethostname()
    query = f"attributes.status = 'RUNNING' and tags.`deltamem.host` = '{host}'"
    for key, value in match.items():
        query += f" and tags.`{key}` = '{value}'"
    closed = []
    for run in client.search_runs([exp.experiment_id], filter_string=query, max_results=5000):
        tags = run.data.tags
        if "deltamem.pid" not in tags or process_alive(tags):
            continue
        what = run.info.run_name or run.info.run_id
        client.set_tag(run.info.run_id, "deltamem.closed_by", "a later execution on this host (process gone)")
        client.set_terminated(run.info.run_id, "KILLED")
        closed.append(run.info.run_id)
        print(f"MLflow: closed the stale run {run.info.run_id} ({what}) of a killed process as KILLED", file=sys.stderr)
    return closed


_METRIC_UNSAFE = str.maketrans({c: "_" for c in "!\"#$%&'()*+,;<=>?@[\\]^`{|}~"})


def metric_key(name: str) -> str:
    """An MLflow-safe metric name (letters, digits, ``_ - . / :`` and spaces)."""
    return "".join(ch if ch.isalnum() or ch in "_-./: " else "_" for ch in name.translate(_METRIC_UNSAFE))


def _param_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= MAX_PARAM_LENGTH else text[: MAX_PARAM_LENGTH - 3] + "..."


def log_params(params: Mapping[str, Any], prefix: str = "") -> None:
    """Log (nested) params, flattened to dotted keys; long values are cut to MLflow's limit."""
    import mlflow

    flat = {k: _param_value(v) for k, v in flatten(params, prefix).items()}
    items = sorted(flat.items())
    for start in range(0, len(items), _BATCH):
        mlflow.log_params(dict(items[start : start + _BATCH]))


def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    """Log numeric metrics (non-finite values and non-numbers are skipped)."""
    import mlflow

    clean = {}
    for k, v in metrics.items():
        if isinstance(v, bool) or not isinstance(v, int | float):
            continue
        if math.isfinite(float(v)):
            clean[k] = float(v)
    items = sorted(clean.items())
    for start in range(0, len(items), _BATCH):
        mlflow.log_metrics(dict(items[start : start + _BATCH]), step=step)


def log_dict(data: Mapping[str, Any], artifact_file: str) -> None:
    """Store ``data`` as a JSON artifact named ``artifact_file`` in the active run."""
    import mlflow

    mlflow.log_dict(dict(data), artifact_file)
