"""`lmforge rlhf`: Llama 2's iterative RLHF (its RLHF-V1 .. V5) from one recipe, as rounds of stages.

Llama 2 (section 3.2): each round collects fresh preference pairs by sampling the current model, trains the
Helpfulness and the Safety reward models again on all pairs collected so far, and improves the model with
rejection sampling; the last rounds run PPO on the rejection-sampled model. Here each round r is

    round_r/preferences       two answers per prompt from the current model, labelled by the chat world's oracle
                              (`lmforge preferences collect`): on the RL prompts (training pairs) and on the
                              held-out prompt sets (the pairs the reward models are judged on)
    round_r/preference_pool   the training pairs of rounds 1 .. r, one folder (helpfulness.jsonl, safety.jsonl)
    round_r/rm_helpfulness    `lmforge rm train` of each reward model from rm.init_from (default: the model RLHF
    round_r/rm_safety         started from, Llama 2's chat checkpoint) on its mix of the pooled pairs
    round_r/rm_eval           each reward model's accuracy on the round's held-out pairs
    round_r/rs                `lmforge rs` from the current model, selecting with the gate of the two new RMs
    round_r/ppo               `lmforge ppo` from the RS model with the same gate (rounds >= ppo.from_round)
    round_r/eval              the round's model on the world's held-out sets (greedy, `eval chat`'s scoring)

and round_0/eval is the starting model. After each round the round table is printed and written (RUN/rounds.json):
RM accuracy, the oracle's helpfulness, task accuracy, violation and false-refusal rates.

    RUN/stages.json   the completed stages (align/ledger.py): `--run.resume auto` skips them after SIGTERM,
                      SIGKILL or a crash, and the stage in flight resumes from its own run folder (a training
                      stage from its checkpoints; a stage that writes files writes them again: each is a function
                      of its inputs and seeds)
    RUN/round_r/...   each stage's folder as named above (every training stage is a run folder of its verb)

A stage that trains and is stopped (SIGTERM, `--run.stop_at`, which every training stage obeys) ends the
driver with the stage unrecorded; the same command with `--run.resume auto` continues it. Seeds: every stage
of round r draws from (seed, r), so a rerun repeats each stage exactly.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.align.ledger import StageLedger, read_jsonl, write_jsonl
from lmforge.align.grpo import GRPOConfig
from lmforge.align.pair_training import PairTrainConfig
from lmforge.align.ppo import PPO_OPTIM, PPOConfig
from lmforge.align.rl_iteration import PromptsConfig, RLTrainConfig
from lmforge.align.rm import RM_OPTIM
from lmforge.align.rollout import RolloutConfig
from lmforge.align.rs import RSConfig
from lmforge.align.scorers import RewardConfig
from lmforge.align.stages import FineTuneConfig
from lmforge.io import atomic_file
from lmforge.train.config import RunConfig, TrainConfigError
from lmforge.train.optim import OptimConfig

HELDOUT_PROMPTS = ("eval_tasks", "eval_unsafe", "eval_lookalikes")  # the world's held-out sets (pipeline.py's)
KINDS = ("helpfulness", "safety")


@dataclass
class PreferenceRoundConfig:
    """The preference pairs each round collects (`lmforge preferences collect`).

    Attributes:
        limit: Prompts of each RL prompt file sampled for training pairs (None: all).
        heldout_limit: Prompts of each held-out set sampled for the reward models' evaluation pairs.
        temperatures: The two variants' sampling temperatures (Llama 2 varies them).
        label_noise: Noise on the preference gap the oracle annotator sees (0: exact).
        max_new_tokens: Longest answer.
    """

    limit: int | None = None
    heldout_limit: int | None = 200
    temperatures: list[float] = field(default_factory=lambda: [0.7, 1.2])
    label_noise: float = 0.0
    max_new_tokens: int = 128

    def __post_init__(self) -> None:
        if len(self.temperatures) != 2 or any(not t > 0 for t in self.temperatures):
            raise TrainConfigError(f"preferences.temperatures must be two temperatures > 0, got {self.temperatures}")


@dataclass
class RMRoundConfig:
    """The two reward models each round trains (`lmforge rm train`).

    Attributes:
        init_from: Model both start from (None: the model RLHF started from).
        train: Pairs per step, length, epochs or steps (rm train's train group).
        optim: AdamW and the schedule (rm train's defaults).
    """

    init_from: str | None = None
    train: PairTrainConfig = field(default_factory=PairTrainConfig)
    optim: OptimConfig = field(default_factory=lambda: dataclasses.replace(RM_OPTIM))


@dataclass
class RSRoundConfig:
    """Rejection sampling each round (`lmforge rs`): its rs group and its fine-tuning (rs's --sft group:
    --rs.sft.train.steps, --rs.sft.optim.lr, --rs.sft.data.sources ...)."""

    rs: RSConfig = field(default_factory=lambda: RSConfig(iterations=1))
    sft: FineTuneConfig = field(default_factory=FineTuneConfig)


@dataclass
class PPORoundConfig:
    """PPO after rejection sampling (`lmforge ppo`).

    Attributes:
        from_round: PPO runs in this round and the later ones (Llama 2: only in the fifth); None: never.
        ppo: Clip, beta, mini-batches, GAE (ppo's ppo group).
        train: Iterations and memory (ppo's train group).
        optim: AdamW, constant learning rate (ppo's defaults).
    """

    from_round: int | None = 5
    ppo: PPOConfig = field(default_factory=PPOConfig)
    train: RLTrainConfig = field(default_factory=RLTrainConfig)
    optim: OptimConfig = field(default_factory=lambda: dataclasses.replace(PPO_OPTIM))


# ---- the stages: Python functions a benchmark can call one by one ----------------------------------------------
def trained(run_dir: str | Path) -> Path | None:
    """The model a training run folder finished with, or None while it is stopped part-way."""
    model = Path(run_dir) / "model"
    return model if (model / "model.safetensors").is_file() else None


def preference_stage(model: str | Path, prompt_files: list[str], out_dir: Path, cfg: PreferenceRoundConfig, seed: int,
                     device: str | None = None, limit: int | None = None) -> dict:
    """Two answers per prompt of `prompt_files` from `model`, labelled by the oracle, into `out_dir` (replaced
    when an earlier attempt of lmforge's left it); the collection's summary."""
    from lmforge.align.preferences import Variant, collect_preferences

    a, b = (Variant(temperature=t) for t in cfg.temperatures)
    return collect_preferences(str(model), [Path(p) for p in prompt_files], out_dir, a=a, b=b,
                               label_noise=cfg.label_noise, seed=seed, max_new_tokens=cfg.max_new_tokens, limit=limit,
                               device=device, overwrite=True)


def pool_preferences(folders: list[Path], out_dir: Path) -> dict[str, int]:
    """The pairs of every `folders` (preferences collect's helpfulness.jsonl and safety.jsonl) in one folder."""
    from lmforge.io import output_dir

    counts = {}
    with output_dir(out_dir, "rlhf preference pool", overwrite=True) as tmp:
        for kind in KINDS:
            pairs = [r for f in folders for r in read_jsonl(f / f"{kind}.jsonl")]
            write_jsonl(tmp / f"{kind}.jsonl", pairs)
            counts[kind] = len(pairs)
        (tmp / "summary.json").write_text(json.dumps({"from": [str(f) for f in folders], "pairs": counts}) + "\n")
    return counts


def reward_model_stage(init_from: str | Path, kind: str, preferences: Path, run_dir: Path, cfg: RMRoundConfig,
                       run: RunConfig, seed: int) -> Path | None:
    """Llama 2's `kind` reward model on the pairs in `preferences`, in `run_dir` (resumed when it holds a
    checkpoint); its model folder, or None when stopped part-way."""
    from lmforge.align.rm import train_reward_model

    sub = dataclasses.replace(run, dir=str(run_dir), resume="auto", overwrite=False)
    train_reward_model(str(init_from), kind, preferences, run_dir, train=dataclasses.replace(cfg.train, seed=seed),
                       optim=cfg.optim, run=sub)
    return trained(run_dir)


def rm_accuracy(models: dict[str, Path], pairs: Path, device: str | None = None) -> dict[str, float]:
    """Each reward model's accuracy on the held-out pairs of the folder `pairs`, overall and on its own source."""
    from lmforge.align.rm_eval import evaluate_reward_model

    out = {}
    files = [pairs / f"{k}.jsonl" for k in KINDS if (pairs / f"{k}.jsonl").stat().st_size]
    for kind, model in models.items():
        report = evaluate_reward_model(model, files, device=device)
        out[f"rm/{kind}_accuracy"] = report["accuracy"]
        if kind in report["by_source"]:
            out[f"rm/{kind}_accuracy_own"] = report["by_source"][kind]["accuracy"]
    return out


def rs_stage(model: str | Path, prompts: PromptsConfig, cfg: RSRoundConfig, rollout: RolloutConfig,
             reward: RewardConfig, run_dir: Path, run: RunConfig, seed: int, device: str | None = None) -> Path | None:
    """`lmforge rs` from `model` in `run_dir` (resumed); the fine-tuned model, or None when stopped part-way."""
    from lmforge.align.rs import final_model, rs

    sub = dataclasses.replace(run, dir=str(run_dir), resume="auto", overwrite=False)
    rs(str(model), prompts=prompts, rs=cfg.rs, rollout=rollout, reward=reward,
       sft=dataclasses.replace(cfg.sft, train=dataclasses.replace(cfg.sft.train, seed=seed)), run=sub, seed=seed,
       device=device)
    return final_model(run_dir) if (run_dir / "summary.json").is_file() else None


def ppo_stage(model: str | Path, prompts: PromptsConfig, cfg: PPORoundConfig, rollout: RolloutConfig,
              reward: RewardConfig, run_dir: Path, run: RunConfig, seed: int) -> Path | None:
    """`lmforge ppo` from `model` in `run_dir` (resumed), its critic from the Helpfulness RM; the policy, or
    None when stopped part-way."""
    from lmforge.align.ppo import ppo

    sub = dataclasses.replace(run, dir=str(run_dir), resume="auto", overwrite=False)
    ppo(str(model), prompts=prompts, rollout=rollout, ppo=cfg.ppo, reward=reward,
        train=dataclasses.replace(cfg.train, seed=seed), optim=cfg.optim, run=sub)
    return trained(run_dir)


def grpo_stage(model: str | Path, prompts: PromptsConfig, grpo_cfg: GRPOConfig, rollout: RolloutConfig, reward: str,
               train: RLTrainConfig, optim: OptimConfig, run_dir: Path, run: RunConfig, seed: int) -> Path | None:
    """`lmforge grpo` from `model` in `run_dir` (resumed) with the scorer `reward` ("checker": the world's
    verifiable rewards); the policy, or None when stopped part-way. Not a stage of the driver (Llama 2 has no
    GRPO): beside it for benchmarks."""
    from lmforge.align.grpo import grpo

    sub = dataclasses.replace(run, dir=str(run_dir), resume="auto", overwrite=False)
    grpo(str(model), prompts=prompts, rollout=rollout, grpo=grpo_cfg, reward=reward,
         train=dataclasses.replace(train, seed=seed), optim=optim, run=sub)
    return trained(run_dir)


def last_figures(run_dir: str | Path) -> dict:
    """The last iteration's record of an RL run (metrics.jsonl): reward, kl, oracle/..., time/..."""
    from lmforge.train.metrics import read_step_metrics

    return read_step_metrics(Path(run_dir) / "metrics.jsonl")[-1]


def evaluate_stage(model: str | Path, world: Path, limit: int | None = None, device: str | None = None,
                   max_new_tokens: int = 128) -> dict[str, float]:
    """The round table's figures of `model` on the first `limit` prompts of each of the world's held-out sets
    (greedy answers of at most `max_new_tokens`, `eval chat`'s scoring): pipeline.headline's figures."""
    from lmforge.align.eval_chat import answer_prompts, read_records, score_answers
    from lmforge.align.pipeline import headline
    from lmforge.devices import resolve_device
    from lmforge.infer.sampling import SamplingParams
    from lmforge.models.checkpoint import load_model
    from lmforge.tokenizer import Tokenizer

    sampling = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens)
    net, tok = load_model(model, device=resolve_device(device)).eval(), Tokenizer(Path(model) / "tokenizer.model")
    reports = {}
    for name in HELDOUT_PROMPTS:
        records = read_records(world / f"{name}.jsonl", limit=limit)
        reports[name] = score_answers(records, answer_prompts(net, tok, records, sampling, progress=False))
    return headline(reports)


# ---- the driver --------------------------------------------------------------------------------------------------
def rlhf(
    init_from: str,
    world: str,
    rounds: int = 5,
    prompts: PromptsConfig = PromptsConfig(),
    preferences: PreferenceRoundConfig = PreferenceRoundConfig(),
    rm: RMRoundConfig = RMRoundConfig(),
    rs: RSRoundConfig = RSRoundConfig(),
    ppo: PPORoundConfig = PPORoundConfig(),
    rollout: RolloutConfig = RolloutConfig(),
    safety_threshold: float = RewardConfig.safety_threshold,
    eval_limit: int | None = None,
    eval_max_new_tokens: int = 128,
    run: RunConfig = RunConfig(),
    seed: int = 0,
    device: str | None = None,
) -> Path:
    """Iterative RLHF, Llama 2's rounds: preferences, both reward models, rejection sampling, PPO; a table.

    Each round collects new preference pairs with the current model, trains both reward models again on all
    pairs so far, runs rejection sampling and then PPO with their gate, and prints the round table.

    Args:
        init_from: The SFT model (a model folder with its tokenizer.model).
        world: The chat world folder (`lmforge world build`): its rlhf_prompts.jsonl and held-out eval_*.jsonl.
        rounds: Rounds (Llama 2: five, RLHF-V1 .. V5).
        prompts: The prompts rejection sampling and PPO answer (files default: WORLD/rlhf_prompts.jsonl) and
            how many per iteration; preferences are collected on the same files.
        preferences: The pairs each round collects.
        rm: The reward models each round trains.
        rs: Rejection sampling each round.
        ppo: PPO after rejection sampling, from round ppo.from_round on (Llama 2: the fifth).
        rollout: Sampling through the engine in RS and PPO.
        safety_threshold: The gate's threshold on the Safety RM's score (Llama 2: 0.15).
        eval_limit: Prompts per held-out set in the round table (None: all).
        eval_max_new_tokens: Longest answer in the round table's evaluation (eval chat's default: 128).
        run: The run folder (default runs/rlhf), resume, overwrite; its other options go to every training stage.
        seed: Seed of every stage (round r's draw from (seed, r)).
        device: Where sampling, scoring and evaluation run (None: CUDA when available).
    """
    from lmforge.train.runinfo import to_plain, write_run_info

    if rounds < 1:
        raise TrainConfigError(f"rounds must be >= 1, got {rounds}")
    world_dir = Path(world)
    missing = [n for n in ("rlhf_prompts", *HELDOUT_PROMPTS) if not (world_dir / f"{n}.jsonl").is_file()]
    if missing:
        raise TrainConfigError(f"world {world}: no {', '.join(m + '.jsonl' for m in missing)} (lmforge world build)")
    prompts = dataclasses.replace(prompts, files=prompts.files or [str(world_dir / "rlhf_prompts.jsonl")])
    ledger = StageLedger(run.dir or "runs/rlhf", "rlhf", resume=run.resume == "auto", overwrite=run.overwrite)
    root = ledger.dir
    write_run_info(root, to_plain({"init_from": init_from, "world": world, "rounds": rounds, "prompts": prompts,
                                   "preferences": preferences, "rm": rm, "rs": rs, "ppo": ppo, "rollout": rollout,
                                   "safety_threshold": safety_threshold, "eval_limit": eval_limit,
                                   "eval_max_new_tokens": eval_max_new_tokens, "run": run,
                                   "seed": seed, "device": device}), device=str(device), verb="rlhf")
    heldout = [str(world_dir / f"{n}.jsonl") for n in HELDOUT_PROMPTS]
    table = [{"round": 0, "model": init_from,
              **ledger.run("round_0/eval", lambda: evaluate_stage(init_from, world_dir, eval_limit, device,
                                                                  eval_max_new_tokens))}]
    model = Path(init_from)
    for r in range(1, rounds + 1):
        folder, s = root / f"round_{r}", seed * 1000 + r

        def collect(m=model, folder=folder, s=s) -> dict:
            return {"train": preference_stage(m, prompts.files, folder / "preferences", preferences, s, device,
                                              preferences.limit),
                    "heldout": preference_stage(m, heldout, folder / "heldout_preferences", preferences, s + 500,
                                                device, preferences.heldout_limit)}

        ledger.run(f"round_{r}/preferences", collect)
        ledger.run(f"round_{r}/preference_pool", lambda r=r: pool_preferences(
            [root / f"round_{i}" / "preferences" for i in range(1, r + 1)], root / f"round_{r}" / "preference_pool"))
        rms = {}
        for kind in KINDS:
            name = f"round_{r}/rm_{kind}"
            if not ledger.done(name):
                out = reward_model_stage(rm.init_from or init_from, kind, folder / "preference_pool",
                                         folder / f"rm_{kind}", rm, run, s)
                if out is None:
                    return root  # stopped part-way: --run.resume auto continues it
                ledger.record(name, {"model": str(out)})
            rms[kind] = Path(ledger.result(name)["model"])
        accuracy = ledger.run(f"round_{r}/rm_eval", lambda: rm_accuracy(rms, folder / "heldout_preferences", device))
        reward = RewardConfig(helpfulness=str(rms["helpfulness"]), safety=str(rms["safety"]),
                              safety_threshold=safety_threshold)
        steps = [("rs", lambda m, f=folder, s=s: rs_stage(m, prompts, rs, rollout, reward, f / "rs", run, s, device))]
        if ppo.from_round is not None and r >= ppo.from_round:
            steps.append(("ppo", lambda m, f=folder, s=s: ppo_stage(m, prompts, ppo, rollout, reward, f / "ppo", run,
                                                                    s)))
        for stage, fn in steps:
            name = f"round_{r}/{stage}"
            if not ledger.done(name):
                out = fn(model)
                if out is None:
                    return root
                ledger.record(name, {"model": str(out)})
            model = Path(ledger.result(name)["model"])
        figures = ledger.run(f"round_{r}/eval", lambda m=model: evaluate_stage(m, world_dir, eval_limit, device,
                                                                                   eval_max_new_tokens))
        table.append({"round": r, "model": str(model), **accuracy, **figures})
        write_round_table(root, table)
    return root


def write_round_table(root: Path, table: list[dict]) -> None:
    """RUN/rounds.json (atomically), and the table printed."""
    with atomic_file(root / "rounds.json", "w", encoding="utf-8") as f:
        f.write(json.dumps(table, indent=1) + "\n")
    cols = [("rm/helpfulness_accuracy", "RM-H acc"), ("rm/safety_accuracy", "RM-S acc"), ("helpfulness", "oracle help"),
            ("task_accuracy", "task acc"), ("violation_rate", "violations"), ("false_refusal_rate", "false refusals")]
    print("round  " + "  ".join(f"{title:>14}" for _, title in cols))
    for row in table:
        print(f"{row['round']:>5}  " + "  ".join(f"{100 * row[k]:>13.1f}%" if k in row else f"{'-':>14}"
                                                 for k, _ in cols))


__all__ = ["PPORoundConfig", "PreferenceRoundConfig", "RMRoundConfig", "RSRoundConfig", "evaluate_stage",
           "grpo_stage", "last_figures", "pool_preferences", "ppo_stage", "preference_stage", "reward_model_stage",
           "rlhf", "rm_accuracy", "rs_stage", "trained", "write_round_table"]
