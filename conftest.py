"""Hypothesis profiles, chosen by HYPOTHESIS_PROFILE: ci (default), dev, gpu."""

import os

from hypothesis import HealthCheck, settings

_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", derandomize=True, max_examples=20, print_blob=True, **_common)
settings.register_profile("dev", max_examples=200, **_common)
settings.register_profile("gpu", max_examples=100, derandomize=True, print_blob=True, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
