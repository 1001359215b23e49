"""Batch-1 decoding against Hugging Face transformers and the card's memory-bandwidth limit, plus chunked
pre-fill of a long prompt into Mistral's rolling buffer.

Run on the device machine (one H100, bf16), from the repository root:

    PYTHONPATH=src python3 benchmarks/decode.py                 # everything (a, b, c, d, e)
    PYTHONPATH=src python3 benchmarks/decode.py --only a,c      # lmforge decode modes + bandwidth only
    PYTHONPATH=src python3 benchmarks/decode.py --only a,c,e --modes compile,generate:compile --fuse off,on
    PYTHONPATH=src python3 benchmarks/decode.py --quick         # tiny shapes on the CPU (smoke test)

    a  lmforge: Llama-2-7B shapes, random bf16 weights, 128-token prompt, 256 greedy tokens, batch 1, in each
       decode mode (eager, cuda_graph, compile = torch.compile reduce-overhead, compile+cuda_graph), for each
       --fuse setting (off: separate wq / wk / wv and w1 / w3 products; on: lmforge.infer.fuse). Timed: end
       to end (pre-fill + 256 tokens, as HF's generate is timed) and decode only (per-token steps).
       A plain mode is the earlier loop: DecodeStep (logits) -> sample() outside the graph -> .tolist().
       "generate:MODE" times lmforge.infer.generate.generate() itself: its kept step samples inside the
       graph; decode only = end to end minus a pre-fill timed alone.
    b  transformers LlamaForCausalLM, same shapes and weights scheme: generate(max_new_tokens=256,
       min_new_tokens=256, do_sample=False), eager dynamic cache and cache_implementation="static"
       (which transformers compiles).
    c  device-to-device copy bandwidth (bytes read + written / time, 1 GiB copies) and the limit
       tok/s = bandwidth / weight bytes (the convention of our anchors: all weights, 13.5 GB for Llama-2-7B; the bytes
       really read per token exclude the embedding table, also shown).
    d  Mistral-7B shapes: a random prompt pre-filled in chunks of W = 4096 into the rolling buffer, at 8k,
       16k and 32k tokens: time, peak memory, cache memory (the same at every length: W slots).
    e  the engine's decode attention kernels alone (one layer, bf16, keys in scattered 16-slot blocks):
       "sdpa" (gather, then SDPA), "fused" (the compiled in-place kernel) and "triton" (triton_decode.py),
       at Llama-2-7B heads (32 / 32) and Mistral-7B's (32 / 8), batch 1 and 64: microseconds and GB/s of
       keys + values read, next to the copy bandwidth (part c).

Every timing: warm-up first, then the median of --repeats runs, with CUDA events (perf_counter on the CPU).
Prints one table; writes JSON to $OUT/decode.json if OUT is set (or to --json).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
from datetime import datetime, timezone

import torch

from lmforge import ModelConfig, Transformer
from lmforge.infer.cache import cache_config, make_cache
from lmforge.infer.decode_step import DecodeStep
from lmforge.infer.fuse import fuse_projections, unfuse_projections
from lmforge.infer.generate import _left_pad, generate, prefill, to_host_later
from lmforge.infer.sampling import SamplingBatch, SamplingParams, sample


def timed(fn, device: torch.device, repeats: int, warmup: int = 1) -> tuple[float, object]:
    """Median seconds of `fn()` over `repeats` runs after `warmup` runs; also the last result."""
    for _ in range(warmup):
        result = fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            result = fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            result = fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def build(cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> Transformer:
    """Random weights without a float32 copy: meta device, then to_empty + init_weights."""
    with torch.device("meta"):
        model = Transformer(cfg).to(dtype)
    model.to_empty(device=device)
    model.init_weights()
    return model.eval()


def free(*objs) -> None:
    del objs
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------- (a) lmforge
@torch.no_grad()
def lmforge_decode(model: Transformer, prompt: list[int], n_new: int, mode: str, repeats: int,
                   profile: bool = False) -> dict:
    device = next(model.parameters()).device
    # cache_config: under tensor parallelism (benchmarks/two_gpus.py) a rank caches only its own kv heads
    cache = make_cache(cache_config(model), 1, len(prompt) + n_new, device=device, dtype=next(model.parameters()).dtype)
    step = DecodeStep(model, cache, mode)
    tokens, positions = _left_pad([prompt], device)
    greedy = SamplingParams(temperature=0, max_new_tokens=n_new, ignore_eos=True)
    marks = {}

    def run() -> list[int]:
        cache.reset()
        batch = SamplingBatch([greedy], [prompt], model.config.vocab_size, device)
        logits = prefill(model, cache, tokens, positions, len(prompt))
        out = sample(logits, batch).tokens
        ids = []
        if device.type == "cuda":
            marks["decode_start"] = torch.cuda.Event(enable_timing=True)
            marks["decode_start"].record()
        else:
            marks["decode_start"] = time.perf_counter()
        pos = torch.tensor([[len(prompt)]], device=device)
        for _ in range(n_new - 1):
            # as in generate(): the next step is queued before the host waits for this token
            fetched = to_host_later([out])
            logits = step(out[:, None], pos)
            pos += 1
            out = sample(logits, batch).tokens
            ids += fetched()[0]
        ids += out.tolist()
        if device.type == "cuda":
            marks["decode_end"] = torch.cuda.Event(enable_timing=True)
            marks["decode_end"].record()
        else:
            marks["decode_end"] = time.perf_counter()
        return ids

    t_compile = time.perf_counter()
    run()  # compiles / captures
    t_compile = time.perf_counter() - t_compile
    total, decode = [], []
    for _ in range(repeats):
        t, ids = timed(run, device, 1, warmup=0)
        total.append(t)
        if device.type == "cuda":
            torch.cuda.synchronize()
            decode.append(marks["decode_start"].elapsed_time(marks["decode_end"]) / 1e3)
        else:
            decode.append(marks["decode_end"] - marks["decode_start"])
    if profile and device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            run()
            torch.cuda.synchronize()
        # NOTE: rows such as "## Call CompiledFxGraph ..." are annotations spanning the kernels listed under them,
        # so the kernels' device time is not the sum of the column
        print(f"--- profile: lmforge {mode}, one generation of {n_new} tokens ---")
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=90))
    total_s, decode_s = statistics.median(total), statistics.median(decode)
    return {
        "mode": mode,
        "tok_s_end_to_end": n_new / total_s,
        "tok_s_decode": (n_new - 1) / decode_s,
        "ms_per_token": 1e3 * decode_s / (n_new - 1),
        "first_run_s": t_compile,
        "tokens": ids,
    }


@torch.no_grad()
def generate_decode(model: Transformer, prompt: list[int], n_new: int, mode: str, repeats: int,
                    profile: bool = False) -> dict:
    """(a) "generate:MODE": generate() end to end, and decode only = that minus the pre-fill alone."""
    device = next(model.parameters()).device
    greedy = SamplingParams(temperature=0, max_new_tokens=n_new, ignore_eos=True)

    def run() -> list[int]:
        return generate(model, None, [prompt], greedy, decode_mode=mode)[0].token_ids

    t_first = time.perf_counter()
    run()  # compiles / captures (kept for the timed calls)
    t_first = time.perf_counter() - t_first
    total, ids = timed(run, device, repeats, warmup=0)
    cache = make_cache(cache_config(model), 1, len(prompt) + 1, device=device, dtype=next(model.parameters()).dtype)
    tokens, positions = _left_pad([prompt], device)

    def prefill_alone():
        cache.reset()
        return prefill(model, cache, tokens, positions, len(prompt)).argmax(-1).tolist()

    pre, _ = timed(prefill_alone, device, repeats, warmup=1)
    if profile and device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            run()
            torch.cuda.synchronize()
        print(f"--- profile: lmforge generate() {mode}, one generation of {n_new} tokens ---")
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=90))
    decode_s = total - pre
    return {"mode": f"generate:{mode}", "tok_s_end_to_end": n_new / total, "tok_s_decode": (n_new - 1) / decode_s,
            "ms_per_token": 1e3 * decode_s / (n_new - 1), "first_run_s": t_first, "tokens": ids}


# ---------------------------------------------------------------------------------------------- (b) HF
@torch.no_grad()
def hf_decode(cfg: ModelConfig, prompt: list[int], n_new: int, device, dtype, repeats: int, static: bool) -> dict:
    import transformers

    from lmforge.models.convert import model_config_to_hf_config

    hf_cfg = transformers.LlamaConfig(**model_config_to_hf_config(cfg, dtype))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(hf_cfg).eval()
    torch.set_default_dtype(previous)
    ids = torch.tensor([prompt], device=device)
    kwargs = dict(max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                  attention_mask=torch.ones_like(ids), pad_token_id=0)
    if static:
        kwargs["cache_implementation"] = "static"
    t_first = time.perf_counter()
    model.generate(ids, **kwargs)  # warm-up (compiles the static-cache forward)
    t_first = time.perf_counter() - t_first
    t, out = timed(lambda: model.generate(ids, **kwargs), device, repeats, warmup=1)
    assert out.shape[1] == len(prompt) + n_new
    result = {"mode": "static+compile" if static else "eager dynamic", "tok_s_end_to_end": n_new / t,
              "first_run_s": t_first}
    free(model)
    return result


# ---------------------------------------------------------------------------------------------- (c) bandwidth
def copy_bandwidth(device: torch.device, n_bytes: int, repeats: int) -> float:
    """Bytes read + written per second by `dst.copy_(src)`."""
    src = torch.empty(n_bytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    t, _ = timed(lambda: dst.copy_(src), device, repeats, warmup=2)
    free(src, dst)
    return 2 * n_bytes / t


# ---------------------------------------------------------------------------------------------- (d) pre-fill
@torch.no_grad()
def rolling_prefill(cfg: ModelConfig, lengths: list[int], device, dtype, repeats: int) -> list[dict]:
    model = build(cfg, device, dtype)
    W = cfg.sliding_window
    rows = []
    for T in lengths:
        prompt = torch.randint(3, cfg.vocab_size, (T,)).tolist()
        tokens, positions = _left_pad([prompt], device)
        cache = make_cache(cfg, 1, T + 1, device=device, dtype=dtype)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() if device.type == "cuda" else 0

        def run():
            cache.reset()
            return prefill(model, cache, tokens, positions, W)

        t, logits = timed(run, device, repeats, warmup=1)
        assert torch.isfinite(logits).all()
        peak = torch.cuda.max_memory_allocated() - before if device.type == "cuda" else None
        rows.append({
            "prompt_tokens": T, "chunk": W, "cache": type(cache).__name__, "seconds": t, "tok_s": T / t,
            "cache_bytes": cache.nbytes, "peak_bytes_above_weights_and_cache": peak,
        })
        free(cache)
    free(model)
    return rows


# ---------------------------------------------------------------------------------------------- (e) attention
def sdpa_decode(q, kp, vp, key_slots, allowed):
    """The engine's "sdpa" decode attention: gather the keys, then SDPA (paged_attention._padded, GQA rows)."""
    G, H, D = q.shape
    keys, values = kp[key_slots].permute(0, 2, 1, 3), vp[key_slots].permute(0, 2, 1, 3)  # (G, Hkv, K, D)
    grouped = q.view(G, keys.shape[1], -1, D)  # (G, Hkv, r, D)
    mask = allowed[:, None, None]  # (G, 1, 1, K)
    return torch.nn.functional.scaled_dot_product_attention(grouped, keys, values, attn_mask=mask).reshape(G, H, D)


@torch.no_grad()
def decode_attention_kernels(device, dtype, repeats: int) -> list[dict]:
    from lmforge.infer.engine.paged_attention import gathered_decode_attention
    from lmforge.infer.engine.triton_decode import paged_decode_attention

    kernels = {"sdpa": sdpa_decode, "fused": torch.compile(gathered_decode_attention, dynamic=True),
               "triton": paged_decode_attention}
    rows, D, bs = [], 128, 16
    for B, H, Hkv, K in [(1, 32, 32, 512), (64, 32, 32, 512), (1, 32, 8, 4096), (64, 32, 8, 2048)]:
        g = torch.Generator(device=device).manual_seed(0)
        n_blocks = B * K // bs
        kp, vp = (torch.randn((n_blocks + 1) * bs, Hkv, D, device=device, dtype=dtype, generator=g) for _ in range(2))
        blocks = torch.randperm(n_blocks, device=device, generator=g).view(B, K // bs)  # scattered blocks
        slots = (blocks[:, :, None] * bs + torch.arange(bs, device=device)).view(B, K)  # (B, K)
        lengths = torch.tensor([K - 7 * b % 64 for b in range(B)], device=device)  # live keys per row
        allowed = torch.arange(K, device=device)[None] < lengths[:, None]  # (B, K), the bucket's tail masked
        q = torch.randn(B, H, D, device=device, dtype=dtype, generator=g)
        ref = sdpa_decode(q, kp, vp, slots, allowed).float()
        live_bytes = 2 * int(allowed.sum()) * Hkv * D * dtype.itemsize  # keys and values read once
        for name, fn in kernels.items():
            try:
                t, out = timed(lambda: fn(q, kp, vp, slots, allowed), device, max(repeats, 20), warmup=3)
                err = (out.float() - ref).abs().max().item()
                rows.append({"kernel": name, "batch": B, "heads": f"{H}/{Hkv}", "keys": K, "us": 1e6 * t,
                             "GB_s": live_bytes / t / 1e9, "max_err_vs_sdpa": err})
            except Exception as e:
                rows.append({"kernel": name, "batch": B, "heads": f"{H}/{Hkv}", "keys": K,
                             "error": f"{type(e).__name__}: {e}"[:300]})
        free(kp, vp)
    return rows


# ---------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes on the CPU (smoke test)")
    parser.add_argument("--only", default="a,b,c,d,e", help="comma-separated parts: a b c d e")
    parser.add_argument("--modes", default="eager,cuda_graph,compile,compile+cuda_graph",
                        help="lmforge decode modes; generate:MODE times generate() itself")
    parser.add_argument("--fuse", default="off", help="(a) fused projections: off, on, or off,on (both)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="print a kernel profile of each lmforge mode")
    parser.add_argument("--json", default=None, help="JSON output path (default $OUT/decode.json)")
    args = parser.parse_args()
    only = set(args.only.split(","))
    cuda = torch.cuda.is_available() and not args.quick
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    if args.quick:
        llama, mistral = ModelConfig.from_name("tiny"), ModelConfig.from_name("tiny-swa", max_seq_len=64)
        prompt_len, n_new, lengths, copy_bytes = 16, 16, [64, 128, 256], 1 << 24
        modes = [m for m in args.modes.split(",") if m.removeprefix("generate:") == "eager"]  # the graph modes need CUDA
    else:
        llama, mistral = ModelConfig.from_name("llama2-7b"), ModelConfig.from_name("mistral-7b")
        prompt_len, n_new, lengths, copy_bytes = 128, 256, [8192, 16384, 32768], 1 << 30
        modes = args.modes.split(",")
    torch.manual_seed(0)
    prompt = torch.randint(3, llama.vocab_size, (prompt_len,)).tolist()
    report = {
        "device": torch.cuda.get_device_name() if cuda else "cpu", "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "prompt_tokens": prompt_len, "new_tokens": n_new, "quick": args.quick,
    }
    try:
        import transformers

        report["transformers"] = transformers.__version__
    except ImportError:
        transformers = None

    if "a" in only or "c" in only:
        model = build(llama, device, dtype)
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        read_bytes = weight_bytes - model.tok_embeddings.weight.numel() * model.tok_embeddings.weight.element_size()
        report["weight_bytes"], report["weight_bytes_read_per_token"] = weight_bytes, read_bytes
        if "a" in only:
            report["lmforge"] = []
            for fused in args.fuse.split(","):
                fuse_projections(model) if fused == "on" else unfuse_projections(model)
                for mode in modes:
                    try:
                        if mode.startswith("generate:"):
                            row = generate_decode(model, prompt, n_new, mode.removeprefix("generate:"), args.repeats,
                                                  args.profile)
                        else:
                            row = lmforge_decode(model, prompt, n_new, mode, args.repeats, args.profile)
                    except Exception as e:  # one failing mode must not lose the other figures
                        row = {"mode": mode, "error": f"{type(e).__name__}: {e}"[:500]}
                    row["fused"] = fused == "on"
                    report["lmforge"].append(row)
                    torch._dynamo.reset()
            unfuse_projections(model)
            reference = next((r["tokens"] for r in report["lmforge"] if r["mode"] == "eager" and "tokens" in r), None)
            for r in report["lmforge"]:
                if "tokens" in r:
                    toks = r.pop("tokens")
                    if reference is not None:  # bf16 kernels may differ: count the common prefix
                        r["same_tokens_as_eager"] = next((i for i, (a, b) in enumerate(zip(toks, reference)) if a != b), len(toks))
        free(model)
    if "c" in only:
        bw = copy_bandwidth(device, copy_bytes, max(args.repeats, 5))
        report["copy_bandwidth_bytes_s"] = bw
        report["limit_tok_s_all_weights"] = bw / report["weight_bytes"]
        report["limit_tok_s_bytes_read"] = bw / report["weight_bytes_read_per_token"]
    if "b" in only and transformers is not None:
        report["hf"] = []
        for static in ([False, True] if cuda else [False]):  # compiling on the CPU is not a smoke test
            try:
                report["hf"].append(hf_decode(llama, prompt, n_new, device, dtype, args.repeats, static))
            except Exception as e:
                report["hf"].append({"mode": "static+compile" if static else "eager dynamic",
                                     "error": f"{type(e).__name__}: {e}"[:500]})
            torch._dynamo.reset()
    if "d" in only:
        report["prefill"] = rolling_prefill(mistral, lengths, device, dtype, max(1, args.repeats - 1))
    if "e" in only and cuda:  # (the compiled and Triton kernels need CUDA)
        report["attention"] = decode_attention_kernels(device, dtype, args.repeats)

    print_table(report)
    path = args.json or (os.path.join(os.environ["OUT"], "decode.json") if os.environ.get("OUT") else None)
    if path:
        with open(path, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {path}")


def print_table(r: dict) -> None:
    print(f"\n{r['device']}  {r['dtype']}  torch {r['torch']}  transformers {r.get('transformers', '-')}  {r['date']}")
    print(f"batch 1, {r['prompt_tokens']}-token prompt, {r['new_tokens']} new tokens (greedy)\n")
    print(f"{'system':<34}{'tok/s end-to-end':>18}{'tok/s decode':>14}{'ms/token':>10}{'first run s':>13}")
    for row in r.get("lmforge", []):
        name = f"lmforge {row['mode']}" + (" fused" if row.get("fused") else "")
        if "error" in row:
            print(f"{name:<34}  failed: {row['error'][:120]}")
            continue
        same = f"  (same tokens as eager: {row['same_tokens_as_eager']})" if "same_tokens_as_eager" in row else ""
        if "limit_tok_s_all_weights" in r:
            same += f"  ({100 * row['tok_s_decode'] / r['limit_tok_s_all_weights']:.0f}% of the limit)"
        print(f"{name:<34}{row['tok_s_end_to_end']:>18.1f}{row['tok_s_decode']:>14.1f}{row['ms_per_token']:>10.2f}"
              f"{row['first_run_s']:>13.1f}{same}")
    for row in r.get("hf", []):
        name = f"transformers {row['mode']}"
        if "error" in row:
            print(f"{name:<34}  failed: {row['error'][:120]}")
            continue
        print(f"{name:<34}{row['tok_s_end_to_end']:>18.1f}{'':>14}{'':>10}{row['first_run_s']:>13.1f}")
    if "copy_bandwidth_bytes_s" in r:
        print(f"\ncopy bandwidth {r['copy_bandwidth_bytes_s'] / 1e9:.0f} GB/s (read + write); weights "
              f"{_size(r['weight_bytes'])} -> limit {r['limit_tok_s_all_weights']:.0f} tok/s "
              f"({_size(r['weight_bytes_read_per_token'])} read per token -> {r['limit_tok_s_bytes_read']:.0f} tok/s)")
    if r.get("attention"):
        bw = f", copy bandwidth {r['copy_bandwidth_bytes_s'] / 1e9:.0f} GB/s" if "copy_bandwidth_bytes_s" in r else ""
        print(f"\ndecode attention, one layer, bf16 (GB/s of keys + values read{bw})")
        print(f"{'kernel':<8}{'batch':>6}{'heads':>7}{'keys':>6}{'us':>10}{'GB/s':>9}{'max err vs sdpa':>17}")
        for row in r["attention"]:
            head = f"{row['kernel']:<8}{row['batch']:>6}{row['heads']:>7}{row['keys']:>6}"
            if "error" in row:
                print(f"{head}  failed: {row['error'][:100]}")
            else:
                print(f"{head}{row['us']:>10.1f}{row['GB_s']:>9.0f}{row['max_err_vs_sdpa']:>17.4f}")
    if r.get("prefill"):
        print(f"\nrolling-buffer pre-fill (chunk = W = {r['prefill'][0]['chunk']})")
        print(f"{'prompt tokens':>14}{'seconds':>10}{'tok/s':>12}{'cache':>12}{'peak over weights':>20}")
        for row in r["prefill"]:
            peak = row["peak_bytes_above_weights_and_cache"]
            print(f"{row['prompt_tokens']:>14}{row['seconds']:>10.3f}{row['tok_s']:>12.0f}{_size(row['cache_bytes']):>12}"
                  f"{_size(peak) if peak is not None else '-':>20}")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024


if __name__ == "__main__":
    main()
