"""Before/after check of a refactoring of the evaluator: two code trees, the same inputs, the same outputs.

python bench/eval_parity.py --before /tmp/base --after . --work /tmp/parity [--limit 8]

Builds one root (the embedded SmolLM2 backbone saved as a folder, random δ-mem adapters TSW and SSW, the
synthetic test split), then runs the ``evaluate`` stage of each code tree (``PYTHONPATH=<tree>``,
in-process, no tracking) on it, for ``decoding: greedy`` and ``decoding: paper`` (the second adds the
synthetic dialogues as LoCoMo questions, whose paper decoding samples with a seed per question), every default
condition. Then it compares byte for byte every ``predictions.jsonl`` and every shard's config hash, and
prints one line per difference; exit status 1 when there is any.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

BASE = {
    "backbone": "models/backbone",
    "variants": ["TSW", "SSW"],
    "workers": 0,
    "threads": 1,
    "batch_size": 4,
    "write_batch_size": 2,
    "shard_conversations": 4,
    "bm25_k": 3,
    "bootstrap": 200,
    "max_new_tokens_cap": 8,
    "context_window": 1024,
}


def build_root(root: Path, limit: int) -> None:
    """The shared inputs (written once; a rerun reuses them)."""
    import torch

    from deltamem import DeltaMemConfig, attach_delta_mem, detach_delta_mem
    from pipeline.backbone import BackboneParams, prepare_backbone
    from pipeline.data.schema import write_split
    from pipeline.data.synthetic import config_from_options, generate_split

    if not (root / "models" / "backbone" / "config.json").exists():
        prepare_backbone(BackboneParams(), root)
    for i, mode in enumerate(("TSW", "SSW")):
        out = root / "models" / mode / "adapter"
        if out.exists():
            continue
        from deltamem.backbones import load_backbone

        model, _ = load_backbone(str(root / "models" / "backbone"))
        attach_delta_mem(model, DeltaMemConfig(write_mode=mode, rank=4))
        gen = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for name, p in model.delta_mem.named_parameters():
                if "delta_" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        model.save_adapter(str(out))
        detach_delta_mem(model)
    split = root / "data" / "prepared" / "synthetic" / "test.jsonl"
    if not split.exists():
        cfg = config_from_options(
            {
                "seed": 7,
                "dialogues": {"test": limit // 2},
                "sessions": 2,
                "facts_per_dialogue": 2,
                "distractor_turns": 1,
            }
        )
        examples = generate_split(cfg, "test")
        write_split(examples, split)
        # the same dialogues as LoCoMo questions (its paper decoding samples, seeded per question)
        as_locomo = [dataclasses.replace(e, task="locomo", category="single-hop") for e in examples]
        write_split(as_locomo, root / "data" / "prepared" / "as-locomo" / "test.jsonl")


def run_tree(tree: Path, root: Path, tag: str, decoding: str) -> Path:
    out = f"results/{tag}-{decoding}"
    tasks = [{"dataset": "synthetic", "split": "test"}]
    if decoding == "paper":
        tasks.append({"dataset": "as-locomo", "split": "test"})
    params = root / f"params-{tag}-{decoding}.yaml"
    params.write_text(yaml.safe_dump({"evaluate": {**BASE, "decoding": decoding, "tasks": tasks, "out_dir": out}}))
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    new = (tree / "pipeline" / "stages" / "evaluate.py").is_file()  # an older tree has stages/evaluate.py
    cmd = [
        sys.executable,
        *(["-m", "pipeline.stages.evaluate"] if new else [str(tree / "stages" / "evaluate.py")]),
        "--params",
        str(params),
        "--no-tracking",
        "--no-resume",
    ]
    subprocess.run(cmd, env=env, check=True, cwd=tree)
    return root / out


def compare(a: Path, b: Path) -> list[str]:
    diffs = []
    preds_a = sorted(p.relative_to(a) for p in a.rglob("predictions.jsonl"))
    preds_b = sorted(p.relative_to(b) for p in b.rglob("predictions.jsonl"))
    if preds_a != preds_b:
        diffs.append(f"different units: {sorted(set(map(str, preds_a)) ^ set(map(str, preds_b)))}")
    for rel in preds_a:
        if (b / rel).exists() and (a / rel).read_bytes() != (b / rel).read_bytes():
            diffs.append(f"{rel}: predictions differ")
    metas_a = {p.relative_to(a): json.loads(p.read_text())["config_hash"] for p in a.rglob("*.meta.json")}
    metas_b = {p.relative_to(b): json.loads(p.read_text())["config_hash"] for p in b.rglob("*.meta.json")}
    if set(metas_a) != set(metas_b):
        diffs.append(f"different shards: {sorted(map(str, set(metas_a) ^ set(metas_b)))}")
    for rel, h in metas_a.items():
        if rel in metas_b and metas_b[rel] != h:
            diffs.append(f"{rel}: config hash {h} vs {metas_b[rel]}")
    print(f"compared {len(preds_a)} predictions files and {len(metas_a)} shard hashes: {a.name} vs {b.name}")
    return diffs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", type=Path, required=True)
    ap.add_argument("--after", type=Path, required=True)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--limit", type=int, default=8, help="questions of the synthetic split (2 per dialogue)")
    ap.add_argument("--skip-before", action="store_true", help="reuse the before-run's results")
    args = ap.parse_args()
    root = args.work.resolve()
    build_root(root, args.limit)
    diffs = []
    for decoding in ("greedy", "paper"):
        a = root / f"results/before-{decoding}"
        if not args.skip_before:
            a = run_tree(args.before.resolve(), root, "before", decoding)
        b = run_tree(args.after.resolve(), root, "after", decoding)
        diffs += compare(a, b)
    for d in diffs:
        print(d)
    print("identical" if not diffs else f"{len(diffs)} difference(s)")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
