"""DVC stage ``train@<variant>``: δ-mem SFT of one variant → models/<variant>/, results/train/<variant>/.

python stages/train.py --variant TSW [--params params.yaml] [--no-tracking]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from deltamem.backbones import EMBEDDED_NAMES, BackboneLoadError, resolve_source
from pipeline.params import ParamsError, load_section
from pipeline.train.run import TrainParams, run_train


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", required=True, help="a key of train.variants in params.yaml")
    ap.add_argument("--params", default="params.yaml", help="params file (default: params.yaml); outputs go next to it")
    ap.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    ap.add_argument(
        "--nproc", type=int, default=None, help="processes (default train.nproc); > 1: torchrun + DeepSpeed ZeRO-2"
    )
    args = ap.parse_args(argv)
    try:
        p = load_section(args.params, "train", TrainParams)
        p.deltamem_config(args.variant)
        if p.backbone not in EMBEDDED_NAMES:  # before torchrun starts ranks that would each fail
            resolve_source(p.backbone, Path(args.params).resolve().parent, "train.backbone")
    except (ParamsError, ValueError, BackboneLoadError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    nproc = args.nproc or p.nproc
    if nproc > 1:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "--master_addr",
            "127.0.0.1",
            "-m",
            "pipeline.train.distributed",
            "--params",
            args.params,
            "--variant",
            args.variant,
        ]
        return subprocess.call(cmd + (["--no-tracking"] if args.no_tracking else []))
    try:
        metrics = run_train(p, args.variant, Path(args.params).resolve().parent, log_mlflow=not args.no_tracking)
    except BackboneLoadError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
