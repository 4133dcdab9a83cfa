"""DVC stage ``train@<variant>``: δ-mem SFT of one variant → models/<variant>/, results/train/<variant>/.

python -m pipeline.stages.train --variant TSW [--params params.yaml] [--nproc N|auto] [--launcher local|torchrun|ray]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from deltamem.backbones import BackboneLoadError
from pipeline.data.errors import DataError
from pipeline.train.run import InputError, check_inputs, resolve_nproc, run_train
from pipeline.train.trainer import CheckpointError


def torchrun_command(params: str, variant: str, nproc: int, grad_accum: int, no_tracking: bool) -> list[str]:
    """The torchrun command line of ``nproc`` DeepSpeed ranks on this machine (rendezvous on loopback)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
    cmd += ["--master_addr", "127.0.0.1", "-m", "pipeline.train.distributed", "--params", params, "--variant", variant]
    return cmd + ["--grad-accum", str(grad_accum)] + (["--no-tracking"] if no_tracking else [])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", required=True, help="a key of train.variants in params.yaml")
    ap.add_argument("--params", default="params.yaml", help="params file (default: params.yaml); outputs go next to it")
    ap.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    ap.add_argument("--nproc", default=None, help="processes or Ray workers (default train.nproc): N or auto")
    ap.add_argument("--launcher", default=None, choices=["local", "torchrun", "ray"], help="default train.launcher")
    args = ap.parse_args(argv)
    try:
        p = check_inputs(args.params, args.variant)
        update: dict = {}
        if args.nproc is not None:
            update["nproc"] = args.nproc if args.nproc == "auto" else int(args.nproc)
        if args.launcher is not None:
            update["launcher"] = args.launcher
        try:
            p = type(p).model_validate({**p.model_dump(), **update})
        except ValueError as err:  # pydantic's ValidationError
            raise InputError(f"--nproc/--launcher: {err}") from None
        p = resolve_nproc(p)
        root = Path(args.params).resolve().parent
        if p.launcher == "ray":
            from pipeline.train.ray_train import run_ray

            metrics = run_ray(p, args.variant, root, log_mlflow=not args.no_tracking)
        elif p.launcher == "torchrun" or p.nproc > 1:
            cmd = torchrun_command(args.params, args.variant, p.nproc, p.optim.grad_accum, args.no_tracking)
            return subprocess.call(cmd)
        else:
            metrics = run_train(p, args.variant, root, log_mlflow=not args.no_tracking)
    except (InputError, DataError, BackboneLoadError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
