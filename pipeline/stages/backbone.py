"""DVC stage ``backbone``: save the configured backbone as a plain Hugging Face folder (models/backbone).

python -m pipeline.stages.backbone [--params params.yaml]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from deltamem.backbones import BackboneLoadError
from pipeline.backbone import BackboneParams, InputError, prepare_backbone
from pipeline.params import ParamsError, load_section


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml", help="params file (default: params.yaml); outputs go next to it")
    args = ap.parse_args(argv)
    try:
        p = load_section(args.params, "backbone", BackboneParams)
        out = prepare_backbone(p, Path(args.params).resolve().parent)
    except (ParamsError, InputError, BackboneLoadError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"backbone saved to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
