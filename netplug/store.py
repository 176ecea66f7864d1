"""Durable records of networks and endpoints.

One JSON file per record under `<state_dir>/networks/` and `<state_dir>/endpoints/`, written to a
temporary file, fsynced, renamed over the old one and the directory fsynced: a crash (or `kill -9`)
at any instant leaves either the old or the new record, never a torn one. The in-memory dicts are
the index every read uses; files are only read at start.
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
                    self.endpoints[record.id] = record
        return problems

    # --- writing --------------------------------------------------------------------------

    def _path(self, record: Network | Endpoint) -> Path:
        return self._dirs[type(record)] / f"{record.id}.json"

    async def save(self, record: _R) -> _R:
        """Index the record at once, then write it durably on a worker thread."""
        if isinstance(record, Network):
            self.networks[record.id] = record
        else:
            self.endpoints[record.id] = record
        await trio.to_thread.run_sync(self._write, self._path(record), _encoder.encode(record))
        return record

    async def remove(self, record: Network | Endpoint) -> None:
        if isinstance(record, Network):
            self.networks.pop(record.id, None)
        else:
            self.endpoints.pop(record.id, None)
        await trio.to_thread.run_sync(self._unlink, self._path(record))

    def _write(self, path: Path, data: bytes) -> None:
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        if self.fsync:
            self._sync_dir(path.parent)

    def _unlink(self, path: Path) -> None:
        path.unlink(missing_ok=True)
        if self.fsync:
            self._sync_dir(path.parent)

    @staticmethod
    def _sync_dir(directory: Path) -> None:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # --- queries --------------------------------------------------------------------------

    def endpoints_of(self, network_id: str) -> list[Endpoint]:
        return [ep for ep in self.endpoints.values() if ep.network_id == network_id]
