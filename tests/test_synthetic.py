"""The synthetic language: determinism, Zipf, agreement, topics, ambiguity, parser."""
import random
from collections import Counter

import numpy as np
import pytest

from raykd.data.synthetic import (
    AUXILIARY, DETERMINERS, FUNCTION_WORDS, NounPhrase, PrepPhrase, Relative, SyntheticLanguage)

AGREES = {d[0]: (d[1], d[2]) for d in DETERMINERS}


@pytest.fixture(scope="module")
def lang():
    return SyntheticLanguage(seed=0)


@pytest.fixture(scope="module")
def docs(lang):
    return list(lang.documents(0, 600))


def test_documents_depend_only_on_seed_and_id(lang, docs):
    again = SyntheticLanguage(seed=0)
    assert [d.text for d in again.documents(0, 50)] == [d.text for d in docs[:50]]
    # Any range on its own gives the same documents as the full run.
    assert [d.text for d in lang.documents(420, 5)] == [d.text for d in docs[420:425]]
    other = SyntheticLanguage(seed=1)
    assert [d.text for d in other.documents(0, 50)] != [d.text for d in docs[:50]]
    assert other.vocabulary != lang.vocabulary
    assert all(lang.topic_of(d.doc_id) == d.topic for d in docs[:50])
    s = docs[3].sentences[0]
    assert s.proposition.topic == docs[3].topic and s.proposition.verb == s.clause.verb


def test_bad_arguments_fail_clearly():
    with pytest.raises(ValueError, match="seed"):
        SyntheticLanguage(seed=-1)
    with pytest.raises(ValueError, match="num_words"):
        SyntheticLanguage(num_words=10)
    with pytest.raises(ValueError, match="doc_id"):
        SyntheticLanguage().document(-3)


def test_vocabulary_size_and_zipf(lang, docs):
    assert 2500 <= len(lang.vocabulary) <= 3300
    counts = Counter(w for d in docs for w in d.text.split() if w not in FUNCTION_WORDS)
    freqs = np.array(sorted(counts.values(), reverse=True)[:1000], dtype=float)
    slope = np.polyfit(np.log(np.arange(1, len(freqs) + 1)), np.log(freqs), 1)[0]
    assert -1.3 < slope < -0.7, slope  # Zipf: frequency ~ 1 / rank


def _nps(np_):
    """A noun phrase and every noun phrase inside it."""
    yield np_
    mod = np_.modifier
    if isinstance(mod, PrepPhrase):
        yield from _nps(mod.np)
    elif isinstance(mod, Relative):
        for inner in (mod.subject, mod.object):
            if inner is not None:
                yield from _nps(inner)


def test_agreement_holds_in_every_generated_sentence(lang, docs):
    attracted = 0
    sentences = [s for d in docs[:300] for s in d.sentences]
    for s in sentences:
        c = s.clause
        head = c.object if c.passive else c.subject
        word = s.words[s.verb_index]
        if c.passive:
            assert word == AUXILIARY[head.plural]
        else:
            assert (c.verb, head.plural, lang.verb_transitive[c.verb]) in lang._analyses[word]["verb"]
        nps = [n for top in (c.subject, c.object, c.location and c.location.np) if top for n in _nps(top)]
        for n in nps:
            sg_ok, pl_ok = AGREES[n.det]
            assert pl_ok if n.plural else sg_ok, (s.text, n)
        # Agreement across distance: a noun of the other number between subject and verb.
        between = [n for n in _nps(head)][1:]
        attracted += any(n.plural != head.plural for n in between)
    assert attracted / len(sentences) > 0.1


def test_parser_recovers_every_generated_structure(lang, docs):
    sentences = [s for d in docs[:150] for s in d.sentences]
    ambiguous = 0
    for s in sentences:
        readings = lang.parse(s.text)
        assert s.clause.meaning() in [r.meaning() for r in readings], s.text
        ambiguous += len(readings) > 1
    assert ambiguous > 0.05 * len(sentences)  # PP attachment etc. is really ambiguous


def _words(lang, transitive):
    verb = next(i for i, t in enumerate(lang.verb_transitive) if t == transitive
                and all(len(lang.category(f)) == 1 for f in (lang.verb_lemmas[i][0], lang.verb_lemmas[i][0] + "s")))
    nouns = [v[0] for v in lang.noun_lemmas if len(lang.category(v[0])) == 1][:2]
    return lang.verb_lemmas[verb][0], nouns


def test_parser_rejects_grammar_violations(lang):
    vt, (n1, n2) = _words(lang, transitive=True)
    vi, _ = _words(lang, transitive=False)
    ok = [f"the {n1} {vt}s the {n2} .", f"the {n1}s {vt} a {n2} .", f"the {n1} {vi}s .",
          f"the {n1} near the {n2}s {vt}s the {n2} .",             # attractor, correct verb
          f"the {n1} that the {n2}s {vt} {vi}s .",                  # object relative
          f"the {n2} is {vt}ed by the {n1}s .", f"in the {n2} , the {n1} {vi}s ."]
    bad = [f"the {n1} {vt} the {n2} .",                              # agreement
           f"the {n1} near the {n2}s {vt} the {n2} .",               # agreement across an attractor
           f"the {n1} that the {n2}s {vt} {vi} .",                   # agreement across a relative clause
           f"these {n1} {vt}s the {n2} .",                           # determiner agreement
           f"the {n1} {vi}s the {n2} .", f"the {n1} {vt}s .",        # subcategorisation
           f"the {n2} are {vt}ed by the {n1}s .",                    # passive auxiliary agreement
           f"{n1} the {vt}s the {n2} .", f"the {n1} {vt}s the {n2}"]  # word order, no period
    assert all(lang.is_grammatical(s) for s in ok), [s for s in ok if not lang.is_grammatical(s)]
    assert not any(lang.is_grammatical(s) for s in bad), [s for s in bad if lang.is_grammatical(s)]


def test_topics_bias_word_choice(lang, docs):
    boosts = np.array(lang.topic_boosts["noun"])
    boosted = boosts > boosts.min(axis=0)  # [topic, noun concept]
    nouns = {lemma + suffix: c for c, variants in enumerate(lang.noun_lemmas) for lemma in variants
             for suffix in ("", "s")}
    own, other = [], []
    for d in docs:
        cs = [nouns[w] for w in d.text.split() if w in nouns and len(lang.category(w)) == 1]
        if not cs:  # a short document can keep to homographs only
            continue
        share = boosted[:, cs].mean(axis=1)  # per topic: share of this document's nouns it boosts
        own.append(share[d.topic])
        other.append(np.delete(share, d.topic).mean())
    assert np.mean(own) > 2.5 * np.mean(other)
    assert set(Counter(d.topic for d in docs)) == set(range(lang.num_topics))


def test_ambiguity_synonyms_homographs_multi_topic(lang):
    assert sum(len(v) == 2 for v in lang.noun_lemmas) > 0.1 * len(lang.noun_lemmas)
    homographs = [w for w in lang.vocabulary if {"noun", "verb"} <= lang.category(w)]
    assert len(homographs) >= 20
    boosts = np.array(lang.topic_boosts["noun"])
    in_topics = (boosts > boosts.min(axis=0)).sum(axis=0)
    assert (in_topics >= 2).sum() > 20 and (in_topics == 0).sum() > 20


def test_structure_round_trip_for_noun_phrase_modifiers(lang):
    """A hand-built structure realises to words that parse back to it."""
    n = NounPhrase("the", (), 0, False, PrepPhrase(2, NounPhrase("some", (1,), 1, True)))
    vt = lang.verb_transitive.index(True)
    clause = lang.sample_clause(random.Random(0), 0)._replace(subject=n, verb=vt, passive=False,
                                                              object=NounPhrase("a", (), 2, False))
    s = lang.realize(clause, random.Random(1))
    assert clause.meaning() in [r.meaning() for r in lang.parse(s.words)]
