"""hf_paged's OpenAI-compatible server: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``, ``/tokenize``,
``/detokenize``, ``/health``, Prometheus ``/metrics`` and a chat page at ``/``, on one continuous-batching engine.

    hf-paged serve --port 8000                      # or: python -m hf_paged.serve
    app = hf_paged.serve.create_app(engine, tokenizer, ServeConfig(model_name="m"))   # any ASGI server

Needs the ``serve`` extra (FastAPI, uvicorn, prometheus-client).
"""

from .app import create_app
from .config import ServeConfig

__all__ = ["ServeConfig", "create_app"]
