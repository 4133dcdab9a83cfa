"""DVC stage ``evaluate``: every condition × variant × task of the ``evaluate`` section → results/eval/.

python -m pipeline.stages.evaluate [--params params.yaml] [--workers N] [--no-tracking] [--no-resume]

Writes ``results/eval/<variant>/<condition>/<task>/{predictions.jsonl,metrics.json,shards/}`` and the
combined ``results/eval/metrics.json`` (see :mod:`pipeline.eval.runner`), then logs an MLflow run
``evaluate`` with one nested run per unit. Exit status 2 (one line, no traceback) for bad params, data
or artefacts (unreadable, non-finite or mismatched adapters, a split that disagrees with its manifest,
an output folder that cannot be written: all found while planning, before any shard runs); 1 when a
shard fails after its retries (finished shards are kept: rerun to resume).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from deltamem.backbones import EMBEDDED_NAMES, BackboneLoadError, resolve_source
from pipeline.data.errors import DataError
from pipeline.eval.runner import EvalError, EvalInputError, EvalParams, run_evaluate
from pipeline.eval.tracking import log_to_mlflow
from pipeline.params import ParamsError, load_section


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml", help="params file (default: params.yaml); outputs go next to it")
    ap.add_argument("--workers", type=int, default=None, help="override evaluate.workers (0 = in-process)")
    ap.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    ap.add_argument("--no-resume", action="store_true", help="recompute every shard")
    args = ap.parse_args(argv)
    try:
        p = load_section(args.params, "evaluate", EvalParams)
        if p.backbone not in EMBEDDED_NAMES:  # before Ray actors start and each fail on it
            resolve_source(p.backbone, Path(args.params).resolve().parent, "evaluate.backbone")
    except (ParamsError, BackboneLoadError) as err:
        print(f"evaluate: error: {err}", file=sys.stderr)
        return 2
    except UnicodeDecodeError as err:
        print(f"evaluate: error: {args.params}: not UTF-8 text (byte {err.start}: {err.reason})", file=sys.stderr)
        return 2
    updates = {}
    if args.workers is not None:
        updates["workers"] = args.workers
    if args.no_resume:
        updates["resume"] = False
    if updates:
        p = p.model_copy(update=updates)
    try:
        summary = run_evaluate(p, Path(args.params).resolve().parent)
    except (EvalInputError, DataError, BackboneLoadError) as err:  # bad params, data or artefacts: one line
        print(f"evaluate: error: {err}", file=sys.stderr)
        return 2
    except EvalError as err:
        print(f"evaluate: error: {err}", file=sys.stderr)
        return 1
    if not args.no_tracking:
        log_to_mlflow(p, summary.units, summary.out, summary)
    for unit, reason in summary.skipped_units.items():
        print(f"evaluate: skipped {unit}: {reason}")
    headline = {f"{vc}/{task}": m.get("headline") for vc, tasks in summary.metrics.items() for task, m in tasks.items()}
    print(json.dumps(headline, indent=2))
    print(f"evaluate: {len(summary.computed)} shards computed, {len(summary.reused)} reused in {summary.wall_s:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
