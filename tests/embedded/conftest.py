"""Fixtures shared by the embedded-model tests."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest


def _idle_count(backend: Any, timeout: float = 60.0) -> int:
    """The backend's produced-token count once its decode loop has released the model.

    Counted server-side (``generated_tokens``), so it shows whether the model really stopped.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if backend._lock.acquire(timeout=0.1):
            backend._lock.release()
            return int(backend.generated_tokens)
    raise AssertionError("the model is still generating")


@pytest.fixture
def idle_count() -> Callable[..., int]:
    """``idle_count(backend)``: tokens produced so far, read once the model is idle."""
    return _idle_count
