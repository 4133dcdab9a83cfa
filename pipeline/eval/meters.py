"""Cost meters of a shard's computation: decoder tokens (a forward pre-hook) and peak memory."""

from __future__ import annotations

import resource
from typing import Any


class TokenCounter:
    """Counts the tokens of every decoder forward pass (a pre-hook on the decoder module)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.positions = 0  # input positions fed (padding included)
        self.tokens = 0  # real tokens (attention mask = 1)
        self.calls = 0

    def hook(self, module: Any, args: tuple, kwargs: dict) -> None:
        x = kwargs.get("input_ids")
        if x is None and args:
            x = args[0]
        if x is None:
            x = kwargs.get("inputs_embeds")
        if x is None:
            return
        b, t = int(x.shape[0]), int(x.shape[1])
        self.calls += 1
        self.positions += b * t
        mask = kwargs.get("attention_mask")
        if mask is not None and getattr(mask, "dim", lambda: 0)() == 2:
            self.tokens += int(mask[:, -t:].sum())
        else:
            self.tokens += b * t


class PeakMemory:
    """Peak memory of a block: CUDA peak allocation, else the peak RSS (VmHWM reset through
    ``/proc/self/clear_refs``; where that is impossible, the process's lifetime ``ru_maxrss``)."""

    def __init__(self, device: Any) -> None:
        self.device = device
        self.scope = "block"
        self.peak = 0

    def __enter__(self) -> PeakMemory:
        import torch

        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.scope = "process"
        return self

    def __exit__(self, *exc: Any) -> None:
        import torch

        if self.device.type == "cuda":
            self.peak = int(torch.cuda.max_memory_allocated(self.device))
            return
        if self.scope == "block":
            try:
                with open("/proc/self/status") as f:
                    for line in f:
                        if line.startswith("VmHWM:"):
                            self.peak = int(line.split()[1]) * 1024
                            return
            except OSError:
                pass
            self.scope = "process"
        self.peak = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
