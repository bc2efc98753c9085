"""Deadlines and cancellation for awaitables, without ``asyncio.wait_for``'s lost cancellations.

Before Python 3.12, ``asyncio.wait_for`` returns the result and drops a cancellation that
lands just as the awaited step finishes (gh-86296). The router awaits every chunk of a tier's
stream under a deadline, so a caller that cancelled its call at that moment saw it carry on
to the end of the answer (the model generating for nobody). These helpers run the step as a
task awaited with :func:`asyncio.wait` and cancel it until it has ended.

>>> import asyncio
>>> async def slow():
...     await asyncio.sleep(10)
>>> async def main():
...     try:
...         await within(slow(), 0.01)
...     except asyncio.TimeoutError:
...         return "timed out"
>>> asyncio.run(main())
'timed out'
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

T = TypeVar("T")


async def within(awaitable: Awaitable[T], seconds: float) -> T:
    """``await awaitable`` for at most ``seconds``; past that it is cancelled (and has ended).

    A cancellation of the caller cancels the awaitable too, and is never lost.

    Raises:
        asyncio.TimeoutError: the deadline passed first.
    """
    task = asyncio.ensure_future(awaitable)
    try:
        await asyncio.wait({task}, timeout=max(seconds, 0.0))
    finally:  # on a deadline, and on the caller's cancellation
        if not task.done():
            await cancel_and_wait(task)
    if task.cancelled():
        raise asyncio.TimeoutError
    return task.result()


async def cancel_and_wait(task: asyncio.Future[Any]) -> None:
    """Cancel ``task`` and wait until it has ended, cancelling again if a cancellation was
    swallowed (see the module docstring). Its exception, if any, is retrieved and dropped:
    the caller gave up on its result."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.1)
    if not task.cancelled():
        task.exception()
