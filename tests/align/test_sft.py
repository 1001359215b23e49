"""`lmforge sft`: the loss counts answer tokens only, packed rows equal each dialogue alone, golden losses
through the CLI, exact resume after a kill, source weights, input formats, HF = our folder, bad data."""

import json
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from sft_helpers import seeded_dialogues, write_jsonl
from lmforge import ModelConfig, Transformer
from lmforge.align.packing import pack, row_tensors
from lmforge.align.sft_data import SFTDataError, mix_counts, mix_epoch, read_dialogues
from lmforge.cli import main
from lmforge.data.loader import Batch
from lmforge.parallel import DataParallelRank
from lmforge.tokenizer import Tokenizer, encode_chat
from lmforge.train.checkpointing import latest_checkpoint
from lmforge.train.lm_step import next_token_backward
from lmforge.train.metrics import read_step_metrics
from helpers import unit_scale_


def sft_args(model, data, run, cache, *extra):
    """6 steps of 4 rows of 256 tokens (2 micro-batches of 2), lr 1e-3, a checkpoint every 2 steps."""
    return ["sft", str(model), "--data.sources", f"[{data}]", "--data.cache_dir", str(cache), "--run.dir", str(run),
            "--train.batch_size", "4", "--train.micro_batch_size", "2", "--train.seq_len", "256", "--train.steps", "6",
            "--optim.lr", "1e-3", "--run.checkpoint_every", "2", "--run.eval_every", "3", "--run.progress", "false",
            "--train.device", "cpu", "--train.threads", "2", *extra]


def losses(run):
    return [r["loss"] for r in read_step_metrics(run / "metrics.jsonl")]


def encoded(tokenizer_512, dialogues):
    tok = Tokenizer(tokenizer_512)
    out = []
    for d in dialogues:
        e = encode_chat(tok, d["messages"])
        out.append((np.array(e.ids), np.array(e.loss_mask)))
    return out


def step_loss(model, batch):
    """Mean CE of one micro-batch through the real SFT step (document masking on), and its gradients."""
    model.zero_grad()
    s = next_token_backward(model, model, [batch], device=torch.device("cpu"), dp=DataParallelRank(),
                            precision="fp32", loss_chunk=64, document_masking=True)
    return s.loss, s.target_tokens, {n: p.grad.clone() for n, p in model.named_parameters()}


# Pinned on the 2-core dev machine (torch 2.13 CPU, fp32), bitwise the same with 1 and 2 threads; rtol 1e-5 as
# for pre-training's golden losses (room for another CPU's summation order, none for a change of data order,
# packing, masking, normalisation or schedule).
GOLDEN = [6.854416847229004, 6.33452844619751, 5.8983845710754395, 5.453028678894043, 5.072453498840332,
          4.945544242858887]


def test_golden_losses_through_the_cli(tiny_folders, chat_file, tmp_path):
    main(sft_args(tiny_folders["ours"], chat_file, tmp_path / "run", tmp_path / "cache"))
    assert losses(tmp_path / "run") == pytest.approx(GOLDEN, rel=1e-5)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    # one training dialogue of the fixture is longer than a row: dropped, counted, never cut
    assert summary["dropped_dialogues"] == 1 and 0.9 < summary["packing_efficiency"] <= 1
    assert (tmp_path / "run" / "model" / "tokenizer.model").exists()
    assert (tmp_path / "run" / "config.yaml").read_text().splitlines()[1].startswith("# lmforge sft --config")


def test_the_same_model_from_a_hugging_face_folder_gives_the_same_losses(tiny_folders, chat_file, tmp_path):
    for name in ("ours", "hf"):
        main(sft_args(tiny_folders[name], chat_file, tmp_path / name, tmp_path / "cache", "--train.steps", "2",
                      "--data.tokenizer", str(tiny_folders["ours"] / "tokenizer.model")))
    assert losses(tmp_path / "hf") == pytest.approx(losses(tmp_path / "ours"), rel=1e-6)
    assert losses(tmp_path / "ours") == pytest.approx(GOLDEN[:2], rel=1e-5)


def test_kill_and_resume_gives_the_uninterrupted_losses(tiny_folders, chat_file, tmp_path):
    args = sft_args(tiny_folders["ours"], chat_file, tmp_path / "run", tmp_path / "cache", "--run.checkpoint_every",
                    "1")
    proc = subprocess.Popen([sys.executable, "-m", "lmforge.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    import time

    deadline = time.monotonic() + 120
    while latest_checkpoint(tmp_path / "run" / "checkpoints") is None:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert not (tmp_path / "run" / "model").exists()
    main([*args, "--run.resume", "auto"])
    assert losses(tmp_path / "run") == pytest.approx(GOLDEN, rel=1e-5)
    assert [r["step"] for r in read_step_metrics(tmp_path / "run" / "metrics.jsonl")] == list(range(1, 7))


@pytest.mark.parametrize("preset", ["tiny", "tiny-swa"])
def test_a_packed_row_gives_the_loss_and_gradients_of_each_dialogue_alone(tokenizer_512, preset):
    """Three dialogues in one row (positions restarting at 0, attention within each) against each dialogue as
    a batch of its own: the summed loss and the summed gradients agree to 1e-5. Packing without the restart
    or without the document mask would fail (checked below). tiny-swa's window (8) is shorter than a
    dialogue, so the window must also count from the dialogue's own start."""
    torch.manual_seed(0)
    model = unit_scale_(Transformer(ModelConfig.from_name(preset)))
    dialogues = encoded(tokenizer_512, seeded_dialogues(1, 3))
    n = sum(len(ids) - 1 for ids, _ in dialogues)
    row = Batch(*(torch.from_numpy(t)[None] for t in row_tensors(dialogues, n + 5)))
    packed_loss, packed_tokens, packed_grads = step_loss(model, row)

    # the step's loss is sum / tokens, so its gradient times the tokens is the gradient of the summed CE:
    # compare sums, each dialogue's gradient weighted by its own token count
    alone_sum, alone_tokens = 0.0, 0
    total = {k: torch.zeros_like(v) for k, v in packed_grads.items()}
    for ids, learn in dialogues:
        single = Batch(*(torch.from_numpy(t)[None] for t in row_tensors([(ids, learn)], len(ids) - 1)))
        loss, tokens, grads = step_loss(model, single)
        alone_sum += loss * tokens
        alone_tokens += tokens
        for k in total:
            total[k] += grads[k] * tokens
    assert packed_tokens == alone_tokens
    assert packed_loss == pytest.approx(alone_sum / alone_tokens, rel=1e-5)
    for k in total:  # gradients of the mean loss: entries up to ~0.2, fp32 sums of 165 tokens agree to ~1e-7
        torch.testing.assert_close(packed_grads[k], total[k] / alone_tokens, rtol=1e-5, atol=1e-5)

    # Every position's logits equal the dialogue's alone, and the test can fail: attention across dialogues
    # changes them (for tiny-swa only within the first 2 x 8 positions of a dialogue, which are prompt tokens,
    # so the loss alone could not show it).
    starts = np.cumsum([0] + [len(ids) - 1 for ids, _ in dialogues])
    with torch.no_grad():
        packed = model(row.inputs, row.positions, document_ids=row.document_ids)[0]
        crossing = model(row.inputs, row.positions, document_ids=torch.zeros_like(row.document_ids))[0]
        for (ids, _), a, b in zip(dialogues, starts[:-1], starts[1:]):
            alone = model(torch.from_numpy(ids[:-1])[None])[0]
            torch.testing.assert_close(packed[a:b], alone, rtol=1e-5, atol=1e-5)
    assert (crossing[: starts[-1]] - packed[: starts[-1]]).abs().max() > 1e-3
    # NOTE: rotary embeddings only see position differences, so with attention kept inside each dialogue a
    # constant shift of its positions changes nothing but rounding: the restart is checked directly.
    expected = np.concatenate([np.arange(b - a) for a, b in zip(starts[:-1], starts[1:])] + [np.zeros(5, int)])
    assert row.positions[0].tolist() == expected.tolist()


def test_the_loss_counts_exactly_the_answer_tokens(tokenizer_512):
    """Changing the target of a system or user token leaves the loss unchanged; an answer token's changes it."""
    torch.manual_seed(0)
    model = unit_scale_(Transformer(ModelConfig.from_name("tiny")))
    dialogues = encoded(tokenizer_512, seeded_dialogues(2, 4))
    rows, _ = pack([len(ids) for ids, _ in dialogues], 256)
    batch = Batch(*(torch.from_numpy(np.stack(t)) for t in zip(*[row_tensors([dialogues[i] for i in r], 256)
                                                                 for r in rows])))
    base = step_loss(model, batch)[0]
    prompt_positions = (~batch.loss_mask & (batch.document_ids < batch.document_ids.max())).nonzero()
    answer_positions = batch.loss_mask.nonzero()
    assert len(prompt_positions) > 20 and len(answer_positions) > 20
    for positions, changes in ((prompt_positions, False), (answer_positions, True)):
        targets = batch.targets.clone()
        for r, t in positions[:: max(1, len(positions) // 10)].tolist():
            targets[r, t] = (targets[r, t] + 7) % 512
        loss = step_loss(model, Batch(batch.inputs, targets, batch.loss_mask, batch.document_ids, batch.positions))[0]
        assert (abs(loss - base) > 1e-4) == changes
    # and the mask is the chat format's: the answers of every exchange and their closing </s>
    tok = Tokenizer(tokenizer_512)
    d = seeded_dialogues(2, 1)[0]["messages"]
    e = encode_chat(tok, d)
    learned = [i for i, m in zip(e.ids, e.loss_mask) if m]
    assert learned.count(tok.eos_id) == sum(m["role"] == "assistant" for m in d)


def test_no_dialogue_is_split_and_too_long_ones_are_dropped_and_counted():
    rng = np.random.default_rng(0)
    lengths = [int(x) for x in rng.integers(2, 100, 500)] + [129, 200, 130]  # the last three are too long
    rows, stats = pack(lengths, 128, window=100, rng=rng)
    placed = sorted(i for row in rows for i in row)
    too_long = [i for i, n in enumerate(lengths) if n - 1 > 128]
    assert too_long == [501, 502]  # 129 tokens take 128 positions: they fit exactly
    assert placed == sorted(set(range(len(lengths))) - set(too_long))  # each fits whole, exactly once
    assert all(sum(lengths[i] - 1 for i in row) <= 128 for row in rows)
    assert stats.dropped == len(too_long) > 0 and stats.dialogues == len(placed)
    assert stats.positions == sum(lengths[i] - 1 for i in placed)
    assert stats.efficiency(128) > 0.95  # best-fit decreasing


def test_source_weights_give_the_stated_proportions():
    assert mix_counts([100, 50], [1, 3], 150) == [38, 112]
    assert mix_counts([10, 10, 10], [1, 1, 2], 100) == [25, 25, 50]
    pairs = mix_epoch([100, 50], [1, 3], 150, seed=0, epoch=0)
    assert np.bincount(pairs[:, 0]).tolist() == [38, 112]
    # the small source is read in whole passes: each of its dialogues twice, then 12 of them a third time
    counts = np.bincount(pairs[pairs[:, 0] == 1][:, 1], minlength=50)
    assert sorted(set(counts.tolist())) == [2, 3] and (counts == 3).sum() == 12
    assert len({tuple(p) for p in pairs[pairs[:, 0] == 0]}) == 38  # the large one: a subset, no repeats
    again = mix_epoch([100, 50], [1, 3], 150, seed=0, epoch=1)
    assert not np.array_equal(again, pairs) and np.bincount(again[:, 0]).tolist() == [38, 112]


def test_both_input_formats_give_the_same_dialogues(tmp_path):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    system = [{"role": "system", "content": "be brief"}]
    files = {
        "messages": [{"messages": messages}, {"messages": system + messages}],
        "text": [{"prompt": "hi", "completion": "hello"}],
        "conversational": [{"prompt": system + messages[:1], "completion": messages[1:]}],
    }
    got = {name: list(read_dialogues(write_jsonl(tmp_path / f"{name}.jsonl", recs))) for name, recs in files.items()}
    assert got["text"] == [messages] and got["conversational"] == [system + messages]
    assert got["messages"] == [messages, system + messages]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"messages": messages, "world": "v1"}]), tmp_path / "d.parquet")
    assert list(read_dialogues(tmp_path / "d.parquet")) == [messages]


BAD = {
    "invalid JSON": ('{"messages": [', "not valid JSON"),
    "unknown role": ('{"messages": [{"role": "robot", "content": "x"}]}', "role 'robot'"),
    "two user turns": ('{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}',
                       "message 1 is 'user', expected 'assistant'"),
    "empty content": ('{"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "b"}]}',
                      "message 0 (user) has empty content"),
    "missing key": ('{"text": "x"}', "expected a 'messages' list, or 'prompt' and 'completion' (fields: text)"),
    "no answer": ('{"messages": [{"role": "user", "content": "a"}]}', "ends with the assistant's answer"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_data_is_one_line_naming_file_line_and_problem(tiny_folders, tmp_path, case, capsys):
    line, problem = BAD[case]
    good = json.dumps(seeded_dialogues(0, 1)[0])
    data = tmp_path / "bad.jsonl"
    data.write_text(f"{good}\n{good}\n{line}\n{good}\n")
    with pytest.raises(SystemExit) as exit_:
        main(sft_args(tiny_folders["ours"], data, tmp_path / "run", tmp_path / "cache"))
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"lmforge: error: {data}:3: ") and problem in err[0], err
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()  # nothing half-written


def test_no_sources_or_a_missing_file_is_refused(tiny_folders, tmp_path):
    with pytest.raises(SFTDataError, match="no such file"):
        list(read_dialogues(tmp_path / "missing.jsonl"))
    with pytest.raises(SystemExit):
        main(["sft", str(tiny_folders["ours"]), "--run.dir", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()
