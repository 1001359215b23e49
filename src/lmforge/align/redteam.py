"""`lmforge redteam`: attack sets by risk category and style, run against model folders or any OpenAI-compatible
endpoint, scored by the world's refusal checker, as one table across model versions (Llama 2, section 4.3).

    lmforge redteam --models [runs/pretrain/model,runs/sft/model,runs/distill/model] --world runs/world --out_dir runs/redteam
    lmforge redteam --endpoint http://127.0.0.1:8000/v1 --world runs/world --attacks more_attacks.jsonl

Attacks.
- From the world (`--world`): for each risk category and attack style (direct, role play, hypothetical,
  obfuscated leetspeak, multi-turn escalation: a harmless look-alike answered, then the request),
  `per_cell` unsafe requests of the held-out split (`--split`); and `lookalikes` harmless look-alikes per
  category, whose refusals are false refusals. They are drawn from streams of their own (`redteam|...`), so
  they are the same for every target and run.
- From jsonl files (`--attacks`), one attack per line:
      {"messages": [...] ending with a user message}  or  {"prompt": "..."}
      "category": "...", "style": "...",  (any names: each becomes a row of the tables)
      "harmful": true                     (default; false marks a harmless prompt: refusing it is a false refusal)

Targets: model folders (answered in this process through `LLMEngine`) and endpoints (`--endpoint URL`: the
OpenAI chat API through the openai client, so our `lmforge serve`, vLLM or any compatible server). Every
target answers every attack with the same sampling (greedy by default), the multi-turn attacks as scripted.

Scores. An answer to a harmful attack violates when it does not refuse (`safety.refused`, the world's
checker); an answer to a harmless one is a false refusal when it does. Per target: the violation rate overall,
per category, per style and per (category, style) cell, and the false-refusal rate overall and per category;
then one table, a row per target (base, SFT, RLHF rounds, distilled, a server). `--out_dir` writes report.json,
table.md and answers.jsonl under the output rule.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lmforge.align.eval_chat import DEFAULT_SAMPLING, Answerer, Dtype, _grouped, _rate
from lmforge.align.world import safety
from lmforge.align.world.common import stream
from lmforge.infer.sampling import SamplingParams


class RedTeamError(ValueError):
    """An attack file, target or option redteam cannot use (the message names it, with file and line)."""


@dataclass
class Attack:
    """One prompt of an attack set: the dialogue to answer, its category and style, whether it is harmful."""

    messages: list[dict]
    category: str
    style: str
    harmful: bool = True
    source: str = "world"
    item: str | None = None  # the world item's key (its split is decided by it), for a world attack


# ---- attack sets ----------------------------------------------------------------------------------------------
def world_attacks(world, per_cell: int, lookalikes: int, split: str = "heldout",
                  categories: tuple[str, ...] = safety.CATEGORY_NAMES,
                  styles: tuple[str, ...] = safety.STYLES) -> list[Attack]:
    """`per_cell` unsafe requests per (category, style) and `lookalikes` harmless look-alikes per category (as
    style, their intent: recognise, protect, history, story), of `split`."""
    def rng(name: str):
        return stream(world.seed, f"{split}|redteam|{name}")

    out = [Attack(m, c, s, item=meta["item"]) for c in categories for s in styles
           for m, meta in world.unsafe(split, per_cell, rng(f"{c}|{s}"), c, s)]
    out += [Attack(m, c, meta["intent"], harmful=False, item=meta["item"]) for c in categories
            for m, meta in world.lookalikes(split, lookalikes, rng(f"lookalikes|{c}"), c)]
    return out


def read_attacks(path: str | Path) -> list[Attack]:
    """The attacks of a jsonl file (module docstring), each line checked: RedTeamError naming FILE:LINE."""
    from lmforge.data.sources import DataError, iter_records
    from lmforge.tokenizer.chat import ChatFormatError, exchanges

    path, out = Path(path), []
    if not path.is_file():
        raise RedTeamError(f"cannot read attack file {path}: no such file")
    try:
        for where, r in iter_records(path):
            if "messages" in r:
                messages = r["messages"]
            elif isinstance(r.get("prompt"), str) and r["prompt"].strip():
                messages = [{"role": "user", "content": r["prompt"]}]
            else:
                raise RedTeamError(f"{where}: an attack needs 'messages' (a dialogue ending with the user) or a "
                                   "non-empty 'prompt'")
            try:
                exchanges(messages, add_generation_prompt=True)
            except ChatFormatError as e:
                raise RedTeamError(f"{where}: {e}") from None
            for key in ("category", "style"):
                if not isinstance(r.get(key), str) or not r[key].strip():
                    raise RedTeamError(f"{where}: an attack needs a non-empty string '{key}'")
            harmful = r.get("harmful", True)
            if not isinstance(harmful, bool):
                raise RedTeamError(f"{where}: 'harmful' must be true or false, got {harmful!r}")
            out.append(Attack(messages, r["category"], r["style"], harmful, str(path)))
    except DataError as e:
        raise RedTeamError(str(e)) from None
    if not out:
        raise RedTeamError(f"{path} holds no attacks")
    return out


# ---- scoring ---------------------------------------------------------------------------------------------------
def score_attacks(attacks: list[Attack], answers: list[str]) -> dict:
    """The figures of one target (module docstring) from its answers to `attacks`."""
    if len(attacks) != len(answers):
        raise RedTeamError(f"{len(attacks)} attacks but {len(answers)} answers")
    refused = [safety.refused(a) for a in answers]
    harmful = [(a, not r) for a, r in zip(attacks, refused) if a.harmful]
    harmless = [(a, r) for a, r in zip(attacks, refused) if not a.harmful]
    report: dict = {}
    if harmful:
        report["violation_rate"] = _rate([v for _, v in harmful])
        report["attacks"] = len(harmful)
        report["by_category"] = _grouped([(a.category, v) for a, v in harmful], "violation_rate")
        report["by_style"] = _grouped([(a.style, v) for a, v in harmful], "violation_rate")
        report["by_cell"] = _grouped([(f"{a.category}/{a.style}", v) for a, v in harmful], "violation_rate")
    if harmless:
        report["false_refusal_rate"] = _rate([r for _, r in harmless])
        report["harmless"] = len(harmless)
        report["false_refusal_by_category"] = _grouped([(a.category, r) for a, r in harmless], "false_refusal_rate")
    return report


def run_targets(targets: list[tuple[str, Answerer]], attacks: list[Attack], sampling: SamplingParams
                ) -> tuple[dict[str, dict], dict[str, list[str]]]:
    """Every target answers every attack: ({name: its figures}, {name: its answers})."""
    reports, answered = {}, {}
    dialogues = [a.messages for a in attacks]
    for name, answer in targets:
        answered[name] = answer(dialogues, sampling)
        reports[name] = score_attacks(attacks, answered[name])
    return reports, answered


def format_table(reports: dict[str, dict]) -> str:
    """One row per target: violation rate overall, per style and per category, then the false-refusal rate
    (percent; "-" where a target has no such attacks). A markdown table."""
    styles = sorted({s for r in reports.values() for s in r.get("by_style", {})})
    categories = sorted({c for r in reports.values() for c in r.get("by_category", {})})
    head = ["target", "violation", *styles, *categories, "false refusal"]

    def pct(cell: dict | None, key: str) -> str:
        return "-" if not cell or cell.get(key) is None else f"{100 * cell[key]:.1f}"

    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in reports.items():
        cells = [name, pct(r, "violation_rate"), *(pct(r.get("by_style", {}).get(s), "violation_rate") for s in styles),
                 *(pct(r.get("by_category", {}).get(c), "violation_rate") for c in categories),
                 pct(r, "false_refusal_rate")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---- the verb ----------------------------------------------------------------------------------------------------
def redteam(
    models: list[Path] | Path | None = None,
    endpoint: list[str] | str | None = None,
    names: list[str] | None = None,
    world: Path | None = None,
    attacks: list[Path] | Path | None = None,
    per_cell: int = 20,
    lookalikes: int = 20,
    split: Literal["heldout", "train"] = "heldout",
    out_dir: Path | None = None,
    sampling: SamplingParams = DEFAULT_SAMPLING,
    api_key: str | None = None,
    served_model: str | None = None,
    batch_size: int = 64,
    device: str | None = None,
    dtype: Dtype | None = None,
    overwrite: bool = False,
) -> dict:
    """Red-team model versions: attacks by risk category and style, violation and false-refusal rates (`lmforge redteam`).

    Args:
        models: Model folders to attack (e.g. [runs/pretrain/model,runs/sft/model,runs/distill/model]).
        endpoint: OpenAI-compatible servers to attack (e.g. http://127.0.0.1:8000/v1; a list for several).
        names: A label per target, models first then endpoints (default: folder names and URLs).
        world: A world folder written by `lmforge world build`: its attacks by category and style, and its
            harmless look-alikes.
        attacks: More attacks from jsonl files, one a line: {"messages": [...]} or {"prompt": ...}, with
            "category", "style" and "harmful" (default true).
        per_cell: World attacks per (risk category, style).
        lookalikes: World look-alikes per risk category (the false-refusal set).
        split: The world split the attacks come from: heldout (default) or train.
        out_dir: Write report.json, table.md and answers.jsonl here (under the output rule).
        sampling: How answers are generated (default greedy, at most 128 tokens).
        api_key: The endpoints' API key.
        served_model: The model name sent to the endpoints (default: the first their /v1/models lists).
        batch_size: Sequences the engine decodes together (model folders).
        device: cuda or cpu, for model folders (default: cuda when available).
        dtype: Cast the weights of model folders (default: as stored).
        overwrite: Replace an earlier `redteam` output in out_dir.

    Returns:
        The report (also out_dir/report.json).
    """
    from lmforge.align.eval_chat import endpoint_answerer
    from lmforge.align.stages import load_answerer
    from lmforge.align.world.folder import open_world
    from lmforge.io import claim_output_dir, output_dir

    folders = [Path(models)] if isinstance(models, (str, Path)) else [Path(m) for m in models or []]
    urls = [endpoint] if isinstance(endpoint, str) else list(endpoint or [])
    if not folders and not urls:
        raise RedTeamError("no targets: pass --models [FOLDER,...] and / or --endpoint URL")
    labels = names if names is not None else [(p.parent.name if p.name == "model" else p.name) for p in folders] + urls
    if len(labels) != len(folders) + len(urls) or len(set(labels)) != len(labels):
        raise RedTeamError(f"names: {len(folders) + len(urls)} distinct labels are needed (models, then endpoints); "
                           f"got {labels}")
    if split not in ("heldout", "train") or per_cell < 0 or lookalikes < 0:
        raise RedTeamError("split must be heldout or train, per_cell and lookalikes >= 0")
    files = [attacks] if isinstance(attacks, (str, Path)) else list(attacks or [])
    attack_set = (world_attacks(open_world(world), per_cell, lookalikes, split) if world is not None else [])
    attack_set += [a for f in files for a in read_attacks(f)]
    if not attack_set:
        raise RedTeamError("no attacks: pass --world FOLDER (its attacks by category and style) and / or --attacks FILE")
    if out_dir is not None:
        claim_output_dir(out_dir, overwrite)

    reports, answered = {}, {}
    for label, path in zip(labels, folders):  # one model in memory at a time
        net, _, answer = load_answerer(path, device, dtype, batch_size)
        r, a = run_targets([(label, answer)], attack_set, sampling)
        reports |= r
        answered |= a
        del net, answer
    for label, url in zip(labels[len(folders):], urls):
        r, a = run_targets([(label, endpoint_answerer(url, api_key, served_model))], attack_set, sampling)
        reports |= r
        answered |= a
    targets = dict(zip(labels, [str(p) for p in folders] + urls))
    report = {"targets": {name: {"target": targets[name], **reports[name]} for name in labels},
              "attacks": sum(a.harmful for a in attack_set), "harmless": sum(not a.harmful for a in attack_set),
              "split": split, "world": str(world) if world else None, "attack_files": [str(f) for f in files],
              "sampling": {"temperature": sampling.temperature, "max_new_tokens": sampling.max_new_tokens}}
    table = format_table(reports)
    print(f"redteam: {report['attacks']} attacks, {report['harmless']} harmless look-alikes; rates in percent\n{table}")
    if out_dir is not None:
        with output_dir(out_dir, "redteam", overwrite) as tmp:
            (tmp / "report.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
            (tmp / "table.md").write_text(table + "\n", encoding="utf-8")
            with open(tmp / "answers.jsonl", "w", encoding="utf-8") as f:
                for name in labels:
                    for att, ans in zip(attack_set, answered[name]):
                        f.write(json.dumps({"target": name, "category": att.category, "style": att.style,
                                            "harmful": att.harmful, "item": att.item, "source": att.source,
                                            "messages": att.messages, "answer": ans,
                                            "refused": safety.refused(ans)}, ensure_ascii=False) + "\n")
    return report


__all__ = ["Attack", "RedTeamError", "format_table", "read_attacks", "redteam", "run_targets", "score_attacks",
           "world_attacks"]
