"""``MemoryState.load`` refuses non-finite states and upcasts low-precision ones with a warning."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from deltamem import MemoryState


def _write(path, t: torch.Tensor) -> None:
    save_file({"layers.0": t, "layers.1": torch.zeros_like(t)}, str(path))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_state_is_refused_naming_file_and_tensor(tmp_path, bad):
    t = torch.zeros(1, 2, 3, 3)
    t[0, 1, 2, 0] = bad
    _write(tmp_path / "s.safetensors", t)
    with pytest.raises(ValueError, match=r"s\.safetensors: state tensor 'layers\.0' is not finite"):
        MemoryState.load(tmp_path / "s.safetensors")


def test_an_fp16_state_is_cast_to_fp32_with_a_warning(tmp_path):
    t = torch.randn(1, 2, 3, 3).half()
    _write(tmp_path / "s.safetensors", t)
    with pytest.warns(UserWarning, match=r"layers\.0.*float16; cast to float32"):
        state = MemoryState.load(tmp_path / "s.safetensors")
    assert all(x.dtype == torch.float32 for x in state.layers.values())
    assert torch.equal(state.layers[0], t.float())
