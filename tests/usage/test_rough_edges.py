"""Issue 13, rough edges: what the verbs print, --help, --version, lazy imports, and defaults that chain."""

import argparse
import io
import json
import subprocess
import sys

import pytest
from jsonargparse import capture_parser
from usage_helpers import run_cli

from helpers import tiny_tokenizer_path
from lmforge.cli import VERBS, _run, _summary, main
from lmforge.infer.detokenize import TextStream
from lmforge.infer.generate import generate
from lmforge.infer.sampling import SamplingParams
from lmforge.models.checkpoint import load_model
from lmforge.tokenizer import Tokenizer


def _verbs(node=VERBS, path=()):
    for name, target in node.items():
        if name == "_help":
            continue
        if isinstance(target, dict):
            yield from _verbs(target, (*path, name))
        else:
            yield (*path, name), target


VERB_PATHS = [path for path, _ in _verbs()]


@pytest.mark.parametrize("path", VERB_PATHS, ids=" ".join)
def test_help_describes_every_argument_without_noise(path, capsys):
    """--help printed `(type: <class 'Path'>)`, sent --sampling.seed to "the module docstring", and left
    arguments undescribed."""
    parser = capture_parser(lambda: _run([*path]))
    for name in path:  # from the wrapper down to the verb's own parser
        (verbs,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        parser = verbs.choices[name]
    undescribed = [a.dest for a in parser._actions if a.dest not in ("help", "config", "print_config")
                   and not (a.help or "").strip()]
    assert undescribed == []
    with pytest.raises(SystemExit):
        main([*path, "--help"])
    text = capsys.readouterr().out
    assert "<class" not in text and "module docstring" not in text and "REFERENCE" not in text
    assert text.startswith(f"usage: lmforge {' '.join(path)} [-h] [--config CONFIG] [options]")


def test_top_level_help_lists_every_verb_with_its_docstring_and_groups_are_described(capsys):
    """`lmforge --help` left `tokenizer` and `data` undescribed; each verb shows its function's summary."""
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name, target in VERBS.items():
        summary = target["_help"] if isinstance(target, dict) else _summary(target)
        assert f"{name} {summary}" in text
    import lmforge.infer.cli

    assert _summary("lmforge.infer.cli:chat") == " ".join(lmforge.infer.cli.chat.__doc__.split("\n\n")[0].split())
    assert "/reset" in _summary("lmforge.infer.cli:chat") and "/exit" in _summary("lmforge.infer.cli:chat")


def test_version_and_a_short_parse_error(capsys):
    """No --version; a parse error printed ~48 lines of usage before the error."""
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"lmforge {__import__('lmforge').__version__}"
    code, _, err = run_cli(["pretrain", "--no_such_option", "1"], capsys)
    assert code == 2 and len(err.strip().splitlines()) <= 3 and "no_such_option" in err.strip().splitlines()[-1]


def test_help_imports_no_torch():
    """`lmforge --help` took 2-4 s because every verb (and torch) was imported for it."""
    code = ("import sys, lmforge.cli\n"
            "for args in (['--help'], ['tokenizer', '--help'], ['--version']):\n"
            "    try:\n        lmforge.cli.main(args)\n    except SystemExit:\n        pass\n"
            "print(sorted(m for m in ('torch', 'numpy', 'sentencepiece') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_tokenizer_train_says_what_it_wrote_and_defaults_chain_under_runs(corpus, tmp_path, capsys, monkeypatch):
    """`tokenizer train` printed nothing and wrote tokenizer/ in the current folder; `data prepare` wrote
    data/tokens and did not find the tokenizer by default. Now: runs/tokenizer, then runs/data, defaults only."""
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(["tokenizer", "train", "--data", corpus, "--vocab_size", "320"], capsys)
    assert code == 0 and "wrote runs/tokenizer/tokenizer.model: 320 pieces" in err
    code, _, err = run_cli(["data", "prepare", "--data", corpus, "--workers", "1"], capsys)
    assert code == 0 and "-> runs/data" in err
    manifest = json.loads((tmp_path / "runs" / "data" / "manifest.json").read_text())
    assert manifest["settings"]["tokenizer_sha256"] == Tokenizer("runs/tokenizer").sha256
    code, _, err = run_cli(["data", "prepare", "--data", corpus, "--workers", "1", "--seed", "1"], capsys)
    assert code == 2 and "pass --overwrite true" in err and "overwrite=True" not in err


def test_eval_shows_progress(model_dir, token_dir, capsys):
    """`eval` showed nothing during a 40 s run."""
    code, out, err = run_cli(["eval", "loss", model_dir, token_dir, "--batch_size", "2", "--seq_len", "64",
                              "--max_batches", "3"], capsys)
    assert code == 0 and "eval [validation]" in err and "3/3" in err and "perplexity" in out


def test_first_space_of_a_completion_is_kept():
    """"The module" -> "is..." dropped the space: the continuation is decoded after the end of its prompt."""
    tok = Tokenizer(tiny_tokenizer_path())
    prompt, more = tok.encode("The quick", bos=True), tok.encode("brown fox jumps")
    stream = TextStream(tok, context=prompt[-6:])
    text = "".join(stream.add(i)[0] for i in more) + stream.finish()
    assert text == " brown fox jumps" == tok.decode(prompt + more)[len(tok.decode(prompt)):]
    bare = TextStream(tok)  # without the prompt: SentencePiece drops the first piece's space
    assert "".join(bare.add(i)[0] for i in more) + bare.finish() == "brown fox jumps"


def test_generate_keeps_the_space_and_says_once_that_the_context_clips_max_new_tokens(model_dir, capsys):
    """max_new_tokens 100 silently became 27 when the prompt nearly filled the context; say it once."""
    model, tok = load_model(model_dir).eval(), Tokenizer(model_dir / "tokenizer.model")
    long_prompt = " ".join(["fox"] * 400)
    ids = tok.encode(long_prompt, bos=True)[:250]
    prompt = tok.decode(ids)
    assert tok.encode(prompt, bos=True) == ids  # the text gives back the same 250 ids
    args = ["generate", model_dir, "--prompts", json.dumps([prompt, "The quick"]), "--sampling.temperature", "0",
            "--sampling.max_new_tokens", "20"]
    code, out, err = run_cli(args, capsys)
    assert code == 0
    notes = [line for line in err.splitlines() if "max_new_tokens 20" in line]
    assert len(notes) == 1 and "prompt 1 (250 tokens) gets at most 6 new tokens" in notes[0]
    first, second = generate(model, tok, [ids, tok.encode("The quick", bos=True)],
                             SamplingParams(temperature=0, max_new_tokens=20))
    assert len(first.token_ids) == 6 and first.finish_reason == "length"
    assert out == f"[{prompt}]{first.text}\n{'-' * 40}\n[The quick]{second.text}\n"
    assert second.text == tok.decode(second.prompt_ids + second.token_ids)[len("The quick"):]


def test_chat_banner_names_its_commands(model_dir, capsys, monkeypatch):
    """chat's /reset and /exit were only in a docstring: a one-line banner says them."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("/exit\n"))
    code, out, err = run_cli(["chat", model_dir], capsys)
    assert code == 0 and out == ""
    banner = [line for line in err.splitlines() if line.startswith("chatting with")]
    assert len(banner) == 1 and "/reset" in banner[0] and "/exit" in banner[0]
