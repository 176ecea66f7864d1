from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kernel import NetNS, Plugin, make_topology


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Unix socket paths must stay under 108 bytes; pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="np-", dir="/tmp") as d:
        yield Path(d)


@pytest.fixture
def topology() -> Iterator[tuple[NetNS, NetNS]]:
    host, world = make_topology()
    try:
        yield host, world
    finally:
        host.delete()
        world.delete()


@pytest.fixture
def plugin(topology: tuple[NetNS, NetNS], workdir: Path) -> Iterator[Plugin]:
    host, _ = topology
    plug = Plugin(host, workdir)
    plug.start()
    try:
        yield plug
    finally:
        plug.kill()
