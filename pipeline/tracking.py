"""Minimal MLflow helpers shared by the stages.

* Tracking URI: ``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<repo>/mlflow.db``.
* Experiment: ``MLFLOW_EXPERIMENT_NAME`` if set, else ``deltamem``. For a SQLite store, new experiments
  keep their artifacts in ``mlruns/<experiment>/`` next to the database file (not in the working
  directory).
* :func:`start_run` opens a run (nested inside the active one when ``nested=True``) with tags;
  :func:`log_params` flattens nested dicts to dotted keys; :func:`log_metrics`; :func:`log_dict`
  stores a dict as a JSON artifact.

``mlflow`` is imported only when a run starts, so importing this module is cheap.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_EXPERIMENT = "deltamem"
MAX_PARAM_LENGTH = 6000  # MLflow's limit for a parameter value
_BATCH = 100


def default_tracking_uri() -> str:
    """``sqlite:///<repo>/mlflow.db``."""
    return f"sqlite:///{REPO_ROOT / 'mlflow.db'}"


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


@contextmanager
def start_run(
    run_name: str,
    *,
    experiment: str | None = None,
    tags: Mapping[str, Any] | None = None,
    nested: bool = False,
) -> Iterator[Any]:
    """Open an MLflow run (``mlflow.ActiveRun``) and close it on exit (status FAILED on an exception).

    With ``nested=True`` and a run already active, the new run is its child (same experiment).
    """
    import mlflow

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    if not (nested and mlflow.active_run() is not None):
        name = experiment_name(experiment)
        if mlflow.get_experiment_by_name(name) is None:
            mlflow.create_experiment(name, artifact_location=_artifact_location(uri, name))
        mlflow.set_experiment(name)
    str_tags = {str(k): str(v) for k, v in (tags or {}).items()}
    with mlflow.start_run(run_name=run_name, nested=nested, tags=str_tags) as run:
        yield run


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
