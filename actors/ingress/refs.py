"""Awaiting Ray results from uvicorn's event loop (not Ray's): one helper for the whole ingress."""

from __future__ import annotations

import asyncio


DEFAULT_TIMEOUT_S = 30.0  # every await on another actor has a deadline


async def result(ref, timeout_s: float | None = DEFAULT_TIMEOUT_S):
    """The value of a Ray ObjectRef (its exception re-raised), without blocking the
    event loop; asyncio.TimeoutError after timeout_s (None: no deadline)."""
    fut = asyncio.wrap_future(ref.future())
    return await (fut if timeout_s is None else asyncio.wait_for(fut, timeout_s))
