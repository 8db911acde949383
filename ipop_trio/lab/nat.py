"""NAT routers and a coturn STUN/TURN server for the namespace lab.

What ICE meets in the field, rebuilt in namespaces with the real kernel's conntrack:

    lan host --[LAN switch 192.168.N.0/24]-- .1 router .k --[internet switch 10.199.255.0/24]--
    lan host --'                              (nftables)                       turn, peers, ...

* The "internet" is an ordinary lab switch (`Lab.add_switch`, 10.199.(255 - n).0/24): in the
  lab, "public" means an address on it. Nothing here is routed outside the lab's namespaces.
* `add_nat` makes a router namespace with one leg on the internet (its public, outside address)
  and one on a new private LAN switch (default 192.168.N.0/24, the router is .1), forwarding on,
  and an nftables ruleset (`nat_ruleset`) in its namespace:
    - ``mapping="eim"``: ``masquerade``. Linux keeps the source port whenever the translated
      5-tuple is unique, so one internal ip:port gets the same public ip:port towards every
      destination: endpoint-independent, port-preserving mapping (RFC 4787 §4.1). It is not
      EIM when two LAN hosts collide on a port towards the same destination (the second gets
      another port), which the lab never provokes by itself.
    - ``mapping="symmetric"``: ``masquerade fully-random``: every new conntrack entry (that
      is, every new destination ip:port) gets a random public port.
    - Filtering is conntrack's: only replies to an existing mapping's 5-tuple come in
      (address- and port-dependent filtering, RFC 4787 §5). Unsolicited new TCP/UDP from the
      internet is dropped in the router's input and forward hooks. The input drop matters: a
      hole-punching packet that arrives before the router's own host sent one would otherwise
      be accepted as a new connection *to the router*, and its confirmed conntrack entry would
      take the very public port the LAN host's outgoing packet needs, so conntrack would remap
      that host to another port and hole punching between two EIM NATs would fail. A dropped
      packet's conntrack entry is never confirmed, so it takes nothing.
    - No hairpinning: a LAN host sending to its own router's public address reaches the
      router, not the mapped LAN host (hosts behind one NAT talk over the LAN instead).
* `add_turn` starts coturn (``turnserver``) on a host with a config file of its own in the
  lab's workdir, listening only on that host's lab address, with long-term credentials, no
  TLS/DTLS/CLI/RFC 5780, a small relay port range, and the lab's ranges explicitly allowed as
  peers (`ALLOWED_PEERS`). Readiness is a STUN Binding answered (`stun_binding`), polled with
  a deadline.

Everything is built through `Lab`'s public API (hosts, switches, routes, tracked processes), so
the lab's teardown removes it all: namespaces take their nftables rulesets with them, coturn is
a tracked process. This module must never touch a namespace the lab did not make, run nft or
turnserver outside a lab namespace, or leave coturn running past its lab.
"""

from __future__ import annotations

import ipaddress
import random
import select
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from ipop_trio.errors import BadPacket, LabError
from ipop_trio.lab.netns import LAB_NETWORK, POLL_INTERVAL, Host, Iface, Lab, LabSwitch
from ipop_trio.proto import stun
from ipop_trio.proto.stun import Addr

NatMapping = Literal["eim", "symmetric"]
NAT_MAPPINGS: tuple[str, ...] = get_args(NatMapping)

# Private LANs behind NAT routers: each NAT gets the next free 192.168.N.0/24, N from 1.
LAN_SUPERNET = ipaddress.IPv4Network("192.168.0.0/16")
NFT_TABLE = "ipop_nat"

TURN_PORT = 3478  # RFC 8489 §18.6 default port for STUN/TURN over UDP
TURN_RELAY_PORTS = (49152, 49215)  # a small relay range: enough for any lab test
# coturn's peer checks (denied-peer-ip, loopback, ...) must let relays reach lab hosts.
ALLOWED_PEERS = (LAB_NETWORK, LAN_SUPERNET)
TURN_READY_TIMEOUT = 10.0
TURN_STOP_TIMEOUT = 5.0

# STUN Binding retransmission for lab probes: the lab's links do not lose packets, but a
# server that is still starting does not answer, so retry fast (RFC 8489 §6.2.1 shape, with
# an RTO suited to a namespace, not to the Internet).
PROBE_RTO = 0.05
PROBE_RTO_MAX = 0.5
PROBE_SIZE = 2048

# Values written into coturn's config file: no whitespace, no '#', no ':' in user names.
_CONFIG_WORD = frozenset(" \t\r\n#")


# ---------------------------------------------------------------------------------------------
# NAT routers


@dataclass(frozen=True, slots=True)
class NatRouter:
    """A NAT router of a lab: its namespace, its two legs and the ruleset it runs."""

    host: Host  # the router's namespace
    mapping: NatMapping
    internet: LabSwitch
    outside: Iface  # on the internet switch: the NAT's public address
    lan: LabSwitch  # the private LAN switch behind it
    inside: Iface  # on the LAN: the gateway of hosts behind
    ruleset: Path  # the nft script loaded in the router's namespace

    @property
    def public_address(self) -> str:
        """The address every mapping of this NAT uses (as STUN servers see it)."""
        return str(self.outside.address.ip)

    @property
    def gateway(self) -> str:
        """The router's LAN address: the default route of hosts behind it."""
        return str(self.inside.address.ip)

    @property
    def hosts(self) -> list[Host]:
        """The hosts behind this NAT (everything on its LAN but the router)."""
        return [port.host for port in self.lan.ports if port.host is not self.host]


def nat_ruleset(mapping: NatMapping, outside: str) -> str:
    """The nft script of a NAT router whose public interface is `outside` (see the module
    docstring for why each rule is there)."""
    if mapping not in NAT_MAPPINGS:
        raise LabError(f"NAT mapping {mapping!r} is not one of {NAT_MAPPINGS}")
    masquerade = "masquerade" if mapping == "eim" else "masquerade fully-random"
    return f"""\
table ip {NFT_TABLE} {{
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "{outside}" {masquerade}
    }}
    chain input {{
        type filter hook input priority filter; policy accept;
        iifname "{outside}" ct state new meta l4proto {{ tcp, udp }} drop
    }}
    chain forward {{
        type filter hook forward priority filter; policy accept;
        iifname "{outside}" ct state new drop
    }}
}}
"""


def nft(host: Host, script: str, name: str = "rules") -> Path:
    """Load an nft `script` in `host`'s namespace (``nft -f``), keeping a copy in the lab's
    workdir as ``<host>-<name>.nft``; LabError (with nft's message) if it is refused. Also
    the tool for tests that block a path mid-session."""
    path = host.lab.workdir / f"{host.name}-{name}.nft"
    path.write_text(script)
    host.check(["nft", "-f", str(path)])
    return path


def _next_lan(lab: Lab) -> str:
    used = {sw.subnet for sw in lab.switches}
    for subnet in LAN_SUPERNET.subnets(new_prefix=24):
        if subnet.network_address.packed[2] != 0 and subnet not in used:
            return str(subnet)
    raise LabError("no free 192.168.N.0/24 LAN left")


def add_nat(
    lab: Lab,
    name: str,
    internet: LabSwitch,
    *,
    mapping: NatMapping = "eim",
    lan: str | None = None,
) -> NatRouter:
    """A NAT router `name` with its outside leg on `internet` and a new private LAN switch
    ``<name>-lan`` (subnet `lan`, default the next free 192.168.N.0/24; the router gets .1).
    Forwarding is on and `nat_ruleset(mapping, ...)` is loaded in the router's namespace.
    Put hosts behind it with `add_host_behind`."""
    if mapping not in NAT_MAPPINGS:
        raise LabError(f"NAT mapping {mapping!r} is not one of {NAT_MAPPINGS}")
    router = lab.add_host(name)
    outside = lab.attach(router, internet)
    lan_switch = lab.add_switch(f"{name}-lan", subnet=lan or _next_lan(lab))
    inside = lab.attach(router, lan_switch)
    router.check(["sysctl", "-qw", "net.ipv4.ip_forward=1"])
    ruleset = nft(router, nat_ruleset(mapping, outside.ifname), "nat")
    return NatRouter(router, mapping, internet, outside, lan_switch, inside, ruleset)


def add_host_behind(lab: Lab, router: NatRouter, name: str) -> Host:
    """A new host `name` on `router`'s LAN, its default route through the router."""
    host = lab.add_host(name)
    lab.attach(host, router.lan)
    host.add_route("default", router.gateway)
    return host


BLOCK_TABLE = "ipop_block"


def block(host: Host, address: str) -> Path:
    """Drop every packet to or from `address` that `host` forwards, sends or receives (a
    router: the paths through it; an end host: its own), with counters; e.g. block a direct
    path mid-session while the relay (another address) keeps working. `unblock` undoes it.
    Conntrack entries survive, so mappings are unchanged when the block is lifted."""
    ip = ipaddress.IPv4Address(address)
    rules = "\n".join(
        f"""    chain {hook} {{
        type filter hook {hook} priority filter - 10; policy accept;
        ip daddr {ip} counter drop
        ip saddr {ip} counter drop
    }}"""
        for hook in ("forward", "input", "output")
    )
    return nft(host, f"table ip {BLOCK_TABLE} {{\n{rules}\n}}\n", f"block-{ip}")


def unblock(host: Host) -> None:
    """Remove every `block` of `host`."""
    if BLOCK_TABLE in host.check(["nft", "list", "tables"]):
        host.check(["nft", "delete", "table", "ip", BLOCK_TABLE])


# ---------------------------------------------------------------------------------------------
# STUN probes from inside the lab


def stun_binding(sock: socket.socket, server: Addr, *, timeout: float = 5.0) -> Addr:
    """One STUN Binding transaction (RFC 8489 §6) from `sock` to `server`: the mapped
    address the server saw. Retransmits from PROBE_RTO, doubling; ignores datagrams that are
    not the answer (other sources, other transactions, garbage). LabError on an error
    response or when nothing answered within `timeout` seconds."""
    tid = stun.new_transaction_id(random.SystemRandom())
    request = stun.encode(stun.Message(stun.Method.BINDING, stun.Class.REQUEST, tid))
    now = time.monotonic()
    deadline = now + timeout
    resend_at, rto = now, PROBE_RTO
    while True:
        now = time.monotonic()
        if now >= deadline:
            raise LabError(f"no STUN Binding response from {server[0]}:{server[1]} in {timeout}s")
        if now >= resend_at:
            sock.sendto(request, server)
            resend_at, rto = now + rto, min(rto * 2, PROBE_RTO_MAX)
        ready, _, _ = select.select([sock], [], [], max(0.0, min(resend_at, deadline) - now))
        if not ready:
            continue
        data, source = sock.recvfrom(PROBE_SIZE)
        if source[:2] != server:
            continue
        try:
            msg = stun.parse_untrusted(data)
        except BadPacket:
            continue
        if msg.transaction_id != tid or msg.method is not stun.Method.BINDING:
            continue
        if msg.cls is stun.Class.ERROR:
            raise LabError(f"STUN Binding to {server[0]}:{server[1]}: {msg.error_code}")
        if msg.cls is stun.Class.SUCCESS:
            mapped = msg.xor_mapped_address or msg.mapped_address
            if mapped is None:
                raise LabError(f"STUN Binding response from {server} without a mapped address")
            return mapped


def probe_mappings(
    host: Host, servers: Sequence[Addr], *, timeout: float = 5.0
) -> tuple[int, list[Addr]]:
    """What `host`'s NAT does: one fresh UDP socket on `host` sends a STUN Binding to each
    of `servers` in turn; (the socket's local port, the mapped address each server saw).
    Equal mapped addresses: endpoint-independent mapping; mapped port == local port: port
    preserved."""
    with host.udp_socket() as sock:
        port = int(sock.getsockname()[1])
        return port, [stun_binding(sock, server, timeout=timeout) for server in servers]


# ---------------------------------------------------------------------------------------------
# coturn


@dataclass(slots=True, eq=False)
class TurnServer:
    """A coturn process on a lab host, and where its files live."""

    host: Host
    address: str  # the one lab address it listens and relays on
    port: int
    aux_ports: tuple[int, ...]  # further STUN/TURN ports (coturn "aux-server"s)
    realm: str
    users: dict[str, str] = field(repr=False)
    dir: Path
    proc: subprocess.Popen[Any] | None = None

    @property
    def config(self) -> Path:
        return self.dir / "turnserver.conf"

    @property
    def log(self) -> Path:
        return self.dir / "turnserver.log"

    @property
    def server(self) -> Addr:
        """The main STUN/TURN endpoint (UDP)."""
        return (self.address, self.port)

    @property
    def endpoints(self) -> list[Addr]:
        """Every UDP endpoint that answers STUN and TURN: the main one first."""
        return [(self.address, p) for p in (self.port, *self.aux_ports)]

    @property
    def stun_url(self) -> str:
        return f"stun:{self.address}:{self.port}"

    @property
    def turn_url(self) -> str:
        return f"turn:{self.address}:{self.port}?transport=udp"

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def start(self, timeout: float = TURN_READY_TIMEOUT) -> None:
        """Start coturn (again, after `stop`: a restarted server that has forgotten every
        allocation); return once every endpoint answers a STUN Binding. LabError with
        coturn's log if it does not in `timeout` seconds. The lab stops it at teardown."""
        if self.proc is not None and self.proc.poll() is None:
            raise LabError(f"coturn on {self.host.name} is already running")
        with open(self.dir / "turnserver.out", "ab") as out:
            self.proc = self.host.popen(
                ["turnserver", "-c", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.dir,
            )
        deadline = time.monotonic() + timeout
        with self.host.udp_socket() as sock:
            for endpoint in self.endpoints:
                while True:
                    code = self.proc.poll()
                    if code is not None:
                        raise LabError(f"coturn exited with {code}:\n{self.log_tail()}")
                    try:
                        stun_binding(
                            sock,
                            endpoint,
                            timeout=min(1.0, max(POLL_INTERVAL, deadline - time.monotonic())),
                        )
                        break
                    except LabError as exc:
                        if time.monotonic() >= deadline:
                            raise LabError(
                                f"coturn on {self.host.name} not ready after {timeout}s "
                                f"({exc}):\n{self.log_tail()}"
                            ) from exc

    def stop(self, timeout: float = TURN_STOP_TIMEOUT) -> int:
        """SIGTERM coturn and wait for it; its exit code. (The lab does this at teardown.)"""
        if self.proc is None:
            raise LabError(f"coturn on {self.host.name} is not started")
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise LabError(f"coturn on {self.host.name} still running after {timeout}s") from exc


def _config_word(what: str, value: str) -> str:
    if not value or _CONFIG_WORD & set(value):
        raise LabError(f"coturn {what} {value!r} must be non-empty, without spaces or '#'")
    return value


def turn_config(turn: TurnServer, relay_ports: tuple[int, int] = TURN_RELAY_PORTS) -> str:
    """coturn's config file for `turn` (turnserver's long options, one per line)."""
    lines = [
        f"listening-ip={turn.address}",
        f"relay-ip={turn.address}",
        f"listening-port={turn.port}",
        *(f"aux-server={turn.address}:{p}" for p in turn.aux_ports),
        f"min-port={relay_ports[0]}",
        f"max-port={relay_ports[1]}",
        "lt-cred-mech",
        f"realm={_config_word('realm', turn.realm)}",
    ]
    for user, password in turn.users.items():
        if ":" in user:
            raise LabError(f"coturn user name {user!r} must not contain ':'")
        lines.append(f"user={_config_word('user', user)}:{_config_word('password', password)}")
    # Explicitly allowed peers win over coturn's own denials (and over any denied-peer-ip).
    for net in ALLOWED_PEERS:
        lines.append(f"allowed-peer-ip={net.network_address}-{net.broadcast_address}")
    lines += [
        "fingerprint",
        "no-tls",
        "no-dtls",
        "no-cli",
        "no-rfc5780",
        "no-tcp-relay",
        "no-multicast-peers",
        "no-software-attribute",
        f"log-file={turn.log}",
        "simple-log",
        "no-stdout-log",
        "verbose",
        f"pidfile={turn.dir / 'turnserver.pid'}",
        f"userdb={turn.dir / 'turndb'}",  # coturn opens an SQLite DB even when unused
    ]
    return "\n".join(lines) + "\n"


def add_void_route(host: Host) -> None:
    """A default route into a dummy interface in `host`'s namespace: datagrams to addresses
    nobody in the lab has (a peer's private LAN address, say) vanish, as they do on the
    Internet, instead of failing the send. coturn ends an allocation whose relay gets a
    send error (ENETUNREACH), and ICE does pair a relayed candidate with the peer's private
    host candidate, so without this every allocation died at the first check."""
    # No dummy driver on every lab kernel: a veth pair inside the namespace, and a next hop
    # with a fixed MAC nobody has, so the frames leave without ARP and are dropped.
    host.check(["ip", "link", "add", "void0", "type", "veth", "peer", "name", "void1"])
    host.check(["ip", "link", "set", "void0", "up"])
    host.check(["ip", "link", "set", "void1", "up"])
    gateway = "169.254.255.1"
    host.check(["ip", "neigh", "add", gateway, "lladdr", "02:00:00:00:00:01", "dev", "void0"])
    host.check(["ip", "route", "add", "default", "via", gateway, "dev", "void0", "onlink"])


def add_turn(
    lab: Lab,
    host: Host,
    *,
    users: dict[str, str],
    realm: str = "ipop",
    port: int = TURN_PORT,
    aux_ports: Sequence[int] = (TURN_PORT + 1,),
    timeout: float = TURN_READY_TIMEOUT,
) -> TurnServer:
    """Start coturn on `host` (on its first lab address: put it on the internet switch), with
    long-term credentials for `users` in `realm`, on UDP `port` and `aux_ports`; return once
    every endpoint answers a STUN Binding. LabError with coturn's log if it does not in
    `timeout` seconds. The lab stops it at teardown."""
    if not users:
        raise LabError("coturn needs at least one user for long-term credentials")
    directory = lab.workdir / f"turn-{host.name}"
    directory.mkdir()
    add_void_route(host)
    turn = TurnServer(host, host.address, port, tuple(aux_ports), realm, dict(users), directory)
    turn.config.write_text(turn_config(turn))
    turn.start(timeout)
    return turn


# ---------------------------------------------------------------------------------------------
# The NAT cases of the ICE lab tests

Placement = NatMapping | None  # behind a NAT of that mapping; None: on the internet itself
DEFAULT_TURN_USERS = {"ipop": "ipop-lab-pass"}


@dataclass(frozen=True, slots=True)
class NatPair:
    """Two hosts `a` and `b` placed as an ICE test case asks, a coturn on the internet, and
    a host to run the signalling server on (`Overlay.start_signalling(pair.server)`)."""

    internet: LabSwitch
    server: Host  # on the internet: coturn runs here; put the signalling server here too
    turn: TurnServer
    a: Host
    b: Host
    a_nat: NatRouter | None
    b_nat: NatRouter | None  # the same object as `a_nat` for the "same NAT" case

    @property
    def routers(self) -> list[NatRouter]:
        return list({id(r): r for r in (self.a_nat, self.b_nat) if r is not None}.values())


def add_nat_pair(
    lab: Lab,
    a: Placement,
    b: Placement | Literal["same"],
    *,
    users: dict[str, str] | None = None,
) -> NatPair:
    """The topology of one NAT case: an internet switch with a host ``server`` running
    coturn, host ``a`` behind a NAT of mapping `a` (or on the internet for None), and host
    ``b`` likewise, or behind a's NAT for ``b="same"``. Routers are ``nat-a`` / ``nat-b``.

    The cases the ICE lab tests and `ipop-trio bench --nat` run: (None, None) no NAT;
    ("eim", "eim"); ("symmetric", "eim"); ("symmetric", "symmetric"); ("eim", "same")."""
    internet = lab.add_switch("inet")
    server = lab.add_host("server")
    lab.attach(server, internet)
    turn = add_turn(lab, server, users=users or DEFAULT_TURN_USERS)

    def place(name: str, mapping: Placement) -> tuple[Host, NatRouter | None]:
        if mapping is None:
            host = lab.add_host(name)
            lab.attach(host, internet)
            return host, None
        router = add_nat(lab, f"nat-{name}", internet, mapping=mapping)
        return add_host_behind(lab, router, name), router

    host_a, nat_a = place("a", a)
    nat_b: NatRouter | None
    if b == "same":
        if nat_a is None:
            raise LabError('b="same" needs a behind a NAT')
        host_b, nat_b = add_host_behind(lab, nat_a, "b"), nat_a
    else:
        host_b, nat_b = place("b", b)
    return NatPair(internet, server, turn, host_a, host_b, nat_a, nat_b)


__all__ = [
    "ALLOWED_PEERS",
    "BLOCK_TABLE",
    "DEFAULT_TURN_USERS",
    "LAN_SUPERNET",
    "NAT_MAPPINGS",
    "NatMapping",
    "NatPair",
    "NatRouter",
    "Placement",
    "TurnServer",
    "add_host_behind",
    "add_nat",
    "add_nat_pair",
    "add_turn",
    "add_void_route",
    "block",
    "nat_ruleset",
    "nft",
    "probe_mappings",
    "stun_binding",
    "turn_config",
    "unblock",
]
