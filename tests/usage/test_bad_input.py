"""Issue 13, defects 2-7: bad input ends with one line naming what was wrong and where (exit status 2), Ctrl-C
with one line (exit status 130); outputs get ordinary permissions; the top-level API has load_model."""

import io
import shutil
import stat
import sys

import pytest
import torch
from usage_helpers import one_error_line, run_cli, umask

import lmforge
from lmforge.devices import DeviceError, resolve_device
from lmforge.models.checkpoint import load_model, save_model
from lmforge.models.config import ModelConfig
from lmforge.models.transformer import Transformer

PROMPT = ["--prompts", "The quick", "--sampling.max_new_tokens", "2", "--sampling.temperature", "0"]


@pytest.fixture
def broken_weights(model_dir, tmp_path, request):
    """A copy of the model folder whose model.safetensors is empty, cut inside its header, or cut in its data."""
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    data = (model_dir / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes({"empty": b"", "header": data[:20], "data": data[: len(data) // 2]}
                                               [request.param])
    return folder


@pytest.mark.parametrize("broken_weights", ["empty", "header", "data"], indirect=True)
@pytest.mark.parametrize("verb", ["generate", "eval", "convert"])
def test_truncated_weights_are_one_line_naming_the_file(verb, broken_weights, token_dir, tmp_path, capsys):
    """Defect 2: SafetensorError tracebacks ("header too small", "incomplete metadata") in generate, eval,
    convert."""
    args = {"generate": ["generate", broken_weights, *PROMPT], "eval": ["eval", "loss", broken_weights, token_dir],
            "convert": ["convert", broken_weights, tmp_path / "out"]}[verb]
    one_error_line(*run_cli(args, capsys)[::2], f"{broken_weights / 'model.safetensors'} is not a complete "
                                                "safetensors file")
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("verb", ["generate", "chat", "eval"])
def test_cuda_without_cuda_is_one_line(verb, model_dir, token_dir, capsys, monkeypatch):
    """Defect 2: --device cuda on a machine without CUDA was `AssertionError: Torch not compiled with CUDA`."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    args = {"generate": ["generate", model_dir, *PROMPT], "chat": ["chat", model_dir],
            "eval": ["eval", "loss", model_dir, token_dir]}[verb]
    one_error_line(*run_cli([*args, "--device", "cuda"], capsys)[::2], "device 'cuda' asked for", "--device cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_is_used_where_there_is_one_and_a_missing_index_is_one_line(model_dir, token_dir, capsys):
    """Defect 2, on the device machine: --device cuda runs; cuda:N past the last device is refused up front."""
    code, out, err = run_cli(["generate", model_dir, *PROMPT, "--device", "cuda"], capsys)
    assert code == 0 and out.strip(), err
    code, out, err = run_cli(["eval", "loss", model_dir, token_dir, "--device", "cuda:0", "--max_batches", "2"], capsys)
    assert code == 0 and "perplexity" in out, err
    missing = f"cuda:{torch.cuda.device_count()}"
    one_error_line(*run_cli(["generate", model_dir, *PROMPT, "--device", missing], capsys)[::2],
                   f"device '{missing}' asked for", "CUDA device(s)")


def test_resolve_device():
    """Defect 2: the one function that turns --device into a torch.device, or a one-line DeviceError."""
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for bad, message in [("gpu", "not a device name"), ("mps", "not supported"), (f"cuda:{torch.cuda.device_count()}",
                                                                                   "asked for")]:
        with pytest.raises(DeviceError, match=message):
            resolve_device(bad)


def test_ctrl_c_is_one_line_and_status_130(model_dir, capsys, monkeypatch):
    """Defect 2: Ctrl-C (a KeyboardInterrupt anywhere in a verb, here while chat waits for a line) ends with
    `lmforge: interrupted` and exit status 130, not a traceback."""
    class CtrlC(io.StringIO):
        def readline(self, *args):
            raise KeyboardInterrupt

    monkeypatch.setattr(sys, "stdin", CtrlC())
    code, _, err = run_cli(["chat", model_dir], capsys)
    assert code == 130 and err.strip().splitlines()[-1] == "lmforge: interrupted" and "Traceback" not in err


def test_eval_refuses_seq_len_past_the_context(model_dir, token_dir, capsys):
    """Defect 3: `eval --seq_len 1024` on a 256-token model reported a loss; pretrain and generate refuse."""
    one_error_line(*run_cli(["eval", "loss", model_dir, token_dir, "--seq_len", "1024"], capsys)[::2],
                   "seq_len (1024) exceeds the model's max_seq_len (256)")


def test_generate_on_a_run_folder_says_what_is_wrong_with_the_model_path(model_dir, tmp_path, capsys):
    """Defect 4: `generate runs/tiny` said "no tokenizer"; it names the model path's problem first, with a
    hint for a run folder, even when --tokenizer is wrong too."""
    run = tmp_path / "runs" / "tiny"
    shutil.copytree(model_dir, run / "model")
    (run / "metrics.jsonl").write_text("")
    one_error_line(*run_cli(["generate", run, *PROMPT], capsys)[::2], f"did you mean {run / 'model'}?")
    (tmp_path / "notes").mkdir()
    one_error_line(*run_cli(["generate", tmp_path / "notes", *PROMPT, "--tokenizer", tmp_path / "nope.model"],
                            capsys)[::2], f"{tmp_path / 'notes'} is not a model folder: it has no config.json")
    one_error_line(*run_cli(["generate", tmp_path / "missing", *PROMPT], capsys)[::2], "does not exist")


@pytest.mark.parametrize("case", ["manifest", "config", "index", "progress", "yaml"])
def test_corrupt_json_and_yaml_name_the_file_and_line(case, model_dir, token_dir, tokenizer_file, corpus, tmp_path,
                                                      capsys):
    """Defect 5: "Expecting property name enclosed in double quotes: line 2 column 1 (char 2)" named no file."""
    bad = '{\n  "format": "x",\n  oops\n}\n'
    if case == "manifest":
        data = tmp_path / "data"
        shutil.copytree(token_dir, data)
        (data / "manifest.json").write_text(bad)
        args, path = ["eval", "loss", model_dir, data], data / "manifest.json"
    elif case in ("config", "index"):
        model = tmp_path / "model"
        save_model(Transformer(ModelConfig.from_name("tiny")), model, max_shard_bytes=10**9 if case == "config" else 10**5)
        path = model / ("config.json" if case == "config" else "model.safetensors.index.json")
        path.write_text(bad)
        args = ["convert", model, tmp_path / "out"]
    elif case == "progress":
        data = tmp_path / "data"
        run_cli(["data", "prepare", "--data", corpus, "--tokenizer", tokenizer_file, "--out_dir", data,
                 "--workers", "1"], capsys)
        (data / "manifest.json").unlink()
        path = data / "progress.json"
        path.write_text(bad)
        args = ["data", "prepare", "--data", corpus, "--tokenizer", tokenizer_file, "--out_dir", data, "--workers", "1"]
    else:
        path = tmp_path / "convert.yaml"
        path.write_text(f"src: {model_dir}\ndst: [unclosed\nto: hf\n")
        args = ["convert", "--config", path]
    line = one_error_line(*run_cli(args, capsys)[::2], str(path))
    assert (f"{path}:3:" in line) or (f"{path}:4:" in line), line  # the line of the broken text


def test_outputs_have_ordinary_permissions(model_dir, corpus, tokenizer_file, tmp_path, capsys):
    """Defect 6: weights, shards and tokenizer files were 0600 (mkstemp's mode leaking into the result)."""
    for args in (["convert", model_dir, tmp_path / "hf", "--to", "hf"],
                 ["tokenizer", "train", "--data", corpus, "--out_dir", tmp_path / "tok", "--vocab_size", "320"],
                 ["data", "prepare", "--data", corpus, "--tokenizer", tokenizer_file, "--out_dir", tmp_path / "data",
                  "--workers", "1"]):
        assert run_cli(args, capsys)[0] == 0
    modes = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode)) for p in tmp_path.rglob("*")}
    assert {"hf/tokenizer.json", "hf/model.safetensors", "tok/tokenizer.model", "data/train-00000.bin",
            "data/manifest.json", "data/.lmforge-output"} <= set(modes)
    expected = {path: oct((0o777 if (tmp_path / path).is_dir() else 0o666) & ~umask()) for path in modes}
    assert modes == expected


def test_load_model_and_save_model_at_the_top_level(tmp_path):
    """Defect 7: `lmforge.load_model` / `lmforge.save_model`, as the model issue named them."""
    assert lmforge.load_model is load_model and lmforge.save_model is save_model
    model = Transformer(ModelConfig.from_name("tiny"))
    lmforge.save_model(model, tmp_path / "m")
    assert torch.equal(lmforge.load_model(tmp_path / "m").output.weight, model.output.weight)
