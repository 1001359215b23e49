"""Toxicity scorers for tests/data/test_audit.py, imported by name ("audit_scorers:by_length") in the audit's
worker processes, as a user's classifier module would be."""


def by_length(text: str) -> float:
    """A stand-in classifier with hand-checkable scores: 0.29 for texts under 30 characters, else 0.75."""
    return 0.29 if len(text) < 30 else 0.75


def out_of_range(text: str) -> float:
    return 1.5


def broken(text: str) -> float:
    raise RuntimeError("the model is not loaded")


NOT_CALLABLE = 0.5
