"""The ``confidence-router`` command line.

``confidence-router demo``      route a set of questions on real Ollama or the embedded model
``confidence-router serve``     serve the embedded model on an Ollama-compatible HTTP port
``confidence-router eval``      measure the confidence signals on a dataset (see ``--help``)
``confidence-router calibrate`` pick a threshold from an evaluation run (target rate/accuracy)
``confidence-router proxy``     an OpenAI- and Ollama-compatible routing proxy (HTTP)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from confidence_router.errors import ConfidenceRouterError

Command = Callable[[argparse.Namespace], int]
_COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Command]] = {}


def command(name: str, add_arguments: Callable[[argparse.ArgumentParser], None]):
    """Register a sub-command (keeps each command's options next to its code)."""

    def register(run: Command) -> Command:
        _COMMANDS[name] = (add_arguments, run)
        return run

    return register


def _demo_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threshold", type=float, default=None,
                        help="confidence threshold (default: settings, 0.7)")
    parser.add_argument("--config", default=None, help="settings file (TOML or JSON)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


@command("demo", _demo_args)
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
    parser.add_argument("--port", type=int, default=11435, help="port on 127.0.0.1")


@command("serve", _serve_args)
def _serve(args: argparse.Namespace) -> int:
    import time

    from confidence_router.embedded import start_embedded_server

    with start_embedded_server(port=args.port) as server:
        print(f"Ollama-compatible server with the embedded model at {server.url} (Ctrl-C stops)")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            return 0


def _calibrate_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_db", metavar="RUN.sqlite", help="an evaluation run database")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--target-rate", type=float, help="cloud-call rate to aim for, e.g. 0.3")
    target.add_argument("--target-accuracy", type=float,
                        help="accuracy to reach at the lowest call rate, e.g. 0.8")
    parser.add_argument("--signal", default="confidence",
                        help="score column: confidence (mean logprob), min_confidence, ...")
    parser.add_argument("--run", default=None, help="run name or id when the file has several")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


@command("calibrate", _calibrate_args)
def _calibrate(args: argparse.Namespace) -> int:
    """Pick a threshold from a labelled evaluation run for a target call rate or accuracy."""
    import json
    import math

    from confidence_router.calibration import calibrate_run

    result = calibrate_run(args.run_db, signal=args.signal, run=args.run,
                           target_rate=args.target_rate, target_accuracy=args.target_accuracy)
    values = result.as_dict()
    if isinstance(values.get("threshold"), float) and math.isinf(values["threshold"]):
        values["threshold"] = "inf"  # escalate everything: not valid JSON as a float
    if args.json:
        print(json.dumps(values, indent=2))
    elif not result.reachable:
        print(f"target not reachable: {result.note}")
    else:
        print(f"threshold {values['threshold']}  (signal {args.signal}, n={result.n})")
        print(f"expected call rate {result.expected_call_rate:.3f}, "
              f"expected accuracy {result.expected_accuracy:.3f} ({result.accuracy_kind})")
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


@command("proxy", _proxy_args)
def _proxy(args: argparse.Namespace) -> int:
    """Serve the routing proxy (needs the 'proxy' extra)."""
    from confidence_router.proxy import serve

    serve(host=args.host, port=args.port, workers=args.workers, settings_path=args.config)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every registered sub-command."""
    _load_optional_commands()
    parser = argparse.ArgumentParser(prog="confidence-router", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add_arguments, _) in _COMMANDS.items():
        add_arguments(sub.add_parser(name))
    return parser


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
    _, run = _COMMANDS[args.command]
    try:
        return run(args)
    except (ConfidenceRouterError, ImportError, FileNotFoundError, ValueError) as error:
        print(f"confidence-router {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
