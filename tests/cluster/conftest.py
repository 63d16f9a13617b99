"""A real Redis server for the shared-store and cluster tests (`cosyapp.cluster.local_redis`: Debian's
redis-server, which scripts/setup.sh installs, on a free loopback port), stopped after the module."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory):
    pytest.importorskip("redis", reason="the Redis client is not installed (the `cluster` extra)")
    from cosyapp.cluster.local_redis import running_redis

    with running_redis(tmp_path_factory.mktemp("redis")) as url:
        yield url
