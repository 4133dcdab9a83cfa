"""A synthetic multi-session memory data set, small enough to learn on a CPU in minutes.

Each dialogue is a chat between two people over a few dated sessions. They mention facts about
themselves and their relatives (city, job, dog's name, favourite dish, hobby, degree), things they did
"today", and later sessions overwrite some facts ("I moved to Oslo"). Questions are asked after the
whole dialogue and need the earlier sessions:

* ``single-hop``: one fact stated once ("Which city does Maja live in?").
* ``multi-hop``: a relative introduced in one session, their fact stated in another
  ("What does Maja's cousin do for a living?").
* ``temporal``: something done "today" in a session; the answer is that session's date.
* ``knowledge-update``: a fact stated, then overwritten in a later session; the answer is the new
  value (the stale one is kept in ``metadata["stale_answer"]``).

Design for learnability by a small backbone with a tiny memory state: histories of a few hundred
tokens, single-word or short-phrase answers, one fixed question template per attribute. Design
against guessing: values are drawn uniformly from lists of 40–150 entries
(:mod:`pipeline.data.synthetic_vocab`), distinct within a dialogue (so the other speaker's city is a
confounder, not a second correct answer), and the answer text never occurs in the question (checked;
the value is redrawn otherwise). Extra facts that no question asks about (``distractor_facts``) and
small-talk turns (``distractor_turns`` per session) make the history noisier.

Splits use disjoint people: the name list is partitioned between the splits (70 % train, the rest
shared equally), so no person of a test dialogue ever appears in training. Everything is drawn from
``random.Random`` seeded by SHA-256 of ``(seed, split, dialogue index)``: the same configuration
gives byte-identical files on every machine.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import Any

from . import synthetic_vocab as vocab
from .schema import Example, Segment

NAME = "synthetic"
CATEGORIES = ("single-hop", "multi-hop", "temporal", "knowledge-update")
TRAIN_NAME_SHARE = 0.7
MAX_DRAWS = 50


@dataclass
class SyntheticConfig:
    """Knobs of the generator (the ``synthetic`` block of a dataset entry in params.yaml).

    Attributes:
        seed: master seed.
        dialogues: number of dialogues per split; each gives ``facts_per_dialogue`` examples.
        sessions: sessions per dialogue (knowledge updates need at least 2).
        facts_per_dialogue: facts that are asked about (= questions per dialogue).
        distractor_facts: further facts stated but never asked about.
        distractor_turns: small-talk turns per session.
        ack_prob: chance that the other speaker acknowledges a fact ("Oh, nice!").
        category_weights: relative frequency of the four question categories.
        relations: the attributes facts are drawn from (names of :data:`RELATIONS`: city, job, dog,
            dish, hobby, degree); None = all. One relation with few values gives a closed answer set.
        max_values: use only the first N values of each relation's list (None = all). With a small N
            (e.g. 8) the answer is one of N known words: a no-memory model can at best learn the prior
            (CE ≈ ln N on the answer's first token), so any gain beyond that is recall from the
            memory. The embedded backbone learns such closed-set recall in CPU minutes; the full
            40–150-value lists need far more episodes than a CPU run can afford.
    """

    seed: int = 0
    dialogues: dict[str, int] = field(default_factory=lambda: {"train": 1000, "validation": 100, "test": 100})
    sessions: int = 3
    facts_per_dialogue: int = 4
    distractor_facts: int = 2
    distractor_turns: int = 2
    ack_prob: float = 0.5
    category_weights: dict[str, float] = field(default_factory=lambda: dict.fromkeys(CATEGORIES, 1.0))
    relations: list[str] | None = None
    max_values: int | None = None

    def validate(self) -> None:
        """Raise ``ValueError`` for settings the generator cannot honour."""
        if self.sessions < 1:
            raise ValueError("sessions must be >= 1")
        if not 1 <= self.facts_per_dialogue <= 8:
            raise ValueError("facts_per_dialogue must be between 1 and 8")
        if not 0 <= self.distractor_facts <= 6:
            raise ValueError("distractor_facts must be between 0 and 6")
        if self.distractor_turns < 0 or self.distractor_turns > len(vocab.FILLERS):
            raise ValueError(f"distractor_turns must be between 0 and {len(vocab.FILLERS)}")
        if not 0.0 <= self.ack_prob <= 1.0:
            raise ValueError("ack_prob must be in [0, 1]")
        unknown = set(self.category_weights) - set(CATEGORIES)
        if unknown:
            raise ValueError(f"unknown categories {sorted(unknown)}; known: {', '.join(CATEGORIES)}")
        if any(w < 0 for w in self.category_weights.values()) or sum(self.category_weights.values()) <= 0:
            raise ValueError("category_weights must be >= 0 with a positive sum")
        if any(n < 0 for n in self.dialogues.values()):
            raise ValueError("dialogue counts must be >= 0")
        if self.relations is not None:
            known = [r.name for r in RELATIONS]
            bad = [r for r in self.relations if r not in known]
            if bad or not self.relations:
                raise ValueError(f"relations must be a non-empty subset of {', '.join(known)}; got {self.relations}")
        need = 2 * self.facts_per_dialogue + self.distractor_facts + 1
        if self.max_values is not None and self.max_values < need:
            # values are distinct within a dialogue: a knowledge update takes two, any other fact one
            raise ValueError(f"max_values must be >= 2 * facts_per_dialogue + distractor_facts + 1 = {need}")


@dataclass(frozen=True)
class Relation:
    """An attribute a person can have, with the sentences that state and ask it."""

    name: str
    values: tuple[str, ...]
    first_person: tuple[str, ...]
    third_person: tuple[str, ...]
    update: tuple[str, ...]
    question: str


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


RELATIONS: tuple[Relation, ...] = (
    Relation(
        "city",
        tuple(vocab.CITIES),
        ("I live in {v}.", "These days I live in {v}.", "My flat is in {v}."),
        ("{x} lives in {v}.", "{x} has been living in {v} for a while."),
        ("Big news: I moved to {v} last week!", "I've just relocated to {v}."),
        "Which city does {who} live in?",
    ),
    Relation(
        "job",
        tuple(vocab.JOBS),
        ("I work as {a} {v}.", "I'm {a} {v} by profession."),
        ("{x} works as {a} {v}.", "{x} got a job as {a} {v}."),
        ("I changed careers, I'm {a} {v} now.", "I quit my old job and now work as {a} {v}."),
        "What does {who} do for a living?",
    ),
    Relation(
        "dog",
        tuple(vocab.PET_NAMES),
        ("My dog is called {v}.", "I have a dog named {v}."),
        ("{x} has a dog called {v}.", "{x}'s dog is named {v}."),
        ("We adopted a new dog, he's called {v}.", "My new dog is named {v}."),
        "What is the name of {whose} dog?",
    ),
    Relation(
        "dish",
        tuple(vocab.FOODS),
        ("My favourite dish is {v}.", "Nothing beats {v}, it's my favourite dish."),
        ("{x}'s favourite dish is {v}.", "{x} loves {v} more than any other dish."),
        ("My taste has changed, my favourite dish is now {v}.", "These days my favourite dish is {v}."),
        "What is {whose} favourite dish?",
    ),
    Relation(
        "hobby",
        tuple(vocab.HOBBIES),
        ("My main hobby is {v}.", "In my free time I mostly do {v}."),
        ("{x}'s main hobby is {v}.", "{x} spends every weekend on {v}."),
        ("I've got a new main hobby: {v}.", "I gave up my old hobby, now it's {v}."),
        "What is {whose} main hobby?",
    ),
    Relation(
        "degree",
        tuple(vocab.SUBJECTS),
        ("I studied {v} at university.", "My degree is in {v}."),
        ("{x} studied {v} at university.", "{x} has a degree in {v}."),
        (),  # a degree does not change
        "What did {who} study at university?",
    ),
)
UPDATABLE = tuple(r for r in RELATIONS if r.update)


def active_relations(cfg: SyntheticConfig) -> tuple[Relation, ...]:
    """:data:`RELATIONS` restricted by ``cfg.relations`` and ``cfg.max_values`` (the same objects by default)."""
    if cfg.relations is None and cfg.max_values is None:
        return RELATIONS
    chosen = RELATIONS if cfg.relations is None else tuple(r for r in RELATIONS if r.name in cfg.relations)
    if cfg.max_values is None:
        return chosen
    return tuple(
        Relation(r.name, r.values[: cfg.max_values], r.first_person, r.third_person, r.update, r.question)
        for r in chosen
    )


LINK_TEMPLATES = ("My {rel} is called {x}.", "By the way, my {rel}'s name is {x}.")
EVENT_TEMPLATES = ("Guess what, I {past} today!", "Today I finally {past}.")
TEMPORAL_QUESTION = "When did {who} {base}?"


def _rng(*parts: Any) -> random.Random:
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def ordered_splits(splits: Iterable[str]) -> list[str]:
    """``train``, ``validation``, ``test`` first, then other names alphabetically (independent of input order)."""
    rank = {"train": 0, "validation": 1, "test": 2}
    return sorted(set(splits), key=lambda s: (rank.get(s, 3), s))


def name_pools(seed: int, splits: Iterable[str]) -> dict[str, list[str]]:
    """Partition the name list between ``splits`` (train gets 70 %, the rest share equally).

    The partition depends on the set of split names only, not on their order.
    """
    splits = ordered_splits(splits)
    names = sorted(vocab.NAMES)
    _rng("names", seed).shuffle(names)
    if len(splits) == 1:
        return {splits[0]: names}
    shares: dict[str, float] = {}
    others = [s for s in splits if s != "train"]
    if "train" in splits:
        shares["train"] = TRAIN_NAME_SHARE
        for s in others:
            shares[s] = (1 - TRAIN_NAME_SHARE) / len(others)
    else:
        shares = {s: 1 / len(splits) for s in splits}
    pools: dict[str, list[str]] = {}
    start = 0
    for i, split in enumerate(splits):
        end = len(names) if i == len(splits) - 1 else start + round(shares[split] * len(names))
        pools[split] = names[start:end]
        start = end
    for split, pool in pools.items():
        if len(pool) < 12:
            raise ValueError(f"split {split!r} gets only {len(pool)} names; use fewer splits")
    return pools


def format_date(d: date) -> str:
    """``date(2023, 5, 8)`` → ``"8 May 2023"`` (the session timestamps and temporal answers)."""
    return f"{d.day} {vocab.MONTHS[d.month - 1]} {d.year}"


@dataclass
class _Turn:
    speaker: str
    text: str
    key: int | None = None  # statement id, for evidence and ordering constraints


class _Dialogue:
    """Builds one dialogue and its questions; see the module doc for the categories."""

    def __init__(self, cfg: SyntheticConfig, split: str, index: int, pool: list[str]) -> None:
        self.cfg = cfg
        self.split = split
        self.index = index
        self.rng = _rng("dialogue", cfg.seed, split, index)
        self.free_names = list(pool)
        self.rng.shuffle(self.free_names)
        self.speakers = [self.free_names.pop(), self.free_names.pop()]
        start = date(2019, 1, 1) + timedelta(days=self.rng.randrange(6 * 365))
        self.dates = [start]
        for _ in range(cfg.sessions - 1):
            self.dates.append(self.dates[-1] + timedelta(days=self.rng.randint(3, 45)))
        self.statements: list[list[_Turn]] = [[] for _ in range(cfg.sessions)]
        self.after: list[tuple[int, int]] = []  # (earlier key, later key) within one session
        self.n_keys = 0
        self.relations = active_relations(cfg)
        self.updatable = tuple(r for r in self.relations if r.update)
        self.used_values: dict[str, set[str]] = {r.name: set() for r in RELATIONS}
        self.used_facts: set[tuple[str, str]] = set()  # (subject, relation)
        self.used_links: set[tuple[str, str]] = set()  # (speaker, relative)
        self.used_events: set[str] = set()
        self.questions: list[dict[str, Any]] = []

    # -- statements --------------------------------------------------------------------------
    def _say(self, session: int, speaker: str, text: str) -> int:
        key = self.n_keys
        self.n_keys += 1
        self.statements[session].append(_Turn(speaker, text, key))
        return key

    def _value(self, relation: Relation, question: str | None = None) -> str:
        """A value not yet used in this dialogue for ``relation`` and not contained in ``question``."""
        for _ in range(MAX_DRAWS):
            v = self.rng.choice(relation.values)
            if v in self.used_values[relation.name]:
                continue
            if question is not None and v.lower() in question.lower():
                continue
            self.used_values[relation.name].add(v)
            return v
        # only reached with a short value list (``max_values``): pick among the values still free
        fresh = [
            v
            for v in relation.values
            if v not in self.used_values[relation.name] and (question is None or v.lower() not in question.lower())
        ]
        if fresh:
            v = self.rng.choice(fresh)
            self.used_values[relation.name].add(v)
            return v
        # validate() leaves enough values, so this is not reached
        raise RuntimeError(f"could not draw a fresh {relation.name}")  # pragma: no cover

    def _fill(self, template: str, v: str, x: str | None = None) -> str:
        return template.format(v=v, a=_article(v), x=x)

    def _free_relation(self, subject: str, relations: tuple[Relation, ...]) -> Relation | None:
        free = [r for r in relations if (subject, r.name) not in self.used_facts]
        return self.rng.choice(free) if free else None

    # -- question builders (return False when infeasible) ---------------------------------------
    def single_hop(self, ask: bool = True) -> bool:
        """A first-person fact stated once."""
        speaker = self.rng.choice(self.speakers)
        relation = self._free_relation(speaker, self.relations)
        if relation is None:
            return False
        self.used_facts.add((speaker, relation.name))
        question = relation.question.format(who=speaker, whose=f"{speaker}'s")
        value = self._value(relation, question)
        session = self.rng.randrange(self.cfg.sessions)
        key = self._say(session, speaker, self._fill(self.rng.choice(relation.first_person), value))
        if ask:
            self.questions.append(
                {
                    "category": "single-hop",
                    "question": question,
                    "answer": value,
                    "evidence": [key],
                    "subject": speaker,
                    "relation": relation.name,
                }
            )
        return True

    def multi_hop(self, ask: bool = True) -> bool:
        """A relative introduced by name in one session; their fact stated in the same or a later one."""
        speaker = self.rng.choice(self.speakers)
        relatives = [r for r in vocab.RELATIVES if (speaker, r) not in self.used_links]
        if not relatives or not self.free_names:
            return False
        relative = self.rng.choice(relatives)
        person = self.free_names.pop()
        relation = self._free_relation(person, self.relations)
        assert relation is not None  # a fresh person has no facts yet
        self.used_links.add((speaker, relative))
        self.used_facts.add((person, relation.name))
        who = f"{speaker}'s {relative}"
        question = relation.question.format(who=who, whose=f"{who}'s")
        value = self._value(relation, question)
        s1 = self.rng.randrange(self.cfg.sessions)
        s2 = self.rng.randrange(s1, self.cfg.sessions)
        k1 = self._say(s1, speaker, self.rng.choice(LINK_TEMPLATES).format(rel=relative, x=person))
        k2 = self._say(s2, speaker, self._fill(self.rng.choice(relation.third_person), value, person))
        if s1 == s2:
            self.after.append((k1, k2))
        if ask:
            self.questions.append(
                {
                    "category": "multi-hop",
                    "question": question,
                    "answer": value,
                    "evidence": [k1, k2],
                    "subject": who,
                    "relation": relation.name,
                    "bridge_entity": person,
                }
            )
        return True

    def temporal(self, ask: bool = True) -> bool:
        """Something done "today" in a session; the answer is the session's date."""
        events = [e for e in vocab.EVENTS if e[1] not in self.used_events]
        if not events:
            return False
        past, base = self.rng.choice(events)
        self.used_events.add(base)
        speaker = self.rng.choice(self.speakers)
        session = self.rng.randrange(self.cfg.sessions)
        key = self._say(session, speaker, self.rng.choice(EVENT_TEMPLATES).format(past=past))
        if ask:
            self.questions.append(
                {
                    "category": "temporal",
                    "question": TEMPORAL_QUESTION.format(who=speaker, base=base),
                    "answer": format_date(self.dates[session]),
                    "evidence": [key],
                    "subject": speaker,
                    "relation": "event",
                }
            )
        return True

    def knowledge_update(self, ask: bool = True) -> bool:
        """A fact stated, then overwritten in a later session (needs 2+ sessions)."""
        if self.cfg.sessions < 2:
            return False
        speaker = self.rng.choice(self.speakers)
        relation = self._free_relation(speaker, self.updatable)
        if relation is None:
            return False
        self.used_facts.add((speaker, relation.name))
        question = relation.question.format(who=speaker, whose=f"{speaker}'s")
        old = self._value(relation, question)
        new = self._value(relation, question)
        s1 = self.rng.randrange(self.cfg.sessions - 1)
        s2 = self.rng.randrange(s1 + 1, self.cfg.sessions)
        k1 = self._say(s1, speaker, self._fill(self.rng.choice(relation.first_person), old))
        k2 = self._say(s2, speaker, self._fill(self.rng.choice(relation.update), new))
        if ask:
            self.questions.append(
                {
                    "category": "knowledge-update",
                    "question": question,
                    "answer": new,
                    "evidence": [k1, k2],
                    "subject": speaker,
                    "relation": relation.name,
                    "stale_answer": old,
                }
            )
        return True

    # -- assembly ------------------------------------------------------------------------------
    def build(self) -> list[Example]:
        cfg = self.cfg
        builders = {
            "single-hop": self.single_hop,
            "multi-hop": self.multi_hop,
            "temporal": self.temporal,
            "knowledge-update": self.knowledge_update,
        }
        cats = [c for c in CATEGORIES if cfg.category_weights.get(c, 0) > 0]
        weights = [cfg.category_weights[c] for c in cats]
        for _ in range(cfg.facts_per_dialogue):
            cat = self.rng.choices(cats, weights)[0]
            if not builders[cat]():
                self.single_hop()
        for _ in range(cfg.distractor_facts):
            kind = self.rng.choice(("single-hop", "multi-hop", "temporal"))
            builders[kind](ask=False) or self.single_hop(ask=False)

        segments: list[Segment] = []
        where: dict[int, str] = {}
        for s in range(cfg.sessions):
            turns = list(self.statements[s])
            for filler in self.rng.sample(vocab.FILLERS, cfg.distractor_turns):
                turns.append(_Turn(self.rng.choice(self.speakers), filler))
            self.rng.shuffle(turns)
            position = {t.key: i for i, t in enumerate(turns) if t.key is not None}
            for k1, k2 in self.after:  # keep "my cousin is X" before "X lives in Y"
                if k1 in position and k2 in position and position[k1] > position[k2]:
                    i, j = position[k1], position[k2]
                    turns[i], turns[j] = turns[j], turns[i]
                    position[k1], position[k2] = j, i
            timeline: list[_Turn] = []
            for turn in turns:
                timeline.append(turn)
                if turn.key is not None and self.rng.random() < cfg.ack_prob:
                    other = self.speakers[1] if turn.speaker == self.speakers[0] else self.speakers[0]
                    timeline.append(_Turn(other, self.rng.choice(vocab.ACKS)))
            for t_index, turn in enumerate(timeline):
                seg_id = f"D{s + 1}:{t_index + 1}"
                if turn.key is not None:
                    where[turn.key] = seg_id
                segments.append(
                    Segment(
                        text=turn.text,
                        role="user",
                        speaker=turn.speaker,
                        timestamp=format_date(self.dates[s]),
                        session=f"Session {s + 1}",
                        segment_id=seg_id,
                    )
                )

        conversation_id = f"{NAME}-{self.split}-{self.index:05d}"
        examples = []
        for q_index, q in enumerate(self.questions):
            answer = q["answer"]
            assert answer.lower() not in q["question"].lower(), (answer, q["question"])
            metadata: dict[str, Any] = {
                "conversation_id": conversation_id,
                "dialogue_index": self.index,
                "speakers": list(self.speakers),
                "evidence": [where[k] for k in q["evidence"]],
                "subject": q["subject"],
                "relation": q["relation"],
            }
            for extra in ("stale_answer", "bridge_entity"):
                if extra in q:
                    metadata[extra] = q[extra]
            examples.append(
                Example(
                    example_id=f"{conversation_id}-q{q_index}",
                    task=NAME,
                    question=q["question"],
                    answers=[answer],
                    segments=segments,
                    category=q["category"],
                    metadata=metadata,
                )
            )
        return examples


def generate_split(cfg: SyntheticConfig, split: str) -> list[Example]:
    """All examples of one split (``cfg.dialogues[split]`` dialogues × ``facts_per_dialogue``)."""
    cfg.validate()
    if split not in cfg.dialogues:
        raise ValueError(f"no dialogue count for split {split!r}; configured: {', '.join(cfg.dialogues)}")
    pool = name_pools(cfg.seed, cfg.dialogues)[split]
    out: list[Example] = []
    for index in range(cfg.dialogues[split]):
        out.extend(_Dialogue(cfg, split, index, pool).build())
    return out


def config_from_options(options: dict[str, Any]) -> SyntheticConfig:
    """A :class:`SyntheticConfig` from a plain dict (unknown keys are an error)."""
    known = set(SyntheticConfig.__dataclass_fields__)
    unknown = set(options) - known
    if unknown:
        raise ValueError(f"unknown synthetic settings {sorted(unknown)}; known: {', '.join(sorted(known))}")
    cfg = SyntheticConfig(**options)
    cfg.validate()
    return cfg
