"""Fixtures for the budget and timeout attack tests: a real redis-server of their own (so a
test may stop it to see how the router fails), started on a free loopback port."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from confidence_router.testing.processes import RedisServerProcess, start_or_skip


@pytest.fixture(scope="module")
def shared_redis() -> Iterator[RedisServerProcess]:
    """A redis-server for this module's tests (flushed by ``redis_url``)."""
    server = start_or_skip(RedisServerProcess())
    yield server
    server.stop()


@pytest.fixture
def redis_url(shared_redis: RedisServerProcess) -> str:
    """The shared Redis URL, flushed before the test."""
    import redis

    client = redis.Redis.from_url(shared_redis.url)
    client.flushall()
    client.close()
    return shared_redis.url


@pytest.fixture
def own_redis() -> Iterator[RedisServerProcess]:
    """A redis-server for one test alone: the test may stop it midway (stopped again after)."""
    server = start_or_skip(RedisServerProcess())
    yield server
    server.stop()
