"""`lmforge preferences collect`: Llama 2's preference collection on the chat world, with the oracle as annotator.

Llama 2 (section 3.2.1): for each prompt, two answers sampled from two model variants (and temperatures varied
for diversity); annotators pick the better one and say by how much (significantly better, better, slightly
better, negligibly better / unsure), and for safety prompts put the pair in a safety bin: the chosen answer
safe and the other not, both safe, or both unsafe; a pair whose chosen answer is unsafe and the other safe is
left out (a safer answer is also the better one). Here the annotator is the world's oracle (world/oracle.py):

    variant a, b      a model folder and a temperature each (two checkpoints, or one model at two temperatures)
    answers           one per variant, sampled through LLMEngine (`sample_answers`), seeded per prompt
    preference score  u = helpfulness + SAFE_BONUS * [safe] on safety prompts (kinds unsafe and look-alike),
                      u = helpfulness on every other prompt (tasks, instructions, creative)
    annotator         sees g = u_a - u_b + noise, noise ~ N(0, label_noise^2) (seeded): chosen = the answer
                      with g in its favour (a fair coin at g = 0); degree = oracle.preference_degree(|g|) with
                      the thresholds fixed in world v1 (0.5, 0.25, 0.1)
    safety bin        oracle.safety_bin of the two answers' safety, for safety prompts; the pairs it leaves out
                      (chosen unsafe, other safe: only a noisy annotator makes them) are counted, not written
    left out too      pairs with the same answer twice (nothing to prefer) or an empty one (preference files
                      hold no empty message: `rm train` refuses them), counted

NOTE: SAFE_BONUS = 2 exceeds any helpfulness gap (at most 1) by more than the largest threshold, so a safe
answer against an unsafe one is always "significantly better": the oracle's helpfulness alone ignores harm
(it ranks complying with an unsafe request above refusing it), and this rule is the annotator's safety
judgement on top of it. It is this stage's rule, not part of the frozen world v1 oracle.

    OUT/helpfulness.jsonl   pairs of helpfulness prompts      TRL's conversational preference format: "prompt"
    OUT/safety.jsonl        pairs of safety prompts           (messages), "chosen" / "rejected" (one assistant
    OUT/summary.json        counts per source, degree, bin    message each), plus "degree", "safety_bin",
                            and of the pairs left out         "source", "world": "v1", "oracle" (each answer's
                                                              helpfulness, safety and u), the prompt's "meta"

`lmforge rm train --data.sources [OUT/helpfulness.jsonl,OUT/safety.jsonl]` trains on them (and `lmforge dpo`).
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmforge.align.eval_chat import Dtype
from lmforge.align.world.common import VERSION
from lmforge.align.world.oracle import helpfulness, preference_degree, safety, safety_bin
from lmforge.infer.sampling import SamplingParams

SAFE_BONUS = 2.0
SAFETY_KINDS = ("unsafe", "lookalike")  # the world's safety prompts: unsafe requests and their look-alikes
SOURCES = ("helpfulness", "safety")


class PreferenceCollectError(ValueError):
    """A prompt file or option that preference collection cannot use."""


@dataclass
class Variant:
    """One of the two model variants the answers of a pair come from.

    Attributes:
        model: Model folder; None: the verb's `model`.
        temperature: Sampling temperature of this variant (Llama 2 varies it for diversity).
    """

    model: str | None = None
    temperature: float = 1.0


def answer_seed(seed: int, prompt: int, k: int) -> int:
    """The sampling seed of output k of prompt number `prompt` in a collection seeded `seed`: one stream per
    (seed, prompt, k), mixed by numpy's SeedSequence, so that no two prompts (and no two variants, seeded seed and
    seed + 1) share their random draws.

    NOTE: one seed for every prompt (seed + k) would correlate the answers across prompts: the same draw at a
    token that decides between refusing and complying tilts every prompt alike (seen: two held-out collections
    of one model, seeds 1000 and 2000, had 131 and 344 safe-against-unsafe pairs of 1,000; with a stream per
    prompt, 205 and 199)."""
    return int(np.random.SeedSequence([seed, prompt, k]).generate_state(1, np.uint64)[0] % 2**63)


def sample_answers(engine, prompts: list[list[int]], sampling: SamplingParams, n: int = 1) -> list[list[list[int]]]:
    """n sampled outputs (token ids, without </s>) for each prompt: output k of prompt i is seeded
    answer_seed(sampling.seed, i, k), so the outputs depend on the seed, the prompts and the model only, never
    on the batch.

    NOTE: repeated seeded requests; an engine that pre-fills a prompt once for n samples (`generate(n=...)`)
    could replace this loop, were its choice k seeded by prompt too (it seeds seed + k).
    """
    if sampling.seed is None:
        raise PreferenceCollectError("sample_answers needs sampling.seed (each output is seeded from it)")
    params = [dataclasses.replace(sampling, seed=answer_seed(sampling.seed, i, k))
              for i in range(len(prompts)) for k in range(n)]
    outputs = engine.generate([p for p in prompts for _ in range(n)], params)
    eos = engine.eos_id
    outputs = [[t for t in out if t != eos] for out in outputs]
    return [outputs[i * n : (i + 1) * n] for i in range(len(prompts))]


def preference_score(record: dict, answer: str) -> dict[str, float]:
    """The oracle's helpfulness and safety of `answer`, and the annotator's preference score u (module docstring)."""
    h, s = helpfulness(record, answer), safety(record, answer)
    u = h + SAFE_BONUS * (s >= 0.5) if record["meta"]["kind"] in SAFETY_KINDS else h
    return {"helpfulness": h, "safety": s, "preference": u}


def label_pair(record: dict, answers: tuple[str, str], noise: float, rng: np.random.Generator) -> dict | str:
    """The preference record of two answers to a world prompt record (module docstring), or why it is left out:
    "identical", "empty" or "chosen_unsafe"."""
    if answers[0].strip() == answers[1].strip():
        return "identical"
    if not answers[0].strip() or not answers[1].strip():  # the model ended at once: nothing for an annotator
        return "empty"
    scores = [preference_score(record, a) for a in answers]
    gap = scores[0]["preference"] - scores[1]["preference"] + (noise * rng.standard_normal() if noise else 0.0)
    first = bool(gap > 0 or (gap == 0 and rng.random() < 0.5))
    c, r = (0, 1) if first else (1, 0)
    source = "safety" if record["meta"]["kind"] in SAFETY_KINDS else "helpfulness"
    bin_ = safety_bin(scores[c]["safety"], scores[r]["safety"]) if source == "safety" else None
    if source == "safety" and bin_ is None:
        return "chosen_unsafe"
    return {"prompt": record["messages"], "chosen": [{"role": "assistant", "content": answers[c]}],
            "rejected": [{"role": "assistant", "content": answers[r]}], "degree": preference_degree(abs(gap)),
            "safety_bin": bin_, "source": source, "world": VERSION,
            "oracle": {"chosen": scores[c], "rejected": scores[r]}, "variants": ["ab"[c], "ab"[r]],
            "meta": record["meta"]}


def _answers(model: str, variant: Variant, records: list[dict], sampling: SamplingParams, device, dtype,
             batch_size: int) -> list[str]:
    """One answer per record from `variant` (its model, or `model`)."""
    from lmforge.infer.cli import _load  # the loader of `lmforge generate`: model, tokenizer, vocabulary check
    from lmforge.infer.engine.llm import LLMEngine
    from lmforge.tokenizer.chat import encode_chat

    net, tok = _load(Path(variant.model or model), None, device, dtype)
    engine = LLMEngine(net, eos_id=tok.eos_id, max_num_seqs=batch_size)
    prompts = [encode_chat(tok, r["messages"], add_generation_prompt=True).ids for r in records]
    params = dataclasses.replace(sampling, temperature=variant.temperature)
    outputs = sample_answers(engine, prompts, params)
    return [tok.decode(out[0]).strip() for out in outputs]


def collect_preferences(model: str, prompts: list[Path] | Path | None = None, out_dir: Path = Path("runs/preferences"),
                        a: Variant = Variant(temperature=0.7), b: Variant = Variant(temperature=1.2),
                        label_noise: float = 0.0, seed: int = 0, max_new_tokens: int = 128, batch_size: int = 64,
                        limit: int | None = None, device: str | None = None, dtype: Dtype | None = None,
                        overwrite: bool = False) -> dict:
    """Sample two answers per prompt and label them with the chat world's oracle (`lmforge preferences collect`).

    Llama 2's protocol: answers from two model variants, the degree of preference and the safety bin from the
    annotator (here the oracle: its helpfulness gap with world v1's thresholds, plus label noise); pairs whose
    chosen answer is unsafe and the other safe are left out.

    Args:
        model: Model folder both variants use unless a.model / b.model name others.
        prompts: Prompt files of the chat world (`lmforge world build`: rlhf_prompts.jsonl for training data, the
            held-out eval_*.jsonl for evaluation pairs); multi-turn rollout records are skipped and counted.
        out_dir: Output folder (helpfulness.jsonl, safety.jsonl, summary.json), written whole under the output rule.
        a: The first variant (--a.model, --a.temperature; default the model at temperature 0.7).
        b: The second variant (default the model at temperature 1.2).
        label_noise: Standard deviation of the noise on the preference gap the annotator sees (0: exact oracle).
        seed: Seed of the sampling (variant b uses seed + 1) and of the label noise.
        max_new_tokens: Longest answer in tokens.
        batch_size: Sequences the engine decodes together.
        limit: Only the first N records of each prompt file.
        device: cuda or cpu (default: cuda when available).
        dtype: Cast the weights (float32, bfloat16, float16; default: as stored).
        overwrite: Replace an earlier output of this verb in out_dir.

    Returns:
        The summary (also OUT/summary.json).
    """
    from lmforge.align.eval_chat import read_records
    from lmforge.io import claim_output_dir, output_dir

    paths = [prompts] if isinstance(prompts, (str, Path)) else list(prompts or [])
    if not paths:
        raise PreferenceCollectError("no prompt files: pass --prompts FILE.jsonl (or a list, --prompts [a,b])")
    if label_noise < 0:
        raise PreferenceCollectError(f"label_noise must be >= 0, got {label_noise}")
    claim_output_dir(out_dir, overwrite)  # refuse a wrong destination before any sampling
    records = [r for p in paths for r in read_records(p, limit)]
    single = [r for r in records if not r["meta"].get("rollout")]
    if not single:
        raise PreferenceCollectError(f"no single-turn prompts in {', '.join(map(str, paths))}")
    sampling = SamplingParams(max_new_tokens=max_new_tokens, seed=seed)
    answers_a = _answers(model, a, single, sampling, device, dtype, batch_size)
    answers_b = _answers(model, b, single, dataclasses.replace(sampling, seed=seed + 1), device, dtype, batch_size)
    rng = np.random.default_rng([seed, 17])
    pairs: dict[str, list[dict]] = {s: [] for s in SOURCES}
    left_out: Counter = Counter({"rollout_prompts": len(records) - len(single)})
    for r, ans in zip(single, zip(answers_a, answers_b)):
        labelled = label_pair(r, ans, label_noise, rng)
        if isinstance(labelled, str):
            left_out[labelled] += 1
        else:
            pairs[labelled["source"]].append({"id": f"{r.get('id', 'pair')}", **labelled})
    summary = {"world": VERSION, "model": model, "variants": {"a": dataclasses.asdict(a), "b": dataclasses.asdict(b)},
               "prompts": [str(p) for p in paths], "label_noise": label_noise, "seed": seed,
               "pairs": {s: len(v) for s, v in pairs.items()},
               "degrees": {s: dict(sorted(Counter(p["degree"] for p in v).items())) for s, v in pairs.items()},
               "safety_bins": dict(sorted(Counter(p["safety_bin"] for p in pairs["safety"]).items())),
               "left_out": dict(left_out)}
    with output_dir(out_dir, "preferences collect", overwrite) as tmp:
        for source, rows in pairs.items():
            (tmp / f"{source}.jsonl").write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in rows),
                                                 encoding="utf-8")
        (tmp / "summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    print(f"preferences -> {out_dir}: {summary['pairs']['helpfulness']} helpfulness and {summary['pairs']['safety']} "
          f"safety pairs; degrees {summary['degrees']}; safety bins {summary['safety_bins']}; left out "
          f"{summary['left_out']}")
    return summary


__all__ = ["PreferenceCollectError", "SAFE_BONUS", "Variant", "answer_seed", "collect_preferences", "label_pair",
           "preference_score", "sample_answers"]
