"""What δ-mem costs on top of the frozen backbone, and what the chunked scan buys over the per-token loop.

    .venv/bin/python bench/core_overhead.py                 # CPU defaults, writes bench/results/core_overhead_<device>.json
    .venv/bin/python bench/core_overhead.py --quick         # smaller sweep
    .venv/bin/python bench/core_overhead.py --ops-only      # op counts only (updates decode_ops in the file)

Measures (median of --repeats runs, after one warm-up):
* scan: naive vs chunk forward for one layer's state (B = 1, H = 1, r = 8) at T = 512 … 8192;
* prefill: backbone forward vs attached forward (δ-mem TSW writing, the paper's protocol; and read-only
  from a written state) on the embedded backbone (SmolLM2-135M, 30 layers) at T = 256 … 4096;
* decode: one token with a KV cache after a 512-token prompt (attention mask of ones, as ``generate``
  passes it), backbone vs attached (read-only and writing); the three take turns token by token and the
  medians are reported;
* ``--layer``: one attached layer's call alone (``DeltaMemLayer.forward`` under ``no_grad``, writing and
  read-only, random hidden states, interleaved medians) at the prefill lengths: less load-sensitive than the
  whole prefill, and ×layers it is the memory's own cost (the two correction adds and cache effects aside);
* op counts (``torch.profiler``, load-independent): aten ops of one decode token, backbone vs attached,
  as extra ops per attached layer (after one untimed token per variant). ``top`` counts the ops the
  Python code dispatches (an op called inside another aten op is not counted again), ``all`` every aten
  event, nested ones included: issue 16's ≤ 40 per layer target counts ``all`` (its backbone figure,
  5,863 per token, is an every-event count). ``--ops-detail`` lists the extra events by (op, parent).

The machine's load average is recorded before and after (timings on a shared machine drift; op counts
do not).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

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
def bench_layer(model, lengths: list[int], repeats: int) -> list[dict]:
    """One attached layer's writing and read-only call at each T (ms, interleaved medians of 4·repeats)."""
    layers = model.delta_mem.layers
    layer = layers[next(iter(layers))]
    d, H, r = model.config.hidden_size, layer.num_substates, layer.rank
    rows = []
    for T in lengths:
        g = torch.Generator().manual_seed(T)
        x = torch.randn(1, T, d, generator=g)
        state = torch.randn(1, H, r, r, generator=g) * 0.1
        t = interleaved(
            {"write": lambda x=x, s=state: layer(x, s, write=True), "read": lambda x=x, s=state: layer(x, s)},
            4 * repeats,
        )
        row = {"T": T, "write_ms": t["write"] * 1e3, "read_ms": t["read"] * 1e3, "layers": len(layers)}
        rows.append(row)
        print(
            f"layer call T={T:5d}  writing {row['write_ms']:6.2f} ms  read-only {row['read_ms']:6.2f} ms  "
            f"(×{len(layers)} layers: {row['write_ms'] * len(layers):6.1f} / {row['read_ms'] * len(layers):6.1f} ms)",
            flush=True,
        )
    return rows


@torch.no_grad()
def bench_model(
    lengths: list[int],
    repeats: int,
    decode_steps: int,
    detail: bool = False,
    timings: bool = True,
    layer: bool = False,
) -> tuple[list[dict], dict, dict, dict]:
    from deltamem.backbones import load_embedded

    model, _ = load_embedded()
    info = {"backbone": "SmolLM2-135M-Instruct (embedded)", "layers": model.config.num_hidden_layers}
    g = torch.Generator().manual_seed(0)
    attach_delta_mem(model, DeltaMemConfig())  # paper defaults: TSW, r = 8, Q/O, base_slice_fixed
    if not timings:
        _, ops = bench_decode(model, decode_steps, g, detail=detail, timings=False)
        return [], {}, ops, info
    if layer:
        info["layer_call"] = bench_layer(model, lengths, repeats)
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
    per_token, ops = bench_decode(model, decode_steps, g, detail=detail)
    return rows, per_token, ops, info


def aten_events(fn) -> list:
    """The aten profiler events of one call of ``fn``."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return [e for e in prof.events() if e.name.startswith("aten::")]


def count_ops(fn) -> tuple[int, int]:
    """(top-level aten ops, all aten events) of one call of ``fn``."""
    events = aten_events(fn)
    top = [e for e in events if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
    return len(top), len(events)


def op_detail(fn) -> Counter:
    """(op, aten parent or "-") → count, over every aten event of one call of ``fn``."""
    rows: Counter = Counter()
    for e in aten_events(fn):
        parent = e.cpu_parent.name if e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::") else "-"
        rows[(e.name, parent)] += 1
    return rows


def decode_steps(model, prompt: torch.Tensor, state) -> dict:
    """One-token decode closures after ``prompt`` (each with its own KV cache): backbone, δ-mem
    read-only, δ-mem writing (into a copy of ``state``). Each call decodes the next token."""
    from transformers import DynamicCache

    decoder = model.delta_mem.decoder
    kw = cache_kwarg(decoder)
    prompt_len = prompt.shape[1]

    def setup(memory, write):
        cache = DynamicCache(config=model.config)
        decoder(input_ids=prompt, use_cache=True, **{kw: cache})
        tok = prompt[:, -1:]
        n = [prompt_len]

        def step():
            n[0] += 1
            mask = torch.ones(prompt.shape[0], n[0], dtype=torch.long)  # what generate() passes
            if memory is None:
                decoder(input_ids=tok, attention_mask=mask, use_cache=True, **{kw: cache})
            else:
                with model.delta_mem.use(memory, write=write):
                    decoder(input_ids=tok, attention_mask=mask, use_cache=True, **{kw: cache})

        return step

    return {
        "backbone": setup(None, False),
        "deltamem_read": setup(state, False),
        "deltamem_write": setup(state.clone(), True),
    }


@torch.no_grad()
def decode_op_counts(model, prompt: torch.Tensor, state, detail: bool = False) -> dict:
    """Aten ops of one decode token (after one untimed token per variant), backbone vs attached, and the
    extra ops per attached layer; the target of issue 16 counts ``all`` events (nested included).
    ``detail`` prints the per-layer difference by (op, parent)."""
    steps = decode_steps(model, prompt, state)
    for step in steps.values():
        step()  # first-call effects (caches of packed weights, the mask) are not per-token costs
    layers = len(model.delta_mem.layers)
    ops = {name: count_ops(step) for name, step in steps.items()}
    rows = {"backbone_top": ops["backbone"][0], "backbone_all": ops["backbone"][1], "attached_layers": layers}
    for name in ("deltamem_read", "deltamem_write"):
        rows[f"{name}_top"], rows[f"{name}_all"] = ops[name]
        rows[f"{name}_extra_top_per_layer"] = (ops[name][0] - ops["backbone"][0]) / layers
        rows[f"{name}_extra_all_per_layer"] = (ops[name][1] - ops["backbone"][1]) / layers
    if detail:
        base = op_detail(steps["backbone"])
        for name in ("deltamem_read", "deltamem_write"):
            got = op_detail(steps[name])
            print(f"{name}: extra aten events per layer, by (op, parent)")
            diff = {k: (got[k] - base[k]) / layers for k in set(got) | set(base) if got[k] != base[k]}
            for (op, parent), v in sorted(diff.items(), key=lambda kv: (-kv[1], kv[0])):
                print(f"  {v:6.2f}  {op:32s} <- {parent}")
    return rows


@torch.no_grad()
def bench_decode(
    model, decode_steps_n: int, g: torch.Generator, prompt_len: int = 512, detail: bool = False, timings: bool = True
) -> tuple[dict, dict]:
    """Decode one token at a time after a ``prompt_len`` prompt: backbone, δ-mem read-only, δ-mem writing."""
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=g)
    state = model.write_memory(prompt)
    op_rows = decode_op_counts(model, prompt, state, detail)
    print(f"decode ops: {json.dumps(op_rows)}", flush=True)
    if not timings:
        return {}, op_rows
    steps = decode_steps(model, prompt, state)
    t = interleaved(steps, decode_steps_n)
    per_token = {f"{k}_s": v for k, v in t.items()}
    per_token["read_ratio"] = t["deltamem_read"] / t["backbone"]
    per_token["write_ratio"] = t["deltamem_write"] / t["backbone"]
    print(f"decode per token (median): {json.dumps({k: round(v, 5) for k, v in per_token.items()})}", flush=True)
    return per_token, op_rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sweep (T ≤ 2048)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--decode-steps", type=int, default=64, help="decode tokens per variant (interleaved)")
    ap.add_argument("--lengths", default=None, help="prefill lengths, comma-separated (overrides the sweep)")
    ap.add_argument("--no-scan", action="store_true", help="skip the naive-vs-chunk scan sweep")
    ap.add_argument(
        "--ops-only",
        action="store_true",
        help="op counts only (no timings): updates decode_ops in the result file, keeping its other fields",
    )
    ap.add_argument("--layer", action="store_true", help="also time one attached layer's call alone (see above)")
    ap.add_argument("--ops-detail", action="store_true", help="print the extra aten events per layer by (op, parent)")
    ap.add_argument("--out", default=None, help="result file (default bench/results/core_overhead_<device>.json)")
    args = ap.parse_args()
    torch.manual_seed(0)
    scan_T = [512, 1024, 2048] if args.quick else [512, 1024, 2048, 4096, 8192]
    model_T = [256, 512, 1024, 2048] if args.quick else [256, 512, 1024, 2048, 4096]
    if args.lengths:
        model_T = [int(t) for t in args.lengths.split(",")]
    device = "cpu"
    out = Path(args.out or Path(__file__).parent / "results" / f"core_overhead_{device}.json")
    if args.ops_only:
        result = json.loads(out.read_text()) if out.exists() else {"benchmark": "core_overhead", "device": device}
        _, _, ops, _ = bench_model([], 0, 0, detail=args.ops_detail, timings=False)
        ops["torch"] = torch.__version__
        ops["date"] = time.strftime("%Y-%m-%d %H:%M:%S")
        result["decode_ops"] = ops
    else:
        result = {
            "benchmark": "core_overhead",
            "device": device,
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "loadavg_before": os.getloadavg(),
            "scan": [] if args.no_scan else bench_scan(scan_T, args.repeats),
        }
        result["prefill"], result["decode"], result["decode_ops"], result["model"] = bench_model(
            model_T, args.repeats, args.decode_steps, detail=args.ops_detail, layer=args.layer
        )
        result["loadavg_after"] = os.getloadavg()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
