"""`lmforge generate` and `lmforge chat` through the real command line, on a tiny model folder."""

import io
import json
import sys

import pytest

from infer_helpers import tiny_model, tiny_tokenizer_path
from lmforge.cli import main
from lmforge.infer.generate import generate
from lmforge.infer.sampling import SamplingParams
from lmforge.models.checkpoint import save_model
from lmforge.tokenizer.chat import encode_chat
from lmforge.tokenizer.tokenizer import Tokenizer

GREEDY = ["--sampling.temperature", "0", "--sampling.max_new_tokens", "8"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "model"
    save_model(tiny_model("tiny"), path, tokenizer_path=tiny_tokenizer_path())
    return path


def _expected(ids, max_new=8):
    tok = Tokenizer(tiny_tokenizer_path())
    (r,) = generate(tiny_model("tiny"), tok, [ids], SamplingParams(temperature=0, max_new_tokens=max_new))
    return r


def test_generate_one_prompt_as_text(folder, capsys):
    main(["generate", str(folder), "--prompts", "The quick brown fox", *GREEDY])
    tok = Tokenizer(tiny_tokenizer_path())
    assert capsys.readouterr().out == _expected(tok.encode("The quick brown fox", bos=True)).text + "\n"


def test_generate_jsonl_from_a_prompt_file(folder, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    dialogue = [{"role": "user", "content": "Hello there"}]
    prompts.write_text(
        json.dumps("Sliding window") + "\n\n" + json.dumps({"prompt": "A rolling buffer"}) + "\n"
        + json.dumps({"messages": dialogue}) + "\n"
    )
    out = tmp_path / "out.jsonl"
    main(["generate", str(folder), "--prompt_file", str(prompts), "--format", "jsonl", "--output", str(out),
          "--batch_size", "2", "--sampling.logprobs", "true", *GREEDY])
    records = [json.loads(line) for line in out.read_text().splitlines()]
    tok = Tokenizer(tiny_tokenizer_path())
    ids = [tok.encode("Sliding window", bos=True), tok.encode("A rolling buffer", bos=True),
           encode_chat(tok, dialogue, add_generation_prompt=True).ids]
    assert [r["index"] for r in records] == [0, 1, 2]
    assert records[2]["prompt"] == dialogue
    for rec, prompt_ids in zip(records, ids):
        expected = _expected(prompt_ids)
        assert rec["token_ids"] == expected.token_ids and rec["text"] == expected.text
        assert rec["finish_reason"] == expected.finish_reason
        assert len(rec["logprobs"]) == len(rec["token_ids"])


def test_generate_text_file_with_chat_format(folder, tmp_path, capsys):
    """Several prompts in --format text: each completion after its prompt in [brackets], records separated by a
    line of dashes (rough edge of issue 13: they used to run together)."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("first question\n\nsecond question\n")
    main(["generate", str(folder), "--prompt_file", str(prompts), "--chat", "true", "--system", "Be brief.", *GREEDY])
    tok = Tokenizer(tiny_tokenizer_path())
    texts = []
    for q in ("first question", "second question"):
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": q}]
        texts.append(_expected(encode_chat(tok, messages, add_generation_prompt=True).ids).text)
    assert capsys.readouterr().out == f"[first question]{texts[0]}\n{'-' * 40}\n[second question]{texts[1]}\n"


@pytest.mark.parametrize(
    "args,message",
    [
        ([], "no prompts"),
        (["--prompts", "hi", "--sampling.top_p", "0"], r"top_p must be in \(0, 1\] \(1 = off\), got 0.0"),
        (["--prompts", "hi", "--tokenizer", "/nonexistent/tokenizer.model"], "no tokenizer"),
    ],
)
def test_bad_input_is_one_clear_line(folder, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", str(folder), *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("lmforge: error: ")
    assert pytest.importorskip("re").search(message, err[-1])


def test_an_existing_output_file_is_kept_unless_overwrite(folder, tmp_path, capsys):
    out = tmp_path / "answers.txt"
    out.write_text("the user's notes\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", str(folder), "--prompts", "hi", *GREEDY, "--output", str(out)])
    assert exit_info.value.code == 2 and "--overwrite true" in capsys.readouterr().err
    assert out.read_text() == "the user's notes\n"
    main(["generate", str(folder), "--prompts", "hi", *GREEDY, "--output", str(out), "--overwrite", "true"])
    tok = Tokenizer(tiny_tokenizer_path())
    assert out.read_text() == _expected(tok.encode("hi", bos=True)).text + "\n"


def test_chat_reads_stdin_and_keeps_the_dialogue(folder, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\nhow are you\n/reset\nhello\n"))
    main(["chat", str(folder), "--system", "You are terse.", *GREEDY])
    out = capsys.readouterr().out
    tok = Tokenizer(tiny_tokenizer_path())
    system = [{"role": "system", "content": "You are terse."}]
    first = _expected(encode_chat(tok, system + [{"role": "user", "content": "hello"}], add_generation_prompt=True).ids)
    dialogue = system + [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": first.text},
        {"role": "user", "content": "how are you"},
    ]
    second = _expected(encode_chat(tok, dialogue, add_generation_prompt=True).ids)
    # after /reset the dialogue starts again: the same first answer. An answer's leading space (it follows
    # "[/INST] " in the format) is not shown.
    assert out == f"{first.text.lstrip()}\n{second.text.lstrip()}\n(new dialogue)\n{first.text.lstrip()}\n"
    assert first.text and second.text != first.text  # real answers, and the history changed the second
