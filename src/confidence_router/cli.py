"""The ``confidence-router`` command line.

``confidence-router demo``      route a set of questions on real Ollama or the embedded model
``confidence-router serve``     serve the embedded model on an Ollama-compatible HTTP port
``confidence-router eval``      measure the confidence signals on a dataset (see ``--help``)
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
    except (ConfidenceRouterError, ImportError, FileNotFoundError) as error:
        print(f"confidence-router {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
