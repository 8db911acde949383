"""The session table: receiver indices, and the session and peer each one opens for.

Every data datagram names its receiver's index (`receiver_index`, proto/wire.py); every
handshake response names the index of the initiation it answers. This table is the one owner
of those indices: it hands them out (`allocate`, random and unique, so an index tells an
attacker nothing), knows who holds each one (`owner`: handshake responses are routed by
it), holds the session opened for each (`entries`: read by the inbound stage per datagram
run) and takes them back (`release`, `release_owner`). The link tasks are its only writers.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Generic, TypeVar

from ..proto.session import Session
from .switch import PeerPort

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


class SessionTable(Generic[Owner]):
    def __init__(self) -> None:
        self.entries: dict[int, SessionEntry] = {}  # index -> the session it opens for
        self._owners: dict[int, Owner] = {}  # every index handed out and not released

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

    def release(self, index: int) -> None:
        """`index` is retired: it opens nothing more and may be handed out again."""
        self.entries.pop(index, None)
        self._owners.pop(index, None)

    def release_owner(self, owner: Owner) -> None:
        """Release every index `owner` holds (its peer was removed)."""
        for index in [i for i, o in self._owners.items() if o is owner]:
            self.release(index)

    def held_by(self, owner: Owner) -> list[int]:
        return [i for i, o in self._owners.items() if o is owner]

    def __len__(self) -> int:
        return len(self._owners)
