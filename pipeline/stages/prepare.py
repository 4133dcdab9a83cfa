"""DVC stage ``prepare``: read the ``prepare`` section of params.yaml and write ``data/prepared/``.

    python -m pipeline.stages.prepare [--params params.yaml] [--out DIR] [--no-tracking]

Writes ``<out_dir>/<dataset>/<split>.jsonl`` (+ ``<split>.contexts.jsonl``) and
``<out_dir>/manifest.json`` (see :mod:`pipeline.data.prepare`), then logs the counts and the manifest
to MLflow (``MLFLOW_TRACKING_URI``, default ``sqlite:///mlflow.db`` in the repository). Relative paths
in the params are taken from the params file's folder. Bad input gives one error line on stderr,
exit status 2, and no output.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

from deltamem.backbones import BackboneLoadError
from pipeline.data import DataError
from pipeline.data.prepare import MANIFEST, prepare
from pipeline.params import ParamsError, PrepareParams, load_section

EXIT_BAD_INPUT = 2
RAW_DIR = "data/raw"  # a dependency of this stage in dvc.yaml
_METRIC_UNSAFE = re.compile(r"[^0-9A-Za-z_\-. /]")


def manifest_metrics(manifest: dict[str, Any]) -> dict[str, float]:
    """Flat MLflow metrics from a manifest: examples/contexts per split and examples per category."""
    metrics: dict[str, float] = {"total_examples": manifest["totals"]["examples"]}
    for ds, info in manifest["datasets"].items():
        for split, s in info["splits"].items():
            base = _METRIC_UNSAFE.sub("_", f"{ds}/{split}")
            metrics[f"{base}/examples"] = s["examples"]
            metrics[f"{base}/contexts"] = s["contexts"]
            for cat, n in s["categories"].items():
                metrics[f"{base}/category/{_METRIC_UNSAFE.sub('_', cat)}"] = n
            for part in ("write", "read"):
                for stat, value in s.get("token_lengths", {}).get(part, {}).items():
                    metrics[f"{base}/tokens_{part}/{stat}"] = value
    return metrics


def sources_outside_raw(params: PrepareParams, base_dir: Path) -> list[str]:
    """Enabled local sources that are not under ``data/raw`` (so not DVC dependencies of prepare)."""
    import os

    raw = (base_dir / RAW_DIR).resolve()
    out = []
    for entry in params.datasets:
        src = entry.source
        if not entry.enabled or not src or src == "hf" or src.startswith("hf:"):
            continue
        path = Path(os.path.expandvars(src)).expanduser()
        path = path if path.is_absolute() else base_dir / path
        if not Path(os.path.abspath(path)).is_relative_to(raw) and not path.resolve().is_relative_to(raw):
            out.append(src)
    return out


def log_to_mlflow(params: PrepareParams, manifest: dict[str, Any], params_file: Path) -> None:
    """One MLflow run ``prepare``: the section as params, counts as metrics, the manifest as artifact."""
    from pipeline import tracking

    with tracking.start_run("prepare", tags={"stage": "prepare", "params_file": str(params_file)}):
        tracking.log_params(params.model_dump(mode="json", exclude_none=True), prefix="prepare")
        tracking.log_metrics(manifest_metrics(manifest))
        tracking.log_dict(manifest, MANIFEST)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--out", default=None, help="output folder (default: prepare.out_dir)")
    parser.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    args = parser.parse_args(argv)

    params_file = Path(args.params)
    try:
        params = load_section(params_file, "prepare", PrepareParams)
        manifest, out = prepare(params, base_dir=params_file.resolve().parent, out_dir=args.out)
    except (DataError, ParamsError, BackboneLoadError) as err:
        print(f"prepare: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    for src in sources_outside_raw(params, params_file.resolve().parent):
        print(
            f"prepare: warning: source {src} is outside {RAW_DIR}/, so it is not a dependency of the prepare "
            f"stage: dvc repro will not notice when it changes (move or symlink it under {RAW_DIR}/)",
            file=sys.stderr,
        )
    for ds, info in manifest["datasets"].items():
        counts = ", ".join(f"{split} {s['examples']}" for split, s in info["splits"].items())
        print(f"prepare: {ds}: {counts}")
    print(f"prepare: wrote {out}")
    if not args.no_tracking:
        log_to_mlflow(params, manifest, params_file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
