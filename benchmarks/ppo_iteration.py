"""One PPO iteration at TinyLlama-1.1B shapes on one GPU: its time split, and its rollout throughput against the
engine alone and transformers' `generate` at the same batch.

Run on the device machine (one H200), from the repository root:

    PYTHONPATH=src python3 benchmarks/ppo_iteration.py                 # TinyLlama-1.1B shapes, 256 prompts
    PYTHONPATH=src python3 benchmarks/ppo_iteration.py --quick         # tiny shapes on the CPU (smoke test)

What runs, all in this process on one device:
  - `lmforge ppo` itself (align/ppo.py) for --iterations iterations of --prompts prompts of a chat world (its
    rlhf_prompts.jsonl) and answers of at most --max-new-tokens tokens: the policy (fp32 weights, bf16
    autocast), the frozen reference, a critic started from the Helpfulness RM, and the gate of two reward
    models (Helpfulness and Safety, bf16) scoring every answer; rollouts through LLMEngine (a bf16 copy of the
    policy, synced after every update). Weights are random, of TinyLlama-1.1B's shapes (22 layers x 2048, 32
    query / 4 key-value heads, feed-forward 5632, vocabulary 32000: a SentencePiece tokenizer of 32000 pieces
    is trained on the embedded corpus first), so answers rarely end before --max-new-tokens: every iteration
    samples about the same number of tokens. The first iteration is the warm-up (captures, compiles); the
    figures are the means of the others, from the run's metrics.jsonl: time/rollout, time/scoring,
    time/training, time/sync (load_weights into the engine), time/iteration and rollout/tokens_per_s.
  - The engine alone (benchmarks/serving.py's `drive`) on the same prompts, the same batch (every prompt at
    once, at most --prompts sequences decoding together) and the same answer length, over a bf16 copy of the
    policy: made as PPO makes it (`rollout.make_engine`: pre-fill chunks of 512 tokens, a KV pool for the
    batch), and with serving.py's settings (chunks of 4096, the pool of 80% of the free memory); a warm-up
    pass, then the measured one.
  - transformers' `generate` (serving.py's `hf_generate`: random weights of the same shapes, bf16, one static
    batch of all the prompts, greedy with exactly --max-new-tokens tokens).
  - PPO's rollout path alone (`rollout.rollout` on a fresh `make_engine`, PPO's sampling), outside PPO.
  - The engine alone and the rollout path alone warmed up on iteration 1's prompts and measured on iteration 2's
    (as PPO's engine meets each iteration's batch for the first time; the cases above warm up on the very prompts
    they measure).
The ratios: rollout_vs_engine = PPO's rollout tokens/s over the engine's output tokens/s (what the rollout path
costs beyond the engine: per-request bookkeeping, detokenisation), rollout_alone_vs_engine (the same path outside
PPO: what of the gap is the path's, what is PPO's), engine_vs_transformers.

Prints JSON lines; writes $OUT/ppo_iteration.json when $OUT is set.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serving import build_model, drive, free, hf_generate  # noqa: E402

from lmforge import ModelConfig  # noqa: E402

TINYLLAMA = ModelConfig(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, ffn_dim=5632, vocab_size=32000,
                        max_seq_len=2048)
PHASES = ("rollout", "scoring", "training", "sync", "iteration")


def prepare(work: Path, config: ModelConfig, quick: bool, n_prompts: int, device: str) -> dict:
    """The chat world's prompts, a tokenizer of the model's vocabulary, the policy and two reward model folders."""
    from lmforge.align.reward_model import init_reward_model
    from lmforge.align.world.build import build_world
    from lmforge.align.world.records import WorldSizes
    from lmforge.models.checkpoint import save_model
    from lmforge.tokenizer import train_tokenizer

    t = time.perf_counter()
    sizes = WorldSizes(entities=6, corpus_files=4, corpus_arithmetic=200, corpus_lists=100, corpus_counting=100,
                       corpus_lore=2, corpus_stories=20, eval_tasks=5, eval_unsafe=10, eval_lookalikes=10,
                       rlhf_prompts=n_prompts)
    build_world(work / "world", seed=0, sizes=sizes)
    # the world's corpus for the tiny vocabulary; the embedded corpus (large enough) for 32000 pieces
    data = [str(work / "world" / "corpus")] if quick else None
    tok = train_tokenizer(data, out_dir=str(work / "tok"), vocab_size=config.vocab_size)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    policy = build_model(config, device, dtype)
    save_model(policy, work / "policy", tokenizer_path=tok)
    del policy
    for i, kind in enumerate(("helpfulness", "safety")):
        rm = init_reward_model(work / "policy", device=device, dtype=dtype, seed=i + 1)
        save_model(rm, work / f"rm_{kind}", tokenizer_path=tok)
        del rm
    free(device)
    return {"prompts": work / "world" / "rlhf_prompts.jsonl", "policy": work / "policy",
            "rm_helpfulness": work / "rm_helpfulness", "rm_safety": work / "rm_safety",
            "prepare_s": round(time.perf_counter() - t, 1)}


# What PPO's rollouts may run under, to find where their gap to the engine alone comes from (--rollout-variants):
# "as-is" (since 2026-12-02 with Python's garbage collector paused during each rollout: `rl_iteration.collect`);
# "gc-on": the collector left running, as before (PPO's heap of tensors and records makes a full collection
# slow, and the engine's steps allocate many small objects); "empty-cache": the CUDA caching allocator emptied
# before each rollout (the trainer's blocks, of other sizes, released).
ROLLOUT_VARIANTS = ("as-is", "gc-on", "empty-cache")


def rollout_variant(name: str):
    """A replacement for the `collect` PPO calls, running it under variant `name` (ROLLOUT_VARIANTS)."""
    import lmforge.align.rl_iteration as rl_iteration

    def collect(*a, **k):
        if name == "empty-cache":
            torch.cuda.empty_cache()
        if name != "gc-on":
            return rl_iteration.collect(*a, **k)
        with mock.patch.object(rl_iteration, "gc_paused", contextlib.nullcontext):
            return rl_iteration.collect(*a, **k)

    return collect


def run_ppo(paths: dict, work: Path, args, device: str, variant: str = "as-is") -> dict:
    """`lmforge ppo` for args.iterations iterations, its rollouts run under `variant` (ROLLOUT_VARIANTS); the
    means of the iterations after the first."""
    import lmforge.align.ppo as ppo_module
    from lmforge.align.ppo import PPOConfig, ppo
    from lmforge.align.rl_iteration import PromptsConfig, RLTrainConfig
    from lmforge.align.rollout import RolloutConfig
    from lmforge.align.scorers import RewardConfig
    from lmforge.train.config import RunConfig
    from lmforge.train.metrics import read_step_metrics

    run = work / f"ppo-{variant}"
    with mock.patch.object(ppo_module, "collect", rollout_variant(variant)):
        ppo(str(paths["policy"]), prompts=PromptsConfig(files=[str(paths["prompts"])], per_iteration=args.prompts),
            rollout=RolloutConfig(temperature=1.0, max_new_tokens=args.max_new_tokens, batch_size=args.prompts),
            ppo=PPOConfig(minibatch_size=args.minibatch),
            reward=RewardConfig(helpfulness=str(paths["rm_helpfulness"]), safety=str(paths["rm_safety"])),
            train=RLTrainConfig(iterations=args.iterations, micro_batch_size=args.micro_batch, device=device),
            run=RunConfig(dir=str(run), checkpoint_every=0, save_model=False, tensorboard=False, progress=False,
                          eval_every=0))
    records = read_step_metrics(run / "metrics.jsonl")
    measured = records[1:] or records
    keys = [f"time/{p}" for p in PHASES] + ["rollout/tokens_per_s", "answer/length", "kl", "reward"]
    out = {k: round(statistics.mean(r[k] for r in measured), 4) for k in keys}
    out["warmup_iteration_s"] = round(records[0]["time/iteration"], 3)
    out["share"] = {p: round(out[f"time/{p}"] / out["time/iteration"], 3) for p in PHASES[:-1]}
    return out


def iteration_prompts(paths: dict, args, k: int = 1) -> list[list[int]]:
    """The token ids of iteration k + 1's prompts (default: iteration 2's, a measured one), as PPO encodes them."""
    from lmforge.align.prompts import PromptSchedule
    from lmforge.align.rl_iteration import PromptsConfig, read_prompts
    from lmforge.tokenizer import Tokenizer

    tok = Tokenizer(paths["policy"] / "tokenizer.model")
    records, ids = read_prompts(PromptsConfig(files=[str(paths["prompts"])], per_iteration=args.prompts), tok,
                                args.max_seq_len, args.max_new_tokens)
    return [ids[i] for i in PromptSchedule(len(records), args.prompts, 0).iteration(k)]


def run_engine(paths: dict, prompts: list[list[int]], args, device: str, serving_settings: bool,
               warm_prompts: list[list[int]] | None = None) -> dict:
    """The engine alone at PPO's batch, every answer exactly max_new_tokens long: made as PPO makes it
    (`rollout.make_engine`), or with serving.py's settings (pre-fill chunks of 4096 tokens, the pool of 80% of
    the free memory)."""
    from lmforge.align.rollout import make_engine
    from lmforge.infer.engine import LLMEngine
    from lmforge.models.checkpoint import load_model
    from lmforge.tokenizer import Tokenizer

    eos = Tokenizer(paths["policy"] / "tokenizer.model").eos_id
    if serving_settings:
        dtype = torch.float32 if device == "cpu" else torch.bfloat16
        model = load_model(paths["policy"], device=device, dtype=dtype).eval()
        engine = LLMEngine(model, eos_id=eos, block_size=16, max_num_batched_tokens=4096, max_num_seqs=args.prompts,
                           max_waiting=max(1024, len(prompts)))
    else:
        policy = load_model(paths["policy"], device=device, dtype=torch.float32)
        engine = make_engine(policy, eos_id=eos, batch_size=args.prompts, max_prompts=len(prompts))
        del policy
    outs = [args.max_new_tokens] * len(prompts)
    drive(engine, warm_prompts or prompts, outs, None)  # warm-up (on other prompts: as PPO's engine meets each batch)
    res = drive(engine, prompts, outs, None)
    del engine
    free(device)
    return res


def run_rollout_alone(paths: dict, prompts: list[list[int]], args, device: str,
                      warm_prompts: list[list[int]] | None = None) -> dict:
    """PPO's own rollout path (`rollout.rollout` over `make_engine`, PPO's sampling settings: temperature 1,
    answers ending at </s>) on a fresh engine outside PPO: the part of the gap to the engine alone that is the
    rollout path's, against the part that is running inside PPO (the trainer's memory, its warm caches)."""
    from lmforge.align.rollout import RolloutConfig, make_engine, rollout
    from lmforge.models.checkpoint import load_model
    from lmforge.tokenizer import Tokenizer

    eos = Tokenizer(paths["policy"] / "tokenizer.model").eos_id
    policy = load_model(paths["policy"], device=device, dtype=torch.float32)
    engine = make_engine(policy, eos_id=eos, batch_size=args.prompts, max_prompts=len(prompts))
    del policy
    params = RolloutConfig(temperature=1.0, max_new_tokens=args.max_new_tokens, batch_size=args.prompts).sampling(0)
    seeds = [1000 * b for b in range(len(prompts))]
    rollout(engine, warm_prompts or prompts, params, seeds=seeds)  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    samples = rollout(engine, prompts, params, seeds=seeds)
    if device == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t
    tokens = sum(len(s.response_ids) for s in samples)
    del engine
    free(device)
    return {"wall_s": round(wall, 3), "tokens": tokens, "output_tok_per_s": round(tokens / wall, 1)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny shapes on the CPU")
    ap.add_argument("--prompts", type=int, default=256, help="prompts per iteration (= the rollout batch)")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--minibatch", type=int, default=64, help="answers per gradient step")
    ap.add_argument("--micro-batch", type=int, default=8, help="rows per forward")
    ap.add_argument("--iterations", type=int, default=3, help="PPO iterations (the first is the warm-up)")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    ap.add_argument("--work", type=Path, default=None, help="folder for the world, tokenizer and models (temp)")
    ap.add_argument("--rollout-variants", default="as-is",
                    help=f"comma-separated PPO runs, each its rollouts under one of {', '.join(ROLLOUT_VARIANTS)}")
    args = ap.parse_args(argv)
    variants = args.rollout_variants.split(",")
    if variants[0] != "as-is" or not set(variants) <= set(ROLLOUT_VARIANTS):
        ap.error(f"--rollout-variants: as-is first, then any of {', '.join(ROLLOUT_VARIANTS[1:])}")
    device = "cpu" if args.quick or not torch.cuda.is_available() else "cuda"
    config = ModelConfig.from_name("tiny", vocab_size=600, max_seq_len=512) if args.quick else TINYLLAMA
    if args.quick:
        args.prompts, args.max_new_tokens, args.minibatch, args.micro_batch, args.iterations = 8, 16, 4, 4, 2
        torch.set_num_threads(1)
    args.max_seq_len = config.max_seq_len
    result: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
                    "shapes": "tiny" if args.quick else "TinyLlama-1.1B", "prompts": args.prompts,
                    "max_new_tokens": args.max_new_tokens, "minibatch": args.minibatch, "iterations": args.iterations}
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        paths = prepare(work, config, args.quick, max(64, args.prompts * args.iterations), device)
        result["prepare_s"] = paths["prepare_s"]
        for variant in args.rollout_variants.split(","):
            key = "ppo" if variant == "as-is" else f"ppo-{variant}"
            t = time.perf_counter()
            result[key] = run_ppo(paths, work, args, device, variant)
            result[key]["wall_s"] = round(time.perf_counter() - t, 1)
            if device == "cuda":
                result[key]["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
            gc.collect()
            free(device)
            print(json.dumps({"case": key, **result[key]}), flush=True)
        prompts = iteration_prompts(paths, args)
        result["engine"] = run_engine(paths, prompts, args, device, serving_settings=False)
        print(json.dumps({"case": "engine", **result["engine"]}), flush=True)
        result["rollout_alone"] = run_rollout_alone(paths, prompts, args, device)
        print(json.dumps({"case": "rollout_alone", **result["rollout_alone"]}), flush=True)
        # warmed up on iteration 1's prompts, measured on iteration 2's: PPO's engine meets every batch first
        warm = iteration_prompts(paths, args, 0)
        result["engine_warmed_elsewhere"] = run_engine(paths, prompts, args, device, False, warm)
        print(json.dumps({"case": "engine_warmed_elsewhere", **result["engine_warmed_elsewhere"]}), flush=True)
        result["rollout_alone_warmed_elsewhere"] = run_rollout_alone(paths, prompts, args, device, warm)
        print(json.dumps({"case": "rollout_alone_warmed_elsewhere", **result["rollout_alone_warmed_elsewhere"]}),
              flush=True)
        result["engine_serving_settings"] = run_engine(paths, prompts, args, device, serving_settings=True)
        print(json.dumps({"case": "engine_serving_settings", **result["engine_serving_settings"]}), flush=True)
        outs = [args.max_new_tokens] * len(prompts)
        if not args.no_hf:
            dtype = torch.float32 if device == "cpu" else torch.bfloat16
            result["transformers"] = hf_generate(config, device, dtype, prompts, outs, len(prompts))
            print(json.dumps({"case": "transformers", **result["transformers"]}), flush=True)
    engine = result["engine"]["output_tok_per_s"]
    for key in [k for k in result if k.startswith("ppo-")]:
        result[f"rollout_vs_engine_{key[4:]}"] = round(result[key]["rollout/tokens_per_s"] / engine, 3)
    rollout = result["ppo"]["rollout/tokens_per_s"]
    result["rollout_vs_engine"] = round(rollout / engine, 3)
    result["rollout_alone_vs_engine"] = round(result["rollout_alone"]["output_tok_per_s"] / engine, 3)
    for case in ("engine_warmed_elsewhere", "rollout_alone_warmed_elsewhere"):
        result[f"{case}_vs_engine"] = round(result[case]["output_tok_per_s"] / engine, 3)
    serving = result["engine_serving_settings"]["output_tok_per_s"]
    result["rollout_vs_engine_serving_settings"] = round(rollout / serving, 3)
    if "transformers" in result:
        result["engine_vs_transformers"] = round(engine / result["transformers"]["output_tok_per_s"], 2)
        result["rollout_vs_transformers"] = round(rollout / result["transformers"]["output_tok_per_s"], 2)
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, dict)}), flush=True)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "ppo_iteration.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
