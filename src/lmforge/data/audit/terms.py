"""Words, and the pronoun and identity terms the audit counts in them.

Words. A document's words are its maximal runs of letters, in any script, lowercased: digits, punctuation,
apostrophes and hyphens separate words.

    "She's non-binary; HE isn't."  ->  she s non binary he isn t

The term list (terms.yaml beside this file, or a user's file of the same shape) has two sections: `pronouns`
(family -> words: she, he, they) and `identity` (axis -> terms: religion, gender and sex, nationality, race and
ethnicity, sexual orientation). A term may be several words ("native american"); it is written as text and
split into words the same way, so "non-binary" in a file is the two words non binary. A term may appear in one
group only: the audit must be able to say which group a mention belongs to.

Matching (`match_terms`) goes left to right and takes, at each word, the longest term that starts there;
matched words are consumed, so matches never overlap. Worked example, with "african american" in race and
ethnicity and "american" in nationality:

    words     the african american and american writers
    i = 0     "the": no term starts here
    i = 1     "african american" (2 words) is a term -> race and ethnicity; continue at i = 3
    i = 3     "and": none;  i = 4: "american" -> nationality;  i = 5: "writers": none
    result    {("identity", "race and ethnicity", "african american"): 1, ("identity", "nationality", "american"): 1}
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

WORD = re.compile(r"[^\W\d_]+")  # a run of letters: \w without digits and the underscore
SECTIONS = ("pronouns", "identity")
SHIPPED = Path(__file__).with_name("terms.yaml")

Key = tuple[str, str, str]  # (section, group, term): ("pronouns", "she", "her")


class TermListError(ValueError):
    """A term list file that cannot be used (the message names the file and the entry)."""


def words(text: str) -> list[str]:
    """The words of `text` (module docstring)."""
    return WORD.findall(text.lower())


@dataclass(frozen=True)
class TermList:
    """The groups of each section, in file order, and every term's key by its words."""

    path: str  # where the list came from, for the report
    groups: dict[str, tuple[str, ...]]  # section -> its groups, e.g. "pronouns" -> ("she", "he", "they")
    terms: dict[tuple[str, ...], Key]  # ("native", "american") -> ("identity", "race and ethnicity", "native american")
    starts: dict[str, tuple[int, ...]]  # first word -> the lengths of the terms it starts, longest first

    def keys(self, section: str, group: str) -> list[Key]:
        """The keys of one group's terms, in file order."""
        return [k for k in self.terms.values() if k[0] == section and k[1] == group]


def load_terms(path: str | os.PathLike | None = None) -> TermList:
    """The term list at `path` (None: the list shipped with lmforge, terms.yaml), checked."""
    from lmforge.io import read_yaml

    path = Path(path) if path is not None else SHIPPED
    if not path.is_file():
        raise TermListError(f"term list {path} not found")
    data = read_yaml(path)
    if not isinstance(data, dict) or set(data) != set(SECTIONS):
        raise TermListError(f"{path}: a term list has exactly the sections {' and '.join(SECTIONS)}")
    groups: dict[str, tuple[str, ...]] = {}
    terms: dict[tuple[str, ...], Key] = {}
    for section in SECTIONS:
        if not isinstance(data[section], dict) or not data[section]:
            raise TermListError(f"{path}: {section} must map group names to lists of terms")
        groups[section] = tuple(str(g) for g in data[section])
        for group, entries in data[section].items():
            if not isinstance(entries, list) or not entries:
                raise TermListError(f"{path}: {section}.{group} must be a non-empty list of terms")
            for entry in entries:
                split = tuple(words(str(entry)))
                if not split:
                    raise TermListError(f"{path}: {section}.{group}: {entry!r} holds no letters")
                if split in terms:
                    other = terms[split]
                    raise TermListError(f"{path}: {entry!r} is listed in {other[0]}.{other[1]} and in "
                                        f"{section}.{group}; a term may belong to one group only")
                terms[split] = (section, str(group), " ".join(split))
    starts: dict[str, set[int]] = {}
    for split in terms:
        starts.setdefault(split[0], set()).add(len(split))
    name = "terms.yaml shipped with lmforge" if path == SHIPPED else str(path)
    return TermList(name, groups, terms, {w: tuple(sorted(n, reverse=True)) for w, n in starts.items()})


def match_terms(text_words: list[str], terms: TermList) -> Counter[Key]:
    """Occurrences of each term in `text_words`: left to right, longest first, no overlaps (module docstring)."""
    found: Counter[Key] = Counter()
    i, n = 0, len(text_words)
    while i < n:
        step = 1
        for length in terms.starts.get(text_words[i], ()):  # most words start no term: one dict look-up
            key = terms.terms.get(tuple(text_words[i : i + length]))
            if key is not None:
                found[key] += 1
                step = length
                break
        i += step
    return found
