"""Delta-rule scan kernels: naive vs chunk vs fused (Triton), forward and forward+backward, plus decode.

    .venv/bin/python bench/kernels.py            # CUDA if present, else CPU; writes bench/results/kernels_<cpu|cuda>.json
    .venv/bin/python bench/kernels.py --cpu      # force the CPU sweep (chunk vs naive only)
    .venv/bin/python bench/kernels.py --aot      # also compile the Triton kernels for sm_90 (no GPU needed):
                                                 # registers, spills, shared memory, pipelined loads

One "layer" is one scan call with the paper's defaults (r = 8, H = 1 sub-state, fp32, coupled gates
keep = 1 − β, erase = write = β); "×36" is that time 36 times over (Qwen3-4B has 36 decoder layers), which
is what the δ-mem scan adds to one prefill if nothing overlaps.

CUDA sweep: B ∈ {1, 8}, T ∈ {1k, 8k, 32k} for chunk and fused (naive up to --naive-max-t, default 8k:
its per-token Python loop is ~10^5 launches at 32k). Reported per run: milliseconds per layer and ×36,
the bytes a scan must move at least (inputs, reads, gradients, states) divided by the time, and that as a
fraction of the card's peak DRAM bandwidth. The decode step (one token) is timed for naive vs fused.
CPU sweep: chunk at T ∈ {1k, 4k, 8k}, naive forward up to 4k and forward+backward at 1k, B ∈ {1, 8}.
CPU timings share the machine with whatever else runs: they use one intra-op thread by default (--threads)
and the load average is recorded next to them.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deltamem.ops.delta_rule import delta_rule_chunk, delta_rule_naive, delta_rule_step

LAYERS = 36  # Qwen3-4B
RESULTS = Path(__file__).resolve().parent / "results"
# peak DRAM bandwidth (bytes/s) by device-name fragment, most specific first
PEAK_BW = [("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12), ("A100-SXM4-80GB", 2.04e12), ("A100", 1.56e12)]


def peak_bandwidth(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for frag, bw in PEAK_BW:
        if frag in name:
            return bw
    props = torch.cuda.get_device_properties(device)
    clock, bus = getattr(props, "memory_clock_rate", None), getattr(props, "memory_bus_width", None)
    return 2 * clock * 1e3 * bus / 8 if clock and bus else None  # DDR: two transfers per clock (kHz)


def inputs(B: int, T: int, H: int, r: int, device: torch.device, grad: bool) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(T + B)
    q, k = (F.normalize(torch.tanh(torch.randn(B, T, H, r, generator=g)), dim=-1) for _ in range(2))
    v = torch.randn(B, T, H, r, generator=g)
    beta = torch.sigmoid(torch.randn(B, T, H, r, generator=g) - 1.5)
    xs = [x.to(device) for x in (q, k, v, 1 - beta, beta, beta)]
    return [x.requires_grad_() for x in xs] if grad else xs


def timer(device: torch.device, fn: Callable[[], object], budget_s: float, max_reps: int = 20) -> float:
    """Median seconds per call: one warm-up (compiles), then ≥ 3 repeats until ``budget_s`` or ``max_reps``."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < 3 or time.perf_counter() - start < budget_s):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        if len(times) == 1 and times[0] > 4 * budget_s:
            break  # one slow run is enough (keeps the CPU sweep under ~2 minutes)
    return statistics.median(times)


def scan_fns(backend: str, chunk_size: int) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    if backend == "naive":
        return delta_rule_naive
    if backend == "chunk":
        return lambda *x: delta_rule_chunk(*x, chunk_size=chunk_size)
    from deltamem.ops.delta_rule.fused import delta_rule_fused

    return delta_rule_fused


def min_bytes(B: int, T: int, H: int, r: int, with_bwd: bool, elem: int = 4) -> int:
    """Bytes a scan has to move at least: 6 inputs in, reads out, the state in and out (and for the
    backward: the 6 inputs and d_reads in again, 6 gradients out, the state gradient)."""
    tok = B * T * H * r * elem
    state = B * H * r * r * elem
    fwd = 7 * tok + 2 * state
    return fwd + (13 * tok + 2 * state if with_bwd else 0)


def bench_scans(device: torch.device, args: argparse.Namespace) -> list[dict]:
    cuda = device.type == "cuda"
    lengths = [1024, 8192, 32768] if cuda else [1024, 4096, 8192]
    naive_max = args.naive_max_t if cuda else 4096
    naive_bwd_max = naive_max if cuda else 1024  # autograd through the CPU loop: seconds per 1k tokens
    backends = ["naive", "chunk", "fused"] if cuda else ["naive", "chunk"]
    peak = peak_bandwidth(device)
    rows = []
    for B in (1, 8):
        for T in lengths:
            for backend in backends:
                if backend == "naive" and naive_max < T:
                    continue
                fn = scan_fns(backend, args.chunk_size)
                init = torch.zeros(B, args.heads, args.rank, args.rank, device=device)
                for mode in ("fwd", "fwd+bwd"):
                    grad = mode == "fwd+bwd"
                    if backend == "naive" and grad and naive_bwd_max < T:
                        continue
                    xs = inputs(B, T, args.heads, args.rank, device, grad)

                    def run(xs=xs, grad=grad, fn=fn, init=init) -> None:
                        if not grad:
                            with torch.no_grad():
                                fn(*xs, init)
                            return
                        reads, final = fn(*xs, init)
                        torch.autograd.backward((reads, final), (torch.ones_like(reads), torch.ones_like(final)))

                    sec = timer(device, run, args.budget)
                    nbytes = min_bytes(B, T, args.heads, args.rank, grad)
                    row = {
                        "backend": backend,
                        "pass": mode,
                        "B": B,
                        "T": T,
                        "H": args.heads,
                        "r": args.rank,
                        "ms_per_layer": sec * 1e3,
                        f"ms_x{LAYERS}": sec * 1e3 * LAYERS,
                        "min_bytes": nbytes,
                        "GBps": nbytes / sec / 1e9,
                    }
                    if peak:
                        row["bw_fraction"] = nbytes / sec / peak
                    rows.append(row)
                    frac = f"  {row['bw_fraction'] * 100:5.2f}% of peak BW" if peak else ""
                    print(
                        f"{backend:5s} {mode:7s} B={B} T={T:5d}  {sec * 1e3:9.3f} ms/layer  "
                        f"{sec * 1e3 * LAYERS:9.1f} ms ×{LAYERS}  {row['GBps']:7.2f} GB/s{frac}",
                        flush=True,
                    )
    return rows


def bench_decode(device: torch.device, args: argparse.Namespace) -> list[dict]:
    steps: dict[str, Callable] = {"naive": delta_rule_step}
    if device.type == "cuda":
        from deltamem.ops.delta_rule.fused import delta_rule_step_fused

        steps["fused"] = delta_rule_step_fused
    rows = []
    for B in (1, 8):
        xs = [x[:, 0] for x in inputs(B, 1, args.heads, args.rank, device, grad=False)]
        state = torch.zeros(B, args.heads, args.rank, args.rank, device=device)
        for name, step in steps.items():
            with torch.no_grad():
                sec = timer(device, lambda step=step, xs=xs, state=state: step(state, *xs), 0.2, max_reps=200)
            rows.append({"backend": name, "B": B, "us_per_token_layer": sec * 1e6, f"us_x{LAYERS}": sec * 1e6 * LAYERS})
            print(
                f"decode {name:5s} B={B}  {sec * 1e6:8.1f} µs/layer  {sec * 1e6 * LAYERS:8.1f} µs ×{LAYERS}", flush=True
            )
    return rows


def aot_report(ranks: list[int]) -> list[dict]:
    """Compile every kernel for sm_90 in a clean interpreter-free process and read ptxas' resource usage."""
    code = f"""
import json, re, subprocess, tempfile, os
from deltamem.ops.delta_rule.fused import compile_kernels
from triton.backends.nvidia.compiler import get_ptxas
out = []
for r in {ranks!r}:
    for name, k in compile_kernels(r, arch=90).items():
        d = tempfile.mkdtemp()
        open(os.path.join(d, "k.ptx"), "w").write(k.asm["ptx"])
        p = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name=sm_90a", os.path.join(d, "k.ptx"),
                            "-o", os.path.join(d, "k.o")], capture_output=True, text=True)
        regs = re.search(r"Used (\\d+) registers", p.stderr)
        spill = re.search(r"(\\d+) bytes spill stores", p.stderr)
        out.append(dict(r=r, kernel=name, num_warps=k.metadata.num_warps, shared_bytes=k.metadata.shared,
                        registers=int(regs.group(1)) if regs else None,
                        spill_store_bytes=int(spill.group(1)) if spill else None,
                        pipelined_loads=k.asm["ttgir"].count("async_copy_global_to_local")))
print(json.dumps(out))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    for row in rows:
        print(
            f"sm_90 r={row['r']:2d} {row['kernel']:8s} warps={row['num_warps']} regs={row['registers']} "
            f"spill={row['spill_store_bytes']}B smem={row['shared_bytes']}B pipelined_loads={row['pipelined_loads']}"
        )
    return rows


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def targets(scan: list[dict], decode: list[dict], args: argparse.Namespace) -> dict[str, object]:
    """The GPU acceptance numbers that this bench can give (the backbone times come from --prefill-ms/--decode-ms)."""
    best = "fused" if any(r["backend"] == "fused" for r in scan) else "chunk"
    ms = {(r["backend"], r["pass"], r["B"], r["T"]): r["ms_per_layer"] for r in scan}
    ratio = {
        f"B={B},T={T}": ms[(best, "fwd+bwd", B, T)] / ms[(best, "fwd", B, T)]
        for (backend, mode, B, T) in ms
        if backend == best and mode == "fwd" and (best, "fwd+bwd", B, T) in ms
    }
    out: dict[str, object] = {"backend": best, "fwd_bwd_over_fwd (target <= 3)": ratio}
    if args.prefill_ms and (best, "fwd", 1, 8192) in ms:
        out["prefill_8k_overhead (target <= 0.03)"] = ms[(best, "fwd", 1, 8192)] * LAYERS / args.prefill_ms
    dec = {r["backend"]: r["us_per_token_layer"] for r in decode if r["B"] == 1}
    step = "fused" if "fused" in dec else "naive"
    if args.decode_ms and step in dec:
        out[f"decode_overhead_{step} (target <= 0.05)"] = dec[step] * LAYERS / 1e3 / args.decode_ms
    for key, value in out.items():
        print(f"target {key}: {value}")
    return out


def version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)  # no import: triton stays out of the CPU process
    except importlib.metadata.PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="run the CPU sweep even if CUDA is present")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--heads", type=int, default=1, help="sub-states H (MSW uses 4)")
    parser.add_argument("--chunk-size", type=int, default=16, help="chunk backend's chunk (fused picks ≈√T)")
    parser.add_argument("--naive-max-t", type=int, default=8192, help="longest T for naive on CUDA")
    parser.add_argument("--budget", type=float, default=0.5, help="seconds of repeats per measurement")
    parser.add_argument(
        "--threads", type=int, default=1, help="CPU intra-op threads (0: torch's default); 1 is stable on a shared box"
    )
    parser.add_argument("--aot", action="store_true", help="also compile the Triton kernels for sm_90")
    parser.add_argument("--prefill-ms", type=float, default=None, help="measured Qwen3-4B prefill at B=1, T=8k")
    parser.add_argument("--decode-ms", type=float, default=None, help="measured Qwen3-4B decode ms per token, B=1")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    if args.threads > 0:
        torch.set_num_threads(args.threads)  # oversubscribed OpenMP threads made CPU timings swing 30×
    torch.set_grad_enabled(True)
    t0 = time.perf_counter()
    result: dict[str, object] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "device_type": device.type,
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": version("triton"),
        "python": platform.python_version(),
        "peak_bandwidth_Bps": peak_bandwidth(device),
        "load_average_1min_at_start": os.getloadavg()[0],
        "layers": LAYERS,
        "chunk_backend_chunk_size": args.chunk_size,
        "scan": bench_scans(device, args),
        "decode": bench_decode(device, args),
    }
    result["targets"] = targets(result["scan"], result["decode"], args)  # type: ignore[arg-type]
    result["load_average_1min_at_end"] = os.getloadavg()[0]
    if args.aot:
        result["sm90_compile"] = aot_report([args.rank])
    result["bench_seconds"] = time.perf_counter() - t0
    out = args.out or RESULTS / f"kernels_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out} in {result['bench_seconds']:.0f} s")


if __name__ == "__main__":
    main()
