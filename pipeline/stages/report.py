"""DVC stage ``report``: training + evaluation results → ``reports/`` (report.md, report.html, plots).

python -m pipeline.stages.report [--params params.yaml] [--no-tracking]

Reads the ``report`` section (see :class:`pipeline.report.ReportParams`), writes ``reports/`` atomically,
then ``reports/metrics.json`` (the DVC metrics file: headline scores and claims only, see :func:`dvc_metrics`),
logs a ``report`` run (the report files as artifacts, the summary numbers as metrics) and closes the
pipeline execution's parent MLflow run. Exit status 2 when a stage output it needs is missing or bad.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from pipeline.common import atomic_write_json
from pipeline.params import ParamsError, load_section
from pipeline.report import ReportInputError, ReportParams, run_report
from pipeline.report.build import NA, mlflow_payload


def log_to_mlflow(result, p: ReportParams) -> None:
    """A ``report`` run with the report as artifacts, then the same artifacts on the parent run, which is closed."""
    import mlflow

    from pipeline import tracking

    with tracking.start_run("report", tags={"stage": "report"}) as run:
        tracking.log_params(p.model_dump(mode="json"), prefix="report")
        metrics, undefined = mlflow_payload(result.summary)
        tracking.log_metrics({tracking.metric_key(k): v for k, v in metrics.items()})
        if undefined:  # undefined ratios (0/0) have no number: a tag "n/a" each, never a made-up metric
            mlflow.set_tags({tracking.metric_key(k): v for k, v in undefined.items()})
        mlflow.log_artifacts(str(result.out_dir), artifact_path="report")
        parent = run.data.tags.get("mlflow.parentRunId")
    if parent:
        client = mlflow.tracking.MlflowClient(tracking.tracking_uri())
        client.log_artifacts(parent, str(result.out_dir), artifact_path="report")
        for c in result.claims:
            key = tracking.metric_key(f"claim/{c['deltamem']}/{c['task']}/vs/{c['versus']}/ratio")
            if c["ratio"].value != c["ratio"].value:  # NaN: 0/0
                client.set_tag(parent, key, NA)
            else:
                client.log_metric(parent, key, _finite(c["ratio"].value))
        tracking.finish_pipeline_run("FINISHED")


METRICS_FILE = "metrics.json"  # in report.out_dir; dvc.yaml lists it under `metrics`
_DVC_METRIC_SUFFIXES = ("/score", "/mean_ratio_vs_")


def dvc_metrics(result) -> dict[str, Any]:
    """The few numbers `dvc exp show` compares experiments by (reports/summary.json keeps all of them).

    ``<variant>/<condition>/<task>/score`` (the headline, ``base/...`` for the frozen backbone), the mean
    ratio of each δ-mem condition to the reference, and for every claim ``.../ratio`` and ``.../holds``
    (1 or 0). Undefined values (0/0 ratios) are left out rather than written as NaN.
    """
    out: dict[str, Any] = {}
    for key, value in result.summary.items():
        if any(suffix in key for suffix in _DVC_METRIC_SUFFIXES) and not key.endswith(("_ci_low", "_ci_high")):
            out[key] = value
    for c in result.claims:
        key = f"claim/{c['deltamem']}/{c['task']}/vs/{c['versus']}"
        out[f"{key}/holds"] = int(bool(c["holds"]))
        out[f"{key}/ratio"] = c["ratio"].value
    return {k: v for k, v in sorted(out.items()) if isinstance(v, int | float) and v == v and abs(v) != float("inf")}


def write_dvc_metrics(result) -> Path:
    """``<out_dir>/metrics.json`` via a temporary file and a rename (never a half-written metrics file)."""
    path = Path(result.out_dir) / METRICS_FILE
    atomic_write_json(path, dvc_metrics(result))
    return path


def _finite(x: float) -> float:
    return x if x == x and abs(x) != float("inf") else (1e9 if x > 0 else -1e9)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    ap.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    args = ap.parse_args(argv)
    try:
        p = load_section(args.params, "report", ReportParams)
        result = run_report(p, Path(args.params).resolve().parent)
    except (ParamsError, ReportInputError) as err:
        print(f"report: error: {err}", file=sys.stderr)
        return 2
    write_dvc_metrics(result)
    if not args.no_tracking:
        log_to_mlflow(result, p)
    for c in result.claims:
        verdict = "holds" if c["holds"] else "does NOT hold"
        r = c["ratio"]
        ratio = NA if r.value != r.value else f"{r.value:.3g}× [{r.low:.3g}, {r.high:.3g}]"
        print(
            f"report: {c['claim']}: {c['task']}: {c['deltamem']} > {c['versus']} {verdict}: ratio {ratio}, "
            f"difference {c['difference'].value:+.3f} "
            f"[{c['difference'].low:+.3f}, {c['difference'].high:+.3f}], p={c['p_value']:.3g}"
        )
    for c in result.not_evaluated:
        print(
            f"report: {c['claim']}: {c['task']}: {c['deltamem']} > {c['versus']} not evaluated (a condition is missing)"
        )
    print(f"report: wrote {result.out_dir / 'report.md'} and {result.out_dir / 'report.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
