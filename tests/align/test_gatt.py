"""Ghost Attention data and `lmforge gatt`: the sampled answers come from dialogues with the instruction on
every turn (a stub sampler that records its inputs); the training dialogue states it in the first user turn
only; the loss mask covers the last answer only (on ids, through sft's own tokenisation); the context bound
holds; the verb runs end to end, reuses its data on resume and follows the output rule."""

import json

import pytest
from helpers import one_torch_thread  # noqa: F401  (an autouse fixture: the engine decodes on one thread)
from stage_helpers import Recorder

from lmforge.align.eval_chat import answer_prompts, engine_answerer
from lmforge.align.gatt_data import (
    ContextGuard,
    GattConfig,
    GattError,
    draw_dialogues,
    gatt_data,
    prompt_bounds,
    sampling_record,
    turns_that_fit,
)
from lmforge.align.sft_data import SFTSource, tokenize_source
from lmforge.align.world.common import stream
from lmforge.align.world.folder import open_world
from lmforge.align.world.instructions import adheres, apply, instruction_text
from lmforge.cli import main
from lmforge.data.loader import TokenStream
from lmforge.infer.sampling import SamplingParams
from lmforge.tokenizer.chat import encode_chat

CFG = GattConfig(dialogues=12, min_turns=2, max_turns=4, keep="all")


def _sampled(stage_world, cfg=CFG, follow=lambda i, t: True):
    """gatt_data with a stub sampler: at turn t of dialogue i it follows the instructions when follow(i, t)
    (the task's reference answer under them), else gives the plain reference (which follows none of them)."""
    world = open_world(stage_world.world)
    dialogues = draw_dialogues(world, cfg.dialogues, cfg.min_turns, cfg.max_turns, "train",
                               stream(world.seed, "train|gatt"))  # the draws gatt_data makes
    by_first = {d.users[0]: (i, d) for i, d in enumerate(dialogues)}

    def reply(dialogue):
        users = [m["content"] for m in dialogue if m["role"] == "user"]
        i, d = next(v for k, v in by_first.items() if users[0].startswith(k))
        t = len(users)
        reference = d.meta["turns"][t - 1]["reference"]
        return apply(d.specs, reference) if follow(i, t) else reference

    stub = Recorder(reply)
    examples, summary = gatt_data(world, stub, cfg)
    return dialogues, stub, examples, summary


def test_sampled_answers_came_from_dialogues_with_the_instruction_on_every_turn(stage_world):
    dialogues, stub, examples, summary = _sampled(stage_world)
    assert summary["dialogues"] == len(dialogues) == 12
    assert len(stub.seen) == summary["answers"] == sum(len(d.users) for d in dialogues)
    for sent in stub.seen:
        d = next(d for d in dialogues if sent[0]["content"].startswith(d.users[0]))
        text = instruction_text(d.specs)
        users = [m for m in sent if m["role"] == "user"]
        assert [m["content"] for m in users] == [f"{u} {text}" for u in d.users[: len(users)]]  # on every turn
        assert sent[0]["role"] == "user" and [m["role"] for m in sent] == ["user", "assistant"] * (len(users) - 1) + ["user"]
        earlier = [m["content"] for m in sent if m["role"] == "assistant"]  # the sampler's own answers, not references
        assert earlier == [apply(d.specs, t["reference"]) for t in d.meta["turns"][: len(users) - 1]]
    # the training dialogues carry exactly the sampled answers
    for ex in examples:
        d = dialogues[ex["meta"]["dialogue"]]
        answers = [m["content"] for m in ex["messages"] if m["role"] == "assistant"]
        assert answers == [apply(d.specs, t["reference"]) for t in d.meta["turns"][: ex["meta"]["turn"]]]


@pytest.mark.parametrize("placement", ["system", "user"])
def test_the_instruction_appears_in_the_first_user_turn_only(stage_world, placement):
    dialogues, _, examples, _ = _sampled(stage_world, GattConfig(**{**CFG.__dict__, "placement": placement}))
    assert len(examples) == sum(len(d.users) - 1 for d in dialogues)  # every_turn: turns 2..n of each
    tok = stage_world.tokenizer
    for ex in examples:
        d = dialogues[ex["meta"]["dialogue"]]
        text, messages = instruction_text(d.specs), ex["messages"]
        holding = [i for i, m in enumerate(messages) if text in m["content"]]
        if placement == "system":
            assert messages[0] == {"role": "system", "content": text} and holding == [0]
        else:
            assert messages[0]["role"] == "user" and messages[0]["content"] == f"{d.users[0]} {text}"
            assert holding == [0]
        # on ids: the instruction's text is inside the first exchange (<s> ... </s>) and in no later one
        ids = encode_chat(tok, messages).ids
        starts = [k for k, i in enumerate(ids) if i == tok.bos_id] + [len(ids)]
        exchanges = [tok.decode(ids[a:b]) for a, b in zip(starts, starts[1:])]
        assert len(exchanges) == ex["meta"]["turn"] and text in exchanges[0]
        assert not any(text in e for e in exchanges[1:])


def test_the_loss_mask_covers_the_last_answer_only(stage_world, tmp_path, monkeypatch):
    """Through what `lmforge gatt` hands to sft: its sources (the Ghost Attention file learns "last") and sft's
    own tokenisation into cached shards, read back from disk."""
    _, _, examples, _ = _sampled(stage_world)
    path = tmp_path / "gatt.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in examples))
    handed = {}
    monkeypatch.setattr("lmforge.align.sft.sft", lambda init_from, data, *groups: handed.setdefault("data", data))
    from lmforge.align.sft_data import SFTDataConfig
    from lmforge.align.stages import FineTuneConfig, fine_tune
    from lmforge.train.config import RunConfig

    fine_tune("unused", path, 2.0, FineTuneConfig(data=SFTDataConfig(sources=["other.jsonl"])), RunConfig())
    first, other = handed["data"].sources
    assert (first.path, first.weight, first.learn) == (str(path), 2.0, "last") and other.learn == "all"

    tok = stage_world.tokenizer
    cached = tokenize_source(first, tok, val_fraction=0.0, seed=0, cache_dir=tmp_path / "cache")
    stream_ = TokenStream(cached.folder, "train")
    ends = stream_.doc_ends
    assert len(ends) == len(examples)
    for ex, start, end in zip(examples, [0, *ends[:-1]], ends):
        ids, learn = stream_.read(int(start), int(end))
        last_bos = max(k for k, i in enumerate(ids) if i == tok.bos_id)
        learned = [k for k, f in enumerate(learn) if f]
        assert learned and learned[0] > last_bos  # nothing of an earlier turn (answers included) is learned
        assert learned == list(range(learned[0], len(ids)))  # the last answer through its </s>, contiguous
        assert ids[-1] == tok.eos_id
        assert tok.decode(ids[learned[0] : -1]).strip() == ex["messages"][-1]["content"].strip()


def test_keep_adherent_keeps_the_examples_whose_last_answer_follows(stage_world):
    follow = lambda i, t: (i + t) % 2 == 0  # noqa: E731
    dialogues, _, examples, summary = _sampled(stage_world, GattConfig(**{**CFG.__dict__, "keep": "adherent"}), follow)
    expected = [(i, t) for i, d in enumerate(dialogues) for t in range(2, len(d.users) + 1) if follow(i, t)]
    assert [(e["meta"]["dialogue"], e["meta"]["turn"]) for e in examples] == expected
    assert all(e["meta"]["adheres"] for e in examples) and summary["examples"] == len(expected)
    assert summary["candidates"] == sum(len(d.users) - 1 for d in dialogues)
    n1 = len(dialogues)  # turn 1 is followed where i + 1 is even
    assert summary["sample_adherence_by_turn"]["1"] == sum((i + 1) % 2 == 0 for i in range(n1)) / n1
    only_last = GattConfig(**{**CFG.__dict__, "every_turn": False})
    _, _, last, _ = _sampled(stage_world, only_last)
    assert [e["meta"]["turn"] for e in last] == [len(d.users) for d in dialogues]


def test_prompt_bounds_by_hand(stage_world):
    """Earlier answers of exactly max_new_tokens pieces ("red" is one piece, 12 times): each completed turn
    adds its pieces, a trailing " " and </s>, so the prompt is the bound less 2 per earlier turn, exactly."""
    tok = stage_world.tokenizer
    world = open_world(stage_world.world)
    answer = " ".join(["red"] * 12)
    assert len(tok.encode(answer)) == 12
    for d in draw_dialogues(world, 4, 3, 3, "train", stream(0, "test|bounds")):
        messages = sampling_record(d)["messages"]
        bounds = prompt_bounds(tok, messages, 12)
        users = [m for m in messages if m["role"] == "user"]
        for t in range(len(users)):
            dialogue = [m for u in users[:t] for m in (u, {"role": "assistant", "content": answer})]
            actual = len(encode_chat(tok, [*dialogue, users[t]], add_generation_prompt=True).ids)
            assert actual == bounds[t] - 2 * t
        assert turns_that_fit(tok, messages, 12, bounds[1] + 12) == 2
        assert turns_that_fit(tok, messages, 12, bounds[1] + 11) == 1
        assert turns_that_fit(tok, messages, 12, None) == 3


def test_the_context_guard_answers_what_fits_and_counts_the_rest(stage_world):
    """A random model's answers run to max_new_tokens and include invalid UTF-8 bytes (each decodes to U+FFFD,
    three byte pieces when re-encoded), so a rollout can outgrow its planned bound: the guard sends the engine
    only prompts that leave max_new_tokens in the context; the rest are answered "" and counted."""
    model, tok = stage_world.model, stage_world.tokenizer
    records = [sampling_record(d) for d in draw_dialogues(open_world(stage_world.world), 4, 3, 3, "train",
                                                          stream(0, "test|bounds"))]
    sampling = SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True)
    engine, lengths = engine_answerer(model, tok, 8), []

    def answer(dialogues, sampling):  # the engine, recording the prompt lengths it is sent
        lengths.extend(len(encode_chat(tok, d, add_generation_prompt=True).ids) for d in dialogues)
        return engine(dialogues, sampling)

    context = 150
    guard = ContextGuard(answer, tok, context)
    said = answer_prompts(None, None, records, sampling, answer=guard, progress=False)
    assert lengths and max(lengths) + 12 <= context  # the engine never got a prompt it would refuse
    assert guard.overflows == sum(a == "" for s in said for a in s) > 0
    for s in said:  # once a dialogue outgrows the context its later turns do too: the empties are a suffix
        first = next((k for k, a in enumerate(s) if a == ""), len(s))
        assert first > 0 and all(a == "" for a in s[first:])


def _args(stage_world, run, *extra):
    return ["gatt", str(stage_world.model_dir), "--world", str(stage_world.world), "--sft.run.dir", str(run),
            "--gatt.dialogues", "6", "--gatt.max_turns", "3", "--gatt.keep", "all", "--sampling.max_new_tokens", "12",
            "--sft.data.cache_dir", str(run.parent / "cache"), "--sft.train.batch_size", "2", "--sft.train.micro_batch_size", "2",
            "--sft.train.seq_len", "512", "--sft.train.steps", "2", "--sft.optim.lr", "1e-3", "--sft.run.progress", "false",
            "--sft.train.device", "cpu", "--sft.run.checkpoint_every", "1", *extra]


def test_verb_end_to_end_resume_and_the_output_rule(stage_world, tmp_path, capsys):
    run = tmp_path / "gatt"
    main(_args(stage_world, run))
    out = capsys.readouterr().out
    data = tmp_path / "gatt-data"
    summary = json.loads((data / "summary.json").read_text())
    examples = [json.loads(line) for line in (data / "gatt.jsonl").read_text().splitlines()]
    assert summary["dialogues"] == 6 and summary["examples"] == len(examples) > 0 and "examples kept" in out
    assert (run / "model" / "model.safetensors").is_file() and (data / ".lmforge-output").is_file()
    assert json.loads((run / "summary.json").read_text())["steps"] == 2
    before = (data / "gatt.jsonl").stat().st_mtime_ns
    main(_args(stage_world, run, "--sft.run.resume", "auto"))  # complete: nothing sampled, nothing trained again
    assert "reusing the sampled data" in capsys.readouterr().out and (data / "gatt.jsonl").stat().st_mtime_ns == before
    with pytest.raises(SystemExit) as exit_:  # an earlier output: replaced only with --sft.run.overwrite true
        main(_args(stage_world, run))
    assert exit_.value.code == 2 and "--sft.run.overwrite true" in capsys.readouterr().err
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("the user's")
    with pytest.raises(SystemExit):  # a folder lmforge did not write is refused before any sampling
        main(_args(stage_world, tmp_path / "other", "--data_dir", str(mine), "--sft.run.overwrite", "true"))
    assert "lmforge did not write it" in capsys.readouterr().err and (mine / "notes.txt").read_text() == "the user's"


def test_turns_beyond_the_context_are_refused_in_one_line(stage_world, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(_args(stage_world, tmp_path / "g", "--gatt.max_turns", "40"))
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("lmforge: error: gatt.max_turns 40: the model's context (512")
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "g-data").exists()
    with pytest.raises(GattError, match="min_turns <= max_turns"):
        GattConfig(min_turns=3, max_turns=2)


def test_a_dialogue_answered_with_nothing_is_not_trained_on(stage_world):
    """An empty sampled answer (the model ended at once) cannot be a training turn: examples holding one are
    dropped and counted."""
    world = open_world(stage_world.world)
    stub = Recorder(lambda d: "" if len([m for m in d if m["role"] == "user"]) == 2 else "BEHOLD, IT IS SO.")
    kept, summary = gatt_data(world, stub, CFG)
    assert kept == [] and summary["dropped_empty"] == summary["candidates"] > 0  # every example holds turn 2
