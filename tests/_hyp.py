"""Hypothesis settings shared by the differential tests."""

import os

from hypothesis import HealthCheck, Phase, settings

# Deterministic (a CI failure reproduces locally), no example database (other
# people's runs must not steer ours), and no deadline: the reference engine's
# time varies with the example far more than hypothesis's deadline allows.
HYP = settings(deadline=None, derandomize=True, database=None, print_blob=False,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.filter_too_much,
                                      HealthCheck.large_base_example])
if os.environ.get("S2SPLIT_TEST_NO_SHRINK"):
    # Report a failure unshrunk: shrinking replays whole runs through the
    # reference engine.
    HYP = settings(HYP, phases=[Phase.explicit, Phase.generate])
