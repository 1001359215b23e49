"""The language of a document, from langid.py, whose model ships inside its package (nothing is downloaded).

    identify = LanguageIdentifier()          # the model is loaded on first use, once per process
    identify("Die Bibliothek öffnet um neun Uhr.")   # "de"; "unknown" below the confidence threshold

Llama 2 identified the language of its pre-training documents with fastText's identifier and called a document
"unknown" when no language reached a confidence of 0.5 (much of that share was program code). lmforge does the
same with langid.py (97 languages, ISO 639-1 codes) and its normalised probabilities: the label is the most
probable language when its probability is at least `threshold` (default 0.5), "unknown" otherwise, and for a
document without letters. Only the first `chars` characters are read (default 2000): the cost grows with the
length, and the start of a document tells its language as well as the whole, except for documents that mix
languages, which get one label.

NOTE: langid.py over lingua, measured on this project's 2-core machine (shared, Python 3.11; CPU seconds):

                                    langid 1.1.6                  lingua-language-detector 2.1.1
    install size                    5 MB (and numpy, ours too)    96 MB
    model load                      6.9 s (bz2 + unpickle)        1.3 s low-accuracy mode; 17 s and ~1 GB high
    speed, 1000-character documents ~95k characters/s             ~110k characters/s (low accuracy)
    a 17-language sample            all right                     all right
    one-line English ("Return the   English, p > 0.99             low accuracy: Latvian, Danish, Latin; high
      list of arguments.")                                        accuracy: English with confidence 0.1-0.5

Both label whole documents right; they differ on short ones, which jsonl corpora, chat data and the chat
world's corpus are full of: lingua's fast mode mislabels them and its accurate mode, besides loading a gigabyte,
spreads its confidence so thinly over 75 languages that a 0.5 threshold would call most of them unknown.
langid.py is also 20 times smaller. Its cost is the model load, paid once per process (the parent loads it
before the pool forks, so workers share it), and its age: the last release is from 2016, a small pure-Python
package that runs on Python 3.11 and numpy 2 in lmforge's tests. Its model is unpickled from langid's own
module, never from a file a user hands us.
"""

from __future__ import annotations

from typing import Any

UNKNOWN = "unknown"


class LanguageIdentifier:
    """text -> ISO 639-1 code of its language, or "unknown" (module docstring)."""

    def __init__(self, threshold: float = 0.5, chars: int = 2000):
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"language_threshold must be in [0, 1], got {threshold}")
        if chars < 1:
            raise ValueError(f"language_chars must be >= 1, got {chars}")
        self.threshold, self.chars = threshold, chars
        self._model: Any = None

    def load(self) -> "LanguageIdentifier":
        """Load langid.py's model now (a few seconds) rather than on the first document."""
        if self._model is None:
            self._model = _langid_model()
        return self

    def __call__(self, text: str) -> str:
        head = text[: self.chars]
        if not any(c.isalpha() for c in head):
            return UNKNOWN  # digits, punctuation, whitespace: langid would still name a language
        language, probability = self.load()._model.classify(head)
        return language if probability >= self.threshold else UNKNOWN

    def describe(self) -> str:
        import importlib.metadata

        version = importlib.metadata.version("langid")
        return (f"langid.py {version}, first {self.chars} characters, '{UNKNOWN}' below probability "
                f"{self.threshold}")


_MODEL: Any = None


def _langid_model() -> Any:
    """langid.py's identifier with normalised probabilities, built once per process."""
    global _MODEL
    if _MODEL is None:
        from langid.langid import LanguageIdentifier as Langid, model

        _MODEL = Langid.from_modelstring(model, norm_probs=True)
    return _MODEL
