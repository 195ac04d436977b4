"""Hypothesis profiles for the property-based tests (the config fuzzers and schemathesis).

The suite must give the same verdict on every run of the same commit, so the default profile,
``deterministic``, derives every example from the test itself (``derandomize``) and keeps no example
database: a red run is red again on a re-run and can be reproduced, a green one stays green.
``.ci/run`` sets ``CI`` and gets this profile whatever else is set.

To hunt for new failures, run the same tests randomized and ten times longer::

    EDGELABEL_FUZZ=explore python -m pytest -q tests/test_config_fuzz.py tests/test_web_security.py \
        -k "fuzz or schemathesis" tests/test_review.py

A failure found that way prints the ``@reproduce_failure`` line to pin it in a test.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

PROFILES = ("deterministic", "explore")
#: how much longer the exploring profile runs each test
EXPLORE_FACTOR = 10

settings.register_profile("deterministic", derandomize=True, database=None, deadline=None, print_blob=True,
                          suppress_health_check=list(HealthCheck))
settings.register_profile("explore", derandomize=False, deadline=None, print_blob=True,
                          suppress_health_check=list(HealthCheck))


def profile_name() -> str:
    """``deterministic`` under CI or when nothing is asked; otherwise ``EDGELABEL_FUZZ``."""
    if os.environ.get("CI"):
        return "deterministic"
    name = os.environ.get("EDGELABEL_FUZZ", "deterministic").strip() or "deterministic"
    if name not in PROFILES:
        raise ValueError(f"EDGELABEL_FUZZ={name!r}: use one of {', '.join(PROFILES)}")
    return name


def load() -> str:
    name = profile_name()
    settings.load_profile(name)
    return name


def examples(n: int) -> int:
    """``n`` examples per test, or ``n`` x EXPLORE_FACTOR under the exploring profile."""
    return n * EXPLORE_FACTOR if profile_name() == "explore" else n
