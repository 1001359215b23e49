"""`lmforge distill-safety`: safety context distillation (Llama 2, section 4.2.4), targeted by the Safety RM.

A safety pre-prompt makes a model answer adversarial prompts more safely. Context distillation moves that
behaviour into the model, so that it answers the same way without the pre-prompt:

    x            an adversarial prompt (the world's unsafe requests of the train split: every risk category,
                 every attack style)
    y_pre        the model's answer to [pre-prompt] x: the pre-prompt as a system message ("You are a safe and
                 responsible assistant..."), with `template` ending in the category's refusal as an answer
                 template (`safety.preprompt(category)`)
    y            its answer to x alone
    untargeted   keep (x, y_pre) for every x
    targeted     keep (x, y_pre) only where S(x, y_pre) > S(x, y), S the Safety RM's score: Llama 2 targets
                 because distilling every answer also distils the pre-prompt's needless or vague refusals,
                 which costs helpfulness; the RM keeps only the answers it finds safer than the model's own
    fine-tune    on the kept (x, y_pre) with the pre-prompt left out (through sft, learn: last)

Both answers are scored against x alone, the dialogue the model is trained on. The Safety RM sits behind one
small interface, `Scorer`: a list of (dialogue, answer) pairs in, one score per pair out (higher is safer).

    reward_model_scorer(path)   a reward model folder (the Safety RM of `lmforge rm train`): its reward r, read
                                at the answer's closing </s>
    oracle_safety_scorer()      the world oracle's safety of an answer to an unsafe request: 1 refused, 0
                                complied; a Safety RM that is never wrong (--distill.safety_rm oracle), for
                                runs without a trained one

    lmforge distill-safety runs/sft/model --world runs/world --distill.safety_rm runs/rm-safety/model \\
        --sft.run.dir runs/distill --sft.data.sources [runs/world/sft.jsonl]

writes runs/distill-data/ (distill.jsonl: the kept dialogues; candidates.jsonl: every prompt with both answers,
their scores and whether it was kept; summary.json) and the sft run runs/distill/ (model/: the distilled model).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from lmforge.align.eval_chat import Answerer, answer_prompts
from lmforge.align.stages import FineTuneConfig
from lmforge.align.world import safety
from lmforge.align.world.common import VERSION, stream
from lmforge.infer.sampling import SamplingParams

Scorer = Callable[[Sequence[tuple[list[dict], str]]], list[float]]
# NOTE: greedy, as eval chat answers: the distilled answer is the one the model gives under the pre-prompt.
# 128 tokens as eval chat: a refusal is the longest answer of the world.
DISTILL_SAMPLING = SamplingParams(temperature=0.0, max_new_tokens=128)


class DistillError(ValueError):
    """A distillation setting that cannot work (the message names the option)."""


@dataclass
class DistillConfig:
    """The distillation data: prompts, the pre-prompt, and which answers are kept.

    Attributes:
        prompts: Adversarial prompts (unsafe requests of the world's train split, every category and style).
        template: End the pre-prompt with the prompt's risk category's refusal as an answer template.
        safety_rm: Target the distillation with this Safety RM (a reward model folder, or "oracle" for the
            world oracle's safety score): an answer is kept only where it scores above the answer without the
            pre-prompt. None: untargeted, every answer is kept.
        weight: Mixing weight of the distilled dialogues against sft.data.sources.
        sample_from: Model folder that answers (default: init_from, the model being tuned).
        batch_size: Sequences the engine decodes together.
    """

    prompts: int = 400
    template: bool = False
    safety_rm: str | None = None
    weight: float = 1.0
    sample_from: str | None = None
    batch_size: int = 64

    def __post_init__(self) -> None:
        if self.prompts < 1 or self.batch_size < 1 or not self.weight > 0:
            raise DistillError("distill.prompts and distill.batch_size must be >= 1, distill.weight > 0")

    @property
    def targeted(self) -> bool:
        return self.safety_rm is not None


# ---- the scorer ------------------------------------------------------------------------------------------------
def oracle_safety_scorer() -> Scorer:
    """The world oracle's safety of an answer to an unsafe request (module docstring): 1.0 refused, 0.0 not."""
    return lambda pairs: [float(safety.refused(answer)) for _, answer in pairs]


def reward_model_scorer(path: str | Path, device: str | None = None, dtype: str | None = None,
                        max_batch_tokens: int = 16384) -> Scorer:
    """A reward model folder as a Scorer: the reward r of each dialogue ending with its answer, read at the
    answer's </s> (`lmforge.align.reward_model.score_sequences`, as `lmforge rm score` scores)."""
    from lmforge.align.reward_model import score_sequences
    from lmforge.infer.cli import _load
    from lmforge.tokenizer.chat import encode_chat

    net, tok = _load(Path(path), None, device, dtype, head="reward")

    def score(pairs: Sequence[tuple[list[dict], str]]) -> list[float]:
        seqs = [encode_chat(tok, [*d, {"role": "assistant", "content": a}]).ids for d, a in pairs]
        return score_sequences(net, seqs, max_batch_tokens)

    return score


def scorer_of(safety_rm: str, device: str | None = None, dtype: str | None = None) -> Scorer:
    """The Scorer of `--distill.safety_rm`: "oracle", or a reward model folder."""
    return oracle_safety_scorer() if safety_rm == "oracle" else reward_model_scorer(safety_rm, device, dtype)


# ---- the data ----------------------------------------------------------------------------------------------------
def with_preprompt(messages: list[dict], category: str, template: bool) -> list[dict]:
    """`messages` under the safety pre-prompt (a system message; with `template`, the category's refusal as
    its answer template); a system message already there follows the pre-prompt."""
    pre = safety.preprompt(category if template else None)
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": f"{pre} {messages[0]['content']}"}, *messages[1:]]
    return [{"role": "system", "content": pre}, *messages]


def keep_flags(pre_scores: list[float], plain_scores: list[float] | None) -> list[bool]:
    """Which distilled answers are kept: where S(x, y_pre) > S(x, y) (targeted), or all (plain_scores None).

    >>> keep_flags([0.9, 0.2, 0.5], [0.1, 0.7, 0.5])
    [True, False, False]
    """
    if plain_scores is None:
        return [True] * len(pre_scores)
    return [p > q for p, q in zip(pre_scores, plain_scores)]


def distill_data(prompts: list[tuple[list[dict], dict]], answer: Answerer, cfg: DistillConfig,
                 scorer: Scorer | None, sampling: SamplingParams = DISTILL_SAMPLING,
                 progress: bool = False) -> tuple[list[dict], list[dict], dict]:
    """Answer every prompt with and without the pre-prompt, score and keep (module docstring):
    (kept dialogues in sft's format, every candidate with both answers and scores, a summary)."""
    if cfg.targeted and scorer is None:
        raise DistillError("targeted distillation needs a scorer (the Safety RM)")
    records = [{"messages": with_preprompt(m, meta["category"], cfg.template), "meta": meta} for m, meta in prompts]
    records += [{"messages": m, "meta": meta} for m, meta in prompts]
    answers = answer_prompts(None, None, records, sampling, answer=answer, chunk_size=max(256, cfg.batch_size),
                             progress=progress)
    pre, plain = answers[: len(prompts)], answers[len(prompts):]
    pairs = [(m, a) for (m, _), a in zip(prompts, pre)] + [(m, a) for (m, _), a in zip(prompts, plain)]
    scores = scorer(pairs) if scorer is not None else None
    pre_scores = scores[: len(prompts)] if scores is not None else [None] * len(prompts)
    plain_scores = scores[len(prompts):] if scores is not None else None
    keep = keep_flags(pre_scores, plain_scores if cfg.targeted else None)
    kept, candidates = [], []
    for k, ((messages, meta), y_pre, y) in enumerate(zip(prompts, pre, plain)):
        usable = bool(y_pre.strip())  # an empty answer is no dialogue to train on
        candidates.append({"world": VERSION, "messages": messages, "meta": meta, "answer_preprompt": y_pre,
                           "answer_plain": y, "score_preprompt": pre_scores[k],
                           "score_plain": plain_scores[k] if plain_scores is not None else None,
                           "kept": keep[k] and usable})
        if keep[k] and usable:
            kept.append({"world": VERSION, "messages": [*messages, {"role": "assistant", "content": y_pre}],
                         "meta": {**meta, "kind": "distilled", "prompt_kind": meta["kind"]}})
    n = len(prompts)
    summary = {"world": VERSION, "distill": asdict(cfg), "sampling": asdict(sampling), "prompts": n,
               "refused_with_preprompt": sum(map(safety.refused, pre)) / n,
               "refused_without_preprompt": sum(map(safety.refused, plain)) / n,
               "kept": len(kept), "empty_answers_dropped": sum(keep[k] and not pre[k].strip() for k in range(n))}
    return kept, candidates, summary


def distill_prompts(world, n: int) -> list[tuple[list[dict], dict]]:
    """n adversarial prompts of the world's train split, of random risk categories and attack styles."""
    return world.unsafe("train", n, stream(world.seed, "train|distill"))


# ---- the verb ----------------------------------------------------------------------------------------------------
def distill_safety(
    init_from: str,
    world: Path = Path("runs/world"),
    distill: DistillConfig = DistillConfig(),
    sampling: SamplingParams = DISTILL_SAMPLING,
    sft: FineTuneConfig = FineTuneConfig(),
    data_dir: Path | None = None,
) -> Path:
    """Safety context distillation: answers under a safety pre-prompt, fine-tuned without the pre-prompt.

    Targeted (--distill.safety_rm RM_FOLDER, or oracle): an answer is kept only where the
    Safety RM scores it above the model's answer without the pre-prompt.

    Args:
        init_from: Model folder to fine-tune (the SFT or RLHF model); it also answers, unless distill.sample_from.
        world: A world folder written by `lmforge world build` (its adversarial prompts of the train split).
        distill: The prompts, the pre-prompt's answer template, targeting and its Safety RM.
        sampling: How the answers are generated (default greedy, at most 128 tokens).
        sft: The fine-tuning, sft's option groups: --sft.train.steps, --sft.optim.lr, --sft.data.sources
            (other dialogues mixed in, e.g. [runs/world/sft.jsonl]), --sft.run.dir (default runs/distill-safety) ...
        data_dir: Where the generated data goes (default: the run folder's name + "-data", beside it).

    Returns:
        The run folder; its model/ is the distilled model.
    """
    from lmforge.align.stages import fine_tune, load_answerer, stage_folders, write_stage_data
    from lmforge.align.world.folder import open_world

    folders = stage_folders("distill-safety", sft.run, data_dir)
    dialogues_file = folders.data_dir / "distill.jsonl"
    if folders.reuse:
        print(f"distill-safety: reusing the generated data in {folders.data_dir}")
    else:
        prompts = distill_prompts(open_world(world), distill.prompts)
        scorer = scorer_of(distill.safety_rm, sft.train.device) if distill.targeted else None
        net, _, answer = load_answerer(distill.sample_from or init_from, sft.train.device,
                                       batch_size=distill.batch_size)
        kept, candidates, summary = distill_data(prompts, answer, distill, scorer, sampling, progress=sft.run.progress)
        del net, answer, scorer
        if not kept:
            raise DistillError(f"no answer kept of {summary['prompts']}: the Safety RM never preferred the "
                               "pre-prompted answer (without --distill.safety_rm every answer is kept)")
        summary |= {"sampled_by": str(distill.sample_from or init_from), "world_dir": str(world)}
        write_stage_data(folders.data_dir, "distill-safety data",
                         {"distill.jsonl": kept, "candidates.jsonl": candidates}, summary, sft.run.overwrite)
        print(f"distill-safety: {summary['prompts']} adversarial prompts; refused with the pre-prompt "
              f"{100 * summary['refused_with_preprompt']:.1f}%, without {100 * summary['refused_without_preprompt']:.1f}%; "
              f"{summary['kept']} answers kept{' (targeted)' if distill.targeted else ''} -> {dialogues_file}")
    return fine_tune(init_from, dialogues_file, distill.weight, sft, folders.run)


__all__ = ["DISTILL_SAMPLING", "DistillConfig", "DistillError", "Scorer", "distill_data", "distill_prompts",
           "distill_safety", "keep_flags", "oracle_safety_scorer", "reward_model_scorer", "scorer_of",
           "with_preprompt"]
