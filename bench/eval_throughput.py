"""Evaluation throughput on the embedded default: Ray scaling, state reuse, shared-prefix prefill.

    python bench/eval_throughput.py [--ray-questions 32] [--questions 16] [--out bench/results/eval_throughput_cpu.json]
    python bench/eval_throughput.py --ray-only [--ship-backbone]   # only 1 vs 2 actors (the acceptance figure)
    python bench/eval_throughput.py --quick                        # a smoke run (~2 min): does it still work?

Three measurements on the synthetic test split with the embedded backbone (SmolLM2-135M-Instruct):

1. **Ray scaling**: ``deltamem_only`` questions/second with 1 and with 2 Ray worker actors (1 CPU and 1
   torch thread each), timed after the actors have loaded the backbone and computed a warm-up shard, so
   the figure is the steady-state rate of the scheduler (actor start-up is reported separately). The
   machine's own capacity for two single-thread processes is probed first (``cpu_parallel_capacity``:
   2.0 on two idle cores), since on a shared machine it bounds the speed-up.
2. **State reuse**: ``deltamem_only`` with each conversation's history written once and the state reused
   for its questions vs written again for every question (``reuse_state: false``); backbone tokens and
   questions/second, and whether the answers are identical.
3. **Shared-prefix prefill**: ``deltamem_full_context`` with the conversation's prompt prefix prefilled
   once (``prefix_cache: true``) vs every prompt prefilled whole.

``--ship-backbone`` times 1 vs 2 actors on the no-shared-filesystem path: the backbone folder is sent
through the object store (as on a cluster the stage did not start) instead of being opened by path; shard
data and the adapter always travel that way. Each Ray run records the load average before and after it.
``--quick`` shrinks every measurement (8 Ray questions, 4 in-process) and writes
``bench/results/eval_throughput_quick.json`` unless ``--out`` is given: figures to check that the script
works, not to quote.

2 and 3 run in-process with one torch thread (on a shared machine, more threads than free cores makes
torch's thread pool spin and the timings meaningless).

Inputs: ``models/backbone`` and ``models/TSW/adapter`` when they exist; otherwise the embedded backbone
is saved to a temporary folder and a freshly attached (untrained) TSW adapter is used — the cost of a
forward pass does not depend on the adapter's values. Data: ``data/prepared/synthetic/test.jsonl`` when
present, else the same generator settings as params.yaml. Machine load is recorded: the timings are
wall-clock on a possibly shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def prepare_inputs(work: Path) -> Path:
    """A root folder with models/backbone, models/TSW/adapter and data/prepared/synthetic/test.jsonl."""
    root = work / "root"
    (root / "models").mkdir(parents=True)
    (root / "data" / "prepared").mkdir(parents=True)
    backbone = REPO / "models" / "backbone"
    if backbone.is_dir():
        os.symlink(backbone, root / "models" / "backbone")
    else:
        from deltamem.backbones import load_backbone

        model, tok = load_backbone("embedded")
        model.hf_quantizer = None  # de-quantised GGUF weights: save them as plain fp32 tensors
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(root / "models" / "backbone")
        tok.save_pretrained(root / "models" / "backbone")
    adapter = REPO / "models" / "TSW" / "adapter"
    (root / "models" / "TSW").mkdir()
    if adapter.is_dir():
        os.symlink(adapter, root / "models" / "TSW" / "adapter")
    else:
        from deltamem import DeltaMemConfig, attach_delta_mem
        from deltamem.backbones import load_backbone

        model, _ = load_backbone(str(root / "models" / "backbone"))
        attach_delta_mem(model, DeltaMemConfig(rank=8, write_mode="TSW")).save_adapter(
            str(root / "models" / "TSW" / "adapter")
        )
    data = REPO / "data" / "prepared" / "synthetic"
    if (data / "test.jsonl").is_file():
        os.symlink(data, root / "data" / "prepared" / "synthetic")
    else:
        from pipeline.data.schema import write_split
        from pipeline.data.synthetic import config_from_options, generate_split

        cfg = config_from_options({"seed": 1234, "dialogues": {"test": 100}})
        write_split(generate_split(cfg, "test"), root / "data" / "prepared" / "synthetic" / "test.jsonl")
    return root


def _burn(args: tuple[int, float]) -> tuple[float, float]:
    """A fixed single-thread matmul workload started at wall-clock ``start``; returns (start, end)."""
    import torch

    work, start = args
    torch.set_num_threads(1)
    a = torch.randn(384, 384)
    while time.time() < start:
        time.sleep(0.01)
    t0 = time.time()
    for _ in range(work * 200):
        a = torch.tanh(a @ a)
    return t0, time.time()


def cpu_parallel_capacity(work: int = 3) -> dict[str, float]:
    """Two single-thread processes doing one unit of work each, started together, vs one process doing
    one: the speed-up two workers can get on this machine right now (2.0 on two idle cores)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    with ctx.Pool(2) as pool:
        t0, t1 = pool.apply(_burn, ((work, time.time() + 2.0),))
        single = t1 - t0
        ends = pool.map(_burn, [(work, time.time() + 2.0)] * 2)
        pair = max(e for _, e in ends) - min(s for s, _ in ends)
    return {
        "one_process_s": round(single, 2),
        "two_processes_s": round(pair, 2),
        "capacity": round(2 * single / pair, 2),
    }


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def timed_run(params: Any, root: Path) -> tuple[float, Any]:
    from pipeline.eval.runner import run_evaluate

    t0 = time.perf_counter()
    summary = run_evaluate(params, root, progress=False)
    return time.perf_counter() - t0, summary


def unit_figures(summary: Any, unit: str) -> dict[str, float]:
    m = summary.metrics[unit]["synthetic"]
    return {k.removeprefix("cost/"): m[k] for k in sorted(m) if k.startswith("cost/")}


def predictions(out: Path, unit: str) -> list[str]:
    path = out / unit / "synthetic" / "predictions.jsonl"
    return [json.loads(line)["prediction"] for line in path.read_text().splitlines()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ray-questions", type=int, default=32, help="questions of the Ray runs (4 per conversation)")
    ap.add_argument("--questions", type=int, default=16, help="questions of the in-process comparisons")
    ap.add_argument("--out", default=None, help="default: bench/results/eval_throughput_cpu.json (--quick: _quick)")
    ap.add_argument("--ray-only", action="store_true", help="only the Ray scaling (1 vs 2 actors)")
    ap.add_argument(
        "--ship-backbone", action="store_true", help="send the backbone through the object store (no shared path)"
    )
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a check that the script runs")
    args = ap.parse_args(argv)
    if args.quick:
        args.ray_questions, args.questions = min(args.ray_questions, 8), min(args.questions, 4)
    if args.out is None:
        name = "eval_throughput_quick.json" if args.quick else "eval_throughput_cpu.json"
        args.out = str(REPO / "bench" / "results" / name)

    import ray
    import torch

    from pipeline.eval.executors import _shutdown_ray, init_ray, shutdown_pool
    from pipeline.eval.runner import EvalParams
    from pipeline.ray_local import start_local_ray

    work = Path(tempfile.mkdtemp(prefix="eval-bench-"))
    record: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "ray": ray.__version__,
            "load_average_start": load_average(),
        },
        "backbone": "models/backbone"
        if (REPO / "models" / "backbone").is_dir()
        else "embedded (saved to a temp folder)",
        "adapter": "models/TSW/adapter" if (REPO / "models" / "TSW" / "adapter").is_dir() else "untrained TSW",
        "ray_questions": args.ray_questions,
        "questions": args.questions,
        "quick": args.quick,
        "backbone_shipped": args.ship_backbone,
    }
    t_start = time.perf_counter()
    try:
        root = prepare_inputs(work)
        base = {
            "variants": ["TSW"],
            "tasks": [{"dataset": "synthetic", "split": "test", "limit": args.questions}],
            "batch_size": 8,
            "shard_conversations": 2,
            "resume": False,
            "bootstrap": 0,
            "threads": 1,
        }

        # 1. Ray scaling (actors kept between runs: start-up timed once, then steady-state runs);
        # one conversation per shard, so 2 workers get balanced work
        ray_base = {
            **base,
            "conditions": ["deltamem_only"],
            "tasks": [{"dataset": "synthetic", "split": "test", "limit": args.ray_questions}],
            "shard_conversations": 1,
        }
        local = None
        if args.ship_backbone:  # a session the stage did not start: the executor ships the backbone's files
            local = start_local_ray(num_cpus=os.cpu_count() or 2, object_store_mb=1200)
        else:
            init_ray(EvalParams(**ray_base, ray={"num_cpus": os.cpu_count() or 2}))
        warm = EvalParams(
            **{**ray_base, "tasks": [{"dataset": "synthetic", "split": "test", "limit": 8}]},
            workers=2,
            out_dir=str(work / "warm"),
        )
        startup, _ = timed_run(warm, root)
        scaling: dict[str, Any] = {
            "actor_startup_and_warmup_s": round(startup, 2),
            "cpu_parallel_capacity": cpu_parallel_capacity(),
        }
        # 2 first: both warmed actors are reused (1 then 2 would start a fresh actor inside the timed run)
        for workers in (2, 1):
            p = EvalParams(**ray_base, workers=workers, out_dir=str(work / f"ray{workers}"))
            load_before = load_average()
            wall, summary = timed_run(p, root)
            figures = unit_figures(summary, "TSW/deltamem_only")
            scaling[f"workers_{workers}"] = {
                "wall_s": round(wall, 2),
                "questions_per_s": round(args.ray_questions / wall, 3),
                "shard_compute_s": round(figures["wall_s"], 2),
                "busy_workers": round(figures["wall_s"] / wall, 2),  # mean actors computing at once
                "load_average_before": load_before,
                "load_average_after": load_average(),
            }
        scaling["speedup_2_vs_1"] = round(scaling["workers_1"]["wall_s"] / scaling["workers_2"]["wall_s"], 3)
        scaling["identical_predictions"] = predictions(work / "ray1", "TSW/deltamem_only") == predictions(
            work / "ray2", "TSW/deltamem_only"
        )
        shutdown_pool()
        if local is not None:
            local.shutdown()
        else:
            _shutdown_ray()
        record["ray_scaling"] = scaling
        print(json.dumps({"ray_scaling": scaling}, indent=2), flush=True)
        if args.ray_only:
            return _write(record, args.out, t_start)

        # in-process reference and the two algorithmic speed-ups (one worker, all cores)
        from pipeline.eval.runner import EvalWorker

        worker = EvalWorker(str(root / "models" / "backbone"), threads=1)

        def in_process(name: str, **kw: Any) -> tuple[float, Any, Path]:
            from pipeline.eval.runner import run_evaluate

            out = work / name
            p = EvalParams(**{**base, **kw}, workers=0, out_dir=str(out))
            t0 = time.perf_counter()
            summary = run_evaluate(p, root, progress=False, worker=worker)
            return time.perf_counter() - t0, summary, out

        in_process(
            "warmup", conditions=["deltamem_only"], tasks=[{"dataset": "synthetic", "split": "test", "limit": 4}]
        )
        comparisons: dict[str, Any] = {}
        for label, cond, key, on, off in (
            ("state_reuse", "deltamem_only", "reuse_state", True, False),
            ("prefix_cache", "deltamem_full_context", "prefix_cache", True, False),
        ):
            entry: dict[str, Any] = {"condition": cond}
            outs = {}
            for flag in (on, off):
                wall, summary, out = in_process(f"{label}-{flag}", conditions=[cond], **{key: flag})
                f = unit_figures(summary, f"TSW/{cond}")
                outs[flag] = out
                entry[f"{key}={str(flag).lower()}"] = {
                    "wall_s": round(wall, 2),
                    "questions_per_s": round(args.questions / wall, 3),
                    "forward_tokens": f["forward_tokens"],
                    "history_writes": f["history_writes"],
                    "write_tokens": f["write_tokens"],
                }
            a, b = entry[f"{key}={str(on).lower()}"], entry[f"{key}={str(off).lower()}"]
            entry["speedup"] = round(b["wall_s"] / a["wall_s"], 3)
            entry["forward_token_ratio"] = round(b["forward_tokens"] / a["forward_tokens"], 3)
            entry["identical_predictions"] = predictions(outs[on], f"TSW/{cond}") == predictions(
                outs[off], f"TSW/{cond}"
            )
            comparisons[label] = entry
            print(json.dumps({label: entry}, indent=2), flush=True)
        record.update(comparisons)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return _write(record, args.out, t_start)


def _write(record: dict[str, Any], out_file: str, t_start: float) -> int:
    record["machine"]["load_average_end"] = load_average()
    record["total_s"] = round(time.perf_counter() - t_start, 1)
    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out} ({record['total_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
