"""``python -m hf_paged.serve`` in a subprocess on a free loopback port, for the server tests (the generic launcher,
``ServerProcess``, is the serving benchmark's: ``benchmarks/server_process.py``)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Sequence

ROOT = str(Path(__file__).resolve().parent.parent)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.server_process import ServerProcess, free_port  # noqa: E402

from hf_paged.serve.cli import openmp_spin_env  # noqa: E402


def launch_hf_paged(args: Sequence[str] = (), **kwargs: Any) -> ServerProcess:
    """``python -m hf_paged.serve`` with ``args``; ``kwargs`` go to ``ServerProcess``."""
    port = free_port()
    command = [sys.executable, "-m", "hf_paged.serve", "--host", "127.0.0.1", "--port", str(port), *args]
    # What the server would restart itself with (serve/cli.py), set here to spare the restart.
    kwargs["env"] = {**openmp_spin_env(), **(kwargs.get("env") or {})}
    return ServerProcess(command, port, **kwargs)
