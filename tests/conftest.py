"""Shared fixtures: one local Ray per test session, shut down at the end."""
import os

import pytest

# Token authentication writes ~/.ray/auth_token on a local init; tests run without it.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Logical CPUs: 2 physical cores, oversubscribed so that training workers,
# teacher actors and Ray Data can all be scheduled (threads are set by hand).
RAY_TEST_CPUS = 4


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray cluster shared by every test that needs one."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=RAY_TEST_CPUS, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
