"""A seeded synthetic language: the embedded default corpus (SPEC §7).

The language is English-shaped so that a BERT-style model has real structure
to learn, and a teacher's soft predictions carry information:

- a lexicon of pseudo-words (default ~3000 word types) for nouns, verbs,
  adjectives and adverbs, each category Zipf-distributed; plurals and
  3rd-person verbs end in "-s", passive participles in "-ed";
- a small grammar: [PP ,] NP VP [PP] [ADV] . with subject-verb agreement
  across distance (prepositional phrases and relative clauses between subject
  and verb carry attractor nouns), determiner-noun agreement, transitive and
  intransitive verbs, passives, and selectional preferences (verbs prefer
  subjects and objects of given noun classes);
- document topics that reweight the lexicon (each topic boosts a random
  share of the content words; some words belong to several topics);
- ambiguity: synonyms (two words, one meaning, used interchangeably),
  noun/verb homographs ("walk"/"walks"), number-neutral determiners,
  optional constituents and PP attachment (to the object or to the verb).

Document i depends only on (seed, i), so any range of documents can be
produced independently. Every sentence carries its structure (`Clause`), and
`SyntheticLanguage.parse` recovers all structures of a sentence from its
words, which is how task labels are checked.
"""

from __future__ import annotations

import random
from bisect import bisect_right as _bisect_right
from itertools import accumulate
from typing import Iterator, NamedTuple, Sequence

# Bumped whenever a change alters what `SyntheticLanguage(seed)` generates: cached corpora and
# tasks are keyed by it, so an old cache is never mistaken for the current language.
LANGUAGE_VERSION = 3

# Determiners: word, agrees with singular, agrees with plural, weight, upward
# monotone. Only upward-monotone determiners keep "drop a modifier" entailments
# valid ("the big dog runs" entails "the dog runs"; "every big dog runs" does not).
DETERMINERS = (
    ("the", True, True, 12.0, True),
    ("a", True, False, 5.0, True),
    ("this", True, False, 1.5, True),
    ("every", True, False, 0.8, False),
    ("each", True, False, 0.5, False),
    ("one", True, False, 0.5, False),
    ("these", False, True, 1.5, True),
    ("some", False, True, 2.0, True),
    ("many", False, True, 1.0, False),
    ("two", False, True, 0.8, False),
    ("few", False, True, 0.4, False),
    ("my", True, True, 1.0, True),
    ("our", True, True, 0.7, True),
    ("their", True, True, 0.7, True),
)
PREPOSITIONS = ("in", "on", "near", "under", "behind", "with", "from", "beside",
                "over", "across", "into", "above")
AUXILIARY = {False: "is", True: "are"}  # passive auxiliary by subject number
FUNCTION_WORDS = frozenset(
    [d[0] for d in DETERMINERS] + list(PREPOSITIONS) + ["is", "are", "that", "by", ",", "."])

NUM_NOUN_CLASSES = 4   # selectional classes (think: people, animals, places, things)
ANY_CLASS = NUM_NOUN_CLASSES
SYNONYM_RATE = 0.2     # share of content concepts written with two interchangeable words
HOMOGRAPH_RATE = 0.1   # share of verbs spelled like a noun ("walk" / "walks")
TRANSITIVE_RATE = 0.6  # share of verb concepts that take an object
# Topics: a document's content words come mostly (about 19 in 20 with the defaults) from the
# concepts its topic boosts, as real documents keep to a field. Strong topics are structure a
# small model learns quickly from the words around a gap (bench/learnability.py).
TOPIC_SHARE = 0.125    # chance that a content concept is boosted in a given topic
TOPIC_BOOST = 200.0    # weight factor of a boosted concept within its topic
ZIPF_EXPONENT = 1.0
SELECTION_RATE = 0.8   # chance that a noun/adjective follows the selectional class
# Within a document, chance that a content word repeats a concept the document already used
# (adjectives: one already used with the same noun), as real documents keep to their subjects.
P_REUSE = {"noun": 0.85, "verb": 0.75, "adj": 0.85, "adv": 0.75}

# Sentence shape probabilities (pretraining corpus).
P_TRANSITIVE = 0.65
P_PASSIVE = 0.15
P_PLURAL = 0.35
P_LOCATION = 0.3
P_LOCATION_FRONT = 0.3
P_MANNER = 0.25
ADJECTIVE_COUNTS = (0.55, 0.35, 0.10)   # P(0, 1, 2 adjectives)
SUBJECT_MODIFIER = (0.25, 0.15)         # P(prepositional phrase), P(relative clause)
OBJECT_MODIFIER = (0.15, 0.05)
P_OBJECT_RELATIVE = 0.4                 # "the dog that the cats chase" vs "the dog that chases ..."
SENTENCES_PER_DOCUMENT = (6, 14)        # inclusive range, mean 10
DEFAULT_NUM_WORDS = 3000                # target number of word types (`data.num_words`)

_ONSETS = tuple("bdfgklmnprstvz") + ("sh", "ch", "tr", "pl", "gr")
_VOWELS = tuple("aeiou") + ("ai", "ou")
_CODAS = tuple("lmnrtk")


class PrepPhrase(NamedTuple):
    """A prepositional phrase: preposition index and a simple noun phrase."""

    prep: int
    np: "NounPhrase"


class Relative(NamedTuple):
    """A relative clause on a noun. subject is None: the noun is the subject
    ("that chases the cat"); object is None with a subject: the noun is the
    object ("that the cats chase")."""

    verb: int
    subject: "NounPhrase | None"
    object: "NounPhrase | None"


class NounPhrase(NamedTuple):
    """Determiner word, adjective concepts, noun concept, number, optional modifier."""

    det: str
    adjectives: tuple[int, ...]
    noun: int
    plural: bool
    modifier: PrepPhrase | Relative | None = None


class Clause(NamedTuple):
    """One sentence's structure. subject is the agent, object the patient,
    in both voices; passive and location_front are surface choices only."""

    subject: NounPhrase
    verb: int
    object: NounPhrase | None
    location: PrepPhrase | None = None
    manner: int | None = None
    passive: bool = False
    location_front: bool = False

    def meaning(self) -> tuple:
        """The clause without its surface choices (voice, PP position)."""
        return (self.subject, self.verb, self.object, self.location, self.manner)


class Proposition(NamedTuple):
    """Who does what to whom, in which topic."""

    subject: int
    subject_plural: bool
    verb: int
    object: int | None
    object_plural: bool | None
    topic: int


class Sentence(NamedTuple):
    """Words, their structure, and the index of the word that agrees with the
    subject (the main verb, or the auxiliary of a passive)."""

    words: tuple[str, ...]
    clause: Clause
    topic: int
    verb_index: int

    @property
    def text(self) -> str:
        return " ".join(self.words)

    @property
    def proposition(self) -> Proposition:
        c = self.clause
        return Proposition(
            c.subject.noun, c.subject.plural, c.verb,
            None if c.object is None else c.object.noun,
            None if c.object is None else c.object.plural, self.topic)


class Document(NamedTuple):
    doc_id: int
    topic: int
    sentences: tuple[Sentence, ...]

    @property
    def text(self) -> str:
        return " ".join(s.text for s in self.sentences)


class _Table:
    """Weighted choice among ids by bisection on cumulative weights (fast, and
    uses only rng.random(), whose stream Python keeps stable)."""

    __slots__ = ("ids", "cum", "total")

    def __init__(self, ids: Sequence[int], weights: Sequence[float]):
        if not ids:
            raise ValueError("empty choice table: the lexicon is too small")
        self.ids = list(ids)
        self.cum = list(accumulate(weights))
        self.total = self.cum[-1]

    def draw(self, rng: random.Random) -> int:
        return self.ids[_bisect_right(self.cum, rng.random() * self.total)]


def _zipf(n: int) -> list[float]:
    return [1.0 / (rank + 1) ** ZIPF_EXPONENT for rank in range(n)]


class SyntheticLanguage:
    """The seeded language: lexicon, grammar, topics, generator and parser."""

    def __init__(self, seed: int = 0, num_words: int = DEFAULT_NUM_WORDS, num_topics: int = 8):
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        if not isinstance(num_words, int) or num_words < 300:
            raise ValueError(f"num_words must be an int >= 300, got {num_words!r}")
        if not 2 <= num_topics <= 64:
            raise ValueError(f"num_topics must be in [2, 64], got {num_topics}")
        self.seed, self.num_words, self.num_topics = seed, num_words, num_topics
        self._memory: dict | None = None  # set while `document` generates one
        rng = random.Random(f"raykd-synthetic-lexicon/{seed}")
        # Concept counts from the target number of word types: nouns have 2
        # forms, verbs 3 (pl, sg, participle); synonyms add lemmas.
        per = 1 + SYNONYM_RATE
        counts = {"noun": round(0.44 * num_words / 2 / per), "verb": round(0.30 * num_words / 3 / per),
                  "adj": round(0.18 * num_words / per), "adv": round(0.08 * num_words / per)}
        self._build_lexicon(rng, counts)
        self._build_tables(rng)
        self._build_analyses()

    # ----- lexicon -------------------------------------------------------------

    def _new_word(self, rng: random.Random, taken: set[str]) -> str:
        while True:
            syllables = 1 + (rng.random() < 0.75) + (rng.random() < 0.3)
            word = "".join(_ONSETS[int(rng.random() * len(_ONSETS))] + _VOWELS[int(rng.random() * len(_VOWELS))]
                           for _ in range(syllables))
            if rng.random() < 0.35:
                word += _CODAS[int(rng.random() * len(_CODAS))]
            if len(word) >= 3 and word not in taken:
                return word

    def _build_lexicon(self, rng: random.Random, counts: dict[str, int]) -> None:
        taken: set[str] = set(FUNCTION_WORDS)  # every surface form in use

        def lemmas_for(n: int, forms) -> list[tuple[str, ...]]:
            """n concepts, each with 1-2 lemmas whose forms are all unused.
            Shorter words go to frequent concepts, as in natural languages."""
            out = []
            for _ in range(n):
                variants = []
                for _ in range(1 + (rng.random() < SYNONYM_RATE)):
                    while True:
                        lemma = self._new_word(rng, taken)
                        if not any(f in taken for f in forms(lemma)):
                            break
                    taken.update(forms(lemma))
                    variants.append(lemma)
                out.append(tuple(variants))
            return sorted(out, key=lambda v: len(v[0]))

        def noun_forms(lemma):
            return (lemma, lemma + "s")

        def verb_forms(lemma):
            return (lemma, lemma + "s", lemma + "ed")

        self.noun_lemmas = lemmas_for(counts["noun"], noun_forms)
        self.adj_lemmas = lemmas_for(counts["adj"], lambda w: (w,))
        self.adv_lemmas = lemmas_for(counts["adv"], lambda w: (w,))
        # Verbs: some reuse a frequent noun's lemma (homographs); the rest are new words.
        nouns_free = [v[0] for v in self.noun_lemmas[: len(self.noun_lemmas) // 3]]
        rng.shuffle(nouns_free)
        verbs = []
        for _ in range(counts["verb"]):
            if rng.random() < HOMOGRAPH_RATE and nouns_free:
                lemma = nouns_free.pop()
                if lemma + "ed" not in taken:
                    taken.add(lemma + "ed")
                    verbs.append((lemma,))
                    continue
            verbs.extend(lemmas_for(1, verb_forms))
        self.verb_lemmas = sorted(verbs, key=lambda v: len(v[0]))
        self.verb_transitive = [rng.random() < TRANSITIVE_RATE for _ in verbs]
        self.verb_subject_class = [int(rng.random() * NUM_NOUN_CLASSES) for _ in verbs]
        self.verb_object_class = [int(rng.random() * NUM_NOUN_CLASSES) for _ in verbs]
        self.noun_class = [int(rng.random() * NUM_NOUN_CLASSES) for _ in self.noun_lemmas]
        self.adj_class = [int(rng.random() * NUM_NOUN_CLASSES) for _ in self.adj_lemmas]
        self.prep_class = [int(rng.random() * NUM_NOUN_CLASSES) for _ in PREPOSITIONS]

    def _build_tables(self, rng: random.Random) -> None:
        def topic_weights(n: int) -> list[list[float]]:
            """Zipf weights over concept ranks, boosted per topic; a concept
            may be boosted in none, one or several topics."""
            base = _zipf(n)
            boosted = [[rng.random() < TOPIC_SHARE for _ in range(n)] for _ in range(self.num_topics)]
            return [[w * TOPIC_BOOST if b else w for w, b in zip(base, row)] for row in boosted]

        def subset(weights: list[float], ids: list[int]) -> _Table:
            return _Table(ids, [weights[i] for i in ids])

        def by_class(weights: list[float], classes: list[int]) -> list[_Table]:
            """One table per selectional class, then one over all (index ANY_CLASS)."""
            return [subset(weights, [i for i, c in enumerate(classes) if c == k]) for k in range(NUM_NOUN_CLASSES)] \
                + [subset(weights, list(range(len(weights))))]

        noun_w = topic_weights(len(self.noun_lemmas))
        adj_w = topic_weights(len(self.adj_lemmas))
        verb_w = topic_weights(len(self.verb_lemmas))
        adv_w = topic_weights(len(self.adv_lemmas))
        self.topic_boosts = {"noun": noun_w, "verb": verb_w, "adj": adj_w, "adv": adv_w}
        self._nouns = [by_class(w, self.noun_class) for w in noun_w]
        self._adjs = [by_class(w, self.adj_class) for w in adj_w]
        by_transitivity = [[i for i, t in enumerate(self.verb_transitive) if t == trans] for trans in (False, True)]
        self._verbs = [[subset(w, ids) for ids in by_transitivity] for w in verb_w]
        self._advs = [subset(w, list(range(len(w)))) for w in adv_w]
        self._preps = _Table(range(len(PREPOSITIONS)), _zipf(len(PREPOSITIONS)))
        weights = [d[3] for d in DETERMINERS]
        self._dets = {plural: [subset(weights, [i for i, (_, sg, pl, _, up) in enumerate(DETERMINERS)
                                                if (pl if plural else sg) and (up or not upward_only)])
                               for upward_only in (False, True)] for plural in (False, True)}

    def _build_analyses(self) -> None:
        """Word -> {category: [analysis, ...]} for the parser."""
        an: dict[str, dict[str, list]] = {}

        def add(word, cat, value):
            an.setdefault(word, {}).setdefault(cat, []).append(value)

        for word, sg, pl, _, _ in DETERMINERS:
            add(word, "det", (sg, pl))
        for i, p in enumerate(PREPOSITIONS):
            add(p, "prep", i)
        for plural, word in AUXILIARY.items():
            add(word, "aux", plural)
        for c, variants in enumerate(self.noun_lemmas):
            for lemma in variants:
                add(lemma, "noun", (c, False))
                add(lemma + "s", "noun", (c, True))
        for c, variants in enumerate(self.verb_lemmas):
            trans = self.verb_transitive[c]
            for lemma in variants:
                add(lemma, "verb", (c, True, trans))
                add(lemma + "s", "verb", (c, False, trans))
                if trans:
                    add(lemma + "ed", "part", c)
        for c, variants in enumerate(self.adj_lemmas):
            for lemma in variants:
                add(lemma, "adj", c)
        for c, variants in enumerate(self.adv_lemmas):
            for lemma in variants:
                add(lemma, "adv", c)
        self._analyses = an

    @property
    def vocabulary(self) -> list[str]:
        """Every word the language can produce, sorted."""
        return sorted(set(self._analyses) | {",", ".", "that", "by"})

    def category(self, word: str) -> set[str]:
        """The grammatical categories a word can have (empty if unknown)."""
        return set(self._analyses.get(word, ()))

    # ----- forms ------------------------------------------------------------

    @staticmethod
    def _pick(variants: tuple[str, ...], rng: random.Random) -> str:
        return variants[0] if len(variants) == 1 else variants[int(rng.random() * len(variants))]

    def verb_form(self, lemma: str, plural_subject: bool) -> str:
        """The present-tense form agreeing with the subject's number."""
        return lemma if plural_subject else lemma + "s"

    # ----- sampling ------------------------------------------------------------

    # The draw_* methods return concept ids, weighted by the topic's Zipf weights.

    # Inside `document`, a draw may instead repeat a concept the document already used
    # (`_recall`), so documents keep talking about the same things, as real ones do.

    def draw_noun(self, rng: random.Random, topic: int, klass: int = ANY_CLASS) -> int:
        if klass != ANY_CLASS and rng.random() >= SELECTION_RATE:
            klass = ANY_CLASS
        used = self._recall(rng, "noun", lambda n: klass == ANY_CLASS or self.noun_class[n] == klass)
        return used if used is not None else self._remember("noun", self._nouns[topic][klass].draw(rng))

    def draw_adjective(self, rng: random.Random, topic: int, noun: int) -> int:
        klass = self.noun_class[noun] if rng.random() < SELECTION_RATE else ANY_CLASS
        used = self._recall(rng, ("adj", noun), lambda a: True)
        return used if used is not None else self._remember(("adj", noun), self._adjs[topic][klass].draw(rng))

    def draw_verb(self, rng: random.Random, topic: int, transitive: bool) -> int:
        used = self._recall(rng, "verb", lambda v: self.verb_transitive[v] == transitive)
        return used if used is not None else self._remember("verb", self._verbs[topic][transitive].draw(rng))

    def draw_adverb(self, rng: random.Random, topic: int) -> int:
        used = self._recall(rng, "adv", lambda a: True)
        return used if used is not None else self._remember("adv", self._advs[topic].draw(rng))

    def _recall(self, rng: random.Random, kind, fits) -> int | None:
        """In a document, with chance P_REUSE of the word's category, an earlier occurrence that
        fits (drawn in proportion to how often it occurred); None: draw afresh."""
        if self._memory is None:
            return None
        earlier = self._memory.get(kind)
        if not earlier or rng.random() >= P_REUSE[kind if isinstance(kind, str) else kind[0]]:
            return None
        fitting = [concept for concept in earlier if fits(concept)]
        return fitting[int(rng.random() * len(fitting))] if fitting else None

    def _remember(self, kind, concept: int) -> int:
        if self._memory is not None:
            self._memory.setdefault(kind, []).append(concept)
        return concept

    def draw_determiner(self, rng: random.Random, plural: bool, upward_only: bool = False) -> str:
        return DETERMINERS[self._dets[plural][upward_only].draw(rng)][0]

    def sample_np(self, rng: random.Random, topic: int, klass: int, *, max_adjectives: int = 2,
                  modifier: tuple[float, float] = (0.0, 0.0), upward_only: bool = False) -> NounPhrase:
        """A noun phrase of a selectional class; modifier = (P(PP), P(relative))."""
        noun = self.draw_noun(rng, topic, klass)
        plural = rng.random() < P_PLURAL
        det = self.draw_determiner(rng, plural, upward_only)
        r = rng.random()
        n_adj = 0 if r < ADJECTIVE_COUNTS[0] else 1 if r < ADJECTIVE_COUNTS[0] + ADJECTIVE_COUNTS[1] else 2
        adjectives: list[int] = []
        for _ in range(min(n_adj, max_adjectives)):
            a = self.draw_adjective(rng, topic, noun)
            if a not in adjectives:
                adjectives.append(a)
        mod = None
        r = rng.random()
        if r < modifier[0]:
            mod = self.sample_pp(rng, topic, upward_only)
        elif r < modifier[0] + modifier[1]:
            mod = self.sample_relative(rng, topic, upward_only)
        return NounPhrase(det, tuple(adjectives), noun, plural, mod)

    def sample_pp(self, rng: random.Random, topic: int, upward_only: bool = False) -> PrepPhrase:
        """A prepositional phrase whose noun suits the preposition."""
        prep = self._preps.draw(rng)
        return PrepPhrase(prep, self.sample_np(rng, topic, self.prep_class[prep], max_adjectives=1,
                                               upward_only=upward_only))

    def sample_relative(self, rng: random.Random, topic: int, upward_only: bool = False) -> Relative:
        """A subject relative ("that sees the bird") or an object relative ("that the cats chase")."""
        if rng.random() < P_OBJECT_RELATIVE:
            verb = self.draw_verb(rng, topic, True)
            inner = self.sample_np(rng, topic, self.verb_subject_class[verb], max_adjectives=1,
                                   upward_only=upward_only)
            return Relative(verb, inner, None)
        verb = self.draw_verb(rng, topic, rng.random() < P_TRANSITIVE)
        obj = (self.sample_np(rng, topic, self.verb_object_class[verb], max_adjectives=1, upward_only=upward_only)
               if self.verb_transitive[verb] else None)
        return Relative(verb, None, obj)

    def sample_clause(self, rng: random.Random, topic: int) -> Clause:
        """A clause of the pretraining distribution."""
        transitive = rng.random() < P_TRANSITIVE
        verb = self.draw_verb(rng, topic, transitive)
        subject = self.sample_np(rng, topic, self.verb_subject_class[verb], modifier=SUBJECT_MODIFIER)
        obj = (self.sample_np(rng, topic, self.verb_object_class[verb], modifier=OBJECT_MODIFIER)
               if transitive else None)
        location = self.sample_pp(rng, topic) if rng.random() < P_LOCATION else None
        manner = self.draw_adverb(rng, topic) if rng.random() < P_MANNER else None
        return Clause(subject, verb, obj, location, manner,
                      passive=transitive and rng.random() < P_PASSIVE,
                      location_front=location is not None and rng.random() < P_LOCATION_FRONT)

    # ----- realisation -----------------------------------------------------------

    def _realize_np(self, np: NounPhrase, rng: random.Random, out: list[str]) -> None:
        out.append(np.det)
        for a in np.adjectives:
            out.append(self._pick(self.adj_lemmas[a], rng))
        lemma = self._pick(self.noun_lemmas[np.noun], rng)
        out.append(lemma + "s" if np.plural else lemma)
        mod = np.modifier
        if isinstance(mod, PrepPhrase):
            self._realize_pp(mod, rng, out)
        elif isinstance(mod, Relative):
            out.append("that")
            verb = self._pick(self.verb_lemmas[mod.verb], rng)
            if mod.subject is None:
                out.append(self.verb_form(verb, np.plural))
                if mod.object is not None:
                    self._realize_np(mod.object, rng, out)
            else:
                self._realize_np(mod.subject, rng, out)
                out.append(self.verb_form(verb, mod.subject.plural))

    def _realize_pp(self, pp: PrepPhrase, rng: random.Random, out: list[str]) -> None:
        out.append(PREPOSITIONS[pp.prep])
        self._realize_np(pp.np, rng, out)

    def realize(self, clause: Clause, rng: random.Random, topic: int = 0) -> Sentence:
        """Words for a clause; synonyms are chosen at random per occurrence."""
        if clause.passive and clause.object is None:
            raise ValueError("a passive clause needs an object")
        out: list[str] = []
        if clause.location is not None and clause.location_front:
            self._realize_pp(clause.location, rng, out)
            out.append(",")
        verb = self._pick(self.verb_lemmas[clause.verb], rng)
        if clause.passive:
            self._realize_np(clause.object, rng, out)
            verb_index = len(out)
            out += [AUXILIARY[clause.object.plural], verb + "ed", "by"]
            self._realize_np(clause.subject, rng, out)
        else:
            self._realize_np(clause.subject, rng, out)
            verb_index = len(out)
            out.append(self.verb_form(verb, clause.subject.plural))
            if clause.object is not None:
                self._realize_np(clause.object, rng, out)
        if clause.location is not None and not clause.location_front:
            self._realize_pp(clause.location, rng, out)
        if clause.manner is not None:
            out.append(self._pick(self.adv_lemmas[clause.manner], rng))
        out.append(".")
        return Sentence(tuple(out), clause, topic, verb_index)

    # ----- documents ---------------------------------------------------------------

    def _document_rng(self, doc_id: int) -> random.Random:
        if not 0 <= doc_id < 2 ** 64:
            raise ValueError(f"doc_id must be in [0, 2**64), got {doc_id}")
        return random.Random((self.seed << 64) | doc_id)

    def topic_of(self, doc_id: int) -> int:
        """The topic of document doc_id (its first draw), without generating it."""
        return int(self._document_rng(doc_id).random() * self.num_topics)

    def document(self, doc_id: int) -> Document:
        """Document doc_id; depends only on (seed, doc_id)."""
        rng = self._document_rng(doc_id)
        topic = int(rng.random() * self.num_topics)
        lo, hi = SENTENCES_PER_DOCUMENT
        n = lo + int(rng.random() * (hi - lo + 1))
        self._memory = {}  # the concepts this document has used so far
        try:
            sentences = tuple(self.realize(self.sample_clause(rng, topic), rng, topic) for _ in range(n))
        finally:
            self._memory = None
        return Document(doc_id, topic, sentences)

    def documents(self, start: int, count: int) -> Iterator[Document]:
        """Documents start, start+1, ..., start+count-1."""
        if start < 0 or count < 0:
            raise ValueError(f"start and count must be >= 0, got start={start}, count={count}")
        return (self.document(i) for i in range(start, start + count))

    # ----- parsing -------------------------------------------------------------------

    def parse(self, sentence: str | Sequence[str]) -> list[Clause]:
        """Every structure the grammar assigns to a sentence; [] if ungrammatical.

        Grammar: S -> [PP ,] NP (Vt NP | Vi | Aux Part by NP) [PP] [Adv] .
        (at most one clause-level PP); NP -> Det Adj* N [PP | that Vt NPs |
        that Vi | that NPs Vt]; PP -> Prep NPs; NPs -> Det Adj* N; with
        determiner-noun and subject-verb agreement and verb subcategorisation.
        """
        words = sentence.split() if isinstance(sentence, str) else list(sentence)
        if len(words) < 3 or words[-1] != ".":
            return []
        p = _Parser(words, self._analyses)
        end = len(words) - 1
        readings: list[Clause] = []
        starts: list[tuple[int, PrepPhrase | None]] = [(0, None)]
        starts += [(j + 1, pp) for j, pp in p.pps(0) if p.word(j) == ","]
        for start, front in starts:
            for j, head in p.nps(start):
                cores: list[tuple[int, NounPhrase, int, NounPhrase | None, bool]] = []
                for verb, plural, trans in p.get(j, "verb"):
                    if plural != head.plural:
                        continue
                    if trans:
                        cores += [(k, head, verb, obj, False) for k, obj in p.nps(j + 1)]
                    else:
                        cores.append((j + 1, head, verb, None, False))
                for plural in p.get(j, "aux"):
                    if plural == head.plural and p.word(j + 2) == "by":
                        for verb in p.get(j + 1, "part"):
                            cores += [(k, agent, verb, head, True) for k, agent in p.nps(j + 3)]
                for k, subject, verb, obj, passive in cores:
                    locations = [(k, front)] if front is not None else [(k, None)] + list(p.pps(k))
                    for m, location in locations:
                        for n, manner in [(m, None)] + [(m + 1, a) for a in p.get(m, "adv")]:
                            if n == end:
                                readings.append(Clause(subject, verb, obj, location, manner, passive,
                                                       location_front=front is not None))
        return readings

    def is_grammatical(self, sentence: str | Sequence[str]) -> bool:
        return bool(self.parse(sentence))


class _Parser:
    """Recursive descent over one sentence; returns every (end, phrase)."""

    _EMPTY: dict = {}

    def __init__(self, words: list[str], analyses: dict):
        self.words = words
        self.an = [analyses.get(w, self._EMPTY) for w in words]

    def word(self, i: int) -> str | None:
        return self.words[i] if i < len(self.words) else None

    def get(self, i: int, cat: str) -> list:
        return self.an[i].get(cat, ()) if i < len(self.an) else ()

    def simple_nps(self, i: int) -> list[tuple[int, NounPhrase]]:
        out = []
        for sg_ok, pl_ok in self.get(i, "det"):
            j, adjectives = i + 1, []
            while j < len(self.words):
                for noun, plural in self.get(j, "noun"):
                    if pl_ok if plural else sg_ok:
                        out.append((j + 1, NounPhrase(self.words[i], tuple(adjectives), noun, plural)))
                adj = self.get(j, "adj")
                if not adj:
                    break
                adjectives.append(adj[0])
                j += 1
        return out

    def pps(self, i: int) -> list[tuple[int, PrepPhrase]]:
        return [(j, PrepPhrase(prep, np)) for prep in self.get(i, "prep") for j, np in self.simple_nps(i + 1)]

    def nps(self, i: int) -> list[tuple[int, NounPhrase]]:
        out = []
        for j, np in self.simple_nps(i):
            out.append((j, np))
            out += [(k, np._replace(modifier=pp)) for k, pp in self.pps(j)]
            if self.word(j) != "that":
                continue
            for verb, plural, trans in self.get(j + 1, "verb"):
                if plural != np.plural:
                    continue
                if trans:
                    out += [(k, np._replace(modifier=Relative(verb, None, o))) for k, o in self.simple_nps(j + 2)]
                else:
                    out.append((j + 2, np._replace(modifier=Relative(verb, None, None))))
            for k, inner in self.simple_nps(j + 1):
                for verb, plural, trans in self.get(k, "verb"):
                    if trans and plural == inner.plural:
                        out.append((k + 1, np._replace(modifier=Relative(verb, inner, None))))
        return out
