"""Two GPUs of one host: FSDP2 scaling, a 7B model trained with FSDP2 (checkpoint and resume), and
tensor-parallel batch-1 decoding, each against its single-GPU run in the same call.

Run on the device machine (nvidia-h100-x2), from the repository root:

    PYTHONPATH=src python3 benchmarks/two_gpus.py                       # scaling, 7b, tp
    PYTHONPATH=src python3 benchmarks/two_gpus.py --only tp             # one part
    PYTHONPATH=src python3 benchmarks/two_gpus.py --quick               # tiny shapes, 2 CPU processes (gloo)

Every multi-process part runs the real entry points under `torchrun` (one subprocess per part):

    data     a 4096-piece tokenizer and token shards of the embedded corpus (as `make demo` makes them), so that
             the loss has something to learn; written to --work (default: a temporary folder)
    scaling  `lmforge pretrain` with TinyLlama-1.1B shapes at sequence 2048, micro-batch 8, per-block compile,
             fused linear cross-entropy: on 1 GPU (no sharding, bf16 autocast) and on 2 GPUs (FSDP2, bf16
             parameters for compute, fp32 reduction), the same micro-batch per GPU. tokens/s per GPU is the
             median over the steps after --warmup; efficiency = tok/s per GPU on 2 / tok/s on 1.
    7b       `lmforge pretrain --preset llama2-7b` on 2 GPUs: FSDP2 full shard, activation checkpointing as the
             card's memory needs (--ac-7b), sequence 4096, micro-batch 1, --accum-7b micro-batches per GPU per
             step, --steps-7b steps; then the same run stopped half-way (--run.stop_at, a sharded checkpoint)
             and resumed to the end. Reports the losses (they must fall), MFU (pretrain's
             own metric: 6N + 12LdT per token over 989 TFLOP/s per GPU) and how far the stopped-and-resumed
             losses are from the uninterrupted ones (--no-7b-reference skips the uninterrupted run: the
             stopped-and-resumed run alone, when device time is short). No run writes the final 27 GB model.
    tp       batch-1 decode of Llama-2-7B shapes (random bf16 weights, 128-token prompt, 256 greedy tokens)
             in benchmarks/decode.py's loop, on 1 GPU and with tensor parallelism 2 (`apply_tensor_parallel`),
             in each of --tp-modes; speed-up = tp tok/s / 1-GPU tok/s.

Prints JSON lines; writes $OUT/two_gpus.json when $OUT is set.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()
TINYLLAMA = ["--model.dim", "2048", "--model.n_layers", "22", "--model.n_heads", "32", "--model.n_kv_heads", "4",
             "--model.ffn_dim", "5632", "--model.vocab_size", "32000", "--model.max_seq_len", "2048"]
TINY = ["--model.dim", "64", "--model.n_layers", "2", "--model.n_heads", "4", "--model.n_kv_heads", "2",
        "--model.ffn_dim", "128", "--model.vocab_size", "4096", "--model.max_seq_len", "256"]  # --quick


def torchrun(nproc: int, args: list[str], quick: bool) -> subprocess.CompletedProcess:
    # expandable segments: the 7B run without activation checkpointing fills most of a card, and the
    # allocator's fragmentation would otherwise be what runs out first
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parents[1] / "src"), env.get("PYTHONPATH")]))
    if quick:
        env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[3:])} failed:\n{proc.stderr[-3000:]}")
    return proc


def prepare(work: Path) -> Path:
    """Tokenizer and token shards of the embedded corpus (src/lmforge/demo.py's first two steps)."""
    from lmforge.data import prepare_data
    from lmforge.tokenizer.train import train_tokenizer

    data = work / "data"
    if not (data / "manifest.json").exists():
        tokenizer = train_tokenizer(None, out_dir=str(work / "tokenizer"), vocab_size=4096, overwrite=True)
        prepare_data(None, tokenizer=tokenizer, out_dir=str(data), val_fraction=0.0, overwrite=True)
    return data


def pretrain_args(data: Path, run: Path, quick: bool, *extra: str) -> list[str]:
    device = ["--train.device", "cpu", "--train.threads", "1"] if quick else []
    return ["-m", "lmforge.cli", "pretrain", "--data.dir", str(data), "--run.dir", str(run), "--run.eval_every", "0",
            "--run.progress", "false", "--run.tensorboard", "false", *device, *extra]


def step_records(run: Path) -> list[dict]:
    from lmforge.train.metrics import read_step_metrics

    return read_step_metrics(run / "metrics.jsonl")


def scaling(data: Path, work: Path, args) -> list[dict]:
    shapes = TINY if args.quick else TINYLLAMA
    T, B = (128, 2) if args.quick else (2048, 8)
    rows = []
    for world in (1, 2):
        run = work / f"scaling-{world}"
        extra = [*shapes, "--train.seq_len", str(T), "--train.micro_batch_size", str(B),
                 "--train.global_batch_tokens", str(T * B * world), "--train.steps", str(args.steps),
                 "--run.checkpoint_every", "0", "--parallel.compile", str(not args.quick).lower(),
                 "--parallel.mode", "fsdp" if world > 1 else "none"]
        torchrun(world, pretrain_args(data, run, args.quick, *extra), args.quick)
        steps = step_records(run)[args.warmup :]
        tok_s = statistics.median(r["tokens_per_s"] for r in steps) / world
        mfu = [r["mfu"] for r in steps if r.get("mfu") is not None]
        rows.append({"part": "scaling", "gpus": world, "tokens_per_s_per_gpu": round(tok_s, 1),
                     "mfu": round(statistics.median(mfu), 4) if mfu else None, "seq_len": T, "micro_batch": B})
    rows.append({"part": "scaling", "efficiency": round(rows[1]["tokens_per_s_per_gpu"] / rows[0]["tokens_per_s_per_gpu"], 3)})
    return rows


def seven_b(data: Path, work: Path, args) -> list[dict]:
    """Uninterrupted run; then the same run stopped half-way (its sharded checkpoint) and resumed to the end.

    NOTE: one 7B checkpoint (fp32 parameters and two AdamW moments) is about 81 GB, so only the stop saves
    one (--run.checkpoint_every 0), and no run writes its final model (--run.save_model false).
    """

    n = args.steps_7b
    half = n // 2
    shapes = TINY if args.quick else ["--preset", "llama2-7b"]
    T = 128 if args.quick else 4096
    ac = activation_checkpointing_7b(args)
    common = [*shapes, "--train.seq_len", str(T), "--train.micro_batch_size", "1", "--train.global_batch_tokens",
              str(2 * T * args.accum_7b), "--train.steps", str(n), "--run.checkpoint_every", "0",
              "--parallel.mode", "fsdp", "--parallel.activation_checkpointing", ac,
              "--parallel.compile", str(not args.quick).lower(),
              # NOTE: from random initialisation a 7B model's first Adam steps move every weight by about lr;
              # at Llama 2's 3e-4 (which it reaches after 2,000 warm-up steps) 2 warm-up steps made the loss
              # jump 10.9 -> 30, and at 3e-5 it fell at 1.5e-5 (the first warm-up step), then rose to 11.8
              # (device runs of 2026-11-26); 1e-5 stays below both
              "--optim.warmup_steps", "2", "--optim.lr", "1e-5", "--run.save_model", "false"]
    # the profiled step (the first measured one of the stopped run) is left out of the medians
    profiled = args.warmup + 1 if args.profile_7b else None
    profile = ["--run.profile_at", str(profiled), "--run.profile_steps", "1"] if profiled else []
    whole, stopped = work / "7b", work / "7b-stopped"
    t0 = time.perf_counter()
    if args.reference_7b:
        torchrun(2, pretrain_args(data, whole, args.quick, *common), args.quick)
    wall = time.perf_counter() - t0
    torchrun(2, pretrain_args(data, stopped, args.quick, *common, *profile, "--run.stop_at", str(half)), args.quick)
    ckpt = stopped / "checkpoints" / f"step_{half:06d}"
    files = sorted(p.name for p in ckpt.iterdir())
    size = sum(p.stat().st_size for p in ckpt.iterdir())
    torchrun(2, pretrain_args(data, stopped, args.quick, *common, "--run.resume", "auto"), args.quick)
    if profiled and os.environ.get("OUT"):
        shutil.copy(stopped / "profile" / "top_ops.txt", Path(os.environ["OUT"]) / "7b_top_ops.txt")
    b = step_records(stopped)
    a = step_records(whole) if args.reference_7b else b
    losses, resumed = [r["loss"] for r in a], [r["loss"] for r in b]
    # the resumed run's first steps compile again: its medians skip --warmup steps after the resume too
    after = a[args.warmup :] if args.reference_7b else b[args.warmup : half] + b[half + args.warmup :]
    after = [r for r in after if r["step"] != profiled]
    mfu = [r["mfu"] for r in after if r.get("mfu") is not None]
    return [{"part": "7b", "steps": n, "seq_len": T, "activation_checkpointing": ac,
             "tokens_per_step": 2 * T * args.accum_7b, "losses": [round(x, 4) for x in losses],
             "stopped_and_resumed_at": half, "resumed_run_losses": [round(x, 4) for x in resumed],
             "resume_max_rel_diff": (max(abs(x - y) / abs(y) for x, y in zip(resumed, losses))
                                     if args.reference_7b else None),
             "loss_fell": losses[-1] < losses[0],
             "tokens_per_s_per_gpu": round(statistics.median(r["tokens_per_s"] for r in after) / 2, 1),
             "mfu": round(statistics.median(mfu), 4) if mfu else None,
             "step_time_s": [round(r["step_time_s"], 3) for r in b],
             "wall_s_uninterrupted": round(wall, 1) if args.reference_7b else None,
             "checkpoint_files": files, "checkpoint_gb": round(size / 1e9, 2)}]


def activation_checkpointing_7b(args) -> str:
    """--ac-7b, with "auto": none where a GPU holds the 7B states of one of 2 ranks (54 GB: fp32 parameters,
    gradients and two AdamW moments, halved) plus 32 blocks' activations at 4096 tokens (about 17 GB) with room
    to spare (H200, 141 GB), selective (every other block recomputed) on 80 GB cards."""
    if args.ac_7b != "auto":
        return args.ac_7b
    if args.quick:
        return "full"
    import torch

    return "none" if torch.cuda.get_device_properties(0).total_memory >= 100 * 2**30 else "selective"


def tp_decode(args) -> list[dict]:
    rows, logits = [], {}
    for world in (1, 2):
        out = Path(tempfile.mkdtemp()) / "tp.json"
        worker = [str(HERE), "--worker-tp", "--modes", args.tp_modes, "--json", str(out)]
        worker += (["--quick"] if args.quick else []) + (["--tp-profile"] if args.tp_profile else [])
        torchrun(world, worker, args.quick)
        rows += [{"part": "tp", "tensor_parallel": world, **r} for r in json.loads(out.read_text())]
        logits[world] = np.load(out.with_suffix(".logits.npz"))
        name = f"tp{world}"
        if args.tp_profile and os.environ.get("OUT"):
            shutil.copy(out.with_suffix(".profile.txt"), Path(os.environ["OUT"]) / f"{name}_profile.txt")
        for error in out.parent.glob("*.error.txt") if os.environ.get("OUT") else ():  # rank 0's tracebacks
            shutil.copy(error, Path(os.environ["OUT"]) / f"{name}_{error.name.split('.')[1]}_error.txt")
    one = {r["mode"]: r.get("tok_s_decode") for r in rows if r["tensor_parallel"] == 1}
    best_one = max((v for v in one.values() if v), default=None)
    for r in rows:
        if r["tensor_parallel"] == 2 and r.get("tok_s_decode") and best_one:
            r["speedup_vs_best_1gpu"] = round(r["tok_s_decode"] / best_one, 3)
    # The prompt's next-token logits (model dtype, then the same weights in float32), split over 2 ranks or
    # not, each against the 1-GPU float32 logits: float32 checks the split itself (summation order only);
    # in bf16 the row-parallel partial sums are rounded before the all-reduce adds them, so the check is
    # that the split is about as far from float32 as the 1-GPU bf16 model is. (Greedy tokens of random
    # weights, whose top logits are nearly tied, can differ from the first token on.)
    ref = logits[1]["float32"]

    def error(x: np.ndarray) -> float:
        return float(np.abs(x - ref).max() / ref.std())

    rows.append({"part": "tp", "logits_max_abs_err_over_std": {
        "1gpu_model_dtype": error(logits[1]["model_dtype"]), "tp2_model_dtype": error(logits[2]["model_dtype"]),
        "tp2_float32": error(logits[2]["float32"])}})
    return rows


def worker_tp(args) -> None:
    """One rank of the tp part: the model split over the ranks, timed by decode.py's loop; rank 0 writes JSON,
    the prompt's next-token logits (.logits.npz) and, with --tp-profile, decode.py's profile tables."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    sys.path.insert(0, str(HERE.parent))
    from decode import build, lmforge_decode

    from lmforge import ModelConfig
    from lmforge.parallel import apply_tensor_parallel, exit_distributed_worker, init_distributed

    device_type = "cpu" if args.quick else "cuda"
    rank, world = init_distributed(device_type)
    device = torch.device("cuda", torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
    # quick: 4 kv heads, so that a rank holds 2 (a cache sized for all 4 would then fail, not broadcast)
    cfg = ModelConfig.from_name("tiny", n_kv_heads=4) if args.quick else ModelConfig.from_name("llama2-7b")
    torch.manual_seed(0)
    model = build(cfg, device, torch.float32 if args.quick else torch.bfloat16)
    if world > 1:
        apply_tensor_parallel(model, init_device_mesh(device_type, (world,)))
    prompt = torch.randint(3, cfg.vocab_size, (16 if args.quick else 128,), generator=torch.Generator().manual_seed(0)).tolist()
    ids = torch.tensor([prompt], device=device)
    with torch.no_grad():
        logits = {"model_dtype": model(ids)[0, -1].float().cpu().numpy()}
    out = Path(args.json)
    report = open(out.with_suffix(".profile.txt"), "w") if rank == 0 else open(os.devnull, "w")
    results = []
    for mode in (["eager"] if args.quick else args.modes.split(",")):
        try:
            with contextlib.redirect_stdout(report):  # decode.py prints its profile table
                r = lmforge_decode(model, prompt, 16 if args.quick else 256, mode, 1 if args.quick else 3,
                                   profile=args.tp_profile)
            r["tokens"] = r["tokens"][:8]
        except Exception as e:  # one failing mode must not lose the others
            r = {"mode": mode, "error": f"{type(e).__name__}: {e}"[:500]}
            if rank == 0:
                with open(out.with_suffix(f".{mode}.error.txt"), "w") as f:
                    traceback.print_exc(file=f)
        torch._dynamo.reset()
        results.append(r)
    report.close()
    with torch.no_grad():  # last: the model is converted in place (13.5 -> 27 GB a GPU for 7B)
        logits["float32"] = model.float()(ids)[0, -1].cpu().numpy()
    if rank == 0:
        out.write_text(json.dumps(results))
        np.savez(out.with_suffix(".logits.npz"), **logits)
    if dist.is_initialized():
        dist.barrier()
    exit_distributed_worker()  # (gloo can abort a finished rank at interpreter exit; see its NOTE)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="scaling,7b,tp")
    ap.add_argument("--quick", action="store_true", help="tiny shapes on 2 CPU processes (smoke test)")
    ap.add_argument("--steps", type=int, default=12, help="scaling: steps per run")
    ap.add_argument("--steps-7b", type=int, default=8, help="7b: steps of the first run (checkpoint half-way)")
    ap.add_argument("--warmup", type=int, default=3, help="steps left out of the medians (compile, allocator)")
    ap.add_argument("--ac-7b", default="auto", choices=["auto", "none", "selective", "full"],
                    help="7b: activation checkpointing (auto: none on cards of 100 GiB or more, else selective)")
    ap.add_argument("--accum-7b", type=int, default=2, help="7b: micro-batches of 4096 tokens per GPU per step")
    ap.add_argument("--profile-7b", action="store_true",
                    help="7b: profile the first measured step (rank 0's top ops to $OUT/7b_top_ops.txt)")
    ap.add_argument("--no-7b-reference", dest="reference_7b", action="store_false",
                    help="7b: skip the uninterrupted run (report the stopped-and-resumed run alone)")
    ap.add_argument("--tp-modes", default="cuda_graph,compile", help="tp: decode modes (eager: add it)")
    ap.add_argument("--tp-profile", action="store_true",
                    help="tp: profile one generation per mode (rank 0's tables to $OUT/tp1_profile.txt, tp2_...)")
    ap.add_argument("--work", default=None, help="folder for data and runs (default: a temporary one)")
    ap.add_argument("--worker-tp", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--modes", default="eager", help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker_tp:
        worker_tp(args)
        return []
    if args.quick:
        args.steps, args.steps_7b, args.warmup = 4, 4, 1
    work = Path(args.work or tempfile.mkdtemp(prefix="two_gpus-"))
    only, rows = set(args.only.split(",")), []

    def emit(new: list[dict]) -> None:
        for row in new:
            rows.append(row)
            print(json.dumps(row), flush=True)

    data = prepare(work) if only & {"scaling", "7b"} else None
    for part, fn in (("scaling", lambda: scaling(data, work, args)), ("7b", lambda: seven_b(data, work, args)),
                     ("tp", lambda: tp_decode(args))):
        if part in only:
            t0 = time.perf_counter()
            try:
                emit(fn())
            except Exception as e:  # a failing part must not lose the others' figures
                emit([{"part": part, "error": f"{type(e).__name__}: {e}"[-3000:]}])
            print(f"[{part}] {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)  # to plan device time
    if os.environ.get("OUT"):
        import torch

        name = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.quick else "cpu"
        with open(os.path.join(os.environ["OUT"], "two_gpus.json"), "w") as f:
            json.dump({"device": name, "date": time.strftime("%Y-%m-%d"), "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
