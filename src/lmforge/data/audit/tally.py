"""The audit's counts over a set of documents, their merge, and the report they make.

A `Tally` holds sums only (counts, the toxicity histogram, the sum of scores), so the tallies of batches of
documents add up to the tally of the whole corpus. Workers tally their batches; the main process adds the
batches' tallies in corpus order, so the report (its one float sum included) is the same for any number of
workers. Notation: N documents; for a group g (a pronoun family or an identity axis) of terms t:

    mentions(t)            occurrences of t in all documents (matching as in terms.py)
    documents(t)           documents with at least one occurrence of t
    mentions(g)            sum of mentions(t) over the terms of g
    documents(g)           documents with at least one term of g (not the sum of documents(t): a document
                           with "she" and "her" counts once for the family she)
    share_of_documents     documents(.) / N: Llama 2's "% documents" for pronouns and identity axes
    share_of_group         mentions(t) / mentions(g): its "% of mentions" of a descriptor within its axis

Worked example, the two documents "She said her name." and "They met him and her.":

    she family:   mentions she 1 + her 2 = 3,  documents 2 (both), share_of_documents 1.0
    he family:    mentions him 1,              documents 1,        share_of_documents 0.5
    they family:  mentions they 1,             documents 1,        share_of_documents 0.5
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from lmforge.data.audit.terms import Key, TermList
from lmforge.data.audit.toxicity import BINS, EDGES, score_bin

TOP_TERMS = 5  # terms listed per group in the report's table (the JSON has all of them)


@dataclass
class Tally:
    """Sums over documents (module docstring)."""

    documents: int = 0
    words: int = 0
    characters: int = 0
    mentions: Counter = field(default_factory=Counter)  # Key -> occurrences
    term_documents: Counter = field(default_factory=Counter)  # Key -> documents with the term
    group_documents: Counter = field(default_factory=Counter)  # (section, group) -> documents with any of its terms
    toxicity_bins: list[int] = field(default_factory=lambda: [0] * BINS)
    toxicity_sum: float = 0.0
    toxicity_max: float = 0.0
    toxicity_nonzero: int = 0
    toxicity_at_least: int = 0  # documents scoring >= the threshold
    language_documents: Counter = field(default_factory=Counter)  # ISO code -> documents
    language_characters: Counter = field(default_factory=Counter)  # ISO code -> characters

    def add(self, characters: int, words: int, found: Counter, score: float, threshold: float,
            language: str) -> None:
        """Count one document: its length, the terms `found` in it (Key -> occurrences), its toxicity score
        and its language."""
        self.documents += 1
        self.words += words
        self.characters += characters
        self.mentions.update(found)
        self.term_documents.update(found.keys())
        self.group_documents.update({(section, group) for section, group, _ in found})
        self.toxicity_bins[score_bin(score)] += 1
        self.toxicity_sum += score
        self.toxicity_max = max(self.toxicity_max, score)
        self.toxicity_nonzero += score > 0
        self.toxicity_at_least += score >= threshold
        self.language_documents[language] += 1
        self.language_characters[language] += characters

    def merge(self, other: "Tally") -> None:
        """Add the sums of `other` (the tally of the documents that follow this one's)."""
        for name in ("documents", "words", "characters", "toxicity_sum", "toxicity_nonzero", "toxicity_at_least"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.toxicity_max = max(self.toxicity_max, other.toxicity_max)
        for name in ("mentions", "term_documents", "group_documents", "language_documents", "language_characters"):
            getattr(self, name).update(getattr(other, name))
        self.toxicity_bins = [a + b for a, b in zip(self.toxicity_bins, other.toxicity_bins)]

    # ---- the report ----------------------------------------------------------------------------------------
    def report(self, terms: TermList, threshold: float) -> dict:
        """The audit's figures as a JSON-ready dict: pronouns, identity, toxicity, languages."""
        n = self.documents

        def share(count: int, total: int) -> float | None:
            return count / total if total else None

        sections: dict = {}
        for section, groups in terms.groups.items():
            sections[section] = {}
            for group in groups:
                keys = terms.keys(section, group)
                total = sum(self.mentions[k] for k in keys)
                ranked = sorted(keys, key=lambda k: (-self.mentions[k], k[2]))  # most mentioned first, then a-z
                sections[section][group] = {
                    "mentions": total,
                    "documents": self.group_documents[(section, group)],
                    "share_of_documents": share(self.group_documents[(section, group)], n),
                    "terms": {k[2]: {"mentions": self.mentions[k], "documents": self.term_documents[k],
                                     "share_of_group": share(self.mentions[k], total)}
                              for k in ranked},
                }
        languages = sorted(self.language_documents, key=lambda code: (-self.language_documents[code], code))
        return {
            "documents": n, "words": self.words, "characters": self.characters,
            **sections,
            "toxicity": {
                "mean": self.toxicity_sum / n if n else None,
                "max": self.toxicity_max if n else None,
                "threshold": threshold,
                "share_at_least_threshold": share(self.toxicity_at_least, n),
                "share_nonzero": share(self.toxicity_nonzero, n),
                "histogram": {"edges": EDGES, "counts": list(self.toxicity_bins)},
            },
            "languages": {code: {"documents": self.language_documents[code],
                                 "share_of_documents": share(self.language_documents[code], n),
                                 "characters": self.language_characters[code],
                                 "share_of_characters": share(self.language_characters[code], self.characters)}
                          for code in languages},
        }


def top_terms(group: dict, k: int = TOP_TERMS) -> list[tuple[str, dict]]:
    """The `k` most mentioned terms of a group of the report that are mentioned at all."""
    return [(t, v) for t, v in group["terms"].items() if v["mentions"]][:k]
