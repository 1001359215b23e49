"""Self-BLEU and distinct-n: hand-computed values, and self-BLEU against sacrebleu's corpus BLEU over the same
leave-one-out references built by hand."""

import random

import pytest
import sacrebleu

from lmforge.analyze.diversity import DiversityError, distinct_n, self_bleu, tokens


def test_self_bleu_worked_example():
    # diversity.py's docstring: clipped precisions, exponential smoothing of zeros, effective order 3
    per_answer = [(200 / 3 * 50 * 50) ** (1 / 3), (100 * 50 * 50) ** (1 / 3), (100 / 3 * 25 * 25) ** (1 / 3)]
    assert [round(b, 2) for b in per_answer] == [55.03, 63.00, 27.52]
    assert self_bleu(["the cat sat", "the cat ran", "a dog ran"]) == pytest.approx(sum(per_answer) / 3, rel=1e-12)


def test_self_bleu_is_sacrebleus_corpus_bleu_over_leave_one_out_references():
    rng = random.Random(0)
    vocab = "the a fox dog river sang ran softly quiet hill by near , . and it was".split()
    for k in (2, 3, 5, 8):
        answers = [" ".join(rng.choice(vocab) for _ in range(rng.randint(1, 14))) for _ in range(k)]
        by_hand = []
        for i, hypothesis in enumerate(answers):
            references = [[r] for j, r in enumerate(answers) if j != i]  # K - 1 reference streams of one segment
            by_hand.append(sacrebleu.corpus_bleu([hypothesis], references, use_effective_order=True).score)
        assert self_bleu(answers) == pytest.approx(sum(by_hand) / k, rel=1e-12, abs=1e-12)
        # the same numbers as sacrebleu's sentence-level BLEU (effective order is its default there)
        assert by_hand == pytest.approx([sacrebleu.sentence_bleu(h, [r for j, r in enumerate(answers) if j != i]).score
                                         for i, h in enumerate(answers)], rel=1e-12, abs=1e-12)


def test_self_bleu_extremes_and_errors():
    assert self_bleu(["Once, a red fox sang."] * 4) == pytest.approx(100.0)
    assert self_bleu(["red fox", "blue whale"]) == 0.0  # no shared n-gram at all
    assert self_bleu(["", ""]) == 0.0
    with pytest.raises(DiversityError, match="at least 2 answers"):
        self_bleu(["alone"])


def test_distinct_n_worked_example():
    answers = ["the cat sat", "the cat ran"]
    assert distinct_n(answers, 1) == 4 / 6 and distinct_n(answers, 2) == 3 / 4
    assert distinct_n(["Hi.", "Hi."], 1) == 2 / 4  # "Hi" "." twice: 13a splits the full stop
    assert distinct_n(["one", "two"], 2) is None  # no bigrams
    assert tokens("Hello, world.") == ["Hello", ",", "world", "."]
    with pytest.raises(DiversityError):
        distinct_n(answers, 0)
