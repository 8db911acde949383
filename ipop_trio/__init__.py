"""ipop-trio: IP over P2P on Trio."""

__version__ = "0.1.0"
