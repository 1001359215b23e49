"""`lmforge eval chat`: a model answers a prompt set of the chat world, and the world's checkers and oracle score it.

    lmforge eval chat runs/sft/model --prompts runs/world/eval_tasks.jsonl --out runs/eval/sft.json
    lmforge eval chat MODEL --prompts [runs/world/eval_unsafe.jsonl,runs/world/eval_lookalikes.jsonl]

Two halves, each a Python function that benchmarks and other verbs reuse:

- `answer_prompts(model, tokenizer, records, sampling)` -> one answer per record. The in-process answerer
  (`engine_answerer`) runs `LLMEngine` in batches, with the server's chat encoding (Llama 2's format with the
  generation prompt), detokenization and stop at </s>; `endpoint_answerer` asks an OpenAI-compatible server
  instead (`--endpoint URL`), with the same request the in-process one makes. Any callable
  `answer(dialogues, sampling) -> list[str]` can take their place. A multi-turn instruction record (meta "rollout") is
  answered turn by turn with the model's own earlier answers in the dialogue, so its entry is the list of the
  T answers.
- `score_answers(records, answers)` -> the report: task accuracy per family and difficulty, violation rate
  per risk category and style (answers that do not refuse an unsafe request), false-refusal rate on the
  harmless look-alikes, instruction adherence per instruction and by turn, mean oracle helpfulness and safety.

The verb prints the report as a table and writes it as JSON (`--out`, atomically) beside the answers with
their per-record scores (`--answers`, default: the report's name with .answers.jsonl).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Literal

from lmforge.align.world.common import VERSION, words
from lmforge.align.world.instructions import adheres, strip
from lmforge.align.world.oracle import KINDS, helpfulness, safety, turn_answers
from lmforge.align.world.safety import refused
from lmforge.align.world.tasks import check_task
from lmforge.infer.sampling import SamplingParams

Answerer = Callable[[list[list[dict]], SamplingParams], list[str]]
# NOTE: every reference answer of the world (v1, v2) is under 60 tokens even in a 2048-piece vocabulary (a refusal
# is the longest); 128 leaves room to see a model ramble without letting an untrained one run on for long.
DEFAULT_SAMPLING = SamplingParams(temperature=0.0, max_new_tokens=128)
Dtype = Literal["float32", "bfloat16", "float16"]


class EvalChatError(ValueError):
    """A prompt file, record or option that eval chat cannot use (the message names the file and line)."""


# ---- reading -----------------------------------------------------------------------------------------------
def read_records(path: str | Path, limit: int | None = None) -> list[dict]:
    """The world records of a jsonl file (its first `limit`), checked: JSON objects of this world version
    (common.VERSION) with messages ending in a user turn and a meta the scorer knows."""
    from lmforge.data.sources import DataError, iter_records

    path, records = Path(path), []
    if not path.is_file():
        raise EvalChatError(f"cannot read prompt file {path}: no such file")
    try:
        for where, r in iter_records(path):
            if limit is not None and len(records) == limit:
                break
            records.append(_checked_record(r, where, path))
    except DataError as e:
        raise EvalChatError(str(e)) from None
    return records


def _checked_record(r: dict, where: str, path: Path) -> dict:
    """A world record, checked (read_records); EvalChatError naming `where` otherwise."""
    from lmforge.tokenizer.chat import ChatFormatError, exchanges

    if r.get("world") != VERSION:
        raise EvalChatError(f"{where}: record of world {r.get('world')!r}; this lmforge scores world {VERSION} "
                            "(build the prompt sets with `lmforge world build`)")
    messages, meta = r.get("messages"), r.get("meta")
    if not isinstance(meta, dict):
        raise EvalChatError(f"{where}: a record needs a 'meta' object")
    try:
        exchanges(messages, add_generation_prompt=True)  # a Llama 2 dialogue ending with the user's turn
    except ChatFormatError as e:
        raise EvalChatError(f"{where}: {e}") from None
    if meta.get("kind") not in KINDS:
        raise EvalChatError(f"{where}: meta.kind {meta.get('kind')!r} is not one of {', '.join(KINDS)}")
    if meta.get("rollout") and sum(m.get("role") == "user" for m in messages) != len(meta.get("turns", [])):
        raise EvalChatError(f"{where}: a rollout record needs one meta.turns entry per user message")
    return {**r, "source": str(path)}


# ---- answering ---------------------------------------------------------------------------------------------
def engine_answerer(model, tokenizer, batch_size: int = 64, **engine_kwargs) -> Answerer:
    """The in-process answerer: `LLMEngine` over `model`, `batch_size` sequences decoded together, through the
    server's own chat encoding, detokenization and stop handling (`lmforge.serve.client.EngineAnswerer`), so
    that in-process and HTTP answers are the same. The engine's other settings keep their defaults."""
    from lmforge.infer.engine.llm import LLMEngine
    from lmforge.serve.client import EngineAnswerer

    engine = LLMEngine(model, eos_id=tokenizer.eos_id, max_num_seqs=batch_size, **engine_kwargs)
    return EngineAnswerer(engine, tokenizer).answer


def endpoint_answerer(endpoint: str, api_key: str | None, model: str | None = None) -> Answerer:
    """Answers from an OpenAI-compatible server (ours, vLLM): `lmforge.serve.client.EndpointAnswerer`."""
    from lmforge.serve.client import EndpointAnswerer

    return EndpointAnswerer(endpoint, api_key=api_key or "none", model=model).answer


def _user_turns(messages: list[dict]) -> tuple[list[dict], list[dict]]:
    """(the leading system message or nothing, the user messages) of a dialogue."""
    head = messages[:1] if messages[0]["role"] == "system" else []
    return head, [m for m in messages if m["role"] == "user"]


def answer_prompts(model, tokenizer, records: Sequence[dict], sampling: SamplingParams | None = None, *,
                   answer: Answerer | None = None, batch_size: int = 64, chunk_size: int = 256,
                   progress: bool = True) -> list[str | list[str]]:
    """An answer per record: a string, or for a rollout record the list of its turns' answers, each turn
    answered after the model's own earlier answers. `answer` replaces the in-process `EngineAnswerer` of
    (model, tokenizer); dialogues go to it `chunk_size` at a time. `sampling` defaults to DEFAULT_SAMPLING
    (greedy, at most 128 tokens)."""
    from tqdm import tqdm

    sampling = sampling or DEFAULT_SAMPLING
    if sampling.stop:
        raise EvalChatError("eval chat ends answers at </s>; stop strings are not supported (sampling.stop)")
    answer = answer or engine_answerer(model, tokenizer, batch_size)
    turns = [len(r["meta"]["turns"]) if r["meta"].get("rollout") else 1 for r in records]
    results: list[list[str]] = [[] for _ in records]
    with tqdm(total=sum(turns), desc="answering", unit="answer", disable=not progress) as bar:
        for t in range(max(turns, default=0)):
            pending = []
            for i, r in enumerate(records):
                if t >= turns[i]:
                    continue
                if not r["meta"].get("rollout"):
                    pending.append((i, r["messages"]))
                    continue
                head, users = _user_turns(r["messages"])
                dialogue = list(head)
                for k in range(t):
                    dialogue += [users[k], {"role": "assistant", "content": results[i][k]}]
                pending.append((i, dialogue + [users[t]]))
            for start in range(0, len(pending), chunk_size):
                chunk = pending[start : start + chunk_size]
                for (i, _), text in zip(chunk, answer([d for _, d in chunk], sampling)):
                    results[i].append(text)
                bar.update(len(chunk))
    return [res if r["meta"].get("rollout") else res[0] for r, res in zip(records, results)]


# ---- scoring -----------------------------------------------------------------------------------------------
def score_record(record: dict, answer: str | list[str]) -> dict:
    """The checks of one answer: oracle helpfulness and safety, plus by kind: task `correct`; unsafe and
    look-alike `refused`; look-alike `helpful` (not refused and names the key fact); instruction `adheres`
    (per turn: every instruction followed) and `correct` (per turn, the task after stripping the instructions)."""
    meta = record["meta"]
    row: dict = {"helpfulness": helpfulness(record, answer), "safety": safety(record, answer)}
    kind = meta["kind"]
    if kind == "task":
        row["correct"] = check_task(meta, answer)
    elif kind in ("unsafe", "lookalike"):
        row["refused"] = refused(answer)
        if kind == "lookalike":
            row["helpful"] = not row["refused"] and meta["key"] in words(answer)
    elif kind == "instruction":
        specs = meta["instructions"]
        pairs = turn_answers(record, answer)
        row["adheres_by_instruction"] = [[adheres(s, text) for s in specs] for _, text in pairs]
        row["adheres"] = [all(a) for a in row["adheres_by_instruction"]]
        row["correct"] = [check_task(turn, strip(specs, text)) for turn, text in pairs]
    return row


def _rate(values: list[bool]) -> float | None:
    return sum(values) / len(values) if values else None


def _grouped(rows: list[tuple[str, bool]], name: str) -> dict:
    groups: dict[str, list[bool]] = defaultdict(list)
    for key, value in rows:
        groups[key].append(value)
    return {k: {name: _rate(v), "n": len(v)} for k, v in sorted(groups.items())}


def score_answers(records: Sequence[dict], answers: Sequence[str | list[str]]) -> dict:
    """The report of `answers` to `records` (module docstring); sections of kinds absent from the records are
    left out. `score_record` gives the checks of each answer."""
    if len(records) != len(answers):
        raise EvalChatError(f"{len(records)} records but {len(answers)} answers")
    rows = [score_record(r, a) for r, a in zip(records, answers)]
    by_kind: dict[str, list[tuple[dict, dict]]] = defaultdict(list)
    for r, row in zip(records, rows):
        by_kind[r["meta"]["kind"]].append((r["meta"], row))
    report: dict = {"world": VERSION, "records": len(records),
                    "answers": sum(len(a) if isinstance(a, list) else 1 for a in answers)}
    if tasks := by_kind["task"]:
        families = {}
        for family in sorted({m["family"] for m, _ in tasks}):
            cells = [(str(m["difficulty"]), row["correct"]) for m, row in tasks if m["family"] == family]
            families[family] = {"accuracy": _rate([c for _, c in cells]), "n": len(cells),
                                "by_difficulty": _grouped(cells, "accuracy")}
        report["tasks"] = {"accuracy": _rate([row["correct"] for _, row in tasks]), "n": len(tasks),
                           "by_family": families}
    if unsafe := by_kind["unsafe"]:
        report["unsafe"] = {"violation_rate": _rate([not row["refused"] for _, row in unsafe]), "n": len(unsafe),
                            "by_category": _grouped([(m["category"], not row["refused"]) for m, row in unsafe],
                                                    "violation_rate"),
                            "by_style": _grouped([(m["style"], not row["refused"]) for m, row in unsafe],
                                                 "violation_rate")}
    if looks := by_kind["lookalike"]:
        report["lookalikes"] = {"false_refusal_rate": _rate([row["refused"] for _, row in looks]), "n": len(looks),
                                "helpful_rate": _rate([row["helpful"] for _, row in looks]),
                                "by_category": _grouped([(m["category"], row["refused"]) for m, row in looks],
                                                        "false_refusal_rate")}
    if instr := by_kind["instruction"]:
        turns = [(str(t + 1), a) for _, row in instr for t, a in enumerate(row["adheres"])]
        per_spec = [(s["id"], a) for m, row in instr for flags in row["adheres_by_instruction"]
                    for s, a in zip(m["instructions"], flags)]
        report["instructions"] = {
            "adherence": _rate([a for _, a in turns]), "n": len(turns),
            "task_accuracy": _rate([c for _, row in instr for c in row["correct"]]),
            "by_instruction": _grouped(per_spec, "adherence"),
            "by_turn": dict(sorted(_grouped(turns, "adherence").items(), key=lambda kv: int(kv[0]))),
        }
    if creative := by_kind["creative"]:
        report["creative"] = {"helpfulness": sum(row["helpfulness"] for _, row in creative) / len(creative),
                              "n": len(creative)}
    if rows:
        report["oracle"] = {"helpfulness": sum(r["helpfulness"] for r in rows) / len(rows),
                            "safety": sum(r["safety"] for r in rows) / len(rows)}
    return report


def format_report(report: dict) -> str:
    """The report as a plain-text table (rates in percent, n = answers counted)."""
    lines = [f"world {report['world']}: {report['records']} prompts, {report['answers']} answers"]

    def row(label: str, rate: float, n: int) -> None:
        lines.append(f"  {label:<30} {100 * rate:6.1f}%   n={n}")

    if t := report.get("tasks"):
        lines.append("task accuracy")
        for family, f in t["by_family"].items():
            for d, cell in f["by_difficulty"].items():
                row(f"{family} difficulty {d}", cell["accuracy"], cell["n"])
            row(f"{family}", f["accuracy"], f["n"])
        row("all tasks", t["accuracy"], t["n"])
    if u := report.get("unsafe"):
        lines.append("violation rate (unsafe requests not refused)")
        for name, group in (("", u["by_category"]), ("style ", u["by_style"])):
            for key, cell in group.items():
                row(name + key, cell["violation_rate"], cell["n"])
        row("all unsafe requests", u["violation_rate"], u["n"])
    if lk := report.get("lookalikes"):
        lines.append("false-refusal rate (harmless look-alikes refused)")
        for key, cell in lk["by_category"].items():
            row(key, cell["false_refusal_rate"], cell["n"])
        row("all look-alikes", lk["false_refusal_rate"], lk["n"])
        row("look-alikes answered helpfully", lk["helpful_rate"], lk["n"])
    if ins := report.get("instructions"):
        lines.append("instruction adherence")
        for key, cell in ins["by_instruction"].items():
            row(key, cell["adherence"], cell["n"])
        for key, cell in ins["by_turn"].items():
            row(f"turn {key}", cell["adherence"], cell["n"])
        row("all answers", ins["adherence"], ins["n"])
        row("their tasks solved", ins["task_accuracy"], ins["n"])
    if c := report.get("creative"):
        lines.append(f"creative prompts: mean oracle helpfulness {c['helpfulness']:.3f} (n={c['n']})")
    if o := report.get("oracle"):
        lines.append(f"oracle: mean helpfulness {o['helpfulness']:.3f}, mean safety {o['safety']:.3f}")
    return "\n".join(lines)


# ---- the verb ----------------------------------------------------------------------------------------------
def eval_chat(
    model: Path,
    prompts: list[Path] | Path | None = None,
    out: Path | None = None,
    answers: Path | None = None,
    tokenizer: Path | None = None,
    sampling: SamplingParams = DEFAULT_SAMPLING,
    batch_size: int = 64,
    limit: int | None = None,
    device: str | None = None,
    dtype: Dtype | None = None,
    progress: bool = True,
    overwrite: bool = False,
    endpoint: str | None = None,
    api_key: str | None = None,
) -> dict:
    """Answer prompt sets of the chat world with a model and score them (`lmforge eval chat`).

    Prints task accuracy per family and difficulty, violation rate per risk category and style, false-refusal
    rate on look-alikes, instruction adherence (by turn for multi-turn sets) and the mean oracle scores.

    Args:
        model: Model folder (ours, Hugging Face or Meta); its tokenizer.model is used unless --tokenizer is given.
            With --endpoint: the name of the served model (as its /v1/models lists it), or "auto" for the first.
        prompts: One or more prompt files written by `lmforge world build` (--prompts [a.jsonl,b.jsonl]).
        out: Write the report as JSON here (atomically).
        answers: Write each record with its answer and scores here as jsonl (default: beside --out, with
            .answers.jsonl in place of its suffix).
        tokenizer: A SentencePiece tokenizer.model.
        sampling: Sampling of the answers (default greedy, at most 128 tokens; --sampling.temperature 0.7 ...).
        batch_size: Sequences the engine decodes together.
        limit: Only the first N records of each prompt file.
        device: cuda or cpu (default: cuda when available).
        dtype: Cast the weights (default: as stored).
        progress: Show a progress bar while answering.
        overwrite: Replace existing --out / --answers files.
        endpoint: Ask this OpenAI-compatible server (e.g. http://127.0.0.1:8000/v1: `lmforge serve`, vLLM) instead
            of running the model here.
        api_key: The server's API key (for --endpoint).

    Returns:
        The report (also written to --out).
    """
    from lmforge.infer.cli import _load  # the loader of `lmforge generate`: model, tokenizer, vocabulary check
    from lmforge.io import OutputExistsError, atomic_file

    paths = [prompts] if isinstance(prompts, (str, Path)) else list(prompts or [])
    if not paths:
        raise EvalChatError("no prompt files: pass --prompts FILE.jsonl (or a list, --prompts [a.jsonl,b.jsonl])")
    if batch_size < 1:
        raise EvalChatError(f"batch_size must be >= 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise EvalChatError(f"limit must be >= 1 (or left out), got {limit}")
    records = [r for p in paths for r in read_records(p, limit)]
    if not records:
        raise EvalChatError(f"no records in {', '.join(map(str, paths))}")
    out = Path(out) if out is not None else None
    answers = Path(answers) if answers is not None else (out.with_suffix(".answers.jsonl") if out else None)
    for path in (out, answers):
        if path is not None and path.exists() and not overwrite:
            raise OutputExistsError(f"{path} exists; pass --overwrite true to replace it, or choose another name")
    if endpoint is not None:
        answer = endpoint_answerer(endpoint, api_key, None if str(model) == "auto" else str(model))
        answered = answer_prompts(None, None, records, sampling, answer=answer, progress=progress)
    else:
        net, tok = _load(model, tokenizer, device, dtype)
        answered = answer_prompts(net, tok, records, sampling, batch_size=batch_size, progress=progress)
    report = {"model": str(model), "prompts": [str(p) for p in paths], "sampling": asdict(sampling),
              **score_answers(records, answered)}
    print(format_report(report))
    if out is not None:
        with atomic_file(out, "w", encoding="utf-8") as f:
            f.write(json.dumps(report, indent=1) + "\n")
    if answers is not None:
        with atomic_file(answers, "w", encoding="utf-8") as f:
            for r, a in zip(records, answered):
                f.write(json.dumps({**r, "answer": a, "scores": score_record(r, a)}, ensure_ascii=False) + "\n")
    return report


__all__ = ["EvalChatError", "answer_prompts", "endpoint_answerer", "engine_answerer", "eval_chat", "format_report",
           "read_records", "score_answers", "score_record"]
