"""`lmforge <verb>`: every verb is one typed Python function whose docstring is its `--help`.

The command line is built by jsonargparse from the function signatures (STYLE.md item 14): each verb takes
`--config file.yaml` (values from the file, overridden by flags given after it), dotted overrides for
nested dataclass arguments, and nested verbs (`lmforge tokenizer train`). Functions are imported lazily
inside `_verbs()` so that `lmforge --help` stays fast and one verb's heavy imports do not slow another.
"""

from __future__ import annotations

import os
import sys


def _verbs() -> dict:
    from lmforge.align.eval_chat import eval_chat
    from lmforge.align.dpo import dpo
    from lmforge.align.rm import rm_train
    from lmforge.align.sft import sft
    from lmforge.align.world.build import build_world
    from lmforge.models.convert import convert
    from lmforge.infer.cli import chat, generate_cli
    from lmforge.lora_export import export_lora
    from lmforge.train.evaluate import evaluate
    from lmforge.train.pretrain import pretrain
    from lmforge.data.prepare import prepare_data
    from lmforge.tokenizer.train import train_tokenizer

    return {
        "convert": convert,
        "generate": generate_cli,
        "chat": chat,
        "pretrain": pretrain,
        "sft": sft,
        "rm": {"train": rm_train},
        "dpo": dpo,
        "eval": {"loss": evaluate, "chat": eval_chat},
        "world": {"build": build_world},
        "tokenizer": {"train": train_tokenizer},
        "data": {"prepare": prepare_data},
        "lora": {"export": export_lora},
    }


def main(argv: list[str] | None = None) -> None:
    """Run a verb. Bad input (our errors are ValueError / OSError subclasses) ends with a one-line message
    and exit status 2 instead of a traceback; set LMFORGE_DEBUG=1 to see the traceback."""
    from jsonargparse import CLI

    try:
        CLI(_verbs(), args=argv if argv is not None else sys.argv[1:], as_positional=True)
    except (ValueError, OSError) as e:
        if os.environ.get("LMFORGE_DEBUG"):
            raise
        print(f"lmforge: error: {e}", file=sys.stderr)
        sys.exit(2)
    if "lmforge.parallel" in sys.modules:  # the verb may have joined a process group (torchrun): end cleanly
        sys.modules["lmforge.parallel"].exit_distributed_worker()


if __name__ == "__main__":
    main()
