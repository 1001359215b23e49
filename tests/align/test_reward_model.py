"""The reward model: read at the true last token of every row, padding side and amount change no score, our folder
format and its load errors, and the Hugging Face *ForSequenceClassification export against transformers."""

import json

import pytest
import torch

from helpers import unit_scale_
from lmforge import ModelConfig, Transformer
from lmforge.align.reward_model import init_reward_model, score_sequences, sequence_rewards
from lmforge.models.checkpoint import CheckpointError, load_model, save_model

EOS = 2


def reward_model(preset: str) -> Transformer:
    torch.manual_seed(0)
    return unit_scale_(Transformer(ModelConfig.from_name(preset, head="reward"))).eval()


def sequences(lengths, vocab=512, seed=0) -> list[list[int]]:
    """Random ids in [3, V) (never a pad or control id inside), each ending with </s>."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n - 1,), generator=g).tolist() + [EOS] for n in lengths]


def padded(seqs, T, side: str):
    """(tokens (B, T) padded with 0, lengths, positions restarting at each sequence's start, document ids with
    the padding as a document of its own, the index of each row's last token)."""
    tokens = torch.zeros(len(seqs), T, dtype=torch.int64)
    positions = torch.zeros(len(seqs), T, dtype=torch.int64)
    docs = torch.zeros(len(seqs), T, dtype=torch.int64)
    last = []
    for b, s in enumerate(seqs):
        start = 0 if side == "right" else T - len(s)
        tokens[b, start : start + len(s)] = torch.tensor(s)
        positions[b, start : start + len(s)] = torch.arange(len(s))
        docs[b, start : start + len(s)] = 1
        last.append(start + len(s) - 1)
    return tokens, torch.tensor([len(s) for s in seqs]), positions, docs, torch.tensor(last)


def alone(model, seqs) -> torch.Tensor:
    """Each sequence's reward read at its last position from a forward of that sequence alone."""
    with torch.no_grad():
        return torch.stack([model(torch.tensor([s]))[0, -1, 0] for s in seqs])


@pytest.mark.parametrize("preset", ["tiny", "tiny-swa", "tiny-moe"])
def test_the_score_is_read_at_the_true_last_token_whatever_the_padding(preset):
    """Right padding of two amounts and left padding (padding a document of its own, positions restarting at the
    sequence's start) give each row's score alone to 1e-5; tiny-swa's window (8) is shorter than every row."""
    model = reward_model(preset)
    seqs = sequences([9, 23, 16, 30])
    expected = alone(model, seqs)
    assert expected.abs().max() > 0.3 and expected.std() > 0.1  # O(1) scores that differ between rows
    with torch.no_grad():
        for T, side in ((30, "right"), (41, "right"), (37, "left")):
            tokens, lengths, positions, docs, last = padded(seqs, T, side)
            if side == "right":
                got = sequence_rewards(model, tokens, lengths)
            else:
                got = sequence_rewards(model, tokens, lengths, positions, docs, last=last)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        # and the test can fail: reading one token early, or letting left padding be attended, changes scores
        tokens, lengths, *_ = padded(seqs, 30, "right")
        early = sequence_rewards(model, tokens, lengths - 1)
        tokens, lengths, positions, docs, last = padded(seqs, 37, "left")
        leaky = sequence_rewards(model, tokens, lengths, positions, torch.ones_like(docs), last=last)
    assert (early - expected).abs().min() > 1e-3 and (leaky - expected).abs().max() > 1e-3


def test_score_sequences_batches_by_length_and_keeps_the_order():
    model = reward_model("tiny")
    seqs = sequences([5, 40, 12, 12, 3, 27, 33], seed=1)
    expected = alone(model, seqs)
    for budget in (1, 64, 10_000):  # one sequence a forward, a few, all at once
        got = torch.tensor(score_sequences(model, seqs, max_batch_tokens=budget))
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert score_sequences(model, []) == []


def test_our_folder_holds_the_head_and_each_kind_refuses_the_other(tmp_path, tokenizer_512):
    lm = Transformer(ModelConfig.from_name("tiny"))
    save_model(lm, tmp_path / "lm", tokenizer_path=tokenizer_512)
    rm = init_reward_model(tmp_path / "lm", seed=3)
    # the trunk is the language model's, the head new and small, and there is no vocabulary projection
    for name, p in lm.state_dict().items():
        if name != "output.weight":
            assert torch.equal(p, rm.state_dict()[name]), name
    assert "output.weight" not in rm.state_dict() and rm.reward_head.weight.shape == (1, 64)
    assert 0 < rm.reward_head.weight.std() < 0.01
    save_model(rm, tmp_path / "rm", tokenizer_path=tokenizer_512)
    assert json.loads((tmp_path / "rm" / "config.json").read_text())["head"] == "reward"
    again = load_model(tmp_path / "rm", head="reward")
    assert all(torch.equal(a, b) for a, b in zip(rm.state_dict().values(), again.state_dict().values()))
    with pytest.raises(CheckpointError, match="is a reward model .* not a language model"):
        load_model(tmp_path / "rm")  # every verb that generates or fine-tunes asks for a language model
    with pytest.raises(CheckpointError, match="is a language model .* not a reward model: .*lmforge rm train"):
        load_model(tmp_path / "lm", head="reward")
    assert init_reward_model(tmp_path / "rm").config.head == "reward"  # training a reward model further


transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("preset", ["tiny", "tiny-swa", "tiny-moe"])
def test_the_hugging_face_export_gives_our_scores_in_transformers(preset, tmp_path, tokenizer_512):
    """`lmforge convert --to hf` of a reward model loads as *ForSequenceClassification (num_labels 1, pad id not
    </s>) and scores padded batches ending in </s> as we do (<= 1e-5, fp32), left or right padded; Mistral's window
    (8) is shorter than the rows. Converting back gives the same tensors."""
    from lmforge.export import convert

    model = reward_model(preset)
    save_model(model, tmp_path / "rm", tokenizer_path=tokenizer_512)
    convert(str(tmp_path / "rm"), str(tmp_path / "hf"), to="hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    family = {"tiny": "Llama", "tiny-swa": "Mistral", "tiny-moe": "Mixtral"}[preset]
    assert config["architectures"] == [f"{family}ForSequenceClassification"] and config["pad_token_id"] == 0
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    assert hf.config.num_labels == 1 and hf.config.pad_token_id != EOS
    hf.eval()
    seqs = sequences([9, 23, 16, 30], seed=2)
    expected = alone(model, seqs)
    with torch.no_grad():
        for T, side in ((30, "right"), (36, "left")):
            tokens, lengths, *_ = padded(seqs, T, side)
            mask = (tokens != 0).long()
            theirs = hf(input_ids=tokens, attention_mask=mask).logits[:, 0]
            torch.testing.assert_close(theirs, expected, rtol=1e-5, atol=1e-5)
    back = load_model(tmp_path / "hf", head="reward")  # (a Hugging Face config has no MoE z-loss coefficient)
    assert back.config.head == "reward" and back.config.sliding_window == model.config.sliding_window
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))
