"""The reliability suite, on loopback, bounded in requests and time: load, overload, disconnects, fuzzing, SIGTERM.

Each test prints one JSON line of figures (requests, concurrency, answers by status, latency percentiles);
benchmarks/RESULTS.md records them.
"""

import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time

import httpx
import pytest

from serve_helpers import MODEL, free_socket, live_server, tiny_engine, tiny_model, tiny_served
from lmforge.infer.sampling import SamplingParams

WORDS = "the quick brown fox jumps over lazy dog model token train data loss value".split()


def prompts_and_budgets(n: int):
    """n distinct (prompt, max_tokens) pairs: different answers, so a cross-wired stream shows."""
    return [(" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(2 + i % 5)) + f" {i}", 4 + i % 7)
            for i in range(n)]


def greedy_texts(served, cases) -> dict[str, str]:
    """prompt -> greedy answer, from one batch of a fresh engine on the same model (each request alone gives the
    same tokens: the engine's own tests hold batched logits to those of one sequence)."""
    tok = served.tokenizer
    engine = tiny_engine(served.engine.model, tok.eos_id)
    params = [SamplingParams(temperature=0, max_new_tokens=m) for _, m in cases]
    outs = engine.generate([tok.encode(p, bos=True) for p, _ in cases], params)
    return {p: tok.decode(ids[:-1] if ids[-1] == tok.eos_id else ids) for (p, _), ids in zip(cases, outs)}


def percentile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(round(q / 100 * len(xs) + 0.5)) - 1))]


async def stream_completion(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int, rid: str):
    """(status, text, finish_reason, seconds) of one streamed completion, read chunk by chunk."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    t = time.monotonic()
    text, finish, done = "", None, False
    async with client.stream("POST", url + "/v1/completions", json=body, headers={"X-Request-Id": rid}) as r:
        if r.status_code != 200:
            await r.aread()
            return r.status_code, r.headers.get("retry-after"), None, time.monotonic() - t
        assert r.headers["x-request-id"] == rid
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            chunk = json.loads(line[6:])
            assert chunk["id"] == f"cmpl-{rid}"
            (choice,) = chunk["choices"]
            text += choice["text"]
            finish = choice["finish_reason"] or finish
    assert done, "the stream ended without data: [DONE]"
    return 200, text, finish, time.monotonic() - t


def figures(name, results, concurrency, wall):
    by_status: dict[str, int] = {}
    for status, *_ in results:
        by_status[str(status)] = by_status.get(str(status), 0) + 1
    ok = [r[3] for r in results if r[0] == 200]
    row = {"test": name, "requests": len(results), "concurrency": concurrency, "by_status": by_status,
           "wall_s": round(wall, 2), "p50_ms": round(1e3 * statistics.median(ok), 1),
           "p99_ms": round(1e3 * percentile(ok, 99), 1)}
    print(json.dumps(row))
    return row


def test_hundreds_of_concurrent_streams_none_lost_duplicated_or_cross_wired(served):
    cases = prompts_and_budgets(40)
    expected = greedy_texts(served, cases)
    N = 200
    with live_server(served) as url:
        async def main():
            limits = httpx.Limits(max_connections=N, max_keepalive_connections=N)
            async with httpx.AsyncClient(timeout=120, limits=limits) as client:
                jobs = [stream_completion(client, url, *cases[i % len(cases)], f"load-{i}") for i in range(N)]
                return await asyncio.gather(*jobs)

        t = time.monotonic()
        results = asyncio.run(main())
        wall = time.monotonic() - t
        metrics = httpx.get(url + "/metrics").text
    figures("load", results, N, wall)
    for i, (status, text, finish, _) in enumerate(results):
        prompt, _ = cases[i % len(cases)]
        assert status == 200 and text == expected[prompt] and finish in ("stop", "length"), i
    assert 'lmforge_http_requests_total{route="/v1/completions",status="200"} 200.0' in metrics
    assert "lmforge_kv_cache_blocks_used 0.0" in metrics


def test_overload_is_answered_429_with_retry_after_and_nothing_accepted_is_lost(tokenizer_path):
    # 4 sequences run, 4 wait; the rest of 60 concurrent requests are refused
    served = tiny_served(tokenizer_path, max_num_seqs=4, max_num_batched_tokens=64, max_waiting=4)
    cases = prompts_and_budgets(12)
    expected = greedy_texts(served, cases)
    N = 60
    with live_server(served) as url:
        async def main():
            async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=N)) as client:
                return await asyncio.gather(*(stream_completion(client, url, *cases[i % 12], f"over-{i}")
                                              for i in range(N)))

        t = time.monotonic()
        results = asyncio.run(main())
        wall = time.monotonic() - t
        assert httpx.get(url + "/health").status_code == 200  # still up
    row = figures("overload", results, N, wall)
    assert set(row["by_status"]) == {"200", "429"} and row["by_status"]["429"] >= 10
    for i, (status, text, *_rest) in enumerate(results):
        if status == 429:
            assert text == "1"  # the Retry-After header
        else:
            assert text == expected[cases[i % 12][0]]


def test_a_client_that_disconnects_mid_stream_frees_its_blocks(tokenizer_path):
    model = tiny_model(5)
    model.register_forward_pre_hook(lambda *args: time.sleep(0.004))  # at least ~1 s for the 240 tokens below
    served = tiny_served(tokenizer_path, model)

    def gauge(url, name):
        for line in httpx.get(url + "/metrics").text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])

    with live_server(served) as url:
        body = {"model": MODEL, "prompt": "the quick", "max_tokens": 240, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(4)]
            assert all(line.startswith("data: ") or line == "" for line in got)
            assert gauge(url, "lmforge_kv_cache_blocks_used") > 0  # still generating
        deadline = time.monotonic() + 10
        while gauge(url, "lmforge_kv_cache_blocks_used") > 0:
            assert time.monotonic() < deadline, "the blocks were not freed after the client left"
            time.sleep(0.01)
        assert gauge(url, "lmforge_requests_aborted_total") == 1
        assert gauge(url, "lmforge_engine_steps_total") < 200  # aborted long before its 240 tokens


def test_schemathesis_finds_no_server_error(server):
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(server + "/openapi.json")
    statuses: dict[int, int] = {}
    for path in ("/v1/chat/completions", "/v1/completions"):
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            strategy = schema[path]["POST"].as_strategy(generation_mode=mode)

            @settings(max_examples=12, deadline=None, database=None, suppress_health_check=list(HealthCheck))
            @given(case=strategy)
            def run(case):
                if mode is GenerationMode.POSITIVE and isinstance(case.body, dict):
                    case.body["model"] = MODEL  # else every valid request is a 404 (unknown model)
                response = case.call(base_url=server, timeout=60)
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                assert response.status_code < 500, response.text
                if response.status_code >= 400:
                    assert set(response.json()["error"]) == {"message", "type", "param", "code"}

            run()
    print(json.dumps({"test": "schemathesis", "requests": sum(statuses.values()), "by_status": statuses}))
    assert statuses.get(200, 0) >= 1  # valid cases were served, not only refused
    assert httpx.get(server + "/health").status_code == 200


@pytest.mark.slow
def test_sigterm_drains_the_requests_in_flight_and_exits_0(tmp_path, tokenizer_path):
    from lmforge.models.checkpoint import save_model

    folder = save_model(tiny_model(), tmp_path / "model", tokenizer_path=tokenizer_path)
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lmforge.cli", "serve", str(folder), "--port", str(port),
                             "--device", "cpu", "--drain_timeout", "60", "--engine.num_blocks", "256",
                             "--served_model_name", MODEL, "--log_level", "warning"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        t0 = deadline = time.monotonic()
        deadline += 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.1)

        async def main():
            async with httpx.AsyncClient(timeout=120) as client:
                body = {"model": MODEL, "prompt": "the", "max_tokens": 100, "ignore_eos": True, "stream": True,
                        "logprobs": 0}  # each chunk lists its tokens: a chunk can carry several
                started = asyncio.Event()
                counts = []

                async def one(i):
                    n, finish = 0, None
                    async with client.stream("POST", url + "/v1/completions", json=body) as r:
                        assert r.status_code == 200
                        async for line in r.aiter_lines():
                            if line.startswith("data: {"):
                                choice = json.loads(line[6:])["choices"][0]
                                n += len(choice["logprobs"]["tokens"]) if choice["logprobs"] else 0
                                finish = choice["finish_reason"] or finish
                                started.set()
                    counts.append((n, finish))

                tasks = [asyncio.create_task(one(i)) for i in range(4)]
                await started.wait()
                proc.send_signal(signal.SIGTERM)
                in_flight = sum(not t.done() for t in tasks)
                await asyncio.gather(*tasks)
                return in_flight, counts

        t1 = time.monotonic()
        in_flight, counts = asyncio.run(main())
        code = proc.wait(60)
        print(json.dumps({"test": "sigterm", "startup_s": round(t1 - t0, 1), "requests": 4, "in_flight": in_flight,
                          "drain_s": round(time.monotonic() - t1, 1), "exit": code}))
        assert in_flight == 4
        assert all(finish == "length" and n >= 100 for n, finish in counts), counts  # every token, then the end
        assert code == 0
        with pytest.raises(httpx.TransportError):
            httpx.get(url + "/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_forward_pass_never_blocks_the_event_loop(tokenizer_path):
    import threading

    model = tiny_model(6)
    threads = set()

    def slow(*args):  # every forward pass takes 1 s, and records the thread it runs on
        threads.add(threading.current_thread().name)
        time.sleep(1.0)

    model.register_forward_pre_hook(slow)
    with live_server(tiny_served(tokenizer_path, model)) as url:
        body = {"model": MODEL, "prompt": "the", "max_tokens": 2, "ignore_eos": True}
        worker = threading.Thread(target=lambda: httpx.post(url + "/v1/completions", json=body, timeout=30))
        worker.start()
        time.sleep(0.1)
        waits = []
        while worker.is_alive():
            t = time.monotonic()
            assert httpx.get(url + "/health", timeout=5).status_code == 200
            waits.append(time.monotonic() - t)
        worker.join()
    assert threads == {"lmforge-engine"}
    # a step takes 1 s: /health never waited for one (the margin is for a loaded 2-core machine)
    assert len(waits) >= 5 and max(waits) < 0.7 and statistics.median(waits) < 0.2


def test_an_engine_failure_mid_stream_is_an_error_event_and_the_server_carries_on(tokenizer_path):
    served = tiny_served(tokenizer_path, tiny_model(7))
    engine, step, calls = served.engine, served.engine.step, []

    def failing_step():  # the 5th step raises, as a device error would
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("simulated device error")
        return step()

    engine.step = failing_step
    with live_server(served) as url:
        body = {"model": MODEL, "prompt": "the", "max_tokens": 20, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
            assert r.status_code == 200
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["type"] == "server_error" and "simulated device error" in error["message"]
        assert all("choices" in json.loads(e) for e in events[:-2])  # tokens, then the error: no cut stream
        r = httpx.post(url + "/v1/completions", json={**body, "stream": False})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 20
