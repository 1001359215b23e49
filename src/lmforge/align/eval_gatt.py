"""`lmforge eval gatt`: instruction adherence by turn, and how much the answers attend to the instruction.

    lmforge eval gatt [runs/sft/model,runs/gatt/model] --names [sft,gatt] --world runs/world --out_dir runs/eval-gatt

The dialogues: `dialogues` held-out instruction dialogues of the world (one or two instructions combined, task
turns of the held-out split), drawn with max_turns turns and cut to T, the last turn the model's context holds:
the largest T such that every dialogue's turn T can be answered in full even when every earlier answer ran to
sampling.max_new_tokens (`gatt.turns_that_fit`). The instruction is a system message, stated once.

Each model answers every dialogue turn by turn, each turn after its own earlier answers (greedy, as `eval
chat` answers its multi-turn set). Two measurements per turn t = 1..T:

    adherence       share of the dialogues whose answer at turn t follows every instruction (the world's
                    checkers; Llama 2 measures Ghost Attention this way up to turn 20); the task accuracy at t
                    (after the instructions' surface is stripped) beside it
    attention       Llama 2's Figure 10 as a number: for the first `attention_dialogues` dialogues, the model's
                    own dialogue up to its answer T goes once through the attention probe; the positions that
                    generate answer t (each answer token is predicted at the position before it) give the
                    attention weight on the instruction's tokens, averaged over heads, positions and layers
                    (per layer too), with the uniform share beside it (instruction tokens / tokens visible):
                    the weight if attention were spread evenly

The headline is the mean adherence over turns 3..T (the turns Ghost Attention is for). `--out_dir` writes
report.json, adherence.png (both measurements against the turn, one line per model) and answers.jsonl,
under the output rule.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import torch

from lmforge.align.eval_chat import Dtype, answer_prompts, score_record
from lmforge.align.gatt_data import (
    GATT_SAMPLING,
    ContextGuard,
    InstructionDialogue,
    context_of,
    draw_dialogues,
    turns_that_fit,
)
from lmforge.align.world.common import VERSION, stream
from lmforge.align.world.instructions import instruction_text, with_instructions
from lmforge.infer.sampling import SamplingParams

FIRST_HEADLINE_TURN = 3  # adherence over turns 3..T is the headline (Ghost Attention's gate)


class EvalGattError(ValueError):
    """An eval gatt setting that cannot be measured (the message names the option)."""


# ---- the dialogues -------------------------------------------------------------------------------------------
def eval_dialogues(world, n: int, max_turns: int) -> list[InstructionDialogue]:
    """The n held-out dialogues of max_turns turns (their own stream: the same for every T and model)."""
    return draw_dialogues(world, n, max_turns, max_turns, "heldout", stream(world.seed, "heldout|eval_gatt"))


def eval_record(d: InstructionDialogue, turns: int) -> dict:
    """The first `turns` turns of `d` as a rollout prompt record, the instruction as the system message."""
    messages = with_instructions(d.messages[: 2 * turns - 1], d.specs, "system")
    meta = {**d.meta, "turns": d.meta["turns"][:turns], "rollout": True, "placement": "system"}
    return {"world": VERSION, "messages": messages, "meta": meta}


def common_turns(tokenizer, dialogues: list[InstructionDialogue], max_new_tokens: int, context: int | None) -> int:
    """T: the turns every dialogue can be answered in (module docstring)."""
    return min(turns_that_fit(tokenizer, eval_record(d, len(d.users))["messages"], max_new_tokens, context)
               for d in dialogues)


# ---- adherence ------------------------------------------------------------------------------------------------
def adherence_by_turn(records: list[dict], answers: list[list[str]]) -> dict:
    """{"adherence": {t: rate}, "task_accuracy": {t: rate}, "n": dialogues} over turns 1..T."""
    rows = [score_record(r, a) for r, a in zip(records, answers)]
    turns = len(rows[0]["adheres"])
    return {"adherence": {str(t + 1): sum(r["adheres"][t] for r in rows) / len(rows) for t in range(turns)},
            "task_accuracy": {str(t + 1): sum(r["correct"][t] for r in rows) / len(rows) for t in range(turns)},
            "n": len(rows)}


def headline(by_turn: dict[str, float], first: int = FIRST_HEADLINE_TURN) -> float | None:
    """Mean of the by-turn figures over turns first..T (None when T < first)."""
    values = [v for t, v in by_turn.items() if int(t) >= first]
    return sum(values) / len(values) if values else None


# ---- attention ------------------------------------------------------------------------------------------------
def text_token_span(tokenizer, messages: list[dict], text: str) -> tuple[int, int]:
    """[start, end) of the tokens of `text` inside the first exchange of `messages` in `encode_chat`'s ids.

    Each exchange is encoded on its own after its <s> (tokenizer.chat), so the first one is
    [bos] + encode("[INST] {user_1} [/INST] {answer_1} "), the system message merged into user_1. Laying the
    pieces' surfaces end to end (a byte piece is one byte, "▁" a space) gives each piece's byte offsets in
    that string, after the one-space dummy prefix SentencePiece puts in front; the span is every piece that
    overlaps the bytes of `text`, shifted by one for the <s>.
    """
    from lmforge.tokenizer.chat import B_INST, E_INST, exchanges

    user, answer = exchanges(messages)[0]
    first = f"{B_INST} {user.strip()} {E_INST}" + (f" {answer.strip()} " if answer is not None else "")
    at = first.find(text)
    if at < 0:
        raise EvalGattError(f"the instruction {text!r:.60} is not in the first user turn")
    ids = tokenizer.encode(first)
    sizes = [1 if tokenizer.sp.is_byte(i) else len(tokenizer.id_to_piece(i).replace("\u2581", " ").encode())
             for i in ids]
    shift = sum(sizes) - len(first.encode())  # the dummy prefix: 1 (0 for a tokenizer without one)
    if shift not in (0, 1):
        raise EvalGattError(f"the pieces of the first user turn do not lay out its {len(first.encode())} bytes")
    lo, hi = shift + len(first[:at].encode()), shift + len(first[: at + len(text)].encode())  # bytes of `text`
    ends = list(itertools.accumulate(sizes))
    inside = [k for k, end in enumerate(ends) if end > lo and end - sizes[k] < hi]
    return 1 + inside[0], 2 + inside[-1]


def answer_queries(tokenizer, messages: list[dict]) -> list[list[int]]:
    """For each answer of `messages`: the positions that generate it (each learned token's position - 1)."""
    from lmforge.tokenizer.chat import encode_chat

    out, assistants = [], [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    for i in assistants:
        mask = encode_chat(tokenizer, messages[: i + 1], learn="last").loss_mask
        out.append([p - 1 for p, learned in enumerate(mask) if learned])
    return out


def instruction_attention(model, tokenizer, record: dict, answers: list[str]) -> dict[str, dict]:
    """{t: {"mass", "uniform", "by_layer"}} of one dialogue answered by `model` (module docstring)."""
    from lmforge.align.attention_probe import attention_mass
    from lmforge.tokenizer.chat import encode_chat

    head = record["messages"][:1]  # the system message
    users = [m for m in record["messages"] if m["role"] == "user"]
    messages = [*head, *(m for u, a in zip(users, answers) for m in (u, {"role": "assistant", "content": a}))]
    ids = encode_chat(tokenizer, messages).ids
    start, end = text_token_span(tokenizer, messages, instruction_text(record["meta"]["instructions"]))
    keys = torch.zeros(len(ids), dtype=torch.bool)
    keys[start:end] = True
    per_answer = answer_queries(tokenizer, messages)
    queries = torch.tensor([q for qs in per_answer for q in qs])
    device = next(model.parameters()).device
    mass = attention_mass(model, torch.tensor([ids], device=device), queries, keys)  # (L, H, Tq)
    out, at = {}, 0
    for t, qs in enumerate(per_answer, 1):
        part = mass[:, :, at : at + len(qs)]  # (L, H, |answer t|)
        at += len(qs)
        by_layer = part.mean(dim=(1, 2))
        out[str(t)] = {"mass": float(by_layer.mean()), "by_layer": [round(float(v), 6) for v in by_layer],
                       "uniform": sum((end - start) / (q + 1) for q in qs) / len(qs)}
    return out


def mean_attention(per_dialogue: list[dict[str, dict]]) -> dict[str, dict]:
    """The per-turn attention figures averaged over dialogues."""
    out = {}
    for t in per_dialogue[0]:
        cells = [d[t] for d in per_dialogue]
        layers = len(cells[0]["by_layer"])
        out[t] = {"mass": sum(c["mass"] for c in cells) / len(cells),
                  "uniform": sum(c["uniform"] for c in cells) / len(cells),
                  "by_layer": [sum(c["by_layer"][i] for c in cells) / len(cells) for i in range(layers)]}
    return out


# ---- one model, the report, the plot ------------------------------------------------------------------------------
def measure(model, tokenizer, records: list[dict], answer, sampling: SamplingParams, attention_dialogues: int,
            progress: bool = False) -> tuple[dict, list[list[str]]]:
    """One model's figures on `records` (adherence, task accuracy and attention by turn) and its answers.
    `answer`: the answerer (`eval_chat.engine_answerer` of the same model, or a stub in tests)."""
    answers = answer_prompts(model, tokenizer, records, sampling, answer=answer, progress=progress)
    figures = adherence_by_turn(records, answers)
    figures["adherence_turns_3_to_T"] = headline(figures["adherence"])
    if attention_dialogues and model is not None:
        per = [instruction_attention(model, tokenizer, r, a) for r, a in zip(records[:attention_dialogues], answers)]
        figures["attention"] = mean_attention(per)
        figures["attention_dialogues"] = len(per)
    return figures, answers


def model_names(models: list[Path], names: list[str] | None) -> list[str]:
    """A label per model: `names`, or each folder's name (its parent's for a run's model/ folder)."""
    if names is not None:
        if len(names) != len(models) or len(set(names)) != len(names):
            raise EvalGattError(f"names: {len(names)} distinct labels are needed for {len(models)} models")
        return list(names)
    labels = [(p.parent.name if p.name == "model" else p.name) or str(p) for p in models]
    return labels if len(set(labels)) == len(labels) else [f"{i}:{label}" for i, label in enumerate(labels)]


def format_report(report: dict) -> str:
    """Adherence (and attention on the instruction) by turn, one column per model, in percent."""
    names = list(report["models"])
    lines = [f"eval gatt: {report['dialogues']} held-out dialogues, turns 1..{report['turns']} (world {VERSION})",
             f"{'turn':>6}" + "".join(f"{n[:16]:>18}" for n in names)]
    for t in map(str, range(1, report["turns"] + 1)):
        cells = []
        for n in names:
            m = report["models"][n]
            att = m.get("attention", {}).get(t)
            cells.append(f"{100 * m['adherence'][t]:5.1f}%" + (f" a{100 * att['mass']:5.1f}%" if att else ""))
        lines.append(f"{t:>6}" + "".join(f"{c:>18}" for c in cells))
    lines.append(f"{'3..T':>6}" + "".join(
        f"{'-' if (h := report['models'][n]['adherence_turns_3_to_T']) is None else f'{100 * h:5.1f}%':>18}"
        for n in names))
    lines.append("(adherence: answers following every instruction; a: attention weight on the instruction)")
    return "\n".join(lines)


def plot_report(report: dict, path: Path) -> Path:
    """adherence.png: adherence by turn, and attention on the instruction by turn, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_attention = any("attention" in m for m in report["models"].values())
    fig, axes = plt.subplots(1, 2 if with_attention else 1, figsize=(11 if with_attention else 6, 3.6), squeeze=False)
    turns = list(range(1, report["turns"] + 1))
    for name, m in report["models"].items():
        axes[0, 0].plot(turns, [100 * m["adherence"][str(t)] for t in turns], "o-", ms=3, lw=1, label=name)
        if "attention" in m:
            line, = axes[0, 1].plot(turns, [100 * m["attention"][str(t)]["mass"] for t in turns], "o-", ms=3, lw=1,
                                    label=name)
            axes[0, 1].plot(turns, [100 * m["attention"][str(t)]["uniform"] for t in turns], ":",
                            color=line.get_color(), lw=1, label=f"{name} (uniform)")
    axes[0, 0].set(xlabel="turn", ylabel="adherence (%)", ylim=(-2, 102), title="answers following the instruction")
    if with_attention:
        axes[0, 1].set(xlabel="turn", ylabel="attention weight (%)", title="attention of the answer on the instruction")
    for ax in axes[0]:
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- the verb ----------------------------------------------------------------------------------------------------
def eval_gatt(
    models: list[Path] | Path,
    world: Path = Path("runs/world"),
    names: list[str] | None = None,
    out_dir: Path | None = None,
    dialogues: int = 60,
    max_turns: int = 20,
    turns: int | None = None,
    attention_dialogues: int = 16,
    sampling: SamplingParams = GATT_SAMPLING,
    batch_size: int = 64,
    device: str | None = None,
    dtype: Dtype | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Instruction adherence by turn, and attention on the instruction by turn, of one or more models (`lmforge eval gatt`).

    Args:
        models: Model folders to compare (e.g. [runs/sft/model,runs/gatt/model]: before and after Ghost Attention).
        world: A world folder written by `lmforge world build` (the held-out dialogues are drawn from it).
        names: A label per model (default: the folder names).
        out_dir: Write report.json, adherence.png and answers.jsonl here (under the output rule).
        dialogues: Held-out dialogues answered by every model.
        max_turns: Most turns measured; fewer when the context cannot hold them with every answer at
            sampling.max_new_tokens.
        turns: Measure exactly this many turns (refused if the context does not hold them).
        attention_dialogues: Dialogues whose attention on the instruction is measured (0: none).
        sampling: How answers are generated (default greedy, at most 64 tokens each).
        batch_size: Sequences the engine decodes together.
        device: cuda or cpu (default: cuda when available).
        dtype: Cast the weights (default: as stored).
        progress: Show a progress bar while answering.
        overwrite: Replace an earlier `eval gatt` output in out_dir.

    Returns:
        The report (also out_dir/report.json).
    """
    from lmforge.align.stages import load_answerer
    from lmforge.align.world.folder import open_world
    from lmforge.io import claim_output_dir, output_dir

    paths = [Path(models)] if isinstance(models, (str, Path)) else [Path(m) for m in models]
    if not paths:
        raise EvalGattError("no models: pass one or more model folders, e.g. [runs/sft/model,runs/gatt/model]")
    labels = model_names(paths, names)
    if dialogues < 1 or max_turns < 1 or attention_dialogues < 0 or (turns is not None and turns < 1):
        raise EvalGattError("dialogues, max_turns and turns must be >= 1, attention_dialogues >= 0")
    if out_dir is not None:
        claim_output_dir(out_dir, overwrite)
    w = open_world(world)
    drawn = eval_dialogues(w, dialogues, max(max_turns, turns or 0))
    report: dict = {"world": VERSION, "world_seed": w.seed, "dialogues": len(drawn), "turns": None,
                    "sampling": {"temperature": sampling.temperature, "max_new_tokens": sampling.max_new_tokens},
                    "models": {}}
    all_answers = {}
    for label, path in zip(labels, paths):
        net, tok, answer = load_answerer(path, device, dtype, batch_size)
        fit = common_turns(tok, drawn, sampling.max_new_tokens, context_of(net))
        if report["turns"] is None:
            report["turns"] = turns or min(max_turns, fit)
        if fit < report["turns"]:
            raise EvalGattError(f"{path}: its context holds {fit} turns of these dialogues with answers of up to "
                                f"sampling.max_new_tokens {sampling.max_new_tokens} tokens, not {report['turns']}")
        records = [eval_record(d, report["turns"]) for d in drawn]
        guarded = ContextGuard(answer, tok, context_of(net))
        figures, all_answers[label] = measure(net, tok, records, guarded, sampling, attention_dialogues, progress)
        report["models"][label] = {"path": str(path), **figures, "overflows": guarded.overflows}
        del net, answer, guarded
    print(format_report(report))
    if out_dir is not None:
        with output_dir(out_dir, "eval gatt", overwrite) as tmp:
            (tmp / "report.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
            plot_report(report, tmp / "adherence.png")
            with open(tmp / "answers.jsonl", "w", encoding="utf-8") as f:
                for label, answers in all_answers.items():
                    for r, a in zip(records, answers):
                        f.write(json.dumps({"model": label, **r, "answer": a}, ensure_ascii=False) + "\n")
    return report


__all__ = ["EvalGattError", "adherence_by_turn", "answer_queries", "eval_dialogues", "eval_gatt", "eval_record",
           "headline", "instruction_attention", "measure", "text_token_span"]
