"""The pre-training data audit (`lmforge data audit`): Llama 2's section 4.1 for any corpus.

    terms.py          words, and the pronoun and identity term list (terms.yaml) matched in them
    toxicity.py       the scorer interface (text -> score in [0, 1]), the word-list scorer, the histogram bins
    language.py       the language of a document (langid.py)
    tally.py          the counts over documents, their merge, the JSON report
    report.py         the Markdown tables and the plots
    audit.py          the verb: reading corpora or token shards, the worker pool, the output folder
"""

from lmforge.data.audit.audit import audit_data

__all__ = ["audit_data"]
