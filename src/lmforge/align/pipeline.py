"""The world pipeline: one seed of the chat world through pre-training, SFT and the alignment stages.

`make demo` runs it once (seed 0); `benchmarks/world_gains.py` runs it for several seeds and checks each stage's
gain. Every stage is the verb a user would run, with its settings from `configs/world/<stage>.yaml` (each file
starts with that command) and this run's paths and seed on the command line after it:

    world      lmforge world build --config configs/world/world.yaml --out_dir ROOT/world --seed S
    tokenizer  lmforge tokenizer train --config configs/world/tokenizer.yaml --data ROOT/world/corpus ...
    data       lmforge data prepare --config configs/world/data.yaml --data ROOT/world/corpus ...
    pretrain   lmforge pretrain --config configs/world/pretrain.yaml --data.dir ROOT/data --train.seed S ...
    sft        lmforge sft ROOT/pretrain/model --config configs/world/sft.yaml --data.sources [ROOT/world/sft.jsonl]
    preferences  lmforge preferences collect ROOT/sft/model --config configs/world/preferences.yaml
                 --prompts [ROOT/world/rlhf_prompts.jsonl] --out_dir ROOT/preferences   (held-out sets: their pairs)
    rm         lmforge rm train ROOT/sft/model --config configs/world/rm.yaml --data.sources MIX --run.dir ROOT/rm-KIND
               (KIND helpfulness or safety, MIX its mix of ROOT/preferences); lmforge rm eval ROOT/rm-KIND/model ...
    dpo        lmforge dpo ROOT/sft/model --config configs/world/dpo.yaml --data.sources [ROOT/preferences/*.jsonl]
    gatt       lmforge gatt ROOT/sft/model --config configs/world/gatt.yaml --world ROOT/world --sft.run.dir ROOT/gatt
               --sft.data.sources [{path: ROOT/world/sft.jsonl, weight: 3}]   (the SFT set as replay; distill too)
    distill    lmforge distill-safety ROOT/sft/model --config configs/world/distill.yaml --world ROOT/world
               [--distill.safety_rm RM]   (targeted into ROOT/distill-targeted, untargeted into ROOT/distill)
    eval gatt  lmforge eval gatt [ROOT/sft/model,ROOT/gatt/model] --config configs/world/eval_gatt.yaml ...
    redteam    lmforge redteam --models [...] --world ROOT/world --out_dir ROOT/eval/redteam
    rs, ppo,   lmforge rs | ppo | grpo ROOT/sft/model --config configs/world/<verb>.yaml
    grpo         --prompts.files [ROOT/world/rlhf_prompts.jsonl] --run.dir ROOT/<verb>

Evaluations answer the world's prompt sets through `LLMEngine` (greedy) and score them with the world's checkers
(`lmforge.align.eval_chat`); each report is written to ROOT/eval/<name>.json. A stage whose output is already
complete in ROOT is not run again, so an interrupted pipeline continues where it stopped.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.io import atomic_file

# Ghost Attention and safety context distillation fine-tune on their generated dialogues (weight 1) with the
# world's SFT set as replay at this weight: 3 SFT dialogues to 1 generated a step, so that a few hundred generated
# dialogues teach their behaviour without the model forgetting the rest (without replay, a small run collapsed
# to answering every turn in capitals, and distillation to refusing every look-alike).
REPLAY_WEIGHT = 3.0

# The held-out prompt sets behind the headline figures, and the train-split samples of the same size.
HELDOUT_SETS = ("eval_tasks", "eval_unsafe", "eval_lookalikes")
TRAIN_SETS = ("eval_tasks_train",)


@dataclass
class WorldPipeline:
    """The stages of one seed (module docstring). `root` holds everything this seed writes."""

    root: Path
    seed: int = 0
    configs: Path = Path("configs/world")
    progress: bool = False
    eval_limit: int | None = None  # per prompt set; None: all of it
    times: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root, self.configs = Path(self.root), Path(self.configs)
        if not self.configs.is_dir():
            raise FileNotFoundError(f"{self.configs} not found: run the world pipeline from the lmforge checkout "
                                    "(it reads configs/world/*.yaml)")

    # ---- stages ---------------------------------------------------------------------------------------------
    def world(self) -> Path:
        out = self.root / "world"
        self._verb("world", out / "manifest.json", "world", "build", "--config", self._config("world"),
                   "--out_dir", out, "--seed", self.seed)
        return out

    def tokenizer(self) -> Path:
        out = self.root / "tokenizer"
        self._verb("tokenizer", out / "tokenizer.model", "tokenizer", "train", "--config", self._config("tokenizer"),
                   "--data", self.root / "world" / "corpus", "--out_dir", out, "--seed", self.seed)
        return out / "tokenizer.model"

    def data(self) -> Path:
        out = self.root / "data"
        self._verb("data", out / "manifest.json", "data", "prepare", "--config", self._config("data"),
                   "--data", self.root / "world" / "corpus", "--tokenizer", self.root / "tokenizer" / "tokenizer.model",
                   "--out_dir", out, "--seed", self.seed)
        return out

    def pretrain(self, extra: tuple[str, ...] = ()) -> Path:
        """Pre-training (configs/world/pretrain.yaml; `extra` flags override it, e.g. the demo's fewer steps)."""
        run = self.root / "pretrain"
        self._verb("pretrain", run / "model" / "model.safetensors", "pretrain", "--config", self._config("pretrain"),
                   "--data.dir", self.root / "data", "--data.tokenizer", self.root / "tokenizer" / "tokenizer.model",
                   "--run.dir", run, "--run.resume", "auto", "--train.seed", self.seed,
                   "--run.progress", str(self.progress).lower(), *extra)
        return run / "model"

    def sft(self, extra: tuple[str, ...] = ()) -> Path:
        """SFT on the world's demonstrations (configs/world/sft.yaml; `extra` flags override it)."""
        run = self.root / "sft"
        self._verb("sft", run / "model" / "model.safetensors", "sft", self.root / "pretrain" / "model",
                   "--config", self._config("sft"), "--data.sources", f"[{self.root / 'world' / 'sft.jsonl'}]",
                   "--data.cache_dir", self.root / "cache", "--run.dir", run, "--run.resume", "auto",
                   "--train.seed", self.seed, "--run.progress", str(self.progress).lower(), *extra)
        return run / "model"

    # ---- preference pairs, the two reward models, DPO --------------------------------------------------------
    def preferences(self, name: str = "preferences", sets: tuple[str, ...] = ("rlhf_prompts",),
                    seed_offset: int = 0, extra: tuple[str, ...] = ()) -> Path:
        """`lmforge preferences collect` of the SFT model on the world's prompt files `sets` (default: the RLHF
        prompts, the reward models' training pairs; the held-out sets give their evaluation pairs) into
        ROOT/<name>, seeded seed + `seed_offset` (another offset: other answers to the same prompts)."""
        out = self.root / name
        files = ",".join(str(self.root / "world" / f"{s}.jsonl") for s in sets)
        self._verb(name, out / "summary.json", "preferences", "collect", self.root / "sft" / "model",
                   "--config", self._config("preferences"), "--prompts", f"[{files}]", "--out_dir", out,
                   "--seed", self.seed + seed_offset, *extra)
        return out

    def reward_model(self, kind: str, pairs: Path | None = None, extra: tuple[str, ...] = ()) -> Path:
        """Llama 2's `kind` ("helpfulness" or "safety") reward model from the SFT model on its mix of the pairs
        in `pairs` (default ROOT/preferences; the mixes are rm.MIXES), configs/world/rm.yaml, into ROOT/rm-<kind>."""
        from lmforge.align.rm import MIXES

        run, pairs = self.root / f"rm-{kind}", Path(pairs or self.root / "preferences")
        sources = json.dumps([{"path": str(pairs / f"{f}.jsonl"), "weight": w} for f, w in MIXES[kind]])
        self._verb(run.name, run / "model" / "model.safetensors", "rm", "train", self.root / "sft" / "model",
                   "--config", self._config("rm"), "--data.sources", sources, "--run.dir", run, "--run.resume",
                   "auto", "--train.seed", self.seed, "--run.progress", str(self.progress).lower(), *extra)
        return run / "model"

    def evaluate_rm(self, kind: str, pairs: list[Path], extra: tuple[str, ...] = ()) -> dict:
        """`lmforge rm eval` of ROOT/rm-<kind> on the pair files `pairs`; the report (ROOT/eval/rm-<kind>/)."""
        out = self.root / "eval" / f"rm-{kind}"
        self._verb(f"eval rm-{kind}", out / "report.json", "rm", "eval", self.root / f"rm-{kind}" / "model",
                   "--pairs", f"[{','.join(map(str, pairs))}]", "--out_dir", out, *extra)
        return json.loads((out / "report.json").read_text())

    def dpo(self, pairs: Path | None = None, extra: tuple[str, ...] = ()) -> Path:
        """`lmforge dpo` from the SFT model (also its frozen reference) on the helpfulness and safety pairs in
        `pairs` (default ROOT/preferences), configs/world/dpo.yaml, into ROOT/dpo; the trained model."""
        run, pairs = self.root / "dpo", Path(pairs or self.root / "preferences")
        sources = f"[{pairs / 'helpfulness.jsonl'},{pairs / 'safety.jsonl'}]"
        self._verb("dpo", run / "model" / "model.safetensors", "dpo", self.root / "sft" / "model", "--config",
                   self._config("dpo"), "--data.sources", sources, "--run.dir", run, "--run.resume", "auto",
                   "--train.seed", self.seed, "--run.progress", str(self.progress).lower(), *extra)
        return run / "model"

    # ---- the stages after SFT (Ghost Attention, safety context distillation, red teaming) ------------------------
    # `extra`: more flags for the verb, after the config's (e.g. ("--gatt.dialogues", "60")): sizes per run.
    def gatt(self, init_from: Path | None = None, extra: tuple[str, ...] = ()) -> Path:
        """Ghost Attention on the SFT model (or `init_from`): configs/world/gatt.yaml; data in ROOT/gatt-data."""
        run = self.root / "gatt"
        self._verb("gatt", run / "model" / "model.safetensors", "gatt", init_from or self.root / "sft" / "model",
                   "--config", self._config("gatt"), "--world", self.root / "world", "--data_dir",
                   self.root / "gatt-data", *self._sft_flags(run), *extra)
        return run / "model"

    def distill(self, safety_rm: str | Path | None = "oracle", init_from: Path | None = None,
                extra: tuple[str, ...] = (), name: str | None = None) -> Path:
        """Safety context distillation of the SFT model (or `init_from`): configs/world/distill.yaml. Targeted by
        `safety_rm` (a Safety RM folder, or "oracle": the world oracle's safety score) into ROOT/distill-targeted;
        untargeted (safety_rm None) into ROOT/distill; `name` another folder."""
        run = self.root / (name or ("distill" if safety_rm is None else "distill-targeted"))
        target = () if safety_rm is None else ("--distill.safety_rm", safety_rm)
        self._verb(run.name, run / "model" / "model.safetensors", "distill-safety",
                   init_from or self.root / "sft" / "model", "--config", self._config("distill"), "--world",
                   self.root / "world", "--data_dir", self.root / f"{run.name}-data", *target, *self._sft_flags(run),
                   *extra)
        return run / "model"

    def evaluate_gatt(self, models: dict[str, Path], name: str = "gatt", extra: tuple[str, ...] = ()) -> dict:
        """`lmforge eval gatt` of `models` ({label: folder}, e.g. {"sft": ..., "gatt": ...}) with
        configs/world/eval_gatt.yaml; the report (ROOT/eval/<name>/report.json, not run again when there)."""
        out = self.root / "eval" / name
        self._verb(f"eval {name}", out / "report.json", "eval", "gatt", f"[{','.join(map(str, models.values()))}]",
                   "--names", f"[{','.join(models)}]", "--config", self._config("eval_gatt"), "--world",
                   self.root / "world", "--out_dir", out, "--progress", str(self.progress).lower(), *extra)
        return json.loads((out / "report.json").read_text())

    def redteam(self, models: dict[str, Path], name: str = "redteam", extra: tuple[str, ...] = ()) -> dict:
        """`lmforge redteam` of `models` ({label: folder}) on this seed's world; the report (ROOT/eval/<name>/)."""
        out = self.root / "eval" / name
        self._verb(name, out / "report.json", "redteam", "--models", f"[{','.join(map(str, models.values()))}]",
                   "--names", f"[{','.join(models)}]", "--world", self.root / "world", "--out_dir", out, *extra)
        return json.loads((out / "report.json").read_text())

    # ---- RL (rejection sampling, PPO, GRPO) on the world's RLHF prompts ------------------------------------------
    def rl(self, verb: str, name: str | None = None, init_from: Path | None = None,
           extra: tuple[str, ...] = ()) -> Path:
        """`lmforge rs | ppo | grpo` from the SFT model (or `init_from`) with configs/world/<verb>.yaml on
        ROOT/world/rlhf_prompts.jsonl, into ROOT/<name> (default: the verb); the trained model. The configs'
        rewards are the world oracle's stand-ins for the reward models (rs, ppo) and its checker (grpo);
        `extra` changes them, e.g. ("--reward.safety", "null") takes the Safety RM out of the gate."""
        run = self.root / (name or verb)
        seeds = (("--seed", self.seed, "--sft.train.seed", self.seed, "--sft.data.cache_dir", self.root / "cache")
                 if verb == "rs" else ("--train.seed", self.seed))
        self._verb(run.name, run / "summary.json", verb, init_from or self.root / "sft" / "model",
                   "--config", self._config(verb), "--prompts.files", f"[{self.root / 'world' / 'rlhf_prompts.jsonl'}]",
                   "--run.dir", run, "--run.resume", "auto", *seeds, *extra)
        if verb == "rs":
            from lmforge.align.rs import final_model

            return final_model(run)
        return run / "model"

    def _sft_flags(self, run: Path) -> list:
        """The flags of a fine-tuning through sft in this pipeline: the SFT set as replay beside the generated
        dialogues (REPLAY_WEIGHT), its run folder, cache, seed, resume."""
        replay = json.dumps([{"path": str(self.root / "world" / "sft.jsonl"), "weight": REPLAY_WEIGHT}])
        return ["--sft.data.sources", replay, "--sft.data.cache_dir", self.root / "cache", "--sft.run.dir", run,
                "--sft.run.resume", "auto", "--sft.train.seed", self.seed, "--sft.run.progress",
                str(self.progress).lower()]

    # ---- evaluation ------------------------------------------------------------------------------------------
    def evaluate(self, model: Path, name: str, sets: tuple[str, ...] = HELDOUT_SETS + TRAIN_SETS) -> dict:
        """Answer and score the prompt sets `sets` of this seed's world with `model`; {set: report}. Cached in
        ROOT/eval/<name>.json."""
        from lmforge.align.eval_chat import answer_prompts, read_records, score_answers
        from lmforge.models.checkpoint import load_model
        from lmforge.tokenizer import Tokenizer

        path = self.root / "eval" / f"{name}.json"
        if path.is_file():
            return json.loads(path.read_text())
        start = time.perf_counter()
        net = load_model(model).eval()
        tok = Tokenizer(Path(model) / "tokenizer.model")
        reports = {}
        for s in sets:
            records = read_records(self.root / "world" / f"{s}.jsonl", limit=self.eval_limit)
            answers = answer_prompts(net, tok, records, progress=self.progress)
            reports[s] = score_answers(records, answers)
        with atomic_file(path, "w", encoding="utf-8") as f:
            f.write(json.dumps(reports, indent=1) + "\n")
        self.times[f"eval {name}"] = time.perf_counter() - start
        return reports

    # ---- plumbing ---------------------------------------------------------------------------------------------
    def _config(self, stage: str) -> Path:
        return self.configs / f"{stage}.yaml"

    def _verb(self, stage: str, done: Path, *argv) -> None:
        """Run `lmforge ARGV...` in this process unless `done` exists (the stage's last output); stop the
        pipeline when the verb returns without it."""
        from lmforge.cli import main

        if done.exists():
            return
        start = time.perf_counter()
        main([str(a) for a in argv])
        if not done.exists():  # e.g. a training verb that saved a checkpoint on SIGTERM and returned
            raise RuntimeError(f"stage {stage} stopped before writing {done}; run the pipeline again to continue")
        self.times[stage] = time.perf_counter() - start


def headline(reports: dict) -> dict[str, float]:
    """The figures the gains are judged on, from `WorldPipeline.evaluate`'s reports: held-out task accuracy and
    per family, violation and false-refusal rates, mean oracle helpfulness on the tasks, the gated oracle score
    over all three sets (`gated_oracle_score`), and the train-split task accuracy."""
    out = {"task_accuracy": reports["eval_tasks"]["tasks"]["accuracy"],
           "violation_rate": reports["eval_unsafe"]["unsafe"]["violation_rate"],
           "false_refusal_rate": reports["eval_lookalikes"]["lookalikes"]["false_refusal_rate"],
           "helpfulness": reports["eval_tasks"]["oracle"]["helpfulness"]}
    out["oracle_score"] = gated_oracle_score(reports)
    for family, f in reports["eval_tasks"]["tasks"]["by_family"].items():
        out[f"accuracy/{family}"] = f["accuracy"]
    if "eval_tasks_train" in reports:
        out["train_task_accuracy"] = reports["eval_tasks_train"]["tasks"]["accuracy"]
    return out


def gated_oracle_score(reports: dict) -> float:
    """Llama 2's gated reward with the world's oracle as both reward models, over the held-out sets: each unsafe
    request scored by the oracle's safety, each task and look-alike by its helpfulness, every prompt counted once
    (the oracle's safety of a task or a look-alike answer is never under the gate's threshold, so the gate picks
    helpfulness there). What RL maximises on its prompt mix, measured on held-out prompts.

    Worked example: 600 tasks at helpfulness 0.2, 500 unsafe requests at safety 0.9, 500 look-alikes at
    helpfulness 0.4: (600 * 0.2 + 500 * 0.9 + 500 * 0.4) / 1600 = 0.48125."""
    parts = [(reports["eval_tasks"]["records"], reports["eval_tasks"]["oracle"]["helpfulness"]),
             (reports["eval_unsafe"]["records"], reports["eval_unsafe"]["oracle"]["safety"]),
             (reports["eval_lookalikes"]["records"], reports["eval_lookalikes"]["oracle"]["helpfulness"])]
    return sum(n * v for n, v in parts) / sum(n for n, _ in parts)


def gatt_headline(report: dict) -> dict[str, float]:
    """Per model of an `eval gatt` report: adherence over turns 3..T (the Ghost Attention gate), by turn, the
    task accuracy over turns 3..T beside it, and the attention on the instruction at turn T.

    NOTE: the task accuracy belongs beside the gate: a collapsed model that answers every turn in capitals
    follows the capitals instruction at every turn and solves no task (seen in a small run)."""
    from lmforge.align.eval_gatt import headline as turns_3_to_t

    out = {}
    for name, m in report["models"].items():
        out[f"{name}/adherence_3_T"] = m["adherence_turns_3_to_T"]
        out[f"{name}/task_accuracy_3_T"] = turns_3_to_t(m["task_accuracy"])
        for t, v in m["adherence"].items():
            out[f"{name}/adherence/{t}"] = v
        if "attention" in m:
            out[f"{name}/attention_T"] = m["attention"][str(report["turns"])]["mass"]
    return out


def safety_headline(reports: dict) -> dict[str, float]:
    """`headline` plus the oracle helpfulness on the harmless look-alikes (answering them helpfully is what
    safety tuning can cost), from `WorldPipeline.evaluate`'s reports."""
    return {**headline(reports), "lookalike_helpfulness": reports["eval_lookalikes"]["oracle"]["helpfulness"]}


def gain_holds(before: list[float], after: list[float], higher_is_better: bool = True) -> tuple[bool, str]:
    """The rule a stage's gain is judged by, over seeds: every seed's `after` beats its own `before`, and the
    mean gain exceeds the spread of either side, mean(after) - mean(before) > max(range(before), range(after))
    (the difference taken in the better direction). Returns (holds, a one-line account).

    Worked example, higher is better: before (0.20, 0.24, 0.22), after (0.41, 0.38, 0.44): every seed gains,
    mean gain 0.19 > max(0.04, 0.06) = 0.06: holds. After (0.41, 0.23, 0.44): seed 2 gains but seed 1 loses.
    """
    if len(before) != len(after) or not before:
        raise ValueError(f"need as many before as after figures (one per seed), got {len(before)} and {len(after)}")
    sign = 1.0 if higher_is_better else -1.0
    each = all(sign * (a - b) > 0 for b, a in zip(before, after))
    gain = sign * (sum(after) / len(after) - sum(before) / len(before))
    holds = each and gain > spread(before, after)
    verdict = "holds" if holds else "does not hold"
    why = "every seed gains" if each else "not every seed gains"
    return holds, f"{verdict}: {why}; mean gain {gain:+.4f} vs spread {spread(before, after):.4f}"


def spread(before: list[float], after: list[float]) -> float:
    """The seeds' spread the gain rule measures a gain against: max(range(before), range(after))."""
    return max(max(before) - min(before), max(after) - min(after))
