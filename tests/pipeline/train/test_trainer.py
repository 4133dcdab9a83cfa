"""The SFT trainer on a tiny random Llama with the real embedded tokenizer and synthetic episodes."""

from __future__ import annotations

import json

import pytest
import torch

from deltamem import DeltaMemConfig
from pipeline.data.synthetic import config_from_options, generate_split
from pipeline.data.tokenize import Packer
from pipeline.train.trainer import TrainConfig, collate_episodes, episode_forward, evaluate_loss, lr_lambda, train
from tests.conftest import tiny_model


@pytest.fixture(scope="module")
def episodes(smol_tokenizer):
    cfg = config_from_options(
        {"seed": 3, "dialogues": {"train": 3, "validation": 1}, "sessions": 2, "facts_per_dialogue": 2}
    )
    packer = Packer(smol_tokenizer, write_length=256, read_length=64, overflow="truncate")
    return [packer.pack(e) for e in generate_split(cfg, "train")]


def tiny(vocab: int, seed: int = 0):
    """A 2-layer random Llama over the embedded tokenizer's vocabulary (default attention)."""
    return tiny_model("llama", attn=None, seed=seed, vocab=vocab, max_positions=512)


def small_cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"steps": 6, "batch_size": 2, "grad_accum": 1, "lr": 5e-3, "warmup_ratio": 0.2, **kw})


def test_schedule_shapes():
    f = lr_lambda(TrainConfig(steps=10, warmup_ratio=0.2))
    assert [round(f(s), 3) for s in (0, 1)] == [0.5, 1.0]
    assert f(2) == pytest.approx(1.0) and f(9) < 0.1
    assert lr_lambda(TrainConfig(steps=10, warmup_ratio=0.0, schedule="linear"))(5) == pytest.approx(0.5)
    with pytest.raises(ValueError, match=r"schedule 'exp'; allowed: cosine, linear, constant"):
        TrainConfig(schedule="exp")


def test_collate_masks_and_labels(episodes, smol_tokenizer):
    b = collate_episodes(episodes[:2], smol_tokenizer.eos_token_id)
    assert b["write_ids"].shape == b["write_mask"].shape == b["segment_ids"].shape
    assert ((b["segment_ids"] >= 0) == b["write_mask"].bool()).all()
    n_answer = sum(sum(1 for x in e.read_labels if x != -100) for e in episodes[:2])
    assert int((b["labels"] != -100).sum()) == n_answer > 0


def test_training_lowers_loss_and_leaves_backbone_untouched(episodes, smol_tokenizer, tmp_path):
    model = tiny(len(smol_tokenizer))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pad = smol_tokenizer.eos_token_id
    result = train(model, episodes, pad, DeltaMemConfig(), small_cfg(steps=12), tmp_path, progress=False)
    assert result.history[-1]["answer_ce"] < result.history[0]["answer_ce"]
    for k, v in before.items():
        assert torch.equal(model.state_dict()[k], v), k
    assert (tmp_path / "adapter" / "adapter.safetensors").is_file()
    assert (tmp_path / "training_summary.json").is_file()
    assert evaluate_loss(model, episodes[:4], pad, "written") < evaluate_loss(model, episodes[:4], pad, "none")


@pytest.mark.parametrize("mode", ["TSW", "SSW", "MSW"])
def test_write_path_gets_gradients_through_the_state(episodes, smol_tokenizer, mode):
    from deltamem import attach_delta_mem

    model = attach_delta_mem(tiny(len(smol_tokenizer)), DeltaMemConfig(write_mode=mode))
    loss, _, _ = episode_forward(
        model, collate_episodes(episodes[:2], smol_tokenizer.eos_token_id), "written", TrainConfig()
    )
    loss.backward()
    layer = model.delta_mem.layers[0]
    for name in ("memory_k_proj", "memory_v_proj", "beta_proj"):
        assert getattr(layer, name).grad.abs().sum() > 0, (mode, name)


def test_kill_and_resume_gives_the_same_adapter(episodes, smol_tokenizer, tmp_path):
    from safetensors.torch import load_file

    pad = smol_tokenizer.eos_token_id
    cfg = small_cfg(steps=6, checkpoint_every=2, keep_checkpoints=2)
    train(tiny(len(smol_tokenizer)), episodes, pad, DeltaMemConfig(), cfg, tmp_path / "full", progress=False)
    partial = train(
        tiny(len(smol_tokenizer)), episodes, pad, DeltaMemConfig(), cfg, tmp_path / "cut", stop_after=3, progress=False
    )
    assert partial.summary == {"stopped_at": 3}
    ckpts = sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir())
    assert ckpts == ["step-000002"]  # the step-3 state was lost with the "kill"
    resumed = train(tiny(len(smol_tokenizer)), episodes, pad, DeltaMemConfig(), cfg, tmp_path / "cut", progress=False)
    assert resumed.summary["steps"] == 6
    a = load_file(str(tmp_path / "full" / "adapter" / "adapter.safetensors"))
    b = load_file(str(tmp_path / "cut" / "adapter" / "adapter.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    full_losses = [r["loss"] for r in json.loads((tmp_path / "full" / "training_summary.json").read_text())["history"]]
    assert [r["loss"] for r in resumed.history] == pytest.approx(full_losses, abs=0, rel=0)
    assert not (tmp_path / "cut" / "checkpoints").exists()  # removed once the adapter is saved


def test_checkpoints_of_other_settings_are_not_resumed(episodes, smol_tokenizer, tmp_path):
    pad = smol_tokenizer.eos_token_id
    cfg = small_cfg(steps=4, checkpoint_every=2)
    train(tiny(len(smol_tokenizer)), episodes, pad, DeltaMemConfig(), cfg, tmp_path, stop_after=2, progress=False)
    assert (tmp_path / "checkpoints" / "step-000002").is_dir()
    with pytest.warns(UserWarning, match="other settings"):
        r = train(
            tiny(len(smol_tokenizer)),
            episodes,
            pad,
            DeltaMemConfig(),
            small_cfg(steps=4, lr=1e-3),
            tmp_path,
            progress=False,
        )
    assert len(r.history) == 4  # started from step 0


def test_shuffled_control_reads_another_conversations_context():
    from pipeline.data.tokenize import PackedExample, WriteChunk
    from pipeline.train.trainer import shuffled_episodes

    def ep(name: str, ctx: list[int]) -> PackedExample:
        return PackedExample(name, [WriteChunk(ctx, [0] * len(ctx))], [1, 2], [-100, 2])

    # two questions about conversation A next to each other, then B: a batch rotation would give a1 A's state
    eps = [ep("a0", [5, 6]), ep("a1", [5, 6]), ep("b0", [7, 8, 9])]
    out = shuffled_episodes(eps)
    assert [o.example_id for o in out] == ["a0", "a1", "b0"]
    assert [o.write_chunks[0].input_ids for o in out] == [[7, 8, 9], [7, 8, 9], [5, 6]]
    assert [o.read_input_ids for o in out] == [e.read_input_ids for e in eps]
    with pytest.raises(ValueError, match="two different contexts"):
        shuffled_episodes([ep("a0", [5]), ep("a1", [5])])


def test_gradient_checkpointing_trains_the_same_adapter(episodes, smol_tokenizer, tmp_path):
    from safetensors.torch import load_file

    pad = smol_tokenizer.eos_token_id
    runs = {}
    for flag in (False, True):
        cfg = small_cfg(steps=3, gradient_checkpointing=flag)
        model = tiny(len(smol_tokenizer))
        result = train(model, episodes, pad, DeltaMemConfig(), cfg, tmp_path / str(flag), progress=False)
        assert model.delta_mem.gradient_checkpointing is flag
        runs[flag] = (load_file(str(tmp_path / str(flag) / "adapter" / "adapter.safetensors")), result.history)
    (a, ha), (b, hb) = runs[False], runs[True]
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
    assert [r["loss"] for r in hb] == pytest.approx([r["loss"] for r in ha], rel=1e-5)


@pytest.mark.parametrize("mode", ["TSW", "SSW"])
def test_objective_does_not_depend_on_how_the_global_batch_is_split(episodes, smol_tokenizer, tmp_path, mode):
    """float64: batch 4 × accum 1, 2 × 2 and 1 × 4 train the same adapter — the loss is a mean over episodes.

    A token-weighted CE per micro-batch, or the β term of a micro-batch's mean β, would make them differ:
    the episodes' answers and read segments have different lengths (checked)."""
    from deltamem import attach_delta_mem

    pad = smol_tokenizer.eos_token_id
    assert len({sum(1 for t in ep.read_labels if t != -100) for ep in episodes[:4]}) > 1
    assert len({len(ep.read_input_ids) for ep in episodes[:4]}) > 1
    config = DeltaMemConfig(write_mode=mode, memory_dtype="backbone")  # the memory in float64 too
    runs = {}
    for batch, accum in ((4, 1), (2, 2), (1, 4)):
        cfg = TrainConfig(
            steps=2, batch_size=batch, grad_accum=accum, lr=1e-2, warmup_ratio=0.0, checkpoint_every=0,
            beta_sparsity_weight=1.0,
        )  # fmt: skip
        model = attach_delta_mem(tiny(len(smol_tokenizer)), config).double()
        result = train(model, episodes, pad, config, cfg, tmp_path / f"{batch}x{accum}", progress=False)
        runs[batch, accum] = (result.history, {n: p.detach().clone() for n, p in model.delta_mem.named_parameters()})
    want_history, want = runs[4, 1]
    assert all(t.dtype == torch.float64 for t in want.values())
    for split in ((2, 2), (1, 4)):
        history, got = runs[split]
        for g, w in zip(history, want_history, strict=True):
            for key in ("loss", "answer_ce", "grad_norm"):
                assert g[key] == pytest.approx(w[key], rel=1e-12), (split, g["step"], key)
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-12, atol=1e-14, msg=f"{split} {name}")
