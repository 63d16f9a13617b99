"""A real Redis server for the shared-store and cluster tests: `redis-server` (Debian's package, which
scripts/setup.sh installs) on a free loopback port, its files in a temporary folder, stopped after the module."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from cosyapp.service_process import free_port


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory):
    import redis

    binary = shutil.which("redis-server")
    assert binary, "redis-server is not installed: scripts/setup.sh installs it (Debian package redis-server)"
    folder: Path = tmp_path_factory.mktemp("redis")
    port = free_port()
    with open(folder / "redis.log", "wb") as log:
        process = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder),
                                    "--save", "", "--appendonly", "no"], stdout=log, stderr=subprocess.STDOUT)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert process.poll() is None, (folder / "redis.log").read_text()
                assert time.monotonic() < deadline, "redis-server did not start in 20 s"
                time.sleep(0.05)
        yield url
    finally:
        client.close()
        process.terminate()
        process.wait(timeout=10)
