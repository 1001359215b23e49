"""`lmforge <verb>`: every verb is one typed Python function whose docstring is its `--help`.

The command line is built by jsonargparse from the function signatures (STYLE.md item 14): each verb takes
`--config file.yaml` (values from the file, overridden by flags given after it), dotted overrides for
nested dataclass arguments, and nested verbs (`lmforge tokenizer train`). Functions are imported lazily
inside `_verbs()` so that `lmforge --help` stays fast and one verb's heavy imports do not slow another.
"""

from __future__ import annotations

import sys


def _verbs() -> dict:
    from lmforge.models.convert import convert

    return {
        "convert": convert,
    }


def main(argv: list[str] | None = None) -> None:
    from jsonargparse import CLI

    CLI(_verbs(), args=argv if argv is not None else sys.argv[1:], as_positional=True)


if __name__ == "__main__":
    main()
