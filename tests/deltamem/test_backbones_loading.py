"""Backbone/tokenizer loading: attention implementation, local-path checks, offline hub fail-fast, exit 2."""

from __future__ import annotations

import importlib.util
import json
import socket
import time
from pathlib import Path

import pytest
import torch

from deltamem.backbones import (
    ATTN_IMPLEMENTATIONS,
    BackboneLoadError,
    load_backbone,
    load_tokenizer,
    resolve_attn_implementation,
    resolve_source,
)
from deltamem.backbones import loading as L
from tests.conftest import tiny_model


def _tiny_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(20)}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tok.save_pretrained(folder)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny") / "backbone"
    tiny_model("llama", attn=None, vocab=23).save_pretrained(folder)
    _tiny_tokenizer(folder)
    return folder


@pytest.fixture
def no_flash_attn(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        L.importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn" else real(name, *a)
    )


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt fails at once (and is recorded), as on an offline machine."""
    calls = []

    def refuse(address, *args, **kwargs):
        calls.append(address)
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    return calls


# ------------------------------------------------------------------------------------------- attention
def test_auto_is_sdpa_without_flash_attn(no_flash_attn):
    assert resolve_attn_implementation("auto", torch.bfloat16) == "sdpa"
    assert resolve_attn_implementation(None) == "sdpa"


def test_auto_is_flash_attention_only_when_usable(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(L.importlib.util, "find_spec", lambda n, *a: object() if n == "flash_attn" else real(n, *a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_attn_implementation("auto", torch.bfloat16) == "flash_attention_2"
    assert resolve_attn_implementation("auto", "float16") == "flash_attention_2"
    assert resolve_attn_implementation("auto", torch.float32) == "sdpa"  # no fp32 FlashAttention kernel
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_attn_implementation("auto", torch.bfloat16) == "sdpa"


def test_explicit_values_pass_and_unknown_ones_are_refused(monkeypatch, no_flash_attn):
    for value in ("eager", "sdpa"):
        assert resolve_attn_implementation(value, torch.float32) == value
    with pytest.raises(ValueError, match="allowed: auto, eager, sdpa, flash_attention_2"):
        resolve_attn_implementation("flash")
    with pytest.raises(BackboneLoadError, match="pip install flash-attn --no-build-isolation"):
        resolve_attn_implementation("flash_attention_2")  # asked for, not installed: one line, not a traceback
    monkeypatch.setattr(L, "flash_attn_available", lambda: True)
    assert resolve_attn_implementation("flash_attention_2", torch.bfloat16) == "flash_attention_2"


@pytest.mark.parametrize(("asked", "expected"), [("auto", "sdpa"), ("eager", "eager"), ("sdpa", "sdpa")])
def test_the_value_reaches_the_model_config(tiny_folder, no_flash_attn, asked, expected):
    model, tok = load_backbone(str(tiny_folder), dtype=torch.float32, attn_implementation=asked)
    assert model.config._attn_implementation == expected
    assert tok.eos_token == "</s>"


def test_params_sections_and_chat_take_the_value():
    from deltamem.cli import build_parser
    from pipeline.eval.runner import EvalParams
    from pipeline.train.run import BackboneParams, TrainParams

    for model in (BackboneParams, TrainParams, EvalParams):
        assert model().attn_implementation == "auto"
        assert model(attn_implementation="eager").attn_implementation == "eager"
        with pytest.raises(ValueError, match="attn_implementation 'flash'"):
            model(attn_implementation="flash")
    chat = build_parser().parse_args(["chat", "--attn-implementation", "sdpa"])
    assert chat.attn_implementation == "sdpa"
    action = next(
        a
        for a in build_parser()._subparsers._group_actions[0].choices["chat"]._actions
        if a.dest == "attn_implementation"
    )
    assert tuple(action.choices) == ATTN_IMPLEMENTATIONS


def test_eval_worker_passes_the_value(tiny_folder, no_flash_attn):
    from pipeline.eval.runner import EvalWorker

    worker = EvalWorker(str(tiny_folder), "float32", "cpu", 1, attn_implementation="eager")
    assert worker.model.config._attn_implementation == "eager"


# ------------------------------------------------------------------------------------------- local paths
@pytest.mark.parametrize(
    "value",
    [
        "/nonexistent/models/backbone",
        "./models/backbone",
        "../elsewhere/backbone",
        "a/b/c",
        "models\\backbone",
        "~/x/y",
    ],
)
def test_a_missing_local_looking_path_fails_at_once(tmp_path, no_network, value):
    t0 = time.monotonic()
    with pytest.raises(BackboneLoadError) as err:
        load_backbone(value, root=tmp_path, what="train.backbone")
    assert time.monotonic() - t0 < 1.0
    msg = str(err.value)
    assert "\n" not in msg and value in msg and "train.backbone" in msg and "no such folder" in msg
    assert "Repo id" not in msg and not no_network  # never a hub request


def test_owner_name_form_under_an_existing_folder_is_local(tmp_path, no_network):
    (tmp_path / "models").mkdir()
    with pytest.raises(BackboneLoadError, match="no such folder"):
        resolve_source("models/backbone", tmp_path)
    assert not no_network
    assert resolve_source(".", tmp_path).local  # an existing folder is used as it is


def test_a_file_is_not_a_model_folder(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"x")
    with pytest.raises(BackboneLoadError, match="is a file"):
        resolve_source("model.bin", tmp_path)


def test_relative_paths_are_taken_against_root(tiny_folder, no_flash_attn):
    model, _ = load_backbone("backbone", dtype=torch.float32, root=tiny_folder.parent)
    assert model.config.model_type == "llama"


# ------------------------------------------------------------------------------------------- the hub
def test_offline_env_fails_fast_with_the_hint(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(L, "_in_cache", lambda *a: False)
    t0 = time.monotonic()
    with pytest.raises(BackboneLoadError) as err:
        load_tokenizer("someorg/somemodel", root=tmp_path, what="prepare.tokenizer.name_or_path")
    assert time.monotonic() - t0 < 2.0
    msg = str(err.value)
    assert "HF_HUB_OFFLINE" in msg and "local folder" in msg and "prepare.tokenizer.name_or_path" in msg


def test_unreachable_hub_fails_fast_with_the_hint(tmp_path, no_network, monkeypatch):
    monkeypatch.setattr(L, "_in_cache", lambda *a: False)
    t0 = time.monotonic()
    with pytest.raises(BackboneLoadError) as err:
        load_backbone("someorg/somemodel", root=tmp_path)
    assert time.monotonic() - t0 < 2.0 and len(no_network) == 1  # one probe, no retries
    msg = str(err.value)
    assert "cannot be reached" in msg and "Network is unreachable" in msg and "local folder" in msg


def _fake_cache(cache: Path, repo: str, files: dict[str, str]) -> None:
    """The hub cache layout that huggingface_hub.try_to_load_from_cache reads."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0" * 40)
    snap = folder / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    for name, text in files.items():
        (snap / name).write_text(text)


def test_a_cached_model_loads_offline(tmp_path, no_network, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    _fake_cache(cache, "someorg/cached", {"config.json": json.dumps({"model_type": "llama"})})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    src = resolve_source("someorg/cached", tmp_path)
    assert src.local_files_only and not src.local and src.path == "someorg/cached"


# ------------------------------------------------------------------------------------------- stages / CLI
def _one_error_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


def test_stages_and_chat_exit_2_with_one_line(tmp_path, capsys, no_network):
    from deltamem.cli import main as chat_main
    from pipeline.stages.backbone import main as backbone_main
    from pipeline.stages.train import main as train_main

    params = tmp_path / "params.yaml"
    params.write_text(
        "backbone: {name_or_path: /nonexistent/Qwen3-8B}\n"
        "train: {backbone: ./models/backbone, variants: {TSW: {write_mode: TSW}}}\n"
    )
    assert backbone_main(["--params", str(params)]) == 2
    assert "/nonexistent/Qwen3-8B" in _one_error_line(capsys.readouterr().err)
    assert train_main(["--params", str(params), "--variant", "TSW", "--no-tracking"]) == 2
    assert "./models/backbone" in _one_error_line(capsys.readouterr().err)
    assert chat_main(["chat", "--backbone", "../no/such/model"]) == 2
    assert "../no/such/model" in _one_error_line(capsys.readouterr().err)
    assert not no_network


def test_prepare_tokenizer_exits_2_with_one_line(tmp_path, capsys, no_network):
    from pipeline.stages.prepare import main as prepare_main

    params = tmp_path / "params.yaml"
    params.write_text(
        "prepare:\n  tokenizer: {name_or_path: someorg/sometokenizer}\n"
        "  datasets: [{name: synthetic, synthetic: {dialogues: {train: 2}}}]\n"
    )
    t0 = time.monotonic()
    assert prepare_main(["--params", str(params), "--no-tracking"]) == 2
    assert time.monotonic() - t0 < 5.0
    line = _one_error_line(capsys.readouterr().err)
    assert "someorg/sometokenizer" in line and "cannot be reached" in line


def test_flash_attn_is_its_own_install_step():
    """`pip install .[gpu]` must never try to build flash-attn (no wheel; an isolated build cannot see torch)."""
    import tomllib

    repo = Path(__file__).resolve().parents[2]
    extras = tomllib.loads((repo / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert not [d for deps in extras.values() for d in deps if d.replace("_", "-").startswith("flash-attn")]
    readme = (repo / "README.md").read_text()
    assert "pip install flash-attn --no-build-isolation" in readme and 'pip install -e ".[gpu]"' in readme
    for preset in sorted((repo / "configs").glob("*.yaml")):
        import yaml

        data = yaml.safe_load(preset.read_text())
        for section in ("backbone", "train", "evaluate"):
            assert data[section]["attn_implementation"] == "auto", (preset.name, section)


class _Stop(Exception):
    pass


def test_every_stage_passes_attn_implementation_to_the_one_loader(tmp_path, monkeypatch):
    """backbone, train (the one per-rank driver of every launcher) and evaluate all load through
    deltamem.backbones.load_backbone with the section's attn_implementation."""
    import deltamem.backbones as backbones
    from pipeline.backbone import BackboneParams, prepare_backbone
    from pipeline.eval.runner import EvalWorker
    from pipeline.train.run import TrainParams, run_train

    seen = []

    def fake_load(name, *args, **kwargs):
        seen.append((name, kwargs.get("attn_implementation"), kwargs.get("what")))
        raise _Stop

    monkeypatch.setattr(backbones, "load_backbone", fake_load)
    (tmp_path / "models" / "backbone").mkdir(parents=True)
    (tmp_path / "some").mkdir()
    with pytest.raises(_Stop):
        prepare_backbone(BackboneParams(name_or_path="some", attn_implementation="eager"), tmp_path)
    train = TrainParams(backbone="models/backbone", attn_implementation="sdpa")
    with pytest.raises(_Stop):
        run_train(train, "TSW", tmp_path, log_mlflow=False, progress=False)
    with pytest.raises(_Stop):
        EvalWorker("models/backbone", "float32", "cpu", 1, attn_implementation="flash_attention_2")
    assert [s[1] for s in seen] == ["eager", "sdpa", "flash_attention_2"]
    assert [s[2] for s in seen] == ["backbone.name_or_path", "train.backbone", "evaluate.backbone"]


def test_evaluate_stage_exits_2_on_a_missing_backbone(tmp_path, capsys, no_network):
    from pipeline.stages.evaluate import main as evaluate_main

    params = tmp_path / "params.yaml"
    params.write_text("evaluate: {backbone: ../models/none, workers: 0}\n")
    assert evaluate_main(["--params", str(params), "--no-tracking"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "evaluate.backbone" in line and "../models/none" in line and not no_network
