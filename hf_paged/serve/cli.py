"""``hf-paged serve`` / ``python -m hf_paged.serve``: load a model, start one engine, serve the OpenAI API with uvicorn.

``add_arguments(parser)`` and ``run(args)`` are what the ``hf-paged`` command's ``serve`` subcommand calls; ``main``
is the standalone entry point. SIGTERM (or Ctrl+C) stops admitting requests, lets the ones in flight finish for
``--shutdown-grace`` seconds, aborts what is still running then, closes the engine and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 1 << 10, "m": 10**6, "mb": 10**6, "mib": 1 << 20,
          "g": 10**9, "gb": 10**9, "gib": 1 << 30, "t": 10**12, "tb": 10**12, "tib": 1 << 40}


def parse_bytes(text: str) -> int:
    """``"2GiB"``, ``"512MiB"``, ``"1e9"``, ``"1048576"`` -> bytes."""
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 2GiB, 512MiB, 1000000)")
    try:
        value = float(match.group(1)) * _UNITS[match.group(2).lower()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return int(value)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``serve`` options (what to load, where to listen, the engine's memory, the server's limits)."""
    from .app import ServeConfig

    limits = ServeConfig()
    parser.add_argument("--model", default=None,
                        help="a local Hugging Face model folder or a .gguf file (default: the embedded "
                             "SmolLM2-135M-Instruct)")
    parser.add_argument("--served-model-name", default=None,
                        help="the model name clients send and see (default: the folder's or file's name)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' on every route but /health")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--kv-memory", type=parse_bytes, default=None,
                        help="bytes of KV-cache blocks, e.g. 1GiB (default: the engine's default)")
    parser.add_argument("--kv-cache-dtype", choices=["auto", "int8"], default="auto",
                        help="auto: K/V in the model's dtype; int8: int8 with a scale per token and head")
    parser.add_argument("--max-num-seqs", type=int, default=256, help="most sequences in one engine step")
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048, help="most tokens in one engine step")
    parser.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    parser.add_argument("--max-body-bytes", type=parse_bytes, default=limits.max_body_bytes,
                        help="larger request bodies get 413")
    parser.add_argument("--max-prompt-tokens", type=int, default=None,
                        help="longer prompts get 400 (default: the context length - 1)")
    parser.add_argument("--max-tokens", type=int, default=limits.max_tokens,
                        help="largest max_tokens a request may ask (400 above), and chat's default")
    parser.add_argument("--max-n", type=int, default=limits.max_n, help="largest n (400 above)")
    parser.add_argument("--max-concurrent-requests", type=int, default=limits.max_concurrent_requests,
                        help="generation requests in flight at once; more get 429 at once")
    parser.add_argument("--shutdown-grace", type=float, default=limits.shutdown_grace_s,
                        help="seconds in-flight requests may still run after SIGTERM before they are aborted")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    parser.add_argument("--disable-access-log", action="store_true", help="no line per HTTP request")


def load_model(path: str | None, dtype: str) -> tuple[Any, Any, str]:
    """(model, tokenizer, default served name) for ``--model``."""
    import torch

    from ..distributed import cli_load

    sharded = cli_load(path, dtype)  # under torchrun (WORLD_SIZE > 1): tensor-parallel shards
    if sharded is not None:
        return sharded
    torch_dtype = getattr(torch, dtype)
    if path is None:
        from ..models import load_default_model

        model, tokenizer = load_default_model(torch_dtype)
        return model, tokenizer, DEFAULT_MODEL_NAME
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        model = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=torch_dtype).eval()
        tokenizer = AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
        return model, tokenizer, p.stem
    if not p.is_dir():
        raise SystemExit(f"--model: {path} is neither a model folder nor a .gguf file")
    model = AutoModelForCausalLM.from_pretrained(p, dtype=torch_dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(p)
    return model, tokenizer, p.name


SPIN_COUNT = "20000"


def openmp_spin_env() -> dict[str, str]:
    """What the server's environment needs added for a short OpenMP spin: nothing where it already sets a wait
    policy or spin count."""
    return {} if {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & os.environ.keys() else {"GOMP_SPINCOUNT": SPIN_COUNT}


def _reexec_with_short_openmp_spin() -> None:
    """Start this same command again with ``GOMP_SPINCOUNT=20000`` unless the environment sets an OpenMP wait policy
    or spin count.

    OpenMP reads them once, when torch loads (already done: ``hf_paged`` imports torch), so it takes a new process.
    Why: between parallel regions libgomp's workers spin 300,000 times by default before they sleep. A short spin
    keeps a decode step's hundreds of back-to-back regions as fast as the default does, while workers of an idle
    or stalled engine stop taking the cores from the server's event loop and its clients sooner. (Sleeping at once,
    ``OMP_WAIT_POLICY=PASSIVE``, slows every decode step by a fifth: docs/benchmarks.md.)
    """
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

    from ..engine.llm_engine import LLMEngine
    from .app import ServeConfig, create_app

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    model, tokenizer, default_name = load_model(args.model, args.dtype)
    engine_kwargs: dict[str, Any] = {"max_num_seqs": args.max_num_seqs,
                                     "max_num_batched_tokens": args.max_num_batched_tokens,
                                     "kv_cache_dtype": args.kv_cache_dtype}
    if args.kv_memory is not None:
        engine_kwargs["memory_bytes"] = args.kv_memory
    if args.max_model_len is not None:
        engine_kwargs["max_model_len"] = args.max_model_len
    engine = LLMEngine(model, tokenizer, **engine_kwargs)
    config = ServeConfig(model_name=args.served_model_name or default_name, api_key=args.api_key,
                         max_body_bytes=args.max_body_bytes, max_prompt_tokens=args.max_prompt_tokens,
                         max_tokens=args.max_tokens, max_n=args.max_n,
                         max_concurrent_requests=args.max_concurrent_requests, shutdown_grace_s=args.shutdown_grace)
    app = create_app(engine, tokenizer, config)
    uv_config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                               access_log=not args.disable_access_log,
                               timeout_graceful_shutdown=int(args.shutdown_grace) + 5, lifespan="off")
    server = _graceful_server(uv_config, app.state.server)
    # uvicorn re-raises the signal that stopped it once it is done; with these handlers in place that is a no-op,
    # so a graceful stop exits 0.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        close = getattr(engine, "close", None) or engine.shutdown
        close()
    return 0 if server.started else 1


def _graceful_server(config: Any, openai_server: Any) -> Any:
    """uvicorn's server, telling the app to drain (``begin_shutdown``) when a stop signal arrives."""
    import uvicorn

    class GracefulServer(uvicorn.Server):
        async def serve(self, sockets=None) -> None:
            self.loop = asyncio.get_running_loop()
            await super().serve(sockets)

        def handle_exit(self, sig: int, frame: Any) -> None:
            openai_server.begin_shutdown(getattr(self, "loop", None))
            super().handle_exit(sig, frame)

    return GracefulServer(config)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hf-paged serve", description="OpenAI-compatible server on hf_paged")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
