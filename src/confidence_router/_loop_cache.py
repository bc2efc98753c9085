"""One copy of an object per running event loop, kept on the loop and dropped with either.

httpx ``AsyncClient`` connections are bound to the loop that opened them: after that loop
closed (a second ``asyncio.run()``), they fail. So a client-holding model (``ChatOllama``,
``OllamaEmbeddings``) gets a rebuilt copy per loop. The copies are kept on the loop object
itself (a weak mapping keyed by the loop would never drop them: the clients refer to their
loop), keyed by the original, which the entry refers to weakly: an original made per request
on a server's long-lived loop takes its copy, clients and sockets along when it goes.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def per_loop_copy(original: T, attribute: str, build: Callable[[T], T]) -> T:
    """``build(original)``, made once per running loop and cached on it under ``attribute``.

    Must be called with a running loop. A loop class that takes no attributes (``__slots__``)
    gets a new copy per call.
    """
    loop = asyncio.get_running_loop()
    copies: dict[int, tuple[weakref.ref[Any], Any]] | None = getattr(loop, attribute, None)
    if copies is None:
        copies = {}
        try:
            setattr(loop, attribute, copies)
        except AttributeError:
            return build(original)
    key = id(original)
    entry = copies.get(key)
    if entry is None or entry[0]() is not original:

        def forget(ref: weakref.ref[Any], copies: dict[int, Any] = copies) -> None:
            if copies.get(key, (None,))[0] is ref:  # not a later object given the same id
                del copies[key]

        entry = (weakref.ref(original, forget), build(original))
        copies[key] = entry
    copy: T = entry[1]
    return copy
