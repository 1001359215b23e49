"""`lmforge rm train`: golden losses through the CLI, an exact resume, micro-batching that changes nothing, the
sources' mix, LoRA with a fully trained head, and bad preference data in one line naming file, line and field."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import one_torch_thread, unit_scale_  # noqa: F401  (one_torch_thread: autouse)
from lmforge import ModelConfig, Transformer
from lmforge.align.preference_data import (
    PairLoader,
    PreferenceDataError,
    epoch_size,
    pair_batch,
    preference_record,
    read_preferences,
    tokenize_pairs,
)
from lmforge.align.reward_model import init_reward_model
from lmforge.align.rm import ranking_backward
from lmforge.cli import main
from lmforge.models.checkpoint import load_model
from lmforge.parallel import DataParallelRank
from lmforge.tokenizer import Tokenizer
from lmforge.train.checkpointing import latest_checkpoint
from lmforge.train.metrics import read_step_metrics
from pref_helpers import seeded_pairs
from sft_helpers import write_jsonl


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory) -> dict[str, str]:
    """Seeded pairs: 48 "helpfulness" pairs in the conversational format and 16 "safety" pairs as text."""
    root = tmp_path_factory.mktemp("pairs")
    return {"helpfulness": str(write_jsonl(root / "helpfulness.jsonl", seeded_pairs(0, 48))),
            "safety": str(write_jsonl(root / "safety.jsonl", seeded_pairs(1, 16, conversational=False)))}


def rm_args(model, files, run, *extra):
    """6 steps of 8 pairs (2 micro-batches of 4 pairs = 8 rows each), lr 1e-3, a checkpoint every 2 steps."""
    return ["rm", "train", str(model), "--data.sources", f"[{files['helpfulness']},{files['safety']}]",
            "--run.dir", str(run), "--train.batch_size", "8", "--train.micro_batch_size", "4", "--train.seq_len", "128",
            "--train.steps", "6", "--optim.lr", "1e-3", "--run.checkpoint_every", "2", "--run.progress", "false",
            "--train.device", "cpu", "--train.threads", "1", *extra]


def losses(run, key="loss"):
    return [r[key] for r in read_step_metrics(run / "metrics.jsonl")]


# Pinned on the 2-core dev machine (torch 2.13 CPU, fp32); rtol 1e-5 as for the other golden losses (room for
# another CPU's summation order, none for a change of data order, margins, normalisation or schedule). Step 1 is
# near the loss of rewards 0, mean over pairs of log(1 + e^m): a new head starts with rewards near 0. The same in an
# uninterrupted run.
GOLDEN = [0.938663899898529, 0.9821578860282898, 1.0025426149368286, 0.976616382598877, 0.9029257893562317,
          0.8772913217544556]


def test_golden_losses_and_an_exact_resume_through_the_cli(tiny_folders, pair_files, tmp_path):
    run = tmp_path / "run"
    main(rm_args(tiny_folders["ours"], pair_files, run, "--run.stop_at", "3"))
    assert latest_checkpoint(run / "checkpoints").name == "step_000003" and not (run / "model").exists()
    main(rm_args(tiny_folders["ours"], pair_files, run, "--run.resume", "auto"))
    assert losses(run) == pytest.approx(GOLDEN, rel=1e-5)
    assert [r["step"] for r in read_step_metrics(run / "metrics.jsonl")] == list(range(1, 7))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["pairs_per_epoch"] == 96  # the first source once (48) and as many from the second (weights 1, 1)
    config = json.loads((run / "model" / "config.json").read_text())
    assert config["head"] == "reward" and (run / "model" / "tokenizer.model").is_file()
    header = (run / "config.yaml").read_text().splitlines()[1]
    assert header.startswith("# lmforge rm train --config")
    # the warm-up is Llama 2's: 3% of 6 steps is less than 5, so 5 steps; then cosine to 10% of the peak
    lrs = losses(run, "lr")
    assert lrs[:5] == pytest.approx([2e-4, 4e-4, 6e-4, 8e-4, 1e-3]) and lrs[5] == pytest.approx(1e-3)


def test_micro_batches_and_both_answers_in_one_forward_give_the_step_of_the_whole_batch(tokenizer_512):
    """The same 4 pairs as 1 micro-batch of 4, 2 of 2 or 4 of 1: the same loss, accuracy and gradients (the loss
    is the mean over the step's pairs); and the rows of a micro-batch are the chosen answers, then the rejected."""
    torch.manual_seed(0)
    net = unit_scale_(Transformer(ModelConfig.from_name("tiny", head="reward")))
    tok = Tokenizer(tokenizer_512)
    records = [preference_record(r, f"pairs:{i}") for i, r in enumerate(seeded_pairs(2, 4))]
    pairs = tokenize_pairs(records, tok, 128, "small").splits["train"]
    batch = pair_batch(pairs)
    assert batch.tokens.shape[0] == 8 and batch.tokens.shape[1] % 8 == 0
    assert batch.tokens[0, : len(pairs[0].ids[0])].tolist() == pairs[0].ids[0].tolist()
    assert batch.tokens[4, : len(pairs[0].ids[1])].tolist() == pairs[0].ids[1].tolist()
    results = []
    for m in (4, 2, 1):
        net.zero_grad()
        stats = ranking_backward(net, [pair_batch(pairs[i : i + m]) for i in range(0, 4, m)],
                                 device=torch.device("cpu"), dp=DataParallelRank(), precision="fp32", pairs=4)
        results.append((stats, {n: p.grad.clone() for n, p in net.named_parameters()}))
    for stats, grads in results[1:]:
        assert stats.loss == pytest.approx(results[0][0].loss, rel=1e-6)
        assert stats.accuracy == results[0][0].accuracy
        for name, g in grads.items():
            # atol 1e-6: summing micro-batches in another order rounds gradients of O(1e-2) by O(1e-7)
            torch.testing.assert_close(g, results[0][1][name], rtol=1e-5, atol=1e-6)
    assert results[0][1]["reward_head.weight"].abs().max() > 1e-3  # a real gradient was compared


def test_the_mix_reads_the_first_source_once_and_the_others_by_weight(tokenizer_512):
    assert epoch_size([900, 5000], [0.9, 0.1], None) == 1000  # the Safety RM: all safety, 10% helpfulness
    assert epoch_size([5000, 900], [1, 1], None) == 10000  # the Helpfulness RM: as many safety pairs again
    assert epoch_size([5000, 900], [1, 1], 300) == 300
    tok = Tokenizer(tokenizer_512)
    sets = [tokenize_pairs([preference_record(r, "x") for r in seeded_pairs(s, n)], tok, 128) for s, n in ((3, 9), (4, 20))]
    loader = PairLoader(sets, [0.9, 0.1], epoch_size([9, 20], [0.9, 0.1], None), batch_size=5, seed=0)
    epoch = loader.pairs_of_epoch(0)
    assert np.bincount(epoch[:, 0]).tolist() == [9, 1] and sorted(epoch[epoch[:, 0] == 0][:, 1]) == list(range(9))
    # two ranks of 1 pair each read the pairs one rank of 2 reads, and a cursor resumes the same stream
    one = PairLoader(sets, [0.9, 0.1], 10, batch_size=2, seed=0)
    ranks = [PairLoader(sets, [0.9, 0.1], 10, batch_size=1, seed=0, rank=r, world_size=2) for r in (0, 1)]
    for _ in range(7):  # past the end of the first epoch
        both = next(one).pairs
        assert [next(ranks[0]).pairs[0], next(ranks[1]).pairs[0]] == both
    again = PairLoader(sets, [0.9, 0.1], 10, batch_size=2, seed=0)
    again.load_state_dict(one.state_dict())
    assert next(again).pairs == next(one).pairs


def test_lora_trains_the_adapters_and_the_whole_head(tiny_folders, pair_files, tmp_path):
    pytest.importorskip("peft")
    main(rm_args(tiny_folders["ours"], pair_files, tmp_path / "run", "--train.steps", "2", "--lora.rank", "4"))
    merged = load_model(tmp_path / "run" / "model", head="reward")
    base = load_model(tiny_folders["ours"])
    for name, p in base.state_dict().items():
        if name.endswith("norm.weight") or name == "tok_embeddings.weight":
            assert torch.equal(p, merged.state_dict()[name]), name  # frozen
    assert not torch.equal(merged.state_dict()["layers.0.attention.wq.weight"], base.state_dict()["layers.0.attention.wq.weight"])
    fresh = init_reward_model(tiny_folders["ours"], seed=0).reward_head.weight  # the head the run started from
    assert (merged.reward_head.weight - fresh).abs().max() > 1e-4


BAD = [  # (case, line 3 of the file, what the one line says after "FILE")
    ("invalid JSON", '{"prompt": "a", "chosen": ', ":3: not valid JSON"),
    ("missing field", '{"prompt": "a", "chosen": "b"}', ":3: missing field 'rejected'"),
    ("empty answer", '{"prompt": "a", "chosen": " ", "rejected": "c"}', ":3: field 'chosen' is empty"),
    ("answer role", '{"prompt": "a", "chosen": [{"role": "user", "content": "b"}], "rejected": "c"}',
     ":3: field 'chosen': its message must have role 'assistant'"),
    ("prompt order", '{"prompt": [{"role": "assistant", "content": "a"}], "chosen": "b", "rejected": "c"}',
     ":3: field 'prompt': message 0 is 'assistant', expected 'user'"),
    ("unknown degree", '{"prompt": "a", "chosen": "b", "rejected": "c", "degree": "much"}',
     ":3: field 'degree' is 'much'; it must be one of significantly_better"),
    ("no degree", '{"prompt": "a", "chosen": "b", "rejected": "c"}', ":3: loss.margin small needs a 'degree'"),
    ("bad margin", '{"prompt": "a", "chosen": "b", "rejected": "c", "degree": "better", "margin": "x"}',
     ":3: field 'margin' must be a finite number"),
]


@pytest.mark.parametrize("case, line, problem", BAD, ids=[case for case, _, _ in BAD])
def test_bad_preference_data_is_one_line_naming_file_line_and_field(tiny_folders, pair_files, tmp_path, case, line,
                                                                     problem, capsys):
    good = json.dumps(seeded_pairs(0, 1)[0])
    data = tmp_path / "bad.jsonl"
    data.write_text(f"{good}\n{good}\n{line}\n{good}\n")
    with pytest.raises(SystemExit) as exit_:
        main(rm_args(tiny_folders["ours"], {"helpfulness": str(data), "safety": pair_files["safety"]}, tmp_path / "run"))
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"lmforge: error: {data}{problem}"), err
    assert not (tmp_path / "run").exists()  # nothing half-written


def test_a_language_model_is_needed_where_one_is_trained_and_a_reward_model_is_refused(tiny_folders, pair_files,
                                                                                       tmp_path, capsys):
    rm_dir = tmp_path / "rm"
    main(rm_args(tiny_folders["ours"], pair_files, rm_dir, "--train.steps", "1"))
    with pytest.raises(SystemExit):
        main(["dpo", str(rm_dir / "model"), "--data.sources", f"[{pair_files['helpfulness']}]",
              "--run.dir", str(tmp_path / "dpo"), "--train.device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a reward model" in err[0] and "not a language model" in err[0], err


def test_llama_2s_two_mixes_from_a_preferences_folder(tiny_folders, pair_files, tmp_path):
    """train_reward_model: the Safety RM reads all 16 safety pairs and 10% helpfulness ones (16 / 0.9 = 18 an epoch)."""
    from lmforge.align.pair_training import PairTrainConfig
    from lmforge.align.rm import train_reward_model
    from lmforge.train.config import RunConfig

    folder = Path(pair_files["safety"]).parent  # helpfulness.jsonl and safety.jsonl
    train = PairTrainConfig(batch_size=4, micro_batch_size=4, seq_len=128, steps=1, device="cpu", threads=1)
    run = train_reward_model(str(tiny_folders["ours"]), "safety", folder, tmp_path / "safety-rm", train=train,
                             run=RunConfig(progress=False, checkpoint_every=0))
    assert json.loads((run / "summary.json").read_text())["pairs_per_epoch"] == 18
    assert (run / "model" / "model.safetensors").is_file()


def test_the_three_preference_formats_give_the_same_pairs(tmp_path):
    """TRL's conversational, text and implicit-prompt formats (and parquet) read as the same pair."""
    user, good, bad = "how many", "three", "two"
    records = {
        "conversational": {"prompt": [{"role": "user", "content": user}], "chosen": [{"role": "assistant", "content": good}],
                           "rejected": [{"role": "assistant", "content": bad}]},
        "text": {"prompt": user, "chosen": good, "rejected": bad},
        "implicit": {"chosen": [{"role": "user", "content": user}, {"role": "assistant", "content": good}],
                     "rejected": [{"role": "user", "content": user}, {"role": "assistant", "content": bad}]},
    }
    got = {}
    for name, r in records.items():
        (pair,) = read_preferences(write_jsonl(tmp_path / f"{name}.jsonl", [r]))
        got[name] = (pair.prompt, pair.chosen, pair.rejected)
    assert got["text"] == got["conversational"] == got["implicit"] == ([{"role": "user", "content": user}], good, bad)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([records["text"]]), tmp_path / "p.parquet")
    (pair,) = read_preferences(tmp_path / "p.parquet")
    assert (pair.prompt, pair.chosen, pair.rejected) == got["text"]
    other = {**records["implicit"], "rejected": [{"role": "user", "content": "else"}, {"role": "assistant", "content": bad}]}
    with pytest.raises(PreferenceDataError, match="its messages before the answer differ"):
        read_preferences(write_jsonl(tmp_path / "x.jsonl", [other]))
