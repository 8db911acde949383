"""Node configuration: TOML in, frozen dataclasses out.

Every problem becomes `ConfigError(field, why)` naming the field as the user wrote it
(``node.listen``, ``peer[2].endpoint``), before the node touches the system; all of a file's
problems are found in one pass and raised together as `ConfigErrors`. Relative paths
are resolved against the config file's directory.

    [node]
    cert = "alpha.crt"          # node certificate (ipop-trio ca sign)
    key = "alpha.key"           # X25519 private key, PEM, mode 0600
    ca = "ca.crt"               # overlay CA certificate(s): one file (a PEM file may hold
                                # several: a CA bundle) or a list, e.g. ["old.crt", "new.crt"]
    listen = "0.0.0.0:4600"     # underlay UDP address
    control = "/run/ipop-trio/alpha.sock"  # default: one per TAP and network namespace
    cipher = "aes-256-gcm"      # or "chacha20-poly1305"
    security = "always"         # or "groups": plain links to peers sharing no group
    groups = ["web"]            # optional: narrows the certificate's groups, never widens
    revoked = "revoked.txt"     # optional: certificate fingerprints refused (pki.parse_revoked)

    [tap]
    name = "ipop0"
    mtu = 1400
    offload = true              # checksum offload + TSO super-frames from the kernel

    [[peer]]
    name = "beta"
    cert = "beta.crt"           # or public_key = "<base64 X25519>"
    endpoint = "192.0.2.7:4600"

    [signalling]                # optional: learn peers from a signalling server
    url = "wss://signal.example.net:8765/"
    ca = "signal-ca.pem"        # optional: TLS roots for wss (default: the system's)
    max_links = 32              # cap on links learned from signalling
    advertise = ["192.0.2.7:4600"]  # optional: where a port forward reaches us (ICE candidates)

    [ice]                       # optional: NAT traversal for peers learned through signalling
    stun = ["stun:198.51.100.1:3478"]  # "stun:IP[:PORT]" (RFC 7064) or "IP:PORT"; port 3478
    turn = [{url = "turn:198.51.100.1:3478?transport=udp", username = "alice", password = "s3"}]
    ignore_interfaces = ["docker0"]  # no host candidates from these (the TAP never gives any)

    [metrics]                   # optional: Prometheus exposition at http://ADDR:PORT/metrics
    listen = "127.0.0.1:9464"

    [dns]                       # optional: answer NAME.OVERLAY. for the overlay's members
    listen = "10.77.0.1:53"     # default: this node's overlay address, port 53
    domain = "lab.internal"     # default: the overlay's name (the CA's)

    [firewall]                  # optional: no rules, everything passes (proto/firewall.py)
    conntrack_max = 65536       # state-table entries
    [[firewall.inbound]]        # and [[firewall.outbound]]: any rule denies what none allows
    proto = "tcp"               # tcp, udp, icmp, any
    port = "8000-8100"          # 22, "22", "8000-8100", "any" (tcp and udp only)
    groups = ["web"]            # and/or host = "beta" ("any"), cidr = "10.77.0.0/24"
    action = "allow"            # or "deny"; the first rule that matches decides

Servers are literal IP addresses: resolving names would make startup depend on DNS.
"""

from __future__ import annotations

import difflib
import functools
import ipaddress
import os
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from .errors import ConfigError, ConfigErrors, LocalProtocolError
from .logs import LOG_FORMATS
from .proto.cert import decode_key
from .proto.domain import check_domain
from .proto.firewall import (
    CONNTRACK_MAX,
    MAX_CONNTRACK_MAX,
    MAX_RULES,
    PROTOCOLS,
    Action,
    FirewallRules,
    Rule,
)
from .proto.policy import SecurityPolicy
from .proto.session import Cipher
from .proto.stun import saslprep
from .proto.wire import DATA_OVERHEAD, PIECE_META

DEFAULT_PORT = 4600
DEFAULT_MTU = 1400
# A secure datagram is DATA_OVERHEAD (16 header + 16 tag) around the inner payload: the
# Ethernet frame (14 + MTU) and at most a piece trailer (PIECE_META + 1 kind byte), inside
# IPv4 (20) + UDP (8) on a 1500-byte underlay: 1500 - 28 - 32 - 18 - 14 = 1408.
MAX_MTU = 1500 - 20 - 8 - DATA_OVERHEAD - (PIECE_META.size + 1) - 14
assert MAX_MTU == 1408
MIN_MTU = 576
# What an underlay packet carries around one TAP MTU's worth of IP packet: the inner
# Ethernet header and piece trailer, the data header and tag, a TURN ChannelData header (a
# relayed path), UDP, and the underlay's IP header (IPv4 20, IPv6 40).
CHANNEL_DATA_HEADER = 4
TUNNEL_OVERHEAD = 14 + PIECE_META.size + 1 + DATA_OVERHEAD + CHANNEL_DATA_HEADER + 8


def endpoint_text(host: str, port: int) -> str:
    """An address and port as the config writes them: `[fd01::2]:4600` for IPv6 (RFC 3986
    §3.2.2), `10.0.0.1:4600` for IPv4. Every endpoint the node prints goes through here."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def tap_mtu_for(underlay_mtu: int, *, ipv6: bool = False) -> int:
    """The default TAP MTU on an underlay path of `underlay_mtu`: what fits in one underlay
    packet (1500 -> 1404 over IPv4), at most DEFAULT_MTU, at least MIN_MTU (an underlay
    narrower than MIN_MTU + 96, or + 116 over IPv6, cannot carry a whole overlay packet)."""
    fits = underlay_mtu - (40 if ipv6 else 20) - TUNNEL_OVERHEAD
    return max(MIN_MTU, min(DEFAULT_MTU, fits))


T = TypeVar("T")
_NAME = re.compile(r"^[A-Za-z0-9._-]{1,63}$")
_IFNAME = re.compile(r"^[A-Za-z0-9._-]{1,15}$")
_KNOWN = {
    "": {"node", "tap", "peer", "signalling", "ice", "metrics", "dns", "firewall"},
    "node": {
        "name",
        "cert",
        "key",
        "ca",
        "listen",
        "control",
        "cipher",
        "log_level",
        "log_format",
        "security",
        "groups",
        "revoked",
    },
    "tap": {"name", "mtu", "offload"},
    "peer": {"name", "cert", "public_key", "endpoint"},
    "signalling": {"url", "ca", "max_links", "advertise"},
    "ice": {"stun", "turn", "ignore_interfaces"},
    "ice.turn": {"url", "username", "password"},
    "metrics": {"listen"},
    "dns": {"listen", "domain"},
    "firewall": {"inbound", "outbound", "conntrack_max"},
    "firewall.rule": {"proto", "port", "host", "groups", "cidr", "action"},
}
DEFAULT_MAX_LINKS = 32
MAX_ADVERTISE = 8
LOG_LEVELS = ("debug", "info", "warning", "error")
STUN_PORT = 3478  # RFC 8489 §18.6, also TURN's (RFC 8656 §19)
MAX_STUN_SERVERS = 8
MAX_TURN_SERVERS = 8
MAX_CREDENTIAL = 256  # characters of a TURN username or password
# What follows "stun:" / "turn:": an IPv6 literal in brackets or an IPv4 literal, then ":PORT".
_SERVER_HOSTPORT = re.compile(
    r"\[(?P<v6>[^\]]*)\](?::(?P<p6>\d+))?|(?P<v4>[^\[\]:/?#@\s]+)(?::(?P<p4>\d+))?"
)


@dataclass(frozen=True, slots=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return endpoint_text(self.host, self.port)

    @property
    def sockaddr(self) -> tuple[str, int]:
        return (self.host, self.port)


@dataclass(frozen=True, slots=True)
class PeerConfig:
    name: str
    cert: Path | None
    public_key: bytes | None  # raw X25519, when given instead of a certificate
    endpoint: Endpoint | None  # None: wait for the peer to contact us


@dataclass(frozen=True, slots=True)
class TapConfig:
    name: str = "ipop0"
    mtu: int | None = None  # None: from the underlay at start (tap_mtu_for)
    offload: bool = True  # ask the kernel for checksum offload and TSO super-frames


@dataclass(frozen=True, slots=True)
class SignallingConfig:
    url: str  # ws://host:port/path or wss://...
    ca: Path | None  # TLS trust roots for wss (None: the system's)
    max_links: int = DEFAULT_MAX_LINKS
    advertise: tuple[Endpoint, ...] = ()  # where outside reaches our socket (port forwards)


@dataclass(frozen=True, slots=True)
class TurnServerConfig:
    server: Endpoint  # literal IP:port of the TURN server (UDP)
    username: str
    password: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class IceConfig:
    stun: tuple[Endpoint, ...] = ()
    turn: tuple[TurnServerConfig, ...] = ()
    ignore_interfaces: tuple[str, ...] = ()  # no host candidates; the TAP never gives any


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    listen: Endpoint  # TCP address of the /metrics page (net/httpd.py)


@dataclass(frozen=True, slots=True)
class DnsConfig:
    listen: Endpoint | None = None  # None: the node's overlay address, port 53
    domain: str | None = None  # lower case, no final dot; None: the overlay's name


@dataclass(frozen=True, slots=True)
class NodeConfig:
    path: Path
    name: str | None
    cert: Path
    key: Path
    ca: tuple[Path, ...]  # the overlay CA certificates trusted (several: a CA rotation)
    listen: Endpoint
    control: Path | None  # None: default_control(tap.name), see control_path()
    cipher: Cipher
    log_level: str
    tap: TapConfig
    peers: tuple[PeerConfig, ...]
    signalling: SignallingConfig | None = None
    security: SecurityPolicy = SecurityPolicy.ALWAYS
    groups: tuple[str, ...] | None = None  # narrows the certified groups; None: all of them
    ice: IceConfig = IceConfig()
    log_format: str = "text"  # or "json": one object per line (ipop_trio/logs.py)
    metrics: MetricsConfig | None = None  # None: no metrics endpoint (opt-in)
    dns: DnsConfig | None = None  # with a [dns] section
    revoked: Path | None = None  # [node] revoked: the revocation list (read by node.prepare)
    firewall: FirewallRules | None = None  # None: no rules, everything passes

    def control_path(self, netns: Path | None = None) -> Path:
        """The control socket: as configured, else the default for the TAP in `netns`
        (a `/proc/PID/ns/net`; default: ours)."""
        return self.control or default_control(self.tap.name, netns or SELF_NETNS)


RUN_DIR = Path("/run/ipop-trio")
SELF_NETNS = Path("/proc/self/ns/net")


def netns_label(netns: Path = SELF_NETNS) -> str | None:
    """The namespace's `ip netns` name; else None in the initial network namespace (PID 1's,
    or when that cannot be read), else ``net-<inode>``."""
    try:
        st = os.stat(netns)
    except OSError:
        return None
    try:
        named = sorted(p.name for p in Path("/run/netns").iterdir() if _same_file(p, st))
    except OSError:
        named = []
    if named:
        return named[0]
    try:
        init = os.stat("/proc/1/ns/net")
    except OSError:  # PID 1 is not ours to inspect (a container, a user namespace)
        return None
    return None if (st.st_dev, st.st_ino) == (init.st_dev, init.st_ino) else f"net-{st.st_ino}"


def _same_file(path: Path, st: os.stat_result) -> bool:
    try:
        other = os.stat(path)
    except OSError:
        return False
    return (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino)


def default_control(tap: str, netns: Path = SELF_NETNS) -> Path:
    """`/run/ipop-trio/<tap>.sock` in the initial network namespace, `<tap>@<netns>.sock` in
    any other: a TAP name is unique within a namespace, and /run is shared between them, so
    two nodes never meet at one socket."""
    label = netns_label(netns)
    return RUN_DIR / (f"{tap}.sock" if label is None else f"{tap}@{label}.sock")


def load(path: Path) -> NodeConfig:
    """Read and validate a node config file; raise ConfigError on any problem."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError("config", f"cannot read {path}: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError("config", f"{path} is not valid TOML: {exc}") from None
    return parse(data, path)


class _Collect:
    """Runs each check, keeps every ConfigError it raises and goes on: the user sees all the
    config's problems in one run, not one per run. A failed check gives its default."""

    def __init__(self) -> None:
        self.errors: list[ConfigError] = []

    def __call__(self, check: Callable[[], T], default: T) -> T:
        try:
            return check()
        except ConfigErrors as exc:
            self.errors.extend(exc.errors)
        except ConfigError as exc:
            self.errors.append(exc)
        return default

    def raise_any(self) -> None:
        if len(self.errors) == 1:
            raise self.errors[0]
        if self.errors:
            raise ConfigErrors(self.errors)


def parse(data: dict[str, Any], path: Path) -> NodeConfig:
    base = path.parent
    c = _Collect()
    c(lambda: _unknown("", data), None)
    node: dict[str, Any] = c(lambda: _table(data, "node", required=True), {})
    c(lambda: _unknown("node", node), None)
    tap_t: dict[str, Any] = c(lambda: _table(data, "tap", required=False), {})
    c(lambda: _unknown("tap", tap_t), None)

    name = c(lambda: _optional_name(node), None)
    cert = c(lambda: _required_file(base, "node.cert", node.get("cert")), base)
    key = c(lambda: _required_file(base, "node.key", node.get("key")), base)
    ca: tuple[Path, ...] = c(lambda: _ca_files(base, node.get("ca")), (base,))
    listen = c(
        lambda: parse_endpoint("node.listen", node.get("listen", f"0.0.0.0:{DEFAULT_PORT}")),
        Endpoint("0.0.0.0", DEFAULT_PORT),
    )
    tap = TapConfig(
        name=c(lambda: _ifname("tap.name", tap_t.get("name", "ipop0")), "ipop0"),
        mtu=c(lambda: _optional_mtu(tap_t.get("mtu")), None),
        offload=c(lambda: _bool("tap.offload", tap_t.get("offload", True)), True),
    )
    control = c(lambda: _control(base, node), None)
    cipher = c(lambda: _choice("node.cipher", node, Cipher, Cipher.AES_256_GCM), Cipher.AES_256_GCM)
    security = c(
        lambda: _choice("node.security", node, SecurityPolicy, SecurityPolicy.ALWAYS),
        SecurityPolicy.ALWAYS,
    )
    groups = c(lambda: _groups(node), None)
    revoked = c(lambda: _file(base, "node.revoked", node.get("revoked"), required=False), None)
    log_level = c(lambda: _log_level(node), "info")
    log_format = c(lambda: _log_format(node), "text")

    peers_raw = data.get("peer", [])
    peers = []
    if not isinstance(peers_raw, list):
        c.errors.append(ConfigError("peer", "must be an array of tables: write [[peer]] sections"))
        peers_raw = []
    seen: set[str] = set()
    for i, p in enumerate(peers_raw):
        peer = c(functools.partial(_peer, base, f"peer[{i}]", p, seen), None)
        if peer is not None:
            peers.append(peer)

    signalling = c(lambda: _signalling(base, _table(data, "signalling", required=False)), None)
    ice = c(lambda: _ice(_table(data, "ice", required=False)), IceConfig())
    metrics = c(lambda: _metrics(data), None)
    dns = c(lambda: _dns(data), None)
    firewall = c(lambda: _firewall(data), None)
    c.raise_any()

    return NodeConfig(
        path=path,
        name=name,
        cert=cert,
        key=key,
        ca=ca,
        listen=listen,
        control=control,
        cipher=cipher,
        log_level=log_level,
        log_format=log_format,
        tap=tap,
        peers=tuple(peers),
        signalling=signalling,
        security=security,
        groups=groups,
        ice=ice,
        metrics=metrics,
        dns=dns,
        revoked=revoked,
        firewall=firewall,
    )


def _optional_name(node: dict[str, Any]) -> str | None:
    name = node.get("name")
    return None if name is None else _name("node.name", name)


def _control(base: Path, node: dict[str, Any]) -> Path | None:
    control_raw = node.get("control")
    if control_raw is None:
        return None
    if not isinstance(control_raw, str) or not control_raw:
        raise ConfigError("node.control", "must be a path (string)")
    return (base / control_raw) if not Path(control_raw).is_absolute() else Path(control_raw)


E = TypeVar("E", Cipher, SecurityPolicy, Action)


def _choice(field: str, node: dict[str, Any], kind: type[E], default: E) -> E:
    raw = node.get(field.split(".")[-1], default.value)
    try:
        return kind(raw)
    except ValueError:
        choices = ", ".join(str(k.value) for k in kind)
        raise ConfigError(field, f"{raw!r} is not one of: {choices}") from None


def _groups(node: dict[str, Any]) -> tuple[str, ...] | None:
    if "groups" not in node:
        return None
    raw_groups = node["groups"]
    if not isinstance(raw_groups, list) or not all(isinstance(g, str) for g in raw_groups):
        raise ConfigError("node.groups", 'must be a list of group names, e.g. ["web"]')
    return tuple(_name(f"node.groups[{i}]", g) for i, g in enumerate(raw_groups))


def _log_format(node: dict[str, Any]) -> str:
    fmt = node.get("log_format", "text")
    if fmt not in LOG_FORMATS:
        raise ConfigError("node.log_format", f"{fmt!r} is not one of: {', '.join(LOG_FORMATS)}")
    return str(fmt)


def _log_level(node: dict[str, Any]) -> str:
    log_level = node.get("log_level", "info")
    if log_level not in LOG_LEVELS:
        raise ConfigError("node.log_level", f"{log_level!r} is not one of: {', '.join(LOG_LEVELS)}")
    return str(log_level)


def _peer(base: Path, field: str, p: object, seen: set[str]) -> PeerConfig:
    if not isinstance(p, dict):
        raise ConfigError(field, "must be a table")
    c = _Collect()
    c(lambda: _unknown("peer", p, field), None)
    pname = c(lambda: _name(f"{field}.name", p.get("name")), "")
    if pname and pname in seen:  # "": a bad name, already reported
        c.errors.append(ConfigError(f"{field}.name", f"peer {pname!r} is listed twice"))
    seen.add(pname)
    pcert = c(lambda: _file(base, f"{field}.cert", p.get("cert"), required=False), None)
    pkey = None
    if "public_key" in p:
        pkey = c(lambda: _public_key(f"{field}.public_key", p["public_key"]), b"")
    if ("cert" in p) == ("public_key" in p):
        c.errors.append(ConfigError(field, "give exactly one of `cert` or `public_key`"))
    endpoint = None
    if "endpoint" in p:
        endpoint = c(
            lambda: parse_endpoint(f"{field}.endpoint", p["endpoint"], need_host=True), None
        )
    c.raise_any()
    return PeerConfig(name=pname, cert=pcert, public_key=pkey, endpoint=endpoint)


def _signalling(base: Path, table: dict[str, Any]) -> SignallingConfig | None:
    if not table:
        return None
    c = _Collect()
    c(lambda: _unknown("signalling", table), None)
    url = table.get("url")
    if not isinstance(url, str) or not re.fullmatch(r"wss?://[^\s/?#]+(/[^\s]*)?", url):
        c.errors.append(ConfigError("signalling.url", 'must be a URL like "ws://192.0.2.1:8765/"'))
        url = ""
    ca = c(lambda: _file(base, "signalling.ca", table.get("ca"), required=False), None)
    if ca is not None and url and not url.startswith("wss://"):  # "": a bad url, reported
        c.errors.append(ConfigError("signalling.ca", "only used with a wss:// url"))
    max_links = c(
        lambda: _int("signalling.max_links", table.get("max_links", DEFAULT_MAX_LINKS), 1, 4096),
        DEFAULT_MAX_LINKS,
    )
    no_advertise: tuple[Endpoint, ...] = ()
    advertise = c(lambda: _advertise(table.get("advertise", [])), no_advertise)
    c.raise_any()
    return SignallingConfig(url=url, ca=ca, max_links=max_links, advertise=advertise)


def _advertise(raw: object) -> tuple[Endpoint, ...]:
    if not isinstance(raw, list) or len(raw) > MAX_ADVERTISE:
        raise ConfigError(
            "signalling.advertise", f"must be a list of up to {MAX_ADVERTISE} addresses"
        )
    c = _Collect()
    found = tuple(
        c(functools.partial(parse_endpoint, f"signalling.advertise[{i}]", a, need_host=True), None)
        for i, a in enumerate(raw)
    )
    c.raise_any()
    return tuple(e for e in found if e is not None)


def _metrics(data: dict[str, Any]) -> MetricsConfig | None:
    """[metrics]: absent, no endpoint; present, `listen` is required (an empty section is
    a mistake, not a way to turn metrics off)."""
    if "metrics" not in data:
        return None
    table = _table(data, "metrics", required=True)
    c = _Collect()
    c(lambda: _unknown("metrics", table), None)
    listen = None
    if "listen" not in table:
        c.errors.append(ConfigError("metrics.listen", 'missing (an "ADDRESS:PORT" to serve on)'))
    else:
        listen = c(lambda: _metrics_listen(table["listen"]), None)
    c.raise_any()
    assert listen is not None
    return MetricsConfig(listen=listen)


def _metrics_listen(value: object) -> Endpoint:
    listen = parse_endpoint("metrics.listen", value)
    if listen.port == 0:
        raise ConfigError("metrics.listen", "needs a port a scraper can be told (1..65535)")
    return listen


def _ice(table: dict[str, Any]) -> IceConfig:
    c = _Collect()
    c(lambda: _unknown("ice", table), None)
    stun_raw: list[Any] = c(
        lambda: _list("ice.stun", table.get("stun", []), MAX_STUN_SERVERS, "STUN server URLs"), []
    )
    stun = [
        c(functools.partial(_server_url, f"ice.stun[{i}]", url, "stun", plain=True), None)
        for i, url in enumerate(stun_raw)
    ]
    turn_raw: list[Any] = c(
        lambda: _list("ice.turn", table.get("turn", []), MAX_TURN_SERVERS, "TURN server tables"),
        [],
    )
    turn = [c(functools.partial(_turn, f"ice.turn[{i}]", t), None) for i, t in enumerate(turn_raw)]
    ifaces_raw: list[Any] = c(
        lambda: _list("ice.ignore_interfaces", table.get("ignore_interfaces", []), None, "names"),
        [],
    )
    ifaces = [
        c(functools.partial(_ifname, f"ice.ignore_interfaces[{i}]", n), "")
        for i, n in enumerate(ifaces_raw)
    ]
    c.raise_any()
    return IceConfig(
        stun=tuple(e for e in stun if e is not None),
        turn=tuple(t for t in turn if t is not None),
        ignore_interfaces=tuple(ifaces),
    )


def _dns(data: dict[str, Any]) -> DnsConfig | None:
    if "dns" not in data:  # opt-in: an empty [dns] section turns it on with the defaults
        return None
    table = _table(data, "dns", required=False)
    c = _Collect()
    c(lambda: _unknown("dns", table), None)
    listen = None
    if "listen" in table:
        listen = c(lambda: parse_endpoint("dns.listen", table["listen"]), None)
        if listen is not None and listen.port == 0:
            c.errors.append(ConfigError("dns.listen", "port 0: give the port to answer on (53)"))
    domain = None
    if "domain" in table:
        domain = c(lambda: _domain("dns.domain", table["domain"]), None)
    c.raise_any()
    return DnsConfig(listen=listen, domain=domain)


def _firewall(data: dict[str, Any]) -> FirewallRules | None:
    """[firewall]: absent, or with no rule in either direction, everything passes."""
    if "firewall" not in data:
        return None
    table = _table(data, "firewall", required=False)
    c = _Collect()
    c(lambda: _unknown("firewall", table), None)
    conntrack_max = c(
        lambda: _int(
            "firewall.conntrack_max",
            table.get("conntrack_max", CONNTRACK_MAX),
            1,
            MAX_CONNTRACK_MAX,
        ),
        CONNTRACK_MAX,
    )
    no_rules: tuple[Rule, ...] = ()
    inbound = c(lambda: _rules("firewall.inbound", table.get("inbound", [])), no_rules)
    outbound = c(lambda: _rules("firewall.outbound", table.get("outbound", [])), no_rules)
    c.raise_any()
    rules = FirewallRules(inbound=inbound, outbound=outbound, conntrack_max=conntrack_max)
    return None if rules.empty else rules


def _rules(where: str, raw: object) -> tuple[Rule, ...]:
    if not isinstance(raw, list) or not all(isinstance(r, dict) for r in raw):
        raise ConfigError(where, f"must be an array of tables: write [[{where}]] sections")
    if len(raw) > MAX_RULES:
        raise ConfigError(where, f"{len(raw)} rules: at most {MAX_RULES} per direction")
    c = _Collect()
    found = [c(functools.partial(_rule, f"{where}[{i}]", r), None) for i, r in enumerate(raw)]
    c.raise_any()
    return tuple(r for r in found if r is not None)


def _rule(where: str, table: dict[str, Any]) -> Rule:
    c = _Collect()
    c(lambda: _unknown("firewall.rule", table, where), None)
    proto: int | None = c(lambda: _rule_proto(f"{where}.proto", table.get("proto")), None)
    ports = None
    if "port" in table:
        ports = c(lambda: _port_range(f"{where}.port", table["port"]), None)
        if ports is not None and proto not in (PROTOCOLS["tcp"], PROTOCOLS["udp"]):
            c.errors.append(ConfigError(f"{where}.port", 'needs proto "tcp" or "udp"'))
    host = None
    if "host" in table:
        host = c(lambda: _rule_host(f"{where}.host", table["host"]), None)
    groups: frozenset[str] = frozenset()
    if "groups" in table:
        groups = c(lambda: _rule_groups(f"{where}.groups", table["groups"]), frozenset())
    cidr = None
    if "cidr" in table:
        cidr = c(lambda: _cidr(f"{where}.cidr", table["cidr"]), None)
    action = c(lambda: _choice(f"{where}.action", table, Action, Action.ALLOW), Action.ALLOW)
    if not {"host", "groups", "cidr"} & set(table):
        c.errors.append(
            ConfigError(
                where, 'names no peer: give host, groups or cidr (host = "any": every peer)'
            )
        )
    c.raise_any()
    return Rule(proto=proto, ports=ports, host=host, groups=groups, cidr=cidr, action=action)


def _rule_proto(where: str, value: object) -> int | None:
    choices = ", ".join(sorted(PROTOCOLS))
    if value is None:
        raise ConfigError(where, f"missing (one of: {choices})")
    if not isinstance(value, str) or value.lower() not in PROTOCOLS:
        raise ConfigError(where, f"{value!r} is not one of: {choices}")
    return PROTOCOLS[value.lower()]


def _port_range(where: str, value: object) -> tuple[int, int] | None:
    """22, "22", "8000-8100" or "any" (None)."""
    example = 'a port (22), a range ("8000-8100") or "any"'
    if isinstance(value, str) and value.strip().lower() == "any":
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        lo = hi = value
    elif isinstance(value, str) and (m := re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", value)):
        lo = int(m.group(1))
        hi = int(m.group(2) or m.group(1))
    else:
        raise ConfigError(where, f"{value!r} is not {example}")
    if not 1 <= lo <= 65535 or not 1 <= hi <= 65535:
        raise ConfigError(where, f"{value!r}: ports are 1..65535")
    if lo > hi:
        raise ConfigError(where, f"{value!r}: the range runs backwards (write {hi}-{lo})")
    return (lo, hi)


def _rule_host(where: str, value: object) -> str | None:
    if value == "any":
        return None
    return _name(where, value)


def _rule_groups(where: str, value: object) -> frozenset[str]:
    if not isinstance(value, list) or not value or not all(isinstance(g, str) for g in value):
        raise ConfigError(where, 'must be a non-empty list of group names, e.g. ["web"]')
    return frozenset(_name(f"{where}[{i}]", g) for i, g in enumerate(value))


def _cidr(where: str, value: object) -> ipaddress.IPv4Network:
    if not isinstance(value, str):
        raise ConfigError(where, 'must be a string like "10.77.0.0/24"')
    try:
        net = ipaddress.ip_network(value.strip(), strict=False)
    except ValueError:
        raise ConfigError(
            where, f"{value!r} is not an address or network like 10.77.0.0/24"
        ) from None
    if not isinstance(net, ipaddress.IPv4Network):
        raise ConfigError(where, f"{value}: overlay addresses are IPv4")
    if str(net) != value.strip() and "/" in value:
        raise ConfigError(where, f"{value!r} has host bits set (the network is {net})")
    return net


def _domain(field: str, value: object) -> str:
    if not isinstance(value, str):
        raise ConfigError(field, 'must be a string like "lab.internal"')
    try:
        return check_domain(value)
    except ValueError as exc:
        raise ConfigError(field, str(exc)) from None


def _turn(where: str, table: object) -> TurnServerConfig:
    if not isinstance(table, dict):
        raise ConfigError(where, "must be a table like {url = ..., username = ..., password = ...}")
    _unknown("ice.turn", table, where)
    server = _server_url(f"{where}.url", table.get("url"), "turn", plain=False)
    username = _credential(f"{where}.username", table.get("username"))
    password = _credential(f"{where}.password", table.get("password"))
    # RFC 8489 §9.2.2: the long-term key hashes SASLprep(password); refuse what it refuses now.
    try:
        prepared = saslprep(password)
    except LocalProtocolError as exc:
        raise ConfigError(
            f"{where}.password", f"not allowed by SASLprep (RFC 4013): {exc}"
        ) from None
    if not prepared:
        raise ConfigError(f"{where}.password", "is empty after SASLprep (RFC 4013)")
    return TurnServerConfig(server=server, username=username, password=password)


def _credential(where: str, value: object) -> str:
    if value is None:
        raise ConfigError(where, "missing (a string)")
    if not isinstance(value, str) or not value or len(value) > MAX_CREDENTIAL:
        raise ConfigError(where, f"must be a string of 1-{MAX_CREDENTIAL} characters")
    return value


def _server_url(where: str, value: object, scheme: str, *, plain: bool) -> Endpoint:
    """A STUN (RFC 7064) or TURN (RFC 7065) URL with a literal IP address, as an endpoint.

    `plain` also allows a bare "IP:PORT". Only UDP: no "stuns:"/"turns:", no other transport."""
    example = f'"{scheme}:192.0.2.1:{STUN_PORT}"'
    if value is None:
        raise ConfigError(where, f"missing (a URL like {example})")
    if not isinstance(value, str):
        raise ConfigError(where, f"must be a string like {example}")
    text = value.strip()
    lowered = text.lower()
    if lowered.startswith(f"{scheme}s:"):
        what = "TLS TURN (turns:)" if scheme == "turn" else "STUN over TLS (stuns:)"
        raise ConfigError(where, f"{what} is not supported; use {scheme}: over UDP")
    if lowered.startswith(f"{scheme}:"):
        rest, sep, query = text[len(scheme) + 1 :].partition("?")
    elif plain and not lowered.startswith(("stun:", "stuns:", "turn:", "turns:")):
        rest, sep, query = text, "", ""
    else:
        raise ConfigError(where, f"{value!r} is not a {scheme}: URL like {example}")
    if sep:
        key, eq, transport = query.partition("=")
        if scheme != "turn" or key.lower() != "transport" or not eq:
            allowed = '"?transport=udp"' if scheme == "turn" else "none"
            raise ConfigError(where, f"unexpected {'?' + query!r} (parameters allowed: {allowed})")
        if transport.lower() != "udp":
            raise ConfigError(where, f"transport={transport}: only UDP is supported")
    m = _SERVER_HOSTPORT.fullmatch(rest)
    if not m:
        raise ConfigError(where, f'{value!r} is not like {example} (IPv6 as "[ADDR]:PORT")')
    host = m["v6"] if m["v6"] is not None else m["v4"]
    port = m["p6"] or m["p4"]
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        addr = None
    if addr is None or "%" in host or (m["v6"] is not None) != (addr.version == 6):
        raise ConfigError(
            where, f"{host!r} is not a literal IP address (DNS names are not supported)"
        )
    if port is None and not lowered.startswith(f"{scheme}:"):
        raise ConfigError(where, f'{value!r} needs a port ("IP:PORT") or a "{scheme}:" prefix')
    hostport = f"[{addr}]" if addr.version == 6 else str(addr)
    return parse_endpoint(where, f"{hostport}:{port or STUN_PORT}", need_host=True)


def _list(where: str, value: object, most: int | None, what: str) -> list[Any]:
    if not isinstance(value, list) or (most is not None and len(value) > most):
        limit = f"up to {most} " if most is not None else ""
        raise ConfigError(where, f"must be a list of {limit}{what}")
    return value


def parse_endpoint(field: str, value: object, *, need_host: bool = False) -> Endpoint:
    """Parse "host:port" / "[v6]:port" with a literal IP address."""
    if not isinstance(value, str):
        raise ConfigError(field, 'must be a string like "192.0.2.7:4600"')
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([0-9.]+):(\d+)", value.strip())
    if not m:
        if re.fullmatch(r"[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*\.?:\d+", value.strip()):
            raise ConfigError(
                field,
                f"{value!r}: host names are not supported, give its IP address "
                "(resolving names would make the node's start depend on DNS)",
            )
        raise ConfigError(field, f'{value!r} is not "ADDRESS:PORT" (IPv6 as "[ADDR]:PORT")')
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(field, f"{host!r} is not an IP address") from None
    if not 0 < port < 65536 and not (port == 0 and not need_host):
        raise ConfigError(field, f"port {port} is out of range 1..65535")
    if need_host and addr.is_unspecified:
        raise ConfigError(field, f"{host} is not a reachable address")
    return Endpoint(str(addr), port)


def _unknown(section: str, table: dict[str, Any], field: str | None = None) -> None:
    known = ", ".join(sorted(_KNOWN[section]))
    c = _Collect()
    for key in sorted(set(table) - _KNOWN[section]):
        where = f"{field or section}.{key}" if (field or section) else key
        close = difflib.get_close_matches(key, _KNOWN[section], n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        c.errors.append(ConfigError(where, f"unknown setting ({hint}known here: {known})"))
    c.raise_any()


def _table(data: dict[str, Any], name: str, *, required: bool) -> dict[str, Any]:
    t = data.get(name)
    if t is None:
        if required:
            raise ConfigError(name, f"missing [{name}] section")
        return {}
    if not isinstance(t, dict):
        raise ConfigError(name, f"must be a [{name}] table")
    return t


def _bool(field: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(field, f"must be true or false, got {value!r}")
    return value


def _name(field: str, value: object) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise ConfigError(field, "must be 1-63 characters of A-Z a-z 0-9 . _ -")
    return value


def _ifname(field: str, value: object) -> str:
    if not isinstance(value, str) or not _IFNAME.match(value):
        raise ConfigError(field, "must be an interface name of 1-15 characters (A-Z a-z 0-9 . _ -)")
    return value


def _optional_mtu(value: object) -> int | None:
    return None if value is None else _int("tap.mtu", value, MIN_MTU, MAX_MTU)


def _int(field: str, value: object, lo: int, hi: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(field, f"must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise ConfigError(field, f"{value} is outside {lo}..{hi}")
    return value


def _required_file(base: Path, field: str, value: object) -> Path:
    path = _file(base, field, value, required=True)
    assert path is not None
    return path


def _ca_files(base: Path, value: object) -> tuple[Path, ...]:
    """`node.ca`: one file, or a list of files (trusted at once while a CA is rotated)."""
    if not isinstance(value, list):
        return (_required_file(base, "node.ca", value),)
    if not value:
        raise ConfigError("node.ca", "an empty list: name at least one CA certificate")
    c = _Collect()
    files = [
        c(functools.partial(_required_file, base, f"node.ca[{i}]", v), base)
        for i, v in enumerate(value)
    ]
    c.raise_any()
    return tuple(files)


def _file(base: Path, field: str, value: object, *, required: bool) -> Path | None:
    if value is None:
        if required:
            raise ConfigError(field, "missing (path to a file)")
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(field, "must be a path (string)")
    p = Path(value)
    p = p if p.is_absolute() else base / p
    if not p.is_file():
        raise ConfigError(field, f"{p} does not exist or is not a file")
    return p


def _public_key(field: str, value: object) -> bytes:
    if not isinstance(value, str):
        raise ConfigError(field, "must be a base64 X25519 public key (string)")
    try:
        return decode_key(value)
    except ValueError as exc:
        raise ConfigError(field, f"not a base64 X25519 public key: {exc}") from None
