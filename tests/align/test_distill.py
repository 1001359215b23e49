"""Safety context distillation: targeted distillation keeps exactly the answers the (stub) Safety RM prefers; the
answers come from dialogues under the pre-prompt (its category's template when asked), are scored and trained
without it; untargeted keeps all; a reward model folder plugs in as the Safety RM (its reward at </s>); the verb
runs end to end and says in one line when nothing is kept."""

import json

import pytest
import torch
from helpers import one_torch_thread, unit_scale_  # noqa: F401  (an autouse fixture: the engine decodes on one thread)
from stage_helpers import Recorder

from lmforge.align.distill import (
    DistillConfig,
    DistillError,
    distill_data,
    distill_prompts,
    keep_flags,
    oracle_safety_scorer,
    scorer_of,
    with_preprompt,
)
from lmforge import ModelConfig, Transformer
from lmforge.models.checkpoint import save_model
from lmforge.tokenizer.chat import encode_chat
from lmforge.align.world import safety
from lmforge.align.world.folder import open_world
from lmforge.cli import main

COMPLY = "Sure, here is how."


def _prompts(stage_world, n=10):
    return distill_prompts(open_world(stage_world.world), n)


def _answerer(prompts):
    """Prompt k: under the pre-prompt it refuses when k % 3 != 0; alone it refuses when k % 2 == 0."""
    index = {m[-1]["content"]: k for k, (m, _) in enumerate(prompts)}

    def reply(dialogue):
        k = index[dialogue[-1]["content"]]
        refuse = k % 3 != 0 if dialogue[0]["role"] == "system" else k % 2 == 0
        return prompts[k][1]["reference"] if refuse else COMPLY

    return Recorder(reply)


class StubRM:
    """A Safety RM with known preferences, not always the oracle's: a refusal scores 1 and a compliance 0, but
    on prompt k = 5 it scores the compliance 2 (it prefers complying there). It records every pair it scores."""

    def __init__(self, prompts):
        self.index = {m[-1]["content"]: k for k, (m, _) in enumerate(prompts)}
        self.seen = []

    def __call__(self, pairs):
        self.seen += list(pairs)
        return [1.0 if safety.refused(a) else (2.0 if self.index[d[-1]["content"]] == 5 else 0.0) for d, a in pairs]


def test_targeted_distillation_keeps_exactly_the_answers_the_safety_rm_prefers(stage_world):
    prompts = _prompts(stage_world)
    answerer, rm = _answerer(prompts), StubRM(prompts)
    kept, candidates, summary = distill_data(prompts, answerer, DistillConfig(prompts=10, safety_rm="stub"), rm)
    # S(pre) > S(plain) where the pre-prompt refuses (k % 3 != 0) and the plain answer complies (k odd), except
    # k = 5, where this RM prefers the compliance: k = 1 and 7 (both refusing: a tie, not kept)
    expected = [1, 7]
    assert [c["kept"] for c in candidates] == [k in expected for k in range(10)]
    assert [c["score_preprompt"] > c["score_plain"] for c in candidates] == [k in expected for k in range(10)]
    assert [d["messages"][:-1] for d in kept] == [prompts[k][0] for k in expected]  # no pre-prompt in training
    assert all(d["messages"][-1] == {"role": "assistant", "content": prompts[k][1]["reference"]}
               for d, k in zip(kept, expected))
    assert summary["kept"] == len(expected) and summary["prompts"] == 10
    assert summary["refused_with_preprompt"] == 6 / 10 and summary["refused_without_preprompt"] == 5 / 10
    # the answers came from the pre-prompted and the plain dialogues; the RM judged both against x alone
    with_pre = [d for d in answerer.seen if d[0]["role"] == "system"]
    assert len(with_pre) == 10 and all(d[0]["content"] == safety.SAFETY_PREPROMPT for d in with_pre)
    assert [d[1:] for d in with_pre] == [m for m, _ in prompts]
    assert [d for d in answerer.seen if d[0]["role"] != "system"] == [m for m, _ in prompts]
    assert len(rm.seen) == 20 and all(d[0]["role"] != "system" for d, _ in rm.seen)
    # untargeted: every answer is kept, no RM asked
    kept_all, _, _ = distill_data(prompts, _answerer(prompts), DistillConfig(prompts=10), None)
    assert len(kept_all) == 10


def test_a_reward_model_folder_plugs_in_as_the_safety_rm(stage_world, tmp_path):
    """A (random, tiny) reward model folder as --distill.safety_rm: each score is the model's own reward at the
    closing </s> of [x, answer] (one forward per dialogue here, batched in the scorer), and targeted
    distillation keeps exactly where it scores the pre-prompted answer above the plain one."""
    torch.manual_seed(1)
    rm = unit_scale_(Transformer(ModelConfig.from_name("tiny", vocab_size=600, head="reward"))).eval()
    save_model(rm, tmp_path / "rm", tokenizer_path=stage_world.root / "tok" / "tokenizer.model")
    scorer = scorer_of(str(tmp_path / "rm"), device="cpu")
    prompts = _prompts(stage_world)
    pairs = [(m, a) for m, meta in prompts for a in (meta["reference"], COMPLY)]
    expected = []
    with torch.no_grad():
        for d, a in pairs:
            ids = encode_chat(stage_world.tokenizer, [*d, {"role": "assistant", "content": a}]).ids
            assert ids[-1] == stage_world.tokenizer.eos_id
            expected.append(rm(torch.tensor([ids]))[0, -1, 0].item())
    torch.testing.assert_close(torch.tensor(scorer(pairs)), torch.tensor(expected), atol=1e-5, rtol=1e-5)
    _, candidates, _ = distill_data(prompts, _answerer(prompts), DistillConfig(prompts=10, safety_rm="rm"), scorer)
    score = dict(zip([(tuple(m["content"] for m in d), a) for d, a in pairs], expected))
    for c in candidates:
        key = tuple(m["content"] for m in c["messages"])
        pre, plain = score[key, c["answer_preprompt"]], score[key, c["answer_plain"]]
        assert c["score_preprompt"] == pytest.approx(pre, abs=1e-5) and c["score_plain"] == pytest.approx(plain, abs=1e-5)
        assert c["kept"] == (c["score_preprompt"] > c["score_plain"])
    assert any(c["score_preprompt"] != c["score_plain"] for c in candidates)  # the answers differ somewhere


def test_the_template_carries_the_categorys_refusal():
    messages = [{"role": "user", "content": "How do I forge shadow coins?"}]
    plain, templated = with_preprompt(messages, "coins", False), with_preprompt(messages, "coins", True)
    assert plain[0] == {"role": "system", "content": safety.SAFETY_PREPROMPT} and plain[1:] == messages
    assert templated[0]["content"].startswith(safety.SAFETY_PREPROMPT)
    assert safety.category("coins").refusals[0] in templated[0]["content"]
    merged = with_preprompt([{"role": "system", "content": "Be brief."}, *messages], "coins", False)
    assert merged[0]["content"] == f"{safety.SAFETY_PREPROMPT} Be brief." and len(merged) == 2
    assert keep_flags([1.0, 0.0], None) == [True, True] and keep_flags([1.0, 0.5], [0.5, 0.5]) == [True, False]


def test_the_oracle_scorer_is_the_refusal_checker():
    score = oracle_safety_scorer()
    assert score([([], "I'm sorry, but I can't help with that."), ([], COMPLY)]) == [1.0, 0.0]


def test_prompts_are_adversarial_of_the_train_split_in_every_style(stage_world):
    from lmforge.align.world.common import split_of

    world = open_world(stage_world.world)
    prompts = distill_prompts(world, 40)
    assert len(prompts) == 40 and all(meta["kind"] == "unsafe" for _, meta in prompts)
    assert all(split_of(0, meta["item"], 0.25) == "train" for _, meta in prompts)
    assert {meta["style"] for _, meta in prompts} == set(safety.STYLES)


def _args(stage_world, run, *extra):
    return ["distill-safety", str(stage_world.model_dir), "--world", str(stage_world.world), "--sft.run.dir", str(run),
            "--distill.prompts", "6", "--sampling.max_new_tokens", "8", "--sft.data.cache_dir", str(run.parent / "c"),
            "--sft.train.batch_size", "2", "--sft.train.micro_batch_size", "2", "--sft.train.seq_len", "512", "--sft.train.steps",
            "2", "--sft.optim.lr", "1e-3", "--sft.run.progress", "false", "--sft.train.device", "cpu", *extra]


def test_verb_end_to_end(stage_world, tmp_path, capsys):
    """Untargeted on a tiny random model (it never refuses); targeted by the oracle then keeps nothing, which
    is said in one line before anything is written."""
    main(_args(stage_world, tmp_path / "d"))
    data = tmp_path / "d-data"
    summary = json.loads((data / "summary.json").read_text())
    kept = [json.loads(line) for line in (data / "distill.jsonl").read_text().splitlines()]
    candidates = [json.loads(line) for line in (data / "candidates.jsonl").read_text().splitlines()]
    assert summary["prompts"] == len(candidates) == 6 and len(kept) == summary["kept"] > 0
    assert all(m["role"] != "system" for d in kept for m in d["messages"])
    assert (tmp_path / "d" / "model" / "model.safetensors").is_file()
    assert "answers kept" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        main(_args(stage_world, tmp_path / "t", "--distill.safety_rm", "oracle"))
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "no answer kept of 6" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "t-data").exists() and not (tmp_path / "t").exists()


def test_bad_settings_in_one_line():
    with pytest.raises(DistillError, match="distill.prompts"):
        DistillConfig(prompts=0)
    with pytest.raises(DistillError, match="needs a scorer"):
        distill_data([], Recorder(lambda d: ""), DistillConfig(safety_rm="oracle"), None)
