"""GLUE-shaped tasks of the synthetic language, labels known by construction (SPEC §7).

One task per GLUE metric type, rows in the format of `nyu-mll/glue` so that
the evaluation code reads them exactly like GLUE:

| task | like | fields | label | metric |
|---|---|---|---|---|
| syn_cola | cola | sentence | 1 acceptable / 0 corrupted | Matthews corr. |
| syn_topic | sst2 | sentence | document topic (num_topics classes) | accuracy |
| syn_para | mrpc | sentence1, sentence2 | 1 same proposition / 0 near miss | F1 + accuracy |
| syn_nli | rte | sentence1, sentence2 | 0 entailment / 1 not_entailment | accuracy |
| syn_sts | stsb | sentence1, sentence2 | shared proposition parts, 0-5 | Pearson + Spearman |

Examples come from held-out documents: task document ids start at
TASK_DOCUMENT_OFFSET, far above the pretraining corpus's ids, and every
(task, split) has its own id range. Every label is verified against the
grammar's parser (`SyntheticLanguage.parse`) before a row is kept: a
corrupted sentence has no parse; a near-miss paraphrase has no reading in
common with its partner; a non-entailed hypothesis is covered by no reading
of its premise.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from raykd.data.synthetic import (
    DEFAULT_NUM_WORDS, DETERMINERS, PREPOSITIONS, Clause, NounPhrase, PrepPhrase, Relative, Sentence, SyntheticLanguage)
from raykd.io import atomic_write_text

TASK_DOCUMENT_OFFSET = 2 * 10 ** 12  # pretraining uses ids below 10**12, its validation 10**12..
DOCUMENTS_PER_SPLIT = 10 ** 9
SPLITS = ("train", "validation")


@dataclass(frozen=True)
class TaskSpec:
    """What the evaluation code needs to know about a task."""

    glue_analog: str
    text_fields: tuple[str, ...]
    num_labels: int  # 1 = regression
    metric: str


TASKS = {
    "syn_cola": TaskSpec("cola", ("sentence",), 2, "matthews_correlation"),
    "syn_topic": TaskSpec("sst2", ("sentence",), 8, "accuracy"),
    "syn_para": TaskSpec("mrpc", ("sentence1", "sentence2"), 2, "f1_accuracy"),
    "syn_nli": TaskSpec("rte", ("sentence1", "sentence2"), 2, "accuracy"),
    "syn_sts": TaskSpec("stsb", ("sentence1", "sentence2"), 1, "pearson_spearman"),
}

# syn_cola corruptions and their shares; each is kept only if the parser rejects it. Word order is
# what a small student learns from the pretraining text first: with these shares, three 2 x 64
# students past their drop in loss scored MCC 7.6, 5.8 and 7.0 against random inits' 3.2, 0 and 4.1
# (1000 dev rows); with agreement alone, which needs structure across a phrase, students sat at
# chance (issue 11). "category" puts a word of another part of speech in a content word's place:
# spotting it needs the category of every word of the lexicon, which text teaches and a few hundred
# labelled rows cannot.
CORRUPTIONS = (("agreement", 0.1), ("word_order", 0.75), ("category", 0.15))
# Part of the tasks' cache key: a change to how rows are drawn is a new set of tasks.
TASKS_VERSION = 2


def task_document_range(task: str, split: str) -> range:
    """The held-out document ids that a task split draws from."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {sorted(TASKS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {SPLITS}")
    start = TASK_DOCUMENT_OFFSET + (list(TASKS).index(task) * len(SPLITS) + SPLITS.index(split)) * DOCUMENTS_PER_SPLIT
    return range(start, start + DOCUMENTS_PER_SPLIT)


# ----- structure helpers -----------------------------------------------------------------


def relative_propositions(clause: Clause) -> list[Clause]:
    """Clauses stated by the relative clauses on the subject and object:
    "the dog that sees the bird runs" states "the dog sees the bird"."""
    out = []
    for np in (clause.subject, clause.object):
        if np is not None and isinstance(np.modifier, Relative):
            rel, head = np.modifier, np._replace(modifier=None)
            out.append(Clause(head, rel.verb, rel.object) if rel.subject is None else Clause(rel.subject, rel.verb, head))
    return out


def _np_covers(p: NounPhrase | None, h: NounPhrase | None) -> bool:
    """h says no more than p about the same referent (upward-monotone determiners)."""
    if p is None or h is None:
        return p is h
    if (p.det, p.noun, p.plural) != (h.det, h.noun, h.plural) or not set(h.adjectives) <= set(p.adjectives):
        return False
    if h.modifier is None:
        return True
    if isinstance(h.modifier, PrepPhrase) and isinstance(p.modifier, PrepPhrase):
        return h.modifier.prep == p.modifier.prep and _np_covers(p.modifier.np, h.modifier.np)
    return h.modifier == p.modifier


def _clause_covers(p: Clause, h: Clause) -> bool:
    return (h.verb == p.verb and _np_covers(p.subject, h.subject) and _np_covers(p.object, h.object)
            and (h.location is None or (p.location is not None and h.location.prep == p.location.prep
                                        and _np_covers(p.location.np, h.location.np)))
            and (h.manner is None or h.manner == p.manner))


def entails(premise: Clause, hypothesis: Clause) -> bool:
    """True if the hypothesis states part of the premise or of one of its relative clauses."""
    return any(_clause_covers(p, hypothesis) for p in [premise, *relative_propositions(premise)])


def _np_similarity(a: NounPhrase | None, b: NounPhrase | None) -> float:
    if a == b:
        return 1.0
    if a is None or b is None:
        return 0.0
    return 0.5 if a.noun == b.noun else 0.0


def sts_score(a: Clause, b: Clause) -> float:
    """Similarity 0-5: one point per shared part (agent, action, patient,
    location, manner); half a point for a noun part that keeps its noun but
    changes number or adjectives, or a location that keeps its noun."""
    location = (1.0 if a.location == b.location else
                0.5 if a.location is not None and b.location is not None and a.location.np.noun == b.location.np.noun
                else 0.0)
    return (_np_similarity(a.subject, b.subject) + float(a.verb == b.verb) + _np_similarity(a.object, b.object)
            + location + float(a.manner == b.manner))


# ----- clause sampling and edits for the pair tasks -----------------------------------


def _vary_surface(clause: Clause, rng: random.Random) -> Clause:
    return clause._replace(passive=clause.object is not None and rng.random() < 0.5,
                           location_front=clause.location is not None and rng.random() < 0.35)


def _like(clause: Clause, first: Clause) -> Clause:
    """The clause in the first sentence's voice and PP position where it can be, so that the two
    sentences of a pair line up word by word and differ only in what the label is about."""
    return clause._replace(passive=first.passive and clause.object is not None,
                           location_front=first.location_front and clause.location is not None)


def _pair_clause(lang: SyntheticLanguage, rng: random.Random, topic: int, *, rich: bool = False,
                 full: bool = False) -> Clause:
    """A clause for pair tasks: upward-monotone determiners only; rich adds
    modifiers that an entailed hypothesis may drop; full has every part."""
    transitive = full or rng.random() < 0.8
    verb = lang.draw_verb(rng, topic, transitive)
    subject = lang.sample_np(rng, topic, lang.verb_subject_class[verb], max_adjectives=2 if rich else 1,
                             modifier=(0.15, 0.35) if rich else (0.0, 0.0), upward_only=True)
    obj = (lang.sample_np(rng, topic, lang.verb_object_class[verb], max_adjectives=1,
                          modifier=(0.1, 0.15) if rich else (0.0, 0.0), upward_only=True)
           if transitive else None)
    location = lang.sample_pp(rng, topic, upward_only=True) if full or rng.random() < 0.5 else None
    manner = lang.draw_adverb(rng, topic) if full or rng.random() < 0.4 else None
    return _vary_surface(Clause(subject, verb, obj, location, manner), rng)


def _other(draw, current, topic: int | None = None, num_topics: int = 1):
    """A fresh draw, `draw(topic)`, that differs from current. A topic may favour a single word of
    a kind (a small lexicon, strong topics): then the other topics are tried in turn."""
    topics = [None] if topic is None else [(topic + k) % num_topics for k in range(num_topics)]
    for t in topics:
        for _ in range(100):
            value = draw(t)
            if value != current:
                return value
    raise RuntimeError("could not draw a different value; the lexicon is too small")


def _agreeing_det(lang: SyntheticLanguage, rng: random.Random, det: str, plural: bool) -> str:
    sg_ok, pl_ok = next((d[1], d[2]) for d in DETERMINERS if d[0] == det)
    return det if (pl_ok if plural else sg_ok) else lang.draw_determiner(rng, plural, upward_only=True)


def _change_np(lang: SyntheticLanguage, rng: random.Random, topic: int, np: NounPhrase, full: bool) -> NounPhrase:
    """full: another noun; otherwise the same noun with another number or adjective."""
    if full:
        return np._replace(noun=_other(lambda t: lang.draw_noun(rng, t, lang.noun_class[np.noun]), np.noun,
                                       topic, lang.num_topics))
    if rng.random() < 0.5:
        return np._replace(plural=not np.plural, det=_agreeing_det(lang, rng, np.det, not np.plural))
    if np.adjectives and rng.random() < 0.5:
        return np._replace(adjectives=np.adjectives[1:])
    new = _other(lambda t: lang.draw_adjective(rng, t, np.noun), np.adjectives[0] if np.adjectives else None,
                 topic, lang.num_topics)
    return np._replace(adjectives=(new,) + np.adjectives[1:])


def _change_location(lang: SyntheticLanguage, rng: random.Random, topic: int, pp: PrepPhrase | None,
                     full: bool) -> PrepPhrase:
    if pp is None:
        return lang.sample_pp(rng, topic, upward_only=True)
    if full:
        return pp._replace(np=_change_np(lang, rng, topic, pp.np, full=True))
    return pp._replace(prep=_other(lambda _: int(rng.random() * len(PREPOSITIONS)), pp.prep))


def _change_part(lang: SyntheticLanguage, rng: random.Random, topic: int, clause: Clause, part: str,
                 full: bool = True) -> Clause:
    """The clause with one proposition part changed (never to a synonym: concepts differ)."""
    if part == "subject":
        return clause._replace(subject=_change_np(lang, rng, topic, clause.subject, full))
    if part == "object":
        return clause._replace(object=_change_np(lang, rng, topic, clause.object, full))
    if part == "verb":
        transitive = lang.verb_transitive[clause.verb]
        return clause._replace(verb=_other(lambda t: lang.draw_verb(rng, t, transitive), clause.verb,
                                           topic, lang.num_topics))
    if part == "location":
        return clause._replace(location=_change_location(lang, rng, topic, clause.location, full))
    if part == "manner":
        return clause._replace(manner=_other(lambda t: lang.draw_adverb(rng, t), clause.manner,
                                             topic, lang.num_topics))
    if part == "roles":
        return clause._replace(subject=clause.object, object=clause.subject)
    raise ValueError(f"unknown part {part!r}")


def _near_miss(lang: SyntheticLanguage, rng: random.Random, topic: int, clause: Clause) -> Clause:
    parts = ["subject", "verb", "location", "manner"]
    if clause.object is not None:
        parts += ["object", "roles"]
    part = parts[int(rng.random() * len(parts))]
    return _change_part(lang, rng, topic, clause, part, full=part in ("verb", "manner", "roles") or rng.random() < 0.6)


# ----- row generators ---------------------------------------------------------------


def _corrupt(lang: SyntheticLanguage, sentence: Sentence, rng: random.Random, kind: str) -> list[str] | None:
    """The sentence's words with one grammar violation of the given kind, or
    None where the kind does not apply. The caller checks it with the parser."""
    words = list(sentence.words)
    clause, i = sentence.clause, sentence.verb_index
    if kind == "agreement":
        if clause.passive:
            words[i] = "is" if words[i] == "are" else "are"
        else:
            words[i] = words[i] + "s" if clause.subject.plural else words[i][:-1]
    elif kind == "word_order":
        j = int(rng.random() * (len(words) - 2))
        if words[j] == words[j + 1]:
            return None
        words[j], words[j + 1] = words[j + 1], words[j]
    elif kind == "category":
        positions = [j for j, w in enumerate(words) if lang.category(w) & {"noun", "verb", "adj", "adv"}]
        j = positions[int(rng.random() * len(positions))]
        other = rng.choice(sorted({"noun", "verb", "adj", "adv"} - lang.category(words[j])))
        words[j] = _word_of(lang, rng, sentence.topic, other)
    else:
        raise ValueError(f"unknown corruption {kind!r}")
    return words


def _word_of(lang: SyntheticLanguage, rng: random.Random, topic: int, category: str) -> str:
    """A word of the category, drawn as the topic would: a bare noun, a 3rd-person verb, an adjective, an adverb."""
    if category == "noun":
        return lang._pick(lang.noun_lemmas[lang.draw_noun(rng, topic)], rng)
    if category == "verb":
        return lang.verb_form(lang._pick(lang.verb_lemmas[lang.draw_verb(rng, topic, rng.random() < 0.5)], rng), False)
    if category == "adj":
        return lang._pick(lang.adj_lemmas[lang.draw_adjective(rng, topic, lang.draw_noun(rng, topic))], rng)
    return lang._pick(lang.adv_lemmas[lang.draw_adverb(rng, topic)], rng)


def _cola_row(lang: SyntheticLanguage, doc_id: int, rng: random.Random, acceptable: bool) -> dict | None:
    doc = lang.document(doc_id)
    sentence = doc.sentences[int(rng.random() * len(doc.sentences))]
    if acceptable:
        return {"sentence": sentence.text, "label": 1}
    kinds = [k for k, _ in CORRUPTIONS]
    weights = [w for _, w in CORRUPTIONS]
    for _ in range(8):
        kind = rng.choices(kinds, weights)[0]
        words = _corrupt(lang, sentence, rng, kind)
        if words is not None and not lang.is_grammatical(words):
            return {"sentence": " ".join(words), "label": 0}
    return None


def _topic_row(lang: SyntheticLanguage, doc_id: int, rng: random.Random) -> dict:
    doc = lang.document(doc_id)
    sentence = doc.sentences[int(rng.random() * len(doc.sentences))]
    return {"sentence": sentence.text, "label": doc.topic}


def _same_reading(lang: SyntheticLanguage, a: Sentence, b: Sentence) -> bool:
    meanings = {c.meaning() for c in lang.parse(a.words)}
    return any(c.meaning() in meanings for c in lang.parse(b.words))


def _para_row(lang: SyntheticLanguage, doc_id: int, rng: random.Random, paraphrase: bool) -> dict | None:
    topic = lang.topic_of(doc_id)
    clause = _pair_clause(lang, rng, topic)
    first = lang.realize(clause, rng, topic)
    for _ in range(8):
        other = clause if paraphrase else _near_miss(lang, rng, topic, clause)
        second = lang.realize(_like(other, clause), rng, topic)
        if second.words != first.words and _same_reading(lang, first, second) == paraphrase:
            return {"sentence1": first.text, "sentence2": second.text, "label": int(paraphrase)}
    return None


def _reduce(clause: Clause, rng: random.Random, keep: float = 0.5) -> Clause:
    """Drop optional modifiers at random: what is left is entailed."""

    def np(x: NounPhrase | None) -> NounPhrase | None:
        if x is None:
            return None
        return x._replace(adjectives=tuple(a for a in x.adjectives if rng.random() < keep),
                          modifier=x.modifier if rng.random() < keep else None)

    return _vary_surface(clause._replace(subject=np(clause.subject), object=np(clause.object),
                                         location=clause.location if rng.random() < keep else None,
                                         manner=clause.manner if rng.random() < keep else None), rng)


def _non_entailed(lang: SyntheticLanguage, rng: random.Random, topic: int, premise: Clause, base: Clause) -> Clause:
    """An edit of an entailed hypothesis that the premise no longer supports."""
    edits = ["argument", "argument", "add_modifier", "add_modifier"]
    if base.object is not None:
        edits.append("roles")
    if relative_propositions(premise):
        edits.append("misattribute")
    edit = edits[int(rng.random() * len(edits))]
    if edit == "argument":
        parts = ["subject", "verb"] + (["object"] if base.object is not None else [])
        return _change_part(lang, rng, topic, base, parts[int(rng.random() * len(parts))])
    if edit == "roles":
        return _change_part(lang, rng, topic, base, "roles")
    if edit == "misattribute":
        # The relative clause's predicate said of the other noun phrase.
        rel = relative_propositions(premise)[0]
        others = [np._replace(modifier=None) for np in (premise.subject, premise.object, premise.location and
                                                        premise.location.np) if np is not None]
        other = others[int(rng.random() * len(others))]
        return _vary_surface(rel._replace(subject=other) if rng.random() < 0.5 or rel.object is None
                             else rel._replace(object=other), rng)
    targets = ["subject", "location", "manner"] + (["object"] if base.object is not None else [])
    target = targets[int(rng.random() * len(targets))]
    if target in ("subject", "object"):
        np = getattr(base, target)
        new = _other(lambda t: lang.draw_adjective(rng, t, np.noun), None, topic, lang.num_topics)
        return base._replace(**{target: np._replace(adjectives=np.adjectives + (new,))})
    if target == "location":
        return base._replace(location=_change_location(lang, rng, topic, premise.location, full=True))
    return base._replace(manner=_other(lambda t: lang.draw_adverb(rng, t), premise.manner, topic, lang.num_topics))


def _nli_row(lang: SyntheticLanguage, doc_id: int, rng: random.Random, entailed: bool) -> dict | None:
    topic = lang.topic_of(doc_id)
    premise = _pair_clause(lang, rng, topic, rich=True)
    first = lang.realize(premise, rng, topic)
    for _ in range(8):
        sources = [premise, *relative_propositions(premise)]
        # Relative-clause hypotheses a quarter of the time when there is one.
        base = _reduce(sources[0] if len(sources) == 1 or rng.random() < 0.75 else sources[1], rng)
        hypothesis = base if entailed else _non_entailed(lang, rng, topic, premise, base)
        second = lang.realize(_like(hypothesis, premise), rng, topic)
        by_text = any(entails(p, h) for p in lang.parse(first.words) for h in lang.parse(second.words))
        if second.words != first.words and entails(premise, hypothesis) == entailed == by_text:
            return {"sentence1": first.text, "sentence2": second.text, "label": 0 if entailed else 1}
    return None


STS_PARTS = ("subject", "verb", "object", "location", "manner")


def _sts_row(lang: SyntheticLanguage, doc_id: int, rng: random.Random) -> dict:
    topic = lang.topic_of(doc_id)
    first = _pair_clause(lang, rng, topic, full=True)
    changed = rng.sample(STS_PARTS, int(rng.random() * (len(STS_PARTS) + 1)))
    second = first
    for part in changed:
        second = _change_part(lang, rng, topic, second, part, full=part in ("verb", "manner") or rng.random() < 0.5)
    a = lang.realize(first, rng, topic)
    b = lang.realize(_like(second, first), rng, topic)
    return {"sentence1": a.text, "sentence2": b.text, "label": sts_score(first, second)}


def generate_task(lang: SyntheticLanguage, task: str, split: str, size: int) -> list[dict]:
    """`size` rows of a task split, classes balanced, in a seeded random order, with idx."""
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    doc_ids = iter(task_document_range(task, split))
    rows: list[dict] = []
    if task == "syn_topic":
        quota = [size // lang.num_topics + (k < size % lang.num_topics) for k in range(lang.num_topics)]
        while len(rows) < size:
            doc_id = next(doc_ids)
            topic = lang.topic_of(doc_id)
            if quota[topic]:
                quota[topic] -= 1
                rows.append(_topic_row(lang, doc_id, random.Random(f"{lang.seed}/{task}/{doc_id}")))
    else:
        while len(rows) < size:
            doc_id = next(doc_ids)
            rng = random.Random(f"{lang.seed}/{task}/{doc_id}")
            positive = len(rows) % 2 == 0
            row = {"syn_cola": lambda: _cola_row(lang, doc_id, rng, positive),
                   "syn_para": lambda: _para_row(lang, doc_id, rng, positive),
                   "syn_nli": lambda: _nli_row(lang, doc_id, rng, positive),
                   "syn_sts": lambda: _sts_row(lang, doc_id, rng)}[task]()
            if row is not None:
                rows.append(row)
    random.Random(f"{lang.seed}/{task}/{split}/order").shuffle(rows)
    return [{**row, "idx": i} for i, row in enumerate(rows)]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in rows))


def write_tasks(out_dir: str | Path, seed: int, train_size: int, validation_size: int,
                tasks: list[str] | None = None, num_words: int = DEFAULT_NUM_WORDS) -> dict[str, Path]:
    """Write out_dir/<task>/{train,validation}.jsonl for each task; return
    {task: its directory}. The language is SyntheticLanguage(seed, num_words): use the
    same seed and lexicon size as the pretraining corpus, or the tasks speak another language."""
    tasks = list(TASKS) if tasks is None else list(tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; known: {sorted(TASKS)}")
    for name, size in (("train_size", train_size), ("validation_size", validation_size)):
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"{name} must be a positive int, got {size!r}")
    lang = SyntheticLanguage(seed, num_words)
    if lang.num_topics != TASKS["syn_topic"].num_labels:
        raise ValueError("syn_topic's num_labels must equal the language's num_topics")
    out: dict[str, Path] = {}
    for task in tasks:
        task_dir = Path(out_dir) / task
        task_dir.mkdir(parents=True, exist_ok=True)
        for split, size in (("train", train_size), ("validation", validation_size)):
            _write_jsonl(task_dir / f"{split}.jsonl", generate_task(lang, task, split, size))
        out[task] = task_dir
    return out
