"""Analyses of the papers that measure models rather than train them.

    diversity.py      self-BLEU and distinct-n of a prompt's sampled answers
    temperature.py    `lmforge analyze temperature`: diversity against temperature per model (Llama 2, section 5.1)
"""
