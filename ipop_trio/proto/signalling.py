"""Signalling messages: types, `encode`, `decode_untrusted`, and the possession proof (sans-IO).

Nodes and the signalling server (docs/architecture.md, "Control plane") exchange JSON objects
over WebSocket, one per text message, each with a "type". Bytes (keys, certificates, nonces) are
standard base64. A node is known by its X25519 link key ("key", base64 of the 32 raw bytes):
names are for people, keys are what the link handshake proves.

    node                                   server
     │ hello {v, cert}                        │  cert must chain to a configured CA: that
     │──────────────────────────────────────▶ │  CA names the overlay
     │        challenge {server_key, nonce}   │  server_key: a fresh X25519 key per connection
     │ ◀──────────────────────────────────────│
     │ auth {proof}                           │  proof: see below
     │──────────────────────────────────────▶ │
     │     welcome {overlay, you, members}    │  members: who is in the overlay now
     │ ◀──────────────────────────────────────│
     │     join {member} / leave {key, name}  │  later arrivals and departures, in order
     │ ◀──────────────────────────────────────│
     │ con_req / con_resp {from, to, ...}     │  relayed to `to`, same overlay only
     │ ◀─────────────────────────────────────▶│
     │ ping {seq}  /  pong {seq}              │  keepalive (client asks, server answers)
     │     error {code, reason, request_id?}  │
     │ ◀──────────────────────────────────────│

Possession proof. The node has no signature key, only its certified X25519 link key S = s·G,
so it proves possession with a Diffie-Hellman, the way Noise's `es`/`ss` do:

    challenge:  E = e·G (fresh per connection, e never leaves the server), N (32 random bytes)
    transcript: T = SHA-256("ipop-trio signalling auth v1" || u16 len(cert) || cert || E || N)
    key:        K = HMAC-SHA256(key="ipop-trio signalling auth v1", DH(s, E))  (HKDF-extract)
    proof:      HMAC-SHA256(K, T)

The server computes DH(e, S) with S from the certificate and compares in constant time. Only
the holder of s can compute DH(s, E) for the server's fresh E, so a recorded proof is useless
on another connection (new E, N), and T binds it to this certificate. The node never reveals a
DH output, only a MAC under a label-separated key, so a hostile server choosing E learns
nothing usable against the node's link handshakes; and the proof is not transferable (the
server can make it itself), which is all admission needs. Link keys never pass through the
server: it relays certificates (public) and candidates (addresses).

Error contract: `decode_untrusted` raises `BadPacket` when the data is not a message at all
(oversized, not UTF-8, not JSON, not an object, unknown "type") and `RemoteProtocolError`
(a `BadPacket`) when a known type has missing, extra-long or wrong-typed fields. Nothing
else. Unknown fields are ignored, so later versions can add fields; con_req / con_resp grew an
optional "ice" object this way: {"ufrag", "pwd", "candidates": [RFC 8839 candidate lines]}
(the lines are parsed by `proto.ice.Candidate.from_sdp_untrusted` where they are used).

This module never touches a socket, clock or event loop (a test scans the imports).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import json
import re
import secrets
import struct
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from ..errors import BadPacket, RemoteProtocolError

VERSION = 1
AUTH_LABEL = b"ipop-trio signalling auth v1"

KEY_SIZE = 32
NONCE_SIZE = 32
PROOF_SIZE = 32
# A node sends small messages (a con_req with a ~400-byte certificate is ~1.5 KiB).
MAX_CLIENT_MESSAGE = 16 * 1024
# The server's welcome lists every member (~150 bytes each): room for ~25,000 members.
MAX_SERVER_MESSAGE = 4 * 1024 * 1024
MAX_CERT = 4096
MAX_CANDIDATES = 16
MAX_GROUPS = 64
MAX_MEMBERS = 25_000

# Candidate types a node may send. "host" now; ICE adds "srflx" and "relay" (RFC 8445 §5.1.1).
CANDIDATE_TYPES = frozenset({"host", "srflx", "relay"})
POLICIES = frozenset({"always", "groups"})
_NAME = re.compile(r"[A-Za-z0-9._-]{1,63}")
_REQUEST_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
# RFC 8445 §5.3: ufrag 4..256 and pwd 22..256 ice-chars.
_ICE_UFRAG = re.compile(r"[A-Za-z0-9+/]{4,256}")
_ICE_PWD = re.compile(r"[A-Za-z0-9+/]{22,256}")
MAX_CANDIDATE_LINE = 512
_ERROR_CODE = re.compile(r"[a-z_]{1,32}")
MAX_REASON = 256
_U16 = struct.Struct(">H")


# --- Message types -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Candidate:
    """Where a node may be reached on the underlay (a connection address; RFC 8445 §5.1)."""

    type: str
    address: str
    port: int


@dataclass(frozen=True, slots=True)
class Member:
    """A member of an overlay as the server announces it (verified at admission)."""

    key: bytes
    name: str
    address: str  # overlay address, from the certificate


@dataclass(frozen=True, slots=True)
class Hello:
    cert: bytes
    version: int = VERSION


@dataclass(frozen=True, slots=True)
class Challenge:
    server_key: bytes
    nonce: bytes


@dataclass(frozen=True, slots=True)
class Auth:
    proof: bytes


@dataclass(frozen=True, slots=True)
class Welcome:
    overlay: str
    you: Member
    members: tuple[Member, ...]  # everyone else, in join order


@dataclass(frozen=True, slots=True)
class Join:
    member: Member


@dataclass(frozen=True, slots=True)
class Leave:
    key: bytes
    name: str


@dataclass(frozen=True, slots=True)
class IceOffer:
    """ICE parameters of one side of a link (RFC 8445 §5.3): short-term credentials and
    its candidates as RFC 8839 candidate-attribute lines. A new ufrag is an ICE restart."""

    ufrag: str
    pwd: str = field(repr=False)
    candidates: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class _Con:
    """The fields of a connection request and of its answer (relayed alike)."""

    sender: bytes  # "from" on the wire
    to: bytes
    overlay: str
    request_id: str
    candidates: tuple[Candidate, ...]
    cert: bytes = field(repr=False)
    groups: tuple[str, ...]
    policy: str
    ice: IceOffer | None = None


@dataclass(frozen=True, slots=True)
class ConReq(_Con):
    """A connection request, relayed by the server from `sender` to `to` in `overlay`."""


@dataclass(frozen=True, slots=True)
class ConResp(_Con):
    """The answer to a ConReq (`request_id` echoes the request's)."""


@dataclass(frozen=True, slots=True)
class Ping:
    seq: int


@dataclass(frozen=True, slots=True)
class Pong:
    seq: int


@dataclass(frozen=True, slots=True)
class Error:
    code: str
    reason: str
    request_id: str | None = None


Message = Hello | Challenge | Auth | Welcome | Join | Leave | ConReq | ConResp | Ping | Pong | Error


# --- What a node's signalling client tells its controller ----------------------------------


@dataclass(frozen=True, slots=True)
class Connected:
    """Admitted: `welcome` lists the members; `local` is our address on the connection (the
    address that routes to the server: a host candidate)."""

    welcome: Welcome
    local: str | None


@dataclass(frozen=True, slots=True)
class Disconnected:
    reason: str


ClientEvent = Connected | Disconnected | Join | Leave | ConReq | ConResp | Error


# --- Encoding --------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _candidate_obj(c: Candidate) -> dict[str, Any]:
    return {"type": c.type, "address": c.address, "port": c.port}


def _member_obj(m: Member) -> dict[str, Any]:
    return {"key": _b64(m.key), "name": m.name, "address": m.address}


def _con_obj(kind: str, m: ConReq | ConResp) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "type": kind,
        "from": _b64(m.sender),
        "to": _b64(m.to),
        "overlay": m.overlay,
        "request_id": m.request_id,
        "candidates": [_candidate_obj(c) for c in m.candidates],
        "cert": _b64(m.cert),
        "groups": list(m.groups),
        "policy": m.policy,
    }
    if m.ice is not None:
        obj["ice"] = {
            "ufrag": m.ice.ufrag,
            "pwd": m.ice.pwd,
            "candidates": list(m.ice.candidates),
        }
    return obj


def to_object(msg: Message) -> dict[str, Any]:
    """The JSON object for `msg` (what `encode` serialises)."""
    if isinstance(msg, Hello):
        return {"type": "hello", "v": msg.version, "cert": _b64(msg.cert)}
    if isinstance(msg, Challenge):
        return {"type": "challenge", "server_key": _b64(msg.server_key), "nonce": _b64(msg.nonce)}
    if isinstance(msg, Auth):
        return {"type": "auth", "proof": _b64(msg.proof)}
    if isinstance(msg, Welcome):
        return {
            "type": "welcome",
            "overlay": msg.overlay,
            "you": _member_obj(msg.you),
            "members": [_member_obj(m) for m in msg.members],
        }
    if isinstance(msg, Join):
        return {"type": "join", "member": _member_obj(msg.member)}
    if isinstance(msg, Leave):
        return {"type": "leave", "key": _b64(msg.key), "name": msg.name}
    if isinstance(msg, ConReq):
        return _con_obj("con_req", msg)
    if isinstance(msg, ConResp):
        return _con_obj("con_resp", msg)
    if isinstance(msg, Ping):
        return {"type": "ping", "seq": msg.seq}
    if isinstance(msg, Pong):
        return {"type": "pong", "seq": msg.seq}
    if isinstance(msg, Error):
        obj: dict[str, Any] = {"type": "error", "code": msg.code, "reason": msg.reason}
        if msg.request_id is not None:
            obj["request_id"] = msg.request_id
        return obj
    raise TypeError(f"not a signalling message: {msg!r}")


def encode(msg: Message) -> str:
    """One WebSocket text message."""
    return json.dumps(to_object(msg), separators=(",", ":"))


# --- Decoding (the trust boundary) --------------------------------------------------------


def decode_untrusted(data: str | bytes, *, max_size: int = MAX_CLIENT_MESSAGE) -> Message:
    """Parse one message received from the network. Raises only BadPacket (see the module
    docstring for which subclass means what)."""
    if not isinstance(data, str | bytes):
        raise BadPacket(f"message is {type(data).__name__}, not text")
    if len(data) > max_size:
        raise BadPacket(f"message of {len(data)} bytes exceeds the limit of {max_size}")
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        obj = json.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BadPacket(f"message is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise BadPacket("message is not a JSON object")
    kind = obj.get("type")
    parser = _PARSERS.get(kind) if isinstance(kind, str) else None
    if parser is None:
        raise BadPacket(f"unknown message type {kind!r}"[:120])
    try:
        return parser(obj)
    except RemoteProtocolError:
        raise
    except (KeyError, TypeError, ValueError) as exc:  # defensive: field helpers raise RPE
        raise RemoteProtocolError(f"{kind}: malformed: {exc}") from None


def _get(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], what: str) -> Any:
    if key not in obj:
        raise RemoteProtocolError(f"{what}: missing field {key!r}")
    value = obj[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise RemoteProtocolError(f"{what}: field {key!r} has the wrong type")
    return value


def _bytes(
    obj: dict[str, Any], key: str, what: str, *, size: int | None = None, max_size: int = 0
) -> bytes:
    text = _get(obj, key, str, what)
    limit = size if size is not None else max_size
    if len(text) > 4 * ((limit + 2) // 3):
        raise RemoteProtocolError(f"{what}: field {key!r} is too long")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RemoteProtocolError(f"{what}: field {key!r} is not base64") from None
    if size is not None and len(raw) != size:
        raise RemoteProtocolError(f"{what}: field {key!r} must be {size} bytes")
    if not raw:
        raise RemoteProtocolError(f"{what}: field {key!r} is empty")
    return raw


def _name(obj: dict[str, Any], key: str, what: str) -> str:
    value = _get(obj, key, str, what)
    if not _NAME.fullmatch(value):
        raise RemoteProtocolError(f"{what}: field {key!r} is not a valid name")
    return str(value)


def _ip(value: object, what: str) -> str:
    if not isinstance(value, str) or len(value) > 45:
        raise RemoteProtocolError(f"{what}: not an IP address")
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise RemoteProtocolError(f"{what}: not an IP address") from None


def _int(obj: dict[str, Any], key: str, what: str, lo: int, hi: int) -> int:
    value = _get(obj, key, int, what)
    if not lo <= value <= hi:
        raise RemoteProtocolError(f"{what}: field {key!r} is out of range")
    return int(value)


def _list(obj: dict[str, Any], key: str, what: str, limit: int) -> list[Any]:
    value = _get(obj, key, list, what)
    if len(value) > limit:
        raise RemoteProtocolError(f"{what}: field {key!r} has more than {limit} entries")
    return value


def _member(value: object, what: str) -> Member:
    if not isinstance(value, dict):
        raise RemoteProtocolError(f"{what}: member is not an object")
    return Member(
        key=_bytes(value, "key", what, size=KEY_SIZE),
        name=_name(value, "name", what),
        address=_ip(value.get("address"), f"{what}: member address"),
    )


def _candidate(value: object, what: str) -> Candidate:
    if not isinstance(value, dict):
        raise RemoteProtocolError(f"{what}: candidate is not an object")
    ctype = _get(value, "type", str, what)
    if ctype not in CANDIDATE_TYPES:
        raise RemoteProtocolError(f"{what}: unknown candidate type"[:120])
    return Candidate(
        type=ctype,
        address=_ip(value.get("address"), f"{what}: candidate address"),
        port=_int(value, "port", what, 1, 65535),
    )


def _ice(value: object, what: str) -> IceOffer:
    if not isinstance(value, dict):
        raise RemoteProtocolError(f"{what}: ice is not an object")
    ufrag = _get(value, "ufrag", str, what)
    pwd = _get(value, "pwd", str, what)
    if not _ICE_UFRAG.fullmatch(ufrag) or not _ICE_PWD.fullmatch(pwd):
        raise RemoteProtocolError(f"{what}: ice ufrag/pwd are not 4/22..256 ice-chars")
    lines = _list(value, "candidates", what, MAX_CANDIDATES)
    if not all(isinstance(c, str) and 0 < len(c) <= MAX_CANDIDATE_LINE for c in lines):
        raise RemoteProtocolError(f"{what}: ice candidates must be candidate lines")
    return IceOffer(ufrag, pwd, tuple(lines))


def _parse_hello(obj: dict[str, Any]) -> Hello:
    return Hello(
        cert=_bytes(obj, "cert", "hello", max_size=MAX_CERT),
        version=_int(obj, "v", "hello", 0, 2**31),
    )


def _parse_challenge(obj: dict[str, Any]) -> Challenge:
    return Challenge(
        server_key=_bytes(obj, "server_key", "challenge", size=KEY_SIZE),
        nonce=_bytes(obj, "nonce", "challenge", size=NONCE_SIZE),
    )


def _parse_auth(obj: dict[str, Any]) -> Auth:
    return Auth(proof=_bytes(obj, "proof", "auth", size=PROOF_SIZE))


def _parse_welcome(obj: dict[str, Any]) -> Welcome:
    return Welcome(
        overlay=_name(obj, "overlay", "welcome"),
        you=_member(obj.get("you"), "welcome"),
        members=tuple(_member(m, "welcome") for m in _list(obj, "members", "welcome", MAX_MEMBERS)),
    )


def _parse_join(obj: dict[str, Any]) -> Join:
    return Join(member=_member(obj.get("member"), "join"))


def _parse_leave(obj: dict[str, Any]) -> Leave:
    return Leave(key=_bytes(obj, "key", "leave", size=KEY_SIZE), name=_name(obj, "name", "leave"))


def _parse_con(obj: dict[str, Any], what: str) -> dict[str, Any]:
    request_id = _get(obj, "request_id", str, what)
    if not _REQUEST_ID.fullmatch(request_id):
        raise RemoteProtocolError(f"{what}: request_id must be 1-64 of A-Z a-z 0-9 _ -")
    groups = _list(obj, "groups", what, MAX_GROUPS)
    if not all(isinstance(g, str) and _NAME.fullmatch(g) for g in groups):
        raise RemoteProtocolError(f"{what}: groups must be valid names")
    policy = _get(obj, "policy", str, what)
    if policy not in POLICIES:
        raise RemoteProtocolError(f"{what}: unknown security policy")
    ice = None
    if obj.get("ice") is not None:
        ice = _ice(obj["ice"], what)
    return {
        "ice": ice,
        "sender": _bytes(obj, "from", what, size=KEY_SIZE),
        "to": _bytes(obj, "to", what, size=KEY_SIZE),
        "overlay": _name(obj, "overlay", what),
        "request_id": request_id,
        "candidates": tuple(
            _candidate(c, what) for c in _list(obj, "candidates", what, MAX_CANDIDATES)
        ),
        "cert": _bytes(obj, "cert", what, max_size=MAX_CERT),
        "groups": tuple(groups),
        "policy": policy,
    }


def _parse_con_req(obj: dict[str, Any]) -> ConReq:
    return ConReq(**_parse_con(obj, "con_req"))


def _parse_con_resp(obj: dict[str, Any]) -> ConResp:
    return ConResp(**_parse_con(obj, "con_resp"))


def _parse_ping(obj: dict[str, Any]) -> Ping:
    return Ping(seq=_int(obj, "seq", "ping", 0, 2**53))


def _parse_pong(obj: dict[str, Any]) -> Pong:
    return Pong(seq=_int(obj, "seq", "pong", 0, 2**53))


def _parse_error(obj: dict[str, Any]) -> Error:
    code = _get(obj, "code", str, "error")
    if not _ERROR_CODE.fullmatch(code):
        raise RemoteProtocolError("error: code must be 1-32 of a-z _")
    reason = _get(obj, "reason", str, "error")
    if len(reason) > MAX_REASON:
        raise RemoteProtocolError("error: reason is too long")
    request_id = obj.get("request_id")
    if request_id is not None and (
        not isinstance(request_id, str) or not _REQUEST_ID.fullmatch(request_id)
    ):
        raise RemoteProtocolError("error: bad request_id")
    return Error(code=code, reason=reason, request_id=request_id)


_PARSERS: dict[str, Any] = {
    "hello": _parse_hello,
    "challenge": _parse_challenge,
    "auth": _parse_auth,
    "welcome": _parse_welcome,
    "join": _parse_join,
    "leave": _parse_leave,
    "con_req": _parse_con_req,
    "con_resp": _parse_con_resp,
    "ping": _parse_ping,
    "pong": _parse_pong,
    "error": _parse_error,
}


# --- Possession proof ----------------------------------------------------------------------


def auth_transcript(cert_der: bytes, server_key: bytes, nonce: bytes) -> bytes:
    """T = SHA-256(label || u16 len(cert) || cert || E || N)."""
    h = hashlib.sha256(AUTH_LABEL)
    h.update(_U16.pack(len(cert_der)))
    h.update(cert_der)
    h.update(server_key)
    h.update(nonce)
    return h.digest()


def _proof(shared: bytes, transcript: bytes) -> bytes:
    key = hmac.digest(AUTH_LABEL, shared, "sha256")
    return hmac.digest(key, transcript, "sha256")


def answer_challenge(static_private: bytes, cert_der: bytes, challenge: Challenge) -> Auth:
    """The node's side: prove possession of `static_private` (raw X25519) for `cert_der`.

    Raises RemoteProtocolError when the server's key is a low-order point (the DH is zero)."""
    private = X25519PrivateKey.from_private_bytes(bytes(static_private))
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(challenge.server_key))
    except ValueError:
        raise RemoteProtocolError("challenge: server key is a low-order point") from None
    return Auth(_proof(shared, auth_transcript(cert_der, challenge.server_key, challenge.nonce)))


class PendingChallenge:
    """The server's side of one proof: a fresh ephemeral key and nonce for one connection."""

    __slots__ = ("_private", "challenge")

    def __init__(self) -> None:
        self._private = X25519PrivateKey.generate()
        self.challenge = Challenge(
            server_key=self._private.public_key().public_bytes_raw(),
            nonce=secrets.token_bytes(NONCE_SIZE),
        )

    def verify(self, node_public: bytes, cert_der: bytes, auth: Auth) -> bool:
        """True when `auth` proves possession of the key `node_public` (from `cert_der`)."""
        try:
            shared = self._private.exchange(X25519PublicKey.from_public_bytes(node_public))
        except ValueError:
            return False
        c = self.challenge
        expected = _proof(shared, auth_transcript(cert_der, c.server_key, c.nonce))
        return hmac.compare_digest(expected, auth.proof)


__all__ = [
    "MAX_CLIENT_MESSAGE",
    "MAX_SERVER_MESSAGE",
    "Auth",
    "Candidate",
    "Challenge",
    "ClientEvent",
    "ConReq",
    "ConResp",
    "Connected",
    "Disconnected",
    "Error",
    "Hello",
    "IceOffer",
    "Join",
    "Leave",
    "Member",
    "Message",
    "PendingChallenge",
    "Ping",
    "Pong",
    "Welcome",
    "answer_challenge",
    "decode_untrusted",
    "encode",
]
