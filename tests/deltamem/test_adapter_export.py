"""Adapter files: the upstream export (round trip bit-identical), names that are not a model's, the identity
digest, legacy names, training output folders, and a clear refusal of code-executing pickles."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from deltamem import ChatSettings, DeltaMemConfig, adapter_digest, attach_delta_mem, load_adapter, save_adapter
from deltamem.adapter import UPSTREAM_CONFIG, UPSTREAM_WEIGHTS, read_adapter_config
from tests.conftest import tiny_model

# The reference implementation's HFDeltaMemConfig fields (declare-lab/delta-Mem, deltamem/core/delta_impl.py);
# its from_dict is cls(**data), so an exported config must use only these names.
UPSTREAM_FIELDS = {
    "rank", "alpha", "beta_bias_init", "normalize_qk", "couple_lambda", "state_update_mode", "rankwise_gates",
    "output_init", "base_slice_ref_width", "online_gain", "num_state_heads", "num_memory_partitions",
    "memory_write_granularity", "target_modules", "target_layers", "delta_heads", "delta_o_rmsnorm",
    "trainable_delta_scale", "delta_scale_init", "delta_scale_max", "delta_scale_granularity",
}  # fmt: skip


def trained(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.delta_mem.named_parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize(
    "cfg",
    [
        DeltaMemConfig(branches=("q", "o")),
        DeltaMemConfig(branches=("q", "k", "v", "o"), write_mode="SSW", rank=4, target_layers=(1,)),
        DeltaMemConfig(write_mode="MSW", num_substates=2, rank=4, scan_backend="naive", chunk_size=8),
    ],
)
def test_round_trip_ours_upstream_ours_is_bit_identical(tmp_path, cfg):
    src = trained(attach_delta_mem(tiny_model("qwen3"), cfg))
    chat = ChatSettings(read_system="Answer.", speaker_format="{speaker} said: {text}")
    save_adapter(src, tmp_path / "ours", chat=chat)
    ours = load_adapter(tiny_model("qwen3"), tmp_path / "ours")
    save_adapter(ours, tmp_path / "up", chat=chat, format="upstream")
    names = sorted(os.listdir(tmp_path / "up"))
    assert names == ["delta_mem_adapter.pt", "delta_mem_config.json", "deltamem_export.json"]
    up_cfg = json.loads((tmp_path / "up" / UPSTREAM_CONFIG).read_text())
    assert set(up_cfg) <= UPSTREAM_FIELDS
    # what upstream's load_delta_mem_state_dict does: "<module path>.<param>" resolved in the model
    raw = torch.load(tmp_path / "up" / UPSTREAM_WEIGHTS, weights_only=True)
    modules = dict(tiny_model("qwen3").named_modules())
    for key in raw:
        module, param = key.rsplit(".", 1)
        assert module in modules and module.endswith("self_attn") and param.startswith(("delta_", "memory_", "beta_"))
    back = load_adapter(tiny_model("qwen3"), tmp_path / "up")
    assert back.delta_mem.config == cfg
    assert back.delta_mem.adapter_meta["chat"] == chat.to_dict()
    save_adapter(back, tmp_path / "again", chat=chat)
    a = load_file(str(tmp_path / "ours" / "adapter.safetensors"))
    b = load_file(str(tmp_path / "again" / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "ours" / "adapter.safetensors").read_bytes() == (
        tmp_path / "again" / "adapter.safetensors"
    ).read_bytes()
    # without our side file it is a plain upstream directory: still loads (config mapped, with a warning)
    (tmp_path / "up" / "deltamem_export.json").unlink()
    with pytest.warns(UserWarning, match="upstream"):
        plain = load_adapter(tiny_model("qwen3"), tmp_path / "up")
    p1, p2 = dict(plain.delta_mem.named_parameters()), dict(back.delta_mem.named_parameters())
    assert all(torch.equal(p1[k], p2[k]) for k in p1)


def test_file_names_are_not_a_models_and_old_names_still_load(tmp_path):
    model = trained(attach_delta_mem(tiny_model(), DeltaMemConfig()))
    save_adapter(model, tmp_path / "ad")
    assert sorted(os.listdir(tmp_path / "ad")) == ["adapter.safetensors", "deltamem_adapter.json"]
    assert oct((tmp_path / "ad").stat().st_mode & 0o777) == "0o755"
    assert oct((tmp_path / "ad" / "adapter.safetensors").stat().st_mode & 0o777) == "0o644"
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "adapter.safetensors").write_bytes((tmp_path / "ad" / "adapter.safetensors").read_bytes())
    (legacy / "config.json").write_text((tmp_path / "ad" / "deltamem_adapter.json").read_text())
    old = load_adapter(tiny_model(), legacy)
    assert old.delta_mem.config == model.delta_mem.config
    # a Hugging Face model's config.json is not taken for an adapter
    hf = tmp_path / "hf"
    tiny_model().save_pretrained(hf)
    with pytest.raises(FileNotFoundError, match="not a δ-mem adapter"):
        read_adapter_config(hf)
    # a training output folder (models/TSW) resolves to its adapter/ directory
    save_adapter(model, tmp_path / "models" / "TSW" / "adapter")
    (tmp_path / "models" / "TSW" / "training_summary.json").write_text("{}")
    assert load_adapter(tiny_model(), tmp_path / "models" / "TSW").delta_mem.config == model.delta_mem.config


def test_identity_digest_depends_on_weights_and_config_only(tmp_path):
    model = trained(attach_delta_mem(tiny_model(), DeltaMemConfig()))
    save_adapter(model, tmp_path / "a")
    save_adapter(model, tmp_path / "b", extra={"note": "run at 10:31, 12.5 s"})
    assert adapter_digest(tmp_path / "a") == adapter_digest(tmp_path / "b")
    meta = json.loads((tmp_path / "b" / "deltamem_adapter.json").read_text())
    meta["backbone"]["name_or_path"] = "/elsewhere/models/backbone"  # where the backbone was loaded from
    (tmp_path / "b" / "deltamem_adapter.json").write_text(json.dumps(meta))
    assert adapter_digest(tmp_path / "a") == adapter_digest(tmp_path / "b")
    save_adapter(model, tmp_path / "c", chat=ChatSettings(read_system="Other."))
    assert adapter_digest(tmp_path / "c") != adapter_digest(tmp_path / "a")  # the chat format is identity
    with torch.no_grad():
        next(iter(model.delta_mem.parameters())).add_(1e-3)
    save_adapter(model, tmp_path / "d")
    assert adapter_digest(tmp_path / "d") != adapter_digest(tmp_path / "a")
    assert "training" not in json.loads((tmp_path / "a" / "deltamem_adapter.json").read_text())


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_code_executing_pickle_is_refused_naming_the_file(tmp_path):
    d = tmp_path / "up"
    d.mkdir()
    (d / UPSTREAM_CONFIG).write_text(json.dumps({"rank": 8, "delta_heads": ["q", "o"]}))
    torch.save({"model.layers.0.self_attn.memory_q_proj": _Evil()}, d / UPSTREAM_WEIGHTS)
    with pytest.raises(ValueError) as err:
        load_adapter(tiny_model(), d)
    msg = str(err.value)
    assert str(d / UPSTREAM_WEIGHTS) in msg and "refused" in msg
    assert "weights_only" not in msg and "\n" not in msg
    (d / UPSTREAM_WEIGHTS).write_bytes(b"\x80\x04garbage")
    with pytest.raises(ValueError, match="refused"):
        load_adapter(tiny_model(), d)


def test_unreadable_ours_named(tmp_path):
    model = attach_delta_mem(tiny_model(), DeltaMemConfig())
    save_adapter(model, tmp_path / "a")
    (tmp_path / "a" / "adapter.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match=r"adapter\.safetensors: not a readable safetensors file"):
        load_adapter(tiny_model(), tmp_path / "a")
    (tmp_path / "a" / "deltamem_adapter.json").write_text("")
    with pytest.raises(ValueError, match=r"deltamem_adapter\.json: not valid JSON"):
        load_adapter(tiny_model(), tmp_path / "a")
    with pytest.raises(ValueError, match="format must be"):
        save_adapter(model, tmp_path / "x", format="peft")
