"""`lmforge gatt`: Ghost Attention (Llama 2, section 3.3): sample multi-turn dialogues with the instruction on every
user turn, then fine-tune through `sft` on the dialogues that state it once, learning only their last answers
(the method and its data: gatt_data.py).

    lmforge gatt runs/sft/model --world runs/world --sft.run.dir runs/gatt --sft.data.sources [runs/world/sft.jsonl]

writes runs/gatt-data/ (gatt.jsonl, summary.json: how often the samples followed their instructions, by turn,
and what was kept) and the sft run runs/gatt/ (model/ is the Ghost Attention model); the folders follow
`lmforge.align.stages` (the output rule, reuse on --sft.run.resume). `lmforge eval gatt` measures the result.
"""

from __future__ import annotations

from pathlib import Path

from lmforge.align.gatt_data import (
    GATT_SAMPLING,
    ContextGuard,
    GattConfig,
    GattError,
    context_of,
    draw_dialogues,
    gatt_data,
    sampling_record,
    turns_that_fit,
)
from lmforge.align.stages import FineTuneConfig
from lmforge.align.world.common import stream
from lmforge.infer.sampling import SamplingParams


# ---- the verb ----------------------------------------------------------------------------------------------------
def gatt(
    init_from: str,
    world: Path = Path("runs/world"),
    gatt: GattConfig = GattConfig(),
    sampling: SamplingParams = GATT_SAMPLING,
    sft: FineTuneConfig = FineTuneConfig(),
    data_dir: Path | None = None,
) -> Path:
    """Ghost Attention: sample multi-turn instruction dialogues, then fine-tune on their last answers (`lmforge gatt`).

    The instruction is appended to every user turn while the model answers; the training dialogue states it in
    the first user turn only, and only its last answer is learned (through `lmforge sft`, learn: last).

    Args:
        init_from: Model folder to fine-tune (the SFT or RLHF model); it also samples, unless gatt.sample_from.
        world: A world folder written by `lmforge world build` (its instructions and train-split tasks).
        gatt: The dialogues: how many, their turns, the instruction's placement, which examples are kept.
        sampling: How the answers are sampled (default greedy, at most 64 tokens).
        sft: The fine-tuning, sft's option groups: --sft.train.steps, --sft.optim.lr, --sft.data.sources
            (other dialogues mixed in, e.g. [runs/world/sft.jsonl]), --sft.run.dir (default runs/gatt) ...
        data_dir: Where the sampled data goes (default: the run folder's name + "-data", beside it).

    Returns:
        The run folder; its model/ is the Ghost Attention model.
    """
    from lmforge.align.stages import fine_tune, load_answerer, stage_folders, write_stage_data
    from lmforge.align.world.folder import open_world

    folders = stage_folders("gatt", sft.run, data_dir)
    dialogues_file = folders.data_dir / "gatt.jsonl"
    if folders.reuse:
        print(f"gatt: reusing the sampled data in {folders.data_dir}")
    else:
        w = open_world(world)
        net, tok, answer = load_answerer(gatt.sample_from or init_from, sft.train.device, batch_size=gatt.batch_size)
        _check_context(w, tok, gatt, sampling, context_of(net))
        guarded = ContextGuard(answer, tok, context_of(net))
        examples, summary = gatt_data(w, guarded, gatt, sampling, progress=sft.run.progress)
        summary["overflows"] = guarded.overflows
        del net, answer, guarded
        if not examples:
            raise GattError(f"no example kept: none of the {summary['answers']} sampled answers followed its "
                            "instructions (gatt.keep all keeps them anyway)")
        summary |= {"sampled_by": str(gatt.sample_from or init_from), "world_dir": str(world)}
        write_stage_data(folders.data_dir, "gatt data", {"gatt.jsonl": examples}, summary, sft.run.overwrite)
        rates = " ".join(f"{t}:{100 * r:.0f}%" for t, r in summary["sample_adherence_by_turn"].items())
        print(f"gatt: {summary['dialogues']} dialogues, {summary['answers']} answers sampled (following their "
              f"instructions by turn {rates}); {summary['examples']} of {summary['candidates']} examples kept "
              f"-> {dialogues_file}")
    return fine_tune(init_from, dialogues_file, gatt.weight, sft, folders.run)


def _check_context(world, tokenizer, cfg: GattConfig, sampling: SamplingParams, context: int | None) -> None:
    """Refuse max_turns that the sampling model's context cannot hold (a probe dialogue of max_turns turns)."""
    (d,) = draw_dialogues(world, 1, cfg.max_turns, cfg.max_turns, "train", stream(world.seed, "train|gatt|probe"))
    messages = sampling_record(d)["messages"]
    fit = turns_that_fit(tokenizer, messages, sampling.max_new_tokens, context)
    if fit < len(d.users):
        raise GattError(f"gatt.max_turns {cfg.max_turns}: the model's context ({context} tokens) holds only {fit} "
                        f"turns with answers of up to sampling.max_new_tokens {sampling.max_new_tokens} tokens; "
                        "lower one of them")


__all__ = ["gatt"]
