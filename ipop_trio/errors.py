"""One small exception hierarchy for ipop-trio.

Only the CLI turns these into messages and exit codes. Errors say whose fault they are:
`BadPacket` / `RemoteProtocolError` (the network or a peer sent something wrong),
`LocalProtocolError` (we were asked to do something the protocol forbids), `ConfigError`
(the operator's configuration is wrong).
"""

from __future__ import annotations


class IpopError(Exception):
    """Base of every error ipop-trio raises on purpose."""


class ConfigError(IpopError):
    """A configuration value is wrong. `field` names it (e.g. ``peer[1].endpoint``)."""

    def __init__(self, field: str, why: str) -> None:
        super().__init__(f"{field}: {why}")
        self.field = field
        self.why = why


class ConfigErrors(ConfigError):
    """Several configuration values are wrong, all found in one pass (`errors`, section by
    section in the order the parser checks them).

    `field` and `why` are the first one's, so a caller that expects one error still works."""

    def __init__(self, errors: list[ConfigError]) -> None:
        first = errors[0]
        super().__init__(first.field, first.why)
        self.errors = errors
        self.args = ("\n".join(str(e) for e in errors),)


class BadPacket(IpopError):
    """Bytes from the network could not be accepted. The only error `*_untrusted` raises."""


class RemoteProtocolError(BadPacket):
    """A well-formed message from a peer or server that the protocol refuses."""


class CertificateRefused(RemoteProtocolError):
    """A peer's certificate does not chain to our CA, is expired, or does not match."""


class LocalProtocolError(IpopError):
    """We tried to do something the protocol state does not allow (a bug or misuse)."""


class PkiError(IpopError):
    """A CA or certificate operation failed (missing file, refusing to overwrite, ...)."""


class LabError(IpopError):
    """The namespace lab could not be built or a lab command failed."""


class TapError(IpopError):
    """The TAP device could not be opened or configured."""
