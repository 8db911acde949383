"""The TAP device: open /dev/net/tun, read frame batches, write them from one thread.

The only module that touches /dev/net/tun. Addresses, MTU and link state are set through
`net/netlink.py` (pyroute2), never here. The device is not persistent: closing the fd
removes it, so a node that dies leaves no interface behind.

Reads are non-blocking and drained per batch after one `wait_readable` (one await per batch).
Writes happen in one long-lived thread fed by a bounded queue: `os.write` releases the GIL,
so the kernel's work of injecting frames overlaps with the Trio thread's crypto (the seed
study's asynchronous TAP writer). When the queue is full, the batch is dropped and counted.
"""

from __future__ import annotations

import errno
import fcntl
import os
import queue
import select
import struct
import threading
from collections.abc import Callable

import trio

from ..errors import TapError
from ..stats import Stats, now_ns

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
READ_SIZE = 65536 + 14 + 10  # a 64 KiB super-frame, its Ethernet and virtio headers
WRITE_QUEUE_BATCHES = 256
INLINE_BATCH = 4  # batches this small are written by the Trio thread when the writer is idle


class Tap:
    """An open, non-persistent TAP device."""

    def __init__(self, name: str, *, vnet_hdr: bool = False) -> None:
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise TapError(
                f"cannot open /dev/net/tun: {exc.strerror} (needs root, or CAP_NET_ADMIN and "
                "access to /dev/net/tun)"
            ) from None
        flags = IFF_TAP | IFF_NO_PI | (IFF_VNET_HDR if vnet_hdr else 0)
        try:
            ifr = fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), flags))
        except OSError as exc:
            os.close(fd)
            why = {
                errno.EBUSY: "already in use",
                errno.EPERM: "Operation not permitted (needs root or CAP_NET_ADMIN)",
            }.get(exc.errno or 0, exc.strerror)
            raise TapError(f"cannot create TAP {name!r}: {why}") from None
        self.fd = fd
        self.name = ifr[:16].rstrip(b"\0").decode()
        self.vnet_hdr = vnet_hdr
        self.offload = 0
        self._closed = False

    def set_offload(self, flags: int) -> bool:
        """Ask for checksum/TSO offload; False when the kernel refuses (callers fall back)."""
        try:
            fcntl.ioctl(self.fd, TUNSETOFFLOAD, flags)
        except OSError:
            return False
        self.offload = flags
        return True

    async def wait_readable(self) -> None:
        await trio.lowlevel.wait_readable(self.fd)

    def read_batch(self, limit: int) -> list[bytes]:
        """Drain up to `limit` frames without blocking (empty list: nothing waiting)."""
        frames: list[bytes] = []
        read = os.read
        fd = self.fd
        try:
            while len(frames) < limit:
                frames.append(read(fd, READ_SIZE))
        except BlockingIOError:
            pass
        return frames

    def write_frames(self, frames: list[bytes], *, block: bool = True) -> int:
        """Write a batch; returns frames the kernel refused. `block` (the writer thread) waits
        out a full TAP queue; the Trio thread's inline writes never wait: they drop."""
        refused = 0
        write = os.write
        fd = self.fd
        for frame in frames:
            while True:
                try:
                    write(fd, frame)
                    break
                except BlockingIOError:
                    if not block:
                        refused += 1
                        break
                    select.select([], [fd], [], 1.0)
                except OSError:
                    refused += 1  # e.g. EINVAL for a malformed frame: the kernel's verdict
                    break
        return refused

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            trio.lowlevel.notify_closing(self.fd)
            os.close(self.fd)


_STOP = object()


class TapWriter:
    """One thread writing frame batches to the TAP, fed by a bounded queue.

    `submit` never blocks the Trio thread: a full queue drops the batch and counts it
    (the data path's full-queue policy: docs/architecture.md, "The task tree").

    Small batches are written inline when the thread has nothing pending: waking a thread
    costs ~0.2 ms here (p99 ~3 ms, the GIL switch interval), which would double a ping's
    RTT, while a few frames cost microseconds to write. `submitted` is written only by the
    Trio thread and `completed` only by the writer, so "nothing pending" needs no lock, and
    an inline write can never overtake a queued batch."""

    def __init__(self, tap: Tap, stats: Stats) -> None:
        self.tap = tap
        self.stats = stats
        self.queue: queue.Queue[tuple[int, list[bytes]] | object] = queue.Queue(WRITE_QUEUE_BATCHES)
        self.submitted = 0
        self.completed = 0
        # Depth is submitted - completed (each written by one thread); the writer thread
        # adds the waits, so only depth/max_depth here are approximate between reads.
        self.channel = stats.channels["tap_write"]
        self._thread = threading.Thread(
            target=self._run, name=f"tap-writer-{tap.name}", daemon=True
        )

    def submit(self, frames: list[bytes]) -> None:
        if len(frames) <= INLINE_BATCH and self.submitted == self.completed:
            self._write(frames, block=False)
            return
        try:
            self.queue.put_nowait((now_ns(), frames))
        except queue.Full:
            self.stats.drop("tap_write_queue_full", len(frames))
            return
        self.submitted += 1
        depth = self.submitted - self.completed
        channel = self.channel
        channel.depth = depth
        if depth > channel.max_depth:
            channel.max_depth = depth

    def _write(self, frames: list[bytes], *, block: bool = True) -> None:
        t0 = now_ns()
        refused = self.tap.write_frames(frames, block=block)
        if refused:
            self.stats.drop("tap_write_refused", refused)
        self.stats["tap_write"].record(len(frames), sum(map(len, frames)), t0)

    def _run(self) -> None:
        get = self.queue.get
        channel = self.channel
        while True:
            item = get()
            if item is _STOP:
                return
            stamp: int
            frames: list[bytes]
            stamp, frames = item  # type: ignore[misc]
            channel.batches += 1
            channel.wait_ns += now_ns() - stamp
            self._write(frames)
            self.completed += 1
            channel.depth = self.submitted - self.completed

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the writer thread for the lifetime of this task."""
        self._thread.start()
        task_status.started()
        try:
            await trio.sleep_forever()
        finally:
            self.queue.put(_STOP)
            join: Callable[[], None] = self._thread.join
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(join)
