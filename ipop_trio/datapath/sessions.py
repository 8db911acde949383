"""The session table: receiver indices, and the session and peer each one opens for.

Every data datagram names its receiver's index (`receiver_index`, proto/wire.py); every
handshake response names the index of the initiation it answers. This table is the one owner
of those indices: it hands them out (`allocate`, random and unique, so an index tells an
attacker nothing), knows who holds each one (`owner`: handshake responses are routed by
it), holds the session opened for each (`entries`: read by the inbound stage per datagram
run) and takes them back (`release`, `release_owner`). The link tasks are its only writers.

With the native core (datapath/native.py) the table keeps the native session table in step:
every session added is inserted there under its port's `id`, every release removes it, and
each port's accepted paths are mirrored as path tokens (`PathTokens`), so the native inbound
loop makes the plain-path check Python makes. Reassembly state then lives natively, per
peer: `reset_reassembly` and `forget_port` reach whichever implementation holds it.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from ..proto.session import Session
from . import native as core
from .switch import Path, PeerPort

Owner = TypeVar("Owner")


class SessionEntry:
    """A receiving session and the peer it belongs to (keyed by our local index)."""

    __slots__ = ("confirm", "port", "session")

    def __init__(
        self, session: Session, port: PeerPort, confirm: Callable[[], None] | None
    ) -> None:
        self.session = session
        self.port = port
        self.confirm = confirm  # first datagram opened on it: tell the link (rekey handover)


class PathTokens:
    """A number for each path some peer's plain session accepts data from (the native table
    checks numbers, not addresses). Only paths the control plane set get a number: a source
    the network made up is `NONE` and never grows the table."""

    NONE = 0

    def __init__(self) -> None:
        self._tokens: dict[Path, int] = {}
        self._users: dict[int, int] = {}  # token -> ports using it
        self._held: dict[int, set[Path]] = {}  # port id -> its paths
        self._next = 1

    def get(self, path: Path) -> int:
        return self._tokens.get(path, self.NONE)

    def set(self, port_id: int, paths: set[Path]) -> list[int]:
        """`port_id` now accepts `paths`; returns their tokens."""
        old = self._held.pop(port_id, set())
        for path in old - paths:
            self._unuse(path)
        for path in paths - old:
            token = self._tokens.get(path)
            if token is None:
                token = self._tokens[path] = self._next
                self._next += 1
            self._users[token] = self._users.get(token, 0) + 1
        if paths:
            self._held[port_id] = paths
        return [self._tokens[p] for p in paths]

    def _unuse(self, path: Path) -> None:
        token = self._tokens[path]
        self._users[token] -= 1
        if not self._users[token]:
            del self._users[token], self._tokens[path]

    def __len__(self) -> int:
        return len(self._tokens)


class SessionTable(Generic[Owner]):
    def __init__(self, *, native: bool = False) -> None:
        """`native`: sessions are the native core's, and its table opens inbound data
        (datapath/native.py; the caller checks `native.AVAILABLE`)."""
        self.entries: dict[int, SessionEntry] = {}  # index -> the session it opens for
        self._owners: dict[int, Owner] = {}  # every index handed out and not released
        # datapath.native.SessionTable when the native core runs the inbound loop
        self.native: Any = core.SessionTable() if native else None
        self.ports: dict[int, PeerPort] = {}  # port id -> port, for the native table's peers
        self.paths = PathTokens()
        # What a handshake's keys become: sessions the table's inbound loop can open.
        self.make_session: Callable[..., Session] = core.Session if native else Session

    def allocate(self, owner: Owner) -> int:
        """A fresh receiver index for `owner` (a handshake attempt or an answered one)."""
        while True:
            index = secrets.randbits(32)
            if index not in self._owners:
                self._owners[index] = owner
                return index

    def owner(self, index: int) -> Owner | None:
        return self._owners.get(index)

    def add(self, index: int, entry: SessionEntry) -> None:
        """A session exists for `index`: inbound datagrams naming it are opened with it."""
        if index not in self._owners:
            raise KeyError(f"receiver index {index:08x} was never allocated")
        self.entries[index] = entry
        if self.native is not None:
            port = entry.port
            self.native.insert(entry.session, port.id)
            if port.id not in self.ports:
                self.ports[port.id] = port
                port.on_path_change = self._paths_changed
                self._paths_changed(port)

    def release(self, index: int) -> None:
        """`index` is retired: it opens nothing more and may be handed out again."""
        self.entries.pop(index, None)
        self._owners.pop(index, None)
        if self.native is not None:
            self.native.remove(index)

    def _paths_changed(self, port: PeerPort) -> None:
        self.native.set_paths(port.id, self.paths.set(port.id, port.accepted_paths()))

    def reset_reassembly(self, port: PeerPort, out: list[bytes]) -> None:
        """The peer's sessions were replaced (it may have restarted and numbers its
        super-frames from 0 again): its pending frame goes to `out`, its frame ids are
        forgotten."""
        if self.native is None:
            port.reassembler.reset(out)
        else:
            out.extend(frame for frame, _peer in self.native.reset_peer(port.id))

    def forget_port(self, port: PeerPort) -> None:
        """The peer was removed: its half-reassembled frames are never written now."""
        if self.native is not None and self.ports.pop(port.id, None) is not None:
            self.native.remove_peer(port.id)
            self.paths.set(port.id, set())
            port.on_path_change = None

    def release_owner(self, owner: Owner) -> None:
        """Release every index `owner` holds (its peer was removed)."""
        for index in [i for i, o in self._owners.items() if o is owner]:
            self.release(index)

    def held_by(self, owner: Owner) -> list[int]:
        return [i for i, o in self._owners.items() if o is owner]

    def __len__(self) -> int:
        return len(self._owners)
