"""`lmforge rm eval` and `lmforge rm score`: how well a reward model ranks held-out pairs, and its scores of dialogues.

    lmforge rm eval runs/rm-helpfulness/model --pairs [runs/prefs-eval/helpfulness.jsonl,runs/prefs-eval/safety.jsonl]
    lmforge rm score runs/rm-safety/model --dialogues answers.jsonl --out scored.jsonl

`evaluate_reward_model` (the Python side of `rm eval`) scores both answers of every pair (batched by length:
`reward_model.score_sequences`) and reports, as JSON and a table:

    accuracy          share of pairs with r(chosen) > r(rejected), overall, per source, per degree of preference
                      (Llama 2's table 8: high on "significantly better", near chance on "negligibly better")
                      and per safety bin (chosen safe / both safe / both unsafe)
    oracle agreement  where the pairs carry the world oracle's preference scores (`preferences collect`): the
                      share of pairs with an oracle preference that the reward model orders as the oracle does,
                      and the share the labels do (below 1 with label noise)
    calibration       pairs in both orientations, (d, chosen better) and (-d, rejected better) with d = r_c - r_r,
                      cut into bins of d: mean predicted chance sigma(d) against the observed chance that the first
                      answer is the better one (by the oracle where known, else by the label; a tie counts 1/2)

`rm eval --out_dir DIR` writes report.json, calibration.png and scores.jsonl (each pair's two rewards) under the
output rule. `rm score` adds "score" (the reward r; Llama 2 uses sigmoid(r) where a score in (0, 1) is needed) to
each record of a dialogue file (the formats `lmforge sft` reads), written atomically.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from lmforge.align.eval_chat import Dtype
from lmforge.align.world.oracle import DEGREES, SAFETY_BINS

CALIBRATION_BINS = 10


def _rate(values: list[bool]) -> dict:
    return {"accuracy": float(np.mean(values)) if values else None, "n": len(values)}


def _grouped(keys: list[str | None], correct: list[bool], order: tuple[str, ...]) -> dict:
    groups: dict[str, list[bool]] = defaultdict(list)
    for k, c in zip(keys, correct):
        if k is not None:
            groups[k].append(c)
    return {k: _rate(groups[k]) for k in order if k in groups}


def calibration(diffs: np.ndarray, first_better: np.ndarray, bins: int = CALIBRATION_BINS) -> list[dict]:
    """Bins of the reward difference d against the observed chance that the first answer is better.

    diffs: (P,) r_c - r_r; first_better: (P,) in [0, 1], the chance the chosen answer is the better one (1, 0 or
    1/2). Every pair counts in both orientations (module docstring), so the curve is symmetric about (0, 1/2).
    Bins are quantiles of d (equal counts). Each bin: mean d, mean sigma(d), observed chance, n.
    """
    d = np.concatenate([diffs, -diffs])
    y = np.concatenate([first_better, 1 - first_better])
    order = np.argsort(d, kind="stable")
    out = []
    for idx in np.array_split(order, min(bins, len(d))):
        if len(idx):
            out.append({"difference": float(d[idx].mean()), "predicted": float((1 / (1 + np.exp(-d[idx]))).mean()),
                        "observed": float(y[idx].mean()), "n": int(len(idx))})
    return out


def pair_report(records: list, chosen: list[float], rejected: list[float]) -> dict:
    """The `rm eval` report (module docstring) of PreferenceRecords and their two rewards."""
    diffs = np.asarray(chosen) - np.asarray(rejected)
    correct = [bool(x > 0) for x in diffs]
    report: dict = {"pairs": len(records), **_rate(correct),
                    "by_degree": _grouped([r.degree for r in records], correct, DEGREES),
                    "by_safety_bin": _grouped([r.safety_bin for r in records], correct, SAFETY_BINS),
                    "by_source": {}}
    for source in sorted({r.source for r in records if r.source is not None}):
        keep = [i for i, r in enumerate(records) if r.source == source]
        sub = [records[i] for i in keep]
        report["by_source"][source] = {
            **_rate([correct[i] for i in keep]),
            "by_degree": _grouped([r.degree for r in sub], [correct[i] for i in keep], DEGREES),
            "by_safety_bin": _grouped([r.safety_bin for r in sub], [correct[i] for i in keep], SAFETY_BINS)}
    oracle = [r.oracle for r in records]
    gaps = np.array([o["chosen"]["preference"] - o["rejected"]["preference"] if o else math.nan for o in oracle])
    known = ~np.isnan(gaps) & (gaps != 0)
    if known.any():
        report["oracle_agreement"] = {"reward_model": float(np.mean((diffs[known] > 0) == (gaps[known] > 0))),
                                      "labels": float(np.mean(gaps[known] > 0)), "n": int(known.sum())}
    better = np.where(np.isnan(gaps), 1.0, np.where(gaps > 0, 1.0, np.where(gaps < 0, 0.0, 0.5)))
    report["calibration"] = calibration(diffs, better)
    return report


def format_pair_report(report: dict) -> str:
    """The report as a plain-text table (accuracies in percent, n = pairs)."""
    lines = [f"{report['pairs']} pairs: accuracy {100 * report['accuracy']:.1f}%"]

    def rows(title: str, groups: dict) -> None:
        if groups:
            lines.append(f"  {title}")
            lines.extend(f"    {k:<24} {100 * g['accuracy']:6.1f}%   n={g['n']}" for k, g in groups.items())

    rows("by degree", report["by_degree"])
    rows("by safety bin", report["by_safety_bin"])
    for source, s in report["by_source"].items():
        lines.append(f"  {source}: {100 * s['accuracy']:.1f}% of {s['n']}")
        rows(f"{source} by degree", s["by_degree"])
    if o := report.get("oracle_agreement"):
        lines.append(f"  agreement with the oracle: reward model {100 * o['reward_model']:.1f}%, labels "
                     f"{100 * o['labels']:.1f}% (n={o['n']})")
    return "\n".join(lines)


def plot_calibration(report: dict, path: Path, title: str) -> Path:
    """calibration.png: observed chance that an answer is the better one against its reward difference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cal = report["calibration"]
    x = [c["difference"] for c in cal]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.plot(x, [c["observed"] for c in cal], "o-", label="observed")
    ax.plot(x, [c["predicted"] for c in cal], "--", label="sigmoid(difference)")
    ax.set_xlabel("reward difference r(a) - r(b)")
    ax.set_ylabel("chance that a is the better answer")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _load_reward_model(model: Path, tokenizer: Path | None, device: str | None, dtype: Dtype | None):
    from lmforge.infer.cli import _load  # model (head "reward") and tokenizer, checked

    return _load(Path(model), tokenizer, device, dtype, head="reward")


def _precision(net):
    import contextlib

    import torch

    param = next(net.parameters())
    if param.device.type == "cuda" and param.dtype == torch.float32:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def score_pairs(model: Path | str, pairs: list[Path] | Path, tokenizer: Path | None = None, device: str | None = None,
                dtype: Dtype | None = None, max_batch_tokens: int = 16384) -> tuple[list, list[float], list[float]]:
    """The records of the preference files `pairs` and the rewards the reward model folder `model` gives their
    chosen and rejected answers: (records, chosen rewards, rejected rewards)."""
    from lmforge.align.preference_data import read_preferences
    from lmforge.align.reward_model import score_sequences
    from lmforge.tokenizer.chat import encode_chat

    paths = [pairs] if isinstance(pairs, (str, Path)) else list(pairs)
    records = [r for p in paths for r in read_preferences(p)]
    net, tok = _load_reward_model(model, tokenizer, device, dtype)
    seqs = [encode_chat(tok, [*r.prompt, {"role": "assistant", "content": a}]).ids
            for r in records for a in (r.chosen, r.rejected)]
    scores = score_sequences(net, seqs, max_batch_tokens, _precision(net))
    return records, scores[0::2], scores[1::2]


def evaluate_reward_model(model: Path | str, pairs: list[Path] | Path, tokenizer: Path | None = None,
                          device: str | None = None, dtype: Dtype | None = None, max_batch_tokens: int = 16384) -> dict:
    """The `rm eval` report (module docstring) of the reward model folder `model` on the preference files `pairs`:
    report["by_degree"][degree]["accuracy"], report["by_safety_bin"][bin]["accuracy"], report["by_source"], ...

    Comparing the two reward models on held-out safety pairs, the bin that separates them is "chosen_safe" (a
    safe answer against an unsafe one): report["by_safety_bin"]["chosen_safe"]["accuracy"] of each."""
    records, chosen, rejected = score_pairs(model, pairs, tokenizer, device, dtype, max_batch_tokens)
    paths = [pairs] if isinstance(pairs, (str, Path)) else list(pairs)
    return {"model": str(model), "pairs_files": [str(p) for p in paths], **pair_report(records, chosen, rejected)}


def rm_eval(model: Path, pairs: list[Path] | Path | None = None, out_dir: Path | None = None, tokenizer: Path | None = None,
            device: str | None = None, dtype: Dtype | None = None, max_batch_tokens: int = 16384,
            overwrite: bool = False) -> dict:
    """Accuracy of a reward model on held-out preference pairs, per degree and safety bin (`lmforge rm eval`).

    Args:
        model: Reward model folder (`lmforge rm train`'s RUN/model, or a Hugging Face *ForSequenceClassification).
        pairs: Preference files (TRL's format; `lmforge preferences collect` on held-out prompts).
        out_dir: Also write report.json, calibration.png and scores.jsonl here (under the output rule).
        tokenizer: A SentencePiece tokenizer.model (default: the model folder's).
        device: cuda or cpu (default: cuda when available).
        dtype: Cast the weights (default: as stored).
        max_batch_tokens: Padded tokens per forward.
        overwrite: Replace an earlier `rm eval` output in out_dir.

    Returns:
        The report.
    """
    from lmforge.align.preference_data import PreferenceDataError
    from lmforge.io import claim_output_dir, output_dir

    if not pairs:
        raise PreferenceDataError("no preference files: pass --pairs FILE.jsonl (or a list, --pairs [a.jsonl,b.jsonl])")
    if out_dir is not None:
        claim_output_dir(out_dir, overwrite)
    records, chosen, rejected = score_pairs(model, pairs, tokenizer, device, dtype, max_batch_tokens)
    paths = [pairs] if isinstance(pairs, (str, Path)) else list(pairs)
    report = {"model": str(model), "pairs_files": [str(p) for p in paths], **pair_report(records, chosen, rejected)}
    print(format_pair_report(report))
    if out_dir is not None:
        with output_dir(out_dir, "rm eval", overwrite) as tmp:
            (tmp / "report.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
            plot_calibration(report, tmp / "calibration.png", f"lmforge rm eval: {model}")
            with open(tmp / "scores.jsonl", "w", encoding="utf-8") as f:
                for r, c, j in zip(records, chosen, rejected):
                    f.write(json.dumps({"where": r.where, "chosen": c, "rejected": j, "degree": r.degree,
                                        "safety_bin": r.safety_bin, "source": r.source}) + "\n")
    return report


def rm_score(model: Path, dialogues: Path | None = None, out: Path | None = None, tokenizer: Path | None = None, device: str | None = None,
             dtype: Dtype | None = None, max_batch_tokens: int = 16384, overwrite: bool = False) -> Path:
    """Score dialogues with a reward model (`lmforge rm score`): each record gets "score", the reward of its
    last answer read at the answer's closing </s>.

    Args:
        model: Reward model folder.
        dialogues: A .jsonl / .parquet file of dialogues ending with an assistant answer (the formats `lmforge
            sft` reads: {"messages": [...]}, or prompt / completion).
        out: The scored records as jsonl, written atomically.
        tokenizer: A SentencePiece tokenizer.model (default: the model folder's).
        device: cuda or cpu (default: cuda when available).
        dtype: Cast the weights (default: as stored).
        max_batch_tokens: Padded tokens per forward.
        overwrite: Replace an existing `out` file.
    """
    from lmforge.align.reward_model import score_sequences
    from lmforge.align.sft_data import SFTDataError, dialogue
    from lmforge.data.sources import iter_records
    from lmforge.io import OutputExistsError, atomic_file
    from lmforge.tokenizer.chat import encode_chat

    if dialogues is None or out is None:
        raise SFTDataError("rm score needs --dialogues FILE.jsonl and --out SCORED.jsonl")
    out, dialogues = Path(out), Path(dialogues)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} exists; pass --overwrite true to replace it, or choose another name")
    if not dialogues.is_file():
        raise SFTDataError(f"{dialogues}: no such file (rm score takes a .jsonl or .parquet file of dialogues)")
    records = list(iter_records(dialogues))
    messages = [dialogue(r, where) for where, r in records]
    net, tok = _load_reward_model(model, tokenizer, device, dtype)
    scores = score_sequences(net, [encode_chat(tok, m).ids for m in messages], max_batch_tokens, _precision(net))
    with atomic_file(out, "w", encoding="utf-8") as f:
        for (_, r), s in zip(records, scores):
            f.write(json.dumps({**r, "score": s}, ensure_ascii=False) + "\n")
    print(f"scored {len(scores)} dialogues -> {out} (mean {np.mean(scores) if scores else float('nan'):.4f})")
    return out


__all__ = ["calibration", "evaluate_reward_model", "score_pairs", "format_pair_report", "pair_report", "rm_eval", "rm_score"]
