"""`cosyapp serve` runs on tcmalloc when it is installed: it restarts itself once with tcmalloc preloaded."""

from __future__ import annotations

import ctypes.util
import os
import subprocess
import sys

import pytest

from cosyapp.allocator import RESTARTED_MARKER, TCMALLOC

# What a process prints after asking for tcmalloc, and whether it runs on it then.
PROBE = ("from cosyapp.allocator import restart_with_tcmalloc, tcmalloc_loaded\n"
         "print(restart_with_tcmalloc()); print(tcmalloc_loaded())")


def probe(**env: str) -> list[str]:
    environment = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", RESTARTED_MARKER)}
    result = subprocess.run([sys.executable, "-c", PROBE], env={**environment, **env}, capture_output=True,
                            text=True, timeout=60, check=True)
    return result.stdout.split("\n")[:2]


@pytest.mark.skipif(not sys.platform.startswith("linux") or ctypes.util.find_library(TCMALLOC) is None,
                    reason="tcmalloc is not installed here (Debian/Ubuntu: libtcmalloc-minimal4)")
def test_a_process_restarts_itself_on_tcmalloc() -> None:
    assert probe() == ["memory allocator: tcmalloc", "True"]


def test_a_preload_that_did_not_take_is_not_retried() -> None:
    # The marker says this process is the restarted one; without tcmalloc mapped it must go on, not loop.
    message, loaded = probe(**{RESTARTED_MARKER: "1"})
    assert loaded == "False"
    assert message == "memory allocator: the system's (tcmalloc was preloaded but did not load)"


# Frees 400 MB of numpy buffers, then reports RSS (MB) before and after release_free_memory.
RELEASE_PROBE = """
import numpy as np
from cosyapp.allocator import release_free_memory
from cosyapp.robustness.service import rss_mb
import os
buffers = [np.ones(1_000_000) for _ in range(50)]
del buffers
held = rss_mb(os.getpid())
release_free_memory(0)
print(held, rss_mb(os.getpid()))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or ctypes.util.find_library(TCMALLOC) is None,
                    reason="tcmalloc is not installed here (Debian/Ubuntu: libtcmalloc-minimal4)")
def test_freed_memory_goes_back_to_the_system() -> None:
    # tcmalloc keeps what is freed mapped (the service stayed at the size of its largest burst); released, it goes.
    environment = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", RESTARTED_MARKER)}
    result = subprocess.run([sys.executable, "-c", RELEASE_PROBE], capture_output=True, text=True, timeout=60,
                            env={**environment, "LD_PRELOAD": ctypes.util.find_library(TCMALLOC)}, check=True)
    held, released = map(float, result.stdout.split())
    assert held - released > 300, (held, released)
