"""The reference implementation's options: trainable_delta_scale, delta_o_rmsnorm, sentence_mean
segmentation, refusals by name, and SSW's fallback to token writes."""

from __future__ import annotations

import json
import re

import pytest
import torch

from deltamem import DeltaMemConfig, attach_delta_mem, load_adapter
from deltamem.segmentation import sentence_segment_ids, split_sentences
from tests.conftest import tiny_model


def test_split_sentences_by_hand():
    assert split_sentences("Hi there. How are you?  Fine!\n\nNew para") == [
        "Hi there.",
        " How are you?",
        "  Fine!",
        "\n\nNew para",
    ]
    # closing quotes: the cut is at the match start, so the quote opens the next piece (as upstream)
    assert split_sentences('He said "no." Then; left') == ['He said "no.', '" Then;', " left"]
    assert split_sentences("") == [""]
    assert split_sentences("no boundary at all") == ["no boundary at all"]
    assert split_sentences("3.14 is pi") == ["3.14 is pi"]  # no whitespace after the dot
    text = "A: b.\n\n\nc?d e!"
    assert "".join(split_sentences(text)) == text


class WordTokenizer:
    """Leading-space word pieces (like GPT-2's Ġ tokens): ' How' is one token."""

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def encode(self, text, add_special_tokens=False):
        return [self.vocab.setdefault(p, len(self.vocab)) for p in re.findall(r"\s*\S+|\s+$", text)]


def test_sentence_segment_ids_by_hand():
    tok = WordTokenizer()
    content = "I live in Tallinn. I like tea."
    message = tok.encode("<user>") + tok.encode(content) + tok.encode("<end>")
    seg, nxt = sentence_segment_ids(tok, content, message, next_id=3)
    assert seg == [-1, 3, 3, 3, 3, 4, 4, 4, -1] and nxt == 5
    # content missing from the message ids: nothing written
    assert sentence_segment_ids(tok, "absent words", message, 0) == ([-1] * len(message), 0)

    class Merging(WordTokenizer):  # tokenises "x. y" differently from the pieces "x." + " y"
        def encode(self, text, add_special_tokens=False):
            return [7] if text == "x. y" else [1] * len(text)

    seg, nxt = sentence_segment_ids(Merging(), "x. y", [9, 7, 9], 0)
    assert seg == [-1, 0, -1] and nxt == 1  # one segment for the whole content


def test_sentence_ids_drive_ssw_writes():
    """segment_granularity='sentence' writes one mean per sentence: the same as SSW with those ids."""
    tok = WordTokenizer()
    content = "One two. Three four five. Six."
    ids = tok.encode("<u>") + tok.encode(content)
    seg, _ = sentence_segment_ids(tok, content, ids)
    x = torch.tensor([[i % 97 for i in ids]])
    cfg = {"write_mode": "SSW", "rank": 4}
    a = attach_delta_mem(tiny_model(), DeltaMemConfig(segment_granularity="sentence", **cfg))
    b = attach_delta_mem(tiny_model(), DeltaMemConfig(**cfg))
    with torch.no_grad():
        sa = a.write_memory(x, segment_ids=torch.tensor([seg]))
        sb = b.write_memory(x, segment_ids=torch.tensor([seg]))
        per_message = b.write_memory(x, segment_ids=torch.tensor([[0] * len(ids)]))
    assert sa.equal(sb)
    assert not sa.equal(per_message, atol=1e-6)
    with pytest.raises(ValueError, match="segment_granularity"):
        DeltaMemConfig(segment_granularity="sentence")  # TSW


UP = {
    "rank": 4,
    "alpha": 8.0,
    "delta_heads": ["q", "o"],
    "memory_write_granularity": "token",
    "num_state_heads": 1,
    "target_layers": [],
    "output_init": "zero",
}


def test_from_upstream_carries_the_options():
    c = DeltaMemConfig.from_upstream(
        {
            **UP,
            "trainable_delta_scale": True,
            "delta_scale_init": 0.7,
            "delta_scale_max": 3.0,
            "delta_scale_granularity": "head",
            "delta_scale_parameterization": "alpha_over_rank",
            "delta_o_rmsnorm": True,
            "delta_o_rmsnorm_eps": 1e-5,
        }
    )
    assert (c.trainable_delta_scale, c.delta_scale_init, c.delta_scale_max, c.delta_scale_granularity) == (
        True,
        0.7,
        3.0,
        "head",
    )
    assert c.delta_o_rmsnorm and c.delta_o_rmsnorm_eps == 1e-5
    s = DeltaMemConfig.from_upstream({**UP, "memory_write_granularity": "sentence_mean"})
    assert (s.write_mode, s.segment_granularity) == ("SSW", "sentence")
    m = DeltaMemConfig.from_upstream({**UP, "memory_write_granularity": "message_mean"})
    assert (m.write_mode, m.segment_granularity) == ("SSW", "message")
    # Δo RMSNorm without an o branch: an inert, frozen weight (upstream saves it in its adapters)
    inert = DeltaMemConfig.from_upstream({**UP, "delta_heads": ["q"], "delta_o_rmsnorm": True})
    model = attach_delta_mem(tiny_model(), inert)
    w = model.delta_mem.layers[0].delta_o_rmsnorm_weight
    assert w.shape == (32,) and not w.requires_grad
    x = torch.randint(0, 97, (1, 6))
    ref = attach_delta_mem(tiny_model(), DeltaMemConfig.from_upstream({**UP, "delta_heads": ["q"]}))
    with torch.no_grad():
        torch.testing.assert_close(
            model(x, memory=model.write_memory(x)).logits, ref(x, memory=ref.write_memory(x)).logits
        )


@pytest.mark.parametrize(
    "field,value",
    [
        ("num_memory_partitions", 2),
        ("memory_readout_mode", "reader"),
        ("latent_memory_layers", [1]),
        ("delta_scale_parameterization", "direct"),
    ],
)
def test_from_upstream_refuses_unsupported_options_by_name(field, value):
    with pytest.raises(ValueError, match=r"unsupported option\(s\).*" + re.escape(f"{field}={value!r}")):
        DeltaMemConfig.from_upstream({**UP, field: value})


def test_from_upstream_refuses_segment_writes_with_substates():
    with pytest.raises(ValueError, match="num_state_heads=2"):
        DeltaMemConfig.from_upstream({**UP, "memory_write_granularity": "message_mean", "num_state_heads": 2})


def test_upstream_adapter_with_scale_and_rmsnorm_loads(tmp_path):
    """A reference-format adapter with delta_scale_raw (per head) and delta_o_rmsnorm_weight loads and
    runs: the correction matches the formula s·m_max·σ(ρ_h)·U_h r, then RMSNorm on Δo."""
    up = {**UP, "trainable_delta_scale": True, "delta_scale_granularity": "head", "delta_o_rmsnorm": True}
    cfg = DeltaMemConfig.from_upstream(up)
    src = attach_delta_mem(tiny_model("qwen3"), cfg)
    g = torch.Generator().manual_seed(0)
    tensors = {}
    with torch.no_grad():
        for i, layer in src.delta_mem.layers.items():
            for name, p in layer.named_parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
                tensors[f"model.layers.{i}.self_attn.{name}"] = p.detach().clone()
    assert any(n.endswith("delta_scale_raw") for n in tensors) and any(n.endswith("rmsnorm_weight") for n in tensors)
    d = tmp_path / "up"
    d.mkdir()
    (d / "delta_mem_config.json").write_text(json.dumps(up))
    torch.save(tensors, d / "delta_mem_adapter.pt")
    with pytest.warns(UserWarning, match="upstream"):
        model = load_adapter(tiny_model("qwen3"), d)
    x = torch.randint(0, 97, (1, 9), generator=g)
    with torch.no_grad():
        state = model.write_memory(x)
        ref_state = src.write_memory(x)
        assert state.equal(ref_state)
        torch.testing.assert_close(model(x, memory=state).logits, src(x, memory=ref_state).logits, atol=0, rtol=0)


def test_ssw_generate_with_writes_falls_back_to_token_writes():
    """generate(memory_write=True) under SSW: no ids for generated tokens, so they are written one by one
    (the reference's fallback), where it used to be refused."""
    model = attach_delta_mem(tiny_model(), DeltaMemConfig(write_mode="SSW", rank=4))
    q = torch.randint(0, 97, (1, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        state = model.new_memory(1)
        out = model.generate(q, memory=state, memory_write=True, max_new_tokens=3, do_sample=False, pad_token_id=0)
        by_tokens = model.write_memory(out[:, :-1])  # the same tokens, no ids: token writes
    assert state.equal(by_tokens, atol=1e-6)
