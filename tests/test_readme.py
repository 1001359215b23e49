"""The README's Python examples run as written (issue 13: its model snippet used an undefined `tokens`, and the
engine had no example), against the folders they name, made here from a tiny model. The blocks that talk to
`lmforge serve` at http://127.0.0.1:8000 run against the real server on a free loopback port, serving the
README's model folder as "my-model" with the key "secret"."""

import re
import shutil
import sys
from pathlib import Path

import torch

from helpers import one_torch_thread, tiny_tokenizer_path  # noqa: F401  (one_torch_thread: autouse)
from lmforge import ModelConfig, Transformer, save_model

sys.path.insert(0, str(Path(__file__).parent / "serve"))
from serve_helpers import live_server  # noqa: E402

README = Path(__file__).parents[1] / "README.md"
SERVER = "http://127.0.0.1:8000"


def test_every_python_block_of_the_readme_runs(tmp_path, monkeypatch, capsys):
    from lmforge.serve.server import EngineOptions, load_served

    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 3  # the model, the tokenizer and the engine
    served_blocks = [b for b in blocks if SERVER in b]
    assert len(served_blocks) >= 2  # the openai client and the endpoint answerer
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    model_dir = Path("runs/demo/pretrain/model")
    save_model(Transformer(ModelConfig.from_name("tiny", vocab_size=320)), model_dir, tokenizer_path=tiny_tokenizer_path())
    Path("runs/tokenizer").mkdir(parents=True)
    shutil.copyfile(tiny_tokenizer_path(), "runs/tokenizer/tokenizer.model")
    for block in blocks:
        if SERVER not in block:
            exec(compile(block, str(README), "exec"), {})
    assert Path("runs/my-model/config.json").is_file()  # the model snippet's save_model
    printed = capsys.readouterr().out.splitlines()
    assert printed[-1].startswith("[") and "length" in "\n".join(printed)  # the engine's outputs

    engine = EngineOptions(block_size=8, num_blocks=256, max_num_batched_tokens=256, max_num_seqs=8)
    served = load_served(model_dir, None, "cpu", None, "my-model", engine, None)
    with live_server(served, api_key="secret") as url:
        for block in served_blocks:
            scope = {}
            exec(compile(block.replace(SERVER, url), str(README), "exec"), scope)
    assert scope["texts"] and all(isinstance(t, str) for t in scope["texts"])  # the endpoint answerer's answers
    assert len(scope["texts"]) == len(scope["dialogues"])
