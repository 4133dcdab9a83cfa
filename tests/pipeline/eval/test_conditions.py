"""Conditions, prompts and params of the evaluation runner (no model), and SSW writing online on a tiny model."""

from __future__ import annotations

import pytest

from pipeline.data.synthetic import config_from_options, generate_split
from pipeline.eval.conditions import CONDITIONS, DEFAULT_CONDITIONS, PromptBuilder, get_condition, unsupported_reason
from pipeline.eval.runner import EvalParams, donor_map, group_conversations
from pipeline.eval.tasks import get_task
from pipeline.params import ParamsError, load_section


@pytest.fixture(scope="module")
def examples():
    cfg = config_from_options({"seed": 3, "dialogues": {"test": 3}, "sessions": 2, "facts_per_dialogue": 3})
    return generate_split(cfg, "test")


def words(text: str) -> int:
    return len(text.split())


def builder(name: str, window: int = 10_000, k: int = 2) -> PromptBuilder:
    def prompt_words(messages) -> int:
        return sum(words(m["content"]) for m in messages)

    return PromptBuilder(get_task("synthetic"), get_condition(name), words, prompt_words, window, 5, k)


def test_the_six_conditions():
    assert set(DEFAULT_CONDITIONS) == {
        "base_no_context",
        "base_full_context",
        "rag_bm25",
        "deltamem_only",
        "deltamem_full_context",
        "deltamem_shuffled",
    }
    assert [c for c, v in CONDITIONS.items() if v.uses_adapter] == [
        "deltamem_only",
        "deltamem_full_context",
        "deltamem_shuffled",
    ]
    for name in CONDITIONS:  # every condition runs with every write mode (SSW writes online per message)
        for mode in ("TSW", "SSW", "MSW"):
            assert unsupported_reason(CONDITIONS[name], mode) is None, (name, mode)
    # SSW writing online reads and writes each prompt in one call: no shared-prefix prefill
    full = CONDITIONS["deltamem_full_context"]
    assert not full.prefills_shared_prefix("SSW")
    assert full.prefills_shared_prefix("TSW") and full.prefills_shared_prefix("MSW")
    assert CONDITIONS["base_full_context"].prefills_shared_prefix(None)
    with pytest.raises(KeyError, match="known conditions"):
        get_condition("nope")


def test_prompts_differ_only_in_where_the_history_is(examples):
    task = get_task("synthetic")
    key, convo = group_conversations(examples)[0]
    assert len(convo) == 3
    question = builder("base_no_context").conversation_messages(key, convo, 32)
    assert question == [task.question_messages(e) for e in convo]
    assert builder("deltamem_only").conversation_messages(key, convo, 32) == question
    full = builder("base_full_context").conversation_messages(key, convo, 32)
    assert full == [task.context_messages(e) for e in convo]  # fits: the whole history
    for msgs, e in zip(full, convo, strict=True):
        assert msgs[-1]["content"].endswith(e.question)
    rag = builder("rag_bm25", k=2).conversation_messages(key, convo, 32)
    for msgs, e in zip(rag, convo, strict=True):
        context = msgs[-1]["content"]
        kept = [s for s in e.segments if s.text in context]
        assert 1 <= len(kept) <= 2


def test_full_context_is_left_truncated_to_the_window_and_shared_by_the_conversation(examples):
    key, convo = group_conversations(examples)[0]
    b = builder("base_full_context", window=120)
    msgs = b.conversation_messages(key, convo, 20)
    contexts = {m[-1]["content"].split("\n\n")[1] for m in msgs}
    assert len(contexts) == 1  # one truncated history for every question of the conversation
    assert b.truncated[key]
    for m in msgs:
        assert sum(words(x["content"]) for x in m) <= 120 - 20 - 5
    last = convo[0].segments[-1].text
    assert last in msgs[0][-1]["content"]  # the newest turns are kept


def test_donors_are_other_conversations(examples):
    donors = donor_map(examples)
    keys = [k for k, _ in group_conversations(examples)]
    assert sorted(donors) == sorted(keys)
    assert all(donors[k] != k for k in keys)
    assert sorted(donors.values()) == sorted(keys)
    assert donor_map(examples[:3]) == {}  # one conversation: no donor


def test_params_section(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("evaluate:\n  conditions: [deltamem_only, rag_bm25]\n  ray: {actor_num_cpus: 2}\n")
    p = load_section(path, "evaluate")
    assert isinstance(p, EvalParams) and p.conditions == ["deltamem_only", "rag_bm25"]
    assert p.ray.actor_num_cpus == 2 and p.workers == 2 and p.tasks[0].dataset == "synthetic"
    for bad, match in (
        ("conditions: [full]", "unknown condition"),
        ("variants: [base]", "reserved"),
        ("decoding: beam", "decoding"),
        ("tasks: [{dataset: a}, {dataset: a}]", "same folder"),
        ("workerz: 2", "workerz"),
    ):
        path.write_text(f"evaluate:\n  {bad}\n")
        with pytest.raises(ParamsError, match=match):
            load_section(path, "evaluate")


def test_each_condition_hashes_exactly_the_settings_that_can_change_its_predictions():
    """The shard hash of a condition covers these PredictionSettings fields and no others (so e.g. a new
    ``bm25_k`` recomputes only ``rag_bm25``); the lists are the ones the hashes of stored results used."""
    from dataclasses import fields

    from pipeline.eval.plan import PredictionSettings

    common = {"decoding", "max_new_tokens_cap", "batch_size", "dtype"}
    write = {"write_batch_size", "write_length", "reuse_state"}
    window = {"context_window", "context_reserve"}
    prefix = {"prefix_cache", "prefix_min_tokens"}
    expected = {
        "base_no_context": common,
        "base_full_context": common | window | prefix,
        "rag_bm25": common | window | {"bm25_k"},
        "deltamem_only": common | write,
        "deltamem_full_context": common | window | prefix,
        "deltamem_shuffled": common | write,
    }
    settings = PredictionSettings.from_params(EvalParams(bm25_k=7, write_length=99))
    assert {f.name for f in fields(PredictionSettings)} == set().union(*expected.values())
    for name, keys in expected.items():
        hashed = settings.hashed(get_condition(name))
        assert set(hashed) == keys, name
        assert all(hashed[k] == getattr(settings, k) for k in keys)
    assert settings.hashed(get_condition("rag_bm25"))["bm25_k"] == 7


def test_where_each_condition_takes_its_memory_from():
    donors = {"c1": "c2", "c2": "c1"}
    assert get_condition("deltamem_only").memory_source("c1", donors) == "c1"
    assert get_condition("deltamem_shuffled").memory_source("c1", donors) == "c2"
    for name in ("base_no_context", "base_full_context", "rag_bm25", "deltamem_full_context"):
        assert get_condition(name).memory_source("c1", donors) is None
    assert [n for n in CONDITIONS if get_condition(n).needs_donors] == ["deltamem_shuffled"]
    assert [n for n in CONDITIONS if get_condition(n).writes_online] == ["deltamem_full_context"]
    assert [n for n in CONDITIONS if get_condition(n).shares_history_prefix] == [
        "base_full_context",
        "deltamem_full_context",
    ]


def test_ssw_full_context_writes_each_prompt_message_then_each_generated_token(eval_root, worker, tmp_path):
    """SSW × deltamem_full_context as the reference implementation runs it: a fresh state per question; the
    prompt (system + user turn with history and question) read and written in one call, one write per
    non-system message from the mean of its tokens (system prompt and generation prompt not written), every
    prompt token reading the empty state; then each generated token fed back is written on its own. The
    batched backend path equals that loop written out plainly, token by token, for each question alone."""
    import torch

    from deltamem.attach import cache_kwarg
    from pipeline.data.schema import read_split
    from pipeline.eval.plan import PredictionSettings

    from .conftest import make_params

    worker.use_adapter(str(eval_root / "models" / "SSW" / "adapter"))
    model, fmt = worker.model, worker.fmt
    assert model.delta_mem.config.write_mode == "SSW"
    cond, task = get_condition("deltamem_full_context"), get_task("synthetic")
    groups = group_conversations(read_split(eval_root / "data" / "prepared" / "synthetic" / "test.jsonl"))[:2]
    settings = PredictionSettings.from_params(make_params(tmp_path, max_new_tokens_cap=5))
    window = worker.max_positions
    reqs = cond.build_requests(task, groups, settings, worker, window, {}).requests
    assert len(reqs) == 4 and len({len(r.prompt_ids) for r in reqs}) > 1  # left padding is exercised
    decoding = reqs[0].decoding
    assert all(r.decoding == decoding for r in reqs) and not decoding.do_sample

    # the prompts' messages, and their segments computed here the plain way: system → −1, the user turn → 0,
    # the generation prompt → −1
    builder = cond.prompt_builder(task, worker.count_tokens, lambda m: len(worker.prompt_ids(m)), window, 50, 10)
    messages = [m for key, exs in groups for m in builder.conversation_messages(key, exs, decoding.max_new_tokens)]
    for r, msgs in zip(reqs, messages, strict=True):
        assert [m["role"] for m in msgs] == ["system", "user"] and r.prompt_ids == worker.prompt_ids(msgs)
        n_sys = len(fmt.encode(fmt.render(msgs[:1])))
        n_user = len(fmt.encode(fmt.render(msgs)))
        assert r.segment_ids == [-1] * n_sys + [0] * (n_user - n_sys) + [-1] * (len(r.prompt_ids) - n_user)

    # the backend: one left-padded batch, the prompt by segments, decoding by tokens
    state = model.new_memory(len(reqs))
    got = worker.generate(
        [r.prompt_ids for r in reqs], decoding, state, write=True, segment_ids=[r.segment_ids for r in reqs]
    )

    eos = worker.tokenizer.eos_token_id
    for i, r in enumerate(reqs):
        ref = model.new_memory(1)
        with torch.no_grad():
            out = model(
                input_ids=torch.tensor([r.prompt_ids]),
                memory=ref,
                memory_write=True,
                segment_ids=torch.tensor([r.segment_ids]),
                use_cache=True,
            )
            tokens: list[int] = []
            while True:
                tok = int(out.logits[0, -1].argmax())
                tokens.append(tok)
                if tok == eos or len(tokens) == decoding.max_new_tokens:
                    break  # the last token is never fed back (nor written)
                out = model(
                    input_ids=torch.tensor([[tok]]),
                    **{cache_kwarg(model): out.past_key_values},
                    memory=ref,
                    memory_write=True,
                    use_cache=True,
                )
        assert got[i] == (worker.tokenizer.decode(tokens, skip_special_tokens=True), len(tokens)), i
        row = state.select(i)
        for layer, s in ref.layers.items():
            torch.testing.assert_close(row.layers[layer], s, rtol=1e-4, atol=1e-5)
        assert all(float(s.abs().max()) > 0 for s in ref.layers.values())  # it wrote (no-write: all zero)

        # the message segments matter: writing the prompt token by token gives another state
        tokenwise = model.new_memory(1)
        worker.generate([r.prompt_ids], decoding, tokenwise, write=True)
        assert any(not torch.allclose(tokenwise.layers[k], s, atol=1e-4) for k, s in ref.layers.items()), (
            "segment writes equal token writes"
        )
