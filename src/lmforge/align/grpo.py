"""`lmforge grpo`: group relative policy optimisation (DeepSeekMath) on the same rollouts as PPO, without a critic.

For each prompt K answers are sampled (one group); each answer's advantage is its reward against its group's:

    A_i = (r_i - mean(r_group)) / (std(r_group) + eps)      (std scaling on: DeepSeekMath; off: Dr. GRPO)

the same A_i on every token of answer i. The loss per token is PPO's clipped surrogate of A_i plus beta times
the k3 estimate of KL(pi || pi_ref) (DeepSeekMath puts the KL in the loss, not in the reward), averaged per
answer then over answers ("sequence", DeepSeekMath's) or over all answer tokens ("token"). A group whose
answers all got the same reward has A = 0: it adds nothing but its KL term (rl_math.py). No critic, no GAE.

Rewards come from one scorer (scorers.py): by default the chat world's checkers directly ("checker":
verifiable 0 / 1 rewards, no reward model to hack), or a reward model folder, or the oracle's graded
helpfulness, so RM-based PPO and checker-based GRPO can be compared on the same prompts.

    iteration  P prompts x K answers through the engine (rollout.py) -> rewards -> group advantages ->
               old and reference log-probs (no-grad passes) -> one AdamW step per mini-batch of M answers
               (whole groups) -> the new weights into the engine

The optimiser and the rest are PPO's defaults (Llama 2's: constant 1e-6); metrics as PPO's, plus the share of
groups with no reward variance. Around the loop: the training harness, as for every trainer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge.align import rl_math
from lmforge.align.prompts import PromptSchedule
from lmforge.align.rl_iteration import (
    PromptsConfig,
    RLTrainConfig,
    Sums,
    Timer,
    collect,
    finish_policy_run,
    frozen,
    global_means,
    global_sum,
    load_policy,
    micro_batches,
    no_grad_pass,
    plan_iteration,
    read_prompts,
    rollout_sums,
)
from lmforge.align.rollout import RolloutConfig, make_engine, response_logprobs, sync_engine
from lmforge.align.scorers import check_scorers, make_scorer
from lmforge.parallel import ParallelConfig, parallelize
from lmforge.train import harness
from lmforge.train.config import RunConfig, TrainConfigError
from lmforge.train.evaluate import autocast_context
from lmforge.train.lm_step import trainable
from lmforge.train.optim import OptimConfig, build_optimizer, build_scheduler

GRPO_OPTIM = OptimConfig(lr=1e-6, warmup_steps=0, min_lr_ratio=1.0)


@dataclass
class GRPOConfig:
    """GRPO's update.

    Attributes:
        group_size: Answers K per prompt (one group).
        minibatch_size: Answers per gradient step over all ranks; a multiple of group_size (whole groups).
        clip: The clip range epsilon of the ratio.
        beta: Weight of the k3 KL term in the loss (DeepSeekMath: 0.04; 0 switches the reference off).
        scale_std: Divide each group's centred rewards by the group's standard deviation (DeepSeekMath); off,
            the advantages are the centred rewards (Dr. GRPO).
        loss_averaging: "sequence" (each answer's mean over its tokens, then the mean over answers:
            DeepSeekMath's) or "token" (the mean over every answer token of the mini-batch).
        epochs: Passes over the iteration's mini-batches.
    """

    group_size: int = 8
    minibatch_size: int = 64
    clip: float = 0.2
    beta: float = 0.04
    scale_std: bool = True
    loss_averaging: rl_math.Averaging = "sequence"
    epochs: int = 1

    def __post_init__(self) -> None:
        if self.group_size < 2:
            raise TrainConfigError(f"grpo.group_size must be >= 2 (a group's advantages compare its answers), "
                                   f"got {self.group_size}")
        if self.minibatch_size < 1 or self.epochs < 1 or not 0 < self.clip < 1 or self.beta < 0:
            raise TrainConfigError("grpo.minibatch_size and grpo.epochs must be >= 1, grpo.clip in (0, 1), "
                                   "grpo.beta >= 0")


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None, advantages: torch.Tensor,
              mask: torch.Tensor, cfg: GRPOConfig, n_sequences: float, n_tokens: float) -> tuple[torch.Tensor, dict]:
    """GRPO's loss of one micro-batch: per token the clipped surrogate of the answer's advantage (B,) plus
    beta * k3(pi, pi_ref) (when there is a reference), averaged as cfg.loss_averaging over the whole
    mini-batch (n_sequences answers, n_tokens tokens). logp, old_logp, ref_logp, mask: (B, T).
    Returns (loss, {"clipped" (B, T), "ratio" (B, T, detached), "kl" (B, T, detached; with a reference)})."""
    adv = advantages[:, None] * mask  # (B, T): each answer's advantage on each of its tokens
    loss_tok, clipped, ratio = rl_math.clipped_surrogate(logp, old_logp, adv, cfg.clip)
    parts = {"clipped": clipped, "ratio": ratio.detach()}
    if ref_logp is not None:
        kl_tok = rl_math.kl_estimate(logp, ref_logp, "k3") * mask
        loss_tok = loss_tok + cfg.beta * kl_tok
        parts["kl"] = kl_tok.detach()
    return rl_math.reduce_tokens(loss_tok, mask, cfg.loss_averaging, n_sequences, n_tokens), parts


def grpo(
    init_from: str,
    prompts: PromptsConfig = PromptsConfig(per_iteration=64),
    rollout: RolloutConfig = RolloutConfig(),
    grpo: GRPOConfig = GRPOConfig(),
    reward: str = "checker",
    train: RLTrainConfig = RLTrainConfig(),
    optim: OptimConfig = GRPO_OPTIM,
    run: RunConfig = RunConfig(),
    parallel: ParallelConfig = ParallelConfig(),
) -> Path:
    """Fine-tune a policy with GRPO: K answers per prompt, group-relative advantages, no critic.

    Args:
        init_from: The policy to start from (a model folder with its tokenizer.model); also the reference.
        prompts: Prompt files and prompts per iteration (64 prompts x group_size answers).
        rollout: Sampling through the engine: temperature, longest answer, engine batch.
        grpo: Group size, mini-batches, clip, KL weight beta, std scaling, loss averaging.
        reward: "checker" (the chat world's verifiable 0 / 1 rewards), "oracle:helpfulness" or a reward model
            folder.
        train: Iterations, micro-batch rows, seed, precision, device.
        optim: AdamW (0.9, 0.95, eps 1e-5), weight decay 0.1, clip 1.0, constant lr 1e-6.
        run: Run folder (default runs/grpo), checkpoints (per iteration), reporting.
        parallel: FSDP2 / DDP under torchrun.
    """
    from lmforge.models.checkpoint import load_model

    place = harness.place_training(train, parallel.tensor_parallel)
    device, dp = place.device, place.dp
    policy, tokenizer, tok_path = load_policy(init_from, device)
    reference = frozen(load_model(init_from, device=device, dtype=torch.float32)) if grpo.beta > 0 else None
    records, prompt_ids = read_prompts(prompts, tokenizer, policy.config.max_seq_len, rollout.max_new_tokens)
    scorer = make_scorer(reward, device)
    check_scorers(records, scorer)
    schedule = PromptSchedule(len(records), prompts.per_iteration, train.seed)
    K, M, W, T = grpo.group_size, grpo.minibatch_size, dp.size, rollout.temperature
    plan_iteration(schedule, 0, K, M, train.seed, dp)  # checks the sizes before any work
    engine = make_engine(policy, tokenizer.eos_id, rollout.batch_size, prompts.per_iteration * K)

    train_policy = parallelize(policy, parallel, device, place.mesh)
    optimizer = build_optimizer(policy, optim)
    scheduler = build_scheduler(optimizer, optim, train.iterations * grpo.epochs * (prompts.per_iteration * K // M))
    config = {"init_from": init_from, "prompts": prompts, "rollout": rollout, "grpo": grpo, "reward": reward,
              "train": train, "optim": optim, "run": run, "parallel": parallel}
    state = harness.TrainState(modules={"policy": policy}, optimizers={"policy": optimizer},
                               schedulers={"policy": scheduler}, counters={"step": 0, "answers": 0, "answer_tokens": 0})
    job = harness.open_run("grpo", run, config, place, state, train.iterations)
    sync_engine(engine, policy)  # a resumed run samples from its restored weights
    params = trainable(policy)

    with job:  # closes the run's progress bar, signal handlers and metric sinks however the loop ends
        for iteration in range(job.step + 1, train.iterations + 1):
            job.profiler.before_step(iteration)
            timer = Timer()
            plan = plan_iteration(schedule, iteration - 1, K, M, train.seed, dp)
            with timer("rollout"):
                samples, answers = collect(engine, tokenizer, prompt_ids, plan, rollout)
            recs = [records[plan.prompts[s.prompt]] for s in samples]
            with timer("scoring"):
                rewards = scorer(recs, answers).to(device)  # (N,) prompt-major: group l is rows l*K .. l*K+K-1
                groups = rewards.view(-1, K)
                advantages = rl_math.group_advantages(groups, grpo.scale_std).flatten()

            with timer("training"):
                mbs = micro_batches(samples, plan, train.micro_batch_size, device)
                with autocast_context(device, train.precision):
                    old = no_grad_pass(lambda b: response_logprobs(train_policy, b, T, with_entropy=True), mbs)
                    ref = no_grad_pass(lambda b: response_logprobs(reference, b, T)[0], mbs) if reference else None
                stats, seq_kl, entropy = Sums(), [], Sums()
                for epoch in range(grpo.epochs):
                    for j, mb in enumerate(mbs):
                        # one gradient step on mini-batch j (whole groups); the mean over the whole mini-batch
                        n_tok = global_sum(float(sum(m.batch.mask.sum() for m in mb)), dp.group, device)
                        mb_stats = Sums()
                        for i, m in enumerate(mb):
                            old_logp, old_entropy = old[j][i]
                            mask = m.batch.mask
                            with autocast_context(device, train.precision):
                                logp, _ = response_logprobs(train_policy, m.batch, T)
                            ref_logp = ref[j][i] if reference is not None else None
                            loss, parts = grpo_loss(logp, old_logp, ref_logp, advantages[m.rows], mask, grpo, M, n_tok)
                            (W * loss).backward()  # NOTE: * W undoes the ranks' gradient averaging
                            mb_stats.add("loss", loss.item())
                            n_mask = mask.sum().item()
                            mb_stats.add("policy/clip_fraction", (parts["clipped"] & mask).sum().item(), n_mask)
                            mb_stats.add_max("ratio_deviation", ((parts["ratio"] - 1).abs() * mask).max().item())
                            if "kl" in parts:
                                mb_stats.add("kl_loss", parts["kl"].sum().item(), mask.sum().item())
                            if epoch == 0:
                                if reference is not None:
                                    seq_kl.append(((old_logp - ref[j][i]) * mask).sum(-1))
                                entropy.add("entropy", old_entropy.sum().item(), mask.sum().item())
                        figures = mb_stats.global_figures(dp.group, device)
                        grad_norm, lr = harness.apply_update(job, iteration, figures["loss"], params, optimizer,
                                                             scheduler, optim.grad_clip)
                        if epoch == 0 and j == 0:  # the gate: ratio 1 and nothing clipped on the first mini-batch
                            stats.add("policy/first_ratio_deviation", figures["ratio_deviation"], 1)
                            stats.add("policy/first_clip_fraction", figures["policy/clip_fraction"], 1)
                        for key in ("loss", "policy/clip_fraction", "kl_loss"):
                            if key in figures:
                                stats.add(key, figures[key], 1)
                        stats.add_max("grad_norm", grad_norm)
            with timer("sync"):
                sync_engine(engine, policy)

            n = float(len(samples))
            zero = (groups.std(dim=1) == 0).float()
            sums = {"reward": (rewards.sum().item(), n), "groups/zero_variance": (zero.sum().item(), float(len(zero))),
                    "groups/reward_std": (groups.std(dim=1).sum().item(), float(len(zero))),
                    **rollout_sums(samples, recs, answers, tokenizer.eos_id)}
            if seq_kl:
                sums["kl"] = (torch.cat(seq_kl).sum().item(), n)
            record = stats.means() | entropy.global_figures(dp.group, device) | global_means(sums, dp.group, device)
            record |= {"lr": lr} | timer.figures(global_sum(record["answer/length"] * n, dp.group, device))
            state.counters["answers"] += len(samples) * W
            state.counters["answer_tokens"] += int(record["answer/length"] * n * W)
            job.log_step(iteration, record, show=("reward", "kl", "oracle/helpfulness"))
            if harness.end_step(job, iteration, train.iterations, state):
                return job.dir
    return finish_policy_run(job, state, policy, tok_path, run.save_model, ("reward", "oracle/helpfulness", "kl"))


__all__ = ["GRPOConfig", "GRPO_OPTIM", "grpo", "grpo_loss"]
