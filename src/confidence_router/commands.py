"""The registry of ``confidence-router`` sub-commands.

Each feature declares its commands next to its code with :func:`command`; the CLI
(:mod:`confidence_router.cli`) imports the feature modules and builds the parser from
:data:`COMMANDS`. Modules that register commands import this module, never the CLI, so there is
no import cycle.

>>> @command("hello", lambda parser: None, "say hello")
... def _hello(args):
...     return 0
>>> COMMANDS["hello"].summary
'say hello'
>>> del COMMANDS["hello"]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import NamedTuple

__all__ = ["COMMANDS", "Command", "RegisteredCommand", "command"]

Command = Callable[[argparse.Namespace], int]


class RegisteredCommand(NamedTuple):
    """One sub-command: its options, its function and its one-line summary."""

    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Command
    summary: str


#: Every registered sub-command, by name, in registration order.
COMMANDS: dict[str, RegisteredCommand] = {}


def command(
    name: str,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    summary: str | None = None,
) -> Callable[[Command], Command]:
    """Register a sub-command (keeps each command's options next to its code).

    Args:
        name: the command word.
        add_arguments: adds the command's options to its parser.
        summary: one line of plain text for ``confidence-router --help``; default: the first
            line of the command function's docstring.
    """

    def register(run: Command) -> Command:
        doc_line = (run.__doc__ or "").strip().splitlines()[:1]
        text = summary or (doc_line[0].rstrip(".") if doc_line else name)
        COMMANDS[name] = RegisteredCommand(add_arguments, run, text)
        return run

    return register
