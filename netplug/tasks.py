"""Running a few awaitables at the same time, with their errors raised as themselves."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio


async def together(*fns: Callable[[], Awaitable[object]]) -> None:
    """Run `fns` at the same time and return when all are done. When one fails the others are
    cancelled and its error is raised as itself, not in an exception group, so that callers
    (and the error mapping in dispatch) see what it was."""
    try:
        async with trio.open_nursery() as nursery:
            for fn in fns:
                nursery.start_soon(fn)
    except BaseExceptionGroup as group:
        raise group.exceptions[0] from None
