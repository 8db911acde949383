"""`ipop-trio`: the command line. The only place errors become messages and exit codes."""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import signal
import sys
from functools import partial
from pathlib import Path
from typing import Any

from . import __version__, logs
from .errors import ConfigError, IpopError
from .logs import LOG_FORMATS

EPILOG = """\
typical use:
  ipop-trio ca init --dir ca --name lab --network 10.77.0.0/24
      # dual-stack: --network 10.77.0.0/24 --network fd77::/64, then --address once per family
  ipop-trio ca sign --ca ca --name alpha --address 10.77.0.1 --groups web --out alpha
  ipop-trio ca sign --ca ca --name alpha --address 10.77.0.1 --groups web \
      --key alpha/alpha.key --out alpha      # renew: same key, old alpha.crt kept as .old
  ipop-trio ca show alpha/alpha.crt          # name, address, groups, validity, fingerprint
  ipop-trio signal --listen 0.0.0.0:8765 --ca ca/ca.crt
  ipop-trio run -c alpha/node.toml
  ipop-trio status           # the node of this network namespace
  ipop-trio ping beta       # a probe through the link to beta: path and round trip
  ipop-trio netcheck -c alpha/node.toml   # STUN/TURN/signalling reachable? which NAT?
  ipop-trio demo            # three nodes behind NATs find each other (ICE, TURN), explained
  ipop-trio bench           # direct link vs overlay: throughput, RTT, CPU per GB
"""


# `ipop-trio signal`'s limit options: (flag, `Limits` field, type, default shown, help). The
# defaults are `Limits`'s (tests/unit/test_cli.py checks they agree), written out so that
# building the parser does not import the server (trio, trio-websocket) for every command.
SIGNAL_LIMITS: tuple[tuple[str, str, type, float, str], ...] = (
    ("--max-clients", "max_clients", int, 100_000, "connections in all"),
    (
        "--max-clients-per-source",
        "max_clients_per_source",
        int,
        1024,
        "connections from one IPv4 address or IPv6 /64, admitted or not",
    ),
    ("--max-preauth", "max_preauth", int, 1024, "connections not yet admitted, in all"),
    (
        "--max-preauth-per-source",
        "max_preauth_per_source",
        int,
        16,
        "connections not yet admitted from one IPv4 address or IPv6 /64",
    ),
    ("--admit-rate", "admit_rate", float, 0.2, "admissions per second per node key, sustained"),
    ("--admit-burst", "admit_burst", float, 5, "admissions of one node key allowed at once"),
)


def _add_signal_limits(sg: argparse.ArgumentParser) -> None:
    group = sg.add_argument_group(
        "limits",
        "A connection beyond a connection limit is closed at once; an admission beyond the "
        "key's rate is refused with error rate_limited (the client backs off and retries).",
    )
    for flag, name, kind, default, text in SIGNAL_LIMITS:
        group.add_argument(
            flag,
            dest=name,
            type=kind,
            default=None,
            metavar="N",
            help=f"{text} (default {default:g})",
        )


def signal_limits(args: argparse.Namespace) -> Any:
    """The server's `Limits` from `ipop-trio signal`'s options (unset ones: the defaults)."""
    from .signalling.server import Limits

    given = {}
    for flag, name, _kind, _default, _text in SIGNAL_LIMITS:
        value = getattr(args, name, None)
        if value is None:
            continue
        if value <= 0:
            raise ConfigError(flag, f"must be positive, not {value}")
        given[name] = value
    return Limits(**given)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ipop-trio",
        description="IP over P2P: an overlay VPN of TAP interfaces joined by authenticated, "
        "encrypted UDP links.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"ipop-trio {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="run a node",
        description="Run a node: create its TAP, link to the configured peers, carry traffic. "
        "Ctrl-C or SIGTERM removes the TAP and exits 0. Needs root (TAP, netlink).",
    )
    run.add_argument("-c", "--config", type=Path, required=True, help="node config file (TOML)")
    run.add_argument("--check", action="store_true", help="validate the config and exit")

    sg = sub.add_parser(
        "signal",
        help="run the signalling server",
        description="Run the signalling server: nodes connect over WebSocket, prove their "
        "certificate's key, and are admitted to the overlay whose CA issued it; the server "
        "announces joins and leaves and relays con_req/con_resp within each overlay. Serves "
        "wss:// with --tls-cert/--tls-key, ws:// otherwise. Ctrl-C / SIGTERM stops it; "
        "SIGHUP re-reads --revoked.",
    )
    sg.add_argument(
        "--listen", default="0.0.0.0:8765", help="ADDRESS:PORT to listen on (default 0.0.0.0:8765)"
    )
    sg.add_argument(
        "--ca",
        type=Path,
        action="append",
        required=True,
        help="an overlay CA certificate or bundle (repeat for several overlays; two CAs of "
        "one overlay, same name and network, are both trusted: a CA rotation)",
    )
    sg.add_argument(
        "--revoked",
        type=Path,
        default=None,
        metavar="FILE",
        help="certificate fingerprints to refuse, one per line, # comments (the file a node's "
        "[node] revoked names); re-read on SIGHUP: members it names are dropped",
    )
    sg.add_argument("--tls-cert", type=Path, default=None, help="TLS certificate chain (PEM)")
    sg.add_argument("--tls-key", type=Path, default=None, help="TLS private key (PEM)")
    sg.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sg.add_argument(
        "--log-format",
        default="text",
        choices=list(LOG_FORMATS),
        help="text lines, or one JSON object per line (default text)",
    )
    sg.add_argument(
        "--metrics",
        default=None,
        metavar="ADDR:PORT",
        help="serve Prometheus metrics at http://ADDR:PORT/metrics: connected clients, members "
        "per overlay, admissions, refusals by reason, con_req/con_resp relays (default: off)",
    )
    _add_signal_limits(sg)

    st = sub.add_parser(
        "status",
        help="show a running node's peers and links",
        description="Ask a running node (through its control socket) for its peers, link "
        "state, security mode, bytes, drops and last handshake. With neither -c nor -s: "
        "the node running in this network namespace (its socket in /run/ipop-trio); "
        "inside a namespace, run it there: `ip netns exec NS ipop-trio status`.",
    )
    where = st.add_mutually_exclusive_group()
    where.add_argument("-c", "--config", type=Path, help="the node's config (finds its socket)")
    where.add_argument("-s", "--socket", type=Path, help="the node's control socket")
    st.add_argument("--json", action="store_true", help="print the raw JSON")

    pg = sub.add_parser(
        "ping",
        help="probe a peer through its link: path and round-trip time",
        description="Send probes to PEER through its link, as `tailscale ping`: each is "
        "answered by the peer's node (not its kernel), so the time is the overlay's own, on "
        "the path the link uses now (direct or through a TURN relay), which is printed with "
        "it. Exit 0 when a probe was answered. The node is found as by `status`.",
    )
    nc = sub.add_parser(
        "netcheck",
        help="reach the config's STUN, TURN and signalling servers; what the NAT does",
        description="From a fresh UDP socket (a running node keeps its own): a STUN Binding "
        "to each STUN and TURN server (round trip, the address it saw), the NAT's mapping from "
        "those answers (endpoint-independent or symmetric: it takes two servers to tell), a "
        "TURN allocation with the config's credentials (freed at once), and a TCP (and TLS) "
        "connect to the signalling server. Exit 0 when every server answered.",
    )
    nc.add_argument("-c", "--config", type=Path, required=True, help="the node's config")
    nc.add_argument("--json", action="store_true", help="print the results as JSON")
    nc.add_argument("--timeout", type=float, default=3.0, help="seconds per server (default 3)")

    pg.add_argument("peer", metavar="PEER", help="the peer's name (as `status` lists it)")
    where = pg.add_mutually_exclusive_group()
    where.add_argument("-c", "--config", type=Path, help="the node's config (finds its socket)")
    where.add_argument("-s", "--socket", type=Path, help="the node's control socket")
    pg.add_argument("-n", "--count", type=int, default=4, help="probes to send (default 4)")
    pg.add_argument(
        "-i", "--interval", type=float, default=0.5, help="seconds between probes (default 0.5)"
    )
    pg.add_argument(
        "-W", "--wait", type=float, default=2.0, help="seconds to wait for each pong (default 2)"
    )

    ca = sub.add_parser("ca", help="overlay CA and node certificates")
    casub = ca.add_subparsers(dest="ca_command", metavar="SUBCOMMAND")
    init = casub.add_parser(
        "init",
        help="create an overlay CA (Ed25519)",
        description="Create an overlay CA: DIR/ca.key (0600) and DIR/ca.crt. The CA's name is "
        "the overlay's name; every node address must lie in NETWORK. Give --network twice, an "
        "IPv4 and an IPv6 network, for a dual-stack overlay (nodes then carry IPv6 inside, "
        "each certified for one address of each family). Refuses to overwrite.",
    )
    init.add_argument("--dir", type=Path, required=True, help="directory for ca.key and ca.crt")
    init.add_argument("--name", required=True, help="overlay name (CA common name)")
    init.add_argument(
        "--network",
        required=True,
        action="append",
        help="overlay network, e.g. 10.77.0.0/24; once per family (e.g. again fd77::/64)",
    )
    init.add_argument("--days", type=int, default=3650, help="validity (default 3650)")
    sign = casub.add_parser(
        "sign",
        help="issue (or renew) a node certificate",
        description="Issue a node certificate: the node's X25519 link key, name, overlay address "
        "and groups, signed by the CA. Writes OUT/NAME.key (0600) and OUT/NAME.crt; never "
        "overwrites a key. With --key (the node's existing key) or --public-key, no key is "
        "written and the certificate is for that key: renewing is this one command, and an "
        "OUT/NAME.crt for the same key is replaced, the old one kept as NAME.crt.old (one for "
        "another key only with --force). Refuses (unless --replace) a name or address the CA "
        "already certified to another key: CA/issued.json records what it issued. Prints the "
        "certificate's fingerprint (for revocation lists). Inspect with `ipop-trio ca show "
        "NAME.crt`.",
    )
    sign.add_argument("--ca", type=Path, required=True, help="CA directory (from `ca init`)")
    sign.add_argument("--name", required=True, help="node name")
    sign.add_argument(
        "--address",
        required=True,
        action="append",
        help="overlay address, e.g. 10.77.0.2; once per family the overlay has (e.g. again "
        "fd77::2)",
    )
    sign.add_argument("--groups", default=None, help="comma-separated groups, e.g. web,db")
    sign.add_argument("--days", type=int, default=365, help="validity (default 365)")
    sign.add_argument("--out", type=Path, required=True, help="output directory")
    given = sign.add_mutually_exclusive_group()
    given.add_argument(
        "--key",
        type=Path,
        default=None,
        metavar="FILE",
        help="re-issue for this existing node key (NAME.key): only its public half is used",
    )
    given.add_argument(
        "--public-key",
        type=Path,
        default=None,
        metavar="KEY",
        help="certify this X25519 public key: a file (PEM or DER public key, a `public_key = "
        "...` line, base64, the node's key file or its certificate) or the base64 key itself",
    )
    sign.add_argument(
        "--force",
        action="store_true",
        help="with --key/--public-key: replace OUT/NAME.crt even when it is for another key",
    )
    sign.add_argument(
        "--replace",
        action="store_true",
        help="issue it even if the CA's record (CA/issued.json) has a live certificate of "
        "another key with this name or address (revoke that one to withdraw it)",
    )
    show = casub.add_parser(
        "show",
        help="what a node or CA certificate says: name, address, groups, validity, fingerprint",
        description="Print a certificate's fields (PEM or DER; every one in a PEM bundle): name, "
        "overlay, address(es), groups, MAC, validity and days left, SHA-256 fingerprint of the "
        "DER, issuer. With --ca, also whether that CA (or bundle) accepts it now. Exit 1 when a "
        "certificate has expired or the CA refuses it.",
    )
    show.add_argument("file", type=Path, metavar="FILE", help="a certificate file")
    show.add_argument("--ca", type=Path, default=None, help="verify against this CA certificate")
    show.add_argument("--json", action="store_true", help="print JSON")

    sub.add_parser(
        "demo",
        help="three nodes behind NATs find each other through signalling and ICE, explained",
        description="Build a lab 'internet' in network namespaces with a signalling server and "
        "coturn, one node on it, one behind an endpoint-independent NAT and one behind a "
        "symmetric NAT (nftables); show the mesh forming, the path ICE chose for each pair "
        "(direct or through the TURN relay) and why, ping, a short iperf3 and the status "
        "tables, then clean everything up. Needs root.",
    )
    bench = sub.add_parser(
        "bench",
        help="measure direct link vs overlay",
        description="In one run on the namespace lab: iperf3 TCP throughput and ping RTT over "
        "the direct veth and over the overlay, and the CPU seconds per GB the nodes used; "
        "beside them, the RTT of a plain UDP echo, which tells what one trip through a "
        "user-space process costs on this machine (the floor under the overlay's RTT). "
        "Prints a table; writes JSON with --json. Needs root.",
    )
    bench.add_argument("--duration", type=float, default=5.0, help="seconds per iperf3 run")
    bench.add_argument("--json", type=Path, default=None, help="write results as JSON here")
    bench.add_argument(
        "--quick", action="store_true", help="1 s runs, one per row: a smoke test, not a result"
    )
    bench.add_argument(
        "--nat",
        action="store_true",
        help="measure link set-up time (con_req to first frame) behind each lab NAT instead",
    )
    bench.add_argument(
        "--tries", type=int, default=10, help="with --nat: link set-ups per NAT case (median)"
    )
    _register_plugins(sub)
    return p


PLUGIN_GROUP = "ipop_trio.commands"


def _register_plugins(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Commands shipped beside the package (e.g. `profile` from the top-level `profiling/`
    package) register themselves through entry points, so ipop_trio never imports them.
    Each entry point is `register(subparsers)`; it adds a parser with `func=` set."""
    from importlib.metadata import entry_points

    for ep in entry_points(group=PLUGIN_GROUP):
        try:
            register = ep.load()
        except ImportError as exc:  # a broken optional plugin must not break the CLI
            print(f"ipop-trio: command {ep.name!r} unavailable: {exc}", file=sys.stderr)
            continue
        register(sub)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if getattr(args, "func", None) is not None:
            result: int = args.func(args)
            return result
        if args.command == "run":
            return cmd_run(args)
        if args.command == "status":
            return cmd_status(args)
        if args.command == "ping":
            return cmd_ping(args)
        if args.command == "netcheck":
            return cmd_netcheck(args)
        if args.command == "signal":
            return cmd_signal(args)
        if args.command == "ca":
            if args.ca_command == "init":
                return cmd_ca_init(args)
            if args.ca_command == "sign":
                return cmd_ca_sign(args)
            if args.ca_command == "show":
                return cmd_ca_show(args)
            parser.parse_args(["ca", "--help"])
        if args.command == "demo":
            from .lab.demo import run_demo

            return run_demo()
        if args.command == "bench":
            if args.nat:
                from .lab.natbench import run_nat_bench

                return run_nat_bench(tries=args.tries, json_path=args.json)
            from .lab.bench import run_bench

            return run_bench(duration=args.duration, json_path=args.json, quick=args.quick)
        parser.print_help()
        return 2
    except ConfigError as exc:
        for line in str(exc).splitlines():  # ConfigErrors: every problem, one per line
            print(f"ipop-trio: config error: {line}", file=sys.stderr)
        return 2
    except IpopError as exc:
        print(f"ipop-trio: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def cmd_run(args: argparse.Namespace) -> int:
    import trio

    from . import config
    from .node import prepare, run_node

    cfg = config.load(args.config)
    setup = prepare(cfg)  # every config/PKI problem surfaces here, before the system is touched
    if args.check:
        print(f"{args.config}: ok (node {setup.identity.name}, {len(cfg.peers)} peers)")
        return 0
    logs.setup(cfg.log_level, cfg.log_format)

    log = logging.getLogger("ipop_trio")

    async def main_task() -> None:
        async with trio.open_nursery() as nursery:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as sigs:
                node = await nursery.start(run_node, setup)
                async for signum in sigs:
                    if signum == signal.SIGHUP:
                        _reload(node, args.config, log)
                        continue
                    log.info("%s: shutting down", signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    break

    try:
        trio.run(main_task)
    except BaseExceptionGroup as group:
        # A user's mistake (no TAP without root or CAP_NET_ADMIN, a taken port) arrives wrapped
        # in the nurseries' groups: main() prints it as one line. Raising it from inside an
        # `except*` would wrap it in a new group (a traceback); only a group of nothing but
        # IpopErrors is unwrapped here, anything else stays a bug report.
        mistakes, rest = group.split(IpopError)
        if mistakes is None or rest is not None:
            raise
        raise _first_leaf(mistakes) from None
    return 0


def _reload(node: Any, path: Path, log: logging.Logger) -> None:
    """SIGHUP: re-read the config and certificate; a broken one is logged, never fatal."""
    from . import config
    from .node import prepare

    try:
        new = prepare(config.load(path))
    except IpopError as exc:
        problems = "; ".join(str(exc).splitlines())  # ConfigErrors: all, on one log line
        log.error("SIGHUP: keeping the running configuration: %s", problems)
        return
    rekeyed = node.reload(new)
    fw = new.config.firewall
    log.info(
        "SIGHUP: reloaded %s (policy %s, groups %s, %d revoked, firewall %s); %d link(s) re-keyed",
        path,
        new.policy.value,
        ", ".join(sorted(new.groups)) or "none",
        len(new.revoked),
        "off" if fw is None else f"{len(fw.inbound)} in / {len(fw.outbound)} out rules",
        rekeyed,
    )


def cmd_signal(args: argparse.Namespace) -> int:
    import ssl

    import trio

    from . import config, pki
    from .signalling.server import SignallingServer, raise_fd_limit

    listen = config.parse_endpoint("--listen", args.listen)
    metrics = None if args.metrics is None else config.parse_endpoint("--metrics", args.metrics)
    anchors = signal_anchors(args.ca)
    ssl_context = None
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ConfigError("--tls-cert", "give both --tls-cert and --tls-key, or neither")
    if args.tls_cert is not None:
        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            ssl_context.load_cert_chain(args.tls_cert, args.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError("--tls-cert", f"cannot load the TLS certificate/key: {exc}") from None
    revoked = pki.revoked_setting(args.revoked, "--revoked")
    logs.setup(args.log_level, args.log_format)
    limits = signal_limits(args)
    raise_fd_limit()
    server = SignallingServer(anchors, limits, revoked=revoked)
    log = logging.getLogger("ipop_trio")

    async def main_task() -> None:
        metrics_listeners = [] if metrics is None else await _signal_metrics_listeners(metrics)
        async with trio.open_nursery() as nursery:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
                if metrics is not None:
                    from .metrics import signal_page
                    from .net.httpd import serve_http

                    pages = {"/metrics": signal_page(server.core.stats)}
                    await nursery.start(serve_http, metrics_listeners, pages)
                    port = metrics_listeners[0].socket.getsockname()[1]
                    where = config.endpoint_text(metrics.host, port)
                    print(f"ipop-trio signal: metrics on http://{where}/metrics", flush=True)
                await nursery.start(
                    partial(server.serve, listen.host, listen.port, ssl_context=ssl_context)
                )
                bound = config.endpoint_text(listen.host, server.port or listen.port)
                print(f"ipop-trio signal: listening on {bound}", flush=True)
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        _reload_anchors(server, args.ca, log)
                        _reload_revoked(server, args.revoked, log)
                        continue
                    log.info("%s: shutting down", signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    break

    try:
        trio.run(main_task)
    except* OSError as group:  # the address is taken or not ours: the operator's to fix
        raise ConfigError("--listen", str(_first_leaf(group))) from None
    return 0


def _reload_anchors(server: Any, paths: list[Path], log: logging.Logger) -> None:
    """`signal`'s SIGHUP: re-read the --ca files (a CA added or removed in a rotation) and
    drop the members the CAs trusted now refuse; a broken file keeps the CAs in force."""
    try:
        anchors = signal_anchors(paths)
    except IpopError as exc:  # a file unreadable or mixing networks
        log.error("SIGHUP: keeping the CAs in force: %s", exc)
        return
    dropped = server.set_anchors(anchors)
    overlays = ", ".join(
        f"{a.name} ({len(a.cas)} CA{'s' if len(a.cas) > 1 else ''})" for a in anchors
    )
    log.info("SIGHUP: CAs re-read: %s; dropped %s", overlays, ", ".join(dropped) or "no member")


def _reload_revoked(server: Any, path: Path | None, log: logging.Logger) -> None:
    """`signal`'s SIGHUP: re-read --revoked, drop the members it now names; a broken file
    keeps the list in force (logged, never fatal)."""
    from . import pki
    from .errors import PkiError

    if path is None:
        log.info("SIGHUP: nothing to reload (no --revoked)")
        return
    try:
        new = pki.load_revoked(path)
    except PkiError as exc:
        log.error("SIGHUP: keeping the revocation list in force: %s", exc)
        return
    old = server.core.revoked
    dropped = server.set_revoked(new)
    log.info(
        "SIGHUP: reloaded %s: %d revoked (%d added, %d removed); dropped %s",
        path,
        len(new),
        len(new - old),
        len(old - new),
        ", ".join(dropped) or "no member",
    )


def signal_anchors(paths: list[Path]) -> list[Any]:
    """`signal --ca`'s files as one trust anchor per overlay: CAs naming one overlay are
    trusted together (a rotation), and must agree on its network."""
    from . import pki
    from .errors import PkiError
    from .proto.cert import TrustAnchor, networks_text

    by_overlay: dict[str, list[Any]] = {}
    for i, path in enumerate(paths):
        try:
            anchor = pki.load_trust_anchor(path)
        except PkiError as exc:
            raise ConfigError(f"--ca[{i}]", str(exc)) from None
        known = by_overlay.setdefault(anchor.name, [])
        if known and known[0].networks != anchor.networks:
            raise ConfigError(
                f"--ca[{i}]",
                f"{path}: overlay {anchor.name!r} with network {networks_text(anchor.networks)}, "
                f"but another --ca gives it {networks_text(known[0].networks)}: one overlay's "
                "CAs must agree on its networks",
            )
        known.append(anchor)
    return [TrustAnchor.bundle(group) for group in by_overlay.values()]


async def _signal_metrics_listeners(where: Any) -> list[Any]:
    """`signal --metrics`'s socket, bound before the server starts: a taken port is one
    line naming the option (exit 2), not the --listen error."""
    from .net.httpd import open_listeners

    try:
        return await open_listeners(where.host, where.port)
    except OSError as exc:
        why = exc.strerror or str(exc)
        raise ConfigError("--metrics", f"cannot listen on {where}: {why}") from None


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def cmd_status(args: argparse.Namespace) -> int:
    from .net.control import query

    path, expect = _locate(args)
    try:
        reply = query(path)
    except OSError as exc:
        raise _not_answering(path, exc) from None
    _check_node(reply, expect, path, args.config)
    if args.json:
        print(json.dumps(reply, indent=2))
    else:
        from .status import format_status

        print(format_status(reply))
    return 0


def cmd_ping(args: argparse.Namespace) -> int:
    import time

    from .net.control import query

    if args.count < 1 or args.interval < 0 or not 0 < args.wait <= 30:
        raise ConfigError("ping", "--count ≥ 1, --interval ≥ 0 and 0 < --wait ≤ 30, please")
    path, expect = _locate(args)
    rtts: list[float] = []
    for i in range(args.count):
        if i:
            time.sleep(args.interval)
        try:
            reply = query(path, "ping", timeout=args.wait + 5, peer=args.peer, wait=args.wait)
        except OSError as exc:
            raise _not_answering(path, exc) from None
        if "error" in reply:
            print(f"ipop-trio: {reply['error']}", file=sys.stderr)
            return 1
        if i == 0:
            _check_node(query(path), expect, path, args.config)
        print(format_pong(reply), flush=True)
        if reply.get("rtt_ms") is not None:
            rtts.append(float(reply["rtt_ms"]))
    summary = f"--- {args.peer}: {args.count} probes, {len(rtts)} pongs"
    if rtts:
        low, mean, high = min(rtts), sum(rtts) / len(rtts), max(rtts)
        summary += f", rtt min/avg/max {low:.3f}/{mean:.3f}/{high:.3f} ms"
    print(summary)
    return 0 if rtts else 1


def cmd_netcheck(args: argparse.Namespace) -> int:
    from . import config
    from .netcheck import netcheck

    if not 0 < args.timeout <= 60:
        raise ConfigError("--timeout", "must be in (0, 60] seconds")
    cfg = config.load(args.config)
    if not cfg.ice.stun and not cfg.ice.turn and cfg.signalling is None:
        raise ConfigError(
            "ice", "no STUN, TURN or signalling server in the config: nothing to check"
        )
    report = netcheck(cfg, timeout=args.timeout)
    print(json.dumps(report.as_json(), indent=2) if args.json else "\n".join(report.lines()))
    return 0 if report.ok else 1


def format_pong(reply: dict[str, Any]) -> str:
    """One line per probe, as `tailscale ping` prints: who, by which path, how long. A relay
    is ours (we send through our TURN allocation) or the peer's (we send to its relayed
    address); anything else is direct."""
    who = f"{reply['peer']} ({reply.get('address') or '?'})"
    path = reply.get("path")
    if reply.get("via"):
        route = f"{reply['via']} (ours)"
    elif path and path["remote"].endswith("(relay)"):
        route = f"relay {reply.get('endpoint')} (the peer's)"
    else:
        route = f"{reply.get('endpoint') or '?'} (direct)"
    pair = "" if not path else f", ICE {path['type']} pair {path['local']} → {path['remote']}"
    if reply.get("rtt_ms") is None:
        return f"no pong from {who} via {route}{pair} within {reply.get('timeout')} s"
    return f"pong from {who} via {route}{pair} in {reply['rtt_ms']:.3f} ms"


def _locate(args: argparse.Namespace) -> tuple[Path, str | None]:
    """The control socket of the node -s or -c names, else of the one node of this network
    namespace; and the node name the config's certificate claims (None: not checked)."""
    from .config import RUN_DIR
    from .net.control import local_nodes

    if args.socket is not None:
        return args.socket, None
    if args.config is not None:
        return _control_of(args.config)
    found, denied = local_nodes(RUN_DIR)
    if len(found) == 1:
        return found[0][0], None
    if found:
        lines = [f"  {reply['node']['name']:<16} -s {path}" for path, reply in found]
        raise IpopError(
            f"{len(found)} nodes run in this network namespace; choose one:\n" + "\n".join(lines)
        )
    if denied:
        raise IpopError(f"permission denied on {denied[0]} (run as root)")
    raise IpopError(
        f"no node answers in {RUN_DIR} for this network namespace; give -c CONFIG "
        "(a node with its own node.control) or -s SOCKET"
    )


def _not_answering(path: Path, exc: OSError) -> IpopError:
    if isinstance(exc, PermissionError):
        return IpopError(f"permission denied on {path} (run as root)")
    return IpopError(f"no node is listening on {path} (is it running?)")


def _check_node(reply: dict[str, Any], expect: str | None, path: Path, config: Path) -> None:
    node = reply.get("node")
    name = node.get("name") if isinstance(node, dict) else None
    if expect is not None and name != expect:
        raise IpopError(
            f"{path} is node {name}'s, not {expect}'s (from {config}): is {expect} running "
            "in another network namespace? Run this there, or give -s"
        )


def _control_of(path: Path) -> tuple[Path, str | None]:
    """The control socket a config names, and the node name its certificate claims. A config
    with errors still says where its socket is (the node may be running an older, good one):
    only [node] control and [tap] name are needed, and the errors are shown."""
    import tomllib

    from . import config, pki
    from .proto.cert import certified_name

    try:
        cfg = config.load(path)
    except ConfigError as exc:
        try:
            data = tomllib.loads(path.read_text())
            raw = data.get("node", {}).get("control")
            tap = data.get("tap", {}).get("name", "ipop0")
        except (OSError, ValueError, AttributeError):
            raise exc from None
        if not isinstance(raw, str | None) or not isinstance(tap, str):
            raise
        where = config.default_control(tap) if raw is None else path.parent / raw
        for line in str(exc).splitlines():
            print(f"ipop-trio: warning: {path}: {line}", file=sys.stderr)
        return where, None
    try:
        name = certified_name(pki.load_certificate_der(cfg.cert))
    except IpopError:
        name = None
    return cfg.control_path(), cfg.name or name


# ---------------------------------------------------------------------------------------------
# `ipop-trio ca init | sign` (pki.py does the work; a PkiError is an IpopError: main prints it)


def parse_groups(text: str | None) -> list[str]:
    """`--groups a,b` as a list; blanks around names and empty items are ignored."""
    if not text:
        return []
    return [part.strip() for part in text.split(",") if part.strip()]


def cmd_ca_init(args: argparse.Namespace) -> int:
    """`ipop-trio ca init`: args.dir, args.name, args.network (one or a list: one per
    family), args.days (default 3650)."""
    from . import pki
    from .proto.cert import networks_text

    days = getattr(args, "days", None)
    days = pki.DEFAULT_CA_DAYS if days is None else days
    key_path, cert_path = pki.init_ca(Path(args.dir), args.name, args.network, days)
    anchor = pki.load_trust_anchor(cert_path)
    print(f"wrote CA key         {key_path} (mode 0600: keep it secret, keep it offline)")
    print(f"wrote CA certificate {cert_path}")
    nets = networks_text(anchor.networks)
    print(f"overlay {anchor.name}, network {nets}, expires {_day(anchor.not_after)}")
    return 0


def cmd_ca_sign(args: argparse.Namespace) -> int:
    """`ipop-trio ca sign`: args.ca (dir), args.name, args.address, args.groups (comma-separated
    or None), args.days (default 365), args.out (dir), args.public_key (path or None)."""
    from . import pki
    from .proto.cert import encode_key, format_mac

    days = getattr(args, "days", None)
    days = pki.DEFAULT_NODE_DAYS if days is None else days
    out = getattr(args, "out", None) or "."
    public_key_file = getattr(args, "public_key", None)
    key_file = getattr(args, "key", None)
    signed = pki.sign_node_files(
        Path(args.ca),
        args.name,
        args.address,
        parse_groups(getattr(args, "groups", None)),
        days,
        Path(out),
        None if public_key_file is None else Path(public_key_file),
        replace=bool(getattr(args, "replace", False)),
        key_file=None if key_file is None else Path(key_file),
        force=bool(getattr(args, "force", False)),
    )
    identity = signed.identity
    if signed.key_path is not None:
        print(f"wrote node key         {signed.key_path} (mode 0600)")
    print(f"wrote node certificate {signed.cert_path}")
    if signed.old_cert_path is not None:
        print(
            f"kept the old one as    {signed.old_cert_path} (send the node SIGHUP to use the new)"
        )
    print(f"node       {identity.name} in overlay {identity.overlay}")
    print(f"address    {', '.join(map(str, identity.interfaces))}")
    print(f"mac        {format_mac(identity.mac)}")
    print(f"groups     {', '.join(sorted(identity.groups)) or '(none)'}")
    print(f"expires    {_day(identity.not_after)}")
    print(f"sha256     {pki.fingerprint(identity.der)} (recorded in {args.ca}/{pki.ISSUED_FILE})")
    print(f'public_key = "{encode_key(identity.public_key)}"')
    for old in signed.replaced:
        print(
            f"replaces   {old.name} ({', '.join(old.addresses)}) sha256 {old.fingerprint}: "
            "it stays valid until it expires; add that fingerprint to the revoked lists to "
            "withdraw it now"
        )
    return 0


def cmd_ca_show(args: argparse.Namespace) -> int:
    """`ipop-trio ca show FILE [--ca CA] [--json]`."""
    import time

    from . import pki
    from .errors import CertificateRefused

    now = time.time()
    anchor = None if args.ca is None else pki.load_trust_anchor(args.ca)
    shown, ok = [], True
    for der in pki.load_certificates_der(args.file):
        info = pki.describe_certificate(der)
        entry = info.as_json(now)
        ok = ok and not entry["expired"]
        if anchor is not None:
            if info.kind == "ca":
                trusted = any(ca.der == der for ca in anchor.cas)
                entry["verified"] = trusted
                entry["refused"] = None if trusted else "not one of the CAs given with --ca"
            else:
                try:
                    anchor.verify_untrusted(der, now)
                    entry["verified"], entry["refused"] = True, None
                except CertificateRefused as exc:
                    entry["verified"], entry["refused"] = False, str(exc)
            ok = ok and bool(entry["verified"])
        shown.append(entry)
    if args.json:
        print(json.dumps(shown[0] if len(shown) == 1 else shown, indent=2))
    else:
        print("\n\n".join("\n".join(format_certificate(e)) for e in shown))
    return 0 if ok else 1


def format_certificate(entry: dict[str, Any]) -> list[str]:
    """`ca show`'s lines for one certificate (`CertificateInfo.as_json`)."""
    days = float(entry["days_left"])
    left = f"expired {-days:.0f} days ago" if entry["expired"] else f"{days:.0f} days left"
    if entry["kind"] == "ca":
        lines = [
            f"overlay CA {entry['name']}",
            f"network    {', '.join(entry['addresses']) or '(none)'}",
        ]
    else:
        lines = [
            f"node       {entry['name']} in overlay {entry['overlay']}",
            f"address    {', '.join(entry['addresses']) or '(none)'}",
            f"groups     {', '.join(entry['groups']) or '(none)'}",
            f"mac        {entry['mac'] or '(not an X25519 key)'}",
        ]
    lines += [
        f"valid      {_day(entry['not_before'])} to {_day(entry['not_after'])} ({left})",
        f"sha256     {entry['fingerprint']}",
        f"issuer     {entry['issuer']}",
        f"serial     {entry['serial']}",
    ]
    if "verified" in entry:
        lines.append("verified   yes" if entry["verified"] else f"REFUSED    {entry['refused']}")
    if entry.get("public_key"):
        lines.append(f'public_key = "{entry["public_key"]}"')
    return lines


def _day(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, tz=datetime.UTC).strftime(
        "%Y-%m-%d %H:%M UTC"
    )


if __name__ == "__main__":
    sys.exit(main())
