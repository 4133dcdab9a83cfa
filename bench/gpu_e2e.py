"""End-to-end δ-mem cost on a GPU: a random-weight Qwen3-4B, attached vs backbone, fused vs chunk kernels.

    python bench/gpu_e2e.py                          # CUDA: Qwen3-4B shapes, bf16, writes bench/results/gpu_e2e_cuda.json
    python bench/gpu_e2e.py --tiny --device cpu      # a 2-layer smoke run of the same code on CPU

No download: the model is built from a Qwen3-4B configuration (36 layers, hidden 2560, 32 query / 8 KV
heads of 128, MLP 9728, vocabulary 151,936) with random weights, which is all that timing needs. δ-mem is
the paper's default (TSW, r = 8, Q/O branches) on every layer, fp32 memory on the bf16 backbone.

Measured (CUDA events, median of ``--repeats`` interleaved runs after a warm-up):

* prefill with writing: the backbone's forward over ``--prefill`` tokens (8192) vs ``write_memory`` of the
  same tokens (the paper's write protocol), per scan backend (``fused``: Triton kernels; ``chunk``: the
  PyTorch chunked form);
* decode: tokens/s of one-token steps with a KV cache after a ``--prompt`` prefix, through the full model
  (LM head included) as ``generate`` runs it: backbone, δ-mem read-only, δ-mem writing every token, per
  backend (``fused``: one Triton launch per layer and token; ``chunk``: the lean PyTorch step). The
  variants take turns token by token;
* ``--kernels``: CUDA kernels launched per decode token (profiler), backbone vs attached;
* ``--compile``: the same decode with ``torch.compile`` on the decoder (``--compile-mode``, e.g.
  ``reduce-overhead`` for CUDA graphs) and the state updated in place (``use(..., inplace=True)``).

Every figure lands in the JSON file with the device, versions and the host's load average.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from deltamem import DeltaMemConfig, attach_delta_mem
from deltamem.attach import cache_kwarg

QWEN3_4B = dict(
    vocab_size=151936,
    hidden_size=2560,
    intermediate_size=9728,
    num_hidden_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=40960,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)
TINY = {**QWEN3_4B, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}
TINY.update(num_attention_heads=4, num_key_value_heads=2, head_dim=16)


def build(tiny: bool, device: torch.device, dtype: torch.dtype):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(**(TINY if tiny else QWEN3_4B), attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3ForCausalLM(cfg)
    return model.to(dtype).eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, device: torch.device) -> dict[str, float]:
    for fn in fns.values():
        fn()
    sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn, device))
    return {k: statistics.median(v) for k, v in times.items()}


def set_backend(model, backend: str) -> None:
    """Switch the scan backend of an attached model (the config is frozen: replace it everywhere)."""
    ctl = model.delta_mem
    if ctl.config.scan_backend == backend:
        return
    # one config object per backend, reused: a compiled graph guards on it (a new object would recompile)
    cache = ctl.__dict__.setdefault("_bench_configs", {})
    cfg = cache.setdefault(backend, dataclasses.replace(ctl.config, scan_backend=backend))
    ctl.config = cfg
    for layer in ctl.layers.values():
        layer.config = cfg


@torch.no_grad()
def bench_prefill(model, T: int, backends: list[str], repeats: int, device: torch.device) -> dict:
    decoder = model.delta_mem.decoder
    x = torch.randint(0, model.config.vocab_size, (1, T), device=device)
    fns: dict[str, Callable[[], object]] = {"backbone": lambda: decoder(input_ids=x, use_cache=False)}
    for b in backends:

        def write(b=b):
            set_backend(model, b)
            model.write_memory(x)

        fns[f"write_{b}"] = write
    t = interleaved(fns, repeats, device)
    out = {"T": T, **{f"{k}_s": v for k, v in t.items()}}
    for b in backends:
        out[f"write_{b}_ratio"] = t[f"write_{b}"] / t["backbone"]
    print(f"prefill T={T}: {json.dumps({k: round(v, 4) for k, v in out.items()})}", flush=True)
    return out


def decode_steps(model, prompt: torch.Tensor, variant: dict, compiled=None, max_len: int = 0):
    """A closure running one decode token of ``variant`` on its own KV cache (and state).

    Eager: a DynamicCache and the growing all-ones attention mask ``generate`` passes. Compiled: a
    StaticCache of ``max_len`` and explicit cache positions, so every step has the same shapes."""
    from transformers import DynamicCache, StaticCache

    ctl = model.delta_mem
    kw = cache_kwarg(ctl.decoder)
    cache = (
        StaticCache(config=model.config, max_cache_len=max_len)
        if compiled is not None
        else DynamicCache(config=model.config)
    )
    state = None if variant["memory"] is None else variant["memory"].clone()
    device = prompt.device
    n = [prompt.shape[1]]

    def run(ids: torch.Tensor) -> None:
        if compiled is None:
            mask = torch.ones(1, n[0], dtype=torch.long, device=device)
            h = ctl.decoder(input_ids=ids, attention_mask=mask, use_cache=True, **{kw: cache}).last_hidden_state
        else:
            pos = torch.arange(n[0] - ids.shape[1], n[0], device=device)
            fn = ctl.decoder if ids.shape[1] > 1 else compiled  # the prompt eagerly, the steps compiled
            h = fn(input_ids=ids, cache_position=pos, position_ids=pos[None], use_cache=True, **{kw: cache})
            h = h.last_hidden_state
        model.lm_head(h[:, -1:])

    def call(ids: torch.Tensor) -> None:
        if state is None:
            run(ids)
            return
        set_backend(model, variant["backend"])
        with ctl.use(state, write=variant["write"], inplace=variant.get("inplace", False)):
            run(ids)

    with torch.no_grad():
        call(prompt)
    tok = prompt[:, -1:]

    def step() -> None:
        n[0] += 1
        with torch.no_grad():
            call(tok)

    return step


def bench_decode(
    model,
    prompt_len: int,
    steps: int,
    backends: list[str],
    device: torch.device,
    compile_mode: str | None = None,
    compile_backend: str = "inductor",
):
    g = torch.Generator(device="cpu").manual_seed(1)
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=g).to(device)
    with torch.no_grad():
        written = model.write_memory(prompt)
    variants = {"backbone": {"memory": None}}
    for b in backends:
        variants[f"read_{b}"] = {"memory": written, "write": False, "backend": b}
        variants[f"write_{b}"] = {"memory": written, "write": True, "backend": b}
    compiled = None
    if compile_mode:
        for v in variants.values():
            v["inplace"] = True  # fixed state addresses (CUDA graphs)
        mode = None if compile_mode == "default" else compile_mode
        compiled = torch.compile(model.delta_mem.decoder, mode=mode, backend=compile_backend)
    max_len = prompt_len + 2 * steps + 8
    fns = {name: decode_steps(model, prompt, v, compiled, max_len) for name, v in variants.items()}
    t = interleaved(fns, steps, device)
    out = {"prompt": prompt_len, "steps": steps, "compile": compile_mode}
    for k, v in t.items():
        out[f"{k}_tok_s"] = 1.0 / v
        out[f"{k}_s"] = v
        if k != "backbone":
            out[f"{k}_ratio"] = v / t["backbone"]
    print(f"decode: {json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()})}")
    return out, variants, prompt


def count_kernels(model, prompt: torch.Tensor, variants: dict, device: torch.device) -> dict:
    """CUDA kernels (CPU ops off CUDA) launched by one decode token, per variant."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU]
    out = {}
    for name, v in variants.items():
        step = decode_steps(model, prompt, v)
        step()
        sync(device)
        with profile(activities=acts) as prof:
            step()
            sync(device)
        if device.type == "cuda":
            n = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
        else:
            n = sum(1 for e in prof.events() if e.name.startswith("aten::"))
        out[name] = n
    layers = len(model.delta_mem.layers)
    for name in variants:
        if name != "backbone":
            out[f"{name}_extra_per_layer"] = (out[name] - out["backbone"]) / layers
    print(f"kernels per decode token: {json.dumps(out)}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model of the same family (smoke test)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--prefill", type=int, default=8192, help="prefill length with writing")
    ap.add_argument("--prompt", type=int, default=1024, help="prompt length before decoding")
    ap.add_argument("--decode-steps", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--backends", default=None, help="comma-separated; default fused,chunk on CUDA, chunk on CPU")
    ap.add_argument("--kernels", action="store_true", help="count kernels per decode token (profiler)")
    ap.add_argument("--compile", action="store_true", help="also decode through torch.compile")
    ap.add_argument("--compile-mode", default="reduce-overhead", help="torch.compile mode (default: CUDA graphs)")
    ap.add_argument(
        "--compile-backend", default="inductor", help="torch.compile backend (aot_eager: a quick CPU check)"
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench/gpu_e2e.py: --device cuda but no CUDA device is visible (use --device cpu --tiny)")
    backends = (
        args.backends.split(",") if args.backends else (["fused", "chunk"] if device.type == "cuda" else ["chunk"])
    )
    model = build(args.tiny, device, getattr(torch, args.dtype))
    attach_delta_mem(model, DeltaMemConfig())
    result = {
        "benchmark": "gpu_e2e",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "model": "Qwen3-4B config, random weights" if not args.tiny else "tiny Qwen3 (smoke)",
        "dtype": args.dtype,
        "deltamem": model.delta_mem.config.to_dict(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "loadavg_before": os.getloadavg(),
    }
    result["prefill"] = bench_prefill(model, args.prefill, backends, args.repeats, device)
    result["decode"], variants, prompt = bench_decode(model, args.prompt, args.decode_steps, backends, device)
    if args.kernels:
        result["kernels_per_token"] = count_kernels(model, prompt, variants, device)
    if args.compile:
        result["decode_compiled"] = bench_decode(
            model, args.prompt, args.decode_steps, backends, device, args.compile_mode, args.compile_backend
        )[0]
    result["loadavg_after"] = os.getloadavg()
    out = Path(
        args.out or Path(__file__).parent / "results" / f"gpu_e2e_{device.type}{'_tiny' if args.tiny else ''}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
