"""Serving over HTTP: the same workload as `serving.py`'s driven engine, sent to our server as streamed requests.

Used by `serving.py --http` (scenario b): after the engine has served the workload directly, the same engine
(its CUDA graphs and compiles already warm) is put behind `lmforge.serve` on 127.0.0.1 in this process, exactly
as `lmforge serve` runs it (uvicorn's event loop in one thread, the engine's driver in another), and a client in
a separate process (so it takes no time from the server's interpreter) replays the arrivals: POST
/v1/completions with the prompt's ids, stream true, ignore_eos, the request's max_tokens and seed. Per request:
TTFT = first streamed token - arrival, TPOT as in serving.py; requests/s over the whole run.

The weights are random and the prompts are ids, so the server gets a stand-in tokenizer: every id decodes to
"x" (the text is then one character per token, which is how the client counts tokens).
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import statistics
import threading
import time

# NOTE: no torch (or lmforge) import at module level: the spawned client process imports this module, and
# should start in well under a second.


class StandInTokenizer:
    """What the server needs of a tokenizer, for random ids: every id is the one-character text "x"."""

    def __init__(self, vocab_size: int):
        self.vocab_size, self.bos_id, self.eos_id, self.unk_id, self.pad_id = vocab_size, 1, 2, 0, -1

    def decode(self, ids) -> str:
        return "x" * len(ids)

    def id_to_piece(self, i: int) -> str:
        return "x"

    def piece_to_id(self, piece: str) -> int:
        return 0

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        raise ValueError("the stand-in tokenizer serves id prompts only")


class ServerThread:
    """`lmforge.serve` around an existing engine, on a free loopback port, in a background thread."""

    def __init__(self, engine, name: str = "bench"):
        import socket

        import uvicorn

        from lmforge.serve.app import Served, build_app
        from lmforge.serve.chat_template import ChatTemplate

        tok = StandInTokenizer(engine.config.vocab_size)
        served = Served(engine, tok, ChatTemplate(tok), name, 1 << 30)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(build_app(served), log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> str:
        import httpx

        self.thread.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self.url
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise RuntimeError("the benchmark server did not start")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


def _client(url: str, prompts, outs, arrivals: list[float]) -> tuple[list[tuple], float]:
    """Replay the requests at their arrival times (runs in its own process, which imports no torch):
    per request (arrival, first token, last token, tokens) in seconds from the start, and the wall time."""
    import httpx

    async def main():
        limits = httpx.Limits(max_connections=len(prompts), max_keepalive_connections=len(prompts))
        async with httpx.AsyncClient(timeout=3600, limits=limits) as client:
            t0 = time.perf_counter()

            async def one(i: int):
                await asyncio.sleep(max(0.0, arrivals[i] - (time.perf_counter() - t0)))
                body = {"model": "bench", "prompt": prompts[i], "max_tokens": outs[i], "temperature": 1.0,
                        "seed": i, "ignore_eos": True, "stream": True}
                first = last = None
                count = 0
                async with client.stream("POST", url + "/v1/completions", json=body) as r:
                    if r.status_code != 200:
                        raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            n = len(json.loads(line[6:])["choices"][0]["text"])
                            if n:
                                now = time.perf_counter() - t0
                                first = now if first is None else first
                                last, count = now, count + n
                return arrivals[i], first, last, count

            results = await asyncio.gather(*(one(i) for i in range(len(prompts))))
            return results, time.perf_counter() - t0

    return asyncio.run(main())


def drive_http(engine, prompts, outs, rates: list[float | None], seed: int = 0) -> list[dict]:
    """serving.py's `drive` over HTTP, for each rate: the engine behind the server, the client in a spawned
    process; the same arrival times as `drive` (its seeded Poisson gaps)."""
    import torch
    from serving import percentile

    rows = []
    with ServerThread(engine) as url, multiprocessing.get_context("spawn").Pool(1) as pool:
        for rate in rates:
            g = torch.Generator().manual_seed(seed)
            gaps = torch.empty(len(prompts)).exponential_(generator=g) / rate if rate else torch.zeros(len(prompts))
            results, wall = pool.apply(_client, (url, prompts, outs, torch.cumsum(gaps, 0).tolist()))
            ttft = [f - a for a, f, _, _ in results]
            tpot = [(la - f) / (n - 1) for _, f, la, n in results if n > 1]
            total = sum(n for *_, n in results)
            assert total == sum(outs), f"lost or duplicated tokens: {total} != {sum(outs)}"
            rows.append({
                "requests": len(prompts), "rate": rate, "wall_s": round(wall, 3),
                "requests_per_s": round(len(prompts) / wall, 3), "output_tok_per_s": round(total / wall, 1),
                "ttft_ms_median": round(1e3 * statistics.median(ttft), 2),
                "ttft_ms_p99": round(1e3 * percentile(ttft, 99), 2),
                "tpot_ms_median": round(1e3 * statistics.median(tpot), 2) if tpot else None,
                "tpot_ms_p99": round(1e3 * percentile(tpot, 99), 2) if tpot else None,
            })
    return rows


__all__ = ["ServerThread", "StandInTokenizer", "drive_http"]
