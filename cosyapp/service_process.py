"""`python -m cosyapp serve` as a child process for the length of a `with` block, on a loopback port.

`start_service` spawns it with the caller's environment and flags (its output, stdout and stderr together, goes
to a log file), waits until GET /health answers 200, and on leaving the block stops it: SIGTERM, then SIGKILL
when it has not exited within `stop_timeout_s`. Used by the service load benchmark and the tests that need a
real service.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import httpx

HOST = "127.0.0.1"
STARTUP_TIMEOUT_S = 300.0  # the tiny test models; a full-size model loading on a CPU needs more
STOP_TIMEOUT_S = 20.0
POLL_INTERVAL_S = 0.2


class ServiceStartError(RuntimeError):
    """The service exited, reported that its model failed to load, or was not healthy in time. The message
    says which and ends with (the tail of) the service's log."""


@dataclass(frozen=True)
class ServiceProcess:
    """A started service: where it answers, its process id, and the file its output goes to."""

    url: str
    port: int
    pid: int
    log_path: Path


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on right now."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def log_tail(path: Path, lines: int | None) -> str:
    """The last `lines` lines of the log; None: all of it."""
    text = path.read_text(encoding="utf-8", errors="replace")
    return text if lines is None else "\n".join(text.splitlines()[-lines:])


@contextlib.contextmanager
def start_service(port: int, env: Mapping[str, str], log_path: Path, *, serve_args: Sequence[str] = (),
                  cwd: Path | None = None, startup_timeout_s: float = STARTUP_TIMEOUT_S,
                  stop_timeout_s: float = STOP_TIMEOUT_S, log_lines: int | None = None
                  ) -> Iterator[ServiceProcess]:
    """Run `python -m cosyapp serve SERVE_ARGS` with exactly `env` as its environment; yields once it is ready.

    `port` is where the service was told to listen (through `env` or `serve_args`) on 127.0.0.1. The log file
    is created (or emptied) at `log_path`. `log_lines`: how much of the log a ServiceStartError quotes, None
    for all of it. The process is stopped when the block ends, also when starting it failed."""
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "cosyapp", "serve", *serve_args], cwd=cwd, env=dict(env),
                                   stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://{HOST}:{port}"
    try:
        failure = _startup_failure(url, process, startup_timeout_s)
        if failure is not None:
            raise ServiceStartError(f"{failure}:\n{log_tail(log_path, log_lines)}")
        yield ServiceProcess(url, port, process.pid, log_path)
    finally:
        _stop(process, stop_timeout_s)


def _startup_failure(url: str, process: subprocess.Popen, timeout_s: float) -> str | None:
    """Poll /health until it answers 200 (None) or the start has failed (why, as a sentence)."""
    deadline = time.monotonic() + timeout_s
    # trust_env=False: a proxy from the environment must not sit between us and a loopback service.
    with httpx.Client(timeout=5.0, trust_env=False) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                return f"the service exited with status {process.returncode}"
            try:
                health = client.get(f"{url}/health")
                if health.status_code == 200:
                    return None
                # 503 {"status": "loading"} while the model loads; {"status": "error"} once loading failed.
                if health.json().get("status") == "error":
                    return f"the service failed to load its model: {health.json().get('detail')}"
            except (httpx.TransportError, ValueError):
                pass  # not listening yet, or (ValueError) a body that is not JSON: not the service's answer
            time.sleep(POLL_INTERVAL_S)
    return f"the service was not ready after {timeout_s:.0f} s"


def _stop(process: subprocess.Popen, timeout_s: float) -> None:
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
