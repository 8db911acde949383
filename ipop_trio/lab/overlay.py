"""Overlays of ipop-trio nodes on lab hosts, for the demo, the bench and the lab tests.

`Overlay` runs ipop-trio nodes on the hosts of a `ipop_trio.lab.netns.Lab`: CA and
certificates, per-node TOML config, ``python -m ipop_trio run -c ...`` in the host's
namespace, readiness and status through the node's control socket; and, when asked, the
overlay's signalling server (``ipop-trio signal``) on a lab host. Nodes and the signalling
server are processes the lab tracks, so the lab's teardown stops them; their files live in the
lab's workdir.

This module must never start a node outside a lab namespace or edit the lab's records: it
builds on `Lab`'s and `Host`'s public API only.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ipop_trio.config import DEFAULT_PORT
from ipop_trio.errors import LabError
from ipop_trio.lab.netns import POLL_INTERVAL, Host, Lab
from ipop_trio.net.control import ControlReplyError, query
from ipop_trio.proto.cert import encode_key

DEFAULT_OVERLAY_NETWORK = "10.77.0.0/24"
READY_TIMEOUT = 20.0
LOG_TAIL_LINES = 40


@dataclass(frozen=True, slots=True)
class CA:
    """An overlay CA held in memory (PEM key and certificate)."""

    name: str
    network: str  # one network, or "IPv4 + IPv6" (`networks`)
    key_pem: bytes
    cert_pem: bytes


@dataclass(slots=True, eq=False)
class OverlayNode:
    """One ipop-trio node of an `Overlay`, and where its files live."""

    name: str
    host: Host
    address: str  # overlay address (from the certificate)
    port: int  # underlay UDP port
    tap: str
    ca: CA  # issued this node's certificate; the node also trusts it (unless `trust`)
    groups: tuple[str, ...]
    key_pem: bytes
    cert_pem: bytes
    dir: Path
    peers: tuple[str, ...] | None  # names of configured peers; None: every other node
    signalling: bool = False  # learns peers from the overlay's signalling server
    security: str | None = None  # [node] security ("always" / "groups"); None: the default
    stun: tuple[str, ...] = ()  # [ice] stun URLs
    turn: tuple[tuple[str, str, str], ...] = ()  # [ice] turn servers: (url, username, password)
    # "python" runs the node with IPOP_TRIO_PURE_PYTHON=1; None: the default (native if built)
    datapath: str | None = None
    offload: bool | None = None  # [tap] offload; None: the default
    metrics: str | None = None  # [metrics] listen ("ADDR:PORT"); None: no metrics endpoint
    extra_config: str = ""  # TOML appended to the config: sections without a parameter here
    ip6: str | None = None  # overlay IPv6 address (from the certificate) on a dual-stack overlay
    revoked: str | None = None  # [node] revoked: a file in the node's directory (the test's)
    # The CAs the node trusts, written as one bundle file ([node] ca); None: its issuer only.
    # With `trust` set, peers are configured by public key (their issuers may differ).
    trust: tuple[CA, ...] | None = None
    proc: subprocess.Popen[Any] | None = None

    @property
    def config(self) -> Path:
        return self.dir / "node.toml"

    @property
    def control(self) -> Path:
        return self.dir / "control.sock"

    @property
    def log(self) -> Path:
        return self.dir / "node.log"

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise LabError(f"node {self.name} is not started")
        return self.proc.pid


DEFAULT_SIGNAL_PORT = 8765


@dataclass(slots=True, eq=False)
class SignalServer:
    """The overlay's `ipop-trio signal` process on a lab host."""

    host: Host
    port: int
    dir: Path
    url: str
    metrics: str | None = None  # --metrics ADDR:PORT
    proc: subprocess.Popen[Any] | None = None

    @property
    def log(self) -> Path:
        return self.dir / "signal.log"


def _write_at_once(path: Path, data: bytes) -> None:
    """Replace `path` by renaming a new file over it: a node reading it on SIGHUP never sees
    half of it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _toml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


class Overlay:
    """ipop-trio nodes on a lab's hosts, sharing one CA (unless told otherwise).

    Nodes are peered in a full mesh by default; each peer entry names the peer's certificate
    when both were issued by the same CA, else its raw public key (so a node with a foreign
    certificate can still be configured and must be refused at the handshake)."""

    def __init__(
        self,
        lab: Lab,
        *,
        name: str = "lab",
        network: str = DEFAULT_OVERLAY_NETWORK,
        network6: str | None = None,  # an IPv6 network too: a dual-stack overlay
        cipher: str = "aes-256-gcm",
        tap_mtu: int | None = 1400,  # None: the node's default (from the underlay)
        log_level: str = "info",
        log_format: str = "text",
        days: int = 2,
    ) -> None:
        self.lab = lab
        self.network = ipaddress.ip_network(network)
        self.network6 = None if network6 is None else ipaddress.ip_network(network6)
        self.cipher = cipher
        self.tap_mtu = tap_mtu
        self.log_level = log_level
        self.log_format = log_format
        self.days = days
        self.nodes: dict[str, OverlayNode] = {}
        self.dir = lab.workdir / "overlay"
        self.dir.mkdir(exist_ok=True)
        self.ca = self.new_ca(name)
        self.signal: SignalServer | None = None

    def new_ca(self, name: str, network: str | None = None, *, days: int | None = None) -> CA:
        """A fresh CA (the overlay's own, a foreign one for refusal tests, or the next one of
        a CA rotation), valid for `days` (default: the overlay's)."""
        from ipop_trio import pki

        nets = [network] if network else [str(n) for n in (self.network, self.network6) if n]
        key_pem, cert_pem = pki.new_ca(name, nets, days or self.days, time.time())
        return CA(name, " + ".join(nets), key_pem, cert_pem)

    def _next_address(self, network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> str:
        used = {a for n in self.nodes.values() for a in (n.address, n.ip6)}
        for addr in network.hosts():
            if str(addr) not in used:
                return str(addr)
        raise LabError(f"overlay network {network} is full")

    def add_node(
        self,
        name: str,
        host: Host,
        *,
        address: str | None = None,
        address6: str | None = None,
        groups: Iterable[str] = (),
        ca: CA | None = None,
        peers: Iterable[str] | None = None,
        signalling: bool = False,
        security: str | None = None,
        stun: Iterable[str] = (),
        turn: Iterable[tuple[str, str, str]] = (),
        datapath: str | None = None,
        offload: bool | None = None,
        metrics: str | None = None,
        extra_config: str = "",
    ) -> OverlayNode:
        """Issue a certificate for a node on `host` (next free overlay address unless given;
        on a dual-stack overlay an IPv6 one too, `address6`).
        The node is configured and started by `start`. With `signalling`, it learns its peers
        from the overlay's signalling server (`start_signalling`) and has no static peers
        unless `peers` names some. `stun` URLs and `turn` servers, as (url, username,
        password), go into the node's [ice] section. `datapath` "python" forces the
        pure-Python data path (IPOP_TRIO_PURE_PYTHON=1); "native" requires the native core.
        `offload` sets [tap] offload (None: the node's default); `metrics` sets [metrics]
        listen (None: none). `extra_config` is TOML appended to the node's config
        (e.g. a `[dns]` section)."""
        if datapath not in (None, "python", "native"):
            raise LabError(f"datapath {datapath!r}: expected 'python' or 'native'")
        from ipop_trio import pki

        if name in self.nodes:
            raise LabError(f"node {name!r} exists")
        issuer = ca or self.ca
        address = address or self._next_address(self.network)
        if address6 is None and self.network6 is not None:
            address6 = self._next_address(self.network6)
        addresses = [address] if address6 is None else [address, address6]
        groups_t = tuple(groups)
        key_pem, cert_pem = pki.issue_node(
            issuer.key_pem, issuer.cert_pem, name, addresses, groups_t, self.days, time.time()
        )
        if key_pem is None:
            raise LabError("pki.issue_node returned no private key")
        on_host = [n for n in self.nodes.values() if n.host is host]
        node = OverlayNode(
            name=name,
            host=host,
            address=address,
            port=DEFAULT_PORT + len(on_host),
            tap=f"ipop{len(on_host)}",
            ca=issuer,
            groups=groups_t,
            key_pem=key_pem,
            cert_pem=cert_pem,
            dir=self.dir / name,
            peers=tuple(peers) if peers is not None else (() if signalling else None),
            signalling=signalling,
            security=security,
            stun=tuple(stun),
            turn=tuple(turn),
            datapath=datapath,
            offload=offload,
            metrics=metrics,
            extra_config=extra_config,
            ip6=address6,
        )
        self.nodes[name] = node
        return node

    def reissue(
        self,
        node: OverlayNode,
        groups: Iterable[str] | None = None,
        *,
        ca: CA | None = None,
        days: int | None = None,
    ) -> None:
        """A new certificate for the node's same key (other groups, another issuer `ca`, a
        validity of `days`; unchanged when not given), written where the node reads it: a
        SIGHUP (or restart) makes the node use it."""
        from ipop_trio import pki

        public = pki.public_key_of(pki.load_private_key_bytes(node.key_pem))
        if groups is not None:
            node.groups = tuple(groups)
        if ca is not None:
            node.ca = ca
        _, cert_pem = pki.issue_node(
            node.ca.key_pem,
            node.ca.cert_pem,
            node.name,
            [a for a in (node.address, node.ip6) if a is not None],
            node.groups,
            self.days if days is None else days,
            time.time(),
            public_key=public,
        )
        node.cert_pem = cert_pem
        if node.dir.exists():
            _write_at_once(node.dir / "node.crt", node.cert_pem)

    def set_trust(self, node: OverlayNode, *cas: CA) -> None:
        """The CAs `node` trusts, as one bundle file where it reads [node] ca: a SIGHUP (or
        restart) makes the node use them. Set it before `start` to configure peers by key."""
        if not cas:
            raise LabError("a node trusts at least one CA")
        node.trust = tuple(cas)
        if node.dir.exists():
            _write_at_once(node.dir / "ca.crt", self._trust_pem(node))

    @staticmethod
    def _trust_pem(node: OverlayNode) -> bytes:
        return b"".join(ca.cert_pem for ca in node.trust or (node.ca,))

    def public_key(self, node: OverlayNode) -> str:
        """The node's raw X25519 public key, base64 (as in a config's ``public_key``)."""
        from ipop_trio import pki

        return encode_key(pki.public_key_of(pki.load_private_key_bytes(node.key_pem)))

    def endpoint(self, src: OverlayNode, dst: OverlayNode) -> str:
        """Where `src` reaches `dst` on the underlay: `dst`'s address on a link they share,
        else `dst`'s first address (routed)."""
        for iface in dst.host.ifaces:
            for link in self.lab.links:
                if iface in link.ends and any(e.host is src.host for e in link.ends):
                    return f"{iface.address.ip}:{dst.port}"
        return f"{dst.host.address}:{dst.port}"

    def write_config(self, node: OverlayNode) -> Path:
        """Write the node's key, certificates and TOML config into its directory."""
        node.dir.mkdir(parents=True, exist_ok=True)
        key = node.dir / "node.key"
        key.write_bytes(node.key_pem)
        key.chmod(0o600)
        (node.dir / "node.crt").write_bytes(node.cert_pem)
        (node.dir / "ca.crt").write_bytes(self._trust_pem(node))
        lines = [
            "[node]",
            f"name = {_toml_str(node.name)}",
            'cert = "node.crt"',
            'key = "node.key"',
            'ca = "ca.crt"',
            f'listen = "0.0.0.0:{node.port}"',
            f"control = {_toml_str(str(node.control))}",
            f"cipher = {_toml_str(self.cipher)}",
            f"log_level = {_toml_str(self.log_level)}",
            f"log_format = {_toml_str(self.log_format)}",
            *([f"security = {_toml_str(node.security)}"] if node.security else []),
            *([f"revoked = {_toml_str(node.revoked)}"] if node.revoked else []),
            "",
            "[tap]",
            f"name = {_toml_str(node.tap)}",
            *([] if self.tap_mtu is None else [f"mtu = {self.tap_mtu}"]),
            *([] if node.offload is None else [f"offload = {str(node.offload).lower()}"]),
        ]
        if node.signalling:
            if self.signal is None:
                raise LabError(f"node {node.name} uses signalling: call start_signalling first")
            lines += ["", "[signalling]", f"url = {_toml_str(self.signal.url)}"]
        if node.stun or node.turn:
            turn = (
                f"{{url = {_toml_str(url)}, username = {_toml_str(user)}, "
                f"password = {_toml_str(password)}}}"
                for url, user, password in node.turn
            )
            lines += [
                "",
                "[ice]",
                f"stun = [{', '.join(_toml_str(url) for url in node.stun)}]",
                f"turn = [{', '.join(turn)}]",
            ]
        if node.metrics is not None:
            lines += ["", "[metrics]", f"listen = {_toml_str(node.metrics)}"]
        names = node.peers if node.peers is not None else [n for n in self.nodes if n != node.name]
        for peer_name in names:
            peer = self.nodes[peer_name]
            lines += ["", "[[peer]]", f"name = {_toml_str(peer.name)}"]
            if peer.ca is node.ca and node.trust is None:
                cert = f"peer-{peer.name}.crt"
                (node.dir / cert).write_bytes(peer.cert_pem)
                lines.append(f"cert = {_toml_str(cert)}")
            else:
                lines.append(f"public_key = {_toml_str(self.public_key(peer))}")
            lines.append(f"endpoint = {_toml_str(self.endpoint(node, peer))}")
        if node.extra_config:
            lines += ["", node.extra_config.strip()]
        node.config.write_text("\n".join(lines) + "\n")
        return node.config

    def start(self, *nodes: OverlayNode, timeout: float = READY_TIMEOUT) -> None:
        """Write configs, start the nodes (default: all not yet started), wait until each
        answers on its control socket."""
        todo = list(nodes) or [n for n in self.nodes.values() if n.proc is None]
        for node in todo:
            self.write_config(node)
            with contextlib.suppress(FileNotFoundError):
                node.control.unlink()
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            if node.datapath == "python":
                env["IPOP_TRIO_PURE_PYTHON"] = "1"
            elif node.datapath == "native":
                env.pop("IPOP_TRIO_PURE_PYTHON", None)
            with open(node.log, "ab") as log:
                node.proc = node.host.popen(
                    [sys.executable, "-m", "ipop_trio", "run", "-c", str(node.config)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=node.dir,
                    env=env,
                )
        deadline = time.monotonic() + timeout
        for node in todo:
            self.wait_ready(node, deadline - time.monotonic())

    def wait_ready(self, node: OverlayNode, timeout: float = READY_TIMEOUT) -> dict[str, Any]:
        """Poll the control socket until the node answers `status`; return that status."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while True:
            if node.proc is None:
                raise LabError(f"node {node.name} is not started")
            code = node.proc.poll()
            if code is not None:
                raise LabError(
                    f"node {node.name} exited with {code} before it was ready" + self._tail(node)
                )
            if node.control.exists():
                try:
                    return self.status(node, timeout=1.0)
                except LabError as exc:
                    last = str(exc)
            if time.monotonic() >= deadline:
                raise LabError(
                    f"node {node.name} not ready after {timeout:.0f}s ({last})" + self._tail(node)
                )
            time.sleep(POLL_INTERVAL)

    def status(self, node: OverlayNode, timeout: float = 5.0) -> dict[str, Any]:
        """The node's ``status`` reply (a dict, see the control protocol)."""
        try:
            return query(node.control, "status", timeout=timeout)
        except OSError as exc:  # no node answers there
            raise LabError(f"control socket {node.control}: {exc}") from exc
        except ControlReplyError as exc:  # it names the socket
            raise LabError(f"control socket {exc}") from exc

    def peer_status(self, node: OverlayNode, peer: OverlayNode) -> dict[str, Any] | None:
        """`node`'s status entry for `peer`, or None when it lists no such peer."""
        for entry in self.status(node).get("peers", []):
            if entry.get("name") == peer.name:
                return dict(entry)
        return None

    def wait_established(
        self, a: OverlayNode, b: OverlayNode, timeout: float = READY_TIMEOUT, *, both: bool = True
    ) -> dict[str, Any]:
        """Poll until `a` reports its link to `b` established (and `b` its link to `a`, when
        `both`); return `a`'s entry for `b`."""
        deadline = time.monotonic() + timeout
        pairs = [(a, b), (b, a)] if both else [(a, b)]
        seen: dict[str, Any] = {}
        while True:
            done = True
            for x, y in pairs:
                entry = self.peer_status(x, y)
                seen[f"{x.name}->{y.name}"] = entry and entry.get("state")
                if not entry or entry.get("state") != "established":
                    done = False
            if done:
                return self.peer_status(a, b) or {}
            if time.monotonic() >= deadline:
                raise LabError(
                    f"link {a.name}<->{b.name} not established after {timeout:.0f}s: {seen}"
                    + self._tail(a)
                    + self._tail(b)
                )
            time.sleep(POLL_INTERVAL)

    def stop(self, node: OverlayNode, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        """Send `sig` to the node and wait for it to exit; return its exit code."""
        if node.proc is None:
            raise LabError(f"node {node.name} is not started")
        if node.proc.poll() is None:
            node.proc.send_signal(sig)
        try:
            return node.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise LabError(
                f"node {node.name} still running {timeout:.0f}s after signal {sig}"
                + self._tail(node)
            ) from exc

    # -- the signalling server ----------------------------------------------------------------

    def start_signalling(
        self,
        host: Host | None = None,
        port: int = DEFAULT_SIGNAL_PORT,
        timeout: float = 15.0,
        *,
        metrics: str | None = None,
        extra_args: Iterable[str] = (),
    ) -> SignalServer:
        """Start `ipop-trio signal` on `host` (again: after `stop_signalling`, on the same host
        and port) for this overlay's CA; wait until it listens. `metrics`: its --metrics;
        `extra_args`: more options (e.g. --revoked FILE)."""
        running = self.signal is not None and self.signal.proc is not None
        if running and self.signal.proc.poll() is None:  # type: ignore[union-attr]
            raise LabError("the signalling server is already running")
        if host is None:
            if self.signal is None:
                raise LabError("start_signalling needs a host the first time")
            host, port = self.signal.host, self.signal.port
        directory = self.dir / "signal"
        directory.mkdir(exist_ok=True)
        ca = directory / "ca.crt"
        ca.write_bytes(self.ca.cert_pem)
        server = SignalServer(host, port, directory, f"ws://{host.address}:{port}/", metrics)
        extra = ([] if metrics is None else ["--metrics", metrics]) + list(extra_args)
        start = server.log.stat().st_size if server.log.exists() else 0
        with open(server.log, "ab") as log:
            server.proc = host.popen(
                [
                    sys.executable,
                    "-m",
                    "ipop_trio",
                    "signal",
                    "--ca",
                    str(ca),
                    "--listen",
                    f"0.0.0.0:{port}",
                    "--log-format",
                    self.log_format,
                    *extra,
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=directory,
                env=dict(os.environ, PYTHONUNBUFFERED="1"),
            )
        self.signal = server
        deadline = time.monotonic() + timeout
        while b"ipop-trio signal: listening" not in server.log.read_bytes()[start:]:
            code = server.proc.poll()
            if code is not None or time.monotonic() >= deadline:
                tail = server.log.read_text(errors="replace")[-2000:]
                raise LabError(f"signalling server did not start (exit {code}):\n{tail}")
            time.sleep(POLL_INTERVAL)
        return server

    def stop_signalling(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        """Stop the signalling server; return its exit code."""
        if self.signal is None or self.signal.proc is None:
            raise LabError("no signalling server is running")
        proc = self.signal.proc
        if proc.poll() is None:
            proc.send_signal(sig)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise LabError(f"signalling server still running {timeout:.0f}s after {sig}") from exc

    def log_tail(self, node: OverlayNode, lines: int = LOG_TAIL_LINES) -> str:
        """The last lines of the node's log (stdout and stderr)."""
        try:
            text = node.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _tail(self, node: OverlayNode) -> str:
        return f"\n--- {node.name} log (last {LOG_TAIL_LINES} lines) ---\n{self.log_tail(node)}"


__all__ = [
    "CA",
    "Overlay",
    "OverlayNode",
    "SignalServer",
]
