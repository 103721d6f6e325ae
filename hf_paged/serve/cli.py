"""``hf-paged serve`` / ``python -m hf_paged.serve``: load a model, start one engine, serve the OpenAI API with uvicorn.

``add_arguments(parser)`` and ``run(args)`` are what the ``hf-paged`` command's ``serve`` subcommand calls; ``main``
is the standalone entry point. The model and engine flags are ``hf_paged.loading``'s, shared with ``hf-paged``'s
other commands. SIGTERM (or Ctrl+C) stops admitting requests, lets the ones in flight finish for
``--shutdown-grace`` seconds, aborts what is still running then, closes the engine and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from typing import Any

from .. import envs
from ..loading import add_engine_arguments, build_engine, parse_size
from .config import ServeConfig

SPIN_COUNT = "20000"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``serve`` options: the shared model and engine flags, where to listen, the server's limits."""
    add_engine_arguments(parser)
    limits = ServeConfig()
    group = parser.add_argument_group("server")
    group.add_argument("--served-model-name", default=None,
                       help="the model name clients send and see (default: the folder's or file's name)")
    group.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    group.add_argument("--port", type=int, default=8000)
    group.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every route but /health "
                       "(visible to other users in the process list: prefer --api-key-file or HF_PAGED_API_KEY)")
    group.add_argument("--api-key-file", default=None, help="read the API key from this file (its first line)")
    group.add_argument("--allowed-origins", default="",
                       help="comma-separated origins whose web pages may call the server (CORS; '*': any). Default: "
                            "none, so no other site's page can drive a server on this machine")
    group.add_argument("--header-timeout", type=float, default=10.0,
                       help="seconds a new connection may take to send its request head before it is closed")
    group.add_argument("--trust-request-chat-template", action="store_true",
                       help="render a chat template a request sends in chat_template_kwargs (it runs here)")
    group.add_argument("--max-body-bytes", type=parse_size, default=limits.max_body_bytes,
                       help="larger request bodies get 413")
    group.add_argument("--max-prompt-tokens", type=int, default=None,
                       help="longer prompts get 400 (default: the context length - 1)")
    group.add_argument("--max-tokens", type=int, default=limits.max_tokens,
                       help="largest max_tokens a request may ask (400 above), and chat's default")
    group.add_argument("--max-n", type=int, default=limits.max_n, help="largest n (400 above)")
    group.add_argument("--max-concurrent-requests", type=int, default=limits.max_concurrent_requests,
                       help="generation requests in flight at once; more get 429 at once")
    group.add_argument("--shutdown-grace", type=float, default=limits.shutdown_grace_s,
                       help="seconds in-flight requests may still run after SIGTERM before they are aborted")
    group.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    group.add_argument("--disable-access-log", action="store_true", help="no line per HTTP request")


def openmp_spin_env() -> dict[str, str]:
    """What the server's environment needs added for a short OpenMP spin: nothing where it already sets a wait
    policy or spin count."""
    return {} if {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & os.environ.keys() else {"GOMP_SPINCOUNT": SPIN_COUNT}


def _reexec_with_short_openmp_spin() -> None:
    """Start this same command again with ``GOMP_SPINCOUNT=20000`` unless the environment sets an OpenMP wait policy
    or spin count (OpenMP reads them once, when torch loads, so it takes a new process). Why: libgomp's workers spin
    a long while between parallel regions by default. A short spin keeps a decode step's back-to-back regions as
    fast, while the workers of an idle engine stop taking the cores from the event loop and its clients sooner
    (sleeping at once, ``OMP_WAIT_POLICY=PASSIVE``, slows every decode step: docs/benchmarks.md)."""
    spin = openmp_spin_env()
    if not spin or not getattr(sys, "orig_argv", None):
        return
    os.environ.update(spin)
    try:
        os.execv(sys.executable, list(sys.orig_argv))
    except OSError:  # keep going with the default spin
        logging.getLogger("hf_paged.serve").warning("could not restart with GOMP_SPINCOUNT=%s", SPIN_COUNT)


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM / SIGINT; returns the exit status (0 after a graceful shutdown)."""
    _reexec_with_short_openmp_spin()
    # A stop signal while the model loads: exit 0 at once (uvicorn takes the signals over once it serves).
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: sys.exit(0))
    import uvicorn

    from .app import create_app

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    engine, default_name = build_engine(args)
    config = ServeConfig(model_name=args.served_model_name or default_name, api_key=_api_key(args),
                         max_body_bytes=args.max_body_bytes, max_prompt_tokens=args.max_prompt_tokens,
                         max_tokens=args.max_tokens, max_n=args.max_n,
                         max_concurrent_requests=args.max_concurrent_requests, shutdown_grace_s=args.shutdown_grace,
                         allowed_origins=tuple(o.strip() for o in args.allowed_origins.split(",") if o.strip()),
                         trust_request_chat_template=args.trust_request_chat_template)
    app = create_app(engine, engine.tokenizer, config)
    _raise_open_file_limit()
    uv_config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                               access_log=not args.disable_access_log,
                               http=_header_timeout_protocol(args.header_timeout),
                               timeout_graceful_shutdown=int(args.shutdown_grace) + 5, lifespan="off")
    server = _graceful_server(uv_config, app.state.adapter)
    # uvicorn re-raises the signal that stopped it once it is done; with these handlers in place that is a no-op,
    # so a graceful stop exits 0.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        engine.close()
    return 0 if server.started else 1


def _api_key(args: argparse.Namespace) -> str | None:
    if args.api_key_file:
        with open(args.api_key_file, encoding="utf-8") as f:
            return f.readline().strip() or None
    return args.api_key or envs.api_key()


def _raise_open_file_limit() -> None:
    """Each client connection holds a file: a soft limit of a few hundred would let idle connections lock every
    other client, /health included, out (as vLLM, up to the hard limit)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def _header_timeout_protocol(seconds: float) -> type:
    """uvicorn's h11 protocol, closing a connection that has not sent a whole request head ``seconds`` after it
    opened (uvicorn times out idle connections only after a response, so silent ones would stay forever)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutProtocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self.loop.call_later(seconds, self._close_if_silent)

        def _close_if_silent(self) -> None:
            if self.cycle is None and not self.transport.is_closing():
                self.transport.close()

    return HeaderTimeoutProtocol


def _graceful_server(config: Any, adapter: Any) -> Any:
    """uvicorn's server, telling the app to drain (``begin_shutdown``) when a stop signal arrives."""
    import uvicorn

    class GracefulServer(uvicorn.Server):
        async def serve(self, sockets=None) -> None:
            self.loop = asyncio.get_running_loop()
            await super().serve(sockets)

        def handle_exit(self, sig: int, frame: Any) -> None:
            adapter.begin_shutdown(getattr(self, "loop", None))
            super().handle_exit(sig, frame)

    return GracefulServer(config)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hf-paged serve", description="OpenAI-compatible server on hf_paged")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
