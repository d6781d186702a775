"""Awaiting Ray results from uvicorn's event loop (not Ray's): one helper for the whole ingress."""

from __future__ import annotations

import asyncio


async def result(ref):
    """The value of a Ray ObjectRef (its exception re-raised), without blocking the event loop."""
    return await asyncio.wrap_future(ref.future())
