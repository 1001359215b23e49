"""Serving throughput and latency of `LLMEngine` against transformers' batched `generate`.

Run on the device machine (one H100), from the repository root:

    PYTHONPATH=src python3 benchmarks/serving.py --only a      # 64 x (128 in / 256 out), Llama-2-7B shapes
    PYTHONPATH=src python3 benchmarks/serving.py --only b      # chat-like traffic, Mistral-7B shapes
    PYTHONPATH=src python3 benchmarks/serving.py --quick       # tiny shapes on the CPU (smoke test, < 20 s)
    PYTHONPATH=src python3 benchmarks/serving.py --only b --http --no-hf   # (b) driven directly, then over HTTP

Weights are random (bf16 on CUDA); every request ignores the end-of-sequence token, so lengths are exact.

Each engine first serves the whole workload once (its captures and compiles), then again for the figures.
(a) All 64 requests at once. Decode tokens/s is measured over the steps where every scheduled chunk is a
    decode; its bandwidth limit is B / ((weight bytes + live KV bytes at the mean context) / copy bandwidth),
    the copy bandwidth measured in the same call (a device-to-device copy: read + write bytes / time).
(b) Prompts ~ lognormal with mean about 200 tokens, outputs mean about 180 (long tails, clipped), sent all at
    once (a first pass, reported as "b-first-pass", then the measured one) and at fixed Poisson arrival
    rates. Per request: time to first token (TTFT, from arrival) and time per output token (TPOT,
    (last - first token time) / (outputs - 1)); median and p99.
Baseline: transformers `generate` on the same shapes and weights layout (random), static batches (all 64
for (a); (b) in arrival order, batches of --hf-batch, each running to its longest output, on the first
--hf-requests requests). --http: (b) again through our server (serving_http.py), one "b-http" row per rate
next to the engine's, with requests_per_s_vs_engine and ttft_median_ms_over_engine. Prints JSON lines; writes
$OUT/serving.json when $OUT is set.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import time

import torch

from lmforge import ModelConfig, Transformer
from lmforge.infer.engine import LLMEngine
from lmforge.infer.fuse import unfuse_projections
from lmforge.infer.sampling import SamplingParams
from lmforge.models.convert import model_config_to_hf_config


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device: str, nbytes: int) -> float:
    """Bytes/s of a large copy (read + write)."""
    x = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    sync(device)
    n = 10
    t = time.perf_counter()
    for _ in range(n):
        y.copy_(x)
    sync(device)
    return 2 * nbytes * n / (time.perf_counter() - t)


def build_model(config: ModelConfig, device: str, dtype: torch.dtype) -> Transformer:
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = Transformer(config)
    finally:
        torch.set_default_dtype(default)
    model.to_empty(device=device)
    model.init_weights()
    return model.eval()


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q / 100 * len(xs)) - 1))] if xs else float("nan")


def drive(engine: LLMEngine, prompts, outs, rate: float | None, seed: int = 0) -> dict:
    """Send requests (all at once if rate is None, else Poisson at `rate` per second); step until done."""
    g = torch.Generator().manual_seed(seed)
    gaps = torch.empty(len(prompts)).exponential_(generator=g) / rate if rate else torch.zeros(len(prompts))
    arrivals = torch.cumsum(gaps, 0).tolist()
    first, last, count, arrived = {}, {}, {}, {}
    decode_time, decode_tokens = 0.0, 0
    nxt, t0 = 0, time.perf_counter()
    while nxt < len(prompts) or engine.has_unfinished():
        now = time.perf_counter() - t0
        while nxt < len(prompts) and arrivals[nxt] <= now:
            params = SamplingParams(temperature=1.0, max_new_tokens=outs[nxt], ignore_eos=True, seed=nxt)
            rid = engine.add_request(prompts[nxt], params)
            arrived[rid] = arrivals[nxt]
            nxt += 1
        if not engine.has_unfinished():
            time.sleep(max(0.0, arrivals[nxt] - (time.perf_counter() - t0)))
            continue
        s, computed = time.perf_counter(), engine.counters.computed_tokens
        results = engine.step()
        t = time.perf_counter() - t0
        if results and engine.counters.computed_tokens - computed == len(results):
            decode_time += t + t0 - s  # a step of decodes only: every computed token was sampled from
            decode_tokens += len(results)
        for r in results:
            first.setdefault(r.request_id, t)
            last[r.request_id] = t
            count[r.request_id] = count.get(r.request_id, 0) + len(r.new_token_ids)
    wall = time.perf_counter() - t0
    ttft = [first[r] - arrived[r] for r in arrived]
    tpot = [(last[r] - first[r]) / (count[r] - 1) for r in arrived if count[r] > 1]
    total_out = sum(count.values())
    assert total_out == sum(outs), "lost or duplicated tokens"
    return {
        "requests": len(prompts), "rate": rate, "wall_s": round(wall, 3),
        "requests_per_s": round(len(prompts) / wall, 3), "output_tok_per_s": round(total_out / wall, 1),
        "decode_tok_per_s": round(decode_tokens / decode_time, 1) if decode_time else None,
        "ttft_ms_median": round(1e3 * statistics.median(ttft), 2), "ttft_ms_p99": round(1e3 * percentile(ttft, 99), 2),
        "tpot_ms_median": round(1e3 * statistics.median(tpot), 2) if tpot else None,
        "tpot_ms_p99": round(1e3 * percentile(tpot, 99), 2) if tpot else None,
        "preemptions": engine.counters.preemptions,
    }


def profile_steps(engine: LLMEngine, prompts, outs: list[int], device: str, phase: str, steps: int = 20) -> None:
    """Print the kernels (and host time) of `steps` engine steps of `prompts`: in their decode phase
    (phase "decode": every pre-fill done first) or from their start (phase "mixed": pre-fill chunks and decodes)."""
    from torch.profiler import ProfilerActivity, profile

    for i, (p, n) in enumerate(zip(prompts, outs)):
        engine.add_request(p, SamplingParams(temperature=1.0, max_new_tokens=n, ignore_eos=True, seed=i))
    if phase == "decode":
        while engine.counters.waiting or any(s.num_to_compute > 1 for s in engine.scheduler.running):
            engine.step()  # pre-fill done: what follows is decode only
    for _ in range(3):
        engine.step()
    sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    t = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            engine.step()
        sync(device)
    wall = time.perf_counter() - t
    print(f"--- profile: {steps} {phase} steps of {len(prompts)} requests, {1e3 * wall / steps:.1f} ms a step "
          f"(under the profiler) ---")
    sort = "cuda_time_total" if device == "cuda" else "cpu_time_total"
    averages = prof.key_averages()
    print(averages.table(sort_by=sort, row_limit=25, max_name_column_width=70))
    phases: dict[str, float] = {}  # NOTE: a range appears twice, on the host and as a GPU annotation (no CPU time)
    for e in averages:
        if e.key.startswith("engine."):
            phases[e.key] = max(phases.get(e.key, 0.0), round(e.cpu_time_total / steps / 1e3, 2))
    print(f"host ms a step by phase, waits for the GPU included: {json.dumps(phases)}")
    for seq in list(engine.seqs):
        engine.abort(seq)


def hf_generate(config: ModelConfig, device: str, dtype: torch.dtype, prompts, outs, batch: int) -> dict:
    """transformers' batched generate, static batches of `batch` in order; tokens/s counts requested tokens."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hf = model_config_to_hf_config(config, dtype)
    cfg = AutoConfig.for_model(hf.pop("model_type"), **{k: v for k, v in hf.items() if k != "architectures"})
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg).eval()
    finally:
        torch.set_default_dtype(default)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    sync(device)
    t0 = time.perf_counter()
    for i in range(0, len(prompts), batch):
        ps, n = prompts[i : i + batch], max(outs[i : i + batch])
        T = max(len(p) for p in ps)
        ids = torch.tensor([[0] * (T - len(p)) + p for p in ps], device=device)
        mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in ps], device=device)
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    sync(device)
    wall = time.perf_counter() - t0
    del model
    return {"requests": len(prompts), "wall_s": round(wall, 3), "requests_per_s": round(len(prompts) / wall, 3),
            "output_tok_per_s": round(sum(outs) / wall, 1)}


def lognormal_lengths(n: int, mean: float, sigma: float, lo: int, hi: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    mu = math.log(mean) - sigma**2 / 2  # E[lognormal] = exp(mu + sigma^2 / 2) = mean
    return [int(min(hi, max(lo, x))) for x in torch.empty(n).log_normal_(mu, sigma, generator=g).tolist()]


def free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="a,b", help="scenarios to run: a, b or a,b")
    ap.add_argument("--quick", action="store_true", help="tiny shapes on the CPU")
    ap.add_argument("--rates", default="4,16", help="(b) Poisson arrival rates in requests/s, besides all at once")
    ap.add_argument("--requests", type=int, default=256, help="(b) number of requests")
    ap.add_argument("--hf-requests", type=int, default=64, help="(b) requests the transformers baseline serves")
    ap.add_argument("--hf-batch", type=int, default=32)
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    ap.add_argument("--http", action="store_true", help="(b) also through lmforge's HTTP server (serving_http.py)")
    ap.add_argument("--profile", action="store_true",
                    help="print a kernel profile: (a) of 20 decode steps per path, (b) of 20 steps from the start")
    ap.add_argument("--attention", default=None, choices=["varlen", "padded", "reference"],
                    help="attention of the packed steps (default: the engine's: varlen on CUDA, padded on the CPU)")
    ap.add_argument("--decode-paths", default=None,
                    help="engine decode paths to run (a) with, comma-separated: packed, eager, cuda_graph, compile, "
                         "each optionally /sdpa, /fused or /triton for its attention (else the engine's default: "
                         "triton on CUDA) and +sync (no overlap of host work with the GPU) or +unfused (no fused "
                         "projections), e.g. compile/triton or cuda_graph/fused+sync+unfused (the engine before "
                         "issue 16, but for its sampling) (default: cuda_graph on CUDA, packed on the CPU); (b) uses "
                         "the first")
    args = ap.parse_args(argv)
    quick, only = args.quick, set(args.only.split(","))
    device = "cpu" if quick or not torch.cuda.is_available() else "cuda"
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    threads = torch.get_num_threads()
    if quick:  # NOTE: tiny matrices gain nothing from threads, and lose a lot on a busy CI machine
        torch.set_num_threads(1)
    try:
        return run(args, quick, only, device, dtype)
    finally:
        torch.set_num_threads(threads)


def run(args, quick: bool, only: set[str], device: str, dtype: torch.dtype) -> list[dict]:
    rows: list[dict] = []

    def emit(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)

    bw = copy_bandwidth(device, (1 << 24) if quick else (1 << 31))
    emit({"case": "copy_bandwidth", "device": device, "GB_per_s": round(bw / 1e9, 1)})
    paths = (args.decode_paths or ("cuda_graph" if device == "cuda" else "packed")).split(",")

    def path_kw(path: str) -> dict:  # "cuda_graph/sdpa+sync" -> decode_path, decode_attention, overlap=False
        spec, *flags = path.split("+")
        name, _, attention = spec.partition("/")
        kw = {"decode_path": name, "decode_attention": attention or None}
        unknown = set(flags) - {"sync", "unfused"}
        if unknown:
            raise SystemExit(f"unknown decode path flag(s) {sorted(unknown)} in {path!r}: use +sync, +unfused")
        if "sync" in flags:
            kw["overlap"] = False
        if "unfused" in flags:
            kw["fuse_projections"] = False
        return kw

    engine_kw = dict(block_size=16, max_num_batched_tokens=256 if quick else 4096, max_num_seqs=64 if quick else 256,
                     attention=args.attention, **path_kw(paths[0]))
    if quick:
        engine_kw["num_blocks"] = 512

    if "a" in only:
        config = ModelConfig.from_name("tiny") if quick else ModelConfig.from_name("llama2-7b")
        B, P, O = (4, 16, 8) if quick else (64, 128, 256)
        model = build_model(config, device, dtype)
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(3, config.vocab_size, (P,), generator=g).tolist() for _ in range(B)]
        weight_bytes = sum(  # every weight is read each step, except the embedding (B rows of it)
            p.numel() * p.element_size() for n, p in model.named_parameters() if n != "tok_embeddings.weight"
        )
        kv_per_token = 2 * config.n_layers * config.n_kv_heads * config.head_dim * dtype.itemsize
        step_bytes = weight_bytes + B * (P + O / 2) * kv_per_token  # at the mean context of the decode phase
        limit = B / (step_bytes / bw)
        for path in paths:
            kw = engine_kw | path_kw(path)
            if kw.get("fuse_projections") is False:  # an earlier path's engine fused the model in place
                unfuse_projections(model)
            engine = LLMEngine(model, **kw)
            drive(engine, prompts, [O] * B, None)  # warm-up: captures and compiles for every shape of the run
            res = drive(engine, prompts, [O] * B, None)
            if args.profile:
                print(f"decode path {path}:")
                profile_steps(engine, prompts, [O] * B, device, "decode")
            res.update(case="a", config="tiny" if quick else "llama2-7b", decode_path=path, batch=B, prompt=P,
                       output=O, bandwidth_limit_tok_per_s=round(limit, 1),
                       fraction_of_limit=round(res["decode_tok_per_s"] / limit, 3) if res["decode_tok_per_s"] else None)
            emit(res)
            del engine
            free(device)
        del model
        free(device)
        if not args.no_hf:
            hf = hf_generate(config, device, dtype, prompts, [O] * B, B)
            hf.update(case="a-transformers", batch=B)
            emit(hf)
            free(device)

    if "b" in only:
        config = ModelConfig.from_name("tiny-swa", sliding_window=64) if quick else ModelConfig.from_name("mistral-7b")
        N = 12 if quick else args.requests
        in_mean, out_mean = (20, 8) if quick else (200, 180)
        P = lognormal_lengths(N, in_mean, 0.8, 4, (4 if quick else 16) * in_mean, seed=1)
        O = lognormal_lengths(N, out_mean, 0.8, 2, 8 * out_mean, seed=2)
        g = torch.Generator().manual_seed(3)
        prompts = [torch.randint(3, config.vocab_size, (p,), generator=g).tolist() for p in P]
        model = build_model(config, device, dtype)
        engine = LLMEngine(model, **engine_kw)
        if args.profile:
            profile_steps(engine, prompts, O, device, "mixed")
        rates = [None] + [float(r) for r in args.rates.split(",") if r]
        # the first pass (all at once) also warms up: CUDA graph captures and compiles of the shapes it meets
        direct = {}
        for i, rate in enumerate([None] + ([None, 50.0] if quick else rates)):
            res = drive(engine, prompts, O, rate)
            res.update(case="b" if i else "b-first-pass", config="tiny-swa" if quick else "mistral-7b",
                       decode_path=paths[0], prompt_mean=round(statistics.mean(P), 1),
                       output_mean=round(statistics.mean(O), 1))
            emit(res)
            if i:
                direct[rate] = res
        if args.http:
            from serving_http import drive_http

            for (rate, ref), res in zip(direct.items(), drive_http(engine, prompts, O, list(direct))):
                res.update(case="b-http", config=ref["config"], decode_path=paths[0],
                           requests_per_s_vs_engine=round(res["requests_per_s"] / ref["requests_per_s"], 3),
                           ttft_median_ms_over_engine=round(res["ttft_ms_median"] - ref["ttft_ms_median"], 2))
                emit(res)
        del engine, model
        free(device)
        if not args.no_hf:
            n = min(N, args.hf_requests)
            hf = hf_generate(config, device, dtype, prompts[:n], O[:n], args.hf_batch)
            hf.update(case="b-transformers", batch=args.hf_batch)
            emit(hf)
            free(device)

    if "OUT" in os.environ:
        name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
        with open(os.path.join(os.environ["OUT"], "serving.json"), "w") as f:
            json.dump({"device": name, "date": time.strftime("%Y-%m-%d"), "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
