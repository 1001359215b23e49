"""Toxicity scores of documents: a word-list scorer that says what it is, or a classifier of the user's.

A scorer is any callable `text -> score` with the score in [0, 1], higher meaning more toxic. Llama 2 scored
its pre-training documents with a classifier (a HateBERT model fine-tuned on ToxiGen) and reported the
distribution of the scores and the share of documents at 0.5 or above. lmforge ships no classifier (it would
be model weights, downloaded at run time); it ships `LexiconScorer` and takes a real classifier from the user.

`LexiconScorer` counts words of a word list, hits per word:

    score = hits / words        (0 for a document without words; words as in terms.py)
    "You idiot, you FOOL!"  ->  words you idiot you fool (4), hits idiot fool (2)  ->  0.5

It is a word list, not a classifier: it sees no context, no sense, no sarcasm, and with a fixed number of words
the score grows with the number of hits and with nothing else. The list shipped beside this file
(toxicity_words.txt) is a PLACEHOLDER of mild insults, so that the audit measures something and its arithmetic
is testable without shipping slurs; a real audit plugs in a real list (`--toxicity_words FILE`, one word per
line) or, better, a classifier:

    # my_toxicity.py                                   lmforge data audit --toxicity_scorer my_toxicity:score
    import functools

    @functools.cache
    def _classifier():                                 # loaded once per worker process, on first use
        from transformers import pipeline
        return pipeline("text-classification", model="PATH/TO/A/TOXICITY/MODEL", truncation=True, top_k=None)

    def score(text: str) -> float:                     # the probability of the toxic class
        return next(s["score"] for s in _classifier()(text)[0] if s["label"] == "toxic")

The distribution is a histogram of BINS equal bins over [0, 1]; bin i holds the scores in [i/BINS, (i+1)/BINS),
the last bin also 1.0. Worked example with BINS = 100: 0.0 -> bin 0, 0.005 -> 0, 0.29 -> 29, 0.5 -> 50,
1.0 -> 99. The bin is found by bisection on the edges i/BINS, so a score equal to an edge (0.29) lands in the
bin that starts there, which `int(0.29 * 100) = 28` would get wrong.
"""

from __future__ import annotations

import bisect
import importlib
import math
import os
from collections.abc import Callable
from pathlib import Path

from lmforge.data.audit.terms import WORD, words

BINS = 100
EDGES = [i / BINS for i in range(BINS + 1)]
SHIPPED = Path(__file__).with_name("toxicity_words.txt")

Scorer = Callable[[str], float]


class ToxicityScorerError(ValueError):
    """A scorer that cannot be loaded, or a score outside [0, 1] (the message names the scorer or document)."""


class LexiconScorer:
    """score(text) = (words of text in the list) / (words of text); module docstring."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path is not None else SHIPPED
        self.words = read_word_list(self.path)

    def __call__(self, text: str) -> float:
        return self.score_words(words(text))

    def score_words(self, found: list[str]) -> float:
        """The score of a text whose words (terms.words) are `found`."""
        return sum(w in self.words for w in found) / len(found) if found else 0.0

    def describe(self) -> str:
        shipped = " (the placeholder list shipped with lmforge)" if self.path == SHIPPED else ""
        return f"word list {self.path.name}{shipped}: {len(self.words)} words, score = hits per word"


def read_word_list(path: Path) -> frozenset[str]:
    """The words of a word-list file: one word (a run of letters) per line, '#' comments, blank lines skipped."""
    if not path.is_file():
        raise ToxicityScorerError(f"toxicity word list {path} not found")
    found = set()
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        entry = line.split("#", 1)[0].strip().lower()
        if not entry:
            continue
        if not WORD.fullmatch(entry):
            raise ToxicityScorerError(f"{path}:{n}: {entry!r} is not one word of letters (the scorer counts words)")
        found.add(entry)
    if not found:
        raise ToxicityScorerError(f"{path} lists no words")
    return frozenset(found)


def load_scorer(scorer: str | Scorer | None = None, word_list: str | os.PathLike | None = None) -> tuple[Scorer, str]:
    """The scorer to use and a line that says what it is: `scorer` ("module:name" of a callable, or the callable
    itself), else a LexiconScorer over `word_list` (None: the shipped placeholder list)."""
    if scorer is not None and word_list is not None:
        raise ToxicityScorerError("give a toxicity scorer or a toxicity word list, not both")
    if scorer is None:
        lexicon = LexiconScorer(word_list)
        return lexicon, lexicon.describe()
    if callable(scorer):
        return scorer, f"the callable {getattr(scorer, '__qualname__', repr(scorer))}"
    module, sep, name = str(scorer).partition(":")
    if not sep or not module or not name:
        raise ToxicityScorerError(f"toxicity scorer {scorer!r} must be 'module:name' (a callable text -> score)")
    try:
        found = getattr(importlib.import_module(module), name)
    except ImportError as e:
        raise ToxicityScorerError(f"cannot import the toxicity scorer's module {module!r}: {e}") from None
    except AttributeError:
        raise ToxicityScorerError(f"module {module!r} has no {name!r} (the toxicity scorer)") from None
    if not callable(found):
        raise ToxicityScorerError(f"toxicity scorer {scorer!r} is a {type(found).__name__}, not a callable")
    return found, f"classifier {scorer} (a callable of the user's)"


def checked_score(value: object, where: str) -> float:
    """`value` as a float in [0, 1], or ToxicityScorerError naming the document `where`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0.0 <= value <= 1.0:
        raise ToxicityScorerError(f"{where}: the toxicity scorer returned {value!r}; a score must be a number "
                                  "in [0, 1]")
    return float(value)


def score_bin(score: float) -> int:
    """The histogram bin of a score in [0, 1] (module docstring: bisection on the edges)."""
    return min(bisect.bisect_right(EDGES, score) - 1, BINS - 1)
