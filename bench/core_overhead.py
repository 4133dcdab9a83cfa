"""What δ-mem costs on top of the frozen backbone, and what the chunked scan buys over the per-token loop.

    .venv/bin/python bench/core_overhead.py                 # CPU defaults, writes bench/results/core_overhead_<device>.json
    .venv/bin/python bench/core_overhead.py --quick         # smaller sweep

Measures (median of --repeats runs, after one warm-up):
* scan: naive vs chunk forward for one layer's state (B = 1, H = 1, r = 8) at T = 512 … 8192;
* prefill: backbone forward vs attached forward (δ-mem TSW writing, the paper's protocol; and read-only
  from a written state) on the embedded backbone (SmolLM2-135M, 30 layers) at T = 256 … 4096;
* decode: one token with a KV cache, backbone vs attached (read-only and writing).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from deltamem import DeltaMemConfig, attach_delta_mem
from deltamem.attach import cache_kwarg
from deltamem.ops.delta_rule import delta_rule_chunk, delta_rule_naive


def interleaved(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds per function; the functions take turns so that machine drift hits all alike."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def scan_inputs(T: int, r: int = 8):
    g = torch.Generator().manual_seed(T)
    q, k = (F.normalize(torch.tanh(torch.randn(1, T, 1, r, generator=g)), dim=-1) for _ in range(2))
    v = torch.randn(1, T, 1, r, generator=g)
    beta = torch.sigmoid(torch.randn(1, T, 1, r, generator=g) - 1.5)
    return q, k, v, 1 - beta, beta, beta


def bench_scan(lengths: list[int], repeats: int) -> list[dict]:
    rows = []
    for T in lengths:
        x = scan_inputs(T)
        t = interleaved({"naive": lambda x=x: delta_rule_naive(*x), "chunk": lambda x=x: delta_rule_chunk(*x)}, repeats)
        naive, chunk = t["naive"], t["chunk"]
        rows.append({"T": T, "naive_s": naive, "chunk_s": chunk, "speedup": naive / chunk})
        print(
            f"scan T={T:5d}  naive {naive * 1e3:8.1f} ms  chunk {chunk * 1e3:7.1f} ms  ×{naive / chunk:5.1f}",
            flush=True,
        )
    return rows


@torch.no_grad()
def bench_model(lengths: list[int], repeats: int, decode_steps: int) -> tuple[list[dict], dict, dict]:
    from deltamem.backbones import load_embedded

    model, _ = load_embedded()
    info = {"backbone": "SmolLM2-135M-Instruct (embedded)", "layers": model.config.num_hidden_layers}
    g = torch.Generator().manual_seed(0)
    attach_delta_mem(model, DeltaMemConfig())  # paper defaults: TSW, r = 8, Q/O, base_slice_fixed
    decoder = model.delta_mem.decoder
    rows = []
    for T in lengths:
        x = torch.randint(0, model.config.vocab_size, (1, T), generator=g)
        state = model.write_memory(x)

        def read(x=x, state=state):
            with model.delta_mem.use(state, write=False):
                decoder(input_ids=x, use_cache=False)

        t = interleaved(
            {
                "base": lambda x=x: decoder(input_ids=x, use_cache=False),
                "write": lambda x=x: model.write_memory(x),
                "read": read,
            },
            repeats,
        )
        t_base, t_write, t_read = t["base"], t["write"], t["read"]
        rows.append(
            {
                "T": T,
                "backbone_s": t_base,
                "deltamem_write_s": t_write,
                "deltamem_read_s": t_read,
                "write_ratio": t_write / t_base,
                "read_ratio": t_read / t_base,
            }
        )
        print(
            f"prefill T={T:5d}  backbone {t_base:6.3f} s  δ-mem write {t_write:6.3f} s (×{t_write / t_base:.3f})  "
            f"read {t_read:6.3f} s (×{t_read / t_base:.3f})",
            flush=True,
        )
    # decode: one new token after a 512-token prompt, KV cache kept
    from transformers import DynamicCache

    prompt = torch.randint(0, model.config.vocab_size, (1, 512), generator=g)
    kw = cache_kwarg(decoder)
    state = model.write_memory(prompt)

    def decode(memory=None, write=False):
        cache = DynamicCache(config=model.config)
        decoder(input_ids=prompt, use_cache=True, **{kw: cache})
        tok = prompt[:, -1:]

        def step():
            if memory is None:
                decoder(input_ids=tok, use_cache=True, **{kw: cache})
            else:
                with model.delta_mem.use(memory, write=write):
                    decoder(input_ids=tok, use_cache=True, **{kw: cache})

        return step

    per_token = {}
    for name, mem, write in [
        ("backbone", None, False),
        ("deltamem_read", state, False),
        ("deltamem_write", state.clone(), True),
    ]:
        step = decode(mem, write)
        step()
        t = time.perf_counter()
        for _ in range(decode_steps):
            step()
        per_token[name + "_s"] = (time.perf_counter() - t) / decode_steps
    per_token["read_ratio"] = per_token["deltamem_read_s"] / per_token["backbone_s"]
    per_token["write_ratio"] = per_token["deltamem_write_s"] / per_token["backbone_s"]
    print(f"decode per token: {json.dumps({k: round(v, 5) for k, v in per_token.items()})}", flush=True)
    return rows, per_token, info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sweep (T ≤ 2048)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--out", default=None, help="result file (default bench/results/core_overhead_<device>.json)")
    args = ap.parse_args()
    torch.manual_seed(0)
    scan_T = [512, 1024, 2048] if args.quick else [512, 1024, 2048, 4096, 8192]
    model_T = [256, 512, 1024, 2048] if args.quick else [256, 512, 1024, 2048, 4096]
    device = "cpu"
    result = {
        "benchmark": "core_overhead",
        "device": device,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "scan": bench_scan(scan_T, args.repeats),
    }
    result["prefill"], result["decode"], result["model"] = bench_model(model_T, args.repeats, args.decode_steps)
    out = Path(args.out or Path(__file__).parent / "results" / f"core_overhead_{device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
