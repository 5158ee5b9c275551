"""Hypothesis profiles: ``ci`` (default; derandomized, 200 examples per property), ``dev`` (fast,
random) and ``long`` (nightly), chosen by ``ZCKPT_HYPOTHESIS_PROFILE``; the ``s3_server`` fixture
(a real S3 server on loopback, for tests/test_s3.py)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

# Test helpers beside the tests (peak_child, crash_child) import as top-level modules; with
# --import-mode=importlib pytest does not put this folder on sys.path itself.
if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))

_common = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
}
settings.register_profile("ci", max_examples=200, derandomize=True, print_blob=True, **_common)
settings.register_profile("dev", max_examples=30, **_common)
settings.register_profile("long", max_examples=3000, **_common)
settings.load_profile(os.environ.get("ZCKPT_HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def s3_server() -> Iterator[Any]:
    """A real S3-protocol server (moto's server mode) on 127.0.0.1, a free port, one bucket;
    stopped after the session. Skips when the test-s3 extra is not installed."""
    pytest.importorskip("s3fs", reason="needs s3fs: pip install 'zckpt[test-s3]'")
    pytest.importorskip("moto.server", reason="needs moto[server]: pip install 'zckpt[test-s3]'")
    from s3_support import start_server

    server = start_server()
    try:
        yield server
    finally:
        server.stop()
