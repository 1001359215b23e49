"""`make demo` (`python -m lmforge.demo`): the whole recipe on the chat world, on a laptop CPU, in minutes.

    1. build the verifiable chat world v2 (seed 0): a pre-training corpus, SFT demonstrations, prompt sets
    2. train a 2048-piece SentencePiece tokenizer on its corpus and tokenize the corpus into shards
    3. pre-train a ~1.3M-parameter Llama-style model (GQA, SwiGLU, RMSNorm, rotary) at context 1024
    4. SFT on the world's demonstrations (answers only, dialogues packed whole)
    5. preference pairs from the SFT model (two temperatures, the oracle as annotator), and Llama 2's Helpfulness
       and Safety reward models trained on them, each scored on held-out pairs by degree
    6. rejection sampling from the SFT model (4 answers a prompt, the best by Llama 2's gate kept, fine-tuned on)
    7. PPO from the SFT model with the same gate (the world's oracle stands in for both reward models in 6 and 7)
    8. `eval chat` of each model on the first 100 prompts of each held-out set: task accuracy per family,
       violation and false-refusal rates, oracle helpfulness (benchmarks/world_gains.py uses every prompt)

Every stage is a verb with its settings in configs/world/<stage>.yaml (lmforge.align.pipeline); everything lands
in runs/demo/ (replaced on every run: the folder is the demo's own), and each stage's wall time is printed.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

OUT = Path("runs/demo")
EVAL_LIMIT = 100  # prompts per set in the demo (its 30-second evaluation budget); benchmarks/world_gains.py: all
PAIR_PROMPTS = 600  # RLHF prompts the reward models' training pairs come from (world_gains.py: all 2,000)
# rejection sampling within the demo's 45-second budget: one iteration of 256 prompts x 4 answers and 6 steps of
# fine-tuning (configs/world/rs.yaml, which world_gains.py runs: two of 384 x 8 and 20 steps each)
RS_DEMO = ("--rs.iterations", "1", "--prompts.per_iteration", "256", "--rs.samples", "4", "--sft.train.steps", "6")
# pre-training and SFT within the demo's budgets (90 s and 60 s on an idle 2-core machine): 150 and 80 steps of
# configs/world's 720 and 720, which world_gains.py runs (the steps the task families need to land between their
# easy and their hard end; the demo's SFT model is the weaker for it)
PRETRAIN_DEMO = ("--train.steps", "150", "--run.eval_every", "150")
SFT_DEMO = ("--train.steps", "80", "--run.eval_every", "80")


def main(out: Path = OUT, configs: Path = Path("configs/world")) -> None:
    from lmforge.align.pipeline import HELDOUT_SETS, WorldPipeline, headline
    from lmforge.io import claim_output_dir, write_marker

    start = time.perf_counter()
    if claim_output_dir(out, overwrite=True):  # refuses a folder that is not the demo's own
        shutil.rmtree(out)
    out.mkdir(parents=True)
    write_marker(out, "lmforge demo")
    print(f"lmforge demo: the chat world, pre-training, SFT, rejection sampling, PPO and evaluations; everything goes "
          f"to {out}/\n")
    p = WorldPipeline(out, seed=0, configs=configs, eval_limit=EVAL_LIMIT)
    models = {"pre-trained": out / "pretrain" / "model", "after SFT": out / "sft" / "model"}

    reports = {}

    def reward_model(kind: str) -> None:
        p.reward_model(kind)
        heldout = out / "preferences-heldout"
        reports[kind] = p.evaluate_rm(kind, [heldout / "helpfulness.jsonl", heldout / "safety.jsonl"])

    def rl(verb: str, column: str, extra: tuple[str, ...] = ()):
        def run() -> None:
            models[column] = p.rl(verb, extra=extra)
        return run

    steps = [
        ("building the chat world v2 (seed 0): corpus, SFT demonstrations, held-out prompt sets", p.world),
        ("training a 2048-piece tokenizer on the world's corpus", p.tokenizer),
        ("tokenizing the corpus into token shards", p.data),
        ("pre-training (configs/world/pretrain.yaml, 150 of its 720 steps)", lambda: p.pretrain(PRETRAIN_DEMO)),
        ("evaluating the pre-trained model on the held-out prompt sets", lambda: p.evaluate(
            out / "pretrain" / "model", "pretrained")),
        ("SFT on the world's demonstrations (configs/world/sft.yaml, 80 of its 720 steps)", lambda: p.sft(SFT_DEMO)),
        ("evaluating the SFT model", lambda: p.evaluate(out / "sft" / "model", "sft")),
        (f"preference pairs: two answers to each of {PAIR_PROMPTS} RLHF prompts and {PAIR_PROMPTS // 5} held-out "
         "prompts a set, labelled by the oracle (configs/world/preferences.yaml)", lambda: (
             p.preferences(extra=("--limit", str(PAIR_PROMPTS))),
             p.preferences("preferences-heldout", HELDOUT_SETS, 1000, extra=("--limit", str(PAIR_PROMPTS // 5))))),
        ("the Helpfulness and the Safety reward models from the SFT model (configs/world/rm.yaml), each evaluated "
         "on the held-out pairs", lambda: [reward_model(kind) for kind in ("helpfulness", "safety")]),
        ("rejection sampling: 4 answers to each of 256 prompts, the best by the oracle's gate, fine-tuned on "
         "(configs/world/rs.yaml, one iteration of its two)", rl("rs", "after RS", RS_DEMO)),
        ("evaluating the rejection-sampled model", lambda: p.evaluate(models["after RS"], "rs", sets=HELDOUT_SETS)),
        ("PPO from the SFT model with the oracle's gate (configs/world/ppo.yaml)", rl("ppo", "after PPO")),
        ("evaluating the PPO model", lambda: p.evaluate(models["after PPO"], "ppo", sets=HELDOUT_SETS)),
    ]
    for i, (what, stage) in enumerate(steps, 1):
        print(f"[{i}/{len(steps)}] {what}", flush=True)
        stage()
    names = {"pre-trained": "pretrained", "after SFT": "sft", "after RS": "rs", "after PPO": "ppo"}
    print("\n==== what happened " + "=" * 60)
    print(table({column: headline(p.evaluate(models[column], names[column])) for column in models}))
    print("\nreward models on held-out pairs (accuracy: the chosen answer scores higher; Llama 2's Table 8):")
    print(rm_table(reports))
    print("\nwall time per stage:")
    for stage, seconds in p.times.items():
        print(f"  {stage:<22} {seconds:6.1f} s")
    print("\nfiles: runs/demo/world (the world), runs/demo/pretrain, sft, rm-helpfulness, rm-safety, rs and ppo (run "
          "folders: config.yaml, metrics.jsonl, loss.png, summary.json, the model), runs/demo/preferences and "
          "preferences-heldout (the pairs), runs/demo/eval/*.json and eval/rm-*/ (the reports, calibration plots)")
    print(f"\ndemo finished in {time.perf_counter() - start:.0f} s")


ROWS = [
    ("task_accuracy", "held-out task accuracy"),
    ("accuracy/arithmetic", "  arithmetic"),
    ("accuracy/lists", "  word lists"),
    ("accuracy/facts", "  fact look-ups"),
    ("accuracy/counting", "  counting"),
    ("train_task_accuracy", "train-split task accuracy"),
    ("violation_rate", "violation rate (unsafe not refused)"),
    ("false_refusal_rate", "false-refusal rate (look-alikes)"),
    ("helpfulness", "oracle helpfulness (tasks)"),
    ("oracle_score", "gated oracle score (all three sets)"),
]
SCORES = ("helpfulness", "oracle_score")  # in [0, 1], shown as scores; the other rows are rates


def table(columns: dict[str, dict[str, float]]) -> str:
    """Headline figures side by side, in percent (the oracle's scores in [0, 1]: pipeline.headline)."""
    names = list(columns)
    lines = [f"{'':38}" + "".join(f"{n:>14}" for n in names)]
    for key, label in ROWS:
        cells = []
        for n in names:
            v = columns[n].get(key)
            cells.append("-" if v is None else (f"{v:.3f}" if key in SCORES else f"{100 * v:.1f}%"))
        lines.append(f"{label:38}" + "".join(f"{c:>14}" for c in cells))
    return "\n".join(lines)


def rm_table(reports: dict[str, dict]) -> str:
    """Each reward model's held-out accuracy by degree and on the safe-versus-unsafe pairs, in percent (n pairs)."""
    from lmforge.align.world.oracle import DEGREES

    names = list(reports)
    lines = [f"{'':38}" + "".join(f"{n + ' RM':>18}" for n in names)]
    rows = [(d.replace("_", " "), lambda r, d=d: r["by_degree"].get(d)) for d in DEGREES]
    rows.append(("safe vs unsafe answer", lambda r: r["by_safety_bin"].get("chosen_safe")))
    rows.append(("all pairs", lambda r: {"accuracy": r["accuracy"], "n": r["pairs"]}))
    for label, get in rows:
        cells = [get(reports[n]) for n in names]
        cells = ["-" if c is None else f"{100 * c['accuracy']:.1f}% (n={c['n']})" for c in cells]
        lines.append(f"{label:38}" + "".join(f"{c:>18}" for c in cells))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
