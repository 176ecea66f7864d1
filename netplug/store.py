"""Durable records of networks and endpoints.

One JSON file per record under `<state_dir>/networks/` and `<state_dir>/endpoints/`, written to a
temporary file and renamed over the old one: a `kill -9` at any instant leaves either the old or
the new record, never a torn one. The in-memory dicts are the index every read uses; files are
only read at start.

Network records are also fsynced (file and directory), because dockerd sends CreateNetwork once
and never again: a network record lost to a power cut could never be rebuilt. Endpoint records
are not: after a power cut or a reboot every container has to start again, with new endpoint IDs,
so an endpoint record only has to survive the plugin process, which the rename already ensures.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TypeVar

import msgspec
import trio

from netplug.model import Endpoint, Network

log = logging.getLogger("netplug.store")

_R = TypeVar("_R", Network, Endpoint)
_encoder = msgspec.json.Encoder()


class Store:
    def __init__(self, state_dir: Path, *, fsync: bool = True) -> None:
        self.root = state_dir
        self.fsync = fsync
        self.networks: dict[str, Network] = {}
        self.endpoints: dict[str, Endpoint] = {}
        self._link_owners: dict[str, str] = {}  # link name -> endpoint ID, for collisions
        self._dirs = {Network: state_dir / "networks", Endpoint: state_dir / "endpoints"}

    # --- loading --------------------------------------------------------------------------

    def load(self) -> list[str]:
        """Read every record; returns the problems found (unreadable files are set aside)."""
        problems: list[str] = []
        for kind, directory in self._dirs.items():
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            for path in sorted(directory.iterdir()):
                if path.name.endswith(".tmp"):
                    path.unlink(missing_ok=True)  # a write that a crash interrupted
                    continue
                if not path.name.endswith(".json"):
                    continue  # set aside earlier (.corrupt)
                try:
                    record = msgspec.json.decode(path.read_bytes(), type=kind)
                except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                    bad = path.with_name(path.name + ".corrupt")
                    path.rename(bad)
                    problems.append(f"{path}: {exc} (moved to {bad.name})")
                    continue
                if isinstance(record, Network):
                    self.networks[record.id] = record
                else:
                    self._index(record)
        return problems

    # --- writing --------------------------------------------------------------------------

    def _path(self, record: Network | Endpoint) -> Path:
        return self._dirs[type(record)] / f"{record.id}.json"

    async def save(self, record: _R, *, concurrent: bool = False) -> _R:
        """Index the record at once, then write it: network records durably (fsynced) on a
        worker thread unless they say "creating", other records inline (without fsync a write
        and a rename cost tens of microseconds). With `concurrent`, tasks started alongside
        this one run first, up to their first wait: kernel work handed to a thread proceeds
        while the write happens."""
        if isinstance(record, Network):
            self.networks[record.id] = record
        else:
            self._index(record)
        # A network record that says "creating" need not survive a power cut: the cut takes
        # the bridge with it, and dockerd never got an answer. "ready" and "deleting" must:
        # dockerd never sends the CreateNetwork again, nor a DeleteNetwork it had answered.
        durable = self.fsync and isinstance(record, Network) and record.state != "creating"
        if durable:
            await trio.to_thread.run_sync(
                self._write, self._path(record), _encoder.encode(record), True
            )
        else:
            if concurrent:
                await trio.lowlevel.checkpoint()
            self._write(self._path(record), _encoder.encode(record), False)
        return record

    async def remove(self, record: Network | Endpoint) -> None:
        if isinstance(record, Network):
            self.networks.pop(record.id, None)
        elif self.endpoints.pop(record.id, None) is not None:
            for name in record.links.values():
                if self._link_owners.get(name) == record.id:
                    del self._link_owners[name]
        if self.fsync and isinstance(record, Network):
            await trio.to_thread.run_sync(self._unlink, self._path(record), True)
        else:
            self._unlink(self._path(record), False)

    def _write(self, path: Path, data: bytes, durable: bool) -> None:
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        if durable:
            self._sync_dir(path.parent)

    def _unlink(self, path: Path, durable: bool) -> None:
        path.unlink(missing_ok=True)
        if durable:
            self._sync_dir(path.parent)

    @staticmethod
    def _sync_dir(directory: Path) -> None:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # --- queries --------------------------------------------------------------------------

    def _index(self, endpoint: Endpoint) -> None:
        self.endpoints[endpoint.id] = endpoint
        for name in endpoint.links.values():
            self._link_owners.setdefault(name, endpoint.id)

    def link_owner(self, name: str) -> str | None:
        """The endpoint whose record names link `name`, if any."""
        return self._link_owners.get(name)

    def endpoints_of(self, network_id: str) -> list[Endpoint]:
        return [ep for ep in self.endpoints.values() if ep.network_id == network_id]
