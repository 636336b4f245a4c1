"""Waiting on conditions with a deadline: the only way our tests (and benchmarks) wait."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio

T = TypeVar("T")


class WaitTimeout(AssertionError, TimeoutError):
    """The condition did not hold by the deadline: a failed assertion to pytest, a
    ``TimeoutError`` to code (the benchmarks) that wants to recover from it."""


def wait_until(predicate: Callable[[], T | None], timeout: float = 10.0, interval: float = 0.02,
               message: str = "condition") -> T:
    """Call ``predicate`` until it returns something truthy; return that. Fail at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise WaitTimeout(f"timed out after {timeout:g}s waiting for {message}")
        time.sleep(interval)


async def async_wait_until(predicate: Callable[[], Any], timeout: float = 10.0,
                           interval: float = 0.02, message: str = "condition") -> Any:
    """``wait_until`` for async tests: the predicate may be sync or return an awaitable."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if isinstance(value, Awaitable):
            value = await value
        if value:
            return value
        if time.monotonic() >= deadline:
            raise WaitTimeout(f"timed out after {timeout:g}s waiting for {message}")
        await anyio.sleep(interval)
