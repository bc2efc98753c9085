"""Real server processes for tests and benchmarks: ``redis-server`` and a Chroma server.

Each is started on a free loopback port, with its data in a temporary directory, waited for
until it answers, and stopped (terminate, then kill) on :meth:`stop` or when the ``with``
block ends. Stdlib only; the binaries come from the system (``redis-server``: the Debian
package of that name) or the Python environment (``chroma``: the ``chromadb`` package).

Usage::

    from confidence_router.testing.processes import ChromaServerProcess, RedisServerProcess

    with RedisServerProcess() as redis_server:
        redis_server.url          # "redis://127.0.0.1:<port>/0"
    with ChromaServerProcess() as chroma:
        chroma.host, chroma.port  # for chromadb.HttpClient(host=..., port=...)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, TypeVar

from confidence_router.errors import ConfidenceRouterError

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = [
    "ChromaServerProcess",
    "RedisServerProcess",
    "ServerProcessError",
    "free_port",
    "start_or_skip",
]


class ServerProcessError(ConfidenceRouterError, RuntimeError):
    """The server binary is missing, or the process did not start answering in time."""


_S = TypeVar("_S", bound="_ServerProcess")


def start_or_skip(server: _S) -> _S:
    """Start ``server`` for a pytest test, or skip the test where the program is missing.

    In CI (the ``CI`` environment variable set), where the program is installed on purpose,
    a server that does not start fails the test instead: never a silent skip there.

    >>> # in a fixture:  server = start_or_skip(RedisServerProcess()); yield server; server.stop()
    """
    try:
        server.start()
    except ServerProcessError as error:
        if os.environ.get("CI"):
            raise
        import pytest

        pytest.skip(str(error))
    return server


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _port_open(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
        return True
    return False


class _ServerProcess:
    """Start a command on a free port, wait until ``_ready()``, stop it on exit."""

    name = "server"
    start_timeout_s = 30.0

    def __init__(self, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.host = host
        self.port = port or free_port(host)
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._log: Path | None = None

    def _command(self, data_dir: Path) -> list[str]:
        raise NotImplementedError

    def _ready(self) -> bool:
        return _port_open(self.host, self.port)

    @property
    def pid(self) -> int | None:
        """The process id while running."""
        return self._process.pid if self._process is not None else None

    def start(self) -> Self:
        """Start the process and wait until it answers.

        Raises:
            ServerProcessError: the binary is missing, the process exited, or it did not
                answer within ``start_timeout_s`` (the message quotes its log's tail).
        """
        if self._process is not None:
            return self
        self._dir = tempfile.TemporaryDirectory(prefix=f"confidence-router-{self.name}-")
        data_dir = Path(self._dir.name)
        self._log = data_dir / "server.log"
        command = self._command(data_dir)
        with open(self._log, "wb") as log:
            self._process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=data_dir,
            )
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                tail = self.log_tail()
                self.stop()
                raise ServerProcessError(f"{self.name} exited at start: {tail}")
            if self._ready():
                return self
            time.sleep(0.05)
        tail = self.log_tail()
        self.stop()
        raise ServerProcessError(f"{self.name} did not answer within {self.start_timeout_s} s: {tail}")

    def log_tail(self, n: int = 2000) -> str:
        """The end of the process's output (for error messages)."""
        if self._log is None or not self._log.exists():
            return ""
        return self._log.read_bytes()[-n:].decode("utf-8", "replace")

    def stop(self) -> None:
        """Terminate the process (kill it after 10 s) and delete its data (idempotent)."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class RedisServerProcess(_ServerProcess):
    """A throw-away ``redis-server`` (no persistence) on 127.0.0.1.

    Raises:
        ServerProcessError: on :meth:`start` when ``redis-server`` is not installed
            (``apt-get install redis-server``).
    """

    name = "redis-server"

    def _command(self, data_dir: Path) -> list[str]:
        exe = shutil.which("redis-server")
        if exe is None:
            raise ServerProcessError(
                "redis-server is not installed (Debian/Ubuntu: apt-get install redis-server)"
            )
        return [exe, "--port", str(self.port), "--bind", self.host, "--save", "",
                "--appendonly", "no", "--dir", str(data_dir), "--protected-mode", "no"]

    def _ready(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    @property
    def url(self) -> str:
        """``redis://host:port/0``."""
        return f"redis://{self.host}:{self.port}/0"


class ChromaServerProcess(_ServerProcess):
    """A Chroma server (``chroma run``, from the ``chromadb`` package) on 127.0.0.1.

    Raises:
        ServerProcessError: on :meth:`start` when the ``chroma`` command is not found.
    """

    name = "chroma"
    start_timeout_s = 60.0

    def _command(self, data_dir: Path) -> list[str]:
        exe = shutil.which("chroma") or str(Path(sys.executable).with_name("chroma"))
        if not os.path.exists(exe):
            raise ServerProcessError("the chroma command is not installed (pip install chromadb)")
        return [exe, "run", "--path", str(data_dir / "db"), "--host", self.host,
                "--port", str(self.port)]

    def _ready(self) -> bool:
        for path in ("/api/v2/heartbeat", "/api/v1/heartbeat"):
            try:
                with urllib.request.urlopen(f"{self.url}{path}", timeout=0.5) as reply:
                    if reply.status == 200:
                        return True
            except OSError:
                continue
        return False

    @property
    def url(self) -> str:
        """``http://host:port``."""
        return f"http://{self.host}:{self.port}"
