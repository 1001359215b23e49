"""`lmforge serve MODEL`: the OpenAI-compatible server, on uvicorn, with a graceful SIGTERM drain.

    lmforge serve runs/my-model                                      # http://127.0.0.1:8000/v1
    lmforge serve runs/my-model --host 0.0.0.0 --port 8080 --served_model_name my-model --engine.max_num_seqs 64
    LMFORGE_API_KEY=secret lmforge serve runs/my-model               # clients send Authorization: Bearer secret

The port opens at once; the model loads in the background (GET /health answers 503 until it is ready, then
200). SIGTERM or Ctrl-C: stop accepting connections, let the requests in flight finish (at most
`drain_timeout` seconds), then exit 0.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import uvicorn

from lmforge.serve.app import MAX_BODY_BYTES, Served, build_app

log = logging.getLogger("lmforge.serve")


@dataclass
class EngineOptions:
    """Sizing of the serving engine (see `LLMEngine`).

    Args:
        block_size: tokens per KV block.
        num_blocks: KV blocks in the pool (default: kv_cache_fraction of the free GPU memory; on the CPU room
            for max_num_seqs sequences of up to 2048 tokens).
        kv_cache_fraction: share of the free GPU memory the KV pool takes when num_blocks is not given.
        max_num_batched_tokens: tokens one engine step computes at most (decodes and pre-fill chunks).
        max_num_seqs: sequences running at once.
        max_waiting: requests queued beyond those; more are answered 429 with Retry-After.
    """

    block_size: int = 16
    num_blocks: int | None = None
    kv_cache_fraction: float = 0.8
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 128
    max_waiting: int = 1024


def load_served(model: Path, tokenizer: Path | None, device: str | None, dtype: str | None,
                served_model_name: str | None, engine: EngineOptions, max_model_len: int | None) -> Served:
    """Load the model folder, its tokenizer and chat template, and build the engine."""
    from lmforge.infer.cli import _load
    from lmforge.infer.engine import LLMEngine
    from lmforge.serve.chat_template import ChatTemplate

    net, tok = _load(Path(model), tokenizer, device, dtype)
    config = net.config
    if max_model_len is None:
        max_model_len = config.max_seq_len
    elif max_model_len < 2 or (config.sliding_window is None and max_model_len > config.max_seq_len):
        limit = f"at most the context {config.max_seq_len}" if config.sliding_window is None else "at least 2"
        raise ValueError(f"--max_model_len {max_model_len}: must be {limit}")
    options = asdict(engine)
    if options["max_num_batched_tokens"] < options["max_num_seqs"]:
        options["max_num_batched_tokens"] = options["max_num_seqs"]
    llm = LLMEngine(net, eos_id=tok.eos_id, **options)
    name = served_model_name or Path(model).name
    return Served(llm, tok, ChatTemplate.from_folder(model, tok), name, max_model_len)


class DrainingServer(uvicorn.Server):
    """uvicorn's Server with our signal handling: SIGINT / SIGTERM start the graceful shutdown, then `run()`
    returns (a second Ctrl-C stops at once).

    NOTE: uvicorn's own `capture_signals` re-raises the captured signal once its graceful shutdown is done, so
    after draining cleanly the process would still die of SIGTERM (exit status -15, which orchestrators read
    as a crash). We install the handlers ourselves and never re-raise.
    """

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield
            return
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, sig, frame) -> None:
        log.info("%s: draining (finishing the requests in flight)", signal.Signals(sig).name)
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        self.should_exit = True


def serve(
    model: Path,
    tokenizer: Path | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    served_model_name: str | None = None,
    max_model_len: int | None = None,
    engine: EngineOptions = EngineOptions(),
    device: str | None = None,
    dtype: Literal["float32", "bfloat16", "float16"] | None = None,
    drain_timeout: float = 30.0,
    max_body_bytes: int = MAX_BODY_BYTES,
    log_level: Literal["debug", "info", "warning", "error"] = "info",
) -> None:
    """Serve a model folder (ours, Hugging Face or Meta) over an OpenAI-compatible HTTP API.

    Routes: GET /health, GET /metrics, GET /v1/models, POST /v1/chat/completions, POST /v1/completions.

    Args:
        model: model folder; its tokenizer.model is used unless --tokenizer is given, and its chat template
            (tokenizer_config.json of a Hugging Face folder) if it has one, else Llama 2's format.
        tokenizer: a SentencePiece tokenizer.model.
        host: address to listen on (0.0.0.0 to accept connections from other machines).
        port: TCP port.
        api_key: require `Authorization: Bearer KEY` on /v1 routes (default: the LMFORGE_API_KEY environment
            variable, or no key). Prefer the variable: a command line is visible to every user of the machine.
        served_model_name: the `model` clients must send (default: the folder's name).
        max_model_len: prompt + output tokens at most (default: the model's max_seq_len).
        engine: the engine's sizing (--engine.max_num_seqs 64, ...).
        device: cuda or cpu (default: cuda when available).
        dtype: cast the weights (default: as stored).
        drain_timeout: seconds the requests in flight get to finish after SIGTERM.
        max_body_bytes: larger request bodies are answered 413.
        log_level: of the server's log (one access line per request, with its request id).
    """
    if not Path(model).is_dir():
        raise FileNotFoundError(f"{model} is not a folder (expected a model folder)")
    if not 0 <= port < 65536:
        raise ValueError(f"--port {port}: must be in [0, 65535]")
    api_key = api_key if api_key is not None else os.environ.get("LMFORGE_API_KEY") or None
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = build_app(lambda: load_served(model, tokenizer, device, dtype, served_model_name, engine, max_model_len),
                    api_key=api_key, max_body_bytes=max_body_bytes)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=drain_timeout)
    server = DrainingServer(config)
    state = app.state.server
    state.on_load_error = lambda error: setattr(server, "should_exit", True)
    server.run()
    if state.load_error is not None:
        raise state.load_error


__all__ = ["DrainingServer", "EngineOptions", "load_served", "serve"]
