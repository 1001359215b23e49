"""How different K answers to one prompt are from each other: self-BLEU and distinct-n.

Notation: a_1..a_K are K >= 2 sampled answers to the same prompt; words are sacrebleu's "13a" tokens (the
tokenization of WMT's mteval: punctuation split from words, case kept), for both measures.

Self-BLEU (Zhu et al., 2018, "Texygen"; the measure of Llama 2's Figure 21) scores each answer with BLEU
against the other K - 1 answers as its references, and averages:

    self_bleu(a) = (1 / K) * sum_i BLEU(a_i ; {a_j : j != i})            in [0, 100]

BLEU(h ; R) is sacrebleu's corpus BLEU of the one-segment corpus [h] with the K - 1 references R: clipped
n-gram precisions p_1..p_4 (an n-gram of h counts at most as often as in the reference that has it most),
exponential smoothing of zero precisions (the first zero counts as 1/2 of a match, the next as 1/4, ...), the
effective order (orders with no n-gram in h are left out, so a 3-word answer is scored on 1- to 3-grams), and
the brevity penalty against the reference length closest to len(h). High self-BLEU: the answers repeat each
other; 100: all K are the same (non-empty) text.

Worked example, K = 3 answers "the cat sat", "the cat ran", "a dog ran" (no brevity penalty: all 3 words):

    h = the cat sat ; R = {the cat ran, a dog ran}:  p1 = 2/3 (the, cat), p2 = 1/2 (the cat),
        p3 = 0/1 -> smoothed 1/(2*1)                            BLEU = (66.67 * 50 * 50)^(1/3) = 55.03
    h = the cat ran:  p1 = 3/3, p2 = 1/2, p3 = 0/1 -> 1/2       BLEU = (100 * 50 * 50)^(1/3)   = 63.00
    h = a dog ran:    p1 = 1/3, p2 = 0/2 -> 1/(2*2), p3 = 0/1 -> 1/(4*1)
                                                                BLEU = (33.33 * 25 * 25)^(1/3) = 27.52
    self_bleu = (55.03 + 63.00 + 27.52) / 3 = 48.52

distinct-n (Li et al., 2016): the share of the answers' n-grams that are distinct, pooled over the K answers,

    distinct_n(a) = |{n-grams of all a_i}| / (number of n-grams of all a_i)     in [0, 1], None without n-grams

e.g. "the cat sat", "the cat ran": 4 distinct of 6 words (distinct-1 = 0.67), 3 distinct of 4 bigrams (0.75).
NOTE: Li et al. divide by the number of words; dividing by the number of n-grams keeps every order in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache


class DiversityError(ValueError):
    """Answers that a diversity measure cannot score."""


@cache
def _bleu():
    from sacrebleu.metrics import BLEU

    return BLEU(effective_order=True)  # 13a tokens, 4-grams, exponential smoothing (sacrebleu's defaults)


def tokens(text: str) -> list[str]:
    """The words both measures count (sacrebleu's 13a tokenization)."""
    return _bleu().tokenizer(text.rstrip()).split()


def self_bleu(answers: Sequence[str]) -> float:
    """Mean BLEU of each answer against the others (module docstring), in [0, 100]."""
    if len(answers) < 2:
        raise DiversityError(f"self-BLEU needs at least 2 answers to a prompt, got {len(answers)}")
    bleu = _bleu()
    scores = [bleu.corpus_score([h], [[r] for j, r in enumerate(answers) if j != i]).score
              for i, h in enumerate(answers)]
    return sum(scores) / len(scores)


def distinct_n(answers: Sequence[str], n: int) -> float | None:
    """Distinct n-grams / all n-grams, pooled over the answers (module docstring); None if there are none."""
    if n < 1:
        raise DiversityError(f"distinct-n needs n >= 1, got {n}")
    grams = [tuple(t[i : i + n]) for a in answers for t in [tokens(a)] for i in range(len(t) - n + 1)]
    return len(set(grams)) / len(grams) if grams else None
