"""The real embedded backbone (SmolLM2-135M-Instruct): identity at init, chat template, session, CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from deltamem import DeltaMemConfig, MemorySession, attach_delta_mem, detach_delta_mem, encode_messages, format_message

pytestmark = pytest.mark.slow


@pytest.fixture
def backbone(embedded):
    model, tok = embedded
    yield model, tok
    detach_delta_mem(model)  # the session-scoped backbone goes back clean


def test_identity_at_init_on_embedded(backbone):
    model, tok = backbone
    x = tok("The quick brown fox jumps over the lazy dog.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = model(x).logits
        for mode, h in [("TSW", None), ("SSW", None), ("MSW", 4)]:
            for init in ("zero", "base_slice_fixed"):
                attach_delta_mem(model, DeltaMemConfig(write_mode=mode, num_substates=h, output_init=init))
                assert (model(x).logits - ref).abs().max() <= 1e-6, (mode, init)
                if init == "zero":
                    seg = torch.zeros_like(x) if mode == "SSW" else None
                    state = model.write_memory(x, segment_ids=seg)
                    assert (model(x, memory=state).logits - ref).abs().max() <= 1e-6, mode
                detach_delta_mem(model)


def test_format_message_is_the_templates_span(backbone):
    _, tok = backbone
    piece = format_message(tok, "user", "I live in Lisbon.")
    assert piece == "<|im_start|>user\nI live in Lisbon.<|im_end|>\n"
    ids, seg = encode_messages(tok, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello!"}])
    assert len(ids) == len(seg) and seg[0] == 0 and seg[-1] == 1 and sorted(set(seg)) == [0, 1]


def test_session_write_ask_save_load(backbone, tmp_path):
    model, tok = backbone
    attach_delta_mem(model, DeltaMemConfig())
    session = MemorySession(model, tok, max_new_tokens=8)
    session.add_message("user", "My cat is called Miso.")
    session.flush()  # told turns are written at the next question (or flush/save)
    assert max(t.abs().max() for t in session.state.layers.values()) > 0
    before = session.state.clone()
    answer = session.ask("What is my cat called?")
    assert isinstance(answer, str) and answer
    assert session.state.equal(before)  # asking is read-only
    session.save(tmp_path / "s")
    again = MemorySession.load(tmp_path / "s", model, tok)
    assert again.state.equal(session.state) and again.history == session.history
    assert again.ask("What is my cat called?") == answer


def test_cli_chat_script(tmp_path):
    script = tmp_path / "chat.jsonl"
    lines = [
        {"role": "user", "content": "Remember: the code word is lantern."},
        {"ask": "What is the code word?"},
        {"save": str(tmp_path / "sess")},
    ]
    script.write_text("\n".join(json.dumps(x) for x in lines))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "deltamem.cli",
            "chat",
            "--backbone",
            "embedded",
            "--script",
            str(script),
            "--max-new-tokens",
            "6",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    rows = [json.loads(x) for x in out.stdout.splitlines()]
    assert len(rows) == 1 and rows[0]["ask"] == "What is the code word?" and rows[0]["answer"]
    assert (tmp_path / "sess" / "state.safetensors").is_file()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"oops": 1}\n')
    out = subprocess.run(
        [sys.executable, "-m", "deltamem.cli", "chat", "--script", str(bad)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode != 0 and "bad.jsonl:1" in out.stderr
