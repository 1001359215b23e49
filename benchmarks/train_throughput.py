"""Training-step throughput: lmforge against Hugging Face transformers with the same shapes, optimizer and batch.

Run on the device machine (one H100), from the repository root:

    PYTHONPATH=src python3 benchmarks/train_throughput.py --only a        # TinyLlama-1.1B shapes, seq 2048
    PYTHONPATH=src python3 benchmarks/train_throughput.py --only b,c      # sliding-window lengths; MoE vs dense
    PYTHONPATH=src python3 benchmarks/train_throughput.py --quick         # tiny shapes, CPU smoke test

Both systems train pure-bf16 parameters with fused AdamW (lr 3e-4, betas 0.9/0.95, wd 0.1) and gradient
clipping at 1.0 (the anchors' training setting). lmforge uses its real training parts: `parallelize` (torch.compile per block),
the chunked cross-entropy over the final hidden states, and FlexAttention for the sliding window.

MFU = tokens/s * (6 N + 12 L d T) / 989e12, N the parameters without the input embedding; for the
MoE slice N counts the active parameters. Prints one table; writes JSON to $OUT/train_throughput.json if set.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from dataclasses import dataclass

import torch

from lmforge import ModelConfig, Transformer
from lmforge.train.linear_ce import linear_cross_entropy
from lmforge.train.losses import chunked_cross_entropy
from lmforge.parallel import ParallelConfig, parallelize

PEAK = 989e12


@dataclass
class Case:
    name: str
    config: ModelConfig
    seq_len: int
    batch: int


def cases(only: set[str], quick: bool) -> list[Case]:
    if quick:
        tiny = ModelConfig.from_name("tiny", max_seq_len=256)
        return [Case("a-quick", tiny, 128, 2), Case("b-quick", ModelConfig.from_name("tiny-swa", max_seq_len=512), 256, 1),
                Case("c-quick-moe", ModelConfig.from_name("tiny-moe"), 128, 2)]
    out = []
    if "a" in only:
        tinyllama = ModelConfig(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, ffn_dim=5632, vocab_size=32000,
                                max_seq_len=2048)
        out.append(Case("a-tinyllama-1.1b", tinyllama, 2048, 8))
    if "b" in only:
        for T in (8192, 16384, 32768):
            cfg = ModelConfig.from_name("mistral-7b", n_layers=4, max_seq_len=T)
            out.append(Case(f"b-mistral-slice-{T // 1024}k", cfg, T, 1))
    if "c" in only:
        moe = ModelConfig.from_name("mixtral-8x7b", n_layers=4, rope_theta=1e4, max_seq_len=4096)
        dense = ModelConfig.from_name("mistral-7b", n_layers=4, sliding_window=None, ffn_dim=2 * 14336)
        for B in (1, 2):  # at batch 1 the optimizer step over the experts' 4x parameters weighs more
            out += [Case(f"c-mixtral-slice-b{B}", moe, 4096, B), Case(f"c-dense-slice-same-active-b{B}", dense, 4096, B)]
    return out


def flops_per_token(cfg: ModelConfig, T: int) -> float:
    """6 N + 12 L d T with N = active parameters excluding the input embedding."""
    d, f, L = cfg.dim, cfg.ffn_dim, cfg.n_layers
    attn = d * cfg.n_heads * cfg.head_dim * 2 + d * cfg.n_kv_heads * cfg.head_dim * 2
    ffn = 3 * d * f * (cfg.moe.top_k if cfg.moe else 1) + (d * cfg.moe.num_experts if cfg.moe else 0)
    N = L * (attn + ffn + 2 * d) + d + d * cfg.vocab_size
    return 6 * N + 12 * L * d * T


def hf_model(cfg: ModelConfig, attn: str):
    import transformers as tf

    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
                  num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                  num_key_value_heads=cfg.n_kv_heads, max_position_embeddings=max(cfg.max_seq_len, 32768),
                  rope_theta=cfg.rope_theta, attn_implementation=attn)
    if cfg.moe:
        return tf.MixtralForCausalLM(tf.MixtralConfig(**common, num_local_experts=cfg.moe.num_experts,
                                                      num_experts_per_tok=cfg.moe.top_k, sliding_window=cfg.sliding_window))
    if cfg.sliding_window:
        return tf.MistralForCausalLM(tf.MistralConfig(**common, sliding_window=cfg.sliding_window))
    return tf.LlamaForCausalLM(tf.LlamaConfig(**common))


def time_steps(step, n_warmup: int, n_steps: int, device: str) -> float:
    for _ in range(n_warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n_steps):
        loss = step()
    if device == "cuda":
        torch.cuda.synchronize()
    assert torch.isfinite(loss), "non-finite loss in the benchmark"
    return (time.perf_counter() - t0) / n_steps


def run_case(case: Case, system: str, device: str, n_warmup: int, n_steps: int, profile: bool = False) -> dict:
    torch.manual_seed(0)
    torch._dynamo.reset()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    B, T, cfg = case.batch, case.seq_len, case.config
    tokens = torch.randint(0, cfg.vocab_size, (B, T + 1), device=device)
    x, y = tokens[:, :-1], tokens[:, 1:]
    mask = torch.ones_like(y, dtype=torch.bool)
    gc.collect()  # the previous case's model and optimizer, freed when its run_case returned
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            if system.startswith("lmforge"):
                # lmforge-compiled: per-block compile (parallelize) + fused linear cross-entropy;
                # "-refce": the reference chunked cross-entropy instead; "-whole": torch.compile of the whole model.
                model = Transformer(cfg)
                per_block = system.startswith("lmforge-compiled") and "-whole" not in system
                net = parallelize(model, ParallelConfig(mode="none", compile=per_block), torch.device(device))
                if "-whole" in system:
                    net = torch.compile(model)
                ce = chunked_cross_entropy if "-refce" in system else linear_cross_entropy

                def loss_fn():
                    hidden, aux = net(x, return_hidden=True, return_aux=True)
                    return ce(hidden, model.output.weight, y, mask, 4096) / mask.sum() + aux.total
            else:
                model = hf_model(cfg, "sdpa")
                net = torch.compile(model) if system == "hf-compiled" else model

                def loss_fn():
                    return net(input_ids=x, labels=x).loss  # transformers shifts the labels itself
    finally:
        torch.set_default_dtype(prev)
    params = [p for p in model.parameters()]
    opt = torch.optim.AdamW(params, lr=3e-4, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.1,
                            fused=device == "cuda")

    def step():
        loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    if profile:
        _profile(step, case, system)
    try:
        dt = time_steps(step, n_warmup, n_steps, device)
    except torch.OutOfMemoryError:
        return {"case": case.name, "system": system, "error": "out of memory"}
    tok_s = B * T / dt
    mfu = tok_s * flops_per_token(cfg, T) / PEAK
    peak_gib = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    return {"case": case.name, "system": system, "step_s": dt, "tokens_per_s": tok_s, "mfu": mfu,
            "peak_gib": peak_gib, "us_per_token": 1e6 / tok_s}


def _profile(step, case: Case, system: str) -> None:
    """Print the kernels that take the most device time over three steps (after two warm-up steps)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        step()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    print(f"--- profile {case.name} {system} (3 steps) ---")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=22, max_name_column_width=70))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="a,b,c", help="comma-separated subset of a, b, c")
    ap.add_argument("--systems", default="lmforge-compiled,lmforge-eager,hf-eager,hf-compiled")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="tiny shapes on the CPU (smoke test)")
    ap.add_argument("--profile", action="store_true", help="print a kernel profile of each lmforge system")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    systems = args.systems.split(",")
    if args.quick:
        systems, args.steps, args.warmup = ["lmforge-eager", "hf-eager"], 2, 1
    rows = []
    for case in cases(set(args.only.split(",")), args.quick):
        for system in systems:
            try:
                row = run_case(case, system, device, args.warmup, args.steps,
                               args.profile and system.startswith("lmforge"))
            except Exception as e:  # one failing system (a compile error, say) must not lose the other figures
                row = {"case": case.name, "system": system, "error": f"{type(e).__name__}: {e}"[:500]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{'case':28s} {'system':18s} {'tok/s':>10s} {'MFU':>7s} {'us/tok':>8s} {'peak GiB':>9s}")
    for r in rows:
        if "error" in r:
            print(f"{r['case']:28s} {r['system']:18s} {r['error']}")
            continue
        print(f"{r['case']:28s} {r['system']:18s} {r['tokens_per_s']:10,.0f} {r['mfu']:7.1%} "
              f"{r['us_per_token']:8.2f} {r['peak_gib']:9.1f}")
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "train_throughput.json"), "w") as f:
            json.dump({"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                       "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
