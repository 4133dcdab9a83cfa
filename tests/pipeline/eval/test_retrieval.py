"""BM25 retrieval over history segments: ranking, ties, tiny and empty histories."""

from __future__ import annotations

from pipeline.data.schema import Example, Segment
from pipeline.eval.retrieval import BM25Retriever, retrieve_segments, segment_document, tokenize
from pipeline.eval.tasks import get_task


def _turns(*texts: str) -> list[Segment]:
    return [
        Segment(text=t, speaker="Ana" if i % 2 == 0 else "Bo", segment_id=f"D1:{i + 1}") for i, t in enumerate(texts)
    ]


def test_tokenize_lowercases_stems_and_drops_stop_words():
    assert tokenize("What are the Dogs RUNNING to?") == ["dog", "run"]
    assert tokenize("") == []


def test_best_segment_first():
    segs = _turns(
        "I love hiking in the mountains.",
        "My dog is called Rex.",
        "We moved to Oslo last year.",
        "Rex loves long walks, like my other dogs.",
    )
    r = BM25Retriever(segs)
    assert r.top_k("What is the name of the dog?", 2) == [1, 3]
    assert r.top_k("Which city did they move to?", 1) == [2]
    assert len(r.scores("dog")) == 4


def test_ties_break_by_position_and_k_is_capped():
    segs = _turns("apple pie", "apple pie", "banana", "apple pie")
    r = BM25Retriever(segs)
    assert r.top_k("apple", 3) == [0, 1, 3]
    assert r.top_k("apple", 10) == [0, 1, 3, 2]
    assert r.top_k("zebra", 2) == [0, 1]  # no term in common: first segments, deterministically
    assert r.top_k("the", 2) == [0, 1]  # only stop words
    assert r.top_k("apple", 0) == []


def test_tiny_and_empty_histories():
    assert BM25Retriever([]).top_k("anything", 5) == []
    assert BM25Retriever([]).scores("anything") == []
    one = BM25Retriever(_turns("I live in Oslo."))
    assert one.top_k("Oslo?", 3) == [0]
    two = BM25Retriever(_turns("I live in Oslo.", "My dog is Rex."))
    assert two.top_k("Where does she live, Oslo?", 2) == [0, 1]
    assert two.top_k("dog", 1) == [1]  # a term in half the documents still ranks its segment first
    empty_text = BM25Retriever([Segment(text=""), Segment(text="Oslo")])
    assert empty_text.top_k("oslo", 1) == [1]


def test_documents_use_speaker_or_title():
    assert segment_document(Segment(text="hi", speaker="Ana", session="Session 1")) == "Ana hi"
    assert segment_document(Segment(text="A city.", session="Oslo")) == "Oslo A city."
    assert segment_document(Segment(text="plain")) == "plain"


def test_retrieve_segments_keeps_original_order_for_the_prompt():
    segs = [
        Segment(text="The capital of Norway.", session="Oslo"),
        Segment(text="A river in England.", session="Thames"),
        Segment(text="A city on the Oslofjord with many museums.", session="Oslo museums"),
    ]
    ex = Example(example_id="h-1", task="hotpotqa", question="Which museums are in Oslo?", answers=["x"], segments=segs)
    picked = retrieve_segments(ex, 2)
    assert picked == [segs[0], segs[2]]  # chronological / document order, not score order
    context = get_task("hotpotqa").render_context(ex, picked)
    assert context == "Oslo: The capital of Norway.\nOslo museums: A city on the Oslofjord with many museums."
