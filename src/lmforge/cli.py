"""`lmforge <verb>`: every verb is one typed Python function whose docstring is its `--help`.

The command line is built by jsonargparse from the function signatures: each verb takes `--config file.yaml`
(values from the file, overridden by flags given after it), dotted overrides for nested dataclass arguments
(`--sampling.temperature 0`), and verbs may be nested (`lmforge tokenizer train`).

`VERBS` names each verb's function as "module:function". Only the verb being run is imported, so one verb's
heavy imports (torch alone takes seconds) never slow another, and `lmforge --help` imports nothing heavy at
all: it lists the verbs with the first paragraph of each function's docstring, read from the source file.

Bad input (our errors are ValueError / OSError subclasses) ends with one line, `lmforge: error: ...`, and exit
status 2; Ctrl-C ends with `lmforge: interrupted` and status 130 (128 + SIGINT, the shell's convention).
LMFORGE_DEBUG=1 shows the traceback instead.
"""

from __future__ import annotations

import ast
import os
import sys
from pathlib import Path

VERBS: dict = {
    "convert": "lmforge.export:convert",
    "generate": "lmforge.infer.cli:generate_cli",
    "chat": "lmforge.infer.cli:chat",
    "pretrain": "lmforge.train.pretrain:pretrain",
    "sft": "lmforge.align.sft:sft",
    "preferences": {"_help": "Preference data: `lmforge preferences collect` samples two answers per prompt and "
                             "labels them with the chat world's oracle (Llama 2's degrees and safety bins).",
                    "collect": "lmforge.align.preferences:collect_preferences"},
    "rm": {"_help": "Reward models: `rm train` (Llama 2's ranking loss with margins), `rm eval` (accuracy per "
                    "degree and safety bin, calibration), `rm score` (scores of dialogues).",
           "train": "lmforge.align.rm:rm_train",
           "eval": "lmforge.align.rm_eval:rm_eval",
           "score": "lmforge.align.rm_eval:rm_score"},
    "dpo": "lmforge.align.dpo:dpo",
    "rs": "lmforge.align.rs:rs",
    "ppo": "lmforge.align.ppo:ppo",
    "grpo": "lmforge.align.grpo:grpo",
    "rlhf": "lmforge.align.rlhf:rlhf",
    "gatt": "lmforge.align.gatt:gatt",
    "distill-safety": "lmforge.align.distill:distill_safety",
    "redteam": "lmforge.align.redteam:redteam",
    "serve": "lmforge.serve.server:serve",
    "eval": {"_help": "Evaluations: `eval loss` (loss and perplexity of token shards), `eval chat` (the chat "
                      "world's prompt sets, scored by its checkers), `eval gatt` (instruction adherence and "
                      "attention on the instruction by turn).",
             "loss": "lmforge.train.evaluate:evaluate",
             "chat": "lmforge.align.eval_chat:eval_chat",
             "gatt": "lmforge.align.eval_gatt:eval_gatt"},
    "world": {"_help": "The verifiable chat world: `lmforge world build` writes its corpus, SFT data and prompt "
                       "sets.",
              "build": "lmforge.align.world.build:build_world"},
    "tokenizer": {"_help": "Tokenizers: `lmforge tokenizer train` trains a SentencePiece BPE tokenizer.",
                  "train": "lmforge.tokenizer.train:train_tokenizer"},
    "data": {"_help": "Data sets: `lmforge data prepare` tokenizes corpora into token shards; `lmforge data audit` "
                      "counts pronouns, identity terms, toxicity and languages in a corpus.",
             "prepare": "lmforge.data.prepare:prepare_data",
             "audit": "lmforge.data.audit.audit:audit_data"},
    "analyze": {"_help": "Analyses of models: `lmforge analyze temperature` (answer diversity against temperature, "
                         "factual and creative prompts, Llama 2's Figure 21).",
                "temperature": "lmforge.analyze.temperature:analyze_temperature"},
    "lora": {"_help": "LoRA adapters: `lmforge lora export` writes them merged or as a peft adapter folder.",
             "export": "lmforge.lora_export:export_lora"},
}


def main(argv: list[str] | None = None) -> None:
    """Run the verb named by `argv` (default: the command line)."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        _run(args)
    except KeyboardInterrupt:
        if os.environ.get("LMFORGE_DEBUG"):
            raise
        print("\nlmforge: interrupted", file=sys.stderr)
        sys.exit(130)
    except (ValueError, OSError) as e:
        if os.environ.get("LMFORGE_DEBUG"):
            raise
        print(f"lmforge: error: {e}", file=sys.stderr)
        sys.exit(2)
    if "lmforge.parallel" in sys.modules:  # the verb may have joined a process group (torchrun): end cleanly
        sys.modules["lmforge.parallel"].exit_distributed_worker()


def _run(args: list[str]) -> None:
    node, path = VERBS, []
    while isinstance(node, dict) and len(args) > len(path) and args[len(path)] in node and args[len(path)] != "_help":
        path.append(args[len(path)])
        node = node[path[-1]]
    from jsonargparse import CLI

    if isinstance(node, str):
        components = _import(node)
        for name in reversed(path):  # only this verb, under its own name: {"tokenizer": {"train": function}}
            components = {name: components}
        _check_config_files(args[len(path):])
        CLI(components, args=args, prog="lmforge", parser_class=_parser_class(), as_positional=True)
    else:  # `lmforge`, `lmforge tokenizer`: list the verbs (--help), or say what is missing and exit
        _group_parser(node, " ".join(["lmforge", *path]), top=not path).parse_args(args[len(path):])


def _import(target: str):
    import importlib

    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def _summary(target: str) -> str:
    """The first paragraph of the docstring of `target` ("module:function"), read without importing it."""
    module, name = target.split(":")
    source = Path(__file__).parent.joinpath(*module.split(".")[1:]).with_suffix(".py")
    for node in ast.parse(source.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return " ".join((ast.get_docstring(node) or "").split("\n\n")[0].split())
    raise LookupError(f"{source} defines no function {name}")


def _group_parser(node: dict, prog: str, top: bool):
    from lmforge import __doc__ as description, __version__

    Parser = _parser_class()
    parser = Parser(prog=prog, description=description if top else node.get("_help"),
                    version=__version__ if top else None)
    verbs = parser.add_subcommands(required=True, dest="verb")
    for name, target in node.items():
        if name != "_help":
            summary = target["_help"] if isinstance(target, dict) else _summary(target)
            verbs.add_subcommand(name, Parser(), help=summary)
    return parser


def _check_config_files(args: list[str]) -> None:
    """Parse each `--config FILE` first, so that a broken YAML file is named with its line (jsonargparse
    reports only the line, in "<unicode string>")."""
    from lmforge.io import read_yaml

    for i, arg in enumerate(args):
        value = arg.removeprefix("--config=") if arg.startswith("--config=") else None
        if arg == "--config" and i + 1 < len(args):
            value = args[i + 1]
        if value is not None and Path(value).is_file():
            read_yaml(value)


def _parser_class():
    """jsonargparse's ArgumentParser with a one-line usage and the help formatter below (imported lazily)."""
    import argparse

    from jsonargparse import ArgumentParser, DefaultHelpFormatter

    class HelpFormatter(DefaultHelpFormatter):
        """jsonargparse's help, with a pathlib.Path argument's type shown as "Path".

        NOTE: jsonargparse 4.x prints "(type: <class 'Path'>)" for a required pathlib.Path argument: its
        type_to_str recognises its own Path class, not pathlib's. `Path | None` is shown right already.
        """

        def _get_type_str(self, action) -> str | None:
            if getattr(action, "_typehint", None) is Path:
                return "Path"
            return super()._get_type_str(action)

    class Parser(ArgumentParser):
        """A parser whose usage is one line: argparse's own lists every option (about 50 lines for pretrain),
        and prints all of it before each parse error."""

        def __init__(self, *args, **kwargs):
            kwargs.setdefault("formatter_class", HelpFormatter)
            super().__init__(*args, **kwargs)

        def _short_usage(self) -> str:
            prog = self.prog.replace(" [options]", "")
            verbs = [a for a in self._actions if isinstance(a, argparse._SubParsersAction)]
            if verbs and len(verbs[0].choices) == 1:  # the wrapper of the one verb being run: its usage
                return next(iter(verbs[0].choices.values()))._short_usage()
            if verbs:
                return f"{prog} [-h] {{{','.join(verbs[0].choices)}}} ..."
            positionals = [a.dest for a in self._actions if not a.option_strings]
            return " ".join([f"{prog} [-h] [--config CONFIG] [options]", *positionals])

        def format_usage(self) -> str:
            return f"usage: {self._short_usage()}\n"

        def format_help(self, *args, **kwargs) -> str:
            self.usage = self._short_usage()
            return super().format_help(*args, **kwargs)

    return Parser


if __name__ == "__main__":
    main()
