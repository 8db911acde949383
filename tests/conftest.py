"""Fixtures shared by every tier."""

from __future__ import annotations

import os

import pytest

from ipop_trio.datapath import native


@pytest.fixture(scope="session", params=["python", "native"])
def datapath(request: pytest.FixtureRequest) -> str:
    """Each data-path test runs on both implementations: the Python reference and the native
    core (skipped when the extension is not built, unless IPOP_TRIO_REQUIRE_NATIVE=1 makes
    that a failure, as in CI)."""
    if request.param == "native" and not native.AVAILABLE:
        if os.environ.get("IPOP_TRIO_REQUIRE_NATIVE") == "1":
            pytest.fail(f"IPOP_TRIO_REQUIRE_NATIVE=1 but {native.WHY}", pytrace=False)
        pytest.skip(f"native core unavailable: {native.WHY}")
    return str(request.param)
