"""Hypothesis profiles: ``ci`` (default; derandomized, 200 examples per property), ``dev`` (fast,
random) and ``long`` (nightly), chosen by ``ZCKPT_HYPOTHESIS_PROFILE``."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_common = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
}
settings.register_profile("ci", max_examples=200, derandomize=True, print_blob=True, **_common)
settings.register_profile("dev", max_examples=30, **_common)
settings.register_profile("long", max_examples=3000, **_common)
settings.load_profile(os.environ.get("ZCKPT_HYPOTHESIS_PROFILE", "ci"))
