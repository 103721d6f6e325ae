"""What one server answers as and the limits it holds its requests to (``hf-paged serve``'s flags fill it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServeConfig:
    """The server's name and limits (each over-limit request gets the status in the comment)."""

    model_name: str = "hf_paged"
    api_key: str | None = None  # 401 without it
    max_body_bytes: int = 4 << 20  # 413
    max_prompt_tokens: int | None = None  # 400 (context_length_exceeded); default: the engine's context - 1
    max_tokens: int = 4096  # 400: the largest max_tokens a request may ask for (and the default of chat requests)
    max_n: int = 16  # 400
    max_prompts: int = 64  # 400: prompts in one /v1/completions request
    max_concurrent_requests: int = 512  # 429: generation requests in flight at once
    shutdown_grace_s: float = 30.0  # after SIGTERM: in-flight requests still running then are aborted
    allowed_origins: tuple[str, ...] = ()  # 403: browsers' cross-site requests from other origins ("*": any)
    trust_request_chat_template: bool = False  # 400: a chat template sent in a request (it runs on the server)
