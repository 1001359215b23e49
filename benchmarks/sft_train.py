"""SFT training throughput: `lmforge sft`'s step on packed dialogues against `lmforge pretrain`'s step at the same
shapes, lmforge's own padded SFT, and TRL's SFTTrainer on the same dialogues, in one command.

Run on the device machine (one H200), from the repository root:

    PYTHONPATH=src python3 benchmarks/sft_train.py                        # TinyLlama-1.1B shapes, 8 rows of 2048
    PYTHONPATH=src python3 benchmarks/sft_train.py --systems sft,pretrain
    PYTHONPATH=src python3 benchmarks/sft_train.py --quick                # tiny shapes, CPU smoke test

The setting (issue 14's goal): TinyLlama-1.1B shapes (dim 2048, 22 layers, 32 heads, 4 kv heads, ffn 5632, vocab
32000) with random weights; `--examples` dialogues of random tokens whose lengths are drawn uniformly from
[--min_len, --seq_len] (seeded), the first 30% of each the prompt (no loss) and the rest the answer; float32
master weights under bf16 autocast on every side; AdamW (fused, lr 2e-5, betas 0.9 / 0.95, weight decay 0.1),
gradient clipping at 1.0. Each forward takes `micro_batch` rows:

    sft         lmforge sft's step: the dialogues packed into rows of seq_len (`align.packing.pack`, best-fit
                decreasing; rotary positions restart per dialogue, attention stays inside it: FlexAttention's
                document mask), `train.lm_step.next_token_backward` with document masking, clip, AdamW;
                torch.compile per block (`parallel.parallelize`)
    sft-padded  the same step on one dialogue a row, padded to the longest of its micro-batch (rounded up to a
                multiple of 128, so that compiled shapes stay few): separates the gain of packing from the
                gain of the implementation
    pretrain    lmforge pretrain's step: full rows of seq_len tokens, no document mask, the same compile
    trl         TRL's SFTTrainer (version pinned below) on the pre-tokenized dialogues (`input_ids`,
                `completion_mask`, `completion_only_loss`), `packing=False`, `padding_free=False` (batches
                padded to their longest dialogue), LlamaForCausalLM with sdpa attention, `bf16=True`

tokens/s counts the real (not padding) positions a step trains on: for pretrain every position; for sft the
packed dialogues' positions (packing efficiency is printed); for the padded systems the dialogues' own
positions, `micro_batch` times the mean dialogue length. Every system runs in a fresh subprocess, so each peak
memory is its own. Warm-up steps (compile, allocator growth) are not timed. Prints one table and the ratios
sft / pretrain, sft / trl and sft-padded / trl; writes JSON to $OUT/sft_train.json if OUT is set.

Wheels TRL needs beyond torch 2.11 and transformers 5.17 (Python 3.12, manylinux x86_64): those of
benchmarks/rm_train.py (trl 1.16.0, datasets 5.2.0, dill 0.4.1, multiprocess 0.70.19; the image has the rest).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch
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
from rm_train import TINYLLAMA
from train_throughput import hf_model

from lmforge import ModelConfig

LR = 2e-5
EOS = 2
PROMPT_FRACTION = 0.3
PAD_MULTIPLE = 128


def dialogues(n: int, min_len: int, max_len: int, vocab: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """n (ids, learn) pairs: random ids in [3, V) ending with </s>, lengths uniform in [min_len, max_len + 1]
    (max_len + 1 tokens give max_len positions), learn False on the first 30% (the prompt)."""
    rng = np.random.default_rng(0)
    out = []
    for length in rng.integers(min_len, max_len + 2, size=n):
        ids = rng.integers(3, vocab, size=length)
        ids[-1] = EOS
        out.append((ids, np.arange(length) >= int(PROMPT_FRACTION * length)))
    return out


def packed_batches(data, seq_len: int, micro_batch: int):
    """Batches of `micro_batch` packed rows (as `lmforge sft` builds them), and the packing efficiency."""
    from lmforge.align.packing import pack, row_tensors
    from lmforge.data.loader import Batch

    rows, stats = pack([len(ids) for ids, _ in data], seq_len)
    tensors = [row_tensors([data[i] for i in row], seq_len) for row in rows]
    real = [sum(len(data[i][0]) - 1 for i in row) for row in rows]
    batches = []
    for start in range(0, len(tensors) - micro_batch + 1, micro_batch):
        cols = zip(*tensors[start : start + micro_batch])
        batches.append((Batch(*(torch.from_numpy(np.stack(c)) for c in cols)), sum(real[start : start + micro_batch])))
    return batches, stats.efficiency(seq_len)


def padded_batches(data, micro_batch: int):
    """Batches of `micro_batch` dialogues, one a row, padded at the end to the longest (rounded up to
    PAD_MULTIPLE); padding is never learned and, under the causal mask, never attended to by real positions."""
    from lmforge.align.packing import PAD_ID
    from lmforge.data.loader import Batch

    batches = []
    for start in range(0, len(data) - micro_batch + 1, micro_batch):
        chunk = data[start : start + micro_batch]
        T = -(-max(len(ids) - 1 for ids, _ in chunk) // PAD_MULTIPLE) * PAD_MULTIPLE
        inputs = torch.full((micro_batch, T), PAD_ID)
        targets, mask = inputs.clone(), torch.zeros(micro_batch, T, dtype=torch.bool)
        for r, (ids, learn) in enumerate(chunk):
            n = len(ids) - 1
            inputs[r, :n], targets[r, :n] = torch.from_numpy(ids[:-1]), torch.from_numpy(ids[1:])
            mask[r, :n] = torch.from_numpy(learn[1:])
        batches.append((Batch(inputs, targets, mask, torch.zeros(micro_batch, T, dtype=torch.int32)),
                        sum(len(ids) - 1 for ids, _ in chunk)))
    return batches


def pretrain_batches(data, seq_len: int, micro_batch: int):
    """Batches of `micro_batch` full rows: the dialogues' tokens laid end to end and cut into rows (a stream)."""
    from lmforge.data.loader import Batch

    stream = torch.from_numpy(np.concatenate([ids for ids, _ in data]))
    rows = stream[: len(stream) // (seq_len + 1) * (seq_len + 1)].view(-1, seq_len + 1)
    batches = []
    for start in range(0, len(rows) - micro_batch + 1, micro_batch):
        r = rows[start : start + micro_batch]
        batches.append((Batch(r[:, :-1], r[:, 1:], torch.ones_like(r[:, 1:], dtype=torch.bool),
                              torch.zeros_like(r[:, 1:], dtype=torch.int32)), micro_batch * seq_len))
    return batches


def run_lmforge(cfg: ModelConfig, args, device: torch.device) -> dict:
    """`sft`, `sft-padded` or `pretrain` (module docstring): the real step function of the two verbs."""
    from lmforge import Transformer
    from lmforge.parallel import DataParallelRank, ParallelConfig, parallelize
    from lmforge.train.lm_step import next_token_backward
    from lmforge.train.optim import OptimConfig, build_optimizer

    with torch.device(device):
        model = Transformer(cfg)
    net = parallelize(model, ParallelConfig(mode="none", compile=bool(args.compile)), device)
    opt = build_optimizer(model, OptimConfig(lr=LR, warmup_steps=0, fused=device.type == "cuda"))
    params = list(model.parameters())
    data = dialogues(args.examples, args.min_len, args.seq_len, cfg.vocab_size)
    extra = {}
    if args.worker == "sft":
        batches, extra["packing_efficiency"] = packed_batches(data, args.seq_len, args.micro_batch)
    elif args.worker == "sft-padded":
        batches = padded_batches(data, args.micro_batch)
    else:
        batches = pretrain_batches(data, args.seq_len, args.micro_batch)
    dp = DataParallelRank()

    def step(i: int) -> tuple[float, int]:
        batch, real = batches[i % len(batches)]
        loss = next_token_backward(net, model, [batch], device=device, dp=dp, precision="auto", loss_chunk=4096,
                                   document_masking=args.worker == "sft").loss
        update(params, opt)
        return loss, real

    warmup = args.warmup
    if args.worker == "sft-padded":  # one step at each padded length first: compiling is not what is timed
        seen, order = set(), []
        for i, (b, _) in enumerate(batches):
            if b.inputs.shape[1] not in seen:
                seen.add(b.inputs.shape[1])
                order.append(i)
        for i in order:
            step(i)
    times, positions, loss = [], 0, float("nan")
    for i in range(warmup + args.steps):
        _sync(device)
        t0 = time.perf_counter()
        loss, real = step(i)  # the loss is read on the host: each step ends synchronised, as in the verbs' loops
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            positions += real
    if args.profile and device.type == "cuda":
        profile_steps(step, warmup + args.steps, args.worker)
    return {"system": f"lmforge-{args.worker}", "step_s": sum(times) / len(times),
            "tokens_per_s": positions / sum(times), "loss": loss, **extra}


def profile_steps(step, start: int, worker: str, steps: int = 2) -> None:
    """A kernel table of `steps` more steps, into $OUT/profile_<worker>.txt (the worker's stdout carries only its
    row): where sft's step spends the time pretrain's does not (the document-masked attention, say)."""
    import os
    from pathlib import Path

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(start, start + steps):
            step(i)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=80)
    out = Path(os.environ.get("OUT", ".")) / f"profile_{worker}.txt"
    out.write_text(f"lmforge-{worker}, {steps} steps\n{table}\n")


def run_trl(cfg: ModelConfig, args, device: torch.device) -> dict:
    import datasets
    import trl

    with torch.device(device):
        model = hf_model(cfg, "sdpa")
    data = dialogues(args.examples, args.min_len, args.seq_len, cfg.vocab_size)
    dataset = datasets.Dataset.from_dict({"input_ids": [ids.tolist() for ids, _ in data],
                                          "completion_mask": [learn.astype(int).tolist() for _, learn in data]})
    timer = step_timer(device, args.warmup)
    with tempfile.TemporaryDirectory() as out:
        config = trl.SFTConfig(**trl_arguments(args, device, out, LR, weight_decay=0.1, adam_beta2=0.95),
                               gradient_checkpointing=bool(args.trl_checkpointing),  # TRL's default: True
                               max_length=args.seq_len + 1, packing=False, padding_free=False,
                               completion_only_loss=True)
        trainer = trl.SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=ids_tokenizer(),
                                 callbacks=[timer])
        result = trainer.train()
    mean_positions = float(np.mean([len(ids) - 1 for ids, _ in data]))
    step_s = sum(timer.times) / len(timer.times)
    return {"system": f"trl-{trl.__version__}", "step_s": step_s,
            "tokens_per_s": args.micro_batch * mean_positions / step_s, "loss": result.training_loss}


def worker(args) -> dict:
    """One system's measurement, in this process."""
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    cfg = ModelConfig.from_name("tiny", max_seq_len=256) if args.quick else TINYLLAMA
    if args.quick:  # enough short dialogues for a few micro-batches of every system
        args.min_len, args.examples = 8, 64
    torch.manual_seed(0)
    row = {"micro_batch": args.micro_batch, "seq_len": args.seq_len}
    try:
        row |= (run_trl if args.worker == "trl" else run_lmforge)(cfg, args, device)
    except torch.OutOfMemoryError:
        return row | {"system": args.worker, "error": "out of memory"}
    row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_grid_arguments(ap, ["sft", "sft-padded", "pretrain", "trl"], micro_batches="8", seq_len=2048)
    ap.add_argument("--min_len", type=int, default=128, help="shortest dialogue, in tokens")
    ap.set_defaults(examples=512)
    ap.add_argument("--trl_checkpointing", type=int, default=0, help="TRL: gradient checkpointing (its default: 1)")
    ap.add_argument("--profile", type=int, default=0, help="lmforge systems: print a kernel table of 2 more steps")
    args = ap.parse_args()
    if as_worker(args, worker):
        return
    rows = run_grid(__file__, args, ["--trl_checkpointing", str(args.trl_checkpointing), "--min_len",
                                      str(args.min_len), "--profile", str(args.profile)])
    print(f"\n{'system':20s} {'rows':>4s} {'tok/s':>10s} {'step s':>8s} {'peak GiB':>9s} {'loss':>7s}")
    for r in rows:
        figures = r.get("error", "")[:300] or (f"{r['tokens_per_s']:10,.0f} {r['step_s']:8.3f} {r['peak_gib']:9.1f} "
                                               f"{r['loss']:7.3f}")
        print(f"{r['system']:20s} {r['micro_batch']:4d} {figures}")
    ok = {r["system"].removeprefix("lmforge-") if r["system"].startswith("lmforge") else "trl": r
          for r in rows if "error" not in r}
    if "sft" in ok:
        print(f"packing efficiency {ok['sft']['packing_efficiency']:.1%}")
    for a, b in (("sft", "pretrain"), ("sft", "trl"), ("sft-padded", "trl"), ("sft", "sft-padded")):
        if a in ok and b in ok:
            print(f"{a} / {b}: {ok[a]['tokens_per_s'] / ok[b]['tokens_per_s']:.2f}x")
    write_rows("sft_train.json", rows)


if __name__ == "__main__":
    main()
