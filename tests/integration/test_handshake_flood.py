"""A genuine handshake through a flood of replayed initiations from many source addresses
(issue 13, item 3): two nodes assembled as in test_links.py, on real time (no MockClock),
so the flood runs as fast as this process can make it while the links run beside it.

One captured initiation (valid mac1, valid Noise message, valid certificate) is replayed
from random source addresses, in bursts with a checkpoint between them. Beta comes under
load, answers the replays with cookie replies (to addresses nobody holds) and queues none
of them; alpha's own initiation gets a cookie too, its next retransmission carries mac2,
and it is answered.
"""

from __future__ import annotations

import random
import time

import trio

from ipop_trio.proto import handshake
from ipop_trio.proto.session import REKEY_ATTEMPT_TIME, Cipher

from .test_links import ADDRS, ALPHA, BETA, Node, Wire, peer_setup, received

BURST = 200  # replays between two checkpoints of the flooding task


async def test_a_genuine_handshake_completes_through_a_replay_flood(datapath: str) -> None:
    wire = Wire()
    alpha = Node(wire, ALPHA, [peer_setup(BETA, ADDRS["beta"])], datapath)
    beta = Node(wire, BETA, [peer_setup(ALPHA, None)], datapath)  # waits for alpha's initiation
    captured, _ = handshake.create_initiation(
        alpha.local, BETA.public_key, 4242, Cipher.AES_256_GCM, {}, time.time() - 1
    )
    rng = random.Random(13)
    sent = 0
    done = trio.Event()

    async def flood() -> None:
        nonlocal sent
        while not done.is_set():
            for _ in range(BURST):
                src = (
                    f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}",
                    4600,
                )
                beta.arrive(src, captured)
            sent += BURST
            await trio.sleep(0)

    async with trio.open_nursery() as nursery:
        await nursery.start(beta.links.serve)
        flood_started = trio.current_time()
        nursery.start_soon(flood)
        # Let beta feel the flood before alpha tries.
        while not beta.links.guard.under_load(trio.current_time()):
            await trio.sleep(0.01)
        start = trio.current_time()
        await nursery.start(alpha.links.serve)
        with trio.fail_after(REKEY_ATTEMPT_TIME):
            while not (alpha.rt(BETA).established and beta.rt(ALPHA).established):
                await trio.sleep(0.05)
        took = trio.current_time() - start
        alpha.send_frame(BETA, b"through the flood")
        await received(beta, b"through the flood", timeout=10)
        done.set()
        rate = sent / (trio.current_time() - flood_started)
        nursery.cancel_scope.cancel()

    got = beta.stats.counters()
    drops = beta.stats.drops
    print(
        f"\nflood: {sent} replays at {rate:.0f}/s; handshake took {took:.1f}s;"
        f" beta {dict(sorted(got.items()))}; alpha cookies received"
        f" {alpha.stats.counters().get('handshake_cookie_received')}"
    )
    assert took < REKEY_ATTEMPT_TIME
    assert got["handshake_cookie_sent"] >= 0.9 * (sent - got.get("handshake_queued", 0))
    assert got.get("handshake_mac2_ok", 0) >= 1  # alpha's retransmission, with mac2
    assert alpha.stats.counters()["handshake_cookie_received"] >= 1
    # At most what came before the load was noticed was queued: the budget and the queue.
    assert got.get("handshake_queued", 0) <= 400 + 64
    assert drops.get("handshake_rate_limited", 0) == 0  # replays never prove an address
