"""δ-mem SFT throughput and memory on CPU, with the embedded training config.

    .venv/bin/python bench/train_throughput.py            # writes bench/results/train_throughput_cpu.json
    .venv/bin/python bench/train_throughput.py --batch-sizes 1 4 --repeats 2 --budget-s 600
    .venv/bin/python bench/train_throughput.py --ray-workers 1 2   # writes train_throughput_ray_cpu.json

The real embedded backbone (SmolLM2-135M-Instruct, fp32, ``deltamem.backbones.load_backbone("embedded")``),
synthetic episodes from the generator settings of params.yaml's ``prepare`` block, packed by
``pipeline.data.tokenize.Packer`` with write_length 1024 and read_length 128, δ-mem as in ``train.deltamem``
(TSW, r = 8, α = 16, branches q/o). For each batch size (1, 4, 8 episodes):

* ``train``: one optimizer step of the trainer (:func:`pipeline.train.trainer.episode_forward` with gradient
  through the frozen backbone, backward, clipping, AdamW on the δ-mem parameters);
* ``forward``: the frozen backbone alone on the same tokens, under ``torch.inference_mode()`` (the decoder over
  the context, as ``write_memory`` runs it, then the full model over question + answer; δ-mem is attached but
  without a memory state its hooks do nothing: the attached model *is* the backbone).

Tokens = context + read tokens (padding excluded). Memory: before each measured call freed heap memory is
handed back to the OS (``malloc_trim``) and the RSS is read; a thread samples the RSS every millisecond during
the call; ``peak_over_start_mb`` is the sampled peak minus that start (the call's activations, autograd graph
and temporaries; the weights are already resident). tracemalloc is not used: it does not see torch's tensor
allocations. The run stays within ``--budget-s`` (default 230 s, model loading included): a batch size whose
projected time would not fit is skipped and listed. Another job may share the machine: the load average is
recorded with the results, and by default torch uses only the cores that it leaves idle (``--threads 0``:
OpenMP threads competing with other busy processes slow every op down by an order of magnitude).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# params.yaml: prepare.datasets[synthetic].synthetic (the embedded default) and the train section
SYNTHETIC = {
    "seed": 1234,
    "sessions": 3,
    "facts_per_dialogue": 4,
    "distractor_facts": 2,
    "distractor_turns": 2,
    "ack_prob": 0.5,
}
WRITE_LENGTH, READ_LENGTH = 1024, 128
DELTAMEM = {"rank": 8, "alpha": 16, "branches": ["q", "o"], "output_init": "base_slice_fixed", "write_mode": "TSW"}
LR = 3.0e-3
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20


def _trim() -> None:
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class RssPeak:
    """Peak RSS (MB) while the block runs, sampled every ``interval`` seconds by a thread."""

    def __init__(self, interval: float = 0.001) -> None:
        self.interval, self.peak, self._stop = interval, 0.0, threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb())
            time.sleep(self.interval)

    def __enter__(self) -> RssPeak:
        self.peak = rss_mb()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())


def episodes(tokenizer, n: int):
    from pipeline.data.synthetic import config_from_options, generate_split
    from pipeline.data.tokenize import Packer

    cfg = config_from_options({**SYNTHETIC, "dialogues": {"train": (n + 3) // 4}})
    packer = Packer(tokenizer, write_length=WRITE_LENGTH, read_length=READ_LENGTH, overflow="truncate")
    return [packer.pack(e) for e in generate_split(cfg, "train")][:n]


def measure(fn, batch, repeats: int) -> dict:
    times, over, peaks = [], [], []
    for _ in range(repeats):
        _trim()
        start = rss_mb()
        with RssPeak() as mem:
            t = time.perf_counter()
            fn(batch)
            times.append(time.perf_counter() - t)
        over.append(mem.peak - start)
        peaks.append(mem.peak)
    tokens = int(batch["write_mask"].sum() + batch["read_mask"].sum())
    seconds = statistics.median(times)
    return {
        "seconds": seconds,
        "all_seconds": times,
        "tokens_per_s": tokens / seconds,
        "peak_over_start_mb": max(over),
        "peak_rss_mb": max(peaks),
    }


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def ray_main(workers: list[int], steps: int, out: Path) -> int:
    """``--ray-workers``: the train stage under ``train.launcher: ray`` with 1, 2, … Ray Train CPU workers.

    The embedded default exactly as params.yaml trains it (the embedded backbone, the ``train`` section, the
    synthetic data of ``prepare``), but ``steps`` optimizer steps, no checkpoints and no validation; the
    global batch (8 episodes) is split over the workers (``batch_size = 8 / workers``). tokens/s is the
    loop's: tokens of all ranks / seconds inside the loop (model loading and Ray start-up excluded; they are
    in ``stage_seconds``). One local Ray (127.0.0.1) serves all runs.
    """
    import shutil
    import tempfile

    import yaml

    from pipeline.data.schema import write_split
    from pipeline.data.synthetic import config_from_options, generate_split
    from pipeline.params import load_section
    from pipeline.train.ray_train import _start_local_ray, run_ray
    from pipeline.train.run import TrainParams

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    synth = next(d for d in params["prepare"]["datasets"] if d["name"] == "synthetic")["synthetic"]
    load_start = list(os.getloadavg())
    work = Path(tempfile.mkdtemp(prefix="deltamem-bench-ray-"))
    rows = []
    try:
        opts = config_from_options(synth)
        write_split(generate_split(opts, "train"), work / "data" / "prepared" / "synthetic" / "train.jsonl")
        local = _start_local_ray(num_cpus=max([*workers, os.cpu_count() or 1]))
        base = load_section(ROOT / "params.yaml", "train", TrainParams)
        global_batch = base.optim.batch_size * base.optim.grad_accum
        for n in workers:
            if global_batch % n:
                raise SystemExit(f"--ray-workers {n}: does not divide the global batch {global_batch}")
            optim = base.optim.model_copy(update={"steps": steps, "batch_size": global_batch // n, "grad_accum": 1})
            optim = optim.model_copy(update={"checkpoint_every": 0})
            p = base.model_copy(
                update={
                    "backbone": "embedded",
                    "limit_validation": 0,
                    "launcher": "ray",
                    "nproc": n,
                    "optim": optim,
                    "storage_path": str(work / "storage"),
                }
            )
            (work / "params.yaml").write_text(yaml.safe_dump({"train": p.model_dump(mode="json")}))
            shutil.rmtree(work / "models", ignore_errors=True)
            la, t0 = os.getloadavg()[0], time.time()
            metrics = run_ray(p, "TSW", work, log_mlflow=False)
            row = {
                "workers": n,
                "batch_size_per_worker": global_batch // n,
                "steps": steps,
                "tokens": metrics["tokens"],
                "train_seconds": metrics["train_seconds"],
                "tokens_per_s": metrics["tokens_per_s"],
                "stage_seconds": time.time() - t0,
                "load_average_before": la,
                "load_average_after": os.getloadavg()[0],
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
        local.shutdown()  # waits for (and if needed kills) every process of that Ray
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base_rate = rows[0]["tokens_per_s"] if rows else None
    result = {
        "benchmark": "train_throughput_ray",
        "device": "cpu",
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "load_average_at_start": load_start,
        "load_average_at_end": list(os.getloadavg()),
        "config": {"train": "params.yaml (embedded default)", "steps": steps, "global_batch": rows and global_batch},
        "runs": rows,
        "speedup_vs_first": [r["tokens_per_s"] / base_rate for r in rows] if base_rate else [],
        "notes": [
            "Ray Train TorchTrainer workers, gloo, DeepSpeed ZeRO-2, one CPU (OMP thread) each",
            "the load average shows whether other jobs shared the cores; on a busy machine 2 workers cannot speed up",
        ],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out} (load average {load_start[0]:.2f} → {os.getloadavg()[0]:.2f})")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ray-workers", type=int, nargs="+", default=None, help="Ray Train mode: these worker counts")
    ap.add_argument("--ray-steps", type=int, default=4, help="Ray Train mode: optimizer steps per run")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--repeats", type=int, default=1, help="timed calls per batch size and mode (median)")
    ap.add_argument("--budget-s", type=float, default=230.0, help="skip batch sizes that would not fit")
    ap.add_argument(
        "--threads", type=int, default=0, help="torch threads; 0 = the cores left idle by other jobs (load average)"
    )
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "train_throughput_cpu.json"))
    args = ap.parse_args(argv)
    if args.ray_workers:
        out = (
            args.out
            if args.out != ap.get_default("out")
            else ROOT / "bench" / "results" / "train_throughput_ray_cpu.json"
        )
        return ray_main(args.ray_workers, args.ray_steps, Path(out))
    batch_sizes = sorted(args.batch_sizes)

    t_start = time.time()
    load_start = list(os.getloadavg())
    import torch

    from deltamem import DeltaMemConfig, attach_delta_mem
    from deltamem.backbones import load_backbone
    from pipeline.train.trainer import TrainConfig, collate_episodes, episode_forward

    cores = os.cpu_count() or 1
    # Other jobs on the cores make OpenMP threads wait for each other (each parallel op then costs a
    # scheduler slice: a 64-token forward of the embedded model took 7.3 s with 2 threads vs 0.28 s with 1
    # on a 2-core machine running two other busy processes); by default use only the idle cores.
    threads = args.threads or max(1, min(cores, cores - int(load_start[0] + 0.5)))
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, tok = load_backbone("embedded", dtype=torch.float32)
    rss_weights = rss_mb()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    eps = episodes(tok, max(batch_sizes))
    model = attach_delta_mem(model, DeltaMemConfig.from_dict(DELTAMEM))
    model.eval()
    params = model.delta_mem.parameters()
    opt = torch.optim.AdamW(params, lr=LR)
    cfg = TrainConfig()
    load_s = time.time() - t_start

    def train_step(batch):
        opt.zero_grad(set_to_none=True)
        loss, _, _ = episode_forward(model, batch, "written", cfg)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()

    def forward(batch):
        with torch.inference_mode():
            pos = (batch["write_mask"].cumsum(-1) - 1).clamp_min(0)
            model.model(
                input_ids=batch["write_ids"], attention_mask=batch["write_mask"], position_ids=pos, use_cache=False
            )
            model(input_ids=batch["read_ids"], attention_mask=batch["read_mask"], use_cache=False)

    # warm-up on a short context (one-time allocations and kernel selection), then the real batches
    t = time.perf_counter()
    warm = collate_episodes(eps[:1], pad)
    warm = {k: (v[:, :64] if k in ("write_ids", "write_mask", "segment_ids") else v) for k, v in warm.items()}
    forward(warm)
    train_step(warm)
    warmup_s = time.perf_counter() - t

    rows: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    rate: dict[str, float] = {}
    for bs in batch_sizes:
        batch = collate_episodes(eps[:bs], pad)
        write_tokens, read_tokens = int(batch["write_mask"].sum()), int(batch["read_mask"].sum())
        tokens = write_tokens + read_tokens
        if rate:
            projected = args.repeats * sum(tokens / r for r in rate.values())
            left = args.budget_s - (time.time() - t_start) - 5.0
            if projected > left:
                skipped[str(bs)] = f"projected {projected:.0f} s > {left:.0f} s left of --budget-s {args.budget_s:.0f}"
                print(f"bs={bs}: skipped ({skipped[str(bs)]})", flush=True)
                continue
        row = {
            "write_tokens": write_tokens,
            "read_tokens": read_tokens,
            "padded_shape": {"write": list(batch["write_ids"].shape), "read": list(batch["read_ids"].shape)},
            "load_average_1min": os.getloadavg()[0],
        }
        for name, fn in (("forward", forward), ("train", train_step)):
            row[name] = measure(fn, batch, args.repeats)
            rate[name] = row[name]["tokens_per_s"]
            print(
                f"bs={bs} {name:7s}: {row[name]['seconds']:6.2f} s  {row[name]['tokens_per_s']:6.0f} tok/s  "
                f"+{row[name]['peak_over_start_mb']:6.0f} MB",
                flush=True,
            )
        row["train_over_forward"] = {
            "time": row["train"]["seconds"] / row["forward"]["seconds"],
            "memory": row["train"]["peak_over_start_mb"] / max(row["forward"]["peak_over_start_mb"], 1e-9),
            "extra_memory_mb": row["train"]["peak_over_start_mb"] - row["forward"]["peak_over_start_mb"],
        }
        rows[str(bs)] = row

    result = {
        "benchmark": "train_throughput",
        "device": "cpu",
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "threads_choice": "given (--threads)" if args.threads else "auto: cores minus the 1-min load average at start",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "load_average_at_start": load_start,
        "load_average_at_end": list(os.getloadavg()),
        "wall_seconds": time.time() - t_start,
        "load_seconds": load_s,
        "warmup_seconds": warmup_s,
        "rss_after_loading_weights_mb": rss_weights,
        "config": {
            "backbone": "embedded (SmolLM2-135M-Instruct, fp32, frozen)",
            "write_length": WRITE_LENGTH,
            "read_length": READ_LENGTH,
            "deltamem": DELTAMEM,
            "trainable_parameters": sum(p.numel() for p in params),
            "synthetic": SYNTHETIC,
            "optimizer": f"AdamW lr={LR}, clip {cfg.max_grad_norm} (the trainer's step)",
            "batch_sizes": batch_sizes,
            "repeats": args.repeats,
            "budget_s": args.budget_s,
        },
        "batches": rows,
        "skipped": skipped,
        "notes": [
            "tokens = context (write) + question/answer (read) tokens, padding excluded",
            "forward = the frozen backbone alone on the same tokens under inference_mode",
            "train = the trainer's optimizer step: write with gradient, read, CE + β sparsity, backward, clip, AdamW",
            "peak_over_start_mb = sampled peak RSS during the call minus the RSS just before it (after malloc_trim)",
            "the load average shows whether other jobs shared the cores; timings scale with it",
        ],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"wrote {out} in {result['wall_seconds']:.0f} s (load average {load_start[0]:.2f} → {os.getloadavg()[0]:.2f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
