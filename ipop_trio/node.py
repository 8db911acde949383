"""run_node(): assembles a node's task tree (docs/architecture.md, "The task tree").

    run_node(setup)
    ├── control server      unix socket: status / stats / ping JSON
    ├── tap writer          one thread fed by a bounded queue
    ├── tap reader ─[batches]→ outbound (route, seal, GSO send)
    ├── udp receiver        GRO, demux, open → tap writer; handshakes → handshake task
    ├── handshake task      initiations (DH) and responses → the owning peer's link task
    ├── links nursery       one run_link(peer) per configured or learned peer
    ├── ICE service         ([signalling] only) candidates: host, STUN, TURN (control/ice.py)
    ├── signalling client   ([signalling] only) membership and con_req/resp → controller
    ├── controller          membership → links added / removed in the links nursery
    ├── expiry watch        warns in the log from EXPIRY_WARNING before our certificate or a
    │                       trusted CA expires: at start, then once a day (EXPIRY_CHECK)
    ├── metrics             ([metrics] only) HTTP GET /metrics: a `status` snapshot, rendered
    └── DNS server          ([dns] only) NAME.OVERLAY. from certified identities (net/names.py)

`prepare()` does every check that can fail because of the configuration or the PKI, before
anything on the system is touched; `run_node()` then owns the TAP and the socket and removes
them however it ends.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import trio

from . import pki
from .config import DEFAULT_MTU, DnsConfig, Endpoint, NodeConfig, endpoint_text, tap_mtu_for
from .control.controller import EVENT_QUEUE, Controller
from .control.ice import IceService
from .control.links import LinkManager, PeerRuntime, PeerSetup
from .control.ping import Prober
from .datapath import native, pipeline
from .datapath.inbound import Inbound, NativeInbound
from .datapath.outbound import NativeOutbound, Outbound
from .datapath.sessions import SessionTable
from .datapath.switch import Switch
from .errors import CertificateRefused, ConfigError, PkiError
from .net import httpd, netlink
from .net.control import ControlSocket, netns_inode, serve_control
from .net.tap import TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, Tap, TapWriter
from .net.udp import UdpSocket
from .proto import handshake
from .proto.cert import Identity, TrustAnchor, format_mac
from .proto.domain import PORT as DNS_PORT
from .proto.domain import check_domain
from .proto.policy import SecurityPolicy, effective_groups
from .proto.signalling import ClientEvent
from .stats import Stats

if TYPE_CHECKING:
    from .net.names import DnsSockets
    from .signalling.client import SignallingClient

log = logging.getLogger("ipop_trio.node")

DAY = 86400.0
EXPIRY_WARNING = 30 * DAY  # warn this long before our certificate or a trusted CA expires
EXPIRY_CHECK = DAY  # ... at start, on SIGHUP, and this often while running


@dataclass(frozen=True, slots=True)
class Setup:
    config: NodeConfig
    anchor: TrustAnchor
    private_key: bytes = field(repr=False)
    identity: Identity
    peers: tuple[PeerSetup, ...]
    groups: frozenset[str] = frozenset()  # certified groups, narrowed by the config
    revoked: frozenset[str] = frozenset()  # [node] revoked: certificate fingerprints refused

    @property
    def policy(self) -> SecurityPolicy:
        return self.config.security


def _local_identity(setup: Setup) -> handshake.LocalIdentity:
    return handshake.LocalIdentity(setup.private_key, setup.identity.der, setup.anchor)


def prepare(cfg: NodeConfig) -> Setup:
    """Load and cross-check the CA, our key and certificate, and the peers' keys."""
    now = time.time()
    try:
        anchor = pki.load_trust_anchors(cfg.ca)
    except PkiError as exc:
        raise ConfigError("node.ca", str(exc)) from None
    try:
        private_key = pki.load_private_key(cfg.key)
    except PkiError as exc:
        raise ConfigError("node.key", str(exc)) from None
    mode = os.stat(cfg.key).st_mode & 0o077
    if mode:
        raise ConfigError("node.key", f"{cfg.key} is readable by others (chmod 600 it)")
    try:
        identity = anchor.verify_untrusted(pki.load_certificate_der(cfg.cert), now)
    except (PkiError, CertificateRefused) as exc:
        raise ConfigError("node.cert", f"{cfg.cert}: {exc}") from None
    if pki.public_key_of(private_key) != identity.public_key:
        raise ConfigError("node.key", f"{cfg.key} is not the key certified in {cfg.cert}")
    if cfg.name is not None and cfg.name != identity.name:
        raise ConfigError("node.name", f"{cfg.name!r} but the certificate names {identity.name!r}")
    peers = []
    for i, p in enumerate(cfg.peers):
        if p.cert is not None:
            try:
                pid = anchor.verify_untrusted(pki.load_certificate_der(p.cert), now)
            except (PkiError, CertificateRefused) as exc:
                raise ConfigError(f"peer[{i}].cert", f"{p.cert}: {exc}") from None
            if pid.name != p.name:
                raise ConfigError(
                    f"peer[{i}].name", f"{p.name!r} but its certificate names {pid.name!r}"
                )
            peers.append(PeerSetup(p, pid.public_key, pid))
        else:
            assert p.public_key is not None
            peers.append(PeerSetup(p, p.public_key, None))
        if peers[-1].public_key == identity.public_key:
            raise ConfigError(f"peer[{i}]", "is this node itself")
    keys = [p.public_key for p in peers]
    if len(set(keys)) != len(keys):
        raise ConfigError("peer", "two peers have the same key")
    if cfg.signalling is not None and cfg.signalling.ca is not None:
        import ssl

        try:
            ssl.create_default_context(cafile=str(cfg.signalling.ca))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError("signalling.ca", f"{cfg.signalling.ca}: {exc}") from None
    if cfg.groups is not None:
        extra = sorted(set(cfg.groups) - identity.groups)
        if extra:
            certified = ", ".join(sorted(identity.groups)) or "none"
            raise ConfigError(
                "node.groups",
                f"{', '.join(extra)} not in the certificate (certified: {certified}); "
                "the config may narrow the certified groups, never widen them",
            )
    groups = effective_groups(identity.groups, cfg.groups)
    if cfg.dns is not None:
        dns_plan(cfg.dns, identity)
    revoked = pki.revoked_setting(cfg.revoked, "node.revoked")
    return Setup(cfg, anchor, private_key, identity, tuple(peers), groups, revoked)


def cert_status(der: bytes, not_before: float, not_after: float, now: float) -> dict[str, Any]:
    """A certificate's validity, as `status` shows it (ours, a trusted CA's, a peer's)."""
    return {
        "fingerprint": pki.fingerprint(der),
        "not_before": not_before,
        "not_after": not_after,
        "days_left": round((not_after - now) / DAY, 2),
    }


def expiry_warnings(setup: Setup, now: float) -> list[str]:
    """What to warn of, EXPIRY_WARNING ahead: our certificate and each trusted CA expiring
    (or expired), with the command that fixes it."""
    ident, cfg = setup.identity, setup.config
    out = []
    left = ident.not_after - now
    when = _day(ident.not_after)
    groups = f" --groups {','.join(sorted(ident.groups))}" if ident.groups else ""
    addresses = " ".join(f"--address {address}" for address in ident.addresses)
    written = cfg.cert.parent / f"{ident.name}.crt"
    move = "" if written == cfg.cert else f", move {written} to {cfg.cert}"
    renew = (
        f"renew it for the same key: `ipop-trio ca sign --ca CA_DIR --name {ident.name} "
        f"{addresses}{groups} --key {cfg.key} --out {cfg.cert.parent}`"
        f"{move}, then SIGHUP"
    )
    if left <= 0:
        out.append(f"certificate {cfg.cert} expired at {when}: peers refuse it; {renew}")
    elif left <= EXPIRY_WARNING:
        out.append(f"certificate {cfg.cert} expires in {left / DAY:.0f} days ({when}); {renew}")
    for ca in setup.anchor.cas:
        ca_left = ca.not_after - now
        name = f"overlay CA {ca.name!r} ({pki.fingerprint(ca.der)[:16]})"
        rotate = "rotate it: trust a new CA beside it ([node] ca), re-issue, then drop it"
        if ca_left <= 0:
            out.append(f"{name} expired at {_day(ca.not_after)}; {rotate}")
        elif ca_left <= EXPIRY_WARNING:
            out.append(
                f"{name} expires in {ca_left / DAY:.0f} days ({_day(ca.not_after)}); {rotate}"
            )
    return out


def _day(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(timestamp))


def dns_plan(dns: DnsConfig, identity: Identity) -> tuple[Endpoint, str]:
    """Where [dns] answers (default: our overlay address, port 53) and for which domain
    (default: the overlay's name, which must then be a DNS name)."""
    listen = dns.listen or Endpoint(str(identity.address), DNS_PORT)
    if dns.domain is not None:
        return listen, dns.domain
    try:
        return listen, check_domain(identity.overlay)
    except ValueError as exc:
        raise ConfigError("dns.domain", f"the overlay's name: {exc}; set a domain") from None


class Node:
    """The running node: the parts run_node assembled, each given what it uses (nothing
    here is reached back into), and the control socket's answers."""

    def __init__(
        self,
        setup: Setup,
        tap: Tap,
        udp: UdpSocket,
        control: Path,
        mtu: tuple[int, str] = (DEFAULT_MTU, "the default"),
    ) -> None:
        """`mtu`: the TAP's MTU and why (choose_tap_mtu), for status and the outbound
        stage's path checks."""
        self.setup = setup
        self.tap = tap
        self.udp = udp
        self.control = control
        self.stats = Stats()
        self.started_wall = time.time()
        self.mtu, self.mtu_why = mtu
        self.switch = Switch(setup.identity.mac, self.stats)
        self.switch.configure_firewall(setup.config.firewall)
        # The per-datagram loops: the native core's when it was built (and not disabled by
        # IPOP_TRIO_PURE_PYTHON=1), else the Python reference (datapath/native.py).
        self.datapath = "native" if native.AVAILABLE else "python"
        self.sessions: SessionTable[PeerRuntime] = SessionTable(native=native.AVAILABLE)
        self.writer = TapWriter(tap, self.stats)
        self.ice = IceService(
            udp,
            self.stats,
            setup.config.ice,
            tap_name=tap.name,
            listen_host=setup.config.listen.host,
            advertise=()
            if setup.config.signalling is None
            else [e.sockaddr for e in setup.config.signalling.advertise],
        )
        outbound = NativeOutbound if native.AVAILABLE else Outbound
        self.outbound = outbound(
            self.switch, udp, self.stats, send_relayed=self.ice.send_iov_via, tap_mtu=self.mtu
        )
        self.links = LinkManager(
            local=_local_identity(setup),
            cipher=setup.config.cipher,
            policy=setup.policy,
            groups=setup.groups,
            peers=setup.peers,
            sessions=self.sessions,
            switch=self.switch,
            writer=self.writer,
            outbound=self.outbound,
            udp=udp,
            ice=self.ice,
            stats=self.stats,
            revoked=setup.revoked,
        )
        inbound = NativeInbound if native.AVAILABLE else Inbound
        self.inbound = inbound(
            self.switch,
            self.stats,
            self.sessions,
            on_handshake=self.links.on_handshake,
            on_ice=self.ice.on_ice,
        )
        self.prober = Prober(self.switch, self.outbound, self.links, self.stats)
        self.signalling: SignallingClient | None = None  # with [signalling]
        self.controller: Controller | None = None
        self.dns: dict[str, str] | None = None  # with [dns]: where it answers, for what

    @property
    def identity(self) -> Identity:
        return self.setup.identity

    def reload(self, setup: Setup) -> int:
        """Apply a re-read configuration (SIGHUP): a new certificate, security policy or
        groups re-key the links whose mode changes; the others keep running; new firewall
        rules apply from the next frame (no link is touched). Changes to the TAP, the
        listen address or the peer list take effect at the next start. A new revocation
        list closes the links of the peers it names."""
        self.setup = setup
        if self.signalling is not None:
            self.signalling.set_identity(setup.private_key, setup.identity.der)
        self.switch.configure_firewall(setup.config.firewall)
        if self.controller is not None:
            self.controller.reconfigure(
                setup.identity.der, setup.groups, setup.policy.value, anchor=setup.anchor
            )
        for name in self.links.set_revoked(setup.revoked):
            log.warning("%s: link closed: its certificate is revoked", name)
        rekeyed = self.links.reconfigure(_local_identity(setup), setup.policy, setup.groups)
        for line in expiry_warnings(setup, time.time()):
            log.warning("%s", line)
        return rekeyed

    def status(self, _req: dict[str, Any]) -> dict[str, Any]:
        ident = self.identity
        host, port = self.udp.local
        now = time.time()
        return {
            "node": {
                "name": ident.name,
                "overlay": ident.overlay,
                "address": f"{ident.interfaces[0]}",
                "address6": None if ident.ip6 is None else f"{ident.interfaces[-1]}",
                "groups": sorted(ident.groups),
                "tap": self.tap.name,
                "mtu": self.mtu,
                "mtu_why": self.mtu_why,
                "mac": format_mac(ident.mac),
                "listen": endpoint_text(host, port),
                "pid": os.getpid(),
                "control": str(self.control),
                "netns": netns_inode(),
                "cipher": self.setup.config.cipher.value,
                "started": self.started_wall,
                "offload": self.tap.offload,
                "gso": self.udp.gso,
                "gro": self.udp.gro,
                "datapath": self.datapath,
                "datapath_why": native.WHY,
                "revoked": len(self.setup.revoked),  # fingerprints in [node] revoked
                "cert": cert_status(ident.der, ident.not_before, ident.not_after, now),
                "ca": [
                    cert_status(ca.der, ca.not_before, ca.not_after, now)
                    for ca in self.setup.anchor.cas
                ],
            },
            "peers": self.links.status(),
            "signalling": None
            if self.signalling is None or self.controller is None
            else {**self.signalling.status(), **self.controller.status()},
            "ice": self.ice.status() if self.controller is not None else None,
            "dns": self.dns,
            "firewall": None
            if (fw := self.switch.firewall) is None
            else fw.status(time.monotonic()),
            "stats": self.stats.snapshot(),
        }

    def stats_reply(self, _req: dict[str, Any]) -> dict[str, Any]:
        return self.stats.snapshot()


def _underlay_targets(cfg: NodeConfig) -> list[str]:
    """The underlay addresses this node will send to that it knows at start: configured
    peers, the signalling server (when its URL names an address), STUN and TURN servers."""
    targets = [p.endpoint.host for p in cfg.peers if p.endpoint is not None]
    if cfg.signalling is not None:
        host = urlsplit(cfg.signalling.url).hostname
        if host:
            targets.append(host)
    if cfg.ice is not None:
        targets += [e.host for e in cfg.ice.stun] + [t.server.host for t in cfg.ice.turn]
    return [t for t in dict.fromkeys(targets) if _is_ip(t)]


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


# Where the default route goes, when the node knows no address to send to (TEST-NET-1 and
# the documentation prefix: never sent to, only looked up).
_DEFAULT_ROUTE_PROBE = {4: "192.0.2.1", 6: "2001:db8::1"}


def choose_tap_mtu(cfg: NodeConfig) -> tuple[int, str]:
    """The TAP MTU and why: the configured one, else the largest whose datagrams fit the
    underlay towards every address the node knows it will use (the default route's when it
    knows none), at most DEFAULT_MTU (config.tap_mtu_for)."""
    if cfg.tap.mtu is not None:
        return cfg.tap.mtu, "set in the config"
    targets = _underlay_targets(cfg)
    if not targets:
        family = ipaddress.ip_address(cfg.listen.host).version
        targets = [_DEFAULT_ROUTE_PROBE[family]]
    best: tuple[int, str] | None = None
    for target in targets:
        found = netlink.path_mtu(target)
        if found is None:
            continue
        underlay, dev = found
        mtu = tap_mtu_for(underlay, ipv6=ipaddress.ip_address(target).version == 6)
        if best is None or mtu < best[0]:
            where = "the default route" if target in _DEFAULT_ROUTE_PROBE.values() else target
            best = (mtu, f"{dev} mtu {underlay} towards {where}, less the overlay's headers")
    if best is None:
        return DEFAULT_MTU, "the default: no route to measure the underlay by"
    return best


async def run_node(
    setup: Setup, *, task_status: trio.TaskStatus[Node] = trio.TASK_STATUS_IGNORED
) -> None:
    cfg = setup.config
    # What another node may hold comes first, before anything is created: its control
    # socket, then its UDP port and metrics port; the TAP last (its name taken gives the
    # kernel's EBUSY).
    control = ControlSocket(cfg.control_path())
    try:
        udp = UdpSocket(cfg.listen.host, cfg.listen.port)
    except OSError as exc:
        control.close()
        hint = ""
        if exc.errno == errno.EADDRINUSE:
            hint = " (another node or program holds this port: stop it, or set node.listen)"
        raise ConfigError("node.listen", f"{exc.strerror or exc}{hint}") from None
    try:
        metrics_listeners = await _open_metrics(cfg)
    except BaseException:
        udp.close()
        control.close()
        raise
    try:
        tap = Tap(cfg.tap.name, vnet_hdr=True)
    except BaseException:
        _close_listeners(metrics_listeners)
        udp.close()
        control.close()
        raise
    if cfg.tap.offload and not tap.set_offload(TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6):
        log.warning("%s: the kernel refused checksum/TSO offload; running without", tap.name)
    dns_socks: DnsSockets | None = None
    domain = ""
    try:
        ident = setup.identity
        mtu, mtu_why = choose_tap_mtu(cfg)
        log.info("%s: mtu %d (%s)", tap.name, mtu, mtu_why)
        netlink.configure_tap(tap.name, mac=ident.mac, mtu=mtu, addresses=ident.interfaces)
        if cfg.dns is not None:  # after the TAP has our overlay address, the default one
            from .net.names import DnsSockets  # dnspython only for a node with [dns]

            dns_at, domain = dns_plan(cfg.dns, ident)
            try:
                dns_socks = DnsSockets(dns_at.host, dns_at.port)
            except OSError as exc:
                low = exc.errno == errno.EACCES and dns_at.port < 1024
                hint = " (a port below 1024 needs CAP_NET_BIND_SERVICE)" if low else ""
                raise ConfigError("dns.listen", f"{exc}{hint}") from None
        node = Node(setup, tap, udp, control.path, (mtu, mtu_why))
        send, receive = pipeline.make_outbound_channel()
        async with trio.open_nursery() as nursery:
            if metrics_listeners:
                from .metrics import node_page  # prometheus_client only with [metrics]

                pages = {"/metrics": node_page(lambda: node.status({}))}
                await nursery.start(httpd.serve_http, metrics_listeners, pages)
                log.info("metrics on http://%s/metrics", _metrics_where(cfg, metrics_listeners))
            await nursery.start(
                serve_control,
                control,
                {"status": node.status, "stats": node.stats_reply, "ping": node.prober.ping},
            )
            await nursery.start(node.writer.serve)
            nursery.start_soon(pipeline.tap_reader, tap, send, node.outbound, node.writer)
            nursery.start_soon(pipeline.outbound_task, node.outbound, receive, node.writer)
            nursery.start_soon(pipeline.udp_receiver, udp, node.inbound, node.writer, node.stats)
            await nursery.start(node.links.serve)
            if cfg.signalling is not None:
                await nursery.start(_run_signalling, node)
            if dns_socks is not None:
                await nursery.start(_run_dns, node, dns_socks, domain)
            nursery.start_soon(_watch_expiry, node)
            log.info(
                "node %s up: %s on %s, listening on %s:%d, %d peers, %s data path%s",
                ident.name,
                ", ".join(map(str, ident.interfaces)),
                tap.name,
                *udp.local,
                len(setup.peers),
                node.datapath,
                f" ({native.WHY})" if native.WHY else "",
            )
            task_status.started(node)
    finally:
        control.close()  # serve_control closed it if it ran; closing twice is harmless
        _close_listeners(metrics_listeners)  # likewise serve_http
        if dns_socks is not None:
            dns_socks.close()
        udp.close()
        tap.close()


async def _open_metrics(cfg: NodeConfig) -> list[trio.SocketListener]:
    """[metrics] listen's socket, bound before any task starts: a taken port is one config
    error (exit 2), like a taken UDP port."""
    if cfg.metrics is None:
        return []
    where = cfg.metrics.listen
    try:
        return await httpd.open_listeners(where.host, where.port)
    except OSError as exc:
        why = exc.strerror or str(exc)
        raise ConfigError("metrics.listen", f"cannot listen on {where}: {why}") from None


def _close_listeners(listeners: list[trio.SocketListener]) -> None:
    for listener in listeners:
        listener.socket.close()


def _metrics_where(cfg: NodeConfig, listeners: list[trio.SocketListener]) -> str:
    assert cfg.metrics is not None
    return endpoint_text(cfg.metrics.listen.host, httpd.bound_port(listeners))


async def _watch_expiry(node: Node) -> None:
    """The control plane's daily look at certificate expiry (nothing per packet)."""
    while True:
        for line in expiry_warnings(node.setup, time.time()):
            log.warning("%s", line)
        await trio.sleep(EXPIRY_CHECK)


async def _run_signalling(
    node: Node, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """The signalling client and the controller it feeds."""
    from .signalling.client import SignallingClient  # trio-websocket only when configured

    cfg = node.setup.config.signalling
    assert cfg is not None
    ssl_context = None
    if cfg.url.startswith("wss://"):
        import ssl

        ssl_context = ssl.create_default_context(cafile=None if cfg.ca is None else str(cfg.ca))
    send, receive = trio.open_memory_channel[ClientEvent](EVENT_QUEUE)
    client = SignallingClient(
        cfg.url, node.setup.private_key, node.identity.der, send, ssl_context=ssl_context
    )
    controller = Controller(
        own_key=node.identity.public_key,
        cert_der=node.identity.der,
        groups=node.setup.groups,
        policy=node.setup.policy.value,
        overlay=node.identity.overlay,
        anchor=node.setup.anchor,
        links=node.links,
        client=client,
        config=cfg,
        udp_port=node.udp.local[1],
        listen_host=node.setup.config.listen.host,
        ice=node.ice,
    )
    node.signalling, node.controller = client, controller
    # The one link the two need back to each other: the links ask the controller about an
    # authenticated initiation from a member they have no link for yet.
    node.links.admit_unknown = controller.admit
    async with trio.open_nursery() as nursery:
        node.ice.gather_hosts()
        await nursery.start(node.ice.serve)
        await nursery.start(controller.serve, receive)
        await nursery.start(client.serve)
        task_status.started()


async def _run_dns(
    node: Node,
    socks: DnsSockets,
    domain: str,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The DNS server, answering from the identities the node holds verified now: its own
    and its peers' (from a certificate in the config, a link handshake or a con_req /
    con_resp), never from what signalling says of members it has no certificate of."""
    from .net.names import serve_dns
    from .proto import names

    def respond(data: bytes, tcp: bool) -> names.Reply:
        peers = (rt.link.peer or rt.setup.identity for rt in node.links.peers)
        verified = [node.identity, *(p for p in peers if p is not None)]
        zone = names.Zone.of(domain, verified, time.time())
        return names.answer_untrusted(data, zone, tcp=tcp)

    node.dns = {"listen": socks.local, "domain": f"{domain}."}
    log.info("DNS: answering for %s. on %s (UDP and TCP)", domain, socks.local)
    await serve_dns(socks, respond, node.stats, task_status=task_status)
