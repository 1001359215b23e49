"""Arguments and readers shared by the RL tests (importable as `rl_helpers`)."""

from lmforge.train.metrics import read_step_metrics

# What every RL record must carry (the list), beyond PPO's and GRPO's own keys; the oracle's violation
# and false-refusal rates appear where the iteration's prompts hold unsafe requests / look-alikes.
COMMON_KEYS = ("reward", "kl", "entropy", "policy/clip_fraction", "answer/length", "answer/ended", "time/rollout",
               "time/scoring", "time/training", "time/sync", "time/iteration", "rollout/tokens_per_s",
               "oracle/helpfulness", "oracle/safety", "loss", "grad_norm",
               "policy/first_ratio_deviation", "policy/first_clip_fraction")


def common_args(verb, rl_world, run, *extra):
    """A few iterations of 8 prompts on the tiny model: answers of at most 8 tokens, lr 1e-3, fp32 on the CPU."""
    return [verb, str(rl_world["model"]), "--prompts.files", f"[{rl_world['prompts']}]", "--prompts.per_iteration",
            "8", "--rollout.max_new_tokens", "8", "--rollout.batch_size", "16", "--train.micro_batch_size", "2",
            "--optim.lr", "1e-3", "--run.dir", str(run), "--run.progress", "false", "--train.device", "cpu",
            "--train.threads", "1", "--run.checkpoint_every", "1", *extra]


def records(run):
    return read_step_metrics(run / "metrics.jsonl")


def curve(run, keys=("reward", "loss")):
    """The pinned figures of a run: the values of `keys` of iteration 1, then of iteration 2, ..."""
    return [r[k] for r in records(run) for k in keys]
