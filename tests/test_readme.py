"""The README's Python examples run as written (issue 13: its model snippet used an undefined `tokens`, and the
engine had no example), against the folders they name, made here from a tiny model."""

import re
import shutil
from pathlib import Path

import torch

from helpers import one_torch_thread, tiny_tokenizer_path  # noqa: F401  (one_torch_thread: autouse)
from lmforge import ModelConfig, Transformer, save_model

README = Path(__file__).parents[1] / "README.md"


def test_every_python_block_of_the_readme_runs(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 3  # the model, the tokenizer and the engine
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    model_dir = Path("runs/demo/pretrain/model")
    save_model(Transformer(ModelConfig.from_name("tiny", vocab_size=320)), model_dir, tokenizer_path=tiny_tokenizer_path())
    Path("runs/tokenizer").mkdir(parents=True)
    shutil.copyfile(tiny_tokenizer_path(), "runs/tokenizer/tokenizer.model")
    for block in blocks:
        exec(compile(block, str(README), "exec"), {})
    assert Path("runs/my-model/config.json").is_file()  # the model snippet's save_model
    printed = capsys.readouterr().out.splitlines()
    assert printed[-1].startswith("[") and "length" in "\n".join(printed)  # the engine's outputs
