"""The ``confidence-router`` command line.

Every command registers itself with :func:`command` (name, one-line summary, options);
``confidence-router --help`` lists them all, ``confidence-router COMMAND --help`` shows one.

Usage::

    confidence-router demo               # route a set of questions, show the decisions
    confidence-router serve --port 0     # the embedded model behind Ollama's API
    confidence-router proxy --port 8080  # an OpenAI- and Ollama-compatible routing proxy
    confidence-router --version
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import sys
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from confidence_router import commands
from confidence_router.commands import command
from confidence_router.errors import ConfidenceRouterError, InvalidArgumentError
from confidence_router.policy import DEFAULT_POLICY
from confidence_router.settings import check_environment

if TYPE_CHECKING:
    from confidence_router.correctness import ConfidenceCalibration

#: Shown by ``confidence-router --help`` above the list of commands (plain text).
DESCRIPTION = (
    "Route LLM queries: answer with a cheap local model, escalate to a cloud model only when "
    "the local answer's confidence (from its token logprobs) is below a threshold."
)


def _demo_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threshold", type=float, default=None,
                        help="confidence threshold (default: settings, 0.7)")
    parser.add_argument("--config", default=None, help="settings file (TOML or JSON)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


@command("demo", _demo_args,
         "route a set of questions on your Ollama or the embedded model; show the decisions")
def _demo(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from confidence_router.demo import run_demo
    from confidence_router.settings import RouterSettings

    settings = RouterSettings.load(args.config)
    if args.threshold is not None:
        settings = replace(settings, threshold=args.threshold)
    run_demo(settings=settings, progress=not args.no_progress)
    return 0


def _serve_args(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Serve the embedded model (Gemma 3 270M via llama.cpp) over Ollama's HTTP API on "
        "127.0.0.1, for ChatOllama(base_url=..., model='gemma3:270m') or any Ollama client."
    )
    parser.add_argument("--port", type=int, default=11435,
                        help="port on 127.0.0.1 (default 11435; 0 picks a free one)")


@command("serve", _serve_args,
         "serve the embedded model on an Ollama-compatible port of 127.0.0.1")
def _serve(args: argparse.Namespace) -> int:
    import time

    host = "127.0.0.1"
    problem = _port_problem(host, args.port)  # before loading the model: fail in milliseconds
    if problem is not None:
        print(f"confidence-router serve: error: {problem}", file=sys.stderr)
        return 2
    from confidence_router.embedded import start_embedded_server

    try:
        server = start_embedded_server(port=args.port, host=host)
    except OSError as error:  # e.g. another process took the port meanwhile
        print(f"confidence-router serve: error: {_describe_bind_error(host, args.port, error)}",
              file=sys.stderr)
        return 2
    with server, _sigterm_as_interrupt():
        print(f"Ollama-compatible server with the embedded model at {server.url} "
              "(model 'gemma3:270m'; Ctrl-C stops)", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the normal way to stop a server
            return 0


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM (``kill``, ``docker stop``, systemd) raises KeyboardInterrupt
    like Ctrl-C does, so that a server stops the same way (cleanly, exit 0) for both; the
    default SIGTERM action killed the process without stopping the server or freeing the model.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _port_problem(host: str, port: int) -> str | None:
    """Why ``port`` cannot be served on ``host`` (``None`` if a bind works right now)."""
    import socket

    if not 0 <= port <= 65535:
        return f"--port must be between 0 and 65535 (0 picks a free port), got {port}"
    if not host.strip():
        # uvicorn would listen on every interface: never because a variable was unset.
        return ("--host is empty; give an interface: 127.0.0.1 (this machine only) or "
                "0.0.0.0 (every interface)")
    try:
        # The address family follows the host (an IPv6 address such as ::1, a host name).
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except (OSError, UnicodeError) as error:
        reason = getattr(error, "strerror", None) or error
        return f"cannot listen on {host}:{port}: unknown host or address ({reason})"
    with socket.socket(family, kind, proto) as probe:
        # The server sets SO_REUSEADDR too, so a port in TIME_WAIT is not reported as busy.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as error:
            return _describe_bind_error(host, port, error)
    return None


def _describe_bind_error(host: str, port: int, error: OSError) -> str:
    if error.errno == errno.EADDRINUSE:
        return (f"port {port} on {host} is already in use (another server?); "
                "choose another with --port, or --port 0 for a free one")
    if error.errno == errno.EACCES:
        return f"no permission to listen on port {port} (ports below 1024 need root)"
    return f"cannot listen on {host}:{port}: {error.strerror or error}"


def _calibrate_args(parser: argparse.ArgumentParser) -> None:
    from confidence_router.signals import SIGNAL_SCORERS

    parser.description = (
        "Pick a threshold from a labelled evaluation run for a target call rate or accuracy, "
        "or (--fit) fit a map from a signal's score to P(correct) and save it."
    )
    parser.add_argument("run_db", metavar="RUN.sqlite", nargs="?", default=None,
                        help="an evaluation run database (threshold mode)")
    parser.add_argument("--fit", metavar="RUN.sqlite", default=None,
                        help="fit a calibration (isotonic or Platt) on this run instead")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--target-rate", type=float, help="cloud-call rate to aim for, e.g. 0.3")
    target.add_argument("--target-accuracy", type=float,
                        help="accuracy to reach at the lowest call rate, e.g. 0.8 (with --fit: "
                        "the P(correct) floor the printed threshold keeps)")
    parser.add_argument("--signal", default=None,
                        help=f"signal: {', '.join(SIGNAL_SCORERS)}, or an extra field such as "
                        "gsa.p_yes (default: mean_logprob)")
    parser.add_argument("--run", default=None, help="run name or id when the file has several")
    parser.add_argument("--method", choices=("isotonic", "platt"), default="isotonic",
                        help="--fit: the monotone map (default isotonic)")
    parser.add_argument("--out", default="confidence-calibration.json",
                        help="--fit: where to save the calibration (JSON)")
    parser.add_argument("--holdout", type=float, default=0.3,
                        help="--fit: share of rows held out for ECE/Brier (default 0.3)")
    parser.add_argument("--seed", type=int, default=0, help="--fit: held-out split seed")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


@command("calibrate", _calibrate_args,
         "pick a threshold from an evaluation run for a target cloud-call rate or accuracy")
def _calibrate(args: argparse.Namespace) -> int:
    """Pick a threshold from a labelled evaluation run, or fit P(correct) (--fit)."""
    import sqlite3

    try:
        return _calibrate_checked(args)
    except (OSError, sqlite3.Error, LookupError) as error:
        # Files the user named (--out in a missing place, a locked database): one line, not a
        # traceback. Library errors (ValueError, ConfidenceRouterError) are main()'s.
        if isinstance(error, (FileNotFoundError, BrokenPipeError)):
            raise  # main()'s: a missing database is one line; a closed stdout is quiet
        text = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"confidence-router calibrate: error: {' '.join(str(text).split())}",
              file=sys.stderr)
        return 2


def _calibrate_checked(args: argparse.Namespace) -> int:
    import math

    for option, value in (("--target-rate", args.target_rate),
                          ("--target-accuracy", args.target_accuracy)):
        if value is not None and not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise InvalidArgumentError(f"{option} must be in [0, 1]; got {value}")
    if args.fit is not None:
        if not (math.isfinite(args.holdout) and 0.0 < args.holdout < 1.0):
            raise InvalidArgumentError(f"--holdout must be in (0, 1); got {args.holdout}")
        return _calibrate_fit(args)
    if args.run_db is None or (args.target_rate is None and args.target_accuracy is None):
        print("confidence-router calibrate: error: give RUN.sqlite and --target-rate or "
              "--target-accuracy, or --fit RUN.sqlite", file=sys.stderr)
        return 2
    import json
    import math

    from confidence_router.calibration import calibrate_run

    signal = args.signal or DEFAULT_POLICY.signal
    result = calibrate_run(args.run_db, signal=signal, run=args.run,
                           target_rate=args.target_rate, target_accuracy=args.target_accuracy)
    values = result.as_dict()
    if isinstance(values.get("threshold"), float) and math.isinf(values["threshold"]):
        values["threshold"] = "inf"  # escalate everything: not valid JSON as a float
    if args.json:
        print(json.dumps(values, indent=2))
    elif not result.reachable:
        print(f"target not reachable: {result.note}")
    else:
        print(f"threshold {values['threshold']}  (signal {signal}, n={result.n})")
        accuracy = result.expected_accuracy
        # None when nothing is kept local (--target-rate 1: every row escalates).
        accuracy_text = "n/a" if accuracy is None else f"{accuracy:.3f}"
        kind = f" ({result.accuracy_kind})" if result.accuracy_kind else ""
        print(f"expected call rate {result.expected_call_rate:.3f}, "
              f"expected accuracy {accuracy_text}{kind}")
        if result.note:
            print(result.note)
    return 0 if result.reachable else 1


def _proxy_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8080, help="TCP port (default 8080)")
    parser.add_argument("--workers", type=int, default=1,
                        help="uvicorn worker processes (share state with CONFIDENCE_ROUTER_REDIS_URL)")
    parser.add_argument("--config", default=None, help="router settings file (TOML or JSON)")


@command("proxy", _proxy_args, "an OpenAI- and Ollama-compatible routing proxy (HTTP); needs the proxy extra")
def _proxy(args: argparse.Namespace) -> int:
    """Serve the routing proxy (needs the 'proxy' extra)."""
    from confidence_router.proxy import serve

    # Before uvicorn starts: a busy or impossible port (or host) is one line, not uvicorn's
    # startup log and exit code 3, and --port 70000 is not served on 70000 - 65536.
    problem = _port_problem(args.host, args.port)
    if problem is not None:
        print(f"confidence-router proxy: error: {problem}", file=sys.stderr)
        return 2
    with _sigterm_as_interrupt():
        # One worker: uvicorn shuts down gracefully on SIGTERM, then re-raises it, which
        # killed the process (exit -15, where --workers 2 and Ctrl-C exit 0); raised as
        # KeyboardInterrupt it ends uvicorn.run normally.
        serve(host=args.host, port=args.port, workers=args.workers, settings_path=args.config)
    return 0


def _calibrate_fit(args: argparse.Namespace) -> int:
    """Fit ConfidenceCalibration on the training rows, report ECE/Brier on held-out rows."""
    import json

    from confidence_router.calibration import load_scores_from_run
    from confidence_router.correctness import ConfidenceCalibration, split_holdout
    from confidence_router.evaluation.metrics import brier, ece

    if args.target_rate is not None:
        raise InvalidArgumentError("--fit takes --target-accuracy (a P(correct) floor), not --target-rate")
    signal = args.signal or DEFAULT_POLICY.signal
    data = load_scores_from_run(args.fit, signal, run=args.run)
    if data.labels is None:
        raise InvalidArgumentError(f"{args.fit}: rows lack labels; a calibration needs them")
    rows = [(s, y) for s, y in zip(data.scores, data.labels) if s is not None and y is not None]
    if len(rows) < 20:
        raise InvalidArgumentError(f"{args.fit}: {len(rows)} labelled rows with a {signal} score; "
                         "need at least 20")
    train_idx, held_idx = split_holdout(len(rows), args.holdout, seed=args.seed)
    if not train_idx or not held_idx:
        # Else "no rows to fit on" / "labels is empty" from deep inside, naming no option.
        raise InvalidArgumentError(
            f"--holdout {args.holdout:g} of {len(rows)} rows leaves {len(train_idx)} to fit on "
            f"and {len(held_idx)} held out; each needs at least one row")
    train = [rows[i] for i in train_idx]
    held = [rows[i] for i in held_idx]
    calibration = ConfidenceCalibration.fit(
        [s for s, _ in train], [y for _, y in train], signal=signal, method=args.method,
        source={"run_db": str(args.fit), "run": data.run, "holdout": args.holdout,
                "seed": args.seed, "n_heldout": len(held)},
    )
    held_scores = [s for s, _ in held]
    held_labels = [y for _, y in held]
    # Held-out scores are known (rows without a score were left out), so each maps to a p.
    calibrated = [float(calibration.p_correct(s)) for s in held_scores]  # type: ignore[arg-type]
    report = {
        "signal": signal,
        "method": args.method,
        "run": data.run,
        "n_train": len(train),
        "n_heldout": len(held),
        "ece_before": ece(held_labels, held_scores),
        "ece_after": ece(held_labels, calibrated),
        "brier_before": brier(held_labels, held_scores),
        "brier_after": brier(held_labels, calibrated),
        "saved": _save_calibration(calibration, args.out),
    }
    if args.target_accuracy is not None:
        report["target_accuracy"] = args.target_accuracy
        report["threshold"] = calibration.threshold_for_accuracy(args.target_accuracy)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"fitted {args.method} P(correct) for signal {signal} on {len(train)} rows "
          f"of {data.run or args.fit}; held out {len(held)} rows")
    print(f"held-out ECE   {report['ece_before']:.4f} -> {report['ece_after']:.4f}")
    print(f"held-out Brier {report['brier_before']:.4f} -> {report['brier_after']:.4f}")
    if args.target_accuracy is not None:
        threshold = report["threshold"]
        print(f"threshold for P(correct) >= {args.target_accuracy:g}: "
              + ("not reachable" if threshold is None else f"{threshold:.6g}"))
    print(f"saved {report['saved']}")
    return 0


def _save_calibration(calibration: ConfidenceCalibration, out: str) -> str:
    try:
        return str(calibration.save(out))
    except OSError as error:
        raise InvalidArgumentError(f"cannot write --out {out!r}: {error.strerror or error}") from None


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every registered sub-command."""
    _load_optional_commands()
    parser = argparse.ArgumentParser(
        prog="confidence-router", description=DESCRIPTION,
        epilog="Run 'confidence-router COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version",
                        version=f"%(prog)s {_package_version()}")
    sub = parser.add_subparsers(dest="command", required=True, title="commands",
                                metavar="COMMAND")
    for name, registered in commands.COMMANDS.items():
        command_parser = sub.add_parser(name, help=registered.summary,
                                        description=registered.summary)
        registered.add_arguments(command_parser)
    return parser


def _package_version() -> str:
    from confidence_router import __version__

    return __version__


def _load_optional_commands() -> None:
    # Commands defined next to their feature register themselves on import.
    import importlib

    for module in ("confidence_router.evaluation.cli",):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as error:
            if error.name != module:
                raise


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``confidence-router`` script."""
    args = build_parser().parse_args(argv)
    run = commands.COMMANDS[args.command].run
    _replace_unencodable_output()
    try:
        # A misspelt CONFIDENCE_ROUTER_* variable is an error for every command, not only
        # for those that build a router (eval reads CONFIDENCE_ROUTER_DATA_DIR, ...).
        check_environment()
        return run(args)
    except (ConfidenceRouterError, ImportError, FileNotFoundError, ValueError) as error:
        print(f"confidence-router {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Ctrl-C during a demo, an eval, or while serve loads its model: one line, the
        # shell's convention for "interrupted" (128 + SIGINT), not a traceback.
        print(f"confidence-router {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `confidence-router demo | head -3`: the reader left; stop quietly, as cat or grep
        # do (128 + SIGPIPE), rather than a traceback. stdout goes to /dev/null so that the
        # interpreter's final flush does not fail again.
        _stdout_to_devnull()
        return 141


def _stdout_to_devnull() -> None:
    import os

    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def _replace_unencodable_output() -> None:
    """On a terminal or pipe whose encoding is not UTF-8 (PYTHONIOENCODING=ascii, a legacy
    Windows console), write characters it cannot encode as ``?`` instead of failing the
    command with UnicodeEncodeError after its work is done (a model's answer may hold any
    character)."""
    import io

    for stream in (sys.stdout, sys.stderr):
        encoding = (getattr(stream, "encoding", None) or "").lower().replace("-", "")
        if isinstance(stream, io.TextIOWrapper) and encoding not in ("utf8", "utf8sig"):
            with contextlib.suppress(ValueError, io.UnsupportedOperation):
                stream.reconfigure(errors="replace")


if __name__ == "__main__":
    raise SystemExit(main())
