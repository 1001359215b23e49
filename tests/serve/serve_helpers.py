"""A tiny random model as a `Served`, and the real server (uvicorn) on 127.0.0.1 in a background thread."""

import contextlib
import socket
import threading
import time

import torch

from helpers import unit_scale_
from lmforge import ModelConfig, Transformer
from lmforge.infer.engine import LLMEngine
from lmforge.serve.app import Served, build_app
from lmforge.serve.chat_template import ChatTemplate
from lmforge.tokenizer import Tokenizer

MODEL = "tiny-test"


def tiny_model(seed: int = 0) -> Transformer:
    """Unit-scale random weights: logits O(1), so greedy answers vary from prompt to prompt."""
    torch.manual_seed(seed)
    return unit_scale_(Transformer(ModelConfig.from_name("tiny"))).eval()


def tiny_engine(model: Transformer, eos_id: int, **kw) -> LLMEngine:
    kw = {"block_size": 8, "num_blocks": 512, "max_num_batched_tokens": 512, "max_num_seqs": 64, **kw}
    return LLMEngine(model, eos_id=eos_id, **kw)


def tiny_served(tokenizer_path, model: Transformer | None = None, **engine_kw) -> Served:
    tok = Tokenizer(tokenizer_path)
    model = model if model is not None else tiny_model()
    return Served(tiny_engine(model, tok.eos_id, **engine_kw), tok, ChatTemplate(tok), MODEL, model.config.max_seq_len)


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextlib.contextmanager
def live_server(served, timeout: float = 30.0, wait_healthy: bool = True, **app_kw):
    """uvicorn serving `build_app(served)` on a free loopback port; yields the base URL once /health is 200
    (or, without `wait_healthy`, once it answers at all)."""
    import httpx
    import uvicorn

    app = build_app(served, **app_kw)
    sock = free_socket()
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200 or not wait_healthy:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not become healthy")
        time.sleep(0.02)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()
