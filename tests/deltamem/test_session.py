"""MemorySession: the training protocol writes exactly what training/evaluation write, the reference
protocol is one cached stream with writes while reading and decoding, and saving never loses or
deletes anything it did not write."""

from __future__ import annotations

import json
import os

import pytest
import torch

from deltamem import ChatSettings, DeltaMemConfig, MemorySession, attach_delta_mem, load_adapter
from deltamem.attach import cache_kwarg
from pipeline.data.schema import Example, Segment
from pipeline.data.tokenize import Packer
from tests.fixtures.families import standin_model, standin_tokenizer

TURNS = [
    Segment("I live in Tallinn.", role="user", speaker="Rosalind", session="Session 1", timestamp="3 May 2024"),
    Segment("Noted.", role="assistant", speaker=None, session="Session 1", timestamp="3 May 2024"),
    Segment("My dog is Miso.", role="user", speaker="Rosalind", session="Session 2", timestamp="9 June 2024"),
]


def strong(model, seed=0):
    """Non-trivial δ-mem weights, so that a different write visibly changes the state and the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.delta_mem.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (1.0 if "delta_" in name else 0.3))
    return model


def make(family="qwen3", mode="TSW", **kw):
    tok = standin_tokenizer(family)
    model = strong(attach_delta_mem(standin_model(family, len(tok)), DeltaMemConfig(write_mode=mode, rank=4, **kw)))
    return model, tok


def tell(session, turns=TURNS):
    for t in turns:
        session.add_message(t.role, t.text, speaker=t.speaker, timestamp=t.timestamp, session=t.session)


@pytest.mark.parametrize("family", ["qwen3", "smollm3", "llama"])
@pytest.mark.parametrize("mode", ["TSW", "SSW"])
def test_training_protocol_writes_what_training_writes(family, mode):
    model, tok = make(family, mode)
    session = MemorySession(model, tok, max_new_tokens=3)
    tell(session)
    ids, seg = Packer(tok, write_length=4096).context_ids(TURNS)  # training's WRITE segment
    ref = model.write_memory(torch.tensor([ids]), segment_ids=torch.tensor([seg]) if mode == "SSW" else None)
    session.flush()
    assert session.state.equal(ref)
    example = Example("e", "synthetic", "Where does Rosalind live?", ["Tallinn"], segments=TURNS)
    read_ids, labels, _ = Packer(tok).read_ids(example)
    prompt = read_ids[: next(i for i, v in enumerate(labels) if v != -100)]
    assert session.prompt_ids(example.question)[0].tolist() == prompt  # training's READ prompt
    before = session.state.clone()
    session.ask(example.question)
    assert session.state.equal(before)  # answers are read-only


def test_training_protocol_chunks_and_later_writes():
    model, tok = make("llama")
    a = MemorySession(model, tok, write_length=40)
    tell(a)
    a.flush()
    ids, seg = Packer(tok, write_length=40).context_ids(TURNS)
    from deltamem.chat import split_chunks

    ref = model.new_memory(1)
    chunks = split_chunks(ids, seg, 40)
    assert len(chunks) > 1
    for c in chunks:
        model.write_memory(torch.tensor([c.input_ids]), state=ref)
    assert a.state.equal(ref)
    # turns told after a write are written in their context-free form, without a second system prompt
    b = MemorySession(model, tok)
    tell(b, TURNS[:2])
    b.flush()
    tell(b, TURNS[2:])
    b.flush()
    fmt = b.fmt
    anchor = {"role": "system", "content": b.settings.write_system}
    later = fmt.encode(fmt.message_pieces([anchor, b._messages()[2]])[1])
    first_ids, _ = Packer(tok).context_ids(TURNS[:2])
    ref = model.write_memory(torch.tensor([first_ids]))
    model.write_memory(torch.tensor([later]), state=ref)
    assert b.state.equal(ref)


def test_session_uses_the_adapters_settings(tmp_path):
    model, tok = make("llama")
    custom = ChatSettings(
        write_system="Remember.", read_system="Answer tersely.", speaker_format="{speaker} said: {text}"
    )
    model.save_adapter(tmp_path / "ad")
    from deltamem import save_adapter

    save_adapter(model, tmp_path / "ad2", chat=custom)
    fresh = load_adapter(standin_model("llama", len(tok)), tmp_path / "ad2")
    s = MemorySession(fresh, tok)
    assert s.settings == custom
    tell(s, TURNS[:1])
    assert s._messages()[0]["content"].endswith("Rosalind said: I live in Tallinn.")
    assert "Answer tersely." in tok.decode(s.prompt_ids("Where?")[0])
    assert MemorySession(fresh, tok, system_prompt="Other.").settings.read_system == "Other."
    default = load_adapter(standin_model("llama", len(tok)), tmp_path / "ad")
    assert MemorySession(default, tok).settings == ChatSettings()


# -- the reference protocol -------------------------------------------------------------------------------
def _one_pass(model, ids, seg=None):
    state = model.new_memory(1)
    with torch.no_grad():
        model(
            input_ids=torch.tensor([ids]),
            memory=state,
            memory_write=True,
            segment_ids=None if seg is None else torch.tensor([seg]),
        )
    return state


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_reference_protocol_is_one_stream_written_while_reading_and_decoding(family):
    model, tok = make(family)
    s = MemorySession(model, tok, max_new_tokens=5, protocol="reference")
    tell(s, TURNS[:2])
    after_tell = s.state.clone()
    s.ask("Where does Rosalind live?")
    assert not s.state.equal(after_tell)  # the question and the answer are written
    s.ask("And the dog?")
    # incremental ingest with the KV cache = writing the whole stream in one pass
    ref = _one_pass(model, s.stream)
    for i in ref.layers:
        torch.testing.assert_close(s.state.layers[i], ref.layers[i], rtol=1e-4, atol=1e-5)
    # the stream is the chat template's rendering of the conversation (told turns, questions, answers)
    rendered = s.fmt.encode(s.fmt.render(s._conversation()))
    assert s.stream == rendered
    assert s.cache.get_seq_length() == len(s.stream)  # the KV cache holds exactly the stream


def test_reference_protocol_ssw_does_not_write_system_messages():
    model, tok = make("qwen3", "SSW")
    s = MemorySession(model, tok, protocol="reference")
    s.add_message("system", "You are terse.")
    assert all(float(t.abs().max()) == 0.0 for t in s.state.layers.values())  # nothing written
    s.add_message("user", "I live in Tallinn.")
    assert any(float(t.abs().max()) > 0.0 for t in s.state.layers.values())
    seg = s._segment_ids(s._conversation(), s.stream)
    ids = s.stream
    assert seg[0] == -1 and max(seg) == 0 and len(seg) == len(ids)
    ref = _one_pass(model, ids, seg)
    for i in ref.layers:
        torch.testing.assert_close(s.state.layers[i], ref.layers[i], rtol=1e-4, atol=1e-5)


def test_reference_protocol_rebuilds_when_the_history_renders_differently():
    model, tok = make("llama")
    s = MemorySession(model, tok, protocol="reference", max_new_tokens=3)
    s.add_message("user", "hello")
    s.stream[-1] = (s.stream[-1] + 1) % len(tok)  # pretend an earlier rendering differed
    s.add_message("user", "again")
    ref = _one_pass(model, s.stream)
    assert s.stream == s.fmt.encode(s.fmt.render(s._conversation()))
    for i in ref.layers:
        torch.testing.assert_close(s.state.layers[i], ref.layers[i], rtol=1e-4, atol=1e-5)


def test_reference_session_save_load_continues_identically(tmp_path):
    model, tok = make("qwen3")
    a = MemorySession(model, tok, protocol="reference", max_new_tokens=4)
    tell(a, TURNS[:1])
    a.ask("Where?")
    a.save(tmp_path / "s")
    b = MemorySession.load(tmp_path / "s", model, tok)
    assert b.protocol == "reference" and b.stream == a.stream and b.state.equal(a.state)
    assert b.cache.get_seq_length() == a.cache.get_seq_length()
    assert a.ask("Again?") == b.ask("Again?")
    assert a.state.equal(b.state)
    assert cache_kwarg(model.delta_mem.decoder) in ("cache", "past_key_values")


# -- saving --------------------------------------------------------------------------------------------
def _snapshot(folder):
    return sorted((str(p.relative_to(folder)), p.read_bytes()) for p in folder.rglob("*") if p.is_file())


def test_save_refuses_a_foreign_directory_and_deletes_nothing(tmp_path, monkeypatch):
    model, tok = make("llama")
    s = MemorySession(model, tok)
    tell(s, TURNS[:1])
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "README.md").write_text("mine")
    (project / "data" / "x.csv").write_text("1,2")
    before = _snapshot(project)
    with pytest.raises(FileExistsError, match=r"project: a non-empty directory that is not a saved MemorySession"):
        s.save(project)
    monkeypatch.chdir(project)
    with pytest.raises(FileExistsError, match="not a saved MemorySession"):
        s.save(".")  # the chat script's {"save": "."}
    assert _snapshot(project) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["project"]  # no temporary leftovers
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        s.save(tmp_path / "file")


def test_save_replaces_only_a_previous_session(tmp_path, monkeypatch):
    model, tok = make("llama")
    s = MemorySession(model, tok)
    tell(s, TURNS[:1])
    s.save(tmp_path / "sess")
    first = MemorySession.load(tmp_path / "sess", model, tok)
    tell(s, TURNS[1:])
    s.save(tmp_path / "sess")  # over a previous session: swapped in atomically
    again = MemorySession.load(tmp_path / "sess", model, tok)
    assert len(first.history) == 1 and len(again.history) == 3 and again.state.equal(s.state)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sess"]
    (tmp_path / "sess" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="also holds other files"):
        s.save(tmp_path / "sess")
    assert (tmp_path / "sess" / "notes.txt").read_text() == "keep me"
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    s.save(".")  # an empty working directory: files written into it
    assert sorted(os.listdir(empty)) == ["session.json", "state.safetensors"]
    meta = json.loads((empty / "session.json").read_text())
    assert meta["protocol"] == "training" and meta["history"][0]["speaker"] == "Rosalind"


def test_save_failure_leaves_the_previous_session(tmp_path, monkeypatch):
    model, tok = make("llama")
    s = MemorySession(model, tok)
    tell(s, TURNS[:1])
    s.save(tmp_path / "sess")
    before = _snapshot(tmp_path / "sess")

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(s.state), "save", boom)
    with pytest.raises(OSError, match="No space left"):
        s.save(tmp_path / "sess")
    assert _snapshot(tmp_path / "sess") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sess"]


def test_load_errors_name_the_file(tmp_path):
    model, tok = make("llama")
    with pytest.raises(FileNotFoundError, match="not a saved MemorySession"):
        MemorySession.load(tmp_path, model, tok)
    (tmp_path / "session.json").write_text("{oops")
    with pytest.raises(ValueError, match=r"session\.json: not valid JSON"):
        MemorySession.load(tmp_path, model, tok)
    with pytest.raises(ValueError, match="role must be one of"):
        MemorySession(model, tok).add_message("narrator", "x")
    with pytest.raises(ValueError, match="protocol must be"):
        MemorySession(model, tok, protocol="paper")


def test_save_into_the_working_directory_keeps_it(tmp_path, monkeypatch):
    """`:save .` inside a saved session folder updates the files in place; the folder itself stays."""
    model, tok = make("llama")
    s = MemorySession(model, tok)
    tell(s, TURNS[:1])
    s.save(tmp_path / "sess")
    inode = (tmp_path / "sess").stat().st_ino
    monkeypatch.chdir(tmp_path / "sess")
    tell(s, TURNS[1:])
    s.save(".")
    assert (tmp_path / "sess").stat().st_ino == inode and os.getcwd() == str(tmp_path / "sess")
    assert len(MemorySession.load(tmp_path / "sess", model, tok).history) == 3
    assert sorted(os.listdir(tmp_path / "sess")) == ["session.json", "state.safetensors"]
