"""Issue 13, defect 1: every verb and function that writes a folder follows the output rule of lmforge.io.

    destination                                     overwrite false    overwrite true
    missing, or an empty folder                     written            written
    a folder lmforge wrote (it has .lmforge-output) refused            replaced
    any other non-empty folder, or a file           refused            refused

On main, `lmforge convert SRC precious --to hf` deleted precious/notes.txt and exited 0.
"""

import json

import pytest
import torch
from usage_helpers import one_error_line, run_cli, snapshot

from lmforge import ModelConfig, Transformer
from lmforge.data import write_token_documents
from lmforge.export import export_hf
from lmforge.io import MARKER, OutputExistsError
from lmforge.models.checkpoint import load_model, save_model
from lmforge.models.convert import save_hf_folder


def _model():
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_name("tiny"))


def _cli_writer(args_of):
    """A writer that runs a verb: (dst, overwrite, fixtures, capsys) -> None, or OutputExistsError's message
    raised as OutputExistsError when the verb ends as bad input."""
    def write(dst, overwrite, fx, capsys):
        code, _, err = run_cli([*args_of(dst, fx), "--overwrite", str(overwrite).lower()], capsys)
        if code:
            raise OutputExistsError(one_error_line(code, err))
    return write


# name -> (writer, replaces the whole folder). Data writers fill their folder incrementally: an earlier run of
# their own with the same settings is resumed (or found complete) without overwrite, never refused.
WRITERS = {
    "convert --to hf": (_cli_writer(lambda dst, fx: ["convert", fx["model_dir"], dst, "--to", "hf"]), True),
    "convert --to lmforge": (_cli_writer(lambda dst, fx: ["convert", fx["model_dir"], dst]), True),
    "tokenizer train": (_cli_writer(lambda dst, fx: ["tokenizer", "train", "--data", fx["corpus"], "--out_dir", dst,
                                                     "--vocab_size", "320", "--num_threads", "1"]), True),
    "data prepare": (_cli_writer(lambda dst, fx: ["data", "prepare", "--data", fx["corpus"], "--tokenizer",
                                                  fx["tokenizer_file"], "--out_dir", dst, "--workers", "1"]), False),
    "save_model": (lambda dst, overwrite, fx, capsys: save_model(_model(), dst, overwrite=overwrite), True),
    "save_hf_folder": (lambda dst, overwrite, fx, capsys: save_hf_folder(_model(), dst, overwrite=overwrite), True),
    "export_hf": (lambda dst, overwrite, fx, capsys: export_hf(_model(), dst, tokenizer_path=fx["tokenizer_file"],
                                                               overwrite=overwrite), True),
    "write_token_documents": (lambda dst, overwrite, fx, capsys: write_token_documents(
        [([5, 6, 7, 2], None), ([8, 9, 2], None)], dst, fx["tokenizer_file"], overwrite=overwrite), False),
}
WHOLE = [name for name, (_, whole) in WRITERS.items() if whole]


@pytest.fixture
def fx(model_dir, corpus, tokenizer_file):
    return {"model_dir": model_dir, "corpus": corpus, "tokenizer_file": tokenizer_file}


@pytest.mark.parametrize("name", WRITERS)
@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_of_the_users_is_refused_and_left_untouched(name, overwrite, fx, tmp_path, capsys):
    """Defect 1: `precious/notes.txt` survives, even with --overwrite true."""
    precious = tmp_path / "precious"
    (precious / "sub").mkdir(parents=True)
    (precious / "notes.txt").write_text("notes\n")
    (precious / "sub" / "model.safetensors").write_bytes(b"the user's own weights")
    (precious / "notes.txt").chmod(0o640)
    before = snapshot(precious)
    write, _ = WRITERS[name]
    with pytest.raises(OutputExistsError, match="lmforge did not write it") as refused:
        write(precious, overwrite, fx, capsys)
    assert str(precious) in str(refused.value)
    assert snapshot(precious) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious"]  # no temporary folder left beside it


@pytest.mark.parametrize("name", WRITERS)
def test_a_file_is_refused(name, fx, tmp_path, capsys):
    """Defect 1: a destination that is a file is not replaced either."""
    dst = tmp_path / "notes.txt"
    dst.write_text("notes\n")
    write, _ = WRITERS[name]
    with pytest.raises(OutputExistsError, match="is a file"):
        write(dst, True, fx, capsys)
    assert dst.read_text() == "notes\n"


@pytest.mark.parametrize("name", WHOLE)
def test_our_own_folder_is_replaced_only_with_overwrite(name, fx, tmp_path, capsys):
    """Defect 1: an empty folder is written and marked; then refused without overwrite (untouched), replaced
    with it (a stale file in it is gone, the folder holds exactly the new output)."""
    dst = tmp_path / "out"
    dst.mkdir()
    write, _ = WRITERS[name]
    write(dst, False, fx, capsys)
    assert json.loads((dst / MARKER).read_text())["written_by"]
    (dst / "stale.txt").write_text("from an earlier run")
    before = snapshot(dst)
    with pytest.raises(OutputExistsError, match="holds an earlier lmforge output; pass (--overwrite true|overwrite=True)"):
        write(dst, False, fx, capsys)
    assert snapshot(dst) == before
    write(dst, True, fx, capsys)
    assert not (dst / "stale.txt").exists() and (dst / MARKER).is_file()


def test_convert_into_its_own_source_with_overwrite(model_dir, tmp_path, capsys):
    """Defect 1: `convert m m --overwrite true` reads everything before it swaps the folder."""
    code, _, err = run_cli(["convert", model_dir, tmp_path / "m"], capsys)
    assert code == 0, err
    code, _, err = run_cli(["convert", tmp_path / "m", tmp_path / "m", "--dtype", "bfloat16", "--overwrite", "true"],
                           capsys)
    assert code == 0, err
    assert all(p.dtype == torch.bfloat16 for p in load_model(tmp_path / "m").parameters())


@pytest.mark.parametrize("name", ["data prepare", "write_token_documents"])
def test_data_folders_resume_in_their_own_folder_and_replace_another_verbs_only_with_overwrite(
        name, fx, tmp_path, capsys):
    """Defect 1, incremental writers: the same run again in its own folder needs no overwrite (it resumes or
    finds the data complete); a folder another verb wrote (a model) is refused, then replaced with overwrite."""
    write, _ = WRITERS[name]
    own = tmp_path / "data"
    write(own, False, fx, capsys)
    first = snapshot(own)
    write(own, False, fx, capsys)
    assert snapshot(own) == first and json.loads((own / MARKER).read_text())["written_by"]
    model = save_model(_model(), tmp_path / "model")
    before = snapshot(model)
    with pytest.raises(OutputExistsError, match="holds an earlier lmforge output"):
        write(model, False, fx, capsys)
    assert snapshot(model) == before
    write(model, True, fx, capsys)
    assert (model / "manifest.json").is_file() and not (model / "config.json").exists()


def test_a_replacement_removes_only_its_own_leftovers(tmp_path):
    """atomic_dir clears the temporary folders of an earlier crashed write (its own names), never a folder of the
    user's that merely starts with NAME.tmp-."""
    from lmforge.io import atomic_dir

    (tmp_path / "model.tmp-abcd1234").mkdir()  # mkdtemp's pattern: a crashed write's leftover
    (tmp_path / "model.tmp-old-4242").mkdir()
    (tmp_path / "model.tmp-my-notes").mkdir()  # the user's
    (tmp_path / "model.tmp-my-notes" / "notes.txt").write_text("keep")
    with atomic_dir(tmp_path / "model") as tmp:
        (tmp / "config.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "model.tmp-my-notes"]
    assert (tmp_path / "model.tmp-my-notes" / "notes.txt").read_text() == "keep"
