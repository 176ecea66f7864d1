"""`netplug.tasks.together`: awaitables at the same time, errors raised as themselves."""

from __future__ import annotations

import pytest
import trio

from netplug.errors import LinkExists
from netplug.tasks import together


async def test_all_run_at_the_same_time() -> None:
    order: list[str] = []

    async def step(name: str, delay: float) -> None:
        order.append(f"{name} started")
        await trio.sleep(delay)
        order.append(f"{name} done")

    with trio.fail_after(5):
        start = trio.current_time()
        await together(lambda: step("a", 0.2), lambda: step("b", 0.1))
    assert trio.current_time() - start < 0.3  # not one after the other
    assert sorted(order[:2]) == ["a started", "b started"]
    assert order[2:] == ["b done", "a done"]


async def test_an_error_is_raised_as_itself_and_cancels_the_rest() -> None:
    finished: list[str] = []

    async def slow() -> None:
        await trio.sleep(10)
        finished.append("slow")

    async def failing() -> None:
        await trio.sleep(0.01)
        raise LinkExists("creating veth a/b: already exists")

    with trio.fail_after(5), pytest.raises(LinkExists, match="already exists") as caught:
        await together(slow, failing)
    assert not isinstance(caught.value, BaseExceptionGroup)
    assert finished == []
