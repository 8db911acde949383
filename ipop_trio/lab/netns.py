"""Throwaway network topologies in namespaces, for the demo, the bench and the lab tests.

A `Lab` owns everything it makes: network namespaces (one per host), veth pairs, the
processes it starts inside them, a temporary directory and a small registry file naming its
owner. Every namespace and interface name carries the lab's id (prefix + 4 random hex digits,
e.g. ``ipt3f9a-alpha``, ``ipt3f9a-0a``), so parallel labs never collide and leftovers of a
killed lab can be found by `cleanup_stale`. Teardown (`Lab.close`, run by ``with Lab()``)
stops processes (SIGTERM, then SIGKILL), kills anything else still inside the lab's
namespaces, deletes veths and namespaces, and checks that they are gone.

This module must never touch a namespace or interface whose name does not carry a lab id,
never install a signal handler on its own (CLI entry points wrap their work in
`sigterm_raises`), and never send traffic outside the namespaces it made.

Topology: hosts and point-to-point veth links addressed from 10.199.0.0/16; switches
(``add_switch``: a bridge in its own namespace, e.g. the "internet", 10.199.(255 - n).0/24 unless
given a subnet) that hosts join with ``attach``. NAT routers, hosts behind them and coturn are
built on this module's public API by `ipop_trio.lab.nat` (``nat.add_nat(lab, ...)``,
``nat.add_host_behind(lab, ...)``, ``nat.add_turn(lab, ...)``), so teardown needs nothing new;
this module never imports it. ``Host.udp_socket`` gives the lab's own process a socket inside a
host's namespace (for STUN/TURN probes without helper processes).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from pyroute2 import IPRoute, netns

from ipop_trio.errors import LabError

# Underlay addresses: link n gets 10.199.n.0/24 (first end .1, second end .2).
LAB_NETWORK = ipaddress.IPv4Network("10.199.0.0/16")
LINK_PREFIXLEN = 24
UNDERLAY_MTU = 1500
# Owner records of live labs: cleanup_stale spares a lab whose owner process still runs.
REGISTRY_DIR = Path("/run/ipop-trio-lab")
# SIGTERM → SIGKILL grace for processes the lab started.
TERM_TIMEOUT = 5.0
# How long teardown waits for stray processes to leave a namespace after SIGKILL.
KILL_TIMEOUT = 5.0
POLL_INTERVAL = 0.05
IFNAMSIZ = 15

_PREFIX = re.compile(r"[a-z][a-z0-9]{0,7}")
_HOST_NAME = re.compile(r"[A-Za-z0-9._-]{1,40}")
_HEX4 = "[0-9a-f]{4}"


def _lab_pattern(prefix: str) -> re.Pattern[str]:
    """Names made by labs with this prefix: ``<prefix><4 hex>-...``; group 1 is the lab id."""
    return re.compile(rf"^({re.escape(prefix)}{_HEX4})-")


@contextlib.contextmanager
def _iproute(ns: str | None) -> Iterator[IPRoute]:
    """An IPRoute socket opened inside namespace `ns` (None: ours).

    The socket is created after setns() on this thread and the thread goes straight back, so no
    process is forked (pyroute2's `IPRoute(netns=...)` forks a helper) and nothing else moves."""
    if ns is None:
        ipr = IPRoute()
    else:
        netns.pushns(ns)
        try:
            ipr = IPRoute()
        finally:
            netns.popns()
    with ipr:
        yield ipr


def _proc_start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (start time in clock ticks): tells a pid from its reuse."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(text.rsplit(")", 1)[1].split()[19])


def _pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _pids_in(namespaces: Iterable[str]) -> dict[str, list[int]]:
    wanted = set(namespaces)
    return {ns: pids for ns, pids in netns.ns_pids().items() if ns in wanted and pids}


def _evict(namespaces: Sequence[str], errors: list[str]) -> None:
    """Kill every process still inside `namespaces` (SIGTERM, short grace, SIGKILL)."""
    for sig, grace in ((signal.SIGTERM, 1.0), (signal.SIGKILL, KILL_TIMEOUT)):
        left = _pids_in(namespaces)
        if not left:
            return
        for pids in left.values():
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while _pids_in(namespaces) and time.monotonic() < deadline:
            time.sleep(POLL_INTERVAL)
    left = _pids_in(namespaces)
    if left:
        errors.append(f"processes still inside namespaces after SIGKILL: {left}")


def _remove_namespaces(namespaces: Sequence[str], errors: list[str]) -> None:
    present = set(netns.listnetns())
    for ns in namespaces:
        if ns in present:
            try:
                netns.remove(ns)
            except OSError as exc:
                errors.append(f"cannot remove namespace {ns}: {exc}")
    still = set(netns.listnetns()) & set(namespaces)
    if still:
        errors.append(f"namespaces still present: {sorted(still)}")


def _root_links_matching(pattern: re.Pattern[str]) -> list[tuple[int, str]]:
    with _iproute(None) as ipr:
        found = []
        for link in ipr.get_links():
            name = link.get("ifname")
            if name and pattern.match(name):
                found.append((link["index"], name))
        return found


def _delete_root_links(pattern: re.Pattern[str], errors: list[str]) -> list[str]:
    """Delete interfaces in our own namespace whose names match (a veth caught half-made)."""
    removed = []
    with _iproute(None) as ipr:
        for index, name in _root_links_matching(pattern):
            try:
                ipr.link("del", index=index)
                removed.append(name)
            except Exception as exc:  # a NetlinkError; a vanished link is fine
                if ipr.link_lookup(ifname=name):
                    errors.append(f"cannot delete {name}: {exc}")
    return removed


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM while tearing down, then deliver them: a second Ctrl-C must not
    leave half a lab behind. Only possible on the main thread; elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []

    def record(signum: int, _frame: FrameType | None) -> None:
        caught.append(signum)

    old = {s: signal.signal(s, record) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        for signum in dict.fromkeys(caught):
            signal.raise_signal(signum)


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """For CLI entry points (demo, bench, tests' helper processes): turn SIGTERM into
    ``SystemExit(143)`` so ``with Lab()`` blocks tear down. Later SIGTERMs are ignored so they
    cannot interrupt the teardown. Restores the previous handler on exit."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: FrameType | None) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


# ---------------------------------------------------------------------------------------------
# Topology


@dataclass(frozen=True, slots=True)
class Iface:
    """One end of a link: an interface in a host's namespace, with its lab-assigned address."""

    host: Host
    ifname: str
    address: ipaddress.IPv4Interface


@dataclass(frozen=True, slots=True)
class Link:
    """A veth pair between two hosts, on its own subnet."""

    index: int
    subnet: ipaddress.IPv4Network
    ends: tuple[Iface, Iface]
    mtu: int

    def end(self, host: Host) -> Iface:
        for end in self.ends:
            if end.host is host:
                return end
        raise LabError(f"host {host.name} is not on link {self.index}")

    def other(self, host: Host) -> Iface:
        a, b = self.ends
        return b if self.end(host) is a else a


class LabSwitch:
    """An Ethernet segment: a bridge in its own namespace; hosts join it with `Lab.attach`,
    each getting the next address of the switch's subnet."""

    BRIDGE = "br0"

    def __init__(self, index: int, host: Host, subnet: ipaddress.IPv4Network) -> None:
        self.index = index
        self.host = host  # the namespace holding the bridge
        self.subnet = subnet
        self.ports: list[Iface] = []
        self._addresses = subnet.hosts()

    def __repr__(self) -> str:
        return f"LabSwitch({self.host.name!r}, {self.subnet})"


class Host:
    """A network namespace in a lab. Processes run in it through ``ip netns exec``."""

    def __init__(self, lab: Lab, name: str, ns: str) -> None:
        self.lab = lab
        self.name = name
        self.ns = ns
        self.ifaces: list[Iface] = []

    def __repr__(self) -> str:
        return f"Host({self.name!r}, ns={self.ns!r})"

    def argv(self, argv: Sequence[str]) -> list[str]:
        """The command line that runs `argv` in this host's namespace."""
        return ["ip", "netns", "exec", self.ns, *argv]

    def run(self, argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[Any]:
        """`subprocess.run` inside the namespace (same keyword arguments)."""
        return subprocess.run(self.argv(argv), **kw)

    def check(self, argv: Sequence[str], timeout: float = 60.0) -> str:
        """Run `argv`, return its stdout; LabError (with the output) if it fails."""
        try:
            done = self.run(argv, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise LabError(f"{self.name}: {' '.join(argv)} timed out after {timeout}s") from exc
        if done.returncode != 0:
            raise LabError(
                f"{self.name}: {' '.join(argv)} exited {done.returncode}\n"
                f"{done.stdout}{done.stderr}"
            )
        return str(done.stdout)

    def popen(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """`subprocess.Popen` inside the namespace; the lab stops it at teardown.

        The process gets its own process group (unless told otherwise), so a terminal's
        Ctrl-C reaches only the lab process, which then tears down in order."""
        self.lab._check_open()
        if "start_new_session" not in kw and "process_group" not in kw:
            kw["process_group"] = 0
        return self.lab._track(subprocess.Popen(self.argv(argv), **kw))

    def address_on(self, link: Link) -> str:
        """This host's underlay address on `link` (no prefix length)."""
        return str(link.end(self).address.ip)

    @property
    def address(self) -> str:
        """This host's first underlay address."""
        if not self.ifaces:
            raise LabError(f"host {self.name} has no links yet")
        return str(self.ifaces[0].address.ip)

    def link_names(self) -> list[str]:
        """Names of the interfaces currently in this namespace (as the kernel sees them)."""
        with _iproute(self.ns) as ipr:
            return [str(link.get("ifname")) for link in ipr.get_links()]

    def pids(self) -> list[int]:
        """Processes currently inside this namespace."""
        return _pids_in([self.ns]).get(self.ns, [])

    def udp_socket(self, bind: tuple[str, int] = ("0.0.0.0", 0)) -> socket.socket:
        """A bound IPv4 UDP socket that lives in this host's namespace, for the lab's own
        process to talk from inside the lab (STUN / TURN probes) without a helper process.

        Made like `_iproute`'s socket: created after setns() on this thread, which goes
        straight back; a socket keeps the namespace it was made in. The caller closes it."""
        self.lab._check_open()
        netns.pushns(self.ns)
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        finally:
            netns.popns()
        try:
            sock.bind(bind)
        except OSError as exc:
            sock.close()
            raise LabError(f"{self.name}: cannot bind a UDP socket to {bind}: {exc}") from exc
        return sock

    def add_route(self, destination: str, via: str) -> None:
        """Route `destination` (CIDR or "default") through `via` (for routers, later NATs)."""
        dst = "0.0.0.0/0" if destination == "default" else destination
        with _iproute(self.ns) as ipr:
            ipr.route("add", dst=dst, gateway=via)


class Lab:
    """A throwaway topology. Use as a context manager; everything goes on exit."""

    def __init__(self, prefix: str = "ipt", *, keep_workdir: bool | None = None) -> None:
        if not _PREFIX.fullmatch(prefix):
            raise LabError(f"lab prefix {prefix!r} must match {_PREFIX.pattern}")
        if os.geteuid() != 0:
            raise LabError("the lab needs root (network namespaces, veth, TAP)")
        self.prefix = prefix
        self.keep_workdir = (
            os.environ.get("IPOP_LAB_KEEP") == "1" if keep_workdir is None else keep_workdir
        )
        self.hosts: dict[str, Host] = {}
        self.links: list[Link] = []
        self.switches: list[LabSwitch] = []
        self._namespaces: list[str] = []  # registered before creation: teardown covers halves
        self._veths: list[tuple[str, str]] = []  # (namespace, ifname) of each pair's first end
        self._procs: list[subprocess.Popen[Any]] = []
        self._closed = False
        self.id, self._registry = self._claim_id()
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{self.id}-"))
        self._registry.write_text(
            json.dumps(
                {
                    "id": self.id,
                    "pid": os.getpid(),
                    "start_time": _proc_start_time(os.getpid()),
                    "workdir": str(self.workdir),
                }
            )
        )

    def _claim_id(self) -> tuple[str, Path]:
        REGISTRY_DIR.mkdir(parents=True, exist_ok=True)
        pattern = _lab_pattern(self.prefix)
        for _ in range(64):
            lab_id = f"{self.prefix}{secrets.token_hex(2)}"
            if any((m := pattern.match(ns)) and m.group(1) == lab_id for ns in netns.listnetns()):
                continue
            path = REGISTRY_DIR / f"{lab_id}.json"
            try:
                os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            except FileExistsError:
                continue
            return lab_id, path
        raise LabError(f"no free lab id with prefix {self.prefix!r}; run cleanup_stale()")

    def __repr__(self) -> str:
        return f"Lab({self.id!r}, hosts={list(self.hosts)})"

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        try:
            self.close()
        except LabError as teardown:
            if exc is None:
                raise
            exc.add_note(f"and the lab teardown failed too: {teardown}")

    # -- building ---------------------------------------------------------------------------

    def add_host(self, name: str) -> Host:
        """A new host: a namespace named ``<lab id>-<name>`` with ``lo`` up."""
        self._check_open()
        if not _HOST_NAME.fullmatch(name):
            raise LabError(f"host name {name!r} must match {_HOST_NAME.pattern}")
        if name in self.hosts:
            raise LabError(f"host {name!r} exists in lab {self.id}")
        ns = f"{self.id}-{name}"
        self._namespaces.append(ns)
        try:
            netns.create(ns)
            with _iproute(ns) as ipr:
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        except Exception as exc:
            raise LabError(f"cannot create namespace {ns}: {exc}") from exc
        host = Host(self, name, ns)
        self.hosts[name] = host
        return host

    def connect(
        self, a: Host, b: Host, subnet: str | None = None, *, mtu: int = UNDERLAY_MTU
    ) -> Link:
        """A veth pair between `a` and `b`, up, with `mtu`; `a` gets the subnet's first host
        address, `b` the second. Without `subnet` the lab picks the next 10.199.N.0/24."""
        self._check_open()
        for host in (a, b):
            if self.hosts.get(host.name) is not host:
                raise LabError(f"{host!r} is not a host of lab {self.id}")
        index = len(self.links)
        if subnet is None:
            if index > 255:
                raise LabError("the lab allocates at most 256 links")
            net = ipaddress.IPv4Network(f"10.199.{index}.0/{LINK_PREFIXLEN}")
        else:
            net = ipaddress.IPv4Network(subnet)
            if net.num_addresses < 4:
                raise LabError(f"subnet {subnet} has no room for two hosts")
        hosts = iter(net.hosts())
        addrs = [ipaddress.IPv4Interface(f"{next(hosts)}/{net.prefixlen}") for _ in range(2)]
        names = [f"{self.id}-{index}a", f"{self.id}-{index}b"]
        if any(len(n) > IFNAMSIZ for n in names):
            raise LabError(f"interface name {names[0]} is longer than {IFNAMSIZ}")
        self._veths.append((a.ns, names[0]))
        try:
            with _iproute(a.ns) as ipr:
                ipr.link(
                    "add",
                    ifname=names[0],
                    kind="veth",
                    peer={"ifname": names[1], "net_ns_fd": b.ns},
                )
            for host, name, addr in zip((a, b), names, addrs, strict=True):
                with _iproute(host.ns) as ipr:
                    idx = ipr.link_lookup(ifname=name)[0]
                    ipr.link("set", index=idx, mtu=mtu)
                    ipr.addr(
                        "add", index=idx, address=str(addr.ip), prefixlen=addr.network.prefixlen
                    )
                    ipr.link("set", index=idx, state="up")
        except Exception as exc:
            raise LabError(f"cannot connect {a.name} and {b.name}: {exc}") from exc
        link = Link(
            index,
            net,
            (Iface(a, names[0], addrs[0]), Iface(b, names[1], addrs[1])),
            mtu,
        )
        a.ifaces.append(link.ends[0])
        b.ifaces.append(link.ends[1])
        self.links.append(link)
        return link

    def add_switch(
        self, name: str, *, mtu: int = UNDERLAY_MTU, subnet: str | None = None
    ) -> LabSwitch:
        """A bridge in a new namespace `name`, on subnet 10.199.(255 - n).0/24 unless given
        another /24 (a NAT's private LAN)."""
        index = len(self.switches)
        if index > 31:
            raise LabError("the lab allocates at most 32 switches")
        if subnet is None:
            net = ipaddress.IPv4Network(f"10.199.{255 - index}.0/{LINK_PREFIXLEN}")
        else:
            net = ipaddress.IPv4Network(subnet)
            if net.prefixlen != LINK_PREFIXLEN:
                raise LabError(f"switch subnet {subnet} must be a /{LINK_PREFIXLEN}")
        host = self.add_host(name)
        try:
            with _iproute(host.ns) as ipr:
                ipr.link("add", ifname=LabSwitch.BRIDGE, kind="bridge")
                idx = ipr.link_lookup(ifname=LabSwitch.BRIDGE)[0]
                ipr.link("set", index=idx, mtu=mtu, state="up")
        except Exception as exc:
            raise LabError(f"cannot create the bridge of switch {name}: {exc}") from exc
        switch = LabSwitch(index, host, net)
        self.switches.append(switch)
        return switch

    def attach(self, host: Host, switch: LabSwitch, *, mtu: int = UNDERLAY_MTU) -> Iface:
        """Plug `host` into `switch` with a veth; the host end gets the next address."""
        self._check_open()
        n = len(switch.ports)
        sw_end, host_end = f"{self.id}-s{switch.index}p{n}", f"{self.id}-s{switch.index}h{n}"
        if len(sw_end) > IFNAMSIZ:
            raise LabError(f"interface name {sw_end} is longer than {IFNAMSIZ}")
        try:
            address = ipaddress.IPv4Interface(f"{next(switch._addresses)}/{LINK_PREFIXLEN}")
        except StopIteration:
            raise LabError(f"switch {switch.host.name} is full") from None
        self._veths.append((switch.host.ns, sw_end))
        try:
            with _iproute(switch.host.ns) as ipr:
                ipr.link(
                    "add",
                    ifname=sw_end,
                    kind="veth",
                    peer={"ifname": host_end, "net_ns_fd": host.ns},
                )
                idx = ipr.link_lookup(ifname=sw_end)[0]
                bridge = ipr.link_lookup(ifname=LabSwitch.BRIDGE)[0]
                ipr.link("set", index=idx, mtu=mtu, master=bridge, state="up")
            with _iproute(host.ns) as ipr:
                idx = ipr.link_lookup(ifname=host_end)[0]
                ipr.link("set", index=idx, mtu=mtu)
                ipr.addr("add", index=idx, address=str(address.ip), prefixlen=LINK_PREFIXLEN)
                ipr.link("set", index=idx, state="up")
        except Exception as exc:
            raise LabError(f"cannot attach {host.name} to {switch.host.name}: {exc}") from exc
        iface = Iface(host, host_end, address)
        host.ifaces.append(iface)
        switch.ports.append(iface)
        return iface

    def _track(self, proc: subprocess.Popen[Any]) -> subprocess.Popen[Any]:
        self._procs.append(proc)
        return proc

    def _check_open(self) -> None:
        if self._closed:
            raise LabError(f"lab {self.id} is closed")

    # -- teardown ---------------------------------------------------------------------------

    def close(self) -> None:
        """Stop every process, delete veths and namespaces, check they are gone; idempotent.

        Raises LabError listing whatever could not be removed (after trying everything)."""
        if self._closed and not self._procs and not self._namespaces:
            return
        self._closed = True
        errors: list[str] = []
        with _signals_deferred():
            self._stop_processes(errors)
            _evict(self._namespaces, errors)
            self._delete_veths(errors)
            _remove_namespaces(self._namespaces, errors)
            _delete_root_links(re.compile(rf"^{re.escape(self.id)}-"), errors)
            if not errors:
                self._namespaces.clear()
            with contextlib.suppress(OSError):
                self._registry.unlink()
            if not self.keep_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)
        if errors:
            raise LabError(f"lab {self.id} teardown: " + "; ".join(errors))

    def _stop_processes(self, errors: list[str]) -> None:
        procs, self._procs = self._procs, []
        for proc in procs:
            if proc.poll() is None:
                _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + TERM_TIMEOUT
        for proc in procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                try:
                    proc.wait(timeout=KILL_TIMEOUT)
                except subprocess.TimeoutExpired:
                    errors.append(f"process {proc.pid} survived SIGKILL")
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()

    def _delete_veths(self, errors: list[str]) -> None:
        present = set(netns.listnetns())
        for ns, name in self._veths:
            if ns not in present:
                continue
            try:
                with _iproute(ns) as ipr:
                    for idx in ipr.link_lookup(ifname=name):
                        ipr.link("del", index=idx)
                    if ipr.link_lookup(ifname=name):
                        errors.append(f"veth {name} still present in {ns}")
            except Exception as exc:
                errors.append(f"cannot delete veth {name} in {ns}: {exc}")
        self._veths.clear()


def _signal_group(proc: subprocess.Popen[Any], sig: int) -> None:
    """Signal the process's group when it leads one (ours do), else just the process."""
    try:
        if os.getpgid(proc.pid) == proc.pid:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
    except ProcessLookupError:
        pass


def cleanup_stale(prefix: str = "ipt", *, force: bool = False) -> list[str]:
    """Remove what labs with this prefix left behind (their owner died: SIGKILL, a crash).

    A lab whose owner process is still alive is spared unless `force`. Returns the names of
    the namespaces and interfaces removed. Raises LabError if some could not be removed."""
    if not _PREFIX.fullmatch(prefix):
        raise LabError(f"lab prefix {prefix!r} must match {_PREFIX.pattern}")
    pattern = _lab_pattern(prefix)
    by_lab: dict[str, list[str]] = {}
    for ns in netns.listnetns():
        if m := pattern.match(ns):
            by_lab.setdefault(m.group(1), []).append(ns)
    for link_name in (name for _, name in _root_links_matching(pattern)):
        if m := pattern.match(link_name):
            by_lab.setdefault(m.group(1), [])
    registry: dict[str, dict[str, Any]] = {}
    if REGISTRY_DIR.is_dir():
        for path in REGISTRY_DIR.glob(f"{prefix}*.json"):
            lab_id = path.stem
            if re.fullmatch(rf"{re.escape(prefix)}{_HEX4}", lab_id):
                try:
                    registry[lab_id] = json.loads(path.read_text() or "{}")
                except (OSError, ValueError):
                    registry[lab_id] = {}
                by_lab.setdefault(lab_id, [])

    removed: list[str] = []
    errors: list[str] = []
    for lab_id, namespaces in sorted(by_lab.items()):
        owner = registry.get(lab_id, {})
        pid = owner.get("pid")
        if not force and isinstance(pid, int) and _pid_alive(pid):
            started = owner.get("start_time")
            if started is None or started == _proc_start_time(pid):
                continue  # its owner still runs: not stale
        _evict(namespaces, errors)
        _remove_namespaces(namespaces, errors)
        removed += [ns for ns in namespaces if ns not in netns.listnetns()]
        removed += _delete_root_links(re.compile(rf"^{re.escape(lab_id)}-"), errors)
        workdir = owner.get("workdir")
        if isinstance(workdir, str) and Path(workdir).name.startswith(f"{lab_id}-"):
            shutil.rmtree(workdir, ignore_errors=True)
        with contextlib.suppress(OSError):
            (REGISTRY_DIR / f"{lab_id}.json").unlink()
    if errors:
        raise LabError("cleanup_stale: " + "; ".join(errors))
    return removed


__all__ = [
    "LAB_NETWORK",
    "Host",
    "Iface",
    "Lab",
    "LabSwitch",
    "Link",
    "cleanup_stale",
    "sigterm_raises",
]
