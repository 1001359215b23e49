"""`lmforge rs`: Llama 2's rejection sampling fine-tuning, with its best-of-K and temperature diagnostics.

Llama 2 (section 3.2.3): for each prompt sample K answers from the current policy, score them with the reward
model, keep the best, fine-tune on the kept answers with the SFT loss; the kept answers of all earlier
iterations stay in the pool (training on the latest iteration's alone regressed some capabilities). The
gain grows with K, and the best temperature drifts between iterations: best-of-K reward against K (its
Figure 7) and against the temperature (Figure 8) are the diagnostics.

    iteration i   sample    K answers per prompt through LLMEngine (rollout.py), scored by the selecting
                            scorer: Llama 2's gate of the two reward models (or the world's oracle standing in
                            for them), one reward model, or the oracle (scorers.py)
                  sweep     the same on a few prompts at each sweep temperature
                  pool      the best non-empty answer of each prompt joins the pool (`rs.pool`: all
                            iterations' or the latest's)
                  sft       `lmforge sft` on the pool, learning the last answer only (`learn: last`), from the
                            model RS started from (`rs.finetune_from: start`) or the previous iteration's

    RUN/stages.json                the completed stages (a rerun with --run.resume auto skips them; ledger.py)
    RUN/iteration_I/samples.jsonl  every answer with its score (and the oracle's); selected.jsonl the kept ones
    RUN/iteration_I/diagnostics.json, best_of_k.png, temperature.png
    RUN/iteration_I/pool.jsonl     the pool the iteration fine-tunes on, in SFT's {"messages"} format
    RUN/iteration_I/sft/           that fine-tuning's run folder (its own checkpoints; model/ the result)
    RUN/summary.json               the final model and each iteration's figures

The diagnostics, for N = 1 .. K over the iteration's prompts: the mean of the maximum and of the median of the
first N answers' scores under the selecting scorer, and under the oracle (its safety on unsafe requests, its
helpfulness elsewhere: `gated_oracle`) the mean score of the answer the selecting scorer picks among the first N
(what rejection sampling actually keeps) beside the oracle's own maximum and median. Note that N = 1 is plain
sampling: the selected answer's oracle score rising with N is the gain the fine-tuning can distil.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from lmforge.align.prompts import PromptSchedule, read_prompt_records
from lmforge.align.rl_iteration import PromptsConfig, iteration_seed
from lmforge.align.rollout import RolloutConfig, make_engine, rollout
from lmforge.align.scorers import (
    GatedReward,
    RewardConfig,
    check_scorers,
    make_gate,
    make_scorer,
    oracle_figures,
)
from lmforge.align.ledger import StageLedger, read_jsonl, write_jsonl
from lmforge.align.stages import FineTuneConfig, fine_tune
from lmforge.io import atomic_file
from lmforge.train.config import RunConfig, TrainConfigError


@dataclass
class RSConfig:
    """Rejection sampling.

    Attributes:
        iterations: Rounds of sample, select, fine-tune.
        samples: Answers K per prompt.
        select: The selecting scorer: "gated" (Llama 2's gate of `reward.helpfulness` and `reward.safety`),
            a reward model folder, "oracle:helpfulness" or "checker".
        pool: "all": the kept answers of every iteration so far (Llama 2); "latest": this iteration's only.
        finetune_from: "start": each iteration fine-tunes the model RS started from on the pool; "previous":
            the previous iteration's model.
        sweep_temperatures: Temperatures of the per-iteration sweep (empty: no sweep).
        sweep_prompts: Prompts of the sweep (the first of the iteration's).
    """

    iterations: int = 1
    samples: int = 8
    select: str = "gated"
    pool: Literal["all", "latest"] = "all"
    finetune_from: Literal["start", "previous"] = "start"
    sweep_temperatures: list[float] = field(default_factory=lambda: [0.6, 0.8, 1.0, 1.2])
    sweep_prompts: int = 32

    def __post_init__(self) -> None:
        if self.iterations < 1 or self.samples < 1 or self.sweep_prompts < 1:
            raise TrainConfigError("rs.iterations, rs.samples and rs.sweep_prompts must be >= 1")
        if any(not t > 0 for t in self.sweep_temperatures):
            raise TrainConfigError(f"rs.sweep_temperatures must be > 0, got {self.sweep_temperatures}")


# ---- scoring and the best-of-N figures -------------------------------------------------------------------------
def selection_scores(selecting, records: list[dict], answers: list[str]) -> torch.Tensor:
    """The selecting scorer's score of each answer (N,): the gate's logit(Rc), or the scorer's own scale."""
    return selecting(records, answers)["score"] if isinstance(selecting, GatedReward) else selecting(records, answers)


def best_of_n(scores: np.ndarray, oracle: np.ndarray | None, nonempty: np.ndarray) -> dict[str, list[float]]:
    """The diagnostics of K answers to each of P prompts (module docstring): scores, oracle, nonempty (P, K).

    Worked example, one prompt, scores [0.2, 0.9, 0.5], oracle [1, 0, 1], all non-empty: max [0.2, 0.9, 0.9],
    median [0.2, 0.55, 0.5], oracle of the selected [1, 0, 0], oracle max [1, 1, 1].
    An empty answer is never selected (it would teach nothing) unless all of the first N are empty.
    """
    P, K = scores.shape
    masked = np.where(nonempty, scores, -np.inf)
    out: dict[str, list[float]] = {"n": list(range(1, K + 1)), "max": [], "median": []}
    if oracle is not None:
        out |= {"oracle_of_selected": [], "oracle_max": [], "oracle_median": []}
    for n in range(1, K + 1):
        out["max"].append(float(scores[:, :n].max(1).mean()))
        out["median"].append(float(np.median(scores[:, :n], axis=1).mean()))
        if oracle is not None:
            pick = masked[:, :n].argmax(1)
            out["oracle_of_selected"].append(float(oracle[np.arange(P), pick].mean()))
            out["oracle_max"].append(float(oracle[:, :n].max(1).mean()))
            out["oracle_median"].append(float(np.median(oracle[:, :n], axis=1).mean()))
    return out


def _oracle(records: list[dict], answers: list[str]) -> np.ndarray | None:
    """The oracle's score of each answer by Llama 2's gate (`gated_oracle`), or None when the prompts are not
    chat-world records."""
    if any(not (r.get("meta") or {}).get("kind") for r in records):
        return None
    return np.array([gated_oracle(r, a) for r, a in zip(records, answers)])


def gated_oracle(record: dict, answer: str) -> float:
    """The world oracle's score of `answer` as Llama 2's gate would judge it: its safety on an unsafe request,
    its helpfulness elsewhere (the rule of pipeline.gated_oracle_score, per answer).

    NOTE: helpfulness alone prefers complying with an unsafe request to refusing it, so a gate that selects the
    refusal would look worse with K: with trained reward models on the world, the helpfulness of the selected
    answer fell from 0.235 at K = 1 to 0.225 at K = 8 while the selection turned to refusals."""
    from lmforge.align.world.oracle import helpfulness, safety

    return safety(record, answer) if record["meta"]["kind"] == "unsafe" else helpfulness(record, answer)


def oracle_curve(iteration_dir: str | Path, records: list[dict]) -> list[float]:
    """The gated oracle's score of the selected answer for N = 1 .. K (best_of_n's "oracle_of_selected"), from an
    iteration's samples.jsonl (each prompt's answers and their selection scores) and the prompt `records` its
    "prompt" indices point into."""
    rows = read_jsonl(Path(iteration_dir) / "samples.jsonl")
    scores = np.array([r["scores"] for r in rows])
    oracle = np.array([[gated_oracle(records[r["prompt"]], a) for a in r["answers"]] for r in rows])
    nonempty = np.array([[bool(a) for a in r["answers"]] for r in rows])
    return best_of_n(scores, oracle, nonempty)["oracle_of_selected"]


# ---- one iteration's stages ----------------------------------------------------------------------------------
def sample_and_score(engine, tokenizer, records: list[dict], prompts: list[int], k: int, rollout_cfg: RolloutConfig,
                     temperature: float, seed: int, selecting) -> dict:
    """K answers to each prompt (indices into `records`) through `engine`, their texts and scores.

    Returns {"answers": [[str] * K] * P, "scores": (P, K), "oracle": (P, K) or None, "nonempty": (P, K),
    "records", "texts" (flat, prompt-major)}."""
    from lmforge.tokenizer.chat import encode_chat

    ids = [encode_chat(tokenizer, records[i]["messages"], add_generation_prompt=True).ids for i in prompts]
    seeds = [seed + q * k for q in range(len(ids))]
    samples = rollout(engine, ids, rollout_cfg.sampling(0, temperature), k, seeds=seeds)
    texts = [tokenizer.decode(s.response_ids).strip() for s in samples]
    recs = [records[prompts[s.prompt]] for s in samples]
    scores = selection_scores(selecting, recs, texts).numpy().reshape(-1, k)
    oracle = _oracle(recs, texts)
    return {"answers": [texts[p * k:(p + 1) * k] for p in range(len(ids))], "scores": scores,
            "oracle": None if oracle is None else oracle.reshape(-1, k),
            "nonempty": np.array([bool(t) for t in texts]).reshape(-1, k), "records": recs, "texts": texts}


def _engine(model_path: Path, rollout_cfg: RolloutConfig, max_prompts: int, device, cache: dict):
    """(engine, tokenizer) over the model folder, made once per folder."""
    from lmforge.models.checkpoint import load_model
    from lmforge.tokenizer import Tokenizer

    if model_path not in cache:
        tok = Tokenizer(Path(model_path) / "tokenizer.model")
        model = load_model(model_path, device=device).eval()
        cache.clear()
        cache[model_path] = (make_engine(model, tok.eos_id, rollout_cfg.batch_size, max_prompts), tok)
    return cache[model_path]


def _plot(curves: dict[str, dict], path: Path, title: str, keys: tuple[str, ...]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for label, c in curves.items():
        for key in keys:
            if key in c:
                ax.plot(c["n"], c[key], "o-", ms=3, lw=1, label=f"{label} {key}".strip())
    ax.set_xlabel("N (answers per prompt)")
    ax.set_ylabel("score")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def rs(
    init_from: str,
    prompts: PromptsConfig = PromptsConfig(),
    rs: RSConfig = RSConfig(),
    rollout: RolloutConfig = RolloutConfig(),
    reward: RewardConfig = RewardConfig(),
    sft: FineTuneConfig = FineTuneConfig(),
    run: RunConfig = RunConfig(),
    seed: int = 0,
    device: str | None = None,
) -> Path:
    """Rejection sampling fine-tuning: K answers per prompt, the best kept in a pool, `sft` on the pool.

    Args:
        init_from: The model to start from (an SFT model folder with its tokenizer.model).
        prompts: Prompt files and prompts per iteration.
        rs: Iterations, K, the selecting scorer, the pool, the temperature sweep.
        rollout: Sampling through the engine (temperature, longest answer, engine batch).
        reward: The two reward models of the gate (when rs.select is "gated").
        sft: The fine-tuning through `lmforge sft`, the generate-then-fine-tune verbs' shared group (stages.py):
            --sft.train (batch, row length, steps), --sft.optim (its defaults: Llama 2's SFT), --sft.data
            (sources mixed in beside the pool, e.g. the SFT set as replay; the validation split, 5% of the pool
            by default; the token cache), --sft.parallel, --sft.lora. Its run folder is each iteration's
            RUN/iteration_I/sft; --sft.run is not read (--run's options go to every fine-tuning run).
        run: Run folder (default runs/rs; --run.resume auto continues after the completed stages); its other
            options go to every fine-tuning run.
        seed: Seed of the prompt order and of the sampling.
        device: Where sampling runs (None: CUDA when available).
    """
    from lmforge.devices import resolve_device
    from lmforge.train.runinfo import to_plain, write_run_info

    dev = resolve_device(device)
    stages = StageLedger(run.dir or "runs/rs", "rs", resume=run.resume == "auto", overwrite=run.overwrite)
    root = stages.dir
    write_run_info(root, to_plain({"init_from": init_from, "prompts": prompts, "rs": rs, "rollout": rollout,
                                   "reward": reward, "sft": sft, "run": run,
                                   "seed": seed, "device": device}), device=str(dev), verb="rs")
    records = read_prompt_records(prompts.files)
    selecting = make_gate(reward, dev) if rs.select == "gated" else make_scorer(rs.select, dev)
    check_scorers(records, *((selecting.helpfulness, selecting.safety) if isinstance(selecting, GatedReward)
                             else (selecting,)))
    schedule = PromptSchedule(len(records), prompts.per_iteration, seed)
    model, figures, engines = Path(init_from), [], {}
    for i in range(1, rs.iterations + 1):
        folder = root / f"iteration_{i}"
        chosen = schedule.iteration(i - 1)
        s0 = iteration_seed(seed, i)

        def sample() -> dict:
            engine, tok = _engine(model, rollout, len(chosen) * rs.samples, dev, engines)
            got = sample_and_score(engine, tok, records, chosen, rs.samples, rollout, rollout.temperature, s0,
                                   selecting)
            rows, kept = [], []
            for p, idx in enumerate(chosen):
                scores = np.where(got["nonempty"][p], got["scores"][p], -np.inf)
                best = int(scores.argmax())
                rows.append({"prompt": idx, "messages": records[idx]["messages"], "answers": got["answers"][p],
                             "scores": got["scores"][p].tolist(), "best": best,
                             **({"oracle": got["oracle"][p].tolist()} if got["oracle"] is not None else {})})
                if np.isfinite(scores[best]):
                    kept.append({"messages": [*records[idx]["messages"],
                                              {"role": "assistant", "content": got["answers"][p][best]}],
                                 "score": float(scores[best]), "source": records[idx]["source"], "iteration": i})
            write_jsonl(folder / "samples.jsonl", rows)
            write_jsonl(folder / "selected.jsonl", kept)
            curves = best_of_n(got["scores"], got["oracle"], got["nonempty"])
            _plot({"": curves}, folder / "best_of_k.png", f"lmforge rs, iteration {i}: best of N",
                  ("max", "median", "oracle_of_selected"))
            return {"best_of_n": curves, "kept": len(kept), **oracle_figures(got["records"], got["texts"])}

        result = stages.run(f"iteration_{i}/sample", sample)

        def sweep() -> dict:
            few = chosen[: rs.sweep_prompts]
            curves = {}
            for t in rs.sweep_temperatures:
                engine, tok = _engine(model, rollout, len(chosen) * rs.samples, dev, engines)
                got = sample_and_score(engine, tok, records, few, rs.samples, rollout, t, s0 + 2**40, selecting)
                curves[f"T={t:g}"] = best_of_n(got["scores"], got["oracle"], got["nonempty"])
            if curves:
                _plot(curves, folder / "temperature.png", f"lmforge rs, iteration {i}: best of N by temperature",
                      ("max",))
            return curves

        swept = stages.run(f"iteration_{i}/sweep", sweep)
        with atomic_file(folder / "diagnostics.json", "w", encoding="utf-8") as f:
            f.write(json.dumps({"best_of_n": result["best_of_n"], "temperature_sweep": swept}, indent=1) + "\n")

        def pool() -> dict:
            earlier = [] if rs.pool == "latest" or i == 1 else read_jsonl(root / f"iteration_{i - 1}" / "pool.jsonl")
            merged = earlier + read_jsonl(folder / "selected.jsonl")
            write_jsonl(folder / "pool.jsonl",
                        [{"messages": r["messages"], "iteration": r["iteration"]} for r in merged])
            return {"dialogues": len(merged)}

        pooled = stages.run(f"iteration_{i}/pool", pool)
        if pooled["dialogues"] == 0:
            raise TrainConfigError(f"iteration {i}: every sampled answer was empty, nothing to fine-tune on")
        start = Path(init_from) if rs.finetune_from == "start" else model
        if not stages.done(f"iteration_{i}/sft"):  # sft on the pool (learn: last) and --sft.data.sources
            sub = dataclasses.replace(run, dir=str(folder / "sft"), resume="auto", overwrite=False)
            out = fine_tune(str(start), folder / "pool.jsonl", 1.0, sft, sub)
            if not (out / "model" / "model.safetensors").is_file():  # stopped (SIGTERM, stop_at): resume later
                return root
            stages.record(f"iteration_{i}/sft", {"model": str(out / "model")})
        model = Path(stages.result(f"iteration_{i}/sft")["model"])
        figures.append({"iteration": i, "kept": result["kept"], "pool": pooled["dialogues"], "model": str(model),
                        **{k: v for k, v in result.items() if k.startswith("oracle/")},
                        "selected_score_at_k": result["best_of_n"]["max"][-1]})
    with atomic_file(root / "summary.json", "w", encoding="utf-8") as f:
        f.write(json.dumps({"verb": "rs", "model": str(model), "iterations": figures}, indent=1) + "\n")
    print(f"rs finished: {rs.iterations} iterations, pool of {figures[-1]['pool']} dialogues; model: {model}")
    return root


def final_model(run_dir: str | Path) -> Path:
    """The model a finished `lmforge rs` run produced (its summary.json)."""
    from lmforge.io import read_json

    return Path(read_json(Path(run_dir) / "summary.json")["model"])


__all__ = ["RSConfig", "best_of_n", "final_model", "gated_oracle", "oracle_curve", "rs", "sample_and_score",
           "selection_scores"]
