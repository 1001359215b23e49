"""`lmforge ppo`: Llama 2's PPO with its gated reward, a critic and a frozen reference, one loop top to bottom.

Llama 2 (section 3.2.3): maximise E[R(g | p)] with R = R~c - beta KL(pi || pi_0), R~c = whiten(logit(Rc)) and
Rc the Safety RM's score where the prompt is safety-tagged or that score is under 0.15, the Helpfulness RM's
elsewhere (scorers.GatedReward); AdamW (0.9, 0.95, 1e-5), weight decay 0.1, clipping 1.0, a constant
learning rate of 1e-6; per iteration 512 prompts, PPO clip 0.2, mini-batches of 64, one gradient step per
mini-batch; beta 0.01 (7B, 13B) or 0.005 (34B, 70B).

    models     policy pi (from the SFT or rejection-sampling model), reference pi_0 = the model PPO started
               from (frozen), critic V = a transformer trunk with one value per token: the Helpfulness RM's
               (critic.init_from), or the policy's trunk with a fresh head
    iteration  answers through the engine at temperature T (rollout.py); scores -> gate -> whitened over the
               batch; old and reference log-probs log_softmax(logits / T) and values from no-grad passes;
               per-token rewards -beta * k1 plus the score on the last token; GAE (gamma 1, lambda 0.95);
               advantages whitened; one AdamW step per mini-batch on the clipped surrogate + 0.1 * the clipped
               value loss (rl_math.py says which choices are lmforge's own and why); the new weights into the
               engine
    metrics    one record per iteration (metrics.jsonl, TensorBoard): the reward and its parts (the gate's
               choice, the KL penalty), KL to the reference, entropy, clip fraction, value loss, explained
               variance, answer length, time per phase, and the world oracle's scores of the same answers

Until reward models are trained (`lmforge rm train`), the world's oracle stands in for both (scorers.py). Around
the loop: the training harness (run folder, resume, SIGTERM, summary, plot, export of the policy to RUN/model).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

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
from lmforge.align.rollout import RolloutConfig, make_engine, response_logprobs, response_values, sync_engine
from lmforge.align.scorers import RewardConfig, check_scorers, make_gate
from lmforge.parallel import ParallelConfig, parallelize
from lmforge.train import harness
from lmforge.train.config import RunConfig, TrainConfigError
from lmforge.train.evaluate import autocast_context
from lmforge.train.lm_step import trainable
from lmforge.train.optim import OptimConfig, build_optimizer, build_scheduler


@dataclass
class PPOConfig:
    """PPO's update (Llama 2's where it gives them; the rest are lmforge's choices, rl_math.py).

    Attributes:
        minibatch_size: Answers per gradient step over all ranks (Llama 2: 64).
        clip: PPO's clip range epsilon of the ratio (Llama 2: 0.2).
        beta: Weight of the KL penalty to the reference (Llama 2: 0.01 for 7B and 13B, 0.005 for 34B and 70B).
        kl_estimator: The per-token KL estimate in the reward: "k1" (log pi - log pi_0) or "k3".
        gamma: GAE discount.
        lam: GAE lambda.
        value_clip: Clip range of the critic's values around the rollout's (None: unclipped value loss).
        value_coef: Weight of the value loss.
        whiten_advantages: Whiten the advantages over the batch.
        loss_averaging: "token" (mean over the mini-batch's answer tokens) or "sequence" (mean of the answers'
            means).
        epochs: Passes over the iteration's mini-batches (Llama 2: one gradient step per mini-batch, i.e. 1).
    """

    minibatch_size: int = 64
    clip: float = 0.2
    beta: float = 0.01
    kl_estimator: rl_math.KLEstimator = "k1"
    gamma: float = 1.0
    lam: float = 0.95
    value_clip: float | None = 0.2
    value_coef: float = 0.1
    whiten_advantages: bool = True
    loss_averaging: rl_math.Averaging = "token"
    epochs: int = 1

    def __post_init__(self) -> None:
        if self.minibatch_size < 1 or self.epochs < 1 or not 0 < self.clip < 1 or self.beta < 0:
            raise TrainConfigError("ppo.minibatch_size and ppo.epochs must be >= 1, ppo.clip in (0, 1), ppo.beta >= 0")


@dataclass
class CriticConfig:
    """The critic.

    Attributes:
        init_from: Model folder the critic starts from: a reward model (Llama 2's critic starts from the
            Helpfulness RM) or a language model, whose trunk gets a fresh value head; None: the Helpfulness RM
            when reward.helpfulness is a reward model folder, else the policy's model.
        lr: Its learning rate (None: optim.lr).
    """

    init_from: str | None = None
    lr: float | None = None


# NOTE: Llama 2's PPO optimiser: a constant learning rate (no warm-up, floor = peak).
PPO_OPTIM = OptimConfig(lr=1e-6, warmup_steps=0, min_lr_ratio=1.0)


def init_critic(path: str, device: torch.device, seed: int) -> nn.Module:
    """A transformer trunk with one value per position: forward(tokens, logits_index=...) -> (B, T, 1).

    A reward model's shape (`lmforge.align.reward_model.init_reward_model`): from a reward model folder (Llama
    2's critic starts from the Helpfulness RM) that model as it is; from a language model folder its trunk and
    a new scalar head drawn from N(0, (0.02 / sqrt(d))^2) (seeded), so that first values are near 0.
    """
    from lmforge.align.reward_model import init_reward_model

    return init_reward_model(path, device=device, dtype=torch.float32, seed=seed)


def critic_source(critic: CriticConfig, reward: RewardConfig, init_from: str) -> str:
    """The folder the critic starts from (CriticConfig.init_from)."""
    if critic.init_from:
        return critic.init_from
    return reward.helpfulness if Path(reward.helpfulness).is_dir() else init_from


def ppo(
    init_from: str,
    prompts: PromptsConfig = PromptsConfig(),
    rollout: RolloutConfig = RolloutConfig(),
    ppo: PPOConfig = PPOConfig(),
    reward: RewardConfig = RewardConfig(),
    critic: CriticConfig = CriticConfig(),
    train: RLTrainConfig = RLTrainConfig(),
    optim: OptimConfig = PPO_OPTIM,
    run: RunConfig = RunConfig(),
    parallel: ParallelConfig = ParallelConfig(),
) -> Path:
    """Fine-tune a policy with PPO on Llama 2's gated reward (defaults: Llama 2's PPO recipe).

    Args:
        init_from: The policy to start from (an SFT or rejection-sampling model folder with its
            tokenizer.model); also the frozen reference.
        prompts: Prompt files and prompts per iteration (512).
        rollout: Sampling through the engine: temperature, longest answer, engine batch.
        ppo: Mini-batches (64), clip (0.2), KL weight beta (0.01), GAE, value loss, averaging.
        reward: The Helpfulness and Safety reward models (or the world's oracle) and the gate.
        critic: Where the critic starts (a Helpfulness RM folder; default: the policy's trunk) and its lr.
        train: Iterations (200), micro-batch rows, seed, precision, device.
        optim: AdamW (0.9, 0.95, eps 1e-5), weight decay 0.1, clip 1.0, constant lr 1e-6.
        run: Run folder (default runs/ppo), checkpoints (per iteration), reporting.
        parallel: FSDP2 / DDP under torchrun.
    """
    place = harness.place_training(train, parallel.tensor_parallel)
    device, dp = place.device, place.dp
    policy, tokenizer, tok_path = load_policy(init_from, device)
    from lmforge.models.checkpoint import load_model

    reference = frozen(load_model(init_from, device=device, dtype=torch.float32))
    value = init_critic(critic_source(critic, reward, init_from), device, train.seed)
    if value.config.vocab_size != policy.config.vocab_size:
        raise TrainConfigError(f"the critic ({critic_source(critic, reward, init_from)}) has a vocabulary of "
                               f"{value.config.vocab_size}, the policy {policy.config.vocab_size}: they must share "
                               "the tokenizer (set --critic.init_from)")
    records, prompt_ids = read_prompts(prompts, tokenizer, policy.config.max_seq_len, rollout.max_new_tokens)
    gate = make_gate(reward, device)
    check_scorers(records, gate.helpfulness, gate.safety)
    schedule = PromptSchedule(len(records), prompts.per_iteration, train.seed)
    plan_iteration(schedule, 0, 1, ppo.minibatch_size, train.seed, dp)  # checks the sizes before any work
    engine = make_engine(policy, tokenizer.eos_id, rollout.batch_size, prompts.per_iteration)

    train_policy = parallelize(policy, parallel, device, place.mesh)
    train_critic = parallelize(value, parallel, device, place.mesh)
    opt_p = build_optimizer(policy, optim)
    opt_c = build_optimizer(value, dataclasses.replace(optim, lr=critic.lr or optim.lr))
    updates = train.iterations * ppo.epochs * (prompts.per_iteration // ppo.minibatch_size)  # optimizer steps
    sched_p, sched_c = build_scheduler(opt_p, optim, updates), build_scheduler(opt_c, optim, updates)
    config = {"init_from": init_from, "prompts": prompts, "rollout": rollout, "ppo": ppo, "reward": reward,
              "critic": critic, "train": train, "optim": optim, "run": run, "parallel": parallel}
    state = harness.TrainState(modules={"policy": policy, "critic": value},
                               optimizers={"policy": opt_p, "critic": opt_c},
                               schedulers={"policy": sched_p, "critic": sched_c},
                               counters={"step": 0, "answers": 0, "answer_tokens": 0})
    job = harness.open_run("ppo", run, config, place, state, train.iterations)
    sync_engine(engine, policy)  # a resumed run samples from its restored weights
    T, W, M = rollout.temperature, dp.size, ppo.minibatch_size
    params_p, params_c = trainable(policy), trainable(value)

    with job:  # closes the run's progress bar, signal handlers and metric sinks however the loop ends
        for iteration in range(job.step + 1, train.iterations + 1):
            job.profiler.before_step(iteration)
            timer = Timer()
            plan = plan_iteration(schedule, iteration - 1, 1, M, train.seed, dp)
            with timer("rollout"):
                samples, answers = collect(engine, tokenizer, prompt_ids, plan, rollout)
            recs = [records[i] for i in plan.prompts]
            with timer("scoring"):
                gated = gate(recs, answers)
                score = gated["score"].to(device)
                whitened = rl_math.whiten(score, group=dp.group) if reward.whiten else score

            with timer("training"):
                mbs = micro_batches(samples, plan, train.micro_batch_size, device)
                with autocast_context(device, train.precision):
                    old = no_grad_pass(lambda b: response_logprobs(train_policy, b, T, with_entropy=True), mbs)
                    ref = no_grad_pass(lambda b: response_logprobs(reference, b, T)[0], mbs)
                    old_v = no_grad_pass(lambda b: response_values(train_critic, b), mbs)
                chunks = [[ppo_targets(logp, ref_logp, v, m.batch.mask, whitened[m.rows], ppo) | {"entropy": ent}
                           for m, (logp, ent), ref_logp, v in zip(mb, o_mb, r_mb, v_mb)]
                          for mb, o_mb, r_mb, v_mb in zip(mbs, old, ref, old_v)]
                if ppo.whiten_advantages:
                    whiten_advantages([c for row in chunks for c in row], dp.group)
                stats = Sums()
                for epoch in range(ppo.epochs):
                    for j, mb in enumerate(mbs):
                        # one gradient step on mini-batch j; its loss is the mean over the whole mini-batch
                        n_tok = global_sum(float(sum(m.batch.mask.sum() for m in mb)), dp.group, device)
                        mb_stats = Sums()
                        for m, c in zip(mb, chunks[j]):
                            with autocast_context(device, train.precision):
                                logp, _ = response_logprobs(train_policy, m.batch, T)
                                v = response_values(train_critic, m.batch)
                            loss, terms = ppo_loss(logp, v, c, ppo, M, n_tok)
                            (W * loss).backward()  # NOTE: * W undoes the ranks' gradient averaging
                            mask = c["mask"]
                            mb_stats.add("loss", loss.item())
                            mb_stats.add("policy/loss", terms["policy"].item())
                            mb_stats.add("value/loss", terms["value"].item())
                            n_mask = mask.sum().item()
                            mb_stats.add("policy/clip_fraction", (terms["clipped"] & mask).sum().item(), n_mask)
                            mb_stats.add("policy/approx_kl", ((c["logp"] - logp.detach()) * mask).sum().item(), n_mask)
                            mb_stats.add_max("ratio_deviation", ((terms["ratio"] - 1).abs() * mask).max().item())
                        figures = mb_stats.global_figures(dp.group, device)
                        norm_p = harness.clip_gradients(params_p, optim.grad_clip)
                        norm_c = harness.clip_gradients(params_c, optim.grad_clip)
                        harness.check_finite(job, iteration, figures["loss"], max(norm_p, norm_c))
                        lr = opt_p.param_groups[0]["lr"]
                        for opt, sched in ((opt_p, sched_p), (opt_c, sched_c)):
                            opt.step()
                            sched.step()
                            opt.zero_grad(set_to_none=True)
                        if epoch == 0 and j == 0:  # the gate: ratio 1 and nothing clipped on the first mini-batch
                            stats.add("policy/first_ratio_deviation", figures["ratio_deviation"], 1)
                            stats.add("policy/first_clip_fraction", figures["policy/clip_fraction"], 1)
                        for key in ("loss", "policy/loss", "value/loss", "policy/clip_fraction", "policy/approx_kl"):
                            stats.add(key, figures[key], 1)
                        stats.add_max("grad_norm", norm_p)
            with timer("sync"):
                sync_engine(engine, policy)

            record = stats.means() | {"lr": lr, **_iteration_figures(chunks, gated, samples, recs, answers, ppo.beta,
                                                                     tokenizer.eos_id, dp.group, device, timer)}
            state.counters["answers"] += len(samples) * W
            state.counters["answer_tokens"] += int(record["answer/length"] * len(samples) * W)
            job.log_step(iteration, record, show=("reward", "kl", "oracle/helpfulness"))
            if harness.end_step(job, iteration, train.iterations, state):
                return job.dir
    return finish_policy_run(job, state, policy, tok_path, run.save_model, PLOT_KEYS)


PLOT_KEYS = ("reward", "oracle/helpfulness", "kl", "oracle/violation_rate")  # the rest: metrics.jsonl, TensorBoard


def ppo_targets(old_logp: torch.Tensor, ref_logp: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                score: torch.Tensor, cfg: PPOConfig) -> dict[str, torch.Tensor]:
    """What one batch of answers is trained towards, all (B, T): the per-token KL estimate to the reference,
    the rewards (-beta * KL, the score (B,) on the last token), GAE advantages and returns; beside them the
    rollout's log-probs and values the loss compares with (rl_math.py has each formula)."""
    kl = rl_math.kl_estimate(old_logp, ref_logp, cfg.kl_estimator) * mask
    rewards = rl_math.token_rewards(score, kl, mask, cfg.beta)
    adv, ret = rl_math.gae(rewards, values, mask, cfg.gamma, cfg.lam)
    return {"logp": old_logp, "values": values, "kl": kl, "rewards": rewards, "adv": adv, "ret": ret, "mask": mask}


def whiten_advantages(chunks: list[dict], group) -> None:
    """Whiten the advantages of `chunks` (ppo_targets' dicts) in place over all their answer tokens, on every
    rank of `group` (False: this process alone)."""
    mean, var = rl_math.moments(torch.cat([c["adv"].flatten() for c in chunks]),
                                torch.cat([c["mask"].flatten() for c in chunks]), group=group)
    for c in chunks:
        c["adv"] = (c["adv"] - mean) * torch.rsqrt(var + 1e-8) * c["mask"]


def ppo_loss(logp: torch.Tensor, values: torch.Tensor, target: dict, cfg: PPOConfig, n_sequences: float,
             n_tokens: float) -> tuple[torch.Tensor, dict]:
    """PPO's loss of one micro-batch: the clipped surrogate + value_coef * the (clipped) value loss, each
    averaged as cfg.loss_averaging over the whole mini-batch (its n_sequences answers and n_tokens tokens).
    logp, values (B, T): the current policy's and critic's; target: `ppo_targets`' dict of the same rows.
    Returns (loss, {"policy", "value", "clipped" (B, T), "ratio" (B, T, detached)})."""
    mask = target["mask"]
    pg_tok, clipped, ratio = rl_math.clipped_surrogate(logp, target["logp"], target["adv"], cfg.clip)
    vl_tok = rl_math.value_loss(values, target["values"], target["ret"], cfg.value_clip)
    pg = rl_math.reduce_tokens(pg_tok, mask, cfg.loss_averaging, n_sequences, n_tokens)
    vl = rl_math.reduce_tokens(vl_tok, mask, cfg.loss_averaging, n_sequences, n_tokens)
    return pg + cfg.value_coef * vl, {"policy": pg.detach(), "value": vl.detach(), "clipped": clipped,
                                      "ratio": ratio.detach()}


def _iteration_figures(chunks, gated, samples, records, answers, beta, eos_id, group, device, timer) -> dict:
    """The iteration's figures over every rank: the reward and its parts, KL to the reference, entropy,
    explained variance, the answers' figures (rl_iteration.rollout_sums) and the time per phase."""
    every = [c for row in chunks for c in row]
    cat = {k: torch.cat([c[k].flatten() for c in every]) for k in ("values", "ret", "entropy", "mask")}
    seq_kl = torch.cat([c["kl"].sum(-1) for c in every])
    n = float(len(samples))
    sums = {"reward": (gated["score"].sum().item(), n),
            "reward/total": (sum(c["rewards"].sum().item() for c in every), n),
            "reward/kl_penalty": (beta * seq_kl.sum().item(), n),
            "reward/safety_share": (gated["used_safety"].float().sum().item(), n),
            "reward/helpfulness_rm": (gated["helpfulness"].sum().item(), n),
            "kl": (seq_kl.sum().item(), n),
            "kl/token": (seq_kl.sum().item(), cat["mask"].sum().item()),
            "entropy": (cat["entropy"].sum().item(), cat["mask"].sum().item()),
            **rollout_sums(samples, records, answers, eos_id)}
    if "safety" in gated:
        sums["reward/safety_rm"] = (gated["safety"].sum().item(), n)
    out = global_means(sums, group, device)
    out["value/explained_variance"] = rl_math.explained_variance(cat["values"], cat["ret"], cat["mask"], group).item()
    return out | timer.figures(global_sum(out["answer/length"] * n, group, device))


__all__ = ["CriticConfig", "PPOConfig", "PPO_OPTIM", "critic_source", "init_critic", "ppo", "ppo_loss", "ppo_targets",
           "whiten_advantages"]
