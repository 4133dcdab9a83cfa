"""The real MLflow UI, driven in headless Chromium, shows a pipeline's runs and a metric column.

Runs are logged with :mod:`pipeline.tracking` into a throw-away SQLite store; ``mlflow server`` serves it on
127.0.0.1 and Playwright drives Debian's ``/usr/bin/chromium`` (``scripts/setup-browser.sh`` installs it; the
test is skipped without it). Playwright's own browsers are never downloaded.

The screenshot ``mlflow_ui_runs.png`` (and, on failure, the page's text, HTML and the server log) is written to
``$DELTAMEM_TEST_ARTIFACTS`` or ``<repo>/test-artifacts/``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline import tracking
from tests.ports import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
# closed network, maybe root: no sandbox, nothing that phones home
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
EXPERIMENT = "ui-test"
TAGS = {"variant": "TSW", "backbone": "embedded"}
ANSWER_CE = [2.5, 1.75, 1.3125]  # train-TSW, steps 0..2
HEADLINE = 0.4242  # evaluate
SERVER_START_S = 180  # the shared 2-core machine: mlflow's import alone takes seconds
UI_TIMEOUT_MS = 60_000

pytestmark = pytest.mark.slow


def artifact_dir() -> Path:
    """``$DELTAMEM_TEST_ARTIFACTS`` or ``<repo>/test-artifacts/`` (created)."""
    env = os.environ.get("DELTAMEM_TEST_ARTIFACTS")
    path = Path(env) if env else REPO_ROOT / "test-artifacts"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group (uvicorn runs in a child), SIGKILL after 20 s."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass


@contextlib.contextmanager
def mlflow_server(db: Path, workdir: Path) -> Iterator[str]:
    """``mlflow server`` on 127.0.0.1:<free port> over ``db``; yields its base URL once ``/health`` answers."""
    port = free_port()
    log_path = workdir / "mlflow-server.log"
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{db}",
        "--default-artifact-root", (workdir / "artifacts").as_uri(),
        "--no-serve-artifacts",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--workers", "1",
    ]  # fmt: skip
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=workdir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if proc.poll() is not None:
                shutil.copy(log_path, artifact_dir() / "mlflow-server.log")
                pytest.fail(f"mlflow server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                shutil.copy(log_path, artifact_dir() / "mlflow-server.log")
                pytest.fail(f"mlflow server not healthy after {SERVER_START_S} s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        _stop(proc)


def _log_pipeline() -> tuple[str, dict[str, str]]:
    """A parent run "pipeline" with children "train-TSW" and "evaluate"; returns (experiment id, name → run id)."""
    ids = {}
    with tracking.start_run("pipeline", tags={"stage": "pipeline", **TAGS}) as parent:
        ids["pipeline"] = parent.info.run_id
        tracking.log_params({"train": {"lr": 1e-3, "steps": len(ANSWER_CE)}})
        with tracking.start_run("train-TSW", nested=True, tags={"stage": "train", **TAGS}) as run:
            ids["train-TSW"] = run.info.run_id
            for step, value in enumerate(ANSWER_CE):
                tracking.log_metrics({"answer_ce": value}, step=step)
        with tracking.start_run("evaluate", nested=True, tags={"stage": "evaluate", **TAGS}) as run:
            ids["evaluate"] = run.info.run_id
            tracking.log_metrics({"headline": HEADLINE})
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking.tracking_uri())
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert {r.info.run_name for r in runs} == set(ids)  # the store itself is right before the UI is asked
    return experiment.experiment_id, ids


def _grid_cell(page, run_link, col_id: str):
    """The ag-grid cell of column ``col_id`` in the row holding ``run_link`` (rows are split across the
    pinned and the scrolling containers, joined by ``row-index``)."""
    row_index = run_link.locator("xpath=ancestor::*[@role='row'][1]").get_attribute("row-index")
    return page.locator(f'[role="row"][row-index="{row_index}"] [role="gridcell"][col-id="{col_id}"]')


def _save_debug(page, out: Path, server_log: Path) -> None:
    """Best effort: the failing page's screenshot, text and HTML, and the server log."""
    steps = [
        lambda: page.screenshot(path=str(out / "mlflow_ui_failure.png"), full_page=True),
        lambda: (out / "mlflow_ui_failure.txt").write_text(
            f"{page.url}\n\n{page.inner_text('body')}", encoding="utf-8"
        ),
        lambda: (out / "mlflow_ui_failure.html").write_text(page.content(), encoding="utf-8"),
        lambda: shutil.copy(server_log, out / "mlflow-server.log"),
    ]
    for step in steps:
        with contextlib.suppress(Exception):
            step()


def test_mlflow_ui_shows_runs_and_metric_column(tmp_path, monkeypatch):
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not found: run scripts/setup-browser.sh (Debian's chromium package)")
    from playwright.sync_api import expect, sync_playwright

    db = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
    experiment_id, run_ids = _log_pipeline()

    out = artifact_dir()
    screenshot = out / "mlflow_ui_runs.png"
    screenshot.unlink(missing_ok=True)
    with mlflow_server(db, tmp_path) as base, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        # wide, so that all columns fit even with the assistant panel open (ag-grid renders only visible columns)
        page = browser.new_page(viewport={"width": 2000, "height": 900})
        page.set_default_timeout(UI_TIMEOUT_MS)  # actions; each expect() gets the same timeout
        try:
            # MLflow 3 opens an experiment on its GenAI overview; the runs table is the "Model training" view
            page.goto(f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning")
            parent = page.get_by_role("link", name="pipeline", exact=True)
            expect(parent).to_have_attribute(
                "href", f"#/experiments/{experiment_id}/runs/{run_ids['pipeline']}", timeout=UI_TIMEOUT_MS
            )
            close_assistant = page.get_by_role("button", name="Close")  # the assistant side panel, if shown
            if close_assistant.count() == 1:
                close_assistant.click()

            # nested runs are collapsed under their parent: expand it
            run_name_col = "attributes.`Run Name`"
            _grid_cell(page, parent, run_name_col).get_by_role("button").first.click()
            for name in ("train-TSW", "evaluate"):
                link = page.get_by_role("link", name=name, exact=True)
                expect(link).to_have_attribute(
                    "href", f"#/experiments/{experiment_id}/runs/{run_ids[name]}", timeout=UI_TIMEOUT_MS
                )

            # metrics are not table columns by default: tick them in the "Columns" selector
            page.get_by_role("button", name="Columns").click()
            for metric in ("answer_ce", "headline"):  # tree nodes: a click on the title ticks the box
                page.get_by_title(metric, exact=True).click()
            page.keyboard.press("Escape")

            headers = page.locator('[role="columnheader"]')
            for metric in ("answer_ce", "headline"):
                expect(headers.filter(has_text=metric).first).to_be_visible(timeout=UI_TIMEOUT_MS)
            evaluate = page.get_by_role("link", name="evaluate", exact=True)
            train = page.get_by_role("link", name="train-TSW", exact=True)
            expect(_grid_cell(page, evaluate, "metrics.`headline`")).to_contain_text(
                str(HEADLINE), timeout=UI_TIMEOUT_MS
            )
            expect(_grid_cell(page, train, "metrics.`answer_ce`")).to_contain_text(
                str(ANSWER_CE[-1]), timeout=UI_TIMEOUT_MS
            )
            expect(page.get_by_text("3 matching runs")).to_be_visible(timeout=UI_TIMEOUT_MS)
            page.screenshot(path=str(screenshot), full_page=True)
        except BaseException:
            _save_debug(page, out, tmp_path / "mlflow-server.log")
            raise
        finally:
            browser.close()
    assert screenshot.stat().st_size > 10_000
