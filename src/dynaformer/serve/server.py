"""The `dynaformer serve` process: load the run, open the listening socket (so a port in use is one line and exit
2, before uvicorn starts), run uvicorn, and on SIGTERM or Ctrl-C drain: refuse new requests (503), let the
in-flight ones finish within `drain_s`, cancel the rest, exit 0."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

from ..errors import DynaformerError
from ..extras import require
from .config import ServeConfig
from .source import source_kind

API_KEY_ENV = "DYNAFORMER_API_KEY"


def listen_socket(host: str, port: int) -> socket.socket:
    """A bound TCP socket (IPv4 or IPv6 by the host's form), or a one-line error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise DynaformerError(f"serve: cannot listen on {host}:{port}: {e.strerror or e}") from None
    except UnicodeError as e:
        sock.close()
        raise DynaformerError(f"serve: cannot listen on {host}:{port}: {e}") from None
    return sock


def build(source: str | Path, cfg: ServeConfig):
    """(Starlette app, engine, model name) for a run folder, one of its step-N folders or an exported folder."""
    require("uvicorn", "serve")
    require("starlette", "serve")
    import torch

    from .app import Served, create_app
    from .engine import Engine
    from .source import load_source

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model, tokenizer, default_name = load_source(source)
    name = cfg.model_name or default_name
    cache_dtype = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.cache_dtype]
    engine = Engine(model, tokenizer.decode, int(cfg.kv_budget_mb * 2**20), cfg.max_batch, cfg.max_queue,
                    cache_dtype=cache_dtype)
    api_key = cfg.api_key or os.environ.get(API_KEY_ENV) or None
    served = Served(engine, tokenizer.encode, model.cfg.vocab_size, name, api_key, cfg.max_tokens_default)

    @contextlib.asynccontextmanager
    async def lifespan(app) -> Iterator[None]:
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    return create_app(served, lifespan), engine, name


def _server_class():
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn's server with a drain: the first SIGTERM or SIGINT starts the engine's deadline, and the
        process ends normally (uvicorn by itself re-raises the signal after shutting down, which would end the
        command with 143 instead of 0)."""

        def __init__(self, config, engine, drain_s: float, ready_line: str | None) -> None:
            super().__init__(config)
            self.engine, self.drain_s, self.ready_line = engine, drain_s, ready_line

        def handle_exit(self, sig, frame) -> None:
            self.engine.drain(self.drain_s)
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            old = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, handler in old.items():
                    signal.signal(s, handler)

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets=sockets)
            if self.ready_line and self.started:
                print(self.ready_line, flush=True)

    return DrainingServer


def make_server(app, engine, cfg: ServeConfig, ready_line: str | None = None):
    import uvicorn

    config = uvicorn.Config(app, log_level=cfg.log_level, access_log=False, lifespan="on",
                            timeout_graceful_shutdown=int(cfg.drain_s) + 5)  # a backstop after the engine's deadline
    return _server_class()(config, engine, cfg.drain_s, ready_line)


def serve(source: str, cfg: ServeConfig) -> int:
    """`dynaformer serve SOURCE`: runs until SIGTERM or Ctrl-C, then drains and returns 0."""
    require("uvicorn", "serve")
    require("starlette", "serve")
    source_kind(source)  # a source that is none of the three: one line before the socket opens
    sock = listen_socket(cfg.host, cfg.port)
    try:
        app, engine, name = build(source, cfg)
        host, port = sock.getsockname()[:2]
        where = f"[{host}]" if ":" in host else host
        ready = (f"dynaformer serve: '{name}' on http://{where}:{port}/v1 | KV budget {cfg.kv_budget_mb:g} MiB, "
                 f"{str(engine.kv_dtype).removeprefix('torch.')} cache "
                 f"({engine.max_sessions()} sessions of {engine.context_len} tokens) | "
                 f"{'API key required' if app.served.api_key else 'no API key'}")
        make_server(app, engine, cfg, ready).run(sockets=[sock])
    finally:
        sock.close()
    print("dynaformer serve: stopped", flush=True)
    return 0


class BackgroundServer:
    """A server on a thread of this process (tests, benchmarks): `url`, `engine`, `close()`."""

    def __init__(self, source: str | Path, cfg: ServeConfig) -> None:
        self.sock = listen_socket(cfg.host, cfg.port)
        host, port = self.sock.getsockname()[:2]
        self.url = f"http://{host}:{port}"
        self.app, self.engine, self.name = build(source, cfg)
        self.server = make_server(self.app, self.engine, cfg)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server thread ended while starting")
            self.thread.join(0.01)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()
