"""Reward-model training throughput: `lmforge rm train`'s step against `lmforge pretrain`'s at the same shapes and
against TRL's RewardTrainer on the same pairs, in one command.

Run on the device machine (one H200), from the repository root:

    PYTHONPATH=src python3 benchmarks/rm_train.py                         # TinyLlama-1.1B shapes, 8 pairs a forward
    PYTHONPATH=src python3 benchmarks/rm_train.py --micro_batches 4,8 --systems rm,pretrain
    PYTHONPATH=src python3 benchmarks/rm_train.py --quick                 # tiny shapes, CPU smoke test

The setting (issue 17's goal): TinyLlama-1.1B shapes (dim 2048, 22 layers, 32 heads, 4 kv heads, ffn 5632, vocab
32000) with random weights; pairs of two sequences of `--seq_len` (1024) random tokens, each ending with </s>;
float32 master weights under bf16 autocast on every side; AdamW (fused, lr 1e-5, betas 0.9 / 0.95, weight decay
0.1), gradient clipping at 1.0. Each forward takes `micro_batch` pairs, 2 * micro_batch rows of seq_len tokens,
so tokens/s compares the same work:

    rm        lmforge rm train's step: `align.rm.ranking_backward` on a `PairBatch` (the chosen and the rejected
              rows in one forward, rewards read at the last token), clip, AdamW; torch.compile per block
              (`parallel.parallelize`)
    pretrain  lmforge pretrain's step: `train.lm_step.next_token_backward` on 2 * micro_batch rows (the fused
              linear cross-entropy), clip, AdamW; the same compile
    trl       TRL's RewardTrainer (version pinned below) on a pre-tokenized dataset (`chosen_ids`, `rejected_ids`),
              LlamaForSequenceClassification with sdpa attention, padded batches (here all of one length), bf16
              autocast (`bf16=True`), pad token <unk> (not </s>, where the score is read)

Every (system, micro-batch) runs in a fresh subprocess, so each peak memory is its own. Warm-up steps (compile,
allocator growth) are not timed. Prints one table and the ratios rm / pretrain and rm / TRL; writes JSON to
$OUT/rm_train.json if OUT is set.

Wheels TRL needs beyond torch 2.11 and transformers 5.17 (Python 3.12, manylinux x86_64), the same set as
benchmarks/lora_sft.py's: trl 1.16.0, accelerate 1.15.0, datasets 5.2.0, pyarrow 26.0.1, pandas 3.1.1, dill 0.4.1,
multiprocess 0.70.19, xxhash 4.1.0, psutil 7.2.2, python-dateutil 4.0.0, tzdata 2026.6; and huggingface_hub 1.33.0
where the installed one is older than 1.31 (peft is not needed here).
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time

import torch

# the TRL-side helpers and the process-per-measurement driver of the LoRA SFT benchmark
from lora_sft import (
    _sync,
    add_grid_arguments,
    as_worker,
    ids_tokenizer,
    run_grid,
    step_timer,
    trl_arguments,
    update,
    write_rows,
)

from lmforge import ModelConfig

LR = 1e-5
EOS = 2
TINYLLAMA = ModelConfig(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, ffn_dim=5632, vocab_size=32000,
                        max_seq_len=2048)


def pair_ids(n: int, T: int, vocab: int) -> torch.Tensor:
    """(n, 2, T) random token ids in [3, V), each sequence ending with </s>: n pairs (chosen, rejected)."""
    ids = torch.randint(3, vocab, (n, 2, T), generator=torch.Generator().manual_seed(0))
    ids[..., -1] = EOS
    return ids


def _optimizer(model, device: torch.device):
    from lmforge.train.optim import OptimConfig, build_optimizer

    return build_optimizer(model, OptimConfig(lr=LR, warmup_steps=0, fused=device.type == "cuda"))


def run_lmforge(cfg: ModelConfig, args, device: torch.device) -> dict:
    """`rm` or `pretrain` (module docstring): the real step functions of the two verbs."""
    from lmforge import Transformer
    from lmforge.align.preference_data import PairBatch
    from lmforge.align.rm import ranking_backward
    from lmforge.data.loader import Batch
    from lmforge.parallel import DataParallelRank, ParallelConfig, parallelize
    from lmforge.train.lm_step import next_token_backward

    reward = args.worker == "rm"
    with torch.device(device):
        model = Transformer(dataclasses.replace(cfg, head="reward" if reward else "lm"))
    net = parallelize(model, ParallelConfig(mode="none", compile=bool(args.compile)), device)
    opt = _optimizer(model, device)
    params = list(model.parameters())
    ids = pair_ids(args.examples, args.seq_len, cfg.vocab_size)
    m, n = args.micro_batch, args.examples // args.micro_batch
    dp = DataParallelRank()

    def step(i: int) -> float:
        pairs = ids[(i % n) * m : (i % n + 1) * m]  # (m, 2, T)
        rows = torch.cat([pairs[:, 0], pairs[:, 1]]).to(device)  # (2m, T): the chosen rows, then the rejected
        if reward:
            lengths = torch.full((2 * m,), args.seq_len, device=device)
            batch = PairBatch(rows, lengths, torch.ones_like(rows, dtype=torch.bool),
                              torch.zeros(m, device=device), [None] * m)
            loss = ranking_backward(net, [batch], device=device, dp=dp, precision="auto", pairs=m).loss
        else:
            batch = Batch(rows[:, :-1], rows[:, 1:], torch.ones_like(rows[:, 1:], dtype=torch.bool),
                          torch.zeros_like(rows[:, 1:], dtype=torch.int32))
            loss = next_token_backward(net, model, [batch], device=device, dp=dp, precision="auto", loss_chunk=4096,
                                       document_masking=False).loss
        update(params, opt)
        return loss

    times, loss = [], float("nan")
    for i in range(args.warmup + args.steps):
        _sync(device)
        t0 = time.perf_counter()
        loss = step(i)  # the loss is read on the host: each step ends synchronised, as in the verbs' loops
        _sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    return {"system": f"lmforge-{args.worker}", "step_s": sum(times) / len(times), "loss": loss}


def run_trl(cfg: ModelConfig, args, device: torch.device) -> dict:
    import datasets
    import transformers as tf
    import trl

    with torch.device(device):
        model = tf.LlamaForSequenceClassification(tf.LlamaConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
            num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
            max_position_embeddings=cfg.max_seq_len, num_labels=1, pad_token_id=0, attn_implementation="sdpa"))
    ids = pair_ids(args.examples, args.seq_len, cfg.vocab_size)
    dataset = datasets.Dataset.from_dict({"chosen_ids": ids[:, 0].tolist(), "rejected_ids": ids[:, 1].tolist()})
    timer = step_timer(device, args.warmup)
    with tempfile.TemporaryDirectory() as out:
        config = trl.RewardConfig(**trl_arguments(args, device, out, LR, weight_decay=0.1, adam_beta2=0.95),
                                  gradient_checkpointing=bool(args.trl_checkpointing),  # TRL's default: True
                                  max_length=args.seq_len)
        trainer = trl.RewardTrainer(model=model, args=config, train_dataset=dataset,
                                    processing_class=ids_tokenizer(pad_token="<unk>"), callbacks=[timer])
        result = trainer.train()
    return {"system": f"trl-{trl.__version__}", "step_s": sum(timer.times) / len(timer.times),
            "loss": result.training_loss}


def worker(args) -> dict:
    """One (system, micro-batch) measurement, in this process."""
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    cfg = ModelConfig.from_name("tiny", max_seq_len=256) if args.quick else TINYLLAMA
    torch.manual_seed(0)
    row = {"micro_batch": args.micro_batch, "seq_len": args.seq_len}
    try:
        row |= (run_trl if args.worker == "trl" else run_lmforge)(cfg, args, device)
    except torch.OutOfMemoryError:
        return row | {"system": args.worker, "error": "out of memory"}
    row["tokens_per_s"] = 2 * args.micro_batch * args.seq_len / row["step_s"]
    row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_grid_arguments(ap, ["rm", "pretrain", "trl"], micro_batches="8", seq_len=1024)  # pairs; tokens per answer
    ap.add_argument("--trl_checkpointing", type=int, default=0, help="TRL: gradient checkpointing (its default: 1)")
    args = ap.parse_args()
    if as_worker(args, worker):
        return
    rows = run_grid(__file__, args, ["--trl_checkpointing", str(args.trl_checkpointing)])
    print(f"\n{'system':18s} {'pairs':>5s} {'tok/s':>10s} {'step s':>8s} {'peak GiB':>9s} {'loss':>7s}")
    for r in rows:
        figures = r.get("error", "")[:300] or (f"{r['tokens_per_s']:10,.0f} {r['step_s']:8.3f} {r['peak_gib']:9.1f} "
                                               f"{r['loss']:7.3f}")
        print(f"{r['system']:18s} {r['micro_batch']:5d} {figures}")
    for mb in {r["micro_batch"] for r in rows}:
        ok = {r["system"].split("-")[1] if r["system"].startswith("lmforge") else "trl": r["tokens_per_s"]
              for r in rows if "error" not in r and r["micro_batch"] == mb}
        if "rm" in ok:
            ratios = [f"rm / {other} {ok['rm'] / ok[other]:.2f}x" for other in ("pretrain", "trl") if other in ok]
            print(f"{mb} pairs a forward: " + ", ".join(ratios))
    write_rows("rm_train.json", rows)


if __name__ == "__main__":
    main()
