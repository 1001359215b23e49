"""`lmforge analyze temperature`: how answer diversity changes with temperature, per model (Llama 2, section 5.1).

    lmforge analyze temperature [runs/demo/sft/model,runs/demo/rlhf-v1/model] --world runs/demo/world

Llama 2 found that RLHF learns to adapt the temperature to the prompt: sampled at the same temperature, its RLHF
models give nearly the same answer every time to a factual prompt, yet keep answering a creative prompt in varied
ways, where the SFT model is about as diverse on both (its Figure 21: self-BLEU against temperature, factual and
creative prompts, SFT and RLHF v1..v3; 10 prompts of each kind, 25 samples per prompt, temperatures 0.1..1.5).

The measurement, for each model folder in order (the first is the baseline the others are compared with):

    prompts   P evenly spaced records of each of the world's sets (eval_factual.jsonl: fact look-ups with one
              right answer; eval_creative.jsonl: poems and stories with many), P = `prompts`
    samples   for each temperature T and k = 0..K-1: every prompt answered once with SamplingParams(temperature=T,
              seed=seed + k), through LLMEngine with the server's chat encoding (eval_chat.engine_answerer).
              A request's own seed fixes its tokens, so the K answers to a prompt differ by their seeds only, the
              same k gives the same random draws at every temperature and for every model (common random
              numbers: the curves differ by the models, not by the noise), and a run repeats exactly.
    measures  per prompt: self-BLEU of its K answers, distinct-1 and distinct-2 (diversity.py); per (set, T):
              their mean and standard deviation over the P prompts, the mean answer length in words, the share
              of empty answers, the world oracle's mean helpfulness and, for factual prompts, the share of
              correct answers (eval_chat.score_record)

The paper's finding, tested against the baseline b for each later model m, with D_set = the mean over the
temperatures of self_bleu_m(T) - self_bleu_b(T): it is reproduced when D_factual > 0 (m's factual answers are
more consistent) and D_factual > D_creative (m keeps its creative answers relatively more diverse).

Output folder (lmforge's output rule): temperature.json (every figure, the settings and the comparison),
samples.jsonl (every answer), temperature.png (Figure 21's shape: self-BLEU against T, factual and creative side
by side, a line per model with a band of one standard deviation over prompts) and distinct.png (distinct-2).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import sys
from pathlib import Path
from typing import Literal

from lmforge.analyze.diversity import distinct_n, self_bleu, tokens
from lmforge.infer.sampling import SamplingParams

SETS = {"factual": "eval_factual.jsonl", "creative": "eval_creative.jsonl"}
TEMPERATURES = tuple(k / 10 for k in range(1, 16))  # Llama 2's: 0.1, 0.2, ..., 1.5
# NOTE: every reference answer of the world (v1, v2) is under 60 tokens; 64 lets a model finish one, not ramble.
SAMPLING = SamplingParams(max_new_tokens=64)
Dtype = Literal["float32", "bfloat16", "float16"]


class TemperatureAnalysisError(ValueError):
    """An option or input of the temperature analysis that cannot be used."""


def pick(records: list, n: int) -> list:
    """`n` records spread evenly over `records` (all of them if there are no more than `n`): indices floor(i * N / n).

    Worked example, N = 10, n = 4: indices 0, 2, 5, 7 (the world's files run from easy to hard items).
    """
    return list(records) if n >= len(records) else [records[i * len(records) // n] for i in range(n)]


def model_names(models: list[str], names: list[str] | None) -> list[str]:
    """`names`, or each folder's name (its parent's for a folder called "model": runs/sft/model -> "sft")."""
    if names is None:
        names = [Path(m).parent.name if Path(m).name == "model" else Path(m).name for m in models]
    if len(names) != len(models):
        raise TemperatureAnalysisError(f"{len(models)} models but {len(names)} names")
    if len(set(names)) != len(names):
        raise TemperatureAnalysisError(f"model names {names} are not distinct: pass --names [a,b,...]")
    return names


def sample(answer, prompts: dict[str, list[dict]], temperatures: tuple[float, ...], samples: int,
           sampling: SamplingParams, seed: int, bar=None) -> dict[str, list[list[list[str]]]]:
    """answers[set][t][p] = the `samples` answers to prompt p of `set` at temperatures[t] (module docstring).
    `answer(dialogues, sampling) -> texts` is any answerer (eval_chat.engine_answerer, an endpoint's)."""
    sets = list(prompts)
    dialogues = [r["messages"] for s in sets for r in prompts[s]]
    out = {s: [[[] for _ in prompts[s]] for _ in temperatures] for s in sets}
    for t, temperature in enumerate(temperatures):
        for k in range(samples):
            texts = iter(answer(dialogues, dataclasses.replace(sampling, temperature=temperature, seed=seed + k)))
            for s in sets:
                for p in range(len(prompts[s])):
                    out[s][t][p].append(next(texts))
            if bar is not None:
                bar.update(1)
    return out


def _mean_std(values: list[float | None]) -> dict:
    """Mean and (population) standard deviation of the values that are not None; None for both if none are."""
    kept = [v for v in values if v is not None]
    if not kept:
        return {"mean": None, "std": None}
    mean = sum(kept) / len(kept)
    return {"mean": mean, "std": math.sqrt(sum((v - mean) ** 2 for v in kept) / len(kept))}


def measure(records: list[dict], answers: list[list[str]], temperature: float) -> dict:
    """The row of one (set, temperature): diversity of each prompt's answers, aggregated over the prompts."""
    from lmforge.align.eval_chat import score_record

    flat = [(r, a) for r, group in zip(records, answers) for a in group]
    scored = [score_record(r, a) for r, a in flat]
    row = {"temperature": temperature,
           "self_bleu": _mean_std([self_bleu(group) for group in answers]),
           "distinct_1": _mean_std([distinct_n(group, 1) for group in answers]),
           "distinct_2": _mean_std([distinct_n(group, 2) for group in answers]),
           "words": sum(len(tokens(a)) for _, a in flat) / len(flat),
           "empty": sum(not a.strip() for _, a in flat) / len(flat),
           "helpfulness": sum(s["helpfulness"] for s in scored) / len(scored)}
    if all("correct" in s for s in scored):
        row["accuracy"] = sum(s["correct"] for s in scored) / len(scored)
    return row


def compare(results: dict[str, dict[str, list[dict]]]) -> list[dict]:
    """Each later model against the first (module docstring): the mean self-BLEU differences and the verdict."""
    names = list(results)
    base = names[0]

    def gap(name: str, s: str) -> float:
        rows = zip(results[name][s], results[base][s])
        return sum(m["self_bleu"]["mean"] - b["self_bleu"]["mean"] for m, b in rows) / len(results[base][s])

    out = []
    for name in names[1:]:
        factual, creative = gap(name, "factual"), gap(name, "creative")
        holds = factual > 0 and factual > creative
        out.append({"model": name, "baseline": base, "self_bleu_gap_factual": factual,
                    "self_bleu_gap_creative": creative, "reproduces_llama2": holds,
                    "summary": f"{name} vs {base}: mean self-BLEU {factual:+.2f} on factual prompts, {creative:+.2f} on "
                               f"creative ones: {'reproduces' if holds else 'does not reproduce'} Llama 2's finding "
                               "(factual answers more consistent, by more than creative ones)"})
    return out


def format_table(results: dict[str, dict[str, list[dict]]]) -> str:
    """One line per (model, set, temperature)."""
    lines = [f"{'model':<14} {'set':<9} {'T':>4} {'self-BLEU':>14} {'distinct-2':>10} {'words':>6} {'helpful':>7} "
             f"{'correct':>7}"]
    for name, sets in results.items():
        for s, rows in sets.items():
            for r in rows:
                sb, d2 = r["self_bleu"], r["distinct_2"]["mean"]
                acc = f"{r['accuracy']:7.2f}" if "accuracy" in r else f"{'-':>7}"
                lines.append(f"{name:<14} {s:<9} {r['temperature']:4.2f} {sb['mean']:7.2f} ±{sb['std']:5.2f} "
                             f"{'-' if d2 is None else f'{d2:.3f}':>10} {r['words']:6.1f} {r['helpfulness']:7.3f} {acc}")
    return "\n".join(lines)


def plot(results: dict[str, dict[str, list[dict]]], path: Path, metric: str, label: str) -> None:
    """`metric` ("self_bleu", "distinct_2") against the temperature: factual and creative panels, a line per
    model with a band of one standard deviation over prompts (Figure 21's shape)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SETS), figsize=(10, 3.8), sharey=True)
    for ax, s in zip(axes, SETS):
        for name, sets in results.items():
            rows = [r for r in sets[s] if r[metric]["mean"] is not None]
            x = [r["temperature"] for r in rows]
            mean = [r[metric]["mean"] for r in rows]
            std = [r[metric]["std"] for r in rows]
            ax.plot(x, mean, "o-", ms=3, lw=1.2, label=name)
            ax.fill_between(x, [m - d for m, d in zip(mean, std)], [m + d for m, d in zip(mean, std)], alpha=0.2)
        ax.set_title(f"{s.capitalize()} prompts")
        ax.set_xlabel("Temperature")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(label)
    axes[-1].legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def analyze_temperature(
    models: list[str] | str,
    world: Path = Path("runs/world"),
    out_dir: Path = Path("runs/temperature"),
    names: list[str] | None = None,
    temperatures: tuple[float, ...] = TEMPERATURES,
    samples: int = 25,
    prompts: int = 10,
    sampling: SamplingParams = SAMPLING,
    seed: int = 0,
    batch_size: int = 64,
    device: str | None = None,
    dtype: Dtype | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Answer diversity against temperature for factual and creative prompts, per model (Llama 2's Figure 21).

    Samples every prompt `samples` times at each temperature, measures self-BLEU and distinct-n of each prompt's
    answers, plots self-BLEU against temperature (temperature.png) and compares each model with the first
    (Llama 2: RLHF makes factual answers consistent and keeps creative ones diverse). Writes temperature.json,
    samples.jsonl, temperature.png and distinct.png into OUT_DIR.

    Args:
        models: One model folder or a list ([runs/sft/model,runs/rlhf-v1/model]); the first is the baseline
            (the SFT model), each folder holds its tokenizer.model.
        world: A folder written by `lmforge world build` (its eval_factual.jsonl and eval_creative.jsonl).
        out_dir: Output folder.
        names: A name per model for the plots and tables (default: the folder's name, or its parent's for a
            folder called "model").
        temperatures: The temperatures (default Llama 2's 0.1, 0.2, ..., 1.5; 0 is greedy).
        samples: Answers per prompt and temperature (Llama 2: 25), each with its own seed.
        prompts: Prompts of each set (Llama 2: 10), spread evenly over the file.
        sampling: The other sampling settings (default: at most 64 new tokens); temperature and seed are set
            for each sample.
        seed: The seed of sample 0; sample k uses seed + k.
        batch_size: Sequences the engine decodes together.
        device: cuda or cpu (default: cuda when available).
        dtype: Cast the weights (default: as stored).
        progress: Show a progress bar.
        overwrite: Replace an earlier `analyze temperature` output in OUT_DIR.

    Returns:
        The report (also OUT_DIR/temperature.json).
    """
    from tqdm import tqdm

    from lmforge.align.eval_chat import engine_answerer, read_records
    from lmforge.infer.cli import _load  # the loader of `lmforge generate`: model, tokenizer, vocabulary check
    from lmforge.io import atomic_file, output_dir

    models = [models] if isinstance(models, (str, Path)) else [str(m) for m in models]
    if not models:
        raise TemperatureAnalysisError("no models: pass a model folder or a list [a,b]")
    names = model_names(models, names)
    if samples < 2:
        raise TemperatureAnalysisError(f"samples must be >= 2 (self-BLEU compares a prompt's answers), got {samples}")
    if prompts < 1 or batch_size < 1 or not temperatures or any(t < 0 for t in temperatures):
        raise TemperatureAnalysisError("prompts and batch_size must be >= 1 and temperatures a non-empty list of "
                                       f"numbers >= 0, got {prompts}, {batch_size}, {list(temperatures)}")
    chosen = {s: pick(read_records(Path(world) / file), prompts) for s, file in SETS.items()}
    for s, records in chosen.items():
        if not records:
            raise TemperatureAnalysisError(f"{Path(world) / SETS[s]} holds no records")
    temperatures = tuple(float(t) for t in temperatures)
    results: dict[str, dict[str, list[dict]]] = {}
    with output_dir(out_dir, "analyze temperature", overwrite) as tmp:  # refuses a wrong destination first
        bar = tqdm(total=len(models) * len(temperatures) * samples, desc="sampling", unit=" rounds",
                   disable=not progress)
        with atomic_file(tmp / "samples.jsonl", "w", encoding="utf-8") as f:
            for model, name in zip(models, names):
                net, tok = _load(Path(model), None, device, dtype)
                answers = sample(engine_answerer(net, tok, batch_size), chosen, temperatures, samples, sampling,
                                 seed, bar)
                del net  # the engine's KV cache goes with the answerer: free both before the next model
                gc.collect()
                _empty_cuda_cache()
                results[name] = {s: [measure(chosen[s], answers[s][t], temperature)
                                     for t, temperature in enumerate(temperatures)] for s in SETS}
                for s in SETS:
                    for t, temperature in enumerate(temperatures):
                        for r, group in zip(chosen[s], answers[s][t]):
                            for k, text in enumerate(group):
                                f.write(json.dumps({"model": name, "set": s, "id": r.get("id"), "temperature":
                                                    temperature, "sample": k, "seed": seed + k, "answer": text},
                                                   ensure_ascii=False) + "\n")
        bar.close()
        report = {"world": str(world), "models": [{"name": n, "path": m} for n, m in zip(names, models)],
                  "prompts": {s: [r.get("id") for r in chosen[s]] for s in SETS}, "samples": samples,
                  "temperatures": list(temperatures), "seed": seed, "sampling": dataclasses.asdict(sampling),
                  "results": results, "comparison": compare(results)}
        (tmp / "temperature.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        plot(results, tmp / "temperature.png", "self_bleu", "Self-BLEU")
        plot(results, tmp / "distinct.png", "distinct_2", "distinct-2")
    print(format_table(results))
    for c in report["comparison"]:
        print(c["summary"])
    print(f"-> {out_dir}", file=sys.stderr)
    return report


def _empty_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
