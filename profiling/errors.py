"""Errors of `ipop-trio profile`. A `ProfileError` is an `IpopError`, so the CLI prints it as
one clear message with exit code 1."""

from __future__ import annotations

from ipop_trio.errors import IpopError


class ProfileError(IpopError):
    """The profile could not be taken (py-spy cannot attach, scalene missing, no node, ...)."""
