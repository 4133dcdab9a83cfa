"""THE list of changes the CPU rehearsal makes to a preset (configs/*.yaml); nothing else is changed.

Each override says why: ``cpu`` (2 cores, no GPU), ``offline`` (no hub: stand-in backbones and local
raw files in their published layout), ``small`` (tiny limits so every preset runs in CI minutes), or
``workaround`` — a bug the rehearsal found in someone else's area, named by its issue item; the lead
deletes those lines as the fixes merge, and the rehearsal then proves the fix.

Paths are dotted; ``[*]`` applies to every item of a list, ``[name=x]`` to the item whose ``name`` is
``x`` (skipped when the preset has none). Values may hold ``{standin}``: the stand-in backbone folder.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Override:
    path: str
    value: Any
    why: str


OVERRIDES: list[Override] = [
    # offline: no hub downloads. The stand-in has the preset family's architecture and chat template.
    Override("prepare.tokenizer.name_or_path", "{standin}", "offline: stand-in of the preset's family"),
    Override("backbone.name_or_path", "{standin}", "offline: stand-in of the preset's family"),
    # offline: the hub sources, read from their published files in data/raw instead (issue 11 item 6, h-report:
    # allenai/qasper is a loading-script dataset that datasets>=4 refuses, so users need the release files too)
    Override("prepare.datasets[name=qasper].source", "data/raw/qasper", "offline: allenai release JSON"),
    Override("prepare.datasets[name=memoryagentbench].source", "data/raw/memoryagentbench", "offline: hub parquet"),
    # cpu: 2 cores, no GPU
    Override("train.nproc", 2, "cpu: 2 ranks (DeepSpeed on gloo); `auto` counts GPUs, and a CPU has none"),
    Override("evaluate.ray.actor_num_gpus", 0, "cpu: no GPU"),
    Override("evaluate.ray.actor_num_cpus", 1, "cpu: 2 cores"),
    Override("evaluate.ray.num_cpus", 2, "cpu: 2 cores"),
    # small: every stage, variant, task and condition runs, on a handful of examples
    Override("train.limit_train", 4, "small"),
    Override("train.limit_validation", 2, "small"),
    Override("train.optim.steps", 2, "small"),
    Override("train.optim.grad_accum", 2, "small: the presets accumulate 32 micro-batches per step"),
    Override("train.optim.checkpoint_every", 1, "small: still checkpoints"),
    Override("evaluate.tasks[*].limit", 2, "small: 2 questions per task"),
    Override("evaluate.max_new_tokens_cap", 4, "small: IFEval asks 1500 new tokens, GPQA 8192"),
    Override("evaluate.bootstrap", 20, "small"),
    Override("report.bootstrap", 100, "small: the minimum"),
    Override("report.permutations", 100, "small: the minimum"),
]


_STEP = re.compile(r"([^.\[\]]+)|\[(\*|[^=\]]+=[^\]]+)\]")


def _steps(path: str) -> list[str]:
    return [m.group(1) or f"[{m.group(2)}]" for m in _STEP.finditer(path)]


def _targets(node: Any, steps: list[str]) -> list[tuple[Any, Any]]:
    """(container, key) pairs the path names; dict keys on the way are created, list selectors filter."""
    if not steps:
        return []
    head, rest = steps[0], steps[1:]
    if head.startswith("["):
        if not isinstance(node, list):
            return []
        sel = head[1:-1]
        if sel == "*":
            items = list(node)
        else:
            key, value = sel.split("=", 1)
            items = [x for x in node if isinstance(x, dict) and str(x.get(key)) == value]
        return [t for x in items for t in _targets(x, rest)]
    if not isinstance(node, dict):
        return []
    if not rest:
        return [(node, head)]
    if head not in node or node[head] is None:
        node[head] = {}
    return _targets(node[head], rest)


def apply(preset: dict[str, Any], *, standin: str) -> tuple[dict[str, Any], list[str]]:
    """The preset with :data:`OVERRIDES` applied, and one printable line per change."""
    params = copy.deepcopy(preset)
    lines: list[str] = []
    for ov in OVERRIDES:
        value = ov.value.format(standin=standin) if isinstance(ov.value, str) else ov.value
        for container, key in _targets(params, _steps(ov.path)):
            before = container.get(key, "<unset>")
            container[key] = value
            lines.append(f"{ov.path}: {before!r} -> {value!r}  ({ov.why})")
    return params, list(dict.fromkeys(lines))  # one line per distinct change ([*] paths repeat)


def main(argv: list[str] | None = None) -> int:
    """``python -m tests.e2e.cpu_overrides PRESET --standin DIR``: the rehearsal's params.yaml on stdout."""
    import argparse
    import sys
    from pathlib import Path

    import yaml

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("preset", type=Path)
    ap.add_argument("--standin", required=True, help="folder of the stand-in backbone")
    args = ap.parse_args(argv)
    params, lines = apply(yaml.safe_load(args.preset.read_text()), standin=args.standin)
    print("\n".join(f"override: {line}" for line in lines), file=sys.stderr)
    print(yaml.safe_dump(params, sort_keys=False, allow_unicode=True), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
