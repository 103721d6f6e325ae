"""Starting and stopping an HTTP server in a subprocess: the servers ``benchmarks/serving.py`` compares
(``hf-paged serve``, ``vllm serve``, ``transformers serve``), and ``hf-paged serve`` for the tests
(``tests/server_process.py``).

``ServerProcess(command, port)`` starts the command with its output in a log file, waits until ``ready_path``
answers 200, and stops it with SIGTERM (then SIGKILL after ``stop_timeout``), keeping the exit status.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Sequence


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerProcess:
    """One server subprocess on ``host:port``; a context manager (start + wait ready, then stop)."""

    def __init__(self, command: Sequence[str], port: int, host: str = "127.0.0.1", ready_path: str = "/health",
                 start_timeout: float = 300.0, stop_timeout: float = 60.0, env: dict[str, str] | None = None,
                 log_path: str | Path | None = None) -> None:
        self.command = list(command)
        self.host, self.port = host, port
        self.ready_path = ready_path
        self.start_timeout, self.stop_timeout = start_timeout, stop_timeout
        self.env = env
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="server-", suffix=".log")[1])
        self.proc: subprocess.Popen | None = None
        self.returncode: int | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def start(self) -> "ServerProcess":
        env = dict(os.environ, **(self.env or {}))
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.returncode = self.proc.returncode
                raise RuntimeError(f"server exited with {self.returncode} before it was ready: "
                                   f"{' '.join(self.command)}\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.base_url + self.ready_path, timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"server not ready after {self.start_timeout:.0f} s: {' '.join(self.command)}\n"
                           f"{self.log_tail()}")

    def terminate(self) -> None:
        """Send SIGTERM (to the process only: a graceful stop is the server's job)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float | None = None) -> int:
        assert self.proc is not None
        self.returncode = self.proc.wait(timeout)
        return self.returncode

    def stop(self) -> int | None:
        """SIGTERM, wait ``stop_timeout``, then SIGKILL the whole process group; returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.terminate()
            try:
                self.proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.returncode = self.proc.returncode
        return self.returncode

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
