"""Micro benchmark of proto/session.py: µs per seal / open of 1400-byte payloads.

Not a test. Run:  .venv/bin/python -m profiling.bench_session [--rounds R] [--batches B]

The unit of work is one GSO batch: 45 datagrams of 1400-byte payloads packed back to back in a
64 KiB buffer (what one UDP_SEGMENT send or one UDP_GRO receive carries), kept warm in cache as
the data path's buffers are. For each cipher (and plain links) it times seal, seal_into,
seal_iov, open_untrusted and open_into_untrusted, plus the bare AEAD call (the
difference is the session's Python overhead) and ReplayWindow.update. Metrics are measured in
interleaved rounds so that a slow phase of a noisy VM hits all of them alike; the table gives
the best round, and the median in brackets. Numbers are relative to the machine.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from ipop_trio.proto.session import Cipher, ReplayWindow, Session

PAYLOAD_SIZE = 1400
PER_BATCH = 45  # 45 * (1400 + 32) = 64 440 bytes: one GSO buffer
GSO_BUFFER = 65536


def make_pair(cipher: Cipher, secure: bool) -> tuple[Session, Session]:
    keys = (b"a" * 32, b"b" * 32)
    sender = Session(
        send_key=keys[0],
        recv_key=keys[1],
        local_index=1,
        remote_index=2,
        cipher=cipher,
        secure=secure,
        created=0.0,
    )
    receiver = Session(
        send_key=keys[1],
        recv_key=keys[0],
        local_index=2,
        remote_index=1,
        cipher=cipher,
        secure=secure,
        created=0.0,
    )
    return sender, receiver


# A metric: given the number of batches, set up (untimed), then return the timed callable.
Metric = Callable[[int], Callable[[], None]]


def mode_metrics(cipher: Cipher, secure: bool) -> dict[str, Metric]:
    payload = bytes(range(256)) * (PAYLOAD_SIZE // 256) + bytes(PAYLOAD_SIZE % 256)
    payloads = [payload] * PER_BATCH
    sender, _ = make_pair(cipher, secure)
    gso = bytearray(b"".join(sender.seal(p) for p in payloads))
    size = len(gso) // PER_BATCH
    datagrams = [memoryview(gso)[i * size : (i + 1) * size] for i in range(PER_BATCH)]
    out = memoryview(bytearray(2048))
    buf = bytearray(GSO_BUFFER)

    def seal(batches: int) -> Callable[[], None]:
        s = make_pair(cipher, secure)[0].seal

        def run() -> None:
            for _ in range(batches):
                for p in payloads:
                    s(p)

        return run

    def seal_into(batches: int) -> Callable[[], None]:
        s = make_pair(cipher, secure)[0].seal_into

        def run() -> None:
            for _ in range(batches):
                offset = 0
                for p in payloads:
                    offset += s(buf, offset, p)

        return run

    def seal_iov(batches: int) -> Callable[[], None]:
        s = make_pair(cipher, secure)[0].seal_iov

        def run() -> None:
            for _ in range(batches):
                s(payloads, [], [])

        return run

    def open_(batches: int) -> Callable[[], None]:
        # A fresh receiver per batch: the same 45 counters must pass its replay window.
        opens = [make_pair(cipher, secure)[1].open_untrusted for _ in range(batches)]

        def run() -> None:
            for o in opens:
                for d in datagrams:
                    o(d)

        return run

    def open_into(batches: int) -> Callable[[], None]:
        opens = [make_pair(cipher, secure)[1].open_into_untrusted for _ in range(batches)]

        def run() -> None:
            for o in opens:
                for d in datagrams:
                    o(d, out)

        return run

    metrics: dict[str, Metric] = {
        "seal": seal,
        "seal_into": seal_into,
        "seal_iov": seal_iov,
        "open": open_,
        "open_into": open_into,
    }
    if secure:
        aead = (AESGCM if cipher is Cipher.AES_256_GCM else ChaCha20Poly1305)(b"a" * 32)
        nonce, header = bytes(12), bytes(16)
        target = memoryview(bytearray(PAYLOAD_SIZE + 16))

        def bare(batches: int) -> Callable[[], None]:
            def run() -> None:
                e = aead.encrypt_into
                for _ in range(batches):
                    for p in payloads:
                        e(nonce, p, header, target)

            return run

        metrics["aead.encrypt_into"] = bare
    return metrics


def window_metric(batches: int) -> Callable[[], None]:
    counters = range(batches * PER_BATCH)
    update = ReplayWindow().update

    def run() -> None:
        for c in counters:
            update(c)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40, help="interleaved rounds")
    parser.add_argument("--batches", type=int, default=20, help="GSO batches per metric/round")
    args = parser.parse_args()
    ops = args.batches * PER_BATCH

    modes: dict[str, dict[str, Metric]] = {
        "aes-256-gcm": mode_metrics(Cipher.AES_256_GCM, True),
        "chacha20-poly1305": mode_metrics(Cipher.CHACHA20_POLY1305, True),
        "plain": mode_metrics(Cipher.AES_256_GCM, False),
        "-": {"ReplayWindow.update": window_metric},
    }
    samples: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds):
        for mode, metrics in modes.items():
            for name, metric in metrics.items():
                run = metric(args.batches)
                t0 = time.perf_counter()
                run()
                elapsed = time.perf_counter() - t0
                samples.setdefault((mode, name), []).append(elapsed / ops * 1e6)

    print(
        f"payload {PAYLOAD_SIZE} B, {args.rounds} rounds x {ops} ops "
        f"({args.batches} batches of {PER_BATCH}); µs per datagram: best [median]"
    )
    columns = [
        "seal",
        "seal_into",
        "seal_iov",
        "open",
        "open_into",
        "aead.encrypt_into",
        "ReplayWindow.update",
    ]
    print(f"{'':18s}" + "".join(f"{c:>20s}" for c in columns))
    for mode in modes:
        cells = []
        for column in columns:
            values = samples.get((mode, column))
            if values is None:
                cells.append(f"{'':>20s}")
            else:
                cells.append(f"{min(values):>11.2f} [{statistics.median(values):5.2f}]")
        print(f"{mode:18s}" + "".join(cells))


if __name__ == "__main__":
    main()
