"""LoRA SFT throughput and peak memory: lmforge against TRL's SFTTrainer + peft, same shapes and same data.

Run on the device machine (one H200), from the repository root:

    PYTHONPATH=src python3 benchmarks/lora_sft.py                           # Llama-2-7B shapes, micro-batch 2
    PYTHONPATH=src python3 benchmarks/lora_sft.py --micro_batches 2,4 --systems lmforge
    PYTHONPATH=src python3 benchmarks/lora_sft.py --quick                   # tiny shapes, CPU smoke test

The setting (issue 21's goal): Llama-2-7B shapes with random weights, a frozen bf16 base, float32 adapters of
rank 16 (alpha 32, no dropout) on all seven projections (q k v o gate up down), sequence 4096, AdamW (fused,
lr 1e-4, constant, no weight decay) on the adapters only, gradient clipping at 1.0, bf16 autocast.

Data: `--examples` SFT examples of random token ids, each exactly `--seq_len` long, the first 10% the prompt
(no loss) and the rest the completion. Both systems forward `micro_batch x seq_len` tokens per step, so
tokens/s compares the same work. TRL (version pinned below) trains a pre-tokenized dataset with a
`completion_mask` (`completion_only_loss`), `packing=False`, `padding_free=False` (batches padded to their
longest example, here all of one length), sdpa attention, as its users run it. lmforge runs its model with
`lmforge.lora.apply_lora`, per-block torch.compile (`lmforge.parallel.parallelize`) and the fused linear
cross-entropy of `lmforge.train.linear_ce`.

The lmforge side runs `lmforge sft`'s step: `train.lm_step.next_token_backward` on one micro-batch (one example a
row, so no document mask), clipping of the trainable parameters, AdamW on the adapters.

Every (system, micro-batch) runs in a fresh subprocess, so each peak memory is its own. Warm-up steps (compile,
allocator growth) are not timed. Prints one table; writes JSON to $OUT/lora_sft.json if OUT is set.

Wheels both sides need beyond torch 2.11 and transformers 5.17 (Python 3.12, manylinux x86_64; resolved with
pip from trl 1.16.0 + peft 0.21.2 on top of those two): trl 1.16.0, peft 0.21.2, accelerate 1.15.0, datasets
5.2.0, pyarrow 26.0.1, pandas 3.1.1, dill 0.4.1, multiprocess 0.70.19, xxhash 4.1.0, psutil 7.2.2,
python-dateutil 4.0.0, tzdata 2026.6; and huggingface_hub 1.33.0 where the installed one is older than 1.31
(datasets 5.2 needs >= 1.31). lmforge's side needs peft and accelerate of these.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
from train_throughput import (
    hf_model,  # the same Hugging Face model for the same ModelConfig
)

from lmforge import ModelConfig

RANK, ALPHA = 16, 32.0
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPT_FRACTION = 0.1
LR = 1e-4


def sft_data(n: int, T: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (n, T) int64, completion (n, T) bool): random tokens, the first 10% of each example the prompt."""
    ids = torch.randint(3, vocab, (n, T), generator=torch.Generator().manual_seed(0))
    completion = torch.arange(T).expand(n, T) >= int(PROMPT_FRACTION * T)
    return ids, completion


def next_token_targets(ids: torch.Tensor, completion: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets and loss mask for inputs `ids` (B, T): position t predicts ids[t + 1] where that is a completion
    token; the last position has no target. This is what Hugging Face's shifted `labels` train."""
    targets = ids.roll(-1, dims=1)
    mask = completion.roll(-1, dims=1)
    mask[:, -1] = False
    return targets, mask


def _sft_step(model, device: torch.device, compile: bool, checkpointing: str):
    """One LoRA SFT optimizer step on one micro-batch: `lmforge sft`'s step function on the adapted model."""
    from lmforge.data.loader import Batch
    from lmforge.lora import ALL_TARGETS, LoraConfig, apply_lora
    from lmforge.parallel import DataParallelRank, ParallelConfig, parallelize
    from lmforge.train.lm_step import next_token_backward, trainable

    apply_lora(model, LoraConfig(rank=RANK, alpha=ALPHA, targets=ALL_TARGETS))
    net = parallelize(model, ParallelConfig(mode="none", compile=compile, activation_checkpointing=checkpointing),
                      device)
    params = trainable(model)
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0, fused=device.type == "cuda")
    dp = DataParallelRank()

    def step(inputs, targets, mask):
        batch = Batch(inputs, targets, mask, torch.zeros_like(inputs, dtype=torch.int32))
        loss = next_token_backward(net, model, [batch], device=device, dp=dp, precision="auto", loss_chunk=4096,
                                   document_masking=False).loss
        update(params, opt)
        return loss

    return step


def run_lmforge(cfg: ModelConfig, args, device: torch.device) -> dict:
    from lmforge import Transformer

    with torch.device(device), _base_dtype(device):
        model = Transformer(cfg)  # random init
    system, step = "lmforge-sft", _sft_step(model, device, bool(args.compile), args.checkpointing)
    ids, completion = sft_data(args.examples, args.seq_len, cfg.vocab_size)
    B, n = args.micro_batch, args.examples // args.micro_batch
    times, losses = [], []
    for i in range(args.warmup + args.steps):
        rows = slice((i % n) * B, (i % n + 1) * B)
        inputs, comp = ids[rows].to(device), completion[rows].to(device)
        targets, mask = next_token_targets(inputs, comp)
        _sync(device)
        t0 = time.perf_counter()
        losses.append(step(inputs, targets, mask))
        _sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    return {"system": system, "step_s": sum(times) / len(times), "loss": float(losses[-1])}


def update(params, opt) -> None:
    """The end of every lmforge step here, as in the verbs' loops: clip at 1.0, AdamW, zero the gradients."""
    from lmforge.parallel import clip_grad_norm_

    clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def trl_arguments(args, device: torch.device, out: str, lr: float, weight_decay: float, **extra) -> dict:
    """The TrainingArguments every TRL side shares: the micro-batch, warm-up + timed steps, a constant lr,
    fused AdamW, clipping at 1.0, bf16 autocast on CUDA, no saving, logging or workers."""
    return dict(output_dir=out, per_device_train_batch_size=args.micro_batch, gradient_accumulation_steps=1,
                max_steps=args.warmup + args.steps, learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0,
                weight_decay=weight_decay, optim="adamw_torch_fused" if device.type == "cuda" else "adamw_torch",
                max_grad_norm=1.0, bf16=device.type == "cuda", use_cpu=device.type != "cuda",
                logging_steps=args.warmup + args.steps, save_strategy="no", report_to="none",
                dataloader_num_workers=0, disable_tqdm=True, seed=0, **extra)


def ids_tokenizer(pad_token: str = "</s>"):
    """A Hugging Face tokenizer only for its special ids (<unk> 0, <s> 1, </s> 2): the data is pre-tokenized."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<unk>")),
                                   unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token=pad_token)


def step_timer(device: torch.device, warmup: int):
    """A Trainer callback keeping the wall time of each step after the first `warmup`, synchronised with the
    device (the Trainer's own step loop, nothing else): `.times`."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.t0 = [], 0.0

        def on_step_begin(self, targs, state, control, **kw):
            _sync(device)
            self.t0 = time.perf_counter()

        def on_step_end(self, targs, state, control, **kw):
            _sync(device)
            if state.global_step > warmup:
                self.times.append(time.perf_counter() - self.t0)

    return StepTimer()


def run_trl(cfg: ModelConfig, args, device: torch.device) -> dict:
    import datasets
    import peft
    import trl

    with torch.device(device), _base_dtype(device):
        model = hf_model(cfg, "sdpa")
    tokenizer = ids_tokenizer()
    ids, completion = sft_data(args.examples, args.seq_len, cfg.vocab_size)
    dataset = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "completion_mask": completion.int().tolist()})
    timer = step_timer(device, args.warmup)
    with tempfile.TemporaryDirectory() as out:
        sft_args = trl.SFTConfig(**trl_arguments(args, device, out, LR, weight_decay=0.0),
                                 gradient_checkpointing=args.checkpointing == "full",
                                 gradient_checkpointing_kwargs={"use_reentrant": False}, max_length=args.seq_len,
                                 packing=False, padding_free=False, completion_only_loss=True)
        peft_config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=HF_TARGETS,
                                      bias="none", task_type="CAUSAL_LM")
        trainer = trl.SFTTrainer(model=model, args=sft_args, train_dataset=dataset, processing_class=tokenizer,
                                 peft_config=peft_config, callbacks=[timer])
        result = trainer.train()
    return {"system": f"trl-{trl.__version__}+peft-{peft.__version__}", "step_s": sum(timer.times) / len(timer.times),
            "loss": result.training_loss}


def run_worker(cmd: list[str], system: str, micro_batch: int) -> dict:
    """Run one measurement in a fresh process (its peak memory its own); its "ROW {json}" line, or the error."""
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = [line[4:] for line in proc.stdout.splitlines() if line.startswith("ROW ")]
    row = json.loads(found[-1]) if found else {
        "system": system, "micro_batch": micro_batch, "error": f"exit {proc.returncode}: {proc.stderr[-1500:]}"}
    print(json.dumps(row), flush=True)
    return row


@contextlib.contextmanager
def _base_dtype(device: torch.device):
    """Build the base in bf16 on CUDA (float32 on the CPU); only while building, so that nothing else (the
    Trainer's loss accumulators, say) runs in a changed default dtype."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16 if device.type == "cuda" else torch.float32)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def worker(args) -> dict:
    """One (system, micro-batch) measurement, in this process."""
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    cfg = ModelConfig.from_name("tiny" if args.quick else "llama2-7b", max_seq_len=max(args.seq_len, 256))
    torch.manual_seed(0)
    row = {"micro_batch": args.micro_batch, "seq_len": args.seq_len, "checkpointing": args.checkpointing}
    try:
        row |= (run_lmforge if args.worker == "lmforge" else run_trl)(cfg, args, device)
    except torch.OutOfMemoryError:
        return row | {"system": args.worker, "error": "out of memory"}
    row["tokens_per_s"] = args.micro_batch * args.seq_len / row["step_s"]
    row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return row


def _table_line(r: dict) -> str:
    figures = r.get("error", "")[:300] or (f"{r['tokens_per_s']:10,.0f} {r['step_s']:8.3f} {r['peak_gib']:9.1f} "
                                           f"{r['loss']:7.3f}")
    return f"{r['system']:34s} {r['micro_batch']:3d} {figures}"


def add_grid_arguments(ap: argparse.ArgumentParser, systems: list[str], micro_batches: str, seq_len: int) -> None:
    """The options of a benchmark that measures each (system, micro-batch) in its own process (`run_grid`)."""
    ap.add_argument("--systems", default=",".join(systems), help=f"comma-separated subset of {', '.join(systems)}")
    ap.add_argument("--micro_batches", default=micro_batches, help="comma-separated micro-batch sizes")
    ap.add_argument("--seq_len", type=int, default=seq_len)
    ap.add_argument("--examples", type=int, default=64, help="distinct examples (cycled)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compile", type=int, default=1, help="lmforge: torch.compile per block (1) or eager (0)")
    ap.add_argument("--quick", action="store_true", help="tiny shapes on the CPU (smoke test)")
    ap.add_argument("--worker", choices=systems, help=argparse.SUPPRESS)
    ap.add_argument("--micro_batch", type=int, help=argparse.SUPPRESS)


def as_worker(args, worker) -> bool:
    """Apply --quick's smoke-test sizes; in a worker process (--worker), print `worker(args)`'s ROW line: True."""
    if args.quick:
        args.seq_len, args.examples, args.steps, args.warmup, args.compile = 64, 8, 2, 1, 0
    if args.worker:
        print("ROW " + json.dumps(worker(args)), flush=True)
    return bool(args.worker)


def run_grid(script: str, args, flags: list[str]) -> list[dict]:
    """Every (system, micro-batch) of --systems x --micro_batches, each in a fresh process of `script` with the
    common options and `flags`."""
    rows = []
    for system in args.systems.split(","):
        for mb in args.micro_batches.split(","):
            cmd = [sys.executable, script, "--worker", system, "--micro_batch", mb, "--seq_len", str(args.seq_len),
                   "--examples", str(args.examples), "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--compile", str(args.compile), *flags]
            rows.append(run_worker(cmd + (["--quick"] if args.quick else []), system, int(mb)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_grid_arguments(ap, ["lmforge", "trl"], micro_batches="2", seq_len=4096)
    ap.add_argument("--checkpointing", choices=["none", "full"], default="none",
                    help="activation checkpointing on both sides (TRL: gradient_checkpointing)")
    args = ap.parse_args()
    if as_worker(args, worker):
        return
    rows = run_grid(__file__, args, ["--checkpointing", args.checkpointing])
    print(f"\n{'system':34s} {'mb':>3s} {'tok/s':>10s} {'step s':>8s} {'peak GiB':>9s} {'loss':>7s}")
    print("\n".join(_table_line(r) for r in rows))
    ok = {r["system"].split("-")[0]: r for r in rows if "error" not in r and r["micro_batch"] == rows[0]["micro_batch"]}
    if {"lmforge", "trl"} <= ok.keys():
        print(f"lmforge / TRL tokens/s at micro-batch {rows[0]['micro_batch']}: "
              f"{ok['lmforge']['tokens_per_s'] / ok['trl']['tokens_per_s']:.2f}x")
    write_rows("lora_sft.json", rows)


def write_rows(name: str, rows: list[dict]) -> None:
    """$OUT/name: the device, torch's version and the rows, if OUT is set."""
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], name), "w") as f:
            json.dump({"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                       "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
