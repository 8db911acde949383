"""The [dns] section's domain check, and the DNS port: what config and node need of DNS
without importing the DNS library (dnspython, ~8 MB a node without [dns] should not carry).
The answering core is proto/names.py."""

from __future__ import annotations

import re

PORT = 53
_LABEL = re.compile(r"[a-z0-9_-]{1,63}")


def check_domain(text: str) -> str:
    """`text` as the zone's domain (lower case, no final dot); ValueError when it is not a
    DNS name of 1-63-character labels of letters, digits, "-" and "_"."""
    labels = text.lower().removesuffix(".").split(".")
    for label in labels:
        if not _LABEL.fullmatch(label):
            raise ValueError(f"{text!r} is not a domain name (labels of a-z 0-9 - _, dots between)")
    if len(".".join(labels)) > 200:  # room for member names below it (a name is 255 bytes)
        raise ValueError(f"a domain of over 200 characters leaves no room for names: {text!r}")
    return ".".join(labels)


__all__ = ["PORT", "check_domain"]
